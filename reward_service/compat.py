"""Routes in other serving tools' shapes, so their clients can use this service unchanged.

- vLLM's pooling API for sequence classification (vLLM 0.33: ``vllm/entrypoints/pooling/``):
  ``POST /classify``, ``POST /pooling``, ``GET /v1/models``, with vLLM's request fields, answers
  and error shape ``{"error": {"message", "type", "param", "code"}}``. One difference: the
  values are the raw head logits unless the request sets ``use_activation: true`` (vLLM applies
  its activation unless ``use_activation: false``), as the service's own ``/score`` answers.
- text-embeddings-inference's ``POST /predict`` (TEI ``router/src/http/types.rs`` and
  ``server.rs``): ``inputs`` as a text, a ``[text, text_pair]`` pair or a batch of those,
  ``raw_scores`` (false: sigmoid for one label, softmax for several, as TEI), ``truncate``,
  ``truncation_direction``; answers ``[{"score", "label"}]`` sorted by score, errors
  ``{"error", "error_type"}`` with TEI's statuses (422 for too many or too long inputs).

Every route has the limits, API key, metrics and batching of ``/score``: each is a scoring route
(:data:`SCORING_ROUTES`) over :class:`~reward_service.routes.ScoringCall`.
"""

from __future__ import annotations

import base64
import itertools
import math
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import torch
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from reward_service.errors import ApiError
from reward_service.routes import (
    ScoringCall,
    ScoringRoute,
    json_response,
    service,
    with_error_shape,
)
from reward_service.scorer import Scorer, Text, TruncationSide

# ----------------------------------------------------------------------------- activations


def sigmoid(x: float) -> float:
    """The logistic function, without overflow for large negative ``x``."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def softmax(xs: Sequence[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def vllm_activation(logits: Sequence[float], problem_type: str | None) -> list[float]:
    """vLLM's classify activation (``get_act_fn``, as transformers' losses): none for a
    regression head, sigmoid for one label or multi-label heads, else softmax."""
    if problem_type == "regression":
        return list(logits)
    if len(logits) == 1 or problem_type == "multi_label_classification":
        return [sigmoid(x) for x in logits]
    return softmax(logits)


def tei_activation(logits: Sequence[float]) -> list[float]:
    """TEI's ``raw_scores: false``: sigmoid for one label, softmax for several."""
    return [sigmoid(logits[0])] if len(logits) == 1 else softmax(logits)


def _finite(rows: Sequence[Sequence[float]]) -> None:
    if not all(math.isfinite(x) for row in rows for x in row):
        raise ApiError(500, "non_finite_score", "the model produced a non-finite score (NaN)")


def _default_side(scorer: Scorer) -> Literal["left", "right"]:
    """The service's truncation side, or 'left' (keep the end) where it rejects instead."""
    return "left" if scorer.truncation_side == "error" else scorer.truncation_side


# ----------------------------------------------------------------------------- vLLM
# The dtypes of a base64 /pooling answer that the service writes.
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_VLLM_TYPES = {  # our error type -> (status, vLLM's type)
    "validation_error": (400, "Bad Request"),
    "invalid_json": (400, "Bad Request"),
    "invalid_encoding": (400, "Bad Request"),
    "unsupported_media_type": (400, "Bad Request"),
    "bad_request": (400, "BadRequestError"),
    "too_long": (400, "BadRequestError"),
    "model_not_found": (404, "NotFoundError"),
    "too_many_items": (413, "Payload Too Large"),
    "body_too_large": (413, "Payload Too Large"),
    "queue_full": (429, "Too Many Requests"),
}


def vllm_error(exc: ApiError) -> JSONResponse:
    """vLLM's error shape (since v0.10.1): 400 for any invalid body, HTTP phrases as types
    where vLLM answers an HTTP error, ``param`` naming the field."""
    status, type_ = _VLLM_TYPES.get(exc.type, (exc.status, ""))
    if not type_:
        type_ = "Service Unavailable" if status == 503 else "InternalServerError"
    body = {"error": {"message": exc.message, "type": type_, "param": exc.param, "code": status}}
    return JSONResponse(body, status_code=status, headers=exc.headers)


class VllmTextPart(BaseModel):
    """An OpenAI message content part; only text parts are scored."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class VllmMessage(BaseModel):
    """An OpenAI chat message (extra fields such as ``name`` are ignored)."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[VllmTextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content
        if not isinstance(text, str):
            text = "\n".join(part.text for part in text)  # as vLLM joins text parts
        return {"role": self.role, "content": text}


