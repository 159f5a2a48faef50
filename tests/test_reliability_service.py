"""Reliability and security of the reward service, against real ``python -m reward_service``
subprocesses on free loopback ports (real httpx clients, the real demo reward model).

- Load: 64 concurrent clients x 4 requests of 1..16 mixed items (text, prompt + completion,
  messages, prompt messages + completion); every score equals a plain in-process transformers
  forward (atol 1e-5). The full 64 x 50 run is ``bench/bench_load.py`` (too slow for this file's
  budget on 2 shared cores); the concurrency here is the same.
- Overload: a small queue gets bursts: only 200 or 429 + Retry-After (no timeouts, no 5xx),
  resident memory levels off, and the service serves normally afterwards.
- Bad input: a matrix of malformed requests on /score and /get_reward (types, sizes, encodings,
  nesting, huge item counts, invalid messages, content types, JSON syntax, methods): each a 4xx
  with the error envelope naming what was wrong; no 5xx; healthy and correct afterwards.
- SIGTERM: in-flight requests finish with correct scores, new ones are refused, exit 0 (or the
  re-raised SIGTERM, -15).
- Security: with an API key, every route of the app except /health, /ready and /metrics is 401
  without it (the routes are enumerated from the app, so a new one cannot escape; the docs and
  the OpenAPI schema need the key too); neither the key nor request texts reach the log at
  debug level; without --host the service listens on 127.0.0.1 only.

Two service processes, started together: "main" (load, bad input) and "guarded" (API key,
debug + access log, no --host, small queue: security, overload, and SIGTERM last). For overload
and SIGTERM the guarded one gets a slow model by fault injection (a sleep before each forward
in the service process, switched by a file): it stands in for a large model, so that the queue
fills and the drain takes a while on any machine.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from bench.bench_load import (
    Reference,
    Result,
    burst,
    memory_kb,
    mismatches,
    mixed_items,
    run_load,
)
from common.schemas import ErrorResponse
from reward_service.app import PUBLIC_ROUTES, create_app
from reward_service.settings import ServiceSettings
from tests.support import exited_within
from trainer.service_process import free_port

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "k3y-7f1c9e-never-in-logs"
SECRET = "okapi-quartz-marker"  # request texts containing this must never be logged
MAX_BODY = 1_000_000
MAX_ITEMS = 64

# The service's own CLI, run from a file: the model process (spawned) runs that file again as
# its main module, so the patch below applies there too. Fault injection: while the file
# SLOW_FORWARD_FILE holds a number, each forward pass first sleeps that many seconds (a slow
# model).
_LAUNCHER = """
import os, sys, time
from reward_service.runner import LocalRunner
flag = os.environ.get("SLOW_FORWARD_FILE")
if flag:
    forward = LocalRunner.forward
    def slow_forward(self, seqs):
        try:
            time.sleep(float(open(flag).read()))
        except (OSError, ValueError):
            pass
        return forward(self, seqs)
    LocalRunner.forward = slow_forward
if __name__ == "__main__":
    from reward_service.__main__ import main
    sys.exit(main())
