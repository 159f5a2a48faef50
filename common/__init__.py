"""Shared by the reward service and the trainer: HTTP schemas, the reward client, demo models."""
