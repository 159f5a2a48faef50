"""Loading the reward model and its tokenizer with the service's loading options (revision,
remote code, dtype, attention kernel, device map), under the names transformers uses."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from reward_service.settings import ServiceSettings

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RemoteCodeRefused(ValueError):
    """The checkpoint needs modeling code of its own, and ``trust_remote_code`` is off."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"{model!r} ships its own modeling code (auto_map in its config); pass "
            "--trust-remote-code (REWARD_TRUST_REMOTE_CODE=true) to run it, if you trust it"
        )


def _source_kwargs(settings: ServiceSettings, tokenizer: bool = False) -> dict[str, Any]:
    """Where the files come from and whether their code may run. The revision is the model's:
    a separate ``--tokenizer`` is loaded at its default revision."""
    revision = None if tokenizer and settings.tokenizer else settings.revision
    return {"revision": revision, "trust_remote_code": settings.trust_remote_code}


def load_tokenizer(settings: ServiceSettings) -> Any:
    """The tokenizer: ``--tokenizer``, else the model's own."""
    name = settings.tokenizer or settings.model
    try:
        return AutoTokenizer.from_pretrained(name, **_source_kwargs(settings, tokenizer=True))
    except ValueError as exc:
        raise _refused(exc, name, settings) from None


def load_model(settings: ServiceSettings) -> PreTrainedModel:
    """The sequence-classification model, on the device map if one is set (else on the CPU:
    the caller moves it to its device)."""
    kwargs = _source_kwargs(settings)
    kwargs["dtype"] = "auto" if settings.dtype == "auto" else _DTYPES[settings.dtype]
    if settings.attn_implementation is not None:
        kwargs["attn_implementation"] = settings.attn_implementation
    if settings.device_map is not None:
        kwargs["device_map"] = settings.device_map
    try:
        return AutoModelForSequenceClassification.from_pretrained(settings.model, **kwargs)
    except ValueError as exc:
        raise _refused(exc, settings.model, settings) from None


def remote_code_refusal(settings: ServiceSettings) -> RemoteCodeRefused | None:
    """Whether loading will stop for want of ``--trust-remote-code``, found from the model's
    config alone (no weights read, no code run), so the CLI can say so before it serves.
    Other problems with the config are left to the load, which reports them."""
    if settings.trust_remote_code:
        return None
    try:
        AutoConfig.from_pretrained(settings.model, **_source_kwargs(settings))
    except ValueError as exc:
        refused = _refused(exc, settings.model, settings)
        return refused if isinstance(refused, RemoteCodeRefused) else None
    except Exception:
        return None
    return None


def _refused(exc: ValueError, name: str, settings: ServiceSettings) -> ValueError:
    """transformers' refusal to run a checkpoint's code, said with the service's flag."""
    if not settings.trust_remote_code and "trust_remote_code=True" in str(exc):
        return RemoteCodeRefused(name)
    return exc
