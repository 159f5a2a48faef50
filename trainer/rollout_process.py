"""Async generation in a separate process.

A thread that samples beside the update shares the trainer's GIL, and on CPU a small model's
generation is mostly Python: the two take turns instead of overlapping. Here a forked process
holds its own copy of the policy and samples the next batch while the trainer updates (the
trainer keeps the reference forward: sampling is the longer half of a step). After each
optimizer step the trainer copies its weights into one of two shared-memory slots; the process
samples with the slot that a request names as its parameters (no copy). Two slots, alternating
by version, mean the trainer never writes the slot that a running request may still be reading
(that request belongs to the step before; the trainer waits for it before it publishes again).

The process is forked, as DataLoader workers are: it starts at once with the trainer's imports
and model already in memory (copy-on-write), where a spawned one spends seconds importing
torch and transformers. Like a DataLoader worker it runs on its own intra-op threads, set
before its first torch op, and touches nothing of the trainer's other threads (HTTP client,
tokenizer).
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch
import torch.multiprocessing as mp
from torch import nn

from trainer.generation import Samples, Sampling, sample_completions

START_TIMEOUT_S = 60.0


# Messages, trainer -> rollout process.


@dataclass(frozen=True)
class SampleRequest:
    """Sample ``num_samples`` completions per prompt with the weights of ``version``."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    num_samples: int
    version: int  # the weight slot to sample with is version % 2
    seed: int


@dataclass(frozen=True)
class Stop:
    """Exit the loop."""


# Messages, rollout process -> trainer.


@dataclass(frozen=True)
class Ready:
    """The process runs and waits for requests."""


@dataclass(frozen=True)
class Sampled:
    """The answer to a :class:`SampleRequest`."""

    samples: Samples


@dataclass(frozen=True)
class Failed:
    """A request (or the start-up) raised; ``error`` is the traceback."""

    error: str


def split_threads(total: int) -> tuple[int, int]:
    """``(rollout process, trainer)`` intra-op threads out of ``total``: half each (the
    rollout process gets the smaller half of an odd count, at least one each)."""
    rollout = max(1, total // 2)
    return rollout, max(1, total - rollout)


class RolloutProcess:
    """A forked process that samples completions with its copy of ``policy`` (weights
    published with :meth:`publish`). CPU only, on platforms with ``fork`` (Linux).

    The two processes split the intra-op threads (:func:`split_threads`; the trainer gets its
    own back at :meth:`close`): more threads than cores makes both wait on each other.
    """

    def __init__(self, policy: nn.Module, sampling: Sampling) -> None:
        state = policy.state_dict()
        self._slots = [
            {k: v.detach().clone().share_memory_() for k, v in state.items()} for _ in range(2)
        ]
        self._trainer_threads = torch.get_num_threads()
        rollout_threads, trainer_threads = split_threads(self._trainer_threads)
        ctx = mp.get_context("fork")
        self._conn, child = ctx.Pipe()
        # The child's ``policy`` is its copy-on-write image of the trainer's: no copy here.
        self._process = ctx.Process(
            target=_rollout_process_main,
            args=(child, self._conn, policy, self._slots, sampling, rollout_threads),
            name="online-dpo-rollout",
            daemon=True,
        )
        self._lock = threading.Lock()
        self._ready = False  # the first request waits for the process's Ready
        self._process.start()
        child.close()
        torch.set_num_threads(trainer_threads)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> None:
        """Make ``state`` the weights of ``version`` (sampling requests name the version)."""
        slot = self._slots[version % 2]
        with torch.no_grad():
            for name, value in state.items():
                slot[name].copy_(value)

    def sample(self, request: SampleRequest) -> Samples:
        """Sample as requested; blocks (without the GIL) until the process answers."""
        with self._lock:
            self._wait_ready()
            try:
                self._conn.send(request)
            except OSError as e:  # a dead process: broken pipe
                raise self._died("sampling") from e
            match self._reply(None, "sampling"):
                case Sampled(samples):
                    return samples
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
    slots: list[dict[str, torch.Tensor]],
    sampling: Sampling,
    num_threads: int,
) -> None:
    """The rollout process: one request at a time until :class:`Stop` or a closed pipe."""
    # Before any torch op: the OpenMP pool inherited from the parent is not usable here.
    torch.set_num_threads(num_threads)
    # The fork copied the trainer's end of the pipe too. Held open here, it would keep the pipe
    # open after the trainer dies (SIGKILL, OOM): this process would wait in recv() forever.
    trainer_end.close()
    sampler.eval().requires_grad_(False)
    loaded_version: int | None = None
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
                    if request.version != loaded_version:
                        # The slot's shared tensors become the parameters (no copy): pages of
                        # the fork's own weights, written, would be private memory here.
                        sampler.load_state_dict(slots[request.version % 2], assign=True)
                        loaded_version = request.version
                    samples = sample_completions(
                        sampler, request.prompt_ids, request.prompt_mask, sampling,
                        request.num_samples, seed=request.seed,
                    )  # fmt: skip
                    conn.send(Sampled(samples))
                except Exception:
                    conn.send(Failed(traceback.format_exc()))
