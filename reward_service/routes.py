"""The service's routes, as plain functions over the app's state (``app.state.service``).

The scoring routes are declared once, in :data:`SCORING_ROUTES`: the app registers each as a
FastAPI route (which documents it in OpenAPI, answers other methods with 405, and applies any
dependency), and :class:`~reward_service.middleware.DirectRoutes` serves its POSTs straight
from the same declaration, skipping FastAPI's routing, while no dependency applies to it.
Their bodies are read and validated by hand (:class:`ScoringCall`): size and item-count limits
come before validation, and errors name the field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from common.schemas import (
    ErrorResponse,
    GetRewardRequest,
    GetRewardResponse,
    InfoResponse,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
)
from reward_service.batcher import Batcher, Draining, QueueFull
from reward_service.errors import ApiError, from_validation_error
from reward_service.runner import ModelProcessExited
from reward_service.scorer import Encoded, ItemError, Scorer, Text, TooLong, TruncationSide
from reward_service.state import ServiceState, model_lost

Body = TypeVar("Body", bound=BaseModel)
Endpoint = Callable[[Request], Awaitable[Response]]

# Bodies above this size are rendered and tokenized in a thread, off the event loop.
_OFFLOAD_BYTES = 256 * 1024
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Body is not UTF-8 JSON",
        401: "API key missing or wrong",
        413: "Too many items or body too large",
        415: "Content-Type is not application/json",
        422: "Invalid items (the message names the item index and field)",
        429: "Queue full; see Retry-After",
        503: "Model loading, service draining, or the model process exited",
    }.items()
}


def service(request: Request) -> ServiceState:
    """The state of the app that serves ``request``."""
    state: ServiceState = request.app.state.service
    return state


# ----------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class ScoringCall(Generic[Body]):
    """One scoring request, read and validated: the model it will use and its parsed body."""

    state: ServiceState
    scorer: Scorer
    batcher: Batcher
    body: Body
    body_bytes: int

    @classmethod
    async def read(cls, request: Request, model: type[Body], items_field: str) -> ScoringCall[Body]:
        """503 unless serving; then the body, read within the limits and validated as
        ``model`` (whose list ``items_field`` counts against ``max_items_per_request``)."""
        state = service(request)
        scorer, batcher = state.serving()
        settings = state.settings
        text = await read_json_body(request, settings.max_body_bytes)
        body = parse_body(model, text, items_field, settings.max_items_per_request)
        return cls(state, scorer, batcher, body, len(text))

    async def score(self, items: Sequence[ScoreItem]) -> tuple[Encoded, list[list[float]]]:
        """Render, tokenize and queue ``items`` (``/score``'s); their token ids and head
        logits, in order."""
        try:
            texts = self.scorer.render_all(items)
        except ItemError as exc:
            raise ApiError(422, "validation_error", str(exc)) from None
        return await self.score_texts(texts)

    async def score_texts(
        self,
        texts: Sequence[Text],
        *,
        field: str = "items",
        side: TruncationSide | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        too_long: Callable[[int], str] | None = None,
        too_long_param: str | None = None,
    ) -> tuple[Encoded, list[list[float]]]:
        """Tokenize and queue ``texts`` (see :meth:`Scorer.encode` for the options); their
        token ids and head logits, in order. An item that cannot be tokenized is a 422 naming
        ``field[i]``; with ``too_long``, an over-long one where truncation is off is a 422 of
        type ``too_long`` that says ``too_long(tokens)``."""
        scorer = self.scorer
        encode = partial(
            _encode, scorer, texts, field, too_long, too_long_param,
            side=side, max_length=max_length, add_special_tokens=add_special_tokens,
        )  # fmt: skip
        encoded = await asyncio.to_thread(encode) if self.body_bytes > _OFFLOAD_BYTES else encode()
        if not encoded.ids:
            return encoded, []
        try:
            logits = await self.batcher.score(encoded.ids)
        except QueueFull as exc:
            raise ApiError(
                429, "queue_full", str(exc), {"Retry-After": str(exc.retry_after_s)}
            ) from None
        except Draining as exc:
            raise ApiError(503, "draining", str(exc)) from None
        except ModelProcessExited as exc:
            raise model_lost(str(exc)) from None
        except Exception:
            raise ApiError(500, "inference_error", "forward pass failed; see the log") from None
        n_truncated = sum(encoded.truncated)
        if n_truncated:
            side_label = side or scorer.truncation_side
            self.state.metrics.truncations.labels(side_label).inc(n_truncated)
        return encoded, logits


def _encode(
    scorer: Scorer,
    texts: Sequence[Text],
    field: str,
    too_long: Callable[[int], str] | None,
    too_long_param: str | None,
    **options: Any,
) -> Encoded:
    try:
        return scorer.encode(texts, **options)
    except TooLong as exc:
        if too_long is None:
            raise ApiError(422, "validation_error", exc.naming(field)) from None
        message = f"{field}[{exc.index}]: {too_long(exc.tokens)}"
        raise ApiError(422, "too_long", message, param=too_long_param) from None
    except ItemError as exc:
        raise ApiError(422, "validation_error", exc.naming(field)) from None


async def score(request: Request) -> Response:
    """``POST /score``: each item's score (and, if asked, every head logit)."""
    call = await ScoringCall.read(request, ScoreRequest, "items")
    scorer = call.scorer
    try:
        label = scorer.label_index(call.body.label)
    except ValueError as exc:
        raise ApiError(422, "validation_error", str(exc)) from None
    encoded, logits = await call.score(call.body.items)
    payload: dict[str, Any] = {
        "scores": [row[label] for row in logits],
        "num_tokens": [len(ids) for ids in encoded.ids],
        "truncated": encoded.truncated,
        "model_id": scorer.model_id,
        "weights_hash": scorer.weights_hash,
    }
    if call.body.return_logits:
        payload["logits"] = logits
    return json_response(payload)


async def get_reward(request: Request) -> Response:
    """``POST /get_reward`` (OpenRLHF): the score of each full text in ``query``, raw as
    OpenRLHF's own ``serve_rm`` answers; ``prompts`` and ``labels`` are checked, not used."""
    call = await ScoringCall.read(request, GetRewardRequest, "query")
    _, logits = await call.score_texts(call.body.query, field="query")
    scores = [row[call.scorer.score_label] for row in logits]
    return json_response({"rewards": scores, "scores": scores, "extra_logs": {}})


@dataclass(frozen=True)
class ScoringRoute:
    """A POST route that scores: its path, its endpoint, and the models that document it
    (``response_model`` is a model or a type such as a union of lists of models)."""

    path: str
    endpoint: Endpoint
    request_model: type[BaseModel]
    response_model: Any
    summary: str


def with_error_shape(endpoint: Endpoint, shape: Callable[[ApiError], Response]) -> Endpoint:
    """``endpoint``, answering its errors in ``shape`` (another tool's error body) instead of
    the envelope; each is counted in the errors metric all the same."""

    async def shaped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as exc:
            service(request).metrics.errors.labels(exc.type).inc()
            return shape(exc)

    shaped.__name__ = shaped.__qualname__ = endpoint.__name__
    shaped.__doc__ = endpoint.__doc__
    return shaped


SCORING_ROUTES = (
    ScoringRoute(
        "/score", score, ScoreRequest, ScoreResponse,
        "Score items (text, prompt + completion, or chat messages)",
    ),
    ScoringRoute(
        "/get_reward", get_reward, GetRewardRequest, GetRewardResponse,
        "OpenRLHF-compatible: {'query': [texts]} -> {'rewards', 'scores'}",
    ),
)  # fmt: skip


# ----------------------------------------------------------------------------- the others
async def health(request: Request) -> Response:
    """Liveness: 200 while the process serves, 503 if loading failed or the model is gone."""
    if (failure := service(request).failure()) is not None:
        raise failure
    return json_response({"status": "ok"})


async def ready(request: Request) -> Response:
    """Readiness: 200 once the model is loaded and warmed up, until draining."""
    service(request).serving()
    return json_response({"status": "ready"})


async def info(request: Request) -> Response:
    """The served model and how requests are batched."""
    state = service(request)
    scorer, batcher = state.serving()
    settings = state.settings
    return json_response(
        InfoResponse(
            model_id=scorer.model_id,
            weights_hash=scorer.weights_hash,
            dtype=scorer.dtype,
            device=scorer.device,
            num_labels=scorer.num_labels,
            id2label=scorer.id2label,
            score_label=scorer.score_label,
            max_length=scorer.max_length,
            truncation_side=scorer.truncation_side,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_items_per_request=settings.max_items_per_request,
            has_chat_template=scorer.has_chat_template,
            compiled=settings.compile,
            forward_fixed_ms=batcher.limits.forward_cost.fixed_s * 1e3,
            forward_per_token_us=batcher.limits.forward_cost.per_token_s * 1e6,
            served_model_name=settings.served_model_name,
            revision=settings.revision,
            trust_remote_code=settings.trust_remote_code,
            attn_implementation=scorer.attn_implementation,
            device_map=settings.device_map,
        ).model_dump(mode="json")
    )


async def metrics(request: Request) -> Response:
    """The service's Prometheus metrics."""
    return Response(service(request).metrics.export(), media_type=CONTENT_TYPE_LATEST)


def add_routes(app: FastAPI, scoring: Sequence[ScoringRoute]) -> None:
    """Register the ``scoring`` routes and the service's others on ``app`` (where the app's
    own dependencies, if any, apply to each)."""
    for route in scoring:
        app.add_api_route(
            route.path,
            route.endpoint,
            methods=["POST"],
            response_model=route.response_model,
            responses=ERRORS,
            openapi_extra=_json_body(route.request_model),
            summary=route.summary,
        )
    app.add_api_route(
        "/health", health,
        summary="Liveness: 200 while the process serves (503 if loading failed or the model "
        "process exited)",
    )  # fmt: skip
    app.add_api_route(
        "/ready", ready, responses=ERRORS, summary="Readiness: 200 once loaded and warmed up"
    )
    app.add_api_route(
        "/info", info, response_model=InfoResponse, responses=ERRORS, summary="Served model"
    )
    app.add_api_route("/metrics", metrics, summary="Prometheus metrics")


# ----------------------------------------------------------------------------- bodies
async def read_json_body(request: Request, max_bytes: int) -> str:
    """The body as text: 415 unless JSON, 413 if too large (declared/actual), 400 if not UTF-8."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json, got {media_type or 'none'!r}",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _body_too_large(max_bytes)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _body_too_large(max_bytes)
        chunks.append(chunk)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, "invalid_encoding", f"body is not valid UTF-8 (byte {exc.start})"
        ) from None


def parse_body(model: type[Body], body: str, field: str, max_items: int) -> Body:
    """Parse, count the entries of list ``field`` (413 over ``max_items``), then validate.

    Counting comes before validation, so a body with a million entries is refused in the time
    it takes to parse it rather than after validating (and listing the errors of) each one."""
    try:
        data = from_json(body)
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    entries = data.get(field) if isinstance(data, dict) else None
    if isinstance(entries, list) and len(entries) > max_items:
        raise ApiError(
            413,
            "too_many_items",
            f"{len(entries)} items exceed max_items_per_request {max_items}; split the request",
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def json_response(payload: Any) -> Response:
    return Response(json.dumps(payload), media_type="application/json")


def _body_too_large(max_bytes: int) -> ApiError:
    return ApiError(
        413, "body_too_large", f"body exceeds max_body_bytes {max_bytes}", {"Connection": "close"}
    )


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body of a route that parses its body itself (the app adds ``model``'s
    schema to the components)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}
