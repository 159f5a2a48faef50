"""Cross-request dynamic batching: one queue, one worker thread running the forward passes.

Requests put their tokenized items on the queue and await a future. A single asyncio worker
takes what is queued (FIFO, up to a pool of a few batches), sorts it by length, splits it into
micro-batches bounded by ``max_batch_size`` and ``max_batch_tokens`` and runs each forward in a
dedicated thread, so the event loop keeps accepting and parsing requests meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from reward_service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

# Items taken per round, in batches: enough to sort by length, few enough to answer early.
_POOL_BATCHES = 4


class QueueFull(Exception):
    """The queue cannot take the request now; retry after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"queue full, retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Draining(Exception):
    """The batcher is shutting down and takes no new work."""


def plan_batches(
    lengths: Sequence[int], max_batch_size: int, max_batch_tokens: int
) -> list[list[int]]:
    """Indices of ``lengths`` grouped into micro-batches, shortest first.

    Sorting by length keeps padding low; each batch has at most ``max_batch_size`` items and at
    most ``max_batch_tokens`` padded tokens (items x longest), except that an item longer than
    the token budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Ascending order: this item is the longest of the batch if it joins.
        if current and (
            len(current) >= max_batch_size or (len(current) + 1) * lengths[index] > max_batch_tokens
        ):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


@dataclass(eq=False)
class _Job:
    """One request's items and the future its handler awaits."""

    seqs: list[list[int]]
    future: asyncio.Future[list[list[float]]]
    enqueued_at: float
    results: list[list[float]] = field(default_factory=list)
    remaining: int = 0
    taken: int = 0  # items already handed to a forward pass

    def __post_init__(self) -> None:
        self.results = [[] for _ in self.seqs]
        self.remaining = len(self.seqs)


class Batcher:
    """Queue + worker. Create and use it inside the running event loop."""

    def __init__(
        self,
        forward: Callable[[list[list[int]]], torch.Tensor],
        metrics: ServiceMetrics,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float,
        max_queue_items: int,
    ) -> None:
        self._forward = forward
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_items = max_queue_items
        self.arriving = 0  # requests being parsed right now: worth a short wait for
        self._jobs: deque[_Job] = deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._items_per_s = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-forward")
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def queued(self) -> int:
        """Items waiting to be taken by the worker."""
        return self._queued

    async def score(self, seqs: list[list[int]]) -> list[list[float]]:
        """Head logits of each sequence, in order, once their micro-batches have run."""
        if self._closing:
            raise Draining("the service is shutting down")
        if self._queued + len(seqs) > self.max_queue_items:
            raise QueueFull(self._retry_after())
        future: asyncio.Future[list[list[float]]] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(seqs, future, time.perf_counter()))
        self._set_queued(self._queued + len(seqs))
        self._wake.set()
        return await future

    async def close(self, timeout_s: float) -> None:
        """Stop taking work, finish what is queued (at most ``timeout_s``), stop the thread."""
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            logger.error("drain timed out with %d items queued", self._queued)
            self._task.cancel()
            for job in self._jobs:
                if not job.future.done():
                    job.future.set_exception(Draining("the service shut down before scoring"))
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._jobs:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._collect()
            items = self._take()
            if items:
                await self._score_pool(loop, items)

    async def _collect(self) -> None:
        """Wait (at most max_wait from the oldest item) while more requests are being parsed."""
        deadline = self._jobs[0].enqueued_at + self.max_wait_s
        while self.arriving > 0 and self._queued < self.max_batch_size and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                return

    def _take(self) -> list[tuple[_Job, int]]:
        """Up to a pool of items, FIFO; a large request may be split across rounds."""
        limit = self.max_batch_size * _POOL_BATCHES
        items: list[tuple[_Job, int]] = []
        now = time.perf_counter()
        while self._jobs and len(items) < limit:
            job = self._jobs[0]
            if job.future.done():  # cancelled by its handler: skip its remaining items
                self._jobs.popleft()
                self._set_queued(self._queued - (len(job.seqs) - job.taken))
                continue
            if job.taken == 0:
                self._metrics.queue_wait_seconds.observe(now - job.enqueued_at)
            n = min(len(job.seqs) - job.taken, limit - len(items))
            items.extend((job, i) for i in range(job.taken, job.taken + n))
            job.taken += n
            self._set_queued(self._queued - n)
            if job.taken == len(job.seqs):
                self._jobs.popleft()
        return items

    async def _score_pool(
        self, loop: asyncio.AbstractEventLoop, items: list[tuple[_Job, int]]
    ) -> None:
        seqs = [job.seqs[i] for job, i in items]
        lengths = [len(s) for s in seqs]
        for batch in plan_batches(lengths, self.max_batch_size, self.max_batch_tokens):
            batch_seqs = [seqs[k] for k in batch]
            start = time.perf_counter()
            try:
                logits = await loop.run_in_executor(self._executor, self._forward, batch_seqs)
            except Exception as exc:
                logger.exception("forward pass failed")
                for k in batch:
                    job = items[k][0]
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            seconds = time.perf_counter() - start
            tokens = sum(lengths[k] for k in batch)
            padded = len(batch) * max(lengths[k] for k in batch)
            self._metrics.observe_batch(len(batch), tokens, padded, seconds)
            self._items_per_s = 0.8 * self._items_per_s + 0.2 * len(batch) / max(seconds, 1e-6)
            for k, row in zip(batch, logits.tolist(), strict=True):
                job, i = items[k]
                job.results[i] = row
                job.remaining -= 1
                if job.remaining == 0 and not job.future.done():
                    job.future.set_result(job.results)

    def _set_queued(self, n: int) -> None:
        self._queued = n
        self._metrics.queue_depth.set(n)

    def _retry_after(self) -> int:
        """Seconds until the current queue is likely worked off (1..60)."""
        if self._items_per_s <= 0:
            return 1
        return int(min(60, max(1, math.ceil(self._queued / self._items_per_s))))