"""


# ----------------------------------------------------------------------------- services
@dataclass
class Service:
    """A reward service child process and where its output goes."""

    process: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path
    slow_flag: Path

    @contextmanager
    def slow_model(self, seconds: float) -> Iterator[None]:
        """Each forward pass sleeps ``seconds`` first, while in this block."""
        self.slow_flag.write_text(str(seconds))
        try:
            yield
        finally:
            self.slow_flag.unlink(missing_ok=True)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def launch(model: Path, log: Path, *args: str, **env: str) -> Service:
    """Start the service CLI (no --host unless given in ``args``); output to ``log``."""
    port = free_port()
    slow_flag = log.with_suffix(".slow")
    launcher = log.with_suffix(".py")
    launcher.write_text(_LAUNCHER)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REWARD_")}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(launcher), "--model", str(model), "--port", str(port), *args],
            cwd=ROOT,
            env={
                **clean,
                "PYTHONPATH": str(ROOT),
                "PYTHONUNBUFFERED": "1",
                "SLOW_FORWARD_FILE": str(slow_flag),
                **env,
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Service(process, f"http://127.0.0.1:{port}", port, log, slow_flag)


@pytest.fixture(scope="module")
def launched(
    demo_models: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Service]]:
    """The two services of this module, started at once (startup dominates the runtime)."""
    logs = tmp_path_factory.mktemp("service-logs")
    model = demo_models.reward
    started = {
        # Load, bad input: default queue, small request limits so the matrix can hit them.
        "main": launch(
            model, logs / "main.log", "--host", "127.0.0.1",
            REWARD_MAX_ITEMS_PER_REQUEST=str(MAX_ITEMS), REWARD_MAX_BODY_BYTES=str(MAX_BODY),
        ),
        # Security, overload, then SIGTERM (the last test): API key, debug logs with access log,
        # no --host, small queue.
        "guarded": launch(
            model, logs / "guarded.log",
            REWARD_API_KEY=API_KEY, REWARD_LOG_LEVEL="debug", REWARD_ACCESS_LOG="true",
            REWARD_MAX_QUEUE_ITEMS="32", REWARD_MAX_ITEMS_PER_REQUEST="16",
        ),
    }  # fmt: skip
    try:
        yield started
    finally:
        for service in started.values():
            service.stop()


@pytest.fixture(scope="module")
def services(launched: dict[str, Service], expected: list[float]) -> dict[str, Service]:
    """The services, ready (the reference scores are computed while they start)."""
    for service in launched.values():
        service.wait_ready()
    return launched


@pytest.fixture(scope="module")
def main_service(services: dict[str, Service]) -> str:
    return services["main"].url


@pytest.fixture(scope="module")
def ref(demo_models: Any) -> Reference:
    return Reference(demo_models.reward)


@pytest.fixture(scope="module")
def pool() -> list[dict[str, Any]]:
    return mixed_items(48, seed=11)


@pytest.fixture(scope="module")
def expected(ref: Reference, pool: list[dict[str, Any]]) -> list[float]:
    return [ref.score(item) for item in pool]


def assert_error(response: httpx.Response, status: int, type_: str, *fragments: str) -> None:
    """The one error envelope, with this status and type, and a message naming ``fragments``."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    error = ErrorResponse.model_validate(body).error
    assert error.type == type_, body
    assert error.message and "Traceback" not in error.message
    for fragment in fragments:
        assert fragment in error.message, (fragment, error.message)


