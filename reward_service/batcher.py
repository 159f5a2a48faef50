"""The event loop's end of cross-request batching.

Requests hand their tokenized items to :meth:`Batcher.score`, which sends them at once to the
batching loop beside the model (:mod:`reward_service.batch_loop`: in the model process, or in a
thread when the model runs in-process) and awaits a future. Results come back over the same
link, read by the event loop itself as an asyncio protocol: no thread of the server sits between
a request and the model, and neither side ever waits for the other's GIL.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from reward_service.batch_loop import BatchLimits
from reward_service.link import FrameReader, frame
from reward_service.messages import BatchScored, CancelJob, JobsFailed, JobsTaken, ScoreJob
from reward_service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

# Weight of the latest forward pass in the running estimate of items/s (Retry-After's basis).
_RATE_SMOOTHING = 0.2


class QueueFull(Exception):
    """The queue cannot take the request now; retry after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"queue full, retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Draining(Exception):
    """The batcher is shutting down and takes no new work."""


@dataclass(eq=False)
class _SentJob:
    """A request sent to the loop: the future its handler awaits, and whether the loop has
    taken it out of its queue yet."""

    future: asyncio.Future[list[list[float]]]
    size: int
    taken: bool = False


class Batcher(asyncio.Protocol):
    """Sends each request's items to the batching loop and answers it when its rows come back.

    Create it with :meth:`connect`, inside the running event loop. The queue limit counts the
    items sent and not yet taken into a round by the loop. ``lost`` says, once the link breaks
    without :meth:`close` (the model process died), what the requests waiting on it fail with.
    """

    def __init__(
        self,
        metrics: ServiceMetrics,
        *,
        limits: BatchLimits,
        max_queue_items: int,
        lost: Callable[[], BaseException],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._metrics = metrics
        self.limits = limits
        self.max_queue_items = max_queue_items
        self._lost = lost
        self._jobs: dict[int, _SentJob] = {}  # sent and not yet answered
        self._ids = itertools.count()
        self._queued = 0  # items of jobs the loop has not taken yet
        self._items_per_s = 0.0
        self._reader = FrameReader()
        self._transport: asyncio.Transport | None = None
        self._closing = False
        self._closed = False  # the link, by close()
        self._broken: asyncio.Task[BaseException] | None = None

    @classmethod
    async def connect(
        cls,
        sock: socket.socket,
        metrics: ServiceMetrics,
        *,
        limits: BatchLimits,
        max_queue_items: int,
        lost: Callable[[], BaseException],
    ) -> Batcher:
        """A batcher talking to the loop at the other end of ``sock``."""
        batcher = cls(metrics, limits=limits, max_queue_items=max_queue_items, lost=lost)
        await asyncio.get_running_loop().create_unix_connection(lambda: batcher, sock=sock)
        return batcher

    async def score(self, seqs: list[list[int]]) -> list[list[float]]:
        """Head logits of each sequence, in order, once their micro-batches have run."""
        if self._closing:
            raise Draining("the service is shutting down")
        if self._broken is not None:
            raise await asyncio.shield(self._broken)
        if self._queued + len(seqs) > self.max_queue_items:
            raise QueueFull(self._retry_after())
        assert self._transport is not None
        job_id = next(self._ids)
        job = _SentJob(self._loop.create_future(), len(seqs))
        self._jobs[job_id] = job
        self._queued += job.size
        self._metrics.queue_depth.set(self._queued)
        self._transport.write(frame(ScoreJob(job_id, seqs)))
        try:
            return await job.future
        except asyncio.CancelledError:
            if self._jobs.pop(job_id, None) is not None:  # its handler is gone: skip the work
                self._leave_queue(job)
                self._metrics.queue_depth.set(self._queued)
                if not self._transport.is_closing():
                    self._transport.write(frame(CancelJob(job_id)))
            raise

    async def close(self, timeout_s: float) -> None:
        """Stop taking work, wait (at most ``timeout_s``) for the requests sent, then close
        the link; the loop stops when it sees that. Requests still waiting then fail with
        Draining (the loop may be stuck in a forward pass: it is not waited for)."""
        self._closing = True
        waiting = [job.future for job in self._jobs.values()]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=timeout_s)
            if late:
                logger.error("drain timed out with %d requests unanswered", len(late))
                self._settle(list(self._jobs), Draining("the service shut down before scoring"))
        if self._transport is not None:
            self._closed = True
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        for message in self._reader.feed(data):
            match message:
                case BatchScored():
                    self._scored(message)
                case JobsTaken(waits):
                    self._taken(waits)
                case JobsFailed(job_ids, error):
                    self._settle(job_ids, error)
                case _:
                    raise TypeError(f"unexpected message from the batching loop: {message!r}")
        self._metrics.queue_depth.set(self._queued)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        # The loop's end closed on its own (the model process died): every request waiting
        # fails, and so does every later one. Asking why may wait for the process's exit code,
        # so off the event loop.
        self._broken = self._loop.create_task(asyncio.to_thread(self._lost))
        self._broken.add_done_callback(lambda task: self._settle(list(self._jobs), task.result()))

    def _taken(self, waits: Sequence[tuple[int, float]]) -> None:
        for job_id, waited_s in waits:
            job = self._jobs.get(job_id)
            if job is not None:
                self._leave_queue(job)
                self._metrics.queue_wait_seconds.observe(waited_s)

    def _scored(self, batch: BatchScored) -> None:
        self._metrics.observe_batch(batch.items, batch.tokens, batch.padded_tokens, batch.seconds)
        rate = batch.items / max(batch.seconds, 1e-6)
        self._items_per_s += _RATE_SMOOTHING * (rate - self._items_per_s)
        for job_id, rows in batch.done:
            job = self._jobs.pop(job_id, None)
            if job is not None:
                self._leave_queue(job)
                if not job.future.done():
                    job.future.set_result(rows)

    def _settle(self, job_ids: Sequence[int], error: BaseException) -> None:
        """Fail the requests ``job_ids`` (those still waiting) with ``error``."""
        for job_id in job_ids:
            job = self._jobs.pop(job_id, None)
            if job is not None:
                self._leave_queue(job)
                if not job.future.done():
                    job.future.set_exception(error)
        self._metrics.queue_depth.set(self._queued)

    def _leave_queue(self, job: _SentJob) -> None:
        if not job.taken:
            job.taken = True
            self._queued -= job.size

    def _retry_after(self) -> int:
        """Seconds until the current queue is likely worked off (1..60)."""
        if self._items_per_s <= 0:
            return 1
        return int(min(60, max(1, math.ceil(self._queued / self._items_per_s))))
