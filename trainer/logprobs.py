"""Completion masks and per-token log-probs of completions under a causal LM."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import nn

logger = logging.getLogger(__name__)


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
    masked completion positions are meaningless: multiply by ``completion_mask``. The same
    values without padding: :func:`pack_completions` and :func:`packed_token_logps`.
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
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids,
        logits_to_keep=n + 1,
        use_cache=False,
    ).logits
    logits = logits[:, :-1].float()
    return token_logps(logits, completion_ids)


@dataclass
class PackedBatch:
    """A batch of prompts and completions as one row without padding."""

    input_ids: torch.Tensor  # [1, S]
    position_ids: torch.Tensor  # [1, S]: each prompt from 0, each completion after its prompt
    visible: torch.Tensor  # [S, S] bool: may the token of row q attend the token of column k
    predictors: torch.Tensor  # [M]: the token whose logits predict each kept completion token
    targets: torch.Tensor  # [M]: the kept completion tokens
    kept: torch.Tensor  # [N, T] bool: the completion mask, where the M log-probs go


def pack_completions(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    num_samples: int,
    max_length: int,
) -> PackedBatch:
    """Pack left-padded prompts and right-padded completions into one row: each prompt's real
    tokens once (cut to ``max_length`` as in :func:`completion_token_logps`), then the real
    tokens of each of its ``num_samples`` completions.

    Rows are in TRL's block layout (sample ``k`` of prompt ``i`` at row ``k·B + i``). A token
    sees the earlier tokens of its prompt and of its own completion only, so each completion
    gets the log-probs of its own padded row. ``predictors`` and ``targets`` follow the
    row-major order of ``completion_mask``'s ones.
    """
    n, t = completion_ids.shape
    prompt_ids, prompt_mask = left_truncate(prompt_ids, prompt_mask, t, max_length)
    if n % num_samples:
        raise ValueError(f"{n} completions are not {num_samples} per prompt")
    b = n // num_samples
    shared = all((x.view(num_samples, b, -1) == x[:b]).all() for x in (prompt_ids, prompt_mask))
    if not shared:
        raise ValueError("the completions of a prompt must share it (rows k·B + i, TRL's layout)")
    prompt_ids, prompt_mask = prompt_ids[:b], prompt_mask[:b]
    p = prompt_ids.shape[1]
    device = prompt_ids.device

    def per_prompt(x: torch.Tensor) -> torch.Tensor:
        return x.view(num_samples, b, t).transpose(0, 1).reshape(b, num_samples * t)

    # Per prompt, one line: [prompt | completion 0 | ... | completion K-1]; then drop padding.
    ids = torch.cat([prompt_ids, per_prompt(completion_ids)], 1)
    real = torch.cat([prompt_mask, per_prompt(completion_mask)], 1).bool()
    prompt_len = prompt_mask.sum(-1, keepdim=True)
    steps = torch.arange(t, device=device).repeat(num_samples)
    positions = torch.cat([prompt_mask.cumsum(-1) - 1, prompt_len + steps], 1)
    sample = torch.cat(
        [
            torch.full_like(prompt_ids, -1),
            torch.arange(num_samples, device=device).repeat_interleave(t).expand(b, -1),
        ],
        1,
    )
    group = torch.arange(b, device=device).unsqueeze(1).expand_as(ids)
    index = real.flatten().cumsum(0).view_as(real) - 1  # packed index of each real token
    pos, smp, grp = positions[real], sample[real], group[real]
    visible = (
        (grp[:, None] == grp[None, :])
        & (pos[None, :] <= pos[:, None])
        & ((smp[None, :] == -1) | (smp[None, :] == smp[:, None]))
    )
    # Completion token u is predicted by the token before it: the prompt's last (left padding:
    # the last column is real) for u = 0, else the completion's own token u - 1.
    completion_index = index[:, p:].view(b, num_samples, t)
    previous = torch.cat(
        [index[:, p - 1].view(b, 1, 1).expand(b, num_samples, 1), completion_index[:, :, :-1]], -1
    )
    kept = completion_mask.bool()
    predictors = previous.transpose(0, 1).reshape(n, t)[kept]
    return PackedBatch(
        ids[real].unsqueeze(0), pos.unsqueeze(0), visible, predictors, completion_ids[kept], kept
    )


def packed_token_logps(model: nn.Module, packed: PackedBatch) -> torch.Tensor:
    """:func:`completion_token_logps` of a :class:`PackedBatch`: ``[N, T]``, masked entries 0."""
    visible = packed.visible[None, None]
    if attention_implementation(model) == "eager":  # adds the mask to the scores
        dtype = next(model.parameters()).dtype
        visible = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(dtype).min
        )
    logits = model(
        input_ids=packed.input_ids,
        attention_mask=visible,
        position_ids=packed.position_ids,
        logits_to_keep=packed.predictors,
        use_cache=False,
    ).logits[0]
    picked = token_logps(logits.float(), packed.targets)
    zeros = torch.zeros(packed.kept.shape, dtype=picked.dtype, device=picked.device)
    return zeros.masked_scatter(packed.kept, picked)


def attention_implementation(model: nn.Module) -> str | None:
    """The model's attention implementation (``sdpa``, ``eager``, ...), through a DDP wrapper."""
    config = getattr(model, "config", None) or getattr(
        getattr(model, "module", None), "config", None
    )
    return getattr(config, "_attn_implementation", None)