def server_errors(url: str) -> float:
    """Requests other than /health and /ready (503 while loading) answered with a 5xx, from
    the service's Prometheus counters."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if (
            line.startswith("reward_requests_total{")
            and 'status="5' in line
            and not any(f'route="{r}"' in line for r in ("/health", "/ready"))
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ----------------------------------------------------------------------------- load
def test_concurrent_mixed_load_has_no_errors_and_exact_scores(
    main_service: str, pool: list[dict[str, Any]], expected: list[float]
) -> None:
    results, _ = asyncio.run(run_load(main_service, pool, clients=64, requests=4, seed=1))
    assert len(results) == 256
    failed = [(r.status, r.error[:200]) for r in results if r.status != 200]
    assert failed == []
    assert mismatches(results, expected, atol=1e-5) == []
    sizes = {len(r.indices) for r in results}
    assert min(sizes) == 1 and max(sizes) == 16  # the sizes really were mixed
    assert sum(len(r.indices) for r in results) == sum(len(r.scores) for r in results)


# ----------------------------------------------------------------------------- overload
def test_overload_is_429_with_retry_after_memory_levels_off_and_service_recovers(
    services: dict[str, Service], pool: list[dict[str, Any]], expected: list[float]
) -> None:
    service = services["guarded"]
    pid = service.process.pid
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"items": pool[:16]}
    rss = [memory_kb(pid)["VmRSS"]]
    rounds: list[list[Result]] = []
    with service.slow_model(0.05):
        for _ in range(3):
            rounds.append(asyncio.run(_burst_with_key(service.url, body, 64, headers)))
            rss.append(memory_kb(pid)["VmRSS"])
    for results in rounds:
        # No timeout or transport error (status None), no 5xx: only scored or refused.
        statuses = {r.status for r in results}
        assert statuses <= {200, 429}, [r.error[:200] for r in results if r.status != 200]
        rejected = [r for r in results if r.status == 429]
        assert rejected, "the burst never filled the queue"
        assert len(rejected) < len(results), "nothing of the burst was scored"
        for r in rejected:
            assert r.retry_after is not None and int(r.retry_after) >= 1
            assert json.loads(r.error)["error"]["type"] == "queue_full"
        assert mismatches(results, [expected[i] for i in range(16)]) == []
    # Memory: refused requests are not kept; after the first burst RSS stays flat.
    assert rss[-1] - rss[1] < 32 * 1024, rss
    assert rss[-1] - rss[0] < 128 * 1024, rss
    # Serves normally afterwards.
    response = httpx.post(f"{service.url}/score", json=body, headers=headers, timeout=30)
    assert response.status_code == 200
    assert response.json()["scores"] == pytest.approx(expected[:16], abs=1e-5)
    assert server_errors(service.url) == 0


async def _burst_with_key(
    url: str, body: dict[str, Any], n: int, headers: dict[str, str]
) -> list[Result]:
    results = await burst(url, body, n, headers=headers)
    for r in results:  # every answer that scored has all 16 items, in order
        if r.status == 200:
            r.indices = list(range(16))
    return results


# ----------------------------------------------------------------------------- bad input
def _j(obj: Any) -> bytes:
    return json.dumps(obj).encode()


JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Bad:
    """A malformed request: body (or a function of the route's valid body with one text slot),
    extra headers, method, and the expected status, error type and message fragments."""

    body: bytes | Callable[[Callable[[bytes], bytes]], bytes]
    status: int
    type: str
    fragments: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    method: str = "POST"


_MSG = {"role": "user", "content": "hi"}
_ITEM = {"text": "a"}

SCORE_CASES: dict[str, Bad] = {
    # types
    "items-null": Bad(_j({"items": None}), 422, "validation_error", ("items:",)),
    "items-object": Bad(_j({"items": _ITEM}), 422, "validation_error", ("items:", "list")),
    "items-of-strings": Bad(_j({"items": ["a"]}), 422, "validation_error", ("items[0]:",)),
    "items-of-nulls": Bad(_j({"items": [None]}), 422, "validation_error", ("items[0]:",)),
    "text-list": Bad(_j({"items": [{"text": ["a"]}]}), 422, "validation_error",
                     ("items[0].text:", "string")),
    "text-object": Bad(_j({"items": [{"text": {"a": 1}}]}), 422, "validation_error",
                       ("items[0].text:",)),
    "text-bool": Bad(_j({"items": [{"text": True}]}), 422, "validation_error", ("items[0].text",)),
    "text-NaN": Bad(b'{"items": [{"text": NaN}]}', 422, "validation_error", ("items[0].text",)),
    "text--Infinity": Bad(b'{"items": [{"text": -Infinity}]}', 422, "validation_error",
                          ("items[0].text",)),
    "text-null-only": Bad(_j({"items": [{"text": None}]}), 422, "validation_error",
                          ("items[0]:", "exactly one")),
    "prompt-number": Bad(_j({"items": [{"prompt": 1, "completion": "c"}]}), 422,
                         "validation_error", ("items[0].prompt",)),
    "completion-as-messages": Bad(_j({"items": [{"prompt": "p", "completion": [_MSG]}]}), 422,
                                  "validation_error", ("items[0].completion",)),
    "prompt-messages-without-completion": Bad(_j({"items": [{"prompt": [_MSG]}]}), 422,
                                              "validation_error", ("items[0]:", "together")),
    "prompt-empty-message-list": Bad(_j({"items": [{"prompt": [], "completion": "c"}]}), 422,
                                     "validation_error", ("items[0]:", "must not be empty")),
    "duplicate-items-key": Bad(b'{"items": [{"text": "a"}], "items": 5}', 422,
                               "validation_error", ("items:",)),
    # invalid messages
    "messages-string": Bad(_j({"items": [{"messages": "hi"}]}), 422, "validation_error",
                           ("items[0].messages",)),
    "messages-of-strings": Bad(_j({"items": [{"messages": ["hi"]}]}), 422, "validation_error",
                               ("items[0].messages[0]",)),
    "role-missing": Bad(_j({"items": [{"messages": [{"content": "hi"}]}]}), 422,
                        "validation_error", ("items[0].messages[0].role", "required")),
    "role-wrong-case": Bad(_j({"items": [{"messages": [{"role": "User", "content": "hi"}]}]}),
                           422, "validation_error", ("items[0].messages[0].role",)),
    "content-null": Bad(_j({"items": [{"messages": [{"role": "user", "content": None}]}]}), 422,
                        "validation_error", ("items[0].messages[0].content",)),
    "content-as-parts": Bad(
        _j({"items": [{"messages": [{"role": "user", "content": [{"type": "text"}]}]}]}), 422,
        "validation_error", ("items[0].messages[0].content",),
    ),
    "message-extra-field": Bad(
        _j({"items": [{"messages": [{**_MSG, "name": "bob"}]}]}), 422, "validation_error",
        ("items[0].messages[0].name", "Extra"),
    ),
    "bad-message-deep-in-batch": Bad(
        _j({"items": [_ITEM, _ITEM, {"messages": [_MSG] * 4 + [{"role": "user"}]}]}), 422,
        "validation_error", ("items[2].messages[4].content",),
    ),
    # values
    "label-float": Bad(_j({"items": [_ITEM], "label": 0.5}), 422, "validation_error", ("label",)),
    "label-NaN": Bad(b'{"items": [{"text": "a"}], "label": NaN}', 422, "validation_error",
                     ("label", "finite")),
    "label-overflow": Bad(b'{"items": [{"text": "a"}], "label": 1e999}', 422,
                          "validation_error", ("label",)),
    "label-negative": Bad(_j({"items": [_ITEM], "label": -1}), 422, "validation_error",
                          ("unknown label -1",)),
    "label-list": Bad(_j({"items": [_ITEM], "label": [0]}), 422, "validation_error", ("label",)),
    "return-logits-word": Bad(_j({"items": [_ITEM], "return_logits": "maybe"}), 422,
                              "validation_error", ("return_logits", "boolean")),
    "huge-integer-text": Bad(b'{"items": [{"text": 1' + b"0" * 5000 + b"}]}", 400,
                             "invalid_json", ("number out of range",)),
    # sizes and nesting
    "300k-items": Bad(b'{"items": [' + b",".join([b"{}"] * 300_000) + b"]}", 413,
                      "too_many_items", ("300000 items", f"max_items_per_request {MAX_ITEMS}")),
    "250k-bad-messages": Bad(
        b'{"items": [{"messages": [' + b",".join([b"{}"] * 250_000) + b"]}]}", 422,
        "validation_error", ("items[0].messages[0].role",),
    ),
    "deep-nesting-items": Bad(b'{"items": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 400,
                              "invalid_json", ("recursion limit",)),
    "deep-nesting-text": Bad(
        b'{"items": [{"text": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_000 + b"}]}", 400,
        "invalid_json", ("recursion limit",),
    ),
}  # fmt: skip

GET_REWARD_CASES: dict[str, Bad] = {
    "query-null": Bad(_j({"query": None}), 422, "validation_error", ("query:",)),
    "query-object": Bad(_j({"query": {"a": "b"}}), 422, "validation_error", ("query:",)),
    "query-of-nulls": Bad(_j({"query": [None]}), 422, "validation_error", ("query[0]:",)),
    "query-of-lists": Bad(_j({"query": [["a"]]}), 422, "validation_error", ("query[0]:",)),
    "query-NaN": Bad(b'{"query": [NaN]}', 422, "validation_error", ("query[0]:",)),
    "score-body-on-get-reward": Bad(_j({"items": [_ITEM]}), 422, "validation_error",
                                    ("query: Field required", "items: Extra")),
    "query-extra-field": Bad(_j({"query": ["a"], "extra": 1}), 422, "validation_error",
                             ("extra:",)),
    "300k-queries": Bad(b'{"query": [' + b",".join([b'""'] * 300_000) + b"]}", 413,
                        "too_many_items", ("300000 items",)),
    "deep-nesting-query": Bad(b'{"query": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 400,
                              "invalid_json", ("recursion limit",)),
}  # fmt: skip

# Route-independent cases: ``valid(text)`` is the route's valid body with ``text`` (raw bytes)
# as its one string.
COMMON_CASES: dict[str, Bad] = {
    # encodings
    "latin-1-bytes": Bad(lambda valid: valid(b"caf\xe9"), 400, "invalid_encoding", ("UTF-8",)),
    "overlong-utf8": Bad(lambda valid: valid(b"\xc0\xaf"), 400, "invalid_encoding", ("UTF-8",)),
    "utf-16-with-bom": Bad(lambda valid: valid(b"a").decode().encode("utf-16"), 400,
                           "invalid_encoding", ("UTF-8",)),
    "utf-8-bom": Bad(lambda valid: b"\xef\xbb\xbf" + valid(b"a"), 400, "invalid_json"),
    "lone-surrogate-escape": Bad(lambda valid: valid(b"\\udc00"), 400, "invalid_json",
                                 ("surrogate",)),
    "gzip-without-support": Bad(lambda valid: gzip.compress(valid(b"a")), 400,
                                "invalid_encoding",
                                headers=(("Content-Type", "application/json"),
                                         ("Content-Encoding", "gzip"))),
    # JSON syntax
    "empty-body": Bad(b"", 400, "invalid_json", ("EOF",)),
    "whitespace-body": Bad(b" \n\t", 400, "invalid_json"),
    "truncated-json": Bad(lambda valid: valid(b"abc")[:-4], 400, "invalid_json"),
    "trailing-garbage": Bad(lambda valid: valid(b"a") + b" x", 400, "invalid_json",
                            ("trailing",)),
    "single-quotes": Bad(lambda valid: valid(b"a").replace(b'"', b"'"), 400, "invalid_json"),
    "trailing-comma": Bad(lambda valid: valid(b"a")[:-1] + b",}", 400, "invalid_json"),
    # body types
    "body-string": Bad(_j("abc"), 422, "validation_error", ("body:",)),
    "body-null": Bad(b"null", 422, "validation_error", ("body:",)),
    "body-number": Bad(b"42", 422, "validation_error", ("body:",)),
    "long-unknown-key": Bad(lambda valid: valid(b"a")[:-1] + b', "' + b"k" * 1000 + b'": 1}',
                            422, "validation_error", ("kkk...",)),
    # size
    "oversized-body": Bad(lambda valid: valid(b"great " * (MAX_BODY // 6)), 413,
                          "body_too_large", (f"max_body_bytes {MAX_BODY}",)),
    # content types
    "form-urlencoded": Bad(b"items=a", 415, "unsupported_media_type",
                           ("application/x-www-form-urlencoded",),
                           headers=(("Content-Type", "application/x-www-form-urlencoded"),)),
    "multipart": Bad(b"--b\r\n\r\na\r\n--b--\r\n", 415, "unsupported_media_type",
                     ("multipart/form-data",),
                     headers=(("Content-Type", "multipart/form-data; boundary=b"),)),
    "xml": Bad(b"<items/>", 415, "unsupported_media_type", ("application/xml",),
               headers=(("Content-Type", "application/xml"),)),
    "json-lookalike-type": Bad(lambda valid: valid(b"a"), 415, "unsupported_media_type",
                               ("application/jsonp",),
                               headers=(("Content-Type", "application/jsonp"),)),
    # methods
    "PUT": Bad(lambda valid: valid(b"a"), 405, "method_not_allowed", method="PUT"),
    "DELETE": Bad(b"", 405, "method_not_allowed", method="DELETE"),
    "PATCH": Bad(lambda valid: valid(b"a"), 405, "method_not_allowed", method="PATCH"),
}  # fmt: skip

_VALID: dict[str, Callable[[bytes], bytes]] = {
    "/score": lambda text: b'{"items": [{"text": "' + text + b'"}]}',
    "/get_reward": lambda text: b'{"query": ["' + text + b'"]}',
}
MATRIX: list[tuple[str, str, Bad]] = [
    *(("/score", name, case) for name, case in SCORE_CASES.items()),
    *(("/get_reward", name, case) for name, case in GET_REWARD_CASES.items()),
    *((route, name, case) for name, case in COMMON_CASES.items() for route in _VALID),
]


def _body(route: str, case: Bad) -> bytes:
    return case.body if isinstance(case.body, bytes) else case.body(_VALID[route])


@pytest.fixture(scope="module")
def fresh(main_service: str) -> Iterator[httpx.Client]:
    """A client that opens a new connection per request (a 413 closes the one it came on)."""
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=main_service, timeout=30, limits=limits) as client:
        yield client


def _send_bad(http: httpx.Client, route: str, case: Bad) -> httpx.Response:
    return http.request(case.method, route, content=_body(route, case), headers=dict(case.headers))


def test_the_matrix_is_comprehensive() -> None:
    kinds = {name for _, name, _ in MATRIX}
    assert len(kinds) >= 60 and len(MATRIX) >= 80
    assert {c.status for _, _, c in MATRIX} == {400, 405, 413, 415, 422}


@pytest.mark.parametrize(
    ("route", "case"), [(r, c) for r, _, c in MATRIX], ids=[f"{r[1:]}-{n}" for r, n, _ in MATRIX]
)
def test_malformed_request(fresh: httpx.Client, route: str, case: Bad) -> None:
    response = _send_bad(fresh, route, case)
    assert_error(response, case.status, case.type, *case.fragments)
    if case.fragments == ("kkk...",):  # an unknown key is named, but never echoed in full
        assert len(response.json()["error"]["message"]) < 300


def test_service_is_healthy_and_exact_after_the_whole_matrix(
    services: dict[str, Service], fresh: httpx.Client, ref: Reference
) -> None:
    url = services["main"].url
    for route, _, case in MATRIX:  # again, in a row (the large bodies ran above already)
        if len(_body(route, case)) > 65_536:
            continue
        assert 400 <= _send_bad(fresh, route, case).status_code < 500
    assert server_errors(url) == 0
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").json() == {"status": "ready"}
    text = "the story was lovely and the acting was superb ."
    response = httpx.post(f"{url}/score", json={"items": [{"text": text}]})
    assert response.json()["scores"] == pytest.approx([ref.score({"text": text})], abs=1e-5)
    log = services["main"].log.read_text()
    assert "unhandled" not in log and "Traceback" not in log


# ----------------------------------------------------------------------------- security
def _app_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, docs included."""
    app = create_app(ServiceSettings(model="unused", api_key=API_KEY))
    pairs = []
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                pairs.append((method, route.path))
    return pairs


def test_every_route_but_health_ready_metrics_needs_the_key(
    services: dict[str, Service],
) -> None:
    url = services["guarded"].url
    routes = _app_routes()
    paths = {path for _, path in routes}
    assert {"/score", "/get_reward", "/info", "/docs", "/openapi.json"} <= paths
    assert {"/classify", "/pooling", "/predict", "/v1/models"} <= paths
    assert {"/health", "/ready", "/metrics"} == PUBLIC_ROUTES
    assert paths >= PUBLIC_ROUTES
    bodies = {
        "/score": {"items": [{"text": "good"}]}, "/get_reward": {"query": ["good"]},
        "/classify": {"input": "good"}, "/pooling": {"input": "good"},
        "/predict": {"inputs": "good"},
    }  # fmt: skip
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=url, timeout=30) as http:
        for method, path in routes:
            body = bodies.get(path)
            if path in PUBLIC_ROUTES:
                assert http.request(method, path).status_code == 200, path
                continue
            for headers in (
                {},
                {"X-API-Key": API_KEY + "x"},
                {"Authorization": f"Bearer {API_KEY[:-1]}"},
                {"Authorization": f"Basic {API_KEY}"},
                {"Authorization": API_KEY},
            ):
                response = http.request(method, path, json=body, headers=headers)
                assert_error(response, 401, "unauthorized", "API key")
                assert response.headers["www-authenticate"] == "Bearer"
            for headers in (bearer, {"X-API-Key": API_KEY}):
                response = http.request(method, path, json=body, headers=headers)
                assert response.status_code == 200, (method, path, response.text[:200])
        # What is not a route reveals nothing without the key either.
        assert_error(http.get("/nope"), 401, "unauthorized")
        assert_error(http.get("/score"), 401, "unauthorized")
        assert_error(http.get("/nope", headers=bearer), 404, "not_found")
        # The live schema lists no path the enumeration above missed.
        spec = http.get("/openapi.json", headers=bearer).json()
        assert set(spec["paths"]) <= paths


