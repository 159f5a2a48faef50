"""Wire types of the reward service HTTP API, shared by the service and its clients."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class Message(BaseModel):
    """One chat message, as in the OpenAI / Hugging Face chat format."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


# Validation stops at the first bad message: a body with millions of bad entries would otherwise
# take minutes to list them all (the service answers 422 naming the first one).
MessageList = Annotated[list[Message], Field(fail_fast=True)]


class ScoreItem(BaseModel):
    """One thing to score, in exactly one of three forms.

    - ``{"text": "..."}``: scored as is.
    - ``{"prompt": "...", "completion": "..."}``: the two strings are concatenated, as TRL does.
    - ``{"messages": [...]}`` or ``{"prompt": [...messages], "completion": "..."}``: rendered
      with the reward tokenizer's own chat template on the server.
    """

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    prompt: str | MessageList | None = None
    completion: str | None = None
    messages: MessageList | None = None

    @model_validator(mode="after")
    def _exactly_one_form(self) -> ScoreItem:
        forms = [
            self.text is not None,
            self.prompt is not None or self.completion is not None,
            self.messages is not None,
        ]
        if sum(forms) != 1:
            raise ValueError("give exactly one of 'text', 'prompt' + 'completion', or 'messages'")
        if forms[1] and (self.prompt is None or self.completion is None):
            raise ValueError("'prompt' and 'completion' must be given together")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("'prompt' as a message list must not be empty")
        return self

    @property
    def is_conversational(self) -> bool:
        return self.messages is not None or isinstance(self.prompt, list)


class ScoreRequest(BaseModel):
    """Body of ``POST /score``."""

    model_config = ConfigDict(extra="forbid")

    items: list[ScoreItem] = Field(min_length=1)
    label: int | str | None = Field(
        default=None,
        description=(
            "For multi-label heads: the label (index or name from the model's id2label) whose "
            "logit is the score. Defaults to the service's configured label (0)."
        ),
    )
    return_logits: bool = Field(
        default=False, description="Also return every head logit of every item."
    )


class ScoreResponse(BaseModel):
    """Body of a successful ``POST /score``: one entry per item, in input order."""

    scores: list[float]
    num_tokens: list[int]
    truncated: list[bool]
    model_id: str
    weights_hash: str
    logits: list[list[float]] | None = None


class GetRewardRequest(BaseModel):
    """OpenRLHF-compatible body of ``POST /get_reward``: full texts to score, with the prompts
    and labels OpenRLHF's remote reward client sends beside them (checked, not used).

    ``query`` may be empty: OpenRLHF given several reward URLs sends empty lists to all but the
    first, and its run fails unless each answers."""

    model_config = ConfigDict(extra="forbid")

    query: list[str]
    prompts: list[Any] | None = Field(
        default=None, description="Each query's prompt (OpenRLHF sends them; not used)."
    )
    labels: list[Any] | None = Field(
        default=None, description="Each query's label, any JSON value (not used)."
    )

    @field_validator("prompts", "labels")
    @classmethod
    def _one_per_query(cls, values: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        query = info.data.get("query")
        if values is not None and query is not None and len(values) != len(query):
            raise ValueError(f"{len(values)} entries for {len(query)} queries; give one per query")
        return values


class GetRewardResponse(BaseModel):
    """OpenRLHF-compatible response: ``rewards`` and ``scores`` hold the same values (raw head
    outputs, as OpenRLHF's ``serve_rm`` answers); ``extra_logs`` is empty."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = Field(default_factory=dict)


class InfoResponse(BaseModel):
    """Body of ``GET /info``: what model is served and how requests are batched."""

    model_id: str
    weights_hash: str
    dtype: str
    device: str
    num_labels: int
    id2label: dict[int, str]
    score_label: int
    max_length: int
    truncation_side: Literal["left", "right", "error"]
    max_batch_size: int
    max_batch_tokens: int
    max_items_per_request: int
    has_chat_template: bool
    compiled: bool = Field(default=False, description="Whether the model runs torch.compile'd.")
    # Optional, so that a client also reads /info from a service older than these fields.
    forward_fixed_ms: float | None = Field(
        default=None,
        description="A forward pass's fixed cost, fitted at warm-up (with forward_per_token_us, "
        "it decides how many micro-batches a round of queued items becomes).",
    )
    forward_per_token_us: float | None = Field(
        default=None, description="A forward pass's cost per padded token, fitted at warm-up."
    )
    served_model_name: str | None = Field(
        default=None, description="The name that vLLM-style requests give as 'model'."
    )
    revision: str | None = Field(default=None, description="The model's hub revision, if set.")
    trust_remote_code: bool = Field(
        default=False, description="Whether the checkpoint's own modeling code may run."
    )
    attn_implementation: str | None = Field(
        default=None, description="The attention kernel the model runs with."
    )
    device_map: str | None = Field(
        default=None, description="'auto' when accelerate placed the model (else see device)."
    )


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    """The one error envelope of every non-2xx answer."""

    error: ErrorDetail
