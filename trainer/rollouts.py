"""What a training step learns from, and the queue that prepares it a step ahead.

A :class:`Rollout` is one batch of prompts with ``K`` sampled completions each and the
rewards requested for them (still in flight when the rollout is made). In sync mode the step
samples its rollout itself. In async mode :class:`AsyncRollouts` samples the next step's
rollouts with this step's weights while this step trains ("Asynchronous RLHF", Noukhovitch
et al. 2024), by a copy of the policy in a thread or by a forked
:class:`~trainer.rollout_process.RolloutProcess` that reads the trainer's own weights.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import has_length

from trainer.generation import Prompt, Samples, Sampling, sample_completions
from trainer.rewards import RewardBatch
from trainer.rollout_process import ReferencePass, RolloutProcess, SampleRequest

logger = logging.getLogger(__name__)

# The next step's rollouts (sampled before a save), one file per rank, so that a resumed run
# trains on what the uninterrupted run would have.
ROLLOUTS_FILE = "async_rollouts-{rank}.pt"
# Bumped when the saved fields change: a checkpoint of another layout is sampled anew.
ROLLOUTS_FORMAT = 3


@dataclass
class Timings:
    """Seconds the step spent on its rollout (logged as ``time/generate`` and
    ``time/score_wait``)."""

    generate: float = 0.0  # sampling it, or waiting for the rollout sampled ahead
    score_wait: float = 0.0  # waiting for its rewards once the log-prob passes are done
    reference: float = 0.0  # the reference pass in the step (0 if the rollout process ran it)


@dataclass(frozen=True)
class Rollout:
    """One batch's sampled completions and their rewards (requested, maybe not yet back)."""

    prompts: list[Prompt]
    prompt_ids: torch.Tensor  # [K·B, P], left-padded, block layout: sample k of prompt i at k·B + i
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # [K·B, T], padding after the first EOS
    completion_mask: torch.Tensor
    completions: list[str]  # decoded, as sent to be scored
    rewards: Future[RewardBatch]  # each source's and the combined rewards, [K·B]
    policy_version: int  # global step of the weights that sampled it
    timings: Timings = field(default_factory=Timings)
    ref_logps: torch.Tensor | None = None  # [K·B, T], if the rollout process computed them

    @property
    def num_samples(self) -> int:
        return self.completion_ids.shape[0] // len(self.prompts)

    def wait_for_rewards(self) -> RewardBatch:
        """The rewards (blocking until they are back); the wait goes into ``timings``."""
        start = time.perf_counter()
        rewards = self.rewards.result()
        self.timings.score_wait = time.perf_counter() - start
        return rewards


Generate = Callable[[torch.Tensor, torch.Tensor], Samples]
"""``generate(prompt_ids, prompt_mask)``: completions of the tokenized prompts."""
MakeRollout = Callable[[list[Prompt], int, Generate, dict[str, list[Any]]], Rollout]
"""``make(prompts, version, generate, columns)``: tokenize, sample with ``generate``, request
rewards (``columns``: the batch's dataset columns, for reward functions)."""


def resolve_async_backend(
    backend: str, device: torch.device, distributed_type: DistributedType
) -> str:
    """``backend`` (``async_generation_backend``) with ``auto`` resolved: the (forked)
    rollout process on Linux CPU training without sharded weights, the thread otherwise."""
    sharded = distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    usable = device.type == "cpu" and not sharded and sys.platform.startswith("linux")
    if backend == "auto":
        return "process" if usable else "thread"
    if backend == "process" and not usable:
        raise ValueError(
            "async_generation_backend='process' needs CPU training on Linux without "
            f"DeepSpeed/FSDP (device {device}, {distributed_type}, {sys.platform}); "
            "use 'thread'"
        )
    return backend