def test_key_and_request_texts_never_reach_the_log(
    services: dict[str, Service], demo_models: Any, pool: list[dict[str, Any]]
) -> None:
    service = services["guarded"]
    url = service.url
    key = {"X-API-Key": API_KEY}
    texts = [f"{SECRET}-{k}" for k in range(8)]
    with httpx.Client(base_url=url, timeout=30) as http:
        sent = [
            http.post("/score", json={"items": [{"text": texts[0]}]}, headers=key),
            http.post("/get_reward", json={"query": [texts[1]]}, headers=key),
            http.post("/score", json={"items": [{"messages": [{"role": "user",
                                                               "content": texts[2]}]}]},
                      headers=key),
            http.post("/score", json={"items": [{"text": texts[3]}]}),  # no key
            http.post("/score", json={"items": [{"text": texts[4]}]},
                      headers={"X-API-Key": API_KEY + "-wrong"}),
            http.post("/score", json={"items": [{"text": texts[5], "oops": texts[5]}]},
                      headers=key),  # 422
            http.post("/score", content=f'{{"items": [{{"text": "{texts[6]}"'.encode(),
                      headers={**key, **JSON}),  # truncated JSON: 400
            http.post("/score", json={"items": [{"text": texts[7]}] * 17}, headers=key),  # 413
        ]  # fmt: skip
    assert [r.status_code for r in sent] == [200, 200, 200, 401, 401, 422, 400, 413]
    time.sleep(0.2)  # the access log line of the last request
    log = service.log.read_text()
    assert '"POST /score HTTP/1.1" 413' in log  # the access log is on
    assert API_KEY not in log
    assert SECRET not in log
    # Nor the texts of the overload bursts (200s and 429s), when that test ran before.
    for item in pool[:16]:
        for text in _strings(item):
            assert len(text) < 12 or text not in log
    # The settings never print the key either.
    assert API_KEY not in repr(ServiceSettings(model=str(demo_models.reward), api_key=API_KEY))


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_api_key_is_refused_at_startup(blank: str) -> None:
    with pytest.raises(ValidationError, match="API key is empty"):
        ServiceSettings(model="m", api_key=blank)
    proc = subprocess.run(
        [sys.executable, "-m", "reward_service", "--model", "m", "--api-key", blank],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--api-key / REWARD_API_KEY: Value error, the API key is empty" in proc.stderr
    assert "got" not in proc.stderr.split("API key is empty")[1]  # not even a blank one echoed


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for name in ("tcp", "tcp6"):
        table = Path(f"/proc/net/{name}")
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if name == "tcp":
                    found.add(".".join(str(b) for b in reversed(raw)))
                else:
                    words = [raw[i : i + 4][::-1].hex() for i in range(0, 16, 4)]
                    found.add("ipv6:" + "".join(words))
    return found


def test_binds_to_loopback_by_default(
    services: dict[str, Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REWARD_HOST", raising=False)
    assert ServiceSettings(model="m").host == "127.0.0.1"
    guarded = services["guarded"]  # started without --host and without REWARD_HOST
    assert "--host" not in guarded.process.args
    assert _listening_addresses(guarded.port) == {"127.0.0.1"}


def test_listening_address_check_sees_other_interfaces() -> None:
    """The /proc check above can fail: a socket on all interfaces reads 0.0.0.0."""
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        assert _listening_addresses(s.getsockname()[1]) == {"0.0.0.0"}


def _model_process(service_pid: int) -> int:
    """The pid of the service's model process: its child started by multiprocessing's spawn
    (the other child is multiprocessing's resource tracker)."""
    tasks = Path(f"/proc/{service_pid}/task")
    children = [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]
    (pid,) = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return pid


def test_model_process_death_stops_the_service_and_a_killed_service_takes_it_along(
    demo_models: Any, tmp_path: Path
) -> None:
    """The model runs in a child of the service: if it dies the service exits 1 (a restart
    policy brings it back), and if the service is SIGKILLed the child does not outlive it."""
    first = launch(demo_models.reward, tmp_path / "first.log")
    second = launch(demo_models.reward, tmp_path / "second.log")
    try:
        first.wait_ready()
        second.wait_ready()
        model_process = _model_process(first.process.pid)
        os.kill(model_process, signal.SIGKILL)
        assert first.process.wait(30) == 1
        assert "the model process exited (exit code -9)" in first.log.read_text()
        orphan = _model_process(second.process.pid)
        second.process.kill()
        second.process.wait(10)
        assert exited_within(orphan, 30), "the model process outlived its service"
    finally:
        first.stop()
        second.stop()


# ----------------------------------------------------------------------------- SIGTERM (last)
def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(
    services: dict[str, Service], pool: list[dict[str, Any]], expected: list[float]
) -> None:
    """Stops the guarded service, so it runs last."""
    service = services["guarded"]
    url = service.url
    key = {"X-API-Key": API_KEY}
    batches = [list(range(k, k + 8)) for k in (0, 8, 16)]
    model_process = 0

    async def run() -> tuple[list[httpx.Response], list[str], bool]:
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=key) as http:

            def send(idx: list[int]) -> asyncio.Task[httpx.Response]:
                body = {"items": [pool[i] for i in idx]}
                return asyncio.create_task(http.post("/score", json=body))

            tasks = [send(batches[0])]
            await asyncio.sleep(0.3)  # the first request is in its (1 s) forward pass...
            tasks += [send(idx) for idx in batches[1:]]
            deadline = time.monotonic() + 10
            while _metric(url, "reward_queue_depth") < 16:  # ...and the others wait for it
                assert time.monotonic() < deadline, "the requests never queued"
                await asyncio.sleep(0.01)
            nonlocal model_process
            model_process = _model_process(service.process.pid)
            service.process.send_signal(signal.SIGTERM)
            refusals: list[str] = []
            deadline = time.monotonic() + 10
            while "connection refused" not in refusals and time.monotonic() < deadline:
                try:
                    response = await asyncio.to_thread(
                        httpx.post, f"{url}/score", json={"items": [pool[0]]}, headers=key
                    )
                    assert_error(response, 503, "draining")
                    refusals.append("503 draining")
                except httpx.ConnectError:
                    refusals.append("connection refused")
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    # Accepted just as uvicorn stopped listening: closed idle, or reset with
                    # the listening socket (the kernel had queued the connection).
                    refusals.append("closed unanswered")
                await asyncio.sleep(0.02)
            in_flight = not all(t.done() for t in tasks)  # refused while still scoring
            return await asyncio.gather(*tasks), refusals, in_flight

    with service.slow_model(1.0):  # scoring takes ~2 s from here on
        responses, refusals, in_flight = asyncio.run(run())
    assert in_flight and "connection refused" in refusals, refusals
    assert [r.status_code for r in responses] == [200, 200, 200]
    for response, idx in zip(responses, batches, strict=True):
        assert response.json()["scores"] == pytest.approx([expected[i] for i in idx], abs=1e-5)
    code = service.process.wait(30)
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM it handled
    log = service.log.read_text()
    assert "Shutting down" in log and "Finished server process" in log
    assert exited_within(model_process, 10), "the model process outlived its service"


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
