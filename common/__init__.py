"""Shared by the reward service and the trainer: HTTP schemas, the reward client, demo models.

``common.schemas``, ``common.client`` and ``common.reward_function`` need only httpx and pydantic
(the base install); ``common.demo_models`` needs the ``[trainer]`` extra.
"""
