"""Cross-request dynamic batching: one queue, one thread that forms batches and runs them.

Requests put their tokenized items on the queue and await a future. The batching thread forms
micro-batches bounded by ``max_batch_size`` and ``max_batch_tokens`` from items of any request,
sorted by length, runs their forward passes and hands each finished request back to the event
loop. The event loop only parses, tokenizes, queues and answers: a round ends and the next one
starts in the thread, without waiting for a busy event loop to start it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from reward_service.metrics import ServiceMetrics
from reward_service.runner import Deliver, one_by_one

logger = logging.getLogger(__name__)

# Items taken per round, in batches: enough to group similar lengths, few enough to answer soon.
_POOL_BATCHES = 4


@dataclass(frozen=True)
class ForwardCost:
    """A forward pass's cost, as fitted: ``fixed_s`` + ``per_token_s`` x padded tokens."""

    fixed_s: float
    per_token_s: float

    @property
    def fixed_tokens(self) -> float:
        """The fixed cost in padded tokens' worth of compute (infinite if tokens are free)."""
        return self.fixed_s / self.per_token_s if self.per_token_s > 0 else math.inf


class QueueFull(Exception):
    """The queue cannot take the request now; retry after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"queue full, retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Draining(Exception):
    """The batcher is shutting down and takes no new work."""


def plan_batches(
    lengths: Sequence[int],
    max_batch_size: int,
    max_batch_tokens: int,
    overhead_tokens: float = math.inf,
) -> list[list[int]]:
    """Indices of ``lengths`` grouped into micro-batches, shortest first.

    Sorting by length keeps padding low; each batch has at most ``max_batch_size`` items (sizes
    evened out) and at most ``max_batch_tokens`` padded tokens (items x longest), except that an
    item longer than the token budget still gets a batch of its own.

    How many batches: with ``overhead_tokens`` infinite, the fewest the limits allow. Otherwise
    ``overhead_tokens`` is a forward pass's fixed cost in padded tokens' worth of compute, and
    the number of even batches is the one whose plan costs least, batches x overhead_tokens +
    padded tokens: more, smaller batches pad less, since short items no longer pad to the
    longest of a big batch.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n = len(order)
    # Even sizes (100 items, max 64: 50 + 50, not 64 + 36), so no batch is needlessly small.
    fewest = math.ceil(n / max_batch_size)
    size = math.ceil(n / max(1, fewest))
    if not math.isinf(overhead_tokens) and n:
        ascending = [lengths[i] for i in order]
        best_cost = _cost(ascending, size, max_batch_tokens, overhead_tokens)
        real_tokens = sum(ascending)
        for count in range(fewest + 1, n + 1):
            candidate = math.ceil(n / count)  # count even batches
            if candidate * (count - 1) >= n:
                continue  # that size makes fewer batches: tried already
            # This many batches or more cannot cost less: stop.
            if count * overhead_tokens + real_tokens >= best_cost:
                break
            cost = _cost(ascending, candidate, max_batch_tokens, overhead_tokens)
            if cost < best_cost:
                size, best_cost = candidate, cost
    return _fill(order, lengths, size, max_batch_tokens)


def _cost(ascending: Sequence[int], size: int, max_batch_tokens: int, overhead: float) -> float:
    """Estimated cost in tokens (fixed costs plus padded tokens) of :func:`_fill`'s plan with
    batches of at most ``size`` items, over lengths in ascending order."""
    cost = 0.0
    start, n = 0, len(ascending)
    while start < n:
        end = min(start + size, n)
        if (end - start) * ascending[end - 1] > max_batch_tokens:
            # The token budget ends the batch sooner: the largest end within it (at least one
            # item), found by bisection since the padded size grows with the end.
            low, high = start + 1, end - 1
            while low < high:
                mid = (low + high + 1) // 2
                if (mid - start) * ascending[mid - 1] <= max_batch_tokens:
                    low = mid
                else:
                    high = mid - 1
            end = low
        cost += overhead + (end - start) * ascending[end - 1]
        start = end
    return cost


