"""Online DPO against a reward model served over HTTP (the counterpart of TRL's
``OnlineDPOTrainer``).

One step, top to bottom in :meth:`OnlineDPOTrainer.compute_loss`:

1. take the batch's rollout: ``K`` completions per prompt sampled by the policy (in async
   mode, during the step before), their rewards requested from every reward source (reward
   services and reward functions, :class:`~trainer.rewards.RewardSources`) at once;
2. compute the reference's and the policy's log-probs while the requests are in flight;
3. wait for the combined rewards (less the missing-EOS penalty);
4. pair each prompt's best and worst sample on the combined reward;
5. return the DPO loss of the pairs, recording TRL's metrics.

``transformers.Trainer`` does the backward pass, gradient accumulation, the optimizer step,
logging, checkpoints (made atomic by :class:`~trainer.checkpoint.AtomicCheckpoints`) and
``accelerate``'s distribution.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, NoReturn, Self

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from common.client import split_urls
from trainer.checkpoint import AtomicCheckpoints
from trainer.completion_log import CompletionLog, CompletionLogStart
from trainer.config import OnlineDPOConfig
from trainer.data import PROMPT_COLUMN
from trainer.evaluation import HeldOutEvaluation
from trainer.generation import (
    Prompt,
    Sampling,
    make_generation_config,
    render_prompts,
    sample_completions,
    tokenize_prompts,
    unwrapped_for_generation,
)
from trainer.logprobs import LogProbPass, contains_eos, masked_sum, resolve_padding_free
from trainer.losses import beta_for_epoch, dpo_losses, select_pairs
from trainer.metrics import RewardEvents, StepRecord, step_metrics
from trainer.models import end_of_completion_tokens, prepare_models
from trainer.reward_specs import RewardFuncEntry
from trainer.rewards import (
    RewardModelChanged,
    RewardSources,
    reward_metrics,
)
from trainer.rollout_process import ReferencePass
from trainer.rollouts import (
    AsyncRollouts,
    Generate,
    Rollout,
    SamplingBarrier,
    Timings,
    next_epoch_batches,
    resolve_async_backend,
)

logger = logging.getLogger(__name__)

# Where training_step hands compute_loss the rollout it took for the batch.
ROLLOUT_INPUT = "_rollout"
# Sampling seeds: run seed s samples its i-th training batch with s·C + i (mod 2^63). C is
# odd with well-mixed bits (2^64/φ, as in Fibonacci hashing), so runs with neighbouring seeds
# do not share batch seeds (without it, seed s + 1 would sample batch i as seed s samples
# batch i + 1).
SEED_SPREAD = 0x9E3779B97F4A7C15


def collate_prompts(features: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Batches keep every column as a list of Python objects: prompts (strings or message
    lists; the trainer tokenizes them itself) and the columns reward functions read."""
    return {name: [f[name] for f in features] for name in features[0]}


