"""The math of one online DPO step, as pure tensor functions (tested against the formulas)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def dpo_losses(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """Per-pair losses from sequence log-probs.

    ``logits = (π_c − π_r) − (ref_c − ref_r)``; sigmoid: ``−logσ(β·logits)``;
    IPO: ``(logits − 1/(2β))²``.
    """
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")


@dataclass(frozen=True)
class Pairs:
    """Indices into the ``K·B`` samples (block layout: sample ``k`` of prompt ``i`` is
    ``k·B + i``) of each prompt's chosen and rejected sample."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    tied: torch.Tensor  # bool per prompt: chosen and rejected rewards are equal


def select_pairs(rewards: torch.Tensor, num_samples: int) -> Pairs:
    """Best vs worst sample of each prompt.

    Chosen is the first sample with the highest reward, rejected the last one with the lowest,
    so with two samples this is TRL's rule (``first >= second`` picks the first; a tie pairs
    sample 0 as chosen against sample 1).
    """
    if rewards.dim() != 1 or rewards.numel() % num_samples:
        raise ValueError(f"expected K·B rewards for K={num_samples}, got {tuple(rewards.shape)}")
    batch = rewards.numel() // num_samples
    grid = rewards.view(num_samples, batch)  # [K, B]
    best = grid.argmax(0)  # first maximum
    flipped = grid.flip(0).argmin(0)  # first minimum from the end = last minimum
    worst = num_samples - 1 - flipped
    columns = torch.arange(batch, device=rewards.device)
    tied = grid[best, columns] == grid[worst, columns]
    return Pairs(chosen=best * batch + columns, rejected=worst * batch + columns, tied=tied)


def beta_for_epoch(beta: float | list[float], epoch: float | None) -> float:
    """β of the current epoch: the list's entry at the epoch's integer part, then the last one."""
    if not isinstance(beta, list):
        return float(beta)
    index = int(epoch or 0)
    return float(beta[min(index, len(beta) - 1)])
