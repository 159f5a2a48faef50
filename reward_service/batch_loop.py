"""The batching loop: it runs beside the model (in the model process, or in a thread of the
server when the model runs in-process) and turns the requests it receives into micro-batches.

Each round takes the oldest queued items (at most a few batches: the pool), sorts them by length,
splits them into micro-batches (:func:`plan_batches`) and runs them back to back; a request is
answered as soon as its last item is scored. The loop reads its requests straight from the
server's link between two forward passes, so a round follows the previous one without waiting
for the server, whatever the server's event loop is doing.

The link carries the batching link's messages (:mod:`reward_service.messages`): the server
sends :class:`~reward_service.messages.ScoreJob` and :class:`~reward_service.messages.CancelJob`;
the loop answers :class:`~reward_service.messages.JobsTaken` when a round takes requests,
:class:`~reward_service.messages.BatchScored` after each forward pass (the requests it finished,
and the pass), and :class:`~reward_service.messages.JobsFailed`.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from reward_service.link import Link, portable_error
from reward_service.messages import BatchScored, CancelJob, JobsFailed, JobsTaken, ScoreJob

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


def _halves_by_request(pool: Sequence[tuple[_LoopJob, int]]) -> list[list[int]] | None:
    """Indices of ``pool`` in two batches: the items of the older half of its requests, then
    the rest (None for a single request: it is answered only when its last item is scored, so
    splitting it would answer nobody sooner)."""
    jobs = list(dict.fromkeys(job for job, _ in pool))  # in arrival order
    if len(jobs) < 2:
        return None
    older = set(jobs[: (len(jobs) + 1) // 2])
    first = [k for k, (job, _) in enumerate(pool) if job in older]
    return [first, [k for k, (job, _) in enumerate(pool) if job not in older]]


Forward = Callable[[list[list[int]]], torch.Tensor]


@dataclass(frozen=True)
class BatchLimits:
    """How the loop forms micro-batches; the server's settings and the fitted forward cost."""

    max_batch_size: int
    max_batch_tokens: int
    max_wait_s: float
    forward_cost: ForwardCost = ForwardCost(math.inf, 0.0)


@dataclass(eq=False)
class _LoopJob:
    """One request's items as the loop holds them; ``settled`` once answered, failed or
    cancelled (its remaining items are skipped)."""

    id: int
    seqs: list[list[int]]
    received_at: float
    results: list[list[float]] = field(init=False)
    remaining: int = field(init=False)
    taken: bool = False
    settled: bool = False

    def __post_init__(self) -> None:
        self.results = [[] for _ in self.seqs]
        self.remaining = len(self.seqs)


