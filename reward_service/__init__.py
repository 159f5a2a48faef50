"""Reward model served over HTTP with cross-request dynamic batching.

Entry points: :func:`reward_service.app.create_app` (app factory) and the ``reward-service`` CLI
(:mod:`reward_service.__main__`). Nothing heavy is imported here, so the CLI reports bad flags
before torch is loaded.
"""
