"""Evaluation on held-out prompts: the policy's samples judged by the reward service, their KL
to the reference, and their win rate against the reference's samples.

:class:`HeldOutEvaluation` is ``Trainer.evaluate`` in those terms, with
:meth:`~HeldOutEvaluation.judge` (sample and score one batch) built on the trainer's own
sampling, rewards and log-probs (``_rollout``, ``_sampler``, ``_reference``, ``_logps``). The
demo's before/after table judges through the same method.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import Trainer

from trainer.generation import Prompt, unwrapped_for_generation
from trainer.logprobs import contains_eos, masked_sum
from trainer.rewards import reward_metrics


@dataclass(frozen=True)
class Judged:
    """The policy's samples on a batch of prompts (block layout: sample ``k`` of prompt ``i``
    at ``k·B + i``), judged by the reward service."""

    prompts: list[Prompt]  # the prompt of each sample
    completions: list[str]
    rewards: torch.Tensor  # the reward service's scores
    ref_rewards: torch.Tensor | None  # of one sample of the reference per prompt, when asked
    kl: torch.Tensor  # log π(y|x) − log π_ref(y|x), padding after EOS left out (TRL's estimate)
    contain_eos: torch.Tensor  # 1.0 where the completion ends with an EOS
    per_source: torch.Tensor | None = None  # [samples, sources], NaN where one does not apply
    source_names: tuple[str, ...] = ()


class HeldOutEvaluation(Trainer):
    """``Trainer.evaluate``: the reward of the policy's samples on held-out prompts and their
    win rate against the reference model's samples (ties count half), both judged by the
    reward service, with the KL and the share of completions that end with an EOS."""

    @torch.no_grad()
    def judge(
        self,
        prompts: list[Prompt],
        num_samples: int = 1,
        against_reference: bool = True,
        columns: dict[str, list[Any]] | None = None,
    ) -> Judged:
        """``num_samples`` samples of the policy per prompt, judged by the reward sources,
        with their KL to the reference and, ``against_reference``, the reward of one sample
        of the reference per prompt (what :meth:`evaluate` reports, per sample).
        ``columns``: the prompts' dataset columns that reward functions read."""
        with unwrapped_for_generation(self.model_wrapped, self.accelerator) as policy:
            was_training = policy.training
            policy.eval()
            try:
                step = self.state.global_step
                mine = self._rollout(
                    prompts, step, self._sampler(policy, num_samples=num_samples), columns
                )
                theirs = None
                if against_reference:
                    ref, adapter_off = self._reference(policy)
                    with adapter_off:
                        theirs = self._rollout(
                            prompts, step, self._sampler(ref, num_samples=1), columns
                        )
                logps, ref_logps = self._logps(policy, mine)
            finally:
                policy.train(was_training)
        mask = mine.completion_mask
        scored = mine.wait_for_rewards()
        return Judged(
            prompts=list(prompts) * num_samples,
            completions=mine.completions,
            rewards=scored.combined,
            ref_rewards=None if theirs is None else theirs.wait_for_rewards().combined,
            per_source=scored.per_source,
            source_names=scored.names,
            kl=masked_sum(logps - ref_logps, mask),
            contain_eos=contains_eos(
                mine.completion_ids, mask, self.sampling.eos_token_ids
            ).float(),
        )

    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
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
        names: tuple[str, ...] = ()
        with self.evaluation_noise():
            for batch in self.get_eval_dataloader(dataset):
                judged = self.judge(list(batch["prompt"]), columns=batch)
                names = judged.source_names
                for name in ("rewards", "ref_rewards", "kl", "contain_eos", "per_source"):
                    # Per batch: gather_for_metrics drops the padding of the last one.
                    value = getattr(judged, name).to(self.args.device)
                    parts[name].append(self.accelerator.gather_for_metrics(value))
        rewards, ref_rewards, kl, contain_eos, per_source = (
            torch.cat(parts[n])
            for n in ("rewards", "ref_rewards", "kl", "contain_eos", "per_source")
        )
        wins = (rewards > ref_rewards).float() + 0.5 * (rewards == ref_rewards).float()
        prefix = metric_key_prefix
        metrics = {
            f"{prefix}_reward_mean": rewards.mean().item(),
            f"{prefix}_ref_reward_mean": ref_rewards.mean().item(),
            f"{prefix}_win_rate": wins.mean().item(),
            f"{prefix}_kl": kl.mean().item(),
            f"{prefix}_contain_eos_token": contain_eos.mean().item(),
            **reward_metrics(per_source, names, f"{prefix}_rewards/"),
            f"{prefix}_samples": float(rewards.numel()),
            f"{prefix}_runtime": time.perf_counter() - start,
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics

    @contextmanager
    def evaluation_noise(self) -> Iterator[None]:
        """Fixed sampling noise (from ``args.seed``), the training RNG left as it was: every
        evaluation of the same weights samples alike."""
        device_rng = [self.args.device] if self.args.device.type == "cuda" else []
        with torch.random.fork_rng(devices=device_rng):
            torch.manual_seed(self.args.seed + self.accelerator.process_index)
            yield
