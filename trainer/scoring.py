"""The ``/score`` items of a batch of completions (what a reward service is sent)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer.generation import Prompt, is_conversational


def score_items(prompts: Sequence[Prompt], completions: Sequence[str]) -> list[dict[str, Any]]:
    """``/score`` items: ``prompt`` + ``completion`` strings (concatenated by the service, as
    TRL does), or the prompt's messages plus the completion as the assistant's answer."""
    items = []
    for prompt, completion in zip(prompts, completions, strict=True):
        if is_conversational(prompt):
            # A decoded completion usually starts with a space; the chat template adds its own.
            items.append({"prompt": prompt, "completion": completion.strip()})
        else:
            items.append({"prompt": prompt, "completion": completion})
    return items
