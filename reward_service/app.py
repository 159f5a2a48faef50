"""The FastAPI app: routes, auth, body checks and the lifespan that loads the model."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json
from starlette.types import ASGIApp, Receive, Scope, Send

from common.schemas import (
    ErrorResponse,
    GetRewardRequest,
    GetRewardResponse,
    InfoResponse,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
)
from reward_service.batch_loop import BatchLimits
from reward_service.batcher import Batcher, Draining, QueueFull
from reward_service.errors import ApiError, from_validation_error, install_error_handlers
from reward_service.metrics import ServiceMetrics
from reward_service.middleware import ApiKeyMiddleware, DirectRoutes, RequestMetricsMiddleware
from reward_service.runner import ModelProcessExited
from reward_service.scorer import Encoded, ItemError, Scorer
from reward_service.settings import ServiceSettings

logger = logging.getLogger(__name__)

Loader = Callable[[ServiceSettings], Scorer]
_Body = TypeVar("_Body", bound=BaseModel)
# Bodies above this size are rendered and tokenized in a thread, off the event loop.
_OFFLOAD_BYTES = 256 * 1024
_ROUTES = ("/score", "/get_reward", "/health", "/ready", "/info", "/metrics")
# Open even when an API key is set: probes and scrapers. Everything else (the docs and the
# OpenAPI schema included) needs the key.
PUBLIC_ROUTES = frozenset({"/health", "/ready", "/metrics"})
_ERRORS: dict[int | str, dict[str, Any]] = {
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


class _ServiceApp(FastAPI):
    """A FastAPI app that serves every request through ``front``, the service's own ASGI
    middleware, which passes what it does not answer itself on to FastAPI."""

    front: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.front(scope, receive, send)


@dataclass
class ServiceState:
    """What the routes share: settings, metrics, and the model once it is loaded."""

    settings: ServiceSettings
    metrics: ServiceMetrics
    scorer: Scorer | None = None
    batcher: Batcher | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None

    def failure(self) -> ApiError | None:
        """Why the service can never score (the model did not load, or its process exited)."""
        if self.load_error is not None:
            return ApiError(503, "load_failed", self.load_error)
        if self.scorer is not None and (lost := self.scorer.runner.failure()) is not None:
            return _model_lost(lost)
        return None


def create_app(settings: ServiceSettings, *, loader: Loader = Scorer.load) -> FastAPI:
    """A reward service app; its lifespan loads the model in the background with ``loader``.

    The server answers /health at once and /ready with 503 until the model is loaded and a
    warm-up forward has run.
    """
    state = ServiceState(settings=settings, metrics=ServiceMetrics())
    limit = settings.max_items_per_request

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        load = asyncio.create_task(_load(state, loader))
        try:
            yield
        finally:
            state.draining = True
            await load  # a loading thread cannot be interrupted; let it finish
            if state.batcher is not None:
                await state.batcher.close(settings.drain_timeout_s)
            if state.scorer is not None:
                await asyncio.to_thread(state.scorer.close)

    app = _ServiceApp(
        title="Reward service",
        summary="Scores texts with a sequence-classification model, batched across requests.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = state
    install_error_handlers(app, state.metrics)

    def serving() -> tuple[Scorer, Batcher]:
        """503 while loading or draining, or when the model is gone."""
        if state.draining:
            raise ApiError(503, "draining", "the service is shutting down")
        if (failure := state.failure()) is not None:
            raise failure
        if state.scorer is None or state.batcher is None or not state.ready:
            raise ApiError(503, "loading", "the model is still loading", {"Retry-After": "1"})
        return state.scorer, state.batcher

    async def score_texts(
        request: Request, parse: Callable[[str, Scorer], tuple[Sequence[ScoreItem], Any]]
    ) -> tuple[Scorer, Encoded, list[list[float]], Any]:
        """Shared pipeline of /score and /get_reward: check, parse, tokenize, queue, await."""
        scorer, batcher = serving()
        body = await _read_json_body(request, settings.max_body_bytes)
        items, extra = parse(body, scorer)
        if len(body) > _OFFLOAD_BYTES:
            encoded = await asyncio.to_thread(_prepare, scorer, items)
        else:
            encoded = _prepare(scorer, items)
        try:
            logits = await batcher.score(encoded.ids)
        except QueueFull as exc:
            raise ApiError(
                429, "queue_full", str(exc), {"Retry-After": str(exc.retry_after_s)}
            ) from None
        except Draining as exc:
            raise ApiError(503, "draining", str(exc)) from None
        except ModelProcessExited as exc:
            raise _model_lost(str(exc)) from None
        except Exception:
            raise ApiError(500, "inference_error", "forward pass failed; see the log") from None
        n_truncated = sum(encoded.truncated)
        if n_truncated:
            state.metrics.truncations.labels(scorer.truncation_side).inc(n_truncated)
        return scorer, encoded, logits, extra

    @app.post(
        "/score",
        response_model=ScoreResponse,
        responses=_ERRORS,
        openapi_extra=_json_body(ScoreRequest),
        summary="Score items (text, prompt + completion, or chat messages)",
    )
    async def score(request: Request) -> Response:
        def parse(body: str, scorer: Scorer) -> tuple[list[ScoreItem], tuple[int, bool]]:
            req = _parse(ScoreRequest, body, "items", limit)
            try:
                label = scorer.label_index(req.label)
            except ValueError as exc:
                raise ApiError(422, "validation_error", str(exc)) from None
            return req.items, (label, req.return_logits)

        scorer, encoded, logits, (label, return_logits) = await score_texts(request, parse)
        payload: dict[str, Any] = {
            "scores": [row[label] for row in logits],
            "num_tokens": [len(ids) for ids in encoded.ids],
            "truncated": encoded.truncated,
            "model_id": scorer.model_id,
            "weights_hash": scorer.weights_hash,
        }
        if return_logits:
            payload["logits"] = logits
        return _json(payload)

    @app.post(
        "/get_reward",
        response_model=GetRewardResponse,
        responses=_ERRORS,
        openapi_extra=_json_body(GetRewardRequest),
        summary="OpenRLHF-compatible: {'query': [texts]} -> {'rewards', 'scores'}",
    )
    async def get_reward(request: Request) -> Response:
        def parse(body: str, _: Scorer) -> tuple[list[ScoreItem], None]:
            req = _parse(GetRewardRequest, body, "query", limit)
            return [ScoreItem(text=q) for q in req.query], None

        scorer, _, logits, _ = await score_texts(request, parse)
        scores = [row[scorer.score_label] for row in logits]
        return _json({"rewards": scores, "scores": scores})

    # Every request meets these first, ahead of FastAPI's own layers (telemetry, body limit,
    # error middleware, routing), which the scoring POSTs do not use: the request metrics, then
    # the key check, then the direct dispatch of the scoring routes.
    front: ASGIApp = DirectRoutes(
        partial(FastAPI.__call__, app),
        endpoints={"/score": score, "/get_reward": get_reward},
        metrics=state.metrics,
    )
    if settings.api_key is not None:
        # Before any routing, so no route (a new one, the docs, a 404 or 405) can skip it.
        front = ApiKeyMiddleware(
            front, key=settings.api_key.get_secret_value(), public=PUBLIC_ROUTES,
            metrics=state.metrics,
        )  # fmt: skip
    app.front = RequestMetricsMiddleware(front, metrics=state.metrics, routes=_ROUTES)

    @app.get(
        "/health",
        summary="Liveness: 200 while the process serves (503 if loading failed or the model "
        "process exited)",
    )
    async def health() -> Response:
        if (failure := state.failure()) is not None:
            raise failure
        return _json({"status": "ok"})

    @app.get("/ready", responses=_ERRORS, summary="Readiness: 200 once loaded and warmed up")
    async def ready() -> Response:
        if (failure := state.failure()) is not None:
            raise failure
        if state.draining:
            raise ApiError(503, "draining", "the service is shutting down")
        if not state.ready:
            raise ApiError(503, "loading", "the model is still loading", {"Retry-After": "1"})
        return _json({"status": "ready"})

    @app.get("/info", response_model=InfoResponse, responses=_ERRORS, summary="Served model")
    async def info() -> Response:
        scorer, batcher = serving()
        return _json(
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
            ).model_dump(mode="json")
        )

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(state.metrics.export(), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


async def _load(state: ServiceState, loader: Loader) -> None:
    """Load the model and warm it up off the event loop, then start the batching loop."""
    settings = state.settings
    scorer: Scorer | None = None
    try:
        scorer = await asyncio.to_thread(loader, settings)
        await asyncio.to_thread(scorer.warmup)
        cost = await asyncio.to_thread(
            scorer.forward_cost, settings.max_batch_size, settings.max_batch_tokens
        )
        limits = BatchLimits(
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.max_wait_ms / 1000,
            forward_cost=cost,
        )
        state.batcher = await Batcher.connect(
            scorer.serve(limits),
            state.metrics,
            limits=limits,
            max_queue_items=settings.max_queue_items,
            lost=scorer.runner.lost,
        )
    except Exception as exc:
        state.load_error = f"loading {settings.model!r} failed: {type(exc).__name__}: {exc}"
        logger.error("%s", state.load_error)
        if scorer is not None:
            await asyncio.to_thread(scorer.close)
        return
    state.scorer = scorer
    state.ready = True
    logger.info(
        "ready: model %s (weights %s, %s on %s, %d labels, max_length %d, %s, "
        "forward pass %.2f ms + %.2f us/token)",
        scorer.model_id, scorer.weights_hash, scorer.dtype, scorer.device, scorer.num_labels,
        scorer.max_length, "own process" if settings.forward_process else "in-process",
        cost.fixed_s * 1e3, cost.per_token_s * 1e6,
    )  # fmt: skip


async def _read_json_body(request: Request, max_bytes: int) -> str:
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


def _model_lost(reason: str) -> ApiError:
    return ApiError(503, "model_process_exited", f"{reason}; restart the service")


def _body_too_large(max_bytes: int) -> ApiError:
    return ApiError(
        413, "body_too_large", f"body exceeds max_body_bytes {max_bytes}", {"Connection": "close"}
    )


def _parse(model: type[_Body], body: str, field: str, max_items: int) -> _Body:
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


def _prepare(scorer: Scorer, items: Sequence[ScoreItem]) -> Encoded:
    """Render and tokenize; 422 naming the first bad item."""
    try:
        return scorer.encode(scorer.render_all(items))
    except ItemError as exc:
        raise ApiError(422, "validation_error", str(exc)) from None


def _json(payload: Any) -> Response:
    return Response(json.dumps(payload), media_type="application/json")


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body of a route that parses its body itself (see :func:`_openapi`)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request models that the routes validate by hand."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ScoreRequest, GetRewardRequest):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        app.openapi_schema = schema
    return app.openapi_schema