def _fill(
    order: Sequence[int], lengths: Sequence[int], size: int, max_batch_tokens: int
) -> list[list[int]]:
    """``order`` (ascending lengths) cut into batches of at most ``size`` items and
    ``max_batch_tokens`` padded tokens."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Ascending order: this item is the longest of the batch if it joins.
        if current and (
            len(current) >= size or (len(current) + 1) * lengths[index] > max_batch_tokens
        ):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def _halves_by_request(pool: Sequence[tuple[_Job, int]]) -> list[list[int]] | None:
    """Indices of ``pool`` in two batches: the items of the older half of its requests, then
    the rest (None for a single request: it is answered only when its last item is scored, so
    splitting it would answer nobody sooner)."""
    jobs = list(dict.fromkeys(job for job, _ in pool))  # in arrival order
    if len(jobs) < 2:
        return None
    older = set(jobs[: (len(jobs) + 1) // 2])
    first = [k for k, (job, _) in enumerate(pool) if job in older]
    return [first, [k for k, (job, _) in enumerate(pool) if job not in older]]


# Runs a round's batches in order, delivering each one's logits or error (Runner.forward_each).
ForwardEach = Callable[[list[list[list[int]]], Deliver], None]


def _answer(jobs: Sequence[_Job]) -> None:
    """On the event loop: resolve the futures of requests whose items are all scored."""
    for job in jobs:
        if not job.future.done():  # its handler may be gone
            job.future.set_result(job.results)


def _fail(jobs: Sequence[_Job], exc: BaseException) -> None:
    """On the event loop: fail the futures of ``jobs`` still waiting."""
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)


@dataclass(eq=False)
class _Job:
    """One request's items and the future its handler awaits. The batcher's thread alone
    fills ``results`` and counts down ``remaining``; the event loop alone settles ``future``."""

    seqs: list[list[int]]
    future: asyncio.Future[list[list[float]]]
    enqueued_at: float
    results: list[list[float]] = field(default_factory=list)
    remaining: int = 0
    started: bool = False

    def __post_init__(self) -> None:
        self.results = [[] for _ in self.seqs]
        self.remaining = len(self.seqs)


class Batcher:
    """Queue + batching thread. Create and use it inside the running event loop.

    Each round takes the oldest queued items (at most a few batches: the pool), sorts them by
    length, splits them into micro-batches (:func:`plan_batches`) and runs them one after
    another (``forward_each``: the model process gets them all at once, so it never waits for
    this process between two; default: ``forward`` on each in turn); a request is answered as
    soon as its last item is scored. Before a round the thread waits (at most ``max_wait_s``)
    for the requests it expects: those whose answers the previous round sent, since under load
    their clients send the next one right away. A lone client is never delayed: it is expected
    back only after it has been answered.

    ``forward_cost`` (measured at warm-up) decides two things. How many micro-batches: as many
    as minimise fixed costs plus padded tokens, so short items stop padding to the longest of
    a big batch. And overlap: when the forward sat idle waiting for clients longer than a
    forward pass's fixed cost, it pays to run smaller batches instead. A round that had to wait
    and fits in one batch runs as two, each with the items of half its requests, so the first
    half's clients send their next requests while the second half runs; and later rounds take
    what is queued at once instead of waiting. The forward and the HTTP work then overlap, as
    two alternating groups of clients. A model whose fixed cost exceeds the wait (a large model
    on a GPU) never splits for overlap. Without ``forward_cost``: the fewest batches, no split.
    """

    def __init__(
        self,
        forward: Callable[[list[list[int]]], torch.Tensor],
        metrics: ServiceMetrics,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float,
        max_queue_items: int,
        forward_cost: ForwardCost | None = None,
        forward_each: ForwardEach | None = None,
    ) -> None:
        self._forward_each = forward_each or partial(one_by_one, forward)
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_items = max_queue_items
        self.forward_cost = forward_cost or ForwardCost(math.inf, 0.0)
        self._pool_limit = max_batch_size * _POOL_BATCHES
        self._loop = asyncio.get_running_loop()
        # The queue and what the thread waits for, shared with the event loop under the lock.
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queue: deque[tuple[_Job, int]] = deque()  # (job, item index), oldest first
        self._wanted = 1  # queued items at which an arrival wakes the thread
        self._closing = False
        self._in_round: list[_Job] = []  # requests of the round running now
        # The thread's own state.
        self._items_per_s = 0.0
        self._expected = 1  # items the next round should wait for
        self._round_end = 0.0
        self._last_wait = 0.0  # seconds the last round that waited for clients spent waiting
        self._thread = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self._thread.start()

    async def score(self, seqs: list[list[int]]) -> list[list[float]]:
        """Head logits of each sequence, in order, once their micro-batches have run."""
        future: asyncio.Future[list[list[float]]] = self._loop.create_future()
        job = _Job(seqs, future, time.perf_counter())
        with self._lock:
            if self._closing:
                raise Draining("the service is shutting down")
            if len(self._queue) + len(seqs) > self.max_queue_items:
                raise QueueFull(self._retry_after())
            self._queue.extend((job, i) for i in range(len(seqs)))
            depth = len(self._queue)
            if depth >= self._wanted:
                self._arrived.notify()
        self._metrics.queue_depth.set(depth)
        return await future

    async def close(self, timeout_s: float) -> None:
        """Stop taking work, finish what is queued (at most ``timeout_s``), stop the thread."""
        with self._lock:
            self._closing = True
            self._arrived.notify()
        await asyncio.to_thread(self._thread.join, timeout_s)
        if not self._thread.is_alive():
            return
        with self._lock:
            logger.error("drain timed out with %d items queued", len(self._queue))
            jobs = [job for job, _ in self._queue] + self._in_round
            self._queue.clear()
        _fail(jobs, Draining("the service shut down before scoring"))

    def _run(self) -> None:
        """The thread: rounds of forward passes until closed and drained."""
        idle = True
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._arrived.wait()
                    idle = True
                if not self._queue:
                    return  # closing, and nothing is left
            try:
                self._round(idle)
            except Exception as exc:  # a fault here must not leave requests waiting forever
                logger.exception("batching round failed")
                with self._lock:
                    jobs, self._in_round = self._in_round, []
                self._call_soon(_fail, jobs, exc)
            idle = False

    def _round(self, idle: bool) -> None:
        """Wait for the expected items if it pays, then plan and run the oldest ones."""
        waited: float | None = None
        fixed_s = self.forward_cost.fixed_s
        if idle or fixed_s >= self._last_wait:
            waited = self._last_wait = self._collect()
        pool = self._take()
        if not pool:
            return  # every item taken belonged to a request that is gone
        plan = plan_batches(
            [len(job.seqs[i]) for job, i in pool],
            self.max_batch_size,
            self.max_batch_tokens,
            self.forward_cost.fixed_tokens,
        )
        if waited is not None and waited > fixed_s and len(plan) == 1:
            plan = _halves_by_request(pool) or plan  # see the class docstring
        returning = self._run_round([[pool[k] for k in indices] for indices in plan])
        self._expected = len(self._queue) + returning
        self._round_end = time.perf_counter()

    def _collect(self) -> float:
        """Wait until the expected items are in, at most max_wait from when the thread became
        free or the oldest item arrived, whichever is later (an item that arrived during the
        previous round still waits for the clients that round answered). Returns the seconds
        it waited."""
        start = time.perf_counter()
        with self._lock:
            if not self._queue:  # a timed-out drain emptied it
                return 0.0
            deadline = max(self._queue[0][0].enqueued_at, self._round_end) + self.max_wait_s
            target = min(self._pool_limit, self._expected)
            self._wanted = target
            while len(self._queue) < target and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrived.wait(remaining)
            self._wanted = 1
        return time.perf_counter() - start

    def _take(self) -> list[tuple[_Job, int]]:
        """Remove and return the oldest queued items, at most a pool."""
        pool: list[tuple[_Job, int]] = []
        now = time.perf_counter()
        with self._lock:
            while self._queue and len(pool) < self._pool_limit:
                job, i = self._queue.popleft()
                if job.future.done():  # its handler is gone: skip the work
                    continue
                if not job.started:
                    job.started = True
                    self._metrics.queue_wait_seconds.observe(now - job.enqueued_at)
                pool.append((job, i))
            self._in_round = list(dict.fromkeys(job for job, _ in pool))
            depth = len(self._queue)
        self._metrics.queue_depth.set(depth)
        return pool

    def _run_round(self, batches: list[list[tuple[_Job, int]]]) -> int:
        """Run a round's batches back to back, handing each one's finished requests to the
        event loop as soon as it is scored. Returns how many items those requests had."""
        last = time.perf_counter()
        settled = 0
        returning = 0

        def deliver(k: int, result: torch.Tensor | Exception) -> None:
            nonlocal last, settled, returning
            now = time.perf_counter()
            seconds, last, settled = now - last, now, k + 1
            batch = batches[k]
            if isinstance(result, Exception):
                logger.error("forward pass failed", exc_info=result)
                self._call_soon(_fail, [job for job, _ in batch], result)
                return
            self._observe(batch, seconds)
            done = []
            for (job, i), row in zip(batch, result.tolist(), strict=True):
                job.results[i] = row
                job.remaining -= 1
                if job.remaining == 0:
                    done.append(job)
                    returning += len(job.seqs)
            self._call_soon(_answer, done)

        try:
            self._forward_each([[job.seqs[i] for job, i in b] for b in batches], deliver)
        except Exception as exc:  # the model is gone: every batch not yet scored fails
            self._call_soon(_fail, [job for b in batches[settled:] for job, _ in b], exc)
        with self._lock:
            self._in_round = []
        return returning

    def _observe(self, batch: Sequence[tuple[_Job, int]], seconds: float) -> None:
        """Record one scored micro-batch that took ``seconds``."""
        lengths = [len(job.seqs[i]) for job, i in batch]
        self._metrics.observe_batch(len(batch), sum(lengths), len(batch) * max(lengths), seconds)
        self._items_per_s = 0.8 * self._items_per_s + 0.2 * len(batch) / max(seconds, 1e-6)

    def _call_soon(self, callback: Callable[..., None], *args: object) -> None:
        """Run ``callback(*args)`` on the event loop (dropped if the loop is already closed:
        nobody is left to answer)."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            logger.warning("event loop closed; %s dropped", callback.__name__)

    def _retry_after(self) -> int:
        """Seconds until the current queue is likely worked off (1..60)."""
        if self._items_per_s <= 0:
            return 1
        return int(min(60, max(1, math.ceil(len(self._queue) / self._items_per_s))))
