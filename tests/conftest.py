"""Shared fixtures: the built-in demo models, built once per machine and cached."""

from __future__ import annotations

import os

import pytest

from common.demo_models import DemoModels, ensure_demo_models

# No hub in tests: every model is built locally and loaded from a path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_models() -> DemoModels:
    """Policy, two reward models and prompt files (cache: ``$ONLINE_DPO_CACHE``)."""
    return ensure_demo_models()