class OnlineDPOTrainer(AtomicCheckpoints, HeldOutEvaluation):
    """Online DPO with rewards from reward services and reward functions.

    Arguments as TRL's ``OnlineDPOTrainer``: ``reward_funcs`` (service URLs, import paths of
    functions, or callables; weighted by ``args.reward_weights``) or the one-service shorthand
    ``reward_url``, in place of reward models and ``reward_processing_classes``. ``model``
    and ``ref_model`` may be names or paths (loaded with ``args.model_init_kwargs``).
    ``ref_model=None`` makes a frozen copy of ``model``; with ``peft_config`` the reference is
    the base model with the adapter disabled. :meth:`close` (or a ``with`` block) releases
    the reward sources when done.
    """

    # compute_loss returns a mean over pairs: Trainer averages it over accumulation steps
    # (TRL sums the gradients instead).
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PreTrainedModel | str,
        ref_model: PreTrainedModel | str | None = None,
        args: OnlineDPOConfig | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        *,
        reward_url: str | Sequence[str] | None = None,
        reward_funcs: Sequence[RewardFuncEntry] | RewardFuncEntry | None = None,
        peft_config: Any | None = None,
        data_collator: Any | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
    ) -> None:
        if not isinstance(args, OnlineDPOConfig):
            raise ValueError("args must be an OnlineDPOConfig")
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        if processing_class is None:
            raise ValueError("processing_class (the policy's tokenizer) is required")
        if reward_url is not None:
            args.reward_url = split_urls(reward_url)
        if not args.reward_url and not (reward_funcs or args.reward_funcs):
            raise ValueError(
                "reward_url or reward_funcs is required: a reward service URL or reward functions"
            )
        # The reward sources are checked (imports, signatures, weights, columns) before any
        # model loads.
        self.rewards = RewardSources.from_args(
            args, reward_funcs, on_event=lambda name, payload: self.reward_events(name, payload)
        )
        try:
            self.reward_columns = self.rewards.check_columns(
                train_dataset.column_names or [PROMPT_COLUMN]
            )
            model, ref_model = prepare_models(model, ref_model, args, peft_config)
        except BaseException:
            self.rewards.close()
            raise
        tokenizer = processing_class
        eos_token_ids = end_of_completion_tokens(model, tokenizer)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or collate_prompts,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.ref_model = (
            None
            if ref_model is None
            else self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        )
        self.sampling = Sampling(
            make_generation_config(args, tokenizer, eos_token_ids),
            eos_token_ids,
            tokenizer.pad_token_id,
        )
        with unwrapped_for_generation(self.model, self.accelerator) as policy:
            on_cpu = args.device.type == "cpu"
            padding_free = resolve_padding_free(policy, args.padding_free, on_cpu)
        self.logprob_pass = LogProbPass(padding_free, args.max_length)
        self.stats: dict[str, list[float]] = defaultdict(list)
        self._tokenizer_lock = threading.Lock()  # the rollout thread tokenizes too
        self.reward_events = RewardEvents(
            args.output_dir, lambda: self.state.global_step, self.is_world_process_zero()
        )
        self.completion_log = CompletionLog.from_args(args, self.is_world_process_zero())
        if self.completion_log is not None:
            self.add_callback(CompletionLogStart(self.completion_log))
        self.async_rollouts: AsyncRollouts | None = None
        try:
            self.rewards.check()
            if args.async_generation:
                backend = resolve_async_backend(
                    args.async_generation_backend, args.device, self.accelerator.distributed_type
                )
                # The rollout process can run the reference pass of a separate reference
                # model (not a PEFT policy's adapter switched off: that is the trainer's).
                reference = None
                if backend == "process" and self.ref_model is not None:
                    reference = ReferencePass(self.ref_model, self.logprob_pass)
                self.async_rollouts = AsyncRollouts(
                    backend, self.sampling, args.num_samples_per_prompt, self._rollout,
                    args.async_trainer_num_threads, reference,
                )  # fmt: skip
                record = partial(self._record_stat, "time/sampling_wait")
                self.add_callback(SamplingBarrier(self.async_rollouts, record))
        except BaseException:
            self.rewards.close()
            raise
        self._micro = (-1, 0)  # (step, rollouts taken in it): the micro-batch of the next

    @property
    def beta(self) -> float:
        return beta_for_epoch(self.args.beta, self.state.epoch)

    # ------------------------------------------------------------------ one training step

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        """The DPO loss of one batch (the steps in the module docstring)."""
        args = self.args
        rollout = inputs.get(ROLLOUT_INPUT) or self._take_rollout(model, inputs)
        mask = rollout.completion_mask
        logps, ref_logps = self._logps(model, rollout)  # the rewards are on their way meanwhile
        scored = rollout.wait_for_rewards()
        rewards = scored.combined.to(logps.device)

        contain_eos = contains_eos(rollout.completion_ids, mask, self.sampling.eos_token_ids)
        if args.missing_eos_penalty is not None:
            rewards = rewards - args.missing_eos_penalty * (~contain_eos).float()
        pairs = select_pairs(rewards, args.num_samples_per_prompt)
        seq, ref_seq = masked_sum(logps, mask), masked_sum(ref_logps, mask)
        beta = self.beta
        losses = dpo_losses(
            seq[pairs.chosen], seq[pairs.rejected], ref_seq[pairs.chosen],
            ref_seq[pairs.rejected], beta, args.loss_type,
        )  # fmt: skip
        if args.skip_tied_pairs:
            kept = ~pairs.tied
            # All tied: a zero loss that still reaches every parameter (DDP needs the graph).
            loss = losses[kept].mean() if kept.any() else losses.sum() * 0.0
        else:
            loss = losses.mean()

        self._record_step(
            StepRecord(rollout, rewards, contain_eos, pairs, logps, ref_logps, seq, ref_seq, beta)
        )
        if self.completion_log is not None:
            self.completion_log.add(
                self.state.global_step + 1, rollout.prompts, rollout.completions,
                scored.by_source(), rewards.tolist(), pairs.chosen.tolist(),
                pairs.rejected.tolist(), extra=scored.logged_extra,
            )  # fmt: skip
        return loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Trainer's step (forward, backward) on the batch's rollout, timed."""
        start = time.perf_counter()
        rollout = self._take_rollout(model, inputs)
        try:
            loss = super().training_step(
                model, {**inputs, ROLLOUT_INPUT: rollout}, num_items_in_batch
            )
        except RewardModelChanged as e:
            self._stop_on_model_change(e)
        total = time.perf_counter() - start
        spent = rollout.timings
        self.stats["time/generate"].append(spent.generate)
        self.stats["time/score_wait"].append(spent.score_wait)
        self.stats["time/forward_backward"].append(total - spent.generate - spent.score_wait)
        if self.async_rollouts is not None and self.async_rollouts.process is not None:
            share = self.async_rollouts.note_reference(rollout)
            self.stats["async/reference_in_rollout"].append(share)
        return loss

    # ------------------------------------------------------------------ rollouts

    def _stop_on_model_change(self, change: RewardModelChanged) -> NoReturn:
        """``reward_model_change: stop``: save a checkpoint of the weights before this step
        (none trained on the new reward model) and stop, the checkpoint named in the error."""
        if self.async_rollouts is not None:
            self.async_rollouts.cancel()  # scored by the new model too: sampled anew on resume
        self._save_checkpoint(self.model, trial=None)
        checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        change.checkpoint = os.path.join(self._get_output_dir(None), checkpoint)
        raise change

    def _take_rollout(self, model: nn.Module, inputs: dict[str, list[Any]]) -> Rollout:
        """This batch's rollout: sampled during the step before (async mode) or now."""
        prompts = inputs["prompt"]
        step = self.state.global_step
        micro = self._micro[1] if self._micro[0] == step else 0
        self._micro = (step, micro + 1)
        queued = self.async_rollouts
        rollout = queued.take(prompts) if queued is not None else None
        if rollout is None:
            with unwrapped_for_generation(model, self.accelerator) as policy:
                rollout = self._rollout(
                    prompts, step, self._sampler(policy, self._seed(step, micro)), inputs
                )
        if queued is not None:
            self.stats["async/staleness"].append(float(step - rollout.policy_version))
        return rollout

    def _seed(self, step: int, micro: int) -> int:
        """The sampling seed of a training batch, from its place in the run (step,
        micro-batch, rank): sync and async modes, and a resumed run, sample alike."""
        args, acc = self.args, self.accelerator
        index = (step * args.gradient_accumulation_steps + micro) * acc.num_processes
        return (args.seed * SEED_SPREAD + index + acc.process_index) % 2**63

    def _sampler(
        self, policy: nn.Module, seed: int | None = None, num_samples: int = 0
    ) -> Generate:
        """``generate(prompt_ids, prompt_mask)`` by ``policy`` (``num_samples`` per prompt;
        0: ``num_samples_per_prompt``), seeded with ``seed``."""
        k = num_samples or self.args.num_samples_per_prompt
        return partial(sample_completions, policy, sampling=self.sampling, num_samples=k, seed=seed)

    def _rollout(
        self,
        prompts: list[Prompt],
        version: int,
        generate: Generate,
        columns: dict[str, list[Any]] | None = None,
    ) -> Rollout:
        """Sample completions of ``prompts`` with ``generate``, decode them and request their
        rewards (they come back while the step computes log-probs). ``columns``: the batch's
        dataset columns, per prompt (those the reward functions read are passed on)."""
        tokenizer = self.processing_class
        with self._tokenizer_lock:
            prompt_ids, prompt_mask = tokenize_prompts(
                render_prompts(prompts, tokenizer), tokenizer, torch.device("cpu")
            )
        start = time.perf_counter()
        samples = generate(prompt_ids, prompt_mask)
        generate_seconds = time.perf_counter() - start
        with self._tokenizer_lock:
            completions = tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
        rewards = self.rewards.submit_rollout(
            prompts, completions, samples.completion_ids, samples.completion_mask,
            columns or {}, self.reward_columns, self.state, self.state.global_step + 1,
        )  # fmt: skip
        return Rollout(
            **vars(samples),
            prompts=list(prompts),
            completions=completions,
            rewards=rewards,
            policy_version=version,
            timings=Timings(generate=generate_seconds, ready=time.perf_counter()),
        )

    # ------------------------------------------------------------------ log-probs

    def _logps(self, model: nn.Module, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of the rollout's completions under ``model`` and under the
        reference (with ``padding_free``, both passes over one packed batch). The rollout
        process may have run the reference's of some prompts already: they come with the
        rollout."""
        k = rollout.num_samples
        packed = self.logprob_pass.pack(rollout, k)
        ref_logps = rollout.ref_logps
        if ref_logps is None or ref_logps.shape[0] < rollout.completion_ids.shape[0]:
            start = time.perf_counter()
            ref, adapter_off = self._reference(model)
            with adapter_off:
                ref_logps = self.logprob_pass.complete_reference(ref, rollout, k, ref_logps, packed)
            rollout.timings.reference = time.perf_counter() - start
        return self.logprob_pass.token_logps(model, rollout, packed), ref_logps

    def _reference(self, model: nn.Module) -> tuple[nn.Module, AbstractContextManager]:
        """The reference model, or the policy plus a context that disables its adapter."""
        if self.ref_model is not None:
            return self.ref_model, nullcontext()
        policy = self.accelerator.unwrap_model(model)
        return policy, policy.disable_adapter()

    # ------------------------------------------------------------------ async mode

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list, Any]:
        """In async mode, also fetch the next step's batches and queue their rollouts, to be
        sampled (with this step's weights) while this step trains."""
        fetch = partial(super().get_batch_samples, epoch_iterator, num_batches, device)
        if self.async_rollouts is None:
            return fetch()
        step = self.state.global_step
        batches = self.async_rollouts.batches(
            epoch_iterator, lambda: fetch()[0], step, step + 1 >= self.state.max_steps,
            self.accelerator.unwrap_model(self.model), self._seed, self._next_epoch_batches,
        )  # fmt: skip
        return batches, None

    def _next_epoch_batches(self) -> list[Any]:
        """The next epoch's first step's batches (:func:`~trainer.rollouts.next_epoch_batches`)."""
        return next_epoch_batches(
            self.callback_handler.train_dataloader, math.floor(self.state.epoch) + 1,
            self.args.gradient_accumulation_steps, self.args.device, super().get_batch_samples,
        )  # fmt: skip

    def save_extra(self, checkpoint_dir: str) -> None:
        """Async mode: the rollouts sampled ahead for the next step (no checkpoint holds the
        weights that sampled them)."""
        if self.async_rollouts is not None:
            step, rank = self.state.global_step, self.accelerator.process_index
            self.async_rollouts.save(checkpoint_dir, step, rank)

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; in async mode with the rollouts the resumed checkpoint saved. A
        run that fails releases what :meth:`close` releases."""
        if self.async_rollouts is not None:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)
            self.async_rollouts.load(checkpoint or None, self.accelerator.process_index)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            self.close()
            raise
        finally:
            if self.async_rollouts is not None:
                self.async_rollouts.close()  # waits for a rollout still being sampled

    def close(self) -> None:
        """Release the reward sources (their threads and connections) and the async sampler.
        The trainer cannot score afterwards."""
        if self.async_rollouts is not None:
            self.async_rollouts.close()
        self.rewards.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------------ metrics

    def _record_step(self, step: StepRecord) -> None:
        """The step's metrics (each averaged over the samples or pairs of all ranks), with
        each reward source's ``rewards/<name>/mean|std``."""
        for name, value in step_metrics(step).items():
            self.stats[name].append(self.accelerator.gather(value).mean().item())
        scored = step.rollout.rewards.result()
        per_source = self.accelerator.gather(scored.per_source.to(step.rewards.device))
        for name, value in reward_metrics(per_source, scored.names).items():
            self.stats[name].append(value)
        for name, value in scored.logged_metrics.items():  # log_metric: this rank's
            self.stats[name].append(value)
        self.stats["beta"].append(step.beta)
        self.stats["reward/model_changes"].append(float(self.rewards.policy.total_changes))

    def _record_stat(self, name: str, value: float) -> None:
        self.stats[name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the step metrics (means since the last log) to the Trainer's training logs."""
        if "loss" in logs and self.stats:
            logs.update({k: sum(v) / len(v) for k, v in self.stats.items() if v})
            self.stats.clear()
            if self.completion_log is not None:
                self.completion_log.flush()
        super().log(logs, start_time)