@torch.no_grad()
def packing_is_exact(model: nn.Module) -> bool:
    """Does ``model`` honour :func:`pack_completions`' attention mask? (Flash attention, or an
    architecture whose mask ignores a custom one, would not.)

    Two prompts with two completions each, packed three times: as they are, with prompt 0's
    first completion changed (its sibling and prompt 1's completions must keep their
    log-probs), and with prompt 0 changed (every log-prob of its second completion must move,
    prompt 1's must not).
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings

    def tokens(*rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, device=device) % vocab

    prompts = tokens([0, 5, 6, 7], [8, 9, 10, 11], [0, 5, 6, 7], [8, 9, 10, 11])
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[[0, 2], 0] = 0  # a left-padded prompt
    completions = tokens([12, 13, 14], [15, 16, 17], [18, 19, 20], [21, 22, 23])
    mask = torch.ones_like(completions)
    other_completion = completions.clone()
    other_completion[0] = tokens([24, 25, 26])[0]
    other_prompt = prompts.clone()
    other_prompt[[0, 2], 1:] = tokens([27, 28, 29])[0]
    was_training = model.training
    model.eval()  # dropout would differ between the passes
    try:
        base, completion_changed, prompt_changed = (
            packed_token_logps(model, pack_completions(p, prompt_mask, c, mask, 2, 16))
            for p, c in (
                (prompts, completions),
                (prompts, other_completion),
                (other_prompt, completions),
            )
        )
    finally:
        model.train(was_training)

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.allclose(a, b, rtol=0, atol=1e-5)

    return (
        same(completion_changed[1:], base[1:])
        and same(prompt_changed[[1, 3]], base[[1, 3]])
        and bool((prompt_changed[2] != base[2]).all())
    )


def resolve_padding_free(model: nn.Module, wanted: bool | None, on_cpu: bool) -> bool:
    """``padding_free`` for ``model``: ``None`` means on for CPU training; off (with a warning)
    when the model does not honour the packed batch's attention mask, where ``True`` is
    refused."""
    if not (on_cpu if wanted is None else wanted):
        return False
    if packing_is_exact(model):
        return True
    problem = (
        f"{type(model).__name__} with {attention_implementation(model)} attention does not "
        "keep packed sequences apart (it ignores a custom attention mask)"
    )
    if wanted:
        raise ValueError(f"padding_free=True: {problem}; set padding_free=False")
    logger.warning("padding_free off: %s", problem)
    return False


def token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., ids]`` without materialising the full log-softmax."""
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension of the entries where ``mask`` is 1."""
    return (values * mask).sum(-1)


class TokenBatch(Protocol):
    """Prompts and completions in TRL's block layout (sample ``k`` of prompt ``i`` at row
    ``k·B + i``): :class:`~trainer.generation.Samples` and the trainer's rollouts."""

    prompt_ids: torch.Tensor  # [K·B, P], left-padded
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # [K·B, T], right-padded
    completion_mask: torch.Tensor


