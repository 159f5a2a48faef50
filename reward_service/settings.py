"""Reward service settings: ``REWARD_*`` environment variables or ``reward-service`` flags."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Everything the service needs to load its model, batch requests and listen."""

    model_config = SettingsConfigDict(
        env_prefix="REWARD_",
        extra="ignore",
        cli_kebab_case=True,
        cli_hide_none_type=True,
        cli_implicit_flags=True,
        cli_prog_name="reward-service",
    )

    model: str = Field(
        description="Sequence-classification model: a local directory or a hub id.",
    )
    served_model_name: str | None = Field(
        default=None,
        description="The model's name in answers and the name that vLLM-style requests must "
        "give as 'model' (default: the last part of --model).",
    )
    revision: str | None = Field(
        default=None,
        description="Hub revision of the model (and of its tokenizer): a branch, tag or commit.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run the modeling code a checkpoint ships (its config's auto_map); only "
        "for checkpoints you trust.",
    )
    tokenizer: str | None = Field(
        default=None, description="Tokenizer directory or hub id (default: the model's)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="float32", description="Weights dtype; 'auto' takes the one saved in the config."
    )
    attn_implementation: str | None = Field(
        default=None,
        description="Attention kernel, as transformers names it: 'eager', 'sdpa', "
        "'flash_attention_2'... (default: transformers' choice for the model).",
    )
    device: str = Field(default="auto", description="'auto' (cuda if present), 'cpu', 'cuda:0'...")
    device_map: Literal["auto"] | None = Field(
        default=None,
        description="'auto': let accelerate spread the model over the GPUs (and CPU) there are, "
        "for a model too large for one; instead of --device.",
    )
    max_length: int | None = Field(
        default=None,
        gt=1,
        description="Max tokens per item (default: the model's max positions / tokenizer limit).",
    )
    truncation_side: Literal["left", "right", "error"] = Field(
        default="left",
        description="Over-long items: 'left' drops the start (keeps the end, where the reward is "
        "read), 'right' drops the end, 'error' rejects the request with 422.",
    )
    max_batch_size: int = Field(default=64, gt=0, description="Max items per forward pass.")
    max_batch_tokens: int = Field(
        default=16384, gt=0, description="Max padded tokens (items x longest) per forward pass."
    )
    max_wait_ms: float = Field(
        default=5.0,
        ge=0,
        description="Longest wait for more requests before a micro-batch runs (only when the "
        "previous round was larger than what is queued, i.e. under concurrent load).",
    )
    max_queue_items: int = Field(
        default=4096, gt=0, description="Items waiting to be scored before 429 is returned."
    )
    max_items_per_request: int = Field(default=1024, gt=0, description="More items: 413.")
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0, description="Larger body: 413.")
    score_label: int | str = Field(
        default=0, description="Head output (index or id2label name) used as the score."
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="If set, every route except /health, /ready and /metrics (the docs and "
        "/openapi.json included) needs 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.",
    )
    host: str = Field(default="127.0.0.1", description="Interface to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on.")
    num_threads: int | None = Field(
        default=None, gt=0, description="torch intra-op threads (default: torch's choice)."
    )
    forward_process: bool = Field(
        default=True,
        description="Run the model in a child process of its own, so forward passes and the "
        "HTTP event loop never wait for each other's GIL. Off: in a thread of the server.",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the model (dynamic shapes) at load: start-up takes longer "
        "(the warm-up compiles), each forward pass has less framework overhead, which small "
        "models and small batches feel most.",
    )
    drain_timeout_s: float = Field(
        default=30.0, gt=0, description="On SIGTERM, how long in-flight requests may finish."
    )
    parent_pid: int | None = Field(
        default=None,
        gt=0,
        description="Shut down (draining first) as soon as this process, the one that started "
        "the service, is gone, even if it was killed with SIGKILL.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = Field(default=False, description="Log one line per HTTP request.")

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, key: SecretStr | None) -> SecretStr | None:
        # A blank key would lock everyone out; more likely an unset variable than a choice.
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("the API key is empty; unset it to serve without a key")
        return key

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.max_items_per_request > self.max_queue_items:
            raise ValueError(
                f"max_items_per_request ({self.max_items_per_request}) must not exceed "
                f"max_queue_items ({self.max_queue_items})"
            )
        if self.device_map is not None and self.device != "auto":
            raise ValueError(
                f"device ({self.device!r}) and device_map ({self.device_map!r}) both place the "
                "model: give one of them"
            )
        if self.served_model_name is None:
            self.served_model_name = PurePosixPath(self.model.rstrip("/")).name or self.model
        return self
