"""Constants and helpers shared by tests."""

import os
import signal
import time
from pathlib import Path
from typing import Any

from trainer.config import OnlineDPOConfig

# The metric names TRL 1.16's OnlineDPOTrainer logs with a reward model (the issue's list).
TRL_METRIC_NAMES = frozenset(
    {
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "objective/scores",
        "objective/scores_margin",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "val/contain_eos_token",
        "beta",
    }
)
TIMING_NAMES = frozenset({"time/generate", "time/score_wait", "time/forward_backward"})


def tiny_config(output_dir: Path, url: str | None, **overrides: Any) -> OnlineDPOConfig:
    """A few fast CPU steps on the demo models (small batch, short completions, no saving)."""
    defaults: dict[str, Any] = {
        "output_dir": str(output_dir),
        "reward_url": url,
        "per_device_train_batch_size": 4,
        "max_new_tokens": 8,
        "temperature": 1.0,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    return OnlineDPOConfig(**{**defaults, **overrides})


def process_alive(pid: int) -> bool:
    """Is ``pid`` a live (not zombie) process?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def exited_within(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` (an orphan) to exit; SIGKILL it if it does not, so
    a failing test leaves nothing running."""
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)
        return False
    return True