@dataclass(frozen=True)
class TokenRows:
    """A :class:`TokenBatch` made of some prompts' rows of another (:meth:`of_prompts`)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    @classmethod
    def of_prompts(cls, batch: TokenBatch, num_samples: int, prompts: range) -> TokenRows:
        """The rows of ``batch``'s prompts ``prompts`` (all ``num_samples`` of each)."""
        rows = partial(prompt_rows, num_samples=num_samples, prompts=prompts)
        return cls(
            rows(batch.prompt_ids), rows(batch.prompt_mask), rows(batch.completion_ids),
            rows(batch.completion_mask),
        )  # fmt: skip


def prompt_rows(x: torch.Tensor, num_samples: int, prompts: range) -> torch.Tensor:
    """The rows of the prompts ``prompts`` (indices ``i``, all ``K`` samples of each) of a
    ``[K·B, ...]`` tensor in block layout: ``[K·len(prompts), ...]``, in block layout."""
    return x.unflatten(0, (num_samples, -1))[:, prompts.start : prompts.stop].flatten(0, 1)


def join_prompt_rows(first: torch.Tensor, second: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The rows of two consecutive prompt ranges (block layout each) as one block-layout
    tensor: :func:`prompt_rows` undone."""
    parts = [x.unflatten(0, (num_samples, -1)) for x in (first, second)]
    return torch.cat(parts, 1).flatten(0, 1)


@dataclass(frozen=True)
class LogProbPass:
    """How the step computes per-token log-probs of a :class:`TokenBatch`: packed into one
    row (``padding_free``) or padded, the prompt cut to fit ``max_length``. The trainer and
    the rollout process (which may run the reference pass) share it, so both compute the same
    numbers."""

    padding_free: bool
    max_length: int

    def pack(self, samples: TokenBatch, num_samples: int) -> PackedBatch | None:
        """The packed batch of ``samples``, ``num_samples`` per prompt (``None`` unless
        ``padding_free``): built once for the policy's and the reference's pass."""
        if not self.padding_free:
            return None
        return pack_completions(
            samples.prompt_ids, samples.prompt_mask, samples.completion_ids,
            samples.completion_mask, num_samples, self.max_length,
        )  # fmt: skip

    def token_logps(
        self, model: nn.Module, samples: TokenBatch, packed: PackedBatch | None = None
    ) -> torch.Tensor:
        """``[N, T]`` log-probs of ``samples``' completion tokens under ``model`` (masked
        entries 0), from ``packed`` when given."""
        if packed is not None:
            return packed_token_logps(model, packed)
        return completion_token_logps(
            model, samples.prompt_ids, samples.prompt_mask, samples.completion_ids,
            samples.completion_mask, self.max_length,
        )  # fmt: skip

    def reference_logps(
        self, reference: nn.Module, samples: TokenBatch, packed: PackedBatch | None = None
    ) -> torch.Tensor:
        """:meth:`token_logps` under the frozen ``reference``, without autograd, as a normal
        tensor (the loss's graph may use it)."""
        with torch.inference_mode():
            logps = self.token_logps(reference, samples, packed)
        return logps.clone()

    def complete_reference(
        self,
        reference: nn.Module,
        samples: TokenBatch,
        num_samples: int,
        done: torch.Tensor | None,
        packed: PackedBatch | None = None,
    ) -> torch.Tensor:
        """The reference's log-probs of all ``samples`` (``[K·B, T]``), those of the first
        prompts given (``done``: ``[K·n, T]``, computed by the rollout process; ``None``:
        none). The other prompts' pass runs here, from ``packed`` (all of ``samples``
        packed) when none were given."""
        if done is None:
            return self.reference_logps(reference, samples, packed)
        num_prompts = samples.completion_ids.shape[0] // num_samples
        first = done.shape[0] // num_samples
        if first == num_prompts:
            return done
        rest = TokenRows.of_prompts(samples, num_samples, range(first, num_prompts))
        computed = self.reference_logps(reference, rest, self.pack(rest, num_samples))
        return join_prompt_rows(done, computed, num_samples)