class BatchLoop:
    """Receives requests over ``link``, runs their micro-batches through ``forward`` and sends
    the results back, until the server closes the link.

    Before a round the loop waits (at most ``max_wait_s``) for the requests it expects: those
    whose answers the previous round sent, since under load their clients send the next one
    right away. A lone client is never delayed: it is expected back only after its answer.

    ``forward_cost`` (measured at warm-up) decides two things. How many micro-batches: as many
    as minimise fixed costs plus padded tokens, so short items stop padding to the longest of
    a big batch. And overlap: when the forward sat idle waiting for clients longer than a
    forward pass's fixed cost, it pays to run smaller batches instead. A round that had to wait
    and fits in one batch runs as two, each with the items of half its requests, so the first
    half's clients send their next requests while the second half runs; and later rounds take
    what is queued at once instead of waiting. The forward and the HTTP work then overlap, as
    two alternating groups of clients. A model whose fixed cost exceeds the wait (a large model
    on a GPU) never splits for overlap. Without a known cost: the fewest batches, no split.
    """

    def __init__(self, link: Link, forward: Forward, limits: BatchLimits) -> None:
        self._link = link
        self._forward = forward
        self.limits = limits
        self._pool_limit = limits.max_batch_size * _POOL_BATCHES
        self._queue: deque[tuple[_LoopJob, int]] = deque()  # (job, item index), oldest first
        self._jobs: dict[int, _LoopJob] = {}  # received, not yet settled
        self._in_round: list[_LoopJob] = []
        self._expected = 1  # items the next round should wait for
        self._round_end = 0.0
        self._last_wait = 0.0  # seconds the last round that waited for clients spent waiting

    def run(self) -> None:
        """Serve rounds until the server closes the link (or is gone)."""
        try:
            idle = True
            while True:
                while not self._queue:
                    self._take_in(None)
                    idle = True
                try:
                    self._round(idle)
                except (EOFError, OSError):
                    raise
                except Exception as exc:  # a fault here must not leave requests waiting
                    logger.exception("batching round failed")
                    self._fail(self._in_round, exc)
                self._in_round = []
                idle = False
        except (EOFError, OSError):  # closed by the server, or the server is gone
            return
        finally:
            self._link.close()

    def _take_in(self, timeout: float | None) -> None:
        """Take in every message that has arrived, waiting at most ``timeout`` seconds for the
        first (None: until one comes); EOFError once the server has closed the link."""
        link = self._link
        if not link.poll(timeout):
            return
        while True:
            match link.recv():
                case ScoreJob(job_id, seqs):
                    job = _LoopJob(job_id, seqs, time.perf_counter())
                    self._jobs[job_id] = job
                    self._queue.extend((job, i) for i in range(len(seqs)))
                case CancelJob(job_id):  # its handler is gone: skip its work
                    cancelled = self._jobs.pop(job_id, None)
                    if cancelled is not None:
                        cancelled.settled = True
                case message:
                    raise TypeError(f"unexpected message for the batching loop: {message!r}")
            if not link.poll(0):
                return

    def _round(self, idle: bool) -> None:
        """Wait for the expected items if it pays, then plan and run the oldest ones."""
        waited: float | None = None
        fixed_s = self.limits.forward_cost.fixed_s
        if idle or fixed_s >= self._last_wait:
            waited = self._last_wait = self._collect()
        pool = self._take()
        if not pool:
            return  # every item taken belonged to a request that is gone
        plan = plan_batches(
            [len(job.seqs[i]) for job, i in pool],
            self.limits.max_batch_size,
            self.limits.max_batch_tokens,
            self.limits.forward_cost.fixed_tokens,
        )
        if waited is not None and waited > fixed_s and len(plan) == 1:
            plan = _halves_by_request(pool) or plan  # see the class docstring
        returning = self._run_round([[pool[k] for k in indices] for indices in plan])
        self._expected = len(self._queue) + returning
        self._round_end = time.perf_counter()

    def _collect(self) -> float:
        """Wait until the expected items are in, at most max_wait from when the loop became
        free or the oldest item arrived, whichever is later (an item that arrived during the
        previous round still waits for the clients that round answered). Returns the seconds
        it waited."""
        start = time.perf_counter()
        deadline = max(self._queue[0][0].received_at, self._round_end) + self.limits.max_wait_s
        target = min(self._pool_limit, self._expected)
        while len(self._queue) < target:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._take_in(remaining)
        return time.perf_counter() - start

    def _take(self) -> list[tuple[_LoopJob, int]]:
        """Remove and return the oldest queued items (at most a pool); tell the server which
        requests left the queue."""
        pool: list[tuple[_LoopJob, int]] = []
        taken: list[tuple[int, float]] = []
        now = time.perf_counter()
        while self._queue and len(pool) < self._pool_limit:
            job, i = self._queue.popleft()
            if job.settled:
                continue
            if not job.taken:
                job.taken = True
                taken.append((job.id, now - job.received_at))
            pool.append((job, i))
        self._in_round = list(dict.fromkeys(job for job, _ in pool))
        if taken:
            self._link.send(JobsTaken(taken))
        return pool

    def _run_round(self, batches: list[list[tuple[_LoopJob, int]]]) -> int:
        """Run a round's batches back to back, sending each one's finished requests as soon as
        it is scored. Returns how many items those requests had."""
        returning = 0
        for planned in batches:
            batch = [(job, i) for job, i in planned if not job.settled]
            if not batch:
                continue
            seqs = [job.seqs[i] for job, i in batch]
            start = time.perf_counter()
            try:
                rows = self._forward(seqs).tolist()
            except Exception as exc:
                logger.error("forward pass failed", exc_info=exc)
                self._fail([job for job, _ in batch], exc)
                continue
            seconds = time.perf_counter() - start
            done = []
            for (job, i), row in zip(batch, rows, strict=True):
                job.results[i] = row
                job.remaining -= 1
                if job.remaining == 0:
                    job.settled = True
                    del self._jobs[job.id]
                    done.append((job.id, job.results))
                    returning += len(job.seqs)
            lengths = [len(s) for s in seqs]
            padded = len(seqs) * max(lengths)
            self._link.send(BatchScored(done, len(seqs), sum(lengths), padded, seconds))
            self._take_in(0)  # what arrived meanwhile: cancellations, and the next round
        return returning

    def _fail(self, jobs: Sequence[_LoopJob], exc: BaseException) -> None:
        """Report ``jobs`` (those not settled yet) as failed with ``exc``."""
        failed = []
        for job in dict.fromkeys(jobs):
            if not job.settled:
                job.settled = True
                del self._jobs[job.id]
                failed.append(job.id)
        if failed:
            self._link.send(JobsFailed(failed, portable_error(exc)))


def serve_in_thread(forward: Forward, limits: BatchLimits) -> socket.socket:
    """Start a :class:`BatchLoop` over ``forward`` in a daemon thread of this process; returns
    the server's end of its link."""
    ours, theirs = socket.socketpair()
    loop = BatchLoop(Link(theirs), forward, limits)
    threading.Thread(target=loop.run, name="reward-batcher", daemon=True).start()
    return ours
