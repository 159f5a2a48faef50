"""Rule-based reward functions shipped with the project, with TRL's reward-function signature
(``fn(prompts, completions, completion_ids, trainer_state, **columns) -> list[float | None]``),
usable as ``reward_funcs: [..., trainer.rules:brevity_reward]``."""

from __future__ import annotations

from typing import Any

# Completions of this many words or more get no brevity reward.
BREVITY_BUDGET_WORDS = 12


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The text of a completion: a string, or the content of its assistant messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion)


def brevity_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """``1 - words / BREVITY_BUDGET_WORDS``, floored at 0: shorter completions score higher.

    In the demo's review world the reward model gives a one-adjective review
    ("great .") and a longer all-positive one the same score; this rule breaks that tie
    towards the short one, so its effect shows in the completion length.
    """
    return [
        max(0.0, 1.0 - len(completion_text(c).split()) / BREVITY_BUDGET_WORDS) for c in completions
    ]