def reference_in_rollout(sampling_seconds: float, policy_seconds: float) -> bool:
    """Should the rollout process run the reference pass (rather than the trainer's step)?

    An async step takes as long as the longer of its two halves, which run side by side: the
    trainer's forward and backward of the policy (F, ``policy_seconds``) and the rollout
    process's sampling (G, ``sampling_seconds``). The reference pass (R) goes to the shorter:
    ``max(G + R, F) < max(G, F + R)`` exactly when ``G < F``. Short completions of a large
    policy leave sampling the shorter half; long ones, or a small policy whose sampling is
    mostly per-token overhead, the longer. (Where both sides have as many intra-op threads,
    as on 2 cores, both compute the same log-probs; elsewhere they may differ in the last
    bits.)
    """
    return sampling_seconds < policy_seconds


class AsyncRollouts:
    """The rollouts of async mode: each step's are sampled during the step before, with its
    weights (one step off-policy; only the run's first step samples its own).

    :meth:`batches` (from ``Trainer.get_batch_samples``) fetches the next step's batches along
    with this step's (at an epoch's last step, the next epoch's first) and queues their
    rollouts; :meth:`take` hands the step its rollout. Sampling runs in one background thread,
    by a copy of the policy (``thread``) or by a forked :class:`RolloutProcess` that reads the
    trainer's weights in shared memory (``process``: the optimizer step must wait for
    :meth:`wait_for_sampling`, see :class:`SamplingBarrier`). The rollouts queued at a
    checkpoint are saved with it (:meth:`save`), as no checkpoint holds their weights.
    """

    def __init__(
        self,
        backend: str,
        sampling: Sampling,
        num_samples: int,
        make_rollout: MakeRollout,
        trainer_num_threads: int | None = None,
        reference: ReferencePass | None = None,
    ) -> None:
        self.backend = backend
        self._sampling = sampling
        self._num_samples = num_samples
        self._make_rollout = make_rollout
        # the trainer's intra-op threads beside the rollout process (None: the default rule)
        self._trainer_num_threads = trainer_num_threads
        # Process backend: the reference pass it can run, whether the next requests ask it
        # to (see balance), and how long the last request's sampling took.
        self._reference = reference
        self.reference_in_process = False
        self._sampling_seconds: float | None = None
        self._pool: ThreadPoolExecutor | None = None
        # (prompts, rollout) in the order the steps take them
        self._pending: deque[tuple[list[Prompt], Future[Rollout]]] = deque()
        # the epoch iterator and the next step's batches already fetched from it
        self._lookahead: tuple[Iterator[Any], list[Any]] | None = None
        self._resumed: dict[str, Any] | None = None  # the rollouts of the checkpoint resumed
        self._copy: nn.Module | None = None  # thread backend: the policy copy that samples
        self._copy_version = -1
        self.process: RolloutProcess | None = None  # process backend

    def take(self, prompts: list[Prompt]) -> Rollout | None:
        """The rollout queued for ``prompts`` (waited for), or ``None``: sample in place."""
        if not self._pending:
            return None
        start = time.perf_counter()
        expected, future = self._pending[0]
        if expected != prompts:
            logger.warning("async rollout queue out of step with the data; sampling in place")
            self.cancel()
            return None
        self._pending.popleft()
        rollout = future.result()
        rollout.timings.generate = time.perf_counter() - start
        return rollout

    def batches(
        self,
        epoch_iterator: Iterator[Any],
        fetch: Callable[[], list[Any]],
        step: int,
        last_step: bool,
        policy: nn.Module,
        seed: Callable[[int, int], int],
        fetch_next_epoch: Callable[[], list[Any]] | None = None,
    ) -> list[Any]:
        """This step's batches (fetched a step ahead, or now with ``fetch``) and, unless it
        is the ``last_step``, the next step's too (at the end of ``epoch_iterator``, the next
        epoch's first, from ``fetch_next_epoch``): queue the rollouts of both that are not
        queued yet, with ``policy``'s weights of ``step``. ``seed(step, micro)`` gives each
        batch's sampling seed."""
        if self._lookahead is not None and self._lookahead[0] is epoch_iterator:
            current = self._lookahead[1]
        else:  # first step, new epoch or resumed run
            current = fetch()
            if not self._queued_for(current):  # the run's first step, or a resumed run
                if self._pending:
                    logger.info("the epoch's first batches are not those fetched ahead")
                self.cancel()
                self._restore(step, current)
        upcoming = [] if last_step else fetch()
        if not upcoming and not last_step and fetch_next_epoch is not None:
            upcoming = fetch_next_epoch()
        self._lookahead = (epoch_iterator, upcoming)
        generate = self._publish(policy, step)
        unqueued = [] if self._pending else current
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        for batch_step, group in ((step, unqueued), (step + 1, upcoming)):
            for micro, batch in enumerate(group):
                prompts = list(batch["prompt"])
                sample = partial(generate, seed=seed(batch_step, micro))
                columns = {name: list(values) for name, values in batch.items()}
                future = self._pool.submit(self._make_rollout, prompts, step, sample, columns)
                self._pending.append((prompts, future))
        return current

    def _queued_for(self, batches: list[Any]) -> bool:
        """Whether the queued rollouts are those of ``batches`` (fetched ahead of an epoch)."""
        queued = [prompts for prompts, _ in self._pending]
        return bool(queued) and queued == [list(batch["prompt"]) for batch in batches]

    def _publish(self, policy: nn.Module, version: int) -> Callable[..., Samples]:
        """Hand ``policy``'s current weights to the sampler; returns
        ``generate(prompt_ids, prompt_mask, seed=...)`` with them."""
        if self.backend == "thread":
            if self._copy is None:
                self._copy = copy.deepcopy(policy).eval().requires_grad_(False)
            state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
            return partial(self._generate_in_thread, version, state)
        if self.process is None:  # it reads the weights in place from now on
            self.process = RolloutProcess(
                policy, self._sampling, self._trainer_num_threads, self._reference
            )
        return self._generate_in_process

    def _generate_in_thread(
        self,
        version: int,
        state: dict[str, torch.Tensor],
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        seed: int,
    ) -> Samples:
        assert self._copy is not None
        if self._copy_version != version:
            self._copy.load_state_dict(state)
            self._copy_version = version
        return sample_completions(
            self._copy, prompt_ids, prompt_mask, self._sampling, self._num_samples, seed
        )

    def _generate_in_process(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, seed: int
    ) -> Samples:
        assert self.process is not None
        request = SampleRequest(
            prompt_ids, prompt_mask, self._num_samples, seed, self.reference_in_process
        )
        sampled = self.process.sample(request)
        self._sampling_seconds = sampled.sample_seconds
        return sampled.samples

    def balance(self, policy_seconds: float) -> None:
        """Place the reference pass of the rollouts requested from now on
        (:func:`reference_in_rollout`), given the step's forward and backward of the policy
        without a reference pass (``policy_seconds``) and the last request's sampling."""
        if self._reference is not None and self._sampling_seconds is not None:
            self.reference_in_process = reference_in_rollout(self._sampling_seconds, policy_seconds)

    def wait_for_sampling(self) -> None:
        """Wait until the queued rollouts are sampled (the process backend reads the weights
        that the optimizer step is about to change)."""
        if self.process is not None:
            wait([future for _, future in self._pending])

    # ------------------------------------------------------------------ checkpoints

    def save(self, checkpoint_dir: str, step: int, rank: int) -> None:
        """Write the rollouts queued for the next step into ``checkpoint_dir`` (waiting for
        them and their rewards, each source's kept)."""
        if not self._pending:
            return
        records = []
        for _, future in self._pending:
            rollout = future.result()
            record = {f.name: getattr(rollout, f.name) for f in fields(Rollout)}
            del record["timings"]
            scored = rollout.rewards.result()
            rewards = {
                "names": list(scored.names),
                "per_source": scored.per_source,
                "combined": scored.combined,
            }
            records.append({**record, "rewards": rewards})
        path = os.path.join(checkpoint_dir, ROLLOUTS_FILE.format(rank=rank))
        torch.save({"format": ROLLOUTS_FORMAT, "step": step, "rollouts": records}, path)

    def load(self, checkpoint_dir: str | None, rank: int) -> None:
        """Keep the rollouts saved in ``checkpoint_dir`` (the checkpoint a run resumes from;
        ``None``: a fresh run) for the run's first step."""
        self._resumed = None
        if checkpoint_dir is not None:
            path = os.path.join(checkpoint_dir, ROLLOUTS_FILE.format(rank=rank))
            if os.path.exists(path):
                self._resumed = torch.load(path, weights_only=True)

    def _restore(self, step: int, batches: list[Any]) -> None:
        """Queue the resumed checkpoint's rollouts if they are ``batches``' of ``step``."""
        saved, self._resumed = self._resumed, None
        if saved is None:
            return
        records = saved["rollouts"]
        if (
            saved.get("format") != ROLLOUTS_FORMAT
            or saved["step"] != step
            or [r["prompts"] for r in records] != [list(b["prompt"]) for b in batches]
        ):
            logger.warning("the checkpoint's async rollouts are not this step's; sampling anew")
            return
        for record in records:
            saved_rewards = record["rewards"]
            rewards: Future[RewardBatch] = Future()
            rewards.set_result(
                RewardBatch(
                    names=tuple(saved_rewards["names"]),
                    per_source=saved_rewards["per_source"],
                    combined=saved_rewards["combined"],
                    spans={},
                )
            )
            done: Future[Rollout] = Future()
            done.set_result(Rollout(**{**record, "rewards": rewards}))
            self._pending.append((record["prompts"], done))

    # ------------------------------------------------------------------ shutdown

    def cancel(self) -> None:
        """Drop the queued rollouts. One already being sampled cannot be cancelled: wait for
        it, so that no sampler still reads weights that the optimizer step changes."""
        wait([future for _, future in self._pending if not future.cancel()])
        self._pending.clear()
        self._lookahead = None

    def close(self) -> None:
        """Cancel, stop the rollout process and the sampling thread (they start again if the
        queue is used again)."""
        self.cancel()
        if self.process is not None:
            self.process.close()  # waits for a rollout still being sampled
            self.process = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class SamplingBarrier(TrainerCallback):
    """Holds each optimizer step until the rollouts sampled with the weights it changes are
    done (the process backend samples with the trainer's weights in place)."""

    def __init__(self, rollouts: AsyncRollouts) -> None:
        self.rollouts = rollouts

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rollouts.wait_for_sampling()


