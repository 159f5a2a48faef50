"""Shared fixtures (the demo models, one reward service for the whole session) and the test
tiers: every test gets one of the markers ``unit``, ``integration`` or ``e2e`` (see
``TIERS``); ``slow`` marks the long ones, so ``pytest -m "not slow"`` is the inner loop."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.demo_models import DemoModels, ensure_demo_models
from trainer.service_process import running_service

# No hub in tests: every model is built locally and loaded from a path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TIERS = ("unit", "integration", "e2e")
# The tier of each module's tests; a test marked with a tier itself keeps that one. unit: no
# subprocess, service or training run; integration: a real service or a short training in this
# process; e2e: the CLI, the demo, DDP, Docker and fault-injection runs.
MODULE_TIERS = {
    "test_data": "unit",
    "test_losses": "unit",
    "test_packaging": "unit",
    "test_service_units": "unit",
    "test_word_cache": "unit",
    "test_client": "integration",
    "test_completion_log": "integration",
    "test_compat_routes": "integration",
    "test_reliability_service": "integration",
    "test_reward_function": "integration",
    "test_rewards": "integration",
    "test_service": "integration",
    "test_trainer": "integration",
    "test_cli": "e2e",
    "test_demo": "e2e",
    "test_distributed": "e2e",
    "test_docker": "e2e",
    "test_faults": "e2e",
    "test_reward_sources_training": "e2e",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each test its module's tier unless it carries one; a module not in
    ``MODULE_TIERS`` counts as integration (the cautious guess)."""
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(MODULE_TIERS.get(Path(item.path).stem, "integration"))


@pytest.fixture(scope="session")
def demo_models() -> DemoModels:
    """Policy, two reward models and prompt files (cache: ``$ONLINE_DPO_CACHE``)."""
    return ensure_demo_models()


@pytest.fixture(scope="session")
def reward_path(demo_models: DemoModels) -> Path:
    """The demo reward model's directory."""
    return demo_models.reward


@pytest.fixture(scope="session")
def reward_service(reward_path: Path) -> Iterator[str]:
    """The base URL of one ``python -m reward_service`` subprocess on a free loopback port,
    serving the demo reward model with default settings, shared by the whole session. Tests
    that need other settings or kill their service start their own with ``running_service``
    / ``ServiceProcess`` (a subprocess) or ``tests.support.serve`` (an app in a thread)."""
    with running_service(reward_path) as url:
        yield url


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """The ``wandb`` module in offline mode writing under ``tmp_path``.

    W&B caches its settings (``WANDB_DIR`` included) in a process-wide singleton on first use,
    so a second test in the same process would write into the first test's directory; tearing
    the singleton down before and after gives each test its own run directory.
    """
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    yield wandb
    wandb.finish()
    wandb.teardown()
