"""Async generation in a separate process.

A thread that samples beside the update shares the trainer's GIL, and on CPU a small model's
generation is mostly Python: the two take turns instead of overlapping. Here a forked process
samples the next batch while the trainer updates; asked to, it also runs the reference model's
log-prob pass on some of its prompts' samples (:class:`ReferencePass`), so that both halves of
an async step take as long (see ``trainer.rollouts.reference_split``).

It samples with the trainer's own weights, not a copy: before the fork the policy's parameters
and buffers move into shared memory (``nn.Module.share_memory``, in place; the trainer goes on
training them), so both processes map the same pages and there is nothing to publish. The
trainer must not change the weights while a request is being sampled with them: its optimizer
step waits for the rollouts in flight (``AsyncRollouts.wait_for_sampling``), which its next
step needs before it can start anyway. Copies would cost memory twice over: each copy, and
the process's copy-on-write image of the trainer's parameters, which becomes private to the
process page by page as the optimizer writes the parameters.

The process is forked, as DataLoader workers are: it starts at once with the trainer's imports
and model already in memory (copy-on-write), where a spawned one spends seconds importing
torch and transformers. Like a DataLoader worker it runs on one intra-op thread, set before
its first torch op (GNU OpenMP, which torch uses on Linux, is not fork-safe: a thread team in
a process forked after the parent's first parallel region waits forever for threads that the
fork did not copy), and touches nothing of the trainer's other threads (HTTP client,
tokenizer). Before the fork the allocator's free heap pages go back to the OS
(``malloc_trim``): shared with the process, each would become private to it when the trainer
reuses it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch
import torch.multiprocessing as mp
from torch import nn

from trainer.generation import Samples, Sampling, sample_completions
from trainer.logprobs import LogProbPass, TokenRows

START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ReferencePass:
    """The reference pass, run by the rollout process after sampling (on the first prompts'
    samples, as many as asked): the frozen reference model (never written, so the fork's
    copy-on-write pages stay shared) and how the trainer computes log-probs."""

    model: nn.Module
    logprobs: LogProbPass


# Messages, trainer -> rollout process.


@dataclass(frozen=True)
class SampleRequest:
    """Sample ``num_samples`` completions per prompt with the trainer's current weights."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    num_samples: int
    seed: int
    reference_prompts: int = 0  # also run the ReferencePass on the first prompts' samples


@dataclass(frozen=True)
class Stop:
    """Exit the loop."""


# Messages, rollout process -> trainer.


@dataclass(frozen=True)
class Ready:
    """The process runs and waits for requests."""


@dataclass(frozen=True)
class Sampled:
    """The answer to a :class:`SampleRequest` (with the reference's log-probs if asked)."""

    samples: Samples
    reference_seconds: float = 0.0  # the reference pass's


@dataclass(frozen=True)
class Failed:
    """A request (or the start-up) raised; ``error`` is the traceback."""

    error: str


# Intra-op threads of the rollout process: one, as GNU OpenMP cannot run a thread team after a
# fork (see the module docstring).
ROLLOUT_THREADS = 1


def trainer_threads(total: int, wanted: int | None = None) -> int:
    """The trainer's intra-op threads while the rollout process samples beside it: ``wanted``,
    or (``None``) its ``total`` less the process's one, at least one, so that the two use
    each core once."""
    return wanted if wanted is not None else max(1, total - ROLLOUT_THREADS)


