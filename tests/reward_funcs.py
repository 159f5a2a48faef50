"""Reward functions used by the tests (imported by path, e.g. ``tests.reward_funcs:answer_check``).

Each has TRL's reward-function signature unless its name says it is broken on purpose.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from trainer.rules import completion_text

# What the last call of `recording` received (the test reads it back).
LAST_CALL: dict[str, Any] = {}


def answer_check(
    prompts: list[Any], completions: list[Any], answer: list[str | None], **kwargs: Any
) -> list[float | None]:
    """1.0 when the completion contains the row's ``answer`` column, else 0.0; None (does not
    apply) for rows without an answer."""
    return [
        None if a is None else float(a in completion_text(c))
        for c, a in zip(completions, answer, strict=True)
    ]


def word_count(completions: list[Any], **kwargs: Any) -> list[float]:
    return [float(len(completion_text(c).split())) for c in completions]


async def async_has_period(completions: list[Any], **kwargs: Any) -> list[float]:
    await asyncio.sleep(0.001)
    return [float("." in completion_text(c)) for c in completions]


def recording(**kwargs: Any) -> list[float]:
    """Keeps its arguments in LAST_CALL; 0.0 for every completion."""
    LAST_CALL.clear()
    LAST_CALL.update(kwargs)
    return [0.0] * len(kwargs["completions"])


def sleep_10ms(completions: list[Any], **kwargs: Any) -> list[float]:
    time.sleep(0.010)
    return [1.0] * len(completions)


def none_for_all(completions: list[Any], **kwargs: Any) -> list[None]:
    return [None] * len(completions)


def one_too_few(completions: list[Any], **kwargs: Any) -> list[float]:
    return [0.0] * (len(completions) - 1)


def returns_text(completions: list[Any], **kwargs: Any) -> list[Any]:
    return ["good"] * len(completions)


def returns_nan(completions: list[Any], **kwargs: Any) -> list[float]:
    return [float("nan")] * len(completions)


def raises(completions: list[Any], **kwargs: Any) -> list[float]:
    raise KeyError("missing field")


def no_kwargs(prompts: list[Any], completions: list[Any]) -> list[float]:
    """Wrong on purpose: cannot take completion_ids / trainer_state."""
    return [0.0] * len(completions)


def needs_label(completions: list[Any], label: list[str], **kwargs: Any) -> list[float]:
    """Needs a ``label`` column."""
    return [0.0] * len(completions)


NOT_CALLABLE = 3


def fails_at_step_2_count(completions: list[Any], trainer_state: Any, **kwargs: Any) -> list[float]:
    """Right at step 1; one reward too few from step 2 on (``trainer_state.global_step`` is
    the number of steps done)."""
    return [0.0] * (len(completions) - (trainer_state.global_step >= 1))


def fails_at_step_2_text(completions: list[Any], trainer_state: Any, **kwargs: Any) -> list[Any]:
    """Numbers at step 1; a string from step 2 on."""
    return [0.0 if trainer_state.global_step < 1 else "high" for _ in completions]


def rank_calls(completions: list[Any], trainer_state: Any, **kwargs: Any) -> list[float]:
    """Appends its call (this process's rank, the step, the completions) to
    ``$REWARD_CALLS_DIR/rank-<RANK>.jsonl``; rewards 0.0."""
    path = Path(os.environ["REWARD_CALLS_DIR"]) / f"rank-{os.environ.get('RANK', '0')}.jsonl"
    with path.open("a") as f:
        call = {"step": trainer_state.global_step + 1, "completions": completions}
        f.write(json.dumps(call) + "\n")
    return [0.0] * len(completions)


def logs_words(
    completions: list[Any], log_extra: Any, log_metric: Any, **kwargs: Any
) -> list[float]:
    """Logs each completion's word count (``log_extra`` column ``words``) and their mean
    (``log_metric`` ``words/mean``) through TRL's callbacks; 0.0 for every completion."""
    words = [len(completion_text(c).split()) for c in completions]
    log_extra("words", words)
    log_metric("words/mean", sum(words) / len(words))
    return [0.0] * len(completions)


def logs_one_value_too_few(completions: list[Any], log_extra: Any, **kwargs: Any) -> list[float]:
    log_extra("words", [1] * (len(completions) - 1))
    return [0.0] * len(completions)


def without_kwargs(
    prompts: list[Any], completions: list[Any], completion_ids: list[Any], trainer_state: Any
) -> list[float]:
    """TRL's four arguments and nothing else: called without the logging callbacks."""
    return [1.0] * len(completions)
