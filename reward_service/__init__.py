"""Reward model served over HTTP with cross-request dynamic batching."""

from reward_service.app import create_app
from reward_service.settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]
