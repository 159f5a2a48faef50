"""The policy and the reference model: loaded by name with TRL's ``model_init_kwargs`` and
``trust_remote_code``, wrapped with a PEFT adapter, dropout off, pad and EOS tokens set."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from trainer.config import OnlineDPOConfig


def load_causal_lm(name: str, args: OnlineDPOConfig, argument: str) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(name)`` with ``args.model_init_kwargs`` and
    ``args.trust_remote_code`` (a ``trust_remote_code`` in the kwargs wins, as in TRL). A
    model that cannot be loaded is a one-line ``ValueError`` naming ``argument``."""
    kwargs = dict(args.model_init_kwargs or {})
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{argument} {name!r}: cannot load the model: {reason}") from e


def prepare_models(
    model: PreTrainedModel | str,
    ref_model: PreTrainedModel | str | None,
    args: OnlineDPOConfig,
    peft_config: Any | None,
) -> tuple[nn.Module, nn.Module | None]:
    """The policy to train and the frozen reference: models given by name are loaded; with
    ``ref_model=None`` the reference is a copy of the policy, or, with a PEFT adapter, no
    model at all (the policy with its adapter disabled); dropout off if asked."""
    if args.model_init_kwargs and not isinstance(model, str):
        raise ValueError("model_init_kwargs apply only when model is a name or path")
    if isinstance(model, str):
        model = load_causal_lm(model, args, "model")
    if isinstance(ref_model, str):
        ref_model = load_causal_lm(ref_model, args, "ref_model")
    if ref_model is model:
        raise ValueError("model and ref_model must be different objects (or ref_model=None)")
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    if ref_model is None and not hasattr(model, "disable_adapter"):
        ref_model = copy.deepcopy(model)
    if ref_model is not None:
        ref_model.eval().requires_grad_(False)
    if args.disable_dropout:
        disable_dropout(model)
        if ref_model is not None:
            disable_dropout(ref_model)
    return model, ref_model


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def end_of_completion_tokens(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Set the pad token (the EOS if the tokenizer has none) on the tokenizer and the model;
    return the tokens that end a completion: the tokenizer's EOS and every EOS the model
    declares (e.g. an end-of-turn token)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    declared = model.generation_config.eos_token_id
    declared = [] if declared is None else [declared] if isinstance(declared, int) else declared
    return list(dict.fromkeys([tokenizer.eos_token_id, *declared]))