class VllmClassifyRequest(BaseModel):
    """Body of ``POST /classify``: vLLM's ``ClassificationCompletionRequest`` (``input``) or
    ``ClassificationChatRequest`` (``messages``: one conversation, one result). Unknown fields
    are ignored, as vLLM does."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[str] | None = None
    messages: list[VllmMessage] | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    use_activation: bool | None = None
    # Aliases of use_activation in vLLM 0.10-0.2x, still sent by older clients.
    activation: bool | None = None
    softmax: bool | None = None
    request_id: str | None = None
    user: str | None = None
    priority: int = 0

    @model_validator(mode="after")
    def _one_form(self) -> VllmClassifyRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give either 'input' (text or list of texts) or 'messages'")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError(
                "'add_generation_prompt' and 'continue_final_message' cannot both be true"
            )
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        return self

    def refusal(self) -> ApiError | None:
        """What vLLM refuses in a body that validates (a removed parameter)."""
        if "normalize" in (self.model_extra or {}):
            return _vllm_bad("Parameter `normalize` was removed; use `use_activation` instead.")
        return None

    @property
    def activated(self) -> bool:
        for flag in (self.use_activation, self.activation, self.softmax):
            if flag is not None:
                return flag
        return False  # raw logits, as /score (vLLM's default is True)


class VllmPoolingRequest(VllmClassifyRequest):
    """Body of ``POST /pooling``: the classify fields plus vLLM's pooling options."""

    task: str | None = None
    encoding_format: Literal["float", "base64", "bytes", "bytes_only"] = "float"
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] = "float32"
    endianness: Literal["native", "big", "little"] = "native"
    dimensions: int | None = None

    def refusal(self) -> ApiError | None:
        if self.task not in (None, "classify"):
            removed = self.task in ("score", "encode")
            return _vllm_bad(
                f"Task {self.task!r} was removed; use 'classify'" if removed
                else f"Task {self.task!r} is not supported by this model; it supports 'classify'",
                "task",
            )  # fmt: skip
        if self.encoding_format in ("bytes", "bytes_only"):
            return _vllm_bad(
                f"encoding_format {self.encoding_format!r} is not supported here; use 'float' "
                "or 'base64'",
                "encoding_format",
            )
        if self.dimensions is not None:
            return _vllm_bad("dimensions is only for embedding models", "dimensions")
        if self.encoding_format == "base64" and self.embed_dtype not in _DTYPES:
            return _vllm_bad(f"embed_dtype {self.embed_dtype!r} is not supported here",
                             "embed_dtype")  # fmt: skip
        return super().refusal()


# Response ids where the client names none: 32 hex digits as a uuid4's, unique per process
# (a random prefix and a counter), at a fraction of uuid4's cost per request.
_ID_PREFIX = uuid.uuid4().hex[:16]
_ids = itertools.count()


def _new_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):016x}"


def _vllm_bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "bad_request", message, param=param)


async def _vllm_scored(
    request: Request, model: type[VllmClassifyRequest]
) -> tuple[ScoringCall[Any], list[list[float]], int]:
    """Read, check and score a classify or pooling body: the call, each prompt's values
    (activated if asked) and the number of prompt tokens."""
    field = "input"
    call = await ScoringCall.read(request, model, field)
    body, scorer = call.body, call.scorer
    served = call.state.settings.served_model_name
    if body.model not in (None, "", served):
        raise ApiError(404, "model_not_found", f"The model `{body.model}` does not exist.")
    if (refusal := body.refusal()) is not None:
        raise refusal
    limit = scorer.max_length
    side: TruncationSide = "error"
    if body.truncate_prompt_tokens is not None:
        if body.truncate_prompt_tokens > scorer.max_length:
            raise _vllm_bad(
                "truncate_prompt_tokens value is greater than max_model_len. Please request a "
                "smaller truncation size.",
                "truncate_prompt_tokens",
            )
        if body.truncate_prompt_tokens >= 0:
            limit = body.truncate_prompt_tokens
        side = body.truncation_side or _default_side(scorer)
    if body.messages is not None:
        field = "messages"
        texts = [
            scorer.render_chat(
                [m.as_dict() for m in body.messages],
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                **(body.chat_template_kwargs or {}),
            )
        ]
        add_special = bool(body.add_special_tokens)  # vLLM's chat default: False
    else:
        texts = [body.input] if isinstance(body.input, str) else list(body.input or [])
        if not texts:
            raise _vllm_bad("You must pass at least one prompt", "input")
        add_special = body.add_special_tokens is not False
    encoded, logits = await call.score_texts(
        texts, field=field, side=side, max_length=limit, add_special_tokens=add_special,
        too_long=lambda n: (
            f"This model's maximum context length is {limit} tokens. However, your prompt "
            f"contains {n} input tokens, which exceeds this limit even without any output "
            "tokens. Please reduce the length of the input prompt."
        ),
        too_long_param="input_tokens",
    )  # fmt: skip
    if body.activated:
        logits = [vllm_activation(row, scorer.problem_type) for row in logits]
    _finite(logits)
    return call, logits, sum(len(ids) for ids in encoded.ids)


