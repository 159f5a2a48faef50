"""Scoring completions with the reward service, in the background while the trainer computes."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from common.client import EventHook, RewardClient
from common.schemas import InfoResponse
from trainer.generation import Prompt, is_conversational

logger = logging.getLogger(__name__)

# Requests in flight at once: a step sends one per micro-batch (and, in async mode, the next
# step's while it trains; evaluation two per batch). A few are enough to overlap them; more
# would only wait in the service's queue.
MAX_CONCURRENT_REQUESTS = 4


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


class RewardScorer:
    """Sends ``/score`` requests from a small thread pool so the caller keeps computing.

    Errors are never turned into reward values: a request that fails after the client's
    retries raises from :meth:`Future.result`.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        api_key: str | None,
        timeout: float,
        max_retries: int,
        on_event: EventHook | None = None,
    ) -> None:
        self.client = RewardClient(
            urls, api_key=api_key, timeout=timeout, max_retries=max_retries, on_event=on_event
        )
        self._pool = ThreadPoolExecutor(
            max_workers=MAX_CONCURRENT_REQUESTS, thread_name_prefix="reward"
        )
        self.max_items = 1024

    def check(self) -> list[InfoResponse]:
        """``GET /info`` of every replica; logs the served model; sets the request size limit."""
        infos = self.client.info()
        for info in infos:
            logger.info(
                "reward model %s (weights %s, %s, max %d items/request)",
                info.model_id, info.weights_hash, info.dtype, info.max_items_per_request,
            )  # fmt: skip
        self.max_items = min(info.max_items_per_request for info in infos)
        return infos

    def submit(self, items: list[dict[str, Any]]) -> Future[torch.Tensor]:
        """Scores of ``items`` (in order) as a float32 tensor, computed in the background."""
        return self._pool.submit(self._score, items)

    def _score(self, items: list[dict[str, Any]]) -> torch.Tensor:
        scores: list[float] = []
        for start in range(0, len(items), self.max_items):
            scores += self.client.score(items[start : start + self.max_items]).scores
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise ValueError(f"reward service returned non-finite scores for items {bad}")
        return torch.tensor(scores, dtype=torch.float32)

    def close(self) -> None:
        """Stop sending (requests not yet started are dropped) and close the connections."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