def next_epoch_batches(
    dataloader: Any,
    epoch: int,
    num_batches: int,
    device: torch.device,
    get_batch_samples: Callable[[Iterator[Any], int, torch.device], tuple[list[Any], Any]],
) -> list[Any]:
    """The first step's batches of ``epoch``, fetched now (during the epoch before's last step)
    as ``Trainer._run_epoch`` will fetch them: from an iterator over the training dataloader
    set to that epoch, which is then dropped. The global RNG is saved and restored around it,
    so the Trainer's own iterator draws the same order (with ``accelerate``'s seedable
    sampler, the default, the order is the epoch's anyway). Should they differ, the step
    samples its rollout itself: the data order is always the Trainer's. A dataloader without
    a length has no epochs: nothing."""
    if dataloader is None or not has_length(dataloader):
        return []
    num_batches = min(num_batches, len(dataloader))
    with torch.random.fork_rng(devices=[]):
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        # As Trainer does: accelerate's DataLoaderShard does not forward set_epoch to a
        # batch sampler wrapped in BatchSamplerShard.
        inner = getattr(getattr(dataloader, "batch_sampler", None), "batch_sampler", None)
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)
        iterator = iter(dataloader)
        try:
            batches, _ = get_batch_samples(iterator, num_batches, device)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            # accelerate's iterator registers the dataloader as active until it ends.
            end = getattr(dataloader, "end", None)
            if end is not None:
                end()
    return batches
