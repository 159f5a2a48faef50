"""Pure ASGI middleware: API key check, per-route request metrics, a 500 envelope for
unexpected errors (a client that goes away is not one), and the direct dispatch of the scoring
routes."""

from __future__ import annotations

import hmac
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping, Set

from prometheus_client import Counter
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reward_service.errors import ApiError, api_error_response, error_response
from reward_service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

# What a request whose client went away before the answer is counted as (nginx's "client
# closed request"): no answer was sent.
CLIENT_CLOSED_REQUEST = 499


class RequestMetricsMiddleware:
    """Counts requests by route and status, times them, and turns a crash into a 500 envelope.

    Unknown paths are counted as route ``other`` so that scanners cannot blow up label counts.
    A client that hangs up before its request is read is no server error: it is logged at INFO,
    counted in ``reward_client_disconnects`` and as status 499.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)
        # Labelled children looked up once: .labels() takes a lock and builds a key each time.
        self._timers = {r: metrics.request_seconds.labels(r) for r in (*self.routes, "other")}
        self._counters: dict[tuple[str, int], Counter] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500
        started = False
        start = time.perf_counter()

        async def send_recording(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        except ClientDisconnect:
            logger.info("client went away before its request on %s was read", route)
            self.metrics.client_disconnects.labels(route).inc()
            status = CLIENT_CLOSED_REQUEST
        except Exception as exc:
            # Frames only: an exception message may quote request text, which is never logged.
            frames = "".join(traceback.format_tb(exc.__traceback__))
            logger.error("unhandled %s on %s\n%s", type(exc).__name__, route, frames)
            self.metrics.errors.labels("internal_error").inc()
            if not started:
                response = error_response(500, "internal_error", "internal error; see the log")
                await response(scope, receive, send_recording)
        finally:
            counter = self._counters.get((route, status))
            if counter is None:
                counter = self.metrics.requests.labels(route, str(status))
                self._counters[route, status] = counter
            counter.inc()
            self._timers[route].observe(time.perf_counter() - start)


class ApiKeyMiddleware:
    """401 for every HTTP request without the key, except on the ``public`` paths.

    The key comes as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. It runs before
    routing, so unknown paths and wrong methods are 401 too (nothing is revealed without it).
    """

    def __init__(self, app: ASGIApp, key: str, public: Set[str], metrics: ServiceMetrics) -> None:
        self.app = app
        self.key = key.encode()
        self.public = public
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        self.metrics.errors.labels("unauthorized").inc()
        response = error_response(
            401,
            "unauthorized",
            "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
            {"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])  # lower-case names (ASGI)
        supplied = headers.get(b"x-api-key")
        if supplied is None:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer":
                return False
            supplied = token.strip()
        return hmac.compare_digest(supplied, self.key)  # constant time


class DirectRoutes:
    """Serves ``POST`` on the given paths by calling their endpoints straight away.

    These endpoints take the bare :class:`Request` and raise :class:`ApiError`; the app
    registers the same endpoints as FastAPI routes too (see :mod:`reward_service.routes`),
    which document them in OpenAPI, answer their other methods (405), and serve them instead of
    this whenever a dependency applies to them. Calling them here skips FastAPI's exception,
    body-limit and routing layers, whose cost per request is a measurable share of a small
    request's. Middleware added to the app wraps this, so it applies to these POSTs as well.
    """

    def __init__(
        self,
        app: ASGIApp,
        endpoints: Mapping[str, Callable[[Request], Awaitable[Response]]],
        metrics: ServiceMetrics,
    ) -> None:
        self.app = app
        self.endpoints = dict(endpoints)
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoints.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            response = await endpoint(Request(scope, receive))
        except ApiError as exc:
            response = api_error_response(exc, self.metrics)
        await response(scope, receive, send)