def _vllm_envelope(request: Request, prefix: str, call: ScoringCall[Any], tokens: int) -> dict:
    request_id = request.headers.get("x-request-id") or call.body.request_id or _new_id()
    return {
        "id": f"{prefix}-{request_id}",
        "object": "list",
        "created": int(time.time()),
        "model": call.state.settings.served_model_name,
        "data": [],
        "usage": {
            "prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
            "prompt_tokens_details": None, "completion_tokens_details": None,
        },
    }  # fmt: skip


async def classify(request: Request) -> Response:
    """``POST /classify`` (vLLM): per prompt, the label with the highest value and the values
    (``probs``: raw logits unless ``use_activation`` is true)."""
    call, rows, tokens = await _vllm_scored(request, VllmClassifyRequest)
    id2label = call.scorer.id2label
    payload = _vllm_envelope(request, "classify", call, tokens)
    payload["data"] = [
        {
            "index": i,
            "label": id2label.get(max(range(len(row)), key=row.__getitem__)),
            "probs": row,
            "num_classes": len(row),
        }
        for i, row in enumerate(rows)
    ]
    return json_response(payload)


def _base64(row: list[float], dtype: str, endianness: str) -> str:
    """``row`` as vLLM's base64 pooling output: the raw bytes of an array of ``dtype``, in
    ``endianness`` byte order."""
    width = torch.int32 if dtype == "float32" else torch.int16
    bits = torch.tensor(row, dtype=_DTYPES[dtype]).view(width).numpy()
    big = endianness == "big" or (endianness == "native" and sys.byteorder == "big")
    ordered = bits.astype(bits.dtype.newbyteorder(">" if big else "<"))
    return base64.b64encode(ordered.tobytes()).decode()


async def pooling(request: Request) -> Response:
    """``POST /pooling`` (vLLM, task classify): per prompt, the values of the head (raw logits
    unless ``use_activation`` is true), as floats or base64."""
    call, rows, tokens = await _vllm_scored(request, VllmPoolingRequest)
    body: VllmPoolingRequest = call.body
    payload = _vllm_envelope(request, "pooling", call, tokens)
    payload["data"] = [
        {
            "index": i,
            "object": "pooling",
            "data": row if body.encoding_format == "float"
            else _base64(row, body.embed_dtype, body.endianness),
        }
        for i, row in enumerate(rows)
    ]  # fmt: skip
    return json_response(payload)


async def models(request: Request) -> Response:
    """``GET /v1/models`` (vLLM / OpenAI): the one served model."""
    state = service(request)
    scorer, _ = state.serving()
    now = int(time.time())
    permission = {
        "id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": now,
        "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
        "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
        "organization": "*", "group": None, "is_blocking": False,
    }  # fmt: skip
    card = {
        "id": state.settings.served_model_name, "object": "model", "created": now,
        "owned_by": "vllm", "root": state.settings.model, "parent": None,
        "max_model_len": scorer.max_length, "permission": [permission],
    }  # fmt: skip
    return json_response({"object": "list", "data": [card]})


# ----------------------------------------------------------------------------- TEI
_TEI_TYPES = {  # our error type -> (status, TEI's error_type)
    "validation_error": (422, "Validation"),
    "too_long": (422, "Validation"),
    "too_many_items": (422, "Validation"),  # TEI >= 1.9 (413 before)
    "body_too_large": (413, "Validation"),
    "invalid_json": (400, "Validation"),
    "invalid_encoding": (400, "Validation"),
    "unsupported_media_type": (415, "Validation"),
    "empty": (400, "Empty"),
    "queue_full": (429, "Overloaded"),
    "inference_error": (424, "Backend"),
    "non_finite_score": (424, "Backend"),
}


def tei_error(exc: ApiError) -> JSONResponse:
    """TEI's error shape ``{"error", "error_type"}`` with TEI's statuses."""
    status, type_ = _TEI_TYPES.get(exc.type, (exc.status, "Unhealthy" if exc.status == 503 else
                                              "Backend"))  # fmt: skip
    return JSONResponse(
        {"error": exc.message, "error_type": type_}, status_code=status, headers=exc.headers
    )


