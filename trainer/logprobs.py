"""Completion masks and per-token log-probs of completions under a causal LM."""

from __future__ import annotations

import torch
from torch import nn


def truncate_after_eos(
    completion_ids: torch.Tensor, eos_token_ids: list[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each completion after its first EOS (kept): later tokens become padding.

    Returns the cut ids and the completion mask (1 up to and including the first EOS).
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    ids = completion_ids.masked_fill(after_eos, pad_token_id)
    return ids, (~after_eos).long()


def contains_eos(
    completion_ids: torch.Tensor, completion_mask: torch.Tensor, eos_token_ids: list[int]
) -> torch.Tensor:
    """Per row: does the completion (within its mask) end with an EOS? Padding never counts,
    even when the pad token is also the EOS token."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    return (is_eos & completion_mask.bool()).any(-1)


def left_truncate(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_len: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leftmost prompt columns so prompt + completion fits ``max_length``.

    At least one prompt column always stays: the first completion token's log-prob is read
    from the logits at the last prompt position.
    """
    if completion_len >= max_length:
        raise ValueError(
            f"completions of {completion_len} tokens leave no room for the prompt within "
            f"max_length={max_length}; raise max_length above max_new_tokens"
        )
    cut = max(prompt_ids.shape[1] + completion_len - max_length, 0)
    return prompt_ids[:, cut:], prompt_mask[:, cut:]


def completion_token_logps(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    max_length: int,
) -> torch.Tensor:
    """Log-probs (temperature 1) of each completion token given everything before it: ``[N, T]``.

    Position ids follow the attention mask, as in ``generate`` with left padding. Entries at
    masked completion positions are meaningless: multiply by ``completion_mask``.
    """
    prompt_ids, prompt_mask = left_truncate(
        prompt_ids, prompt_mask, completion_ids.shape[1], max_length
    )
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    n = completion_ids.shape[1]
    # Only the logits that predict completion tokens (position t predicts token t + 1): the
    # LM head never runs over the prompt.
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=n + 1
    ).logits
    logits = logits[:, :-1].float()
    return token_logps(logits, completion_ids)


def token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., ids]`` without materialising the full log-softmax."""
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension of the entries where ``mask`` is 1."""
    return (values * mask).sum(-1)
