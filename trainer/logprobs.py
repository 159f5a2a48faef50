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
    padding_free: bool = False,
) -> torch.Tensor:
    """Log-probs (temperature 1) of each completion token given everything before it: ``[N, T]``.

    Position ids follow the attention mask, as in ``generate`` with left padding. Entries at
    masked completion positions are meaningless: multiply by ``completion_mask``. With
    ``padding_free`` the sequences run as one packed row without their padding (see
    :func:`packed_token_logps`): the same values, less compute.
    """
    prompt_ids, prompt_mask = left_truncate(
        prompt_ids, prompt_mask, completion_ids.shape[1], max_length
    )
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    if padding_free:
        return packed_token_logps(model, ids, mask, position_ids, completion_ids, completion_mask)
    n = completion_ids.shape[1]
    # Only the logits that predict completion tokens (position t predicts token t + 1): the
    # LM head never runs over the prompt.
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids,
        logits_to_keep=n + 1,
        use_cache=False,
    ).logits
    logits = logits[:, :-1].float()
    return token_logps(logits, completion_ids)


def packed_token_logps(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    position_ids: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """:func:`completion_token_logps` over the unpadded tokens of ``ids`` packed into one row.

    Position ids restarting at 0 mark where each sequence begins; without an attention mask
    transformers turns them into a block-diagonal causal mask (or flash-attention's
    variable-length kernel), so each sequence sees only itself. Masked entries are 0.
    """
    real = mask.bool()
    packed_index = real.flatten().cumsum(0).view_as(mask) - 1
    # Completion token t is predicted by the logits of column P + t - 1 (the last prompt token
    # for t = 0); a kept token's predictor is always a real token.
    kept = completion_mask.bool()
    predictors = packed_index[:, ids.shape[1] - completion_ids.shape[1] - 1 : -1][kept]
    logits = model(
        input_ids=ids[real].unsqueeze(0),
        position_ids=position_ids[real].unsqueeze(0),
        logits_to_keep=predictors,
        use_cache=False,
    ).logits[0]
    picked = token_logps(logits.float(), completion_ids[kept])
    return torch.zeros(kept.shape, dtype=picked.dtype, device=picked.device).masked_scatter(
        kept, picked
    )


@torch.no_grad()
def packing_keeps_sequences_apart(model: nn.Module) -> bool:
    """Does ``model`` attend only within each packed sequence? A model whose attention mask
    ignores restarting position ids would let packed sequences see each other.

    Packs ``A + B`` and ``A' + B`` (``A'`` other tokens of ``A``'s length): ``B``'s logits
    must not change.
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    first, second = torch.arange(2, 8) % vocab, torch.arange(9, 15) % vocab
    tail = torch.arange(3, 8) % vocab
    positions = torch.cat([torch.arange(6), torch.arange(5)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()  # dropout would differ between the two passes
    logits = []
    try:
        for head in (first, second):
            ids = torch.cat([head, tail]).unsqueeze(0).to(device)
            out = model(input_ids=ids, position_ids=positions, use_cache=False)
            logits.append(out.logits[0, 6:].float())
    finally:
        model.train(was_training)
    return torch.allclose(logits[0], logits[1], rtol=0, atol=1e-4)


def token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., ids]`` without materialising the full log-softmax."""
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension of the entries where ``mask`` is 1."""
    return (values * mask).sum(-1)