class TeiPredictRequest(BaseModel):
    """Body of ``POST /predict`` (TEI's ``PredictRequest``; unknown fields ignored)."""

    model_config = ConfigDict(extra="allow")

    inputs: str | list[str] | list[list[str]]
    truncate: bool | None = None
    truncation_direction: Literal["Left", "Right", "left", "right"] | None = None
    raw_scores: bool = False


def tei_inputs(
    inputs: str | list[str] | list[list[str]],
) -> tuple[list[str | tuple[str, str]], bool]:
    """TEI's reading of ``inputs``: a text, ``[text]`` or ``[text, text_pair]`` is one input;
    a list of such lists is a batch. Returns the inputs and whether it was a batch."""
    if isinstance(inputs, str):
        return [inputs], False
    if not inputs:
        raise ApiError(422, "validation_error", "inputs: must not be empty")
    if all(isinstance(x, str) for x in inputs):
        return [_one_input(inputs, "inputs")], False  # type: ignore[arg-type]
    return [_one_input(x, f"inputs[{i}]") for i, x in enumerate(inputs)], True  # type: ignore[arg-type]


def _one_input(texts: list[str], where: str) -> Text:
    if len(texts) == 1:
        return texts[0]
    if len(texts) == 2:
        return texts[0], texts[1]
    raise ApiError(
        422, "validation_error",
        f"{where}: one input is [text] or [text, text_pair], got {len(texts)} strings (a batch "
        "is a list of such lists)",
    )  # fmt: skip


async def predict(request: Request) -> Response:
    """``POST /predict`` (TEI): per input, each label's score, highest first."""
    call = await ScoringCall.read(request, TeiPredictRequest, "inputs")
    body, scorer = call.body, call.scorer
    texts, batch = tei_inputs(body.inputs)
    for i, text in enumerate(texts):
        if any(not part for part in ((text,) if isinstance(text, str) else text)):
            where = f"inputs[{i}]" if batch else "inputs"
            raise ApiError(400, "empty", f"Input validation error: `{where}` cannot be empty")
    truncate = body.truncate if body.truncate is not None else scorer.truncation_side != "error"
    if not truncate:
        side: TruncationSide = "error"
    elif body.truncation_direction is not None:
        side = "left" if body.truncation_direction.lower() == "left" else "right"
    else:
        side = _default_side(scorer)
    limit = scorer.max_length
    _, logits = await call.score_texts(
        texts, field="inputs", side=side, max_length=limit,
        too_long=lambda n: (
            f"Input validation error: `inputs` must have less than {limit} tokens. Given: {n}"
        ),
    )  # fmt: skip
    _finite(logits)
    id2label = scorer.id2label
    answers = []
    for row in logits:
        values = row if body.raw_scores else tei_activation(row)
        ranked = sorted(range(len(values)), key=values.__getitem__, reverse=True)
        answers.append([{"score": values[k], "label": id2label.get(k, str(k))} for k in ranked])
    return json_response(answers if batch else answers[0])


# ----------------------------------------------------------------------------- declarations
class VllmClassifyItem(BaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class VllmUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None
    completion_tokens_details: None = None


class VllmClassifyResponse(BaseModel):
    """Body of a successful ``POST /classify`` (vLLM's ``ClassificationResponse``)."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[VllmClassifyItem]
    usage: VllmUsage


class VllmPoolingItem(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float] | str


class VllmPoolingResponse(BaseModel):
    """Body of a successful ``POST /pooling`` (vLLM's ``PoolingResponse``)."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[VllmPoolingItem]
    usage: VllmUsage


class TeiPrediction(BaseModel):
    score: float
    label: str


TeiPredictResponse = list[TeiPrediction] | list[list[TeiPrediction]]

SCORING_ROUTES = (
    ScoringRoute(
        "/classify", with_error_shape(classify, vllm_error), VllmClassifyRequest,
        VllmClassifyResponse,
        "vLLM: {'input': text | [texts]} or {'messages': [...]} -> each prompt's label and "
        "probs (raw logits unless use_activation)",
    ),
    ScoringRoute(
        "/pooling", with_error_shape(pooling, vllm_error), VllmPoolingRequest,
        VllmPoolingResponse,
        "vLLM: the classify input -> each prompt's head values (raw unless use_activation)",
    ),
    ScoringRoute(
        "/predict", with_error_shape(predict, tei_error), TeiPredictRequest, TeiPredictResponse,
        "TEI: {'inputs': text | [text, pair] | [[...], ...]} -> [{'score', 'label'}]",
    ),
)  # fmt: skip
