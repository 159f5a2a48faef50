"""Evaluation on held-out prompts: the policy's samples judged by the reward service, their KL
to the reference, and their win rate against the reference's samples.

:class:`HeldOutEvaluation` is ``Trainer.evaluate`` in those terms; the trainer supplies
:meth:`~HeldOutEvaluation.judge` (sample and score one batch). The demo's before/after table
judges through the same method.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import Trainer

from trainer.generation import Prompt


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


class HeldOutEvaluation(Trainer):
    """``Trainer.evaluate``: the reward of the policy's samples on held-out prompts and their
    win rate against the reference model's samples (ties count half), both judged by the
    reward service, with the KL and the share of completions that end with an EOS."""

    def judge(
        self, prompts: list[Prompt], num_samples: int = 1, against_reference: bool = True
    ) -> Judged:
        """``num_samples`` samples of the policy per prompt, judged, with (if
        ``against_reference``) one judged sample of the reference per prompt."""
        raise NotImplementedError

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
        with self.evaluation_noise():
            for batch in self.get_eval_dataloader(dataset):
                judged = self.judge(list(batch["prompt"]))
                for name in ("rewards", "ref_rewards", "kl", "contain_eos"):
                    # Per batch: gather_for_metrics drops the padding of the last one.
                    value = getattr(judged, name).to(self.args.device)
                    parts[name].append(self.accelerator.gather_for_metrics(value))
        rewards, ref_rewards, kl, contain_eos = (
            torch.cat(parts[n]) for n in ("rewards", "ref_rewards", "kl", "contain_eos")
        )
        wins = (rewards > ref_rewards).float() + 0.5 * (rewards == ref_rewards).float()
        prefix = metric_key_prefix
        metrics = {
            f"{prefix}_reward_mean": rewards.mean().item(),
            f"{prefix}_ref_reward_mean": ref_rewards.mean().item(),
            f"{prefix}_win_rate": wins.mean().item(),
            f"{prefix}_kl": kl.mean().item(),
            f"{prefix}_contain_eos_token": contain_eos.mean().item(),
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