def release_free_heap() -> None:
    """Return the C allocator's free heap pages to the OS (glibc's ``malloc_trim``; elsewhere
    nothing)."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)


class RolloutProcess:
    """A forked process that samples completions with ``policy``'s weights, which move into
    shared memory for it (in place). CPU only, on platforms with ``fork`` (Linux).

    The weights must not change while :meth:`sample` runs. The process samples on one
    intra-op thread; the trainer keeps :func:`trainer_threads` of its own until
    :meth:`close` (``trainer_num_threads``: an override): more threads than cores makes both
    wait on each other.
    """

    def __init__(
        self,
        policy: nn.Module,
        sampling: Sampling,
        trainer_num_threads: int | None = None,
        reference: ReferencePass | None = None,
    ) -> None:
        policy.share_memory()
        release_free_heap()
        self._trainer_threads = torch.get_num_threads()
        ctx = mp.get_context("fork")
        self._conn, child = ctx.Pipe()
        # The child's ``policy`` maps the same shared pages as the trainer's: no copy.
        self._process = ctx.Process(
            target=_rollout_process_main,
            args=(child, self._conn, policy, sampling, reference),
            name="online-dpo-rollout",
            daemon=True,
        )
        self._lock = threading.Lock()
        self._ready = False  # the first request waits for the process's Ready
        self._process.start()
        child.close()
        torch.set_num_threads(trainer_threads(self._trainer_threads, trainer_num_threads))

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def sample(self, request: SampleRequest) -> Sampled:
        """Sample as requested; blocks (without the GIL) until the process answers."""
        with self._lock:
            self._wait_ready()
            try:
                self._conn.send(request)
            except OSError as e:  # a dead process: broken pipe
                raise self._died("sampling") from e
            match self._reply(None, "sampling"):
                case Sampled() as sampled:
                    return sampled
                case Failed(error):
                    raise RuntimeError(f"rollout process failed:\n{error}")
                case other:
                    raise RuntimeError(f"rollout process answered {other!r} to a sample request")

    def _wait_ready(self) -> None:
        if self._ready:
            return
        match self._reply(START_TIMEOUT_S, "start-up"):
            case Ready():
                self._ready = True
            case Failed(error):
                raise RuntimeError(f"rollout process failed to start:\n{error}")
            case other:
                raise RuntimeError(f"rollout process answered {other!r} at start-up")

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._process.is_alive():
                with contextlib.suppress(OSError):  # it may die between the check and here
                    self._conn.send(Stop())
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._conn.close()
        torch.set_num_threads(self._trainer_threads)

    def _reply(self, timeout: float | None, what: str) -> Ready | Sampled | Failed:
        """The process's next message (``timeout`` s at most, ``None``: as long as it lives)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._conn.poll(1.0):
                if not self._process.is_alive():
                    raise EOFError
                if deadline is not None and time.monotonic() > deadline:
                    self._process.kill()
                    raise RuntimeError(f"rollout process silent for {timeout:.0f} s ({what})")
            return self._conn.recv()
        except (EOFError, OSError) as e:  # a dead process: EOF or a reset pipe
            raise self._died(what) from e

    def _died(self, what: str) -> RuntimeError:
        self._process.join(5.0)
        code = self._process.exitcode
        return RuntimeError(f"rollout process exited with code {code} during {what}")


def _rollout_process_main(
    conn: Connection,
    trainer_end: Connection,
    sampler: nn.Module,
    sampling: Sampling,
    reference: ReferencePass | None,
) -> None:
    """The rollout process: one request at a time until :class:`Stop` or a closed pipe."""
    # Before any torch op: the OpenMP pool inherited from the parent is not usable here.
    torch.set_num_threads(ROLLOUT_THREADS)
    # The fork copied the trainer's end of the pipe too. Held open here, it would keep the pipe
    # open after the trainer dies (SIGKILL, OOM): this process would wait in recv() forever.
    trainer_end.close()
    sampler.eval().requires_grad_(False)
    conn.send(Ready())
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        match message:
            case Stop():
                return
            case SampleRequest() as request:
                try:
                    k = request.num_samples
                    samples = sample_completions(
                        sampler, request.prompt_ids, request.prompt_mask, sampling, k,
                        seed=request.seed,
                    )  # fmt: skip
                    seconds = 0.0
                    if request.reference_prompts and reference is not None:
                        start = time.perf_counter()
                        part = TokenRows.of_prompts(samples, k, range(request.reference_prompts))
                        ref_logps = reference.logprobs.reference_logps(
                            reference.model, part, reference.logprobs.pack(part, k)
                        )
                        seconds = time.perf_counter() - start
                        samples = dataclasses.replace(samples, ref_logps=ref_logps)
                    conn.send(Sampled(samples, seconds))
                except Exception:
                    conn.send(Failed(traceback.format_exc()))
