"""Online DPO against a reward model served over HTTP (the counterpart of TRL's
``OnlineDPOTrainer``).

One step, top to bottom in :meth:`OnlineDPOTrainer.compute_loss`: sample ``K`` completions per
prompt, send them to ``/score`` in the background, compute the reference and policy log-probs
while the request is in flight, pair each prompt's best and worst sample, and return the DPO
loss; ``transformers.Trainer`` does the backward pass, gradient accumulation, the optimizer
step, logging, checkpoints and ``accelerate``'s distribution.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from datasets import Dataset
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    get_last_checkpoint,
    rotate_checkpoints,
)

from common.client import split_urls
from trainer.config import OnlineDPOConfig
from trainer.generation import (
    Prompt,
    make_generation_config,
    render_prompts,
    sample_completions,
    tokenize_prompts,
    unwrapped_for_generation,
)
from trainer.logprobs import (
    PackedBatch,
    attention_implementation,
    completion_token_logps,
    contains_eos,
    masked_sum,
    pack_completions,
    packed_token_logps,
    packing_is_exact,
)
from trainer.losses import beta_for_epoch, dpo_losses, select_pairs
from trainer.rollout_process import RolloutProcess, SampleRequest
from trainer.scoring import RewardScorer, score_items

logger = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
# Checkpoints are written here and renamed into place when complete (see _save_checkpoint).
# ("_*" is also outside what push_to_hub uploads from OUTPUT_DIR.)
STAGING_DIR = "_checkpoint-staging"
# Async mode: the next step's rollouts (sampled before the save), one file per rank, so that a
# resumed run trains on what the uninterrupted run would have.
ROLLOUTS_FILE = "async_rollouts-{rank}.pt"


@dataclass
class Rollout:
    """Sampled completions of one batch of prompts, with their pending rewards."""

    prompts: list[Prompt]
    prompt_ids: torch.Tensor  # [K·B, P], left-padded, block layout
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # [K·B, T], padding after the first EOS
    completion_mask: torch.Tensor
    scores: Future[torch.Tensor]  # /score in flight
    ref_logps: torch.Tensor | None  # [K·B, T] per token; None: computed at training time
    policy_version: int  # global step of the weights that sampled it
    generate_seconds: float
    # padding_free: the batch as one packed row, built once for the reference and policy passes
    packed: PackedBatch | None = None

    @property
    def num_samples(self) -> int:
        return self.completion_ids.shape[0] // len(self.prompts)


def resolve_async_backend(args: OnlineDPOConfig, distributed_type: DistributedType) -> str:
    """``args.async_generation_backend`` with ``auto`` resolved: the (forked) rollout process
    on Linux CPU training without sharded weights, the thread otherwise."""
    sharded = distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    usable = args.device.type == "cpu" and not sharded and sys.platform.startswith("linux")
    backend = args.async_generation_backend
    if backend == "auto":
        return "process" if usable else "thread"
    if backend == "process" and args.async_generation and not usable:
        raise ValueError(
            "async_generation_backend='process' needs CPU training on Linux without "
            f"DeepSpeed/FSDP (device {args.device}, {distributed_type}, {sys.platform}); "
            "use 'thread'"
        )
    return backend


def collate_prompts(features: list[dict[str, Any]]) -> dict[str, list[Prompt]]:
    """Batches keep prompts as Python objects (strings or message lists); the trainer
    tokenizes them itself."""
    return {"prompt": [f["prompt"] for f in features]}


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class OnlineDPOTrainer(Trainer):
    """Online DPO with rewards from the reward service (``args.reward_url``).

    Arguments as TRL's ``OnlineDPOTrainer``, with ``reward_url`` in place of
    ``reward_funcs``/``reward_processing_classes``. ``ref_model=None`` makes a frozen copy of
    ``model``; with ``peft_config`` the reference is the base model with the adapter disabled.
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        ref_model: PreTrainedModel | None = None,
        args: OnlineDPOConfig | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        *,
        reward_url: str | Sequence[str] | None = None,
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
        if not args.reward_url:
            raise ValueError("reward_url is required: the base URL of the reward service")
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model)
        if ref_model is model:
            raise ValueError("model and ref_model must be different objects (or ref_model=None)")

        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self._peft = hasattr(model, "disable_adapter")
        if ref_model is None and not self._peft:
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        if args.disable_dropout:
            disable_dropout(model)
            if ref_model is not None:
                disable_dropout(ref_model)

        tokenizer = processing_class
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        # Every EOS the model declares (e.g. an end-of-turn token) ends a completion.
        declared = model.generation_config.eos_token_id
        declared = [] if declared is None else [declared] if isinstance(declared, int) else declared
        self.eos_token_ids = list(dict.fromkeys([tokenizer.eos_token_id, *declared]))

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
        # compute_loss returns a mean over pairs: Trainer must average it over accumulation
        # steps (TRL sums the gradients instead).
        self.model_accepts_loss_kwargs = False
        self.ref_model = (
            None
            if ref_model is None
            else self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        )
        self.generation_config = make_generation_config(args, tokenizer, self.eos_token_ids)
        self.padding_free = self._resolve_padding_free()
        self.stats: dict[str, list[float]] = defaultdict(list)
        self._timing: dict[str, float] = {}
        self._tokenizer_lock = threading.Lock()
        self._reward_events = 0
        self.scorer = RewardScorer(
            args.reward_url,
            api_key=args.reward_api_key,
            timeout=args.reward_timeout,
            max_retries=args.reward_max_retries,
            on_event=self._on_reward_event,
        )
        self.scorer.check()
        # Async generation: rollouts prepared in a background thread, sampled there by a copy
        # of the policy (thread backend) or handed to a rollout process (process backend).
        self._sampler: nn.Module | None = None
        self._sampler_version = -1
        self._async_backend = resolve_async_backend(args, self.accelerator.distributed_type)
        self._rollout_process: RolloutProcess | None = None
        self._rollout_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        self._micro = (-1, 0)  # (step, rollouts taken in it): the sync path's micro-batch index
        self._pending: deque[tuple[list[Prompt], Future[Rollout]]] = deque()
        self._lookahead: tuple[Any, list[dict[str, Any]]] | None = None
        self._saved_rollouts: dict[str, Any] | None = None  # from the checkpoint resumed

    def _resolve_padding_free(self) -> bool:
        """``args.padding_free``, with ``None`` resolved (on for CPU training), and off when
        the model does not honour the packed batch's attention mask."""
        wanted = self.args.padding_free
        if wanted is None:
            wanted = self.args.device.type == "cpu"
        if not wanted:
            return False
        with unwrapped_for_generation(self.model, self.accelerator) as policy:
            if packing_is_exact(policy):
                return True
            attention = attention_implementation(policy)
        problem = (
            f"{type(policy).__name__} with {attention} attention does not keep packed "
            "sequences apart (it ignores a custom attention mask)"
        )
        if self.args.padding_free:
            raise ValueError(f"padding_free=True: {problem}; set padding_free=False")
        logger.warning("padding_free off: %s", problem)
        return False

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
        args = self.args
        rollout = self._take_rollout(model, inputs["prompt"])  # generate, /score request sent
        start = time.perf_counter()
        mask = rollout.completion_mask
        logps = self._token_logps(model, rollout)
        ref_logps = rollout.ref_logps
        if ref_logps is None:
            ref_logps = self._ref_token_logps(model, rollout)
        wait = time.perf_counter()
        rewards = rollout.scores.result().to(logps.device)  # the forwards above hid this wait
        self._timing["score_wait"] = time.perf_counter() - wait
        self._timing["policy_forward"] = wait - start

        contain_eos = contains_eos(rollout.completion_ids, mask, self.eos_token_ids)
        if args.missing_eos_penalty is not None:
            rewards = rewards - args.missing_eos_penalty * (~contain_eos).float()
        pairs = select_pairs(rewards, args.num_samples_per_prompt)
        seq = masked_sum(logps, mask)
        ref_seq = masked_sum(ref_logps, mask)
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

        self._record_step(rollout, logps, ref_logps, rewards, contain_eos, pairs, beta)
        return loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        total = time.perf_counter() - start
        t = self._timing
        self.stats["time/generate"].append(t["generate"])
        self.stats["time/score_wait"].append(t["score_wait"])
        self.stats["time/forward_backward"].append(total - t["generate"] - t["score_wait"])
        return loss

    # ------------------------------------------------------------------ rollouts

    def _take_rollout(self, model: nn.Module, prompts: list[Prompt]) -> Rollout:
        """This batch's rollout: prepared in the background (async mode) or sampled now."""
        start = time.perf_counter()
        step = self.state.global_step
        micro = self._micro[1] if self._micro[0] == step else 0
        self._micro = (step, micro + 1)
        if self._pending:
            expected, future = self._pending.popleft()
            if expected == prompts:
                rollout = future.result()
                self._timing["generate"] = time.perf_counter() - start
                self.stats["async/staleness"].append(float(step - rollout.policy_version))
                return rollout
            logger.warning("async rollout queue out of step with the data; sampling in place")
            self._cancel_pending()
        with unwrapped_for_generation(model, self.accelerator) as policy:
            rollout = self._rollout(policy, prompts, step, self._rollout_seed(step, micro))
        self._timing["generate"] = rollout.generate_seconds
        if self.args.async_generation:
            self.stats["async/staleness"].append(0.0)
        return rollout

    def _rollout_seed(self, step: int, micro: int) -> int:
        """The sampling seed of a training batch, from its place in the run (step,
        micro-batch, rank): sync and async modes, and a resumed run, sample alike."""
        args, acc = self.args, self.accelerator
        index = (step * args.gradient_accumulation_steps + micro) * acc.num_processes
        return (args.seed * 0x9E3779B97F4A7C15 + index + acc.process_index) % 2**63

    def _rollout(
        self,
        policy: nn.Module,
        prompts: list[Prompt],
        version: int,
        seed: int | None = None,
        num_samples: int | None = None,
        with_ref: bool = True,
    ) -> Rollout:
        """Sample K completions per prompt (with ``seed``, leaving the global RNG as it was),
        send them to ``/score``, and, while the request is in flight, compute the reference
        log-probs."""
        k = num_samples or self.args.num_samples_per_prompt
        device = next(policy.parameters()).device
        prompt_ids, prompt_mask = self._tokenize(prompts, device)
        seeded = nullcontext()
        if seed is not None:
            seeded = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        with seeded:
            if seed is not None:
                torch.manual_seed(seed)
            start = time.perf_counter()
            sampled = sample_completions(
                policy, prompt_ids, prompt_mask, self.generation_config, k, self.eos_token_ids,
                self.processing_class.pad_token_id,
            )  # fmt: skip
            generate_seconds = time.perf_counter() - start
        rollout = self._send_to_score(prompts, *sampled, version, generate_seconds)
        if with_ref and self.ref_model is not None:
            rollout.ref_logps = self._ref_token_logps(None, rollout)
        return rollout

    def _tokenize(self, prompts: list[Prompt], device: torch.device) -> tuple[Any, Any]:
        tok = self.processing_class
        with self._tokenizer_lock:
            return tokenize_prompts(render_prompts(prompts, tok), tok, device)

    def _send_to_score(
        self,
        prompts: list[Prompt],
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        version: int,
        generate_seconds: float,
    ) -> Rollout:
        """Decode the completions and send them to ``/score`` (the rewards come later)."""
        with self._tokenizer_lock:
            completions = self.processing_class.batch_decode(
                completion_ids, skip_special_tokens=True
            )
        k = completion_ids.shape[0] // len(prompts)
        scores = self.scorer.submit(score_items(list(prompts) * k, completions))
        rollout = Rollout(
            list(prompts), prompt_ids, prompt_mask, completion_ids, completion_mask, scores,
            None, version, generate_seconds,
        )  # fmt: skip
        rollout.packed = self._pack(rollout)
        return rollout

    def _pack(self, rollout: Rollout) -> PackedBatch | None:
        """With ``padding_free``, the rollout as one packed row (outside inference mode: the
        policy pass takes gradients through it)."""
        if not self.padding_free:
            return None
        return pack_completions(
            rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
            rollout.completion_mask, rollout.num_samples, self.args.max_length,
        )  # fmt: skip

    def _token_logps(self, model: nn.Module, rollout: Rollout) -> torch.Tensor:
        """Per-token log-probs of the rollout's completions under ``model``."""
        if rollout.packed is not None:
            return packed_token_logps(model, rollout.packed)
        return completion_token_logps(
            model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
            rollout.completion_mask, self.args.max_length,
        )  # fmt: skip

    def _ref_token_logps(self, model: nn.Module | None, rollout: Rollout) -> torch.Tensor:
        ref, adapter_off = self._reference(model)
        with adapter_off, torch.inference_mode():
            logps = self._token_logps(ref, rollout)
        return logps.clone()  # a normal tensor again: the loss's graph may use it

    def _reference(self, model: nn.Module | None) -> tuple[nn.Module, AbstractContextManager]:
        """The reference model, or the policy plus a context that disables its adapter."""
        if self.ref_model is not None:
            return self.ref_model, nullcontext()
        policy = self.accelerator.unwrap_model(model if model is not None else self.model)
        return policy, policy.disable_adapter()

    # ------------------------------------------------------------------ async generation

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list, Any]:
        """In async mode, also fetch the next step's batches and start their rollouts, so
        they are sampled (with this step's weights) while this step trains."""
        if not self.args.async_generation:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        step = self.state.global_step
        if self._lookahead is not None and self._lookahead[0] is epoch_iterator:
            batches = self._lookahead[1]
        else:  # first step, new epoch or resumed run: nothing was prefetched
            self._cancel_pending()
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            self._restore_rollouts(batches)
        upcoming: list = []
        if step + 1 < self.state.max_steps:  # no rollout past the last step
            upcoming, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._lookahead = (epoch_iterator, upcoming)
        current = [] if self._pending else batches  # not sampled ahead
        sample = self._async_sampler()
        for batch_step, group in ((step, current), (step + 1, upcoming)):
            for micro, batch in enumerate(group):
                prompts = list(batch["prompt"])
                seed = self._rollout_seed(batch_step, micro)
                future = self._rollout_pool.submit(sample, prompts, seed)
                self._pending.append((prompts, future))
        return batches, None

    def _async_sampler(self) -> Callable[[list[Prompt], int], Rollout]:
        """Hand this step's weights to the async sampler (the rollout process's shared memory,
        or a snapshot for the sampling thread); returns ``sample(prompts, seed)`` with them."""
        policy = self.accelerator.unwrap_model(self.model)
        version = self.state.global_step
        if self._async_backend == "thread":
            state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
            return partial(self._thread_rollout, version, state)
        if self._rollout_process is None:
            self._rollout_process = RolloutProcess(
                policy, self.generation_config, self.eos_token_ids,
                self.processing_class.pad_token_id,
            )  # fmt: skip
        self._rollout_process.publish(version, policy.state_dict())
        return partial(self._process_rollout, version)

    def _thread_rollout(
        self, version: int, state: dict[str, torch.Tensor], prompts: list[Prompt], seed: int
    ) -> Rollout:
        """A rollout sampled in the sampling thread by a copy of the policy."""
        if self._sampler is None:
            policy = self.accelerator.unwrap_model(self.model)
            self._sampler = copy.deepcopy(policy).eval().requires_grad_(False)
        if self._sampler_version != version:
            self._sampler.load_state_dict(state)
            self._sampler_version = version
        return self._rollout(self._sampler, prompts, version, seed)

    def _process_rollout(self, version: int, prompts: list[Prompt], seed: int) -> Rollout:
        """A rollout sampled in the rollout process (its reference log-probs are computed at
        training time)."""
        assert self._rollout_process is not None
        prompt_ids, prompt_mask = self._tokenize(prompts, torch.device("cpu"))
        k = self.args.num_samples_per_prompt
        result = self._rollout_process.sample(
            SampleRequest(prompt_ids, prompt_mask, k, version, seed)
        )
        return self._send_to_score(
            prompts, result.prompt_ids, result.prompt_mask, result.completion_ids,
            result.completion_mask, version, result.generate_seconds,
        )  # fmt: skip

    def _save_rollouts(self, checkpoint: str) -> None:
        """Write the rollouts sampled ahead for the next step into ``checkpoint`` (waiting
        for them): their weights are not in any checkpoint."""
        if not self._pending:
            return
        records = []
        for _, future in self._pending:
            rollout = future.result()
            # The packed batch is built again from the rest when the rollout is restored.
            record = {
                f.name: getattr(rollout, f.name) for f in fields(Rollout) if f.name != "packed"
            }
            records.append({**record, "scores": rollout.scores.result()})
        path = os.path.join(checkpoint, ROLLOUTS_FILE.format(rank=self.accelerator.process_index))
        torch.save({"step": self.state.global_step, "rollouts": records}, path)

    def _load_rollouts(self, checkpoint: str | None) -> dict[str, Any] | None:
        if checkpoint is None or not self.args.async_generation:
            return None
        path = os.path.join(checkpoint, ROLLOUTS_FILE.format(rank=self.accelerator.process_index))
        return torch.load(path, weights_only=True) if os.path.exists(path) else None

    def _restore_rollouts(self, batches: list[dict[str, Any]]) -> None:
        """Queue the resumed checkpoint's rollouts for ``batches`` (the first step after a
        resume), as the uninterrupted run would have them."""
        saved, self._saved_rollouts = self._saved_rollouts, None
        if saved is None:
            return
        records = saved["rollouts"]
        if saved["step"] != self.state.global_step or [r["prompts"] for r in records] != [
            list(batch["prompt"]) for batch in batches
        ]:
            logger.warning("the checkpoint's async rollouts are not this step's; sampling anew")
            return
        for record in records:
            scores: Future[torch.Tensor] = Future()
            scores.set_result(record["scores"])
            done: Future[Rollout] = Future()
            rollout = Rollout(**{**record, "scores": scores})
            rollout.packed = self._pack(rollout)
            done.set_result(rollout)
            self._pending.append((record["prompts"], done))

    def _cancel_pending(self) -> None:
        # A rollout already being sampled cannot be cancelled: wait for it, so that no sampler
        # still reads the weight slot that the next publish overwrites.
        wait([future for _, future in self._pending if not future.cancel()])
        self._pending.clear()
        self._lookahead = None

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Trainer's checkpoint, written atomically: every rank writes into
        ``OUTPUT_DIR/_checkpoint-staging/checkpoint-N``, which is renamed to
        ``OUTPUT_DIR/checkpoint-N`` once complete and synced. A crash mid-save leaves the
        previous checkpoint as the newest one (``transformers`` writes in place)."""
        run_dir = self._get_output_dir(trial=trial)
        staging_root = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # what a crashed save left
        self.accelerator.wait_for_everyone()
        # Trainer derives the checkpoint path from _get_output_dir; point it at the staging
        # area for the duration (rotation there is a no-op: it holds one checkpoint). The
        # hub push (it may upload in the background) waits for the final directory.
        self._get_output_dir = lambda trial=None: staging_root  # type: ignore[method-assign]
        self._push_from_checkpoint = lambda folder: None  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)
            if self.args.async_generation:
                self._save_rollouts(staged)
        finally:
            del self._get_output_dir, self._push_from_checkpoint
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states, shards) are in
        if self.args.should_save:
            if self.state.best_model_checkpoint == staged:
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            _fsync_tree(staged)
            if os.path.isdir(final):  # the same step saved again
                shutil.rmtree(final)
            os.replace(staged, final)
            os.rmdir(staging_root)  # empty now: no leftover beside the checkpoints
            _fsync_tree(run_dir, files=False)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)
        self.accelerator.wait_for_everyone()

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        self._saved_rollouts = self._load_rollouts(checkpoint or None)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._cancel_pending()
            if self._rollout_process is not None:
                self._rollout_process.close()  # waits for a rollout still being sampled
                self._rollout_process = None

    # ------------------------------------------------------------------ metrics

    def _record_step(
        self,
        rollout: Rollout,
        logps: torch.Tensor,
        ref_logps: torch.Tensor,
        rewards: torch.Tensor,
        contain_eos: torch.Tensor,
        pairs: Any,
        beta: float,
    ) -> None:
        """TRL's metrics, with padding after EOS masked out of KL and entropy."""
        mask = rollout.completion_mask
        with torch.no_grad():
            seq = masked_sum(logps, mask)
            ref_seq = masked_sum(ref_logps, mask)
            kl = masked_sum(logps - ref_logps, mask)
            non_score = -beta * kl
            chosen_rewards = beta * (seq[pairs.chosen] - ref_seq[pairs.chosen])
            rejected_rewards = beta * (seq[pairs.rejected] - ref_seq[pairs.rejected])
            margins = chosen_rewards - rejected_rewards
            values = {
                "objective/kl": kl,
                "objective/entropy": -seq,
                "objective/non_score_reward": non_score,
                "objective/rlhf_reward": rewards + non_score,
                "objective/scores": rewards,
                "objective/scores_margin": rewards[pairs.chosen] - rewards[pairs.rejected],
                "rewards/chosen": chosen_rewards,
                "rewards/rejected": rejected_rewards,
                "rewards/accuracies": (margins > 0).float(),
                "rewards/margins": margins,
                "logps/chosen": seq[pairs.chosen],
                "logps/rejected": seq[pairs.rejected],
                "val/contain_eos_token": contain_eos.float(),
                "val/completion_length": mask.sum(-1).float(),
                "val/tied_pairs": pairs.tied.float(),
            }
            for name, value in values.items():
                self.stats[name].append(self.accelerator.gather(value.detach()).mean().item())
        self.stats["beta"].append(beta)
        self.stats["reward/model_changes"].append(float(self._reward_events))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the step metrics (means since the last log) to the Trainer's training logs."""
        if "loss" in logs and self.stats:
            logs.update({k: sum(v) / len(v) for k, v in self.stats.items() if v})
            self.stats.clear()
        super().log(logs, start_time)

    def _on_reward_event(self, name: str, payload: dict[str, Any]) -> None:
        """Reward client events (a redeployed reward model, retries) into the run's record."""
        if name == "reward_model_changed":
            self._reward_events += 1
            logger.warning(
                "reward model changed during training: %s (%s -> %s)",
                payload.get("model_id"), payload.get("old_hash"), payload.get("new_hash"),
            )  # fmt: skip
        elif name == "reward_retry":
            logger.info("reward request retry: %s", payload)
        if self.is_world_process_zero():
            record = {"event": name, "step": self.state.global_step, "time": time.time()}
            path = Path(self.args.output_dir) / EVENTS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps({**record, **payload}) + "\n")

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Reward of the policy's samples on held-out prompts, and their win rate against
        the reference model's samples (ties count half), both judged by the reward service."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset")
        if isinstance(dataset, dict):
            metrics: dict[str, float] = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        start = time.perf_counter()
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        device_rng = [self.args.device] if self.args.device.type == "cuda" else []
        # Fixed sampling noise: comparable across evaluations, training RNG left untouched.
        with torch.random.fork_rng(devices=device_rng):
            torch.manual_seed(self.args.seed + self.accelerator.process_index)
            for batch in self.get_eval_dataloader(dataset):
                values = self._evaluate_batch(list(batch["prompt"]))
                for name, value in zip(("policy", "ref", "kl", "eos"), values, strict=True):
                    # Per batch: gather_for_metrics drops the padding of the last one.
                    value = self.accelerator.gather_for_metrics(value.to(self.args.device))
                    parts[name].append(value)
        policy_r, ref_r, kl, eos = (torch.cat(parts[n]) for n in ("policy", "ref", "kl", "eos"))
        wins = (policy_r > ref_r).float() + 0.5 * (policy_r == ref_r).float()
        prefix = metric_key_prefix
        metrics = {
            f"{prefix}_reward_mean": policy_r.mean().item(),
            f"{prefix}_ref_reward_mean": ref_r.mean().item(),
            f"{prefix}_win_rate": wins.mean().item(),
            f"{prefix}_kl": kl.mean().item(),
            f"{prefix}_contain_eos_token": eos.mean().item(),
            f"{prefix}_samples": float(policy_r.numel()),
            f"{prefix}_runtime": time.perf_counter() - start,
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics

    @torch.no_grad()
    def _evaluate_batch(
        self, prompts: list[Prompt]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with unwrapped_for_generation(self.model_wrapped, self.accelerator) as policy:
            was_training = policy.training
            policy.eval()
            try:
                step = self.state.global_step
                mine = self._rollout(policy, prompts, step, num_samples=1)
                ref, adapter_off = self._reference(policy)
                with adapter_off:
                    theirs = self._rollout(ref, prompts, step, num_samples=1, with_ref=False)
                logps = self._token_logps(policy, mine)
            finally:
                policy.train(was_training)
        ref_logps = mine.ref_logps
        if ref_logps is None:
            ref_logps = self._ref_token_logps(policy, mine)
        mask = mine.completion_mask
        contain_eos = contains_eos(mine.completion_ids, mask, self.eos_token_ids).float()
        kl = masked_sum(logps - ref_logps, mask)
        return mine.scores.result(), theirs.scores.result(), kl, contain_eos


def _fsync_tree(root: str, files: bool = True) -> None:
    """Flush ``root`` (its files too, with ``files``) to disk, so a renamed checkpoint
    survives a machine crash, not only a process crash."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames if files else ():
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not files:
            break
