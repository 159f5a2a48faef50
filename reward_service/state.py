"""What the routes share: settings, metrics, and the model once it is loaded; its loading,
readiness and release."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from reward_service.batch_loop import BatchLimits
from reward_service.batcher import Batcher
from reward_service.errors import ApiError
from reward_service.metrics import ServiceMetrics
from reward_service.scorer import Scorer
from reward_service.settings import ServiceSettings

logger = logging.getLogger(__name__)

Loader = Callable[[ServiceSettings], Scorer]


@dataclass
class ServiceState:
    """The service's state, kept as ``app.state.service``: ``scorer`` and ``batcher`` are set
    once the model is loaded and warmed up; ``draining`` from SIGTERM on."""

    settings: ServiceSettings
    metrics: ServiceMetrics
    loader: Loader = field(default=Scorer.load, repr=False)
    scorer: Scorer | None = None
    batcher: Batcher | None = None
    draining: bool = False
    load_error: str | None = None

    def failure(self) -> ApiError | None:
        """Why the service can never score (the model did not load, or its process exited)."""
        if self.load_error is not None:
            return ApiError(503, "load_failed", self.load_error)
        if self.scorer is not None and (lost := self.scorer.failure()) is not None:
            return model_lost(lost)
        return None

    def serving(self) -> tuple[Scorer, Batcher]:
        """The model and its batcher, ready to score; else the 503 that says why: it failed,
        the service is draining, or the model is still loading."""
        if (failure := self.failure()) is not None:
            raise failure
        if self.draining:
            raise ApiError(503, "draining", "the service is shutting down")
        if self.scorer is None or self.batcher is None:
            raise ApiError(503, "loading", "the model is still loading", {"Retry-After": "1"})
        return self.scorer, self.batcher

    async def load(self) -> None:
        """Load the model and warm it up off the event loop, then start the batching loop."""
        settings = self.settings
        scorer: Scorer | None = None
        try:
            scorer = await asyncio.to_thread(self.loader, settings)
            await asyncio.to_thread(scorer.warmup)
            cost = await asyncio.to_thread(
                scorer.forward_cost, settings.max_batch_size, settings.max_batch_tokens
            )
            limits = BatchLimits(
                max_batch_size=settings.max_batch_size,
                max_batch_tokens=settings.max_batch_tokens,
                max_wait_s=settings.max_wait_ms / 1000,
                forward_cost=cost,
            )
            self.batcher = await Batcher.connect(
                scorer.serve(limits),
                self.metrics,
                limits=limits,
                max_queue_items=settings.max_queue_items,
                lost=scorer.lost,
            )
        except Exception as exc:
            self.load_error = f"loading {settings.model!r} failed: {type(exc).__name__}: {exc}"
            logger.error("%s", self.load_error)
            if scorer is not None:
                await asyncio.to_thread(scorer.close)
            return
        self.scorer = scorer
        logger.info(
            "ready: model %s (weights %s, %s on %s, %d labels, max_length %d, %s, "
            "forward pass %.2f ms + %.2f us/token)",
            scorer.model_id, scorer.weights_hash, scorer.dtype, scorer.device,
            scorer.num_labels, scorer.max_length,
            "own process" if settings.forward_process else "in-process",
            cost.fixed_s * 1e3, cost.per_token_s * 1e6,
        )  # fmt: skip

    async def close(self, loading: asyncio.Task[None]) -> None:
        """Drain: take no more requests, let ``loading`` finish (a loading thread cannot be
        interrupted), let the requests sent finish (at most ``drain_timeout_s``), then release
        the model."""
        self.draining = True
        await loading
        if self.batcher is not None:
            await self.batcher.close(self.settings.drain_timeout_s)
        if self.scorer is not None:
            await asyncio.to_thread(self.scorer.close)


def model_lost(reason: str) -> ApiError:
    """The 503 of requests that meet a model process that has exited."""
    return ApiError(503, "model_process_exited", f"{reason}; restart the service")
