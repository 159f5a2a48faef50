"""What a run records: each step's metrics (TRL's names) and the reward client's events."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.logprobs import masked_sum
from trainer.losses import Pairs
from trainer.rollouts import Rollout

logger = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"


@dataclass(frozen=True)
class StepRecord:
    """What one step computed: its rollout, the rewards it paired on (less the missing-EOS
    penalty), the pairs, and the per-token log-probs with their sequence sums."""

    rollout: Rollout
    rewards: torch.Tensor  # [K·B]
    contain_eos: torch.Tensor  # [K·B] bool
    pairs: Pairs
    logps: torch.Tensor  # [K·B, T], the policy's (with gradients)
    ref_logps: torch.Tensor  # [K·B, T]
    seq: torch.Tensor  # [K·B]: logps summed over each completion
    ref_seq: torch.Tensor
    beta: float


@torch.no_grad()
def step_metrics(step: StepRecord) -> dict[str, torch.Tensor]:
    """TRL's step metrics, per sample or per pair (the caller averages them). Padding after
    EOS is left out of the KL and the entropy."""
    mask, rewards, pairs, beta = step.rollout.completion_mask, step.rewards, step.pairs, step.beta
    seq, ref_seq = step.seq.detach(), step.ref_seq
    # Summed per token, as TRL does (seq - ref_seq would round differently).
    kl = masked_sum(step.logps.detach() - step.ref_logps, mask)
    non_score = -beta * kl
    chosen_rewards = beta * (seq[pairs.chosen] - ref_seq[pairs.chosen])
    rejected_rewards = beta * (seq[pairs.rejected] - ref_seq[pairs.rejected])
    margins = chosen_rewards - rejected_rewards
    return {
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
        "val/contain_eos_token": step.contain_eos.float(),
        "val/completion_length": mask.sum(-1).float(),
        "val/tied_pairs": pairs.tied.float(),
    }


class RewardEvents:
    """Reward client events (a redeployed reward model, retries) into
    ``OUTPUT_DIR/events.jsonl`` (written by the main process only). Model changes are
    logged and counted per source by ``trainer.rewards.ModelChangePolicy``."""

    def __init__(self, output_dir: str, step: Callable[[], int], writes: bool) -> None:
        self.path = Path(output_dir) / EVENTS_FILE
        self._step = step
        self._writes = writes

    def __call__(self, name: str, payload: dict[str, Any]) -> None:
        if name == "reward_retry":
            logger.info("reward request retry: %s", payload)
        if self._writes:
            record = {"event": name, "step": self._step(), "time": time.time()}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({**record, **payload}) + "\n")
