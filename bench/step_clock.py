"""A ``TrainerCallback`` for the benchmarks: when each step ended, and the training logs."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback


class StepClock(TrainerCallback):
    """Each step's end (``perf_counter``) and each training log (one with
    ``objective/scores``: evaluation and summary logs are left out)."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.logs: list[dict[str, float]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and "objective/scores" in logs:
            self.logs.append(dict(logs))
