"""Pure ASGI middleware: per-route request metrics, and a 500 envelope for unexpected errors."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reward_service.errors import error_response
from reward_service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)


class RequestMetricsMiddleware:
    """Counts requests by route and status, times them, and turns a crash into a 500 envelope.

    Unknown paths are counted as route ``other`` so that scanners cannot blow up label counts.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)

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
        except Exception as exc:
            # Frames only: an exception message may quote request text, which is never logged.
            frames = "".join(traceback.format_tb(exc.__traceback__))
            logger.error("unhandled %s on %s\n%s", type(exc).__name__, route, frames)
            self.metrics.errors.labels("internal_error").inc()
            if not started:
                response = error_response(500, "internal_error", "internal error; see the log")
                await response(scope, receive, send_recording)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - start)
