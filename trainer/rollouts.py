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
    reference: float = 0.0  # the trainer's reference pass (of the prompts it ran it for)
    ready: float = 0.0  # perf_counter() when sampled, decoded and its rewards requested


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
    ref_logps: torch.Tensor | None = None  # [K·n, T]: the first n prompts', by the rollout process

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


# The share of the measured gap that each step's reference split closes after the first
# (which closes all of it): a step's halves move by tens of milliseconds at random, which
# full corrections would follow.
BALANCE_GAIN = 0.25


def reference_split(
    current: float,
    num_prompts: int,
    imbalance: float,
    trainer_cost: float,
    rollout_cost: float,
    rollouts: int = 1,
    gain: float = 1.0,
) -> float:
    """For how many prompts of each request the rollout process should run the reference
    pass (the first ones; the trainer runs the others'), so that both halves of an async step
    take as long. Requests round it to a whole number of prompts.

    The step takes as long as the longer of its two halves, which run side by side: the
    trainer's log-prob passes and backward, and the rollout's sampling (with decoding and the
    reward request). ``imbalance`` is how much longer the trainer's half was in the step just
    measured, with ``current`` of ``num_prompts`` prompts' passes in the rollout process
    (negative: the trainer waited for the rollout). Moving one prompt's pass from the trainer
    to the rollout process shortens the trainer's half by ``trainer_cost`` and lengthens the
    rollout's by ``rollout_cost`` (seconds per prompt on each side's threads), for each of the
    step's ``rollouts``: the gap closes by ``rollouts · (trainer_cost + rollout_cost)`` per
    prompt moved. ``gain`` < 1 moves that share of the way, as measured gaps are noisy. Short
    completions of a large policy leave sampling the shorter half, and most of the pass goes
    to the rollout process; long ones, or a small policy whose sampling is mostly per-token
    overhead, keep it in the trainer.
    """
    moved = gain * imbalance / (rollouts * (trainer_cost + rollout_cost))
    return min(float(num_prompts), max(0.0, current + moved))


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
        # Process backend: the reference pass it can run, for how many prompts of each
        # request it runs it (see wait_for_sampling; rounded), each side's last cost of the
        # pass per prompt, and whether the step's halves are not those of a usual step (it
        # sampled in place, or a batch was short): nothing to balance by.
        self._reference = reference
        self.reference_prompts = 0.0
        self._balanced = False  # once: later steps correct by BALANCE_GAIN of the gap
        self._num_prompts = 0
        self._trainer_cost: float | None = None
        self._rollout_cost: float | None = None
        self._unusual_step = False
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
        self._unusual_step |= len(prompts) < self._num_prompts
        if not self._pending:
            self._unusual_step = True
            return None
        start = time.perf_counter()
        expected, future = self._pending[0]
        if expected != prompts:
            logger.warning("async rollout queue out of step with the data; sampling in place")
            self.cancel()
            self._unusual_step = True
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
        self._unusual_step = False
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
        num_prompts = prompt_ids.shape[0]
        self._num_prompts = max(self._num_prompts, num_prompts)
        in_process = min(round(self.reference_prompts), num_prompts) if self._reference else 0
        request = SampleRequest(prompt_ids, prompt_mask, self._num_samples, seed, in_process)
        sampled = self.process.sample(request)
        if in_process:
            self._rollout_cost = sampled.reference_seconds / in_process
        return sampled.samples

    def note_reference(self, rollout: Rollout) -> float:
        """Note what the trainer's reference pass of ``rollout`` cost per prompt (for
        :meth:`wait_for_sampling`); returns the share of its prompts whose pass the rollout
        process ran."""
        num_prompts = len(rollout.prompts)
        ref_logps = rollout.ref_logps
        in_process = 0 if ref_logps is None else ref_logps.shape[0] // rollout.num_samples
        if in_process < num_prompts:
            self._trainer_cost = rollout.timings.reference / (num_prompts - in_process)
        return in_process / num_prompts

    def wait_for_sampling(self) -> float:
        """Wait until the queued rollouts are sampled (the process backend reads the weights
        that the optimizer step is about to change); returns the seconds waited.

        How long the trainer waited, or how long before it the rollouts were ready, is how
        much shorter the trainer's half of the step was than the rollout's, or longer: it
        places the next requests' reference pass (:func:`reference_split`)."""
        if self.process is None:
            return 0.0
        futures = [future for _, future in self._pending]
        start = time.perf_counter()
        wait(futures)
        waited = time.perf_counter() - start
        sampled = [f.result() for f in futures if f.exception() is None]
        short = any(len(rollout.prompts) < self._num_prompts for rollout in sampled)
        if sampled and len(sampled) == len(futures) and not (self._unusual_step or short):
            ready = max(rollout.timings.ready for rollout in sampled)
            self._balance(start - ready, len(sampled))
        return waited

    def _balance(self, imbalance: float, rollouts: int) -> None:
        """Place the reference pass of the requests from now on (:func:`reference_split`),
        once either side's cost of it is known (the other's taken as the same until it is)."""
        trainer_cost = self._trainer_cost if self._trainer_cost is not None else self._rollout_cost
        rollout_cost = self._rollout_cost if self._rollout_cost is not None else trainer_cost
        if self._reference is None or trainer_cost is None or rollout_cost is None:
            return
        if trainer_cost + rollout_cost > 0:
            self.reference_prompts = reference_split(
                self.reference_prompts, self._num_prompts, imbalance, trainer_cost,
                rollout_cost, rollouts, BALANCE_GAIN if self._balanced else 1.0,
            )  # fmt: skip
            self._balanced = True
            logger.debug(
                "halves %+.3f s apart (trainer's longer: +), reference pass per prompt %.4f s "
                "(trainer) / %.4f s (rollout process): %.1f of %d prompts' in the rollout process",
                imbalance, trainer_cost, rollout_cost, self.reference_prompts, self._num_prompts,
            )  # fmt: skip

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
    done (the process backend samples with the trainer's weights in place); ``record`` gets
    the seconds it waited."""

    def __init__(self, rollouts: AsyncRollouts, record: Callable[[float], None]) -> None:
        self.rollouts = rollouts
        self.record = record

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rollouts.process is not None:
            self.record(self.rollouts.wait_for_sampling())


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
