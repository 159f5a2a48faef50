"""The app factory: the FastAPI app, its lifespan (which loads the model) and its layers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, params
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from reward_service import compat, routes
from reward_service.errors import install_error_handlers
from reward_service.metrics import ServiceMetrics
from reward_service.middleware import ApiKeyMiddleware, DirectRoutes, RequestMetricsMiddleware
from reward_service.routes import Endpoint, ScoringRoute, add_routes, with_error_shape
from reward_service.scorer import Scorer
from reward_service.settings import ServiceSettings
from reward_service.state import Loader, ServiceState

# Open even when an API key is set: probes and scrapers. Everything else (the docs and the
# OpenAPI schema included) needs the key.
PUBLIC_ROUTES = frozenset({"/health", "/ready", "/metrics"})
# The service's own, then those in other tools' shapes (OpenRLHF's /get_reward is among the
# service's own: it answers in the service's error envelope).
SCORING_ROUTES = (*routes.SCORING_ROUTES, *compat.SCORING_ROUTES)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model in the background (the server answers /health meanwhile and /ready with
    503 until it is loaded and warmed up); on shutdown, drain and release it."""
    state: ServiceState = app.state.service
    loading = asyncio.create_task(state.load())
    try:
        yield
    finally:
        await state.close(loading)


def create_app(
    settings: ServiceSettings,
    *,
    loader: Loader = Scorer.load,
    dependencies: Sequence[params.Depends] = (),
) -> FastAPI:
    """A reward service app; its lifespan loads the model with ``loader``.

    ``dependencies`` apply to every route, as FastAPI's own ``dependencies=`` does; a scoring
    route with a dependency is served by FastAPI's router instead of the direct dispatch.
    Middleware added with ``app.add_middleware`` wraps every route, the scoring POSTs included
    (see :class:`ServiceApp`).
    """
    app = ServiceApp(
        title="Reward service",
        summary="Scores texts with a sequence-classification model, batched across requests.",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=list(dependencies),
    )
    app.state.service = ServiceState(settings, ServiceMetrics(), loader)
    install_error_handlers(app, app.state.service.metrics)
    add_routes(app, SCORING_ROUTES)
    app.add_api_route(
        "/v1/models", with_error_shape(compat.models, compat.vllm_error),
        summary="vLLM / OpenAI: the served model (its 'id' is what 'model' fields must name)",
    )  # fmt: skip
    return app


class ServiceApp(FastAPI):
    """FastAPI with the service's own layers in front of its own: the request metrics (and the
    500 envelope), then any middleware added with ``add_middleware``, then the API key check
    (before any routing, so no route, the docs, a 404 or a 405 can skip it), then the direct
    dispatch of the scoring POSTs, then FastAPI's layers and router for everything else."""

    def build_middleware_stack(self) -> ASGIApp:
        state: ServiceState = self.state.service
        added, self.user_middleware = self.user_middleware, []
        try:
            app = super().build_middleware_stack()  # FastAPI's own layers and its router
        finally:
            self.user_middleware = added
        app = DirectRoutes(app, direct_endpoints(self.routes, SCORING_ROUTES), state.metrics)
        if state.settings.api_key is not None:
            app = ApiKeyMiddleware(
                app, key=state.settings.api_key.get_secret_value(), public=PUBLIC_ROUTES,
                metrics=state.metrics,
            )  # fmt: skip
        for cls, args, kwargs in reversed(added):
            app = cls(app, *args, **kwargs)
        paths = [route.path for route in self.routes if isinstance(route, APIRoute)]
        return RequestMetricsMiddleware(app, metrics=state.metrics, routes=paths)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's schema plus the request models that the scoring routes validate by hand."""
        if self.openapi_schema is None:
            schema = get_openapi(
                title=self.title, version=self.version, summary=self.summary, routes=self.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for route in SCORING_ROUTES:
                model = route.request_model
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            self.openapi_schema = schema
        return self.openapi_schema


def direct_endpoints(
    routes: Iterable[BaseRoute], declared: Iterable[ScoringRoute]
) -> dict[str, Endpoint]:
    """The endpoints that :class:`DirectRoutes` may call straight away: each ``declared``
    scoring route that the app registered as it was declared and that no dependency applies
    to (FastAPI's router must solve those)."""
    endpoints = {route.path: route.endpoint for route in declared}
    direct = {}
    for route in routes:
        if (
            isinstance(route, APIRoute)
            and endpoints.get(route.path) is route.endpoint
            and "POST" in route.methods
            and not route.dependant.dependencies
        ):
            direct[route.path] = route.endpoint
    return direct
