"""Reward client over real HTTP: fault-injecting fake replicas (real uvicorn servers on free
loopback ports, scripted with 429/503/dropped connections/timeouts/4xx/redeploys), a closed
port for a dead replica, and one check against the real reward service."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from common.client import (
    MAX_RETRY_AFTER_S,
    AsyncRewardClient,
    RewardClient,
    RewardServiceError,
    RewardServiceUnavailable,
    backoff_delay,
    parse_retry_after,
    split_urls,
)
from common.schemas import ScoreItem
from tests.support import serve, wait_ready

API_KEY = "client-test-key-123"
SECRET_TEXT = "okapi-marker-never-logged"
FAST = {"backoff_base": 0.02, "backoff_max": 0.05}  # keep retry tests quick


# ----------------------------------------------------------------------------- fake replica
@dataclass
class Fault:
    """One scripted answer: an error envelope with ``status``, a dropped connection
    (``drop``), a delay before answering normally (``sleep``), a short score list
    (``short``), or a normal answer with another weights hash (``weights_hash``)."""

    status: int | None = None
    type: str = ""
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    sleep: float = 0.0
    short: bool = False
    weights_hash: str | None = None


@dataclass
class Replica:
    """A fake reward service: answers with ``len(text)`` scores unless a fault is scripted."""

    name: str
    url: str = ""
    weights_hash: str = "hash-a"
    script: deque[Fault] = field(default_factory=deque)
    seen: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.weights_hash = "hash-a"
            self.script.clear()
            self.seen.clear()

    def take(self, request: Request, body: Any) -> Fault:
        with self.lock:
            self.seen.append(
                {
                    "path": request.url.path,
                    "auth": request.headers.get("authorization"),
                    "body": body,
                }
            )
            return self.script.popleft() if self.script else Fault()

    def paths(self, path: str = "/score") -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.seen if s["path"] == path]


def _text_of(item: dict[str, Any]) -> str:
    return item.get("text") or item.get("prompt", "") + item.get("completion", "")


async def _dropped() -> AsyncIterator[bytes]:
    yield b'{"scores": ['
    raise ConnectionAbortedError("fault injected: connection dropped mid-response")


def fake_app(replica: Replica) -> FastAPI:
    app = FastAPI()

    async def answer(request: Request, ok: Callable[[Fault, Any], dict[str, Any]]) -> Response:
        body = await request.json() if request.method == "POST" else None
        fault = replica.take(request, body)
        if fault.drop:  # headers go out, then the connection dies
            return StreamingResponse(_dropped(), media_type="application/json")
        if fault.status is not None:
            error = {"error": {"type": fault.type, "message": fault.message}}
            return JSONResponse(error, status_code=fault.status, headers=fault.headers)
        await asyncio.sleep(fault.sleep)
        if fault.weights_hash is not None:
            replica.weights_hash = fault.weights_hash
        return JSONResponse(ok(fault, body))

    @app.post("/score")
    async def score(request: Request) -> Response:
        def ok(fault: Fault, body: dict[str, Any]) -> dict[str, Any]:
            shift = body.get("label") or 0  # makes the label visible in the scores
            scores = [float(len(_text_of(i)) + shift) for i in body["items"]]
            if fault.short:
                scores = scores[:-1]
            n = len(scores)
            return {
                "scores": scores,
                "num_tokens": [1] * n,
                "truncated": [False] * n,
                "model_id": "fake-rm",
                "weights_hash": replica.weights_hash,
            }

        return await answer(request, ok)

    @app.get("/info")
    async def info(request: Request) -> Response:
        def ok(_: Fault, __: None) -> dict[str, Any]:
            return {
                "model_id": "fake-rm",
                "weights_hash": replica.weights_hash,
                "dtype": "float32",
                "device": "cpu",
                "num_labels": 1,
                "id2label": {"0": "LABEL_0"},
                "score_label": 0,
                "max_length": 512,
                "truncation_side": "left",
                "max_batch_size": 64,
                "max_batch_tokens": 8192,
                "max_items_per_request": 256,
                "has_chat_template": True,
            }

        return await answer(request, ok)

    return app


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def replicas() -> Iterator[tuple[Replica, Replica]]:
    a, b = Replica("a"), Replica("b")
    with serve(fake_app(a)) as url_a, serve(fake_app(b)) as url_b:
        a.url, b.url = url_a, url_b
        yield a, b


@pytest.fixture
def fakes(replicas: tuple[Replica, Replica]) -> tuple[Replica, Replica]:
    for replica in replicas:
        replica.reset()
    return replicas


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop in a thread, so async clients can be driven from sync test code."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


class Driver:
    """Calls a sync or an async client the same (blocking) way; thread-safe like both."""

    def __init__(self, client: RewardClient | AsyncRewardClient, loop: asyncio.AbstractEventLoop):
        self.client = client
        self.loop = loop

    def _wait(self, result: Any) -> Any:
        if isinstance(self.client, AsyncRewardClient):
            return asyncio.run_coroutine_threadsafe(result, self.loop).result(timeout=60)
        return result

    def score(self, items: list[Any], **kw: Any) -> Any:
        return self._wait(self.client.score(items, **kw))

    def info(self) -> Any:
        return self._wait(self.client.info())

    def close(self) -> None:
        if isinstance(self.client, AsyncRewardClient):
            self._wait(self.client.aclose())
        else:
            self.client.close()


@pytest.fixture(params=["sync", "async"])
def make(
    request: pytest.FixtureRequest, loop: asyncio.AbstractEventLoop
) -> Iterator[Callable[..., tuple[Driver, list[tuple[str, dict[str, Any]]]]]]:
    """``make(urls, **kwargs) -> (driver, events)`` for a RewardClient or AsyncRewardClient."""
    cls = RewardClient if request.param == "sync" else AsyncRewardClient
    drivers: list[Driver] = []

    def factory(urls: Any, **kwargs: Any) -> tuple[Driver, list[tuple[str, dict[str, Any]]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        lock = threading.Lock()

        def on_event(name: str, payload: dict[str, Any]) -> None:
            with lock:
                events.append((name, payload))

        driver = Driver(cls(urls, api_key=API_KEY, on_event=on_event, **kwargs), loop)
        drivers.append(driver)
        return driver, events

    yield factory
    for driver in drivers:
        driver.close()


def texts(*xs: str) -> list[dict[str, str]]:
    return [{"text": x} for x in xs]


def retries(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [payload for name, payload in events if name == "reward_retry"]


# ----------------------------------------------------------------------------- pure policy
def test_backoff_is_exponential_full_jitter_capped_and_honours_retry_after() -> None:
    assert [backoff_delay(r, base=0.5, cap=10, rand=lambda: 1.0) for r in (1, 2, 3, 6)] == [
        0.5,
        1.0,
        2.0,
        10,
    ]
    assert backoff_delay(3, base=0.5, cap=10, rand=lambda: 0.0) == 0.0
    assert backoff_delay(3, base=0.5, cap=10, rand=lambda: 0.25) == 0.5
    assert backoff_delay(1, base=0.5, cap=10, retry_after=3, rand=lambda: 1.0) == 3
    assert backoff_delay(9, base=0.5, cap=10, retry_after=3, rand=lambda: 1.0) == 10
    assert backoff_delay(1, base=0.5, cap=10, retry_after=1e6) == MAX_RETRY_AFTER_S


def test_parse_retry_after() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= parse_retry_after(in_ten) <= 10  # type: ignore[operator]


def test_split_urls() -> None:
    assert split_urls("http://h:1/") == ["http://h:1"]
    assert split_urls("http://h:1, http://g:2") == ["http://h:1", "http://g:2"]
    assert split_urls(["https://h/rm/"]) == ["https://h/rm"]
    for bad in ("", "h:1", "ftp://h:1", []):
        with pytest.raises(ValueError, match="URL"):
            split_urls(bad)


# ----------------------------------------------------------------------------- behaviour
def test_scores_in_order_with_auth_and_identity(make, fakes, caplog) -> None:
    a, _ = fakes
    caplog.set_level(logging.DEBUG)
    client, events = make(a.url)
    items = [ScoreItem(text="abc"), {"prompt": "hi ", "completion": SECRET_TEXT}, {"text": "x"}]
    result = client.score(items)
    assert result.scores == [3.0, 3.0 + len(SECRET_TEXT), 1.0]
    assert client.score(texts("abcd"), label=2).scores == [6.0]  # the label reaches the service
    assert [s["auth"] for s in a.seen] == [f"Bearer {API_KEY}"] * 2
    assert a.seen[0]["body"]["items"][0] == {"text": "abc"}  # no null fields sent
    assert (client.client.model_id, client.client.weights_hash) == ("fake-rm", "hash-a")
    assert f"reward model fake-rm (hash hash-a) at {a.url}" in caplog.messages
    assert events == []
    assert API_KEY not in caplog.text and SECRET_TEXT not in caplog.text
    with pytest.raises(ValueError, match="empty"):
        client.score([])


@pytest.mark.slow
def test_least_outstanding_routing_then_round_robin(make, fakes) -> None:
    a, b = fakes
    client, _ = make([a.url, b.url])
    for replica in fakes:  # 3 s: the four quick requests below must all fit inside it
        replica.script.append(Fault(sleep=3.0))
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.score, texts("slow"))
        deadline = time.monotonic() + 5
        while not (a.seen or b.seen):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        busy, idle = (a, b) if a.seen else (b, a)
        busy.script.clear()
        idle.script.clear()
        for i in range(4):  # the busy replica has one request outstanding: all go elsewhere
            client.score(texts(f"quick {i}"))
        assert len(idle.paths()) == 4 and len(busy.paths()) == 1
        assert not slow.done()
        slow.result()
    for i in range(4):  # both idle: ties alternate
        client.score(texts(f"after {i}"))
    assert len(idle.paths()) == 6 and len(busy.paths()) == 3


def test_concurrent_requests_spread_evenly_and_get_their_own_scores(make, fakes) -> None:
    a, b = fakes
    client, events = make([a.url, b.url])
    for replica in fakes:
        replica.script.extend(Fault(sleep=0.3) for _ in range(4))
    batches = [texts("y" * i, "z" * (2 * i)) for i in range(1, 9)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client.score, batches))
    assert [r.scores for r in results] == [[float(i), float(2 * i)] for i in range(1, 9)]
    assert (len(a.paths()), len(b.paths())) == (4, 4)
    assert events == []


def test_failover_from_a_dead_url_with_cooldown(make, fakes) -> None:
    a, _ = fakes
    dead = closed_port_url()
    client, events = make([dead, a.url], cooldown=0.5, **FAST)
    for i in range(4):
        assert client.score(texts("q" * (i + 1))).scores == [float(i + 1)]
    assert len(a.paths()) == 4
    failovers = retries(events)
    assert len(failovers) == 1  # marked down after the first refusal, then skipped
    assert failovers[0] == {
        "url": dead,
        "status": None,
        "reason": "connect_error",
        "attempt": 1,
        "delay_s": 0.0,
        "failover": True,
    }
    time.sleep(0.6)  # cooldown over: the dead URL is tried once more, then skipped again
    client.score(texts("again"))
    client.score(texts("again"))
    assert len(retries(events)) == 2 and len(a.paths()) == 6


def test_retries_503_dropped_connection_and_timeout(make, fakes, caplog) -> None:
    a, _ = fakes
    caplog.set_level(logging.DEBUG)
    # A timeout of 1 s, not less: a loaded 2-core CI machine can stall the fake replica's
    # thread for a few hundred ms, which must not time out the attempt meant to succeed.
    client, events = make(a.url, timeout=1.0, max_retries=3, **FAST)
    a.script.extend(
        [Fault(status=503, type="loading", message="the model is still loading"),
         Fault(drop=True),
         Fault(sleep=3.0)]
    )  # fmt: skip
    start = time.monotonic()
    assert client.score(texts("four", SECRET_TEXT)).scores == [4.0, float(len(SECRET_TEXT))]
    elapsed = time.monotonic() - start
    assert len(a.paths()) == 4
    assert [(e["status"], e["reason"], e["failover"]) for e in retries(events)] == [
        (503, "loading", False),
        (None, "remote_protocol_error", False),
        (None, "read_timeout", False),
    ]
    assert all(0 <= e["delay_s"] <= FAST["backoff_max"] for e in retries(events))
    assert 1.0 <= elapsed < 3.0  # one read timeout plus tiny backoffs, not the 3 s sleep
    assert API_KEY not in caplog.text and SECRET_TEXT not in caplog.text


def test_retry_after_is_honoured(make, fakes) -> None:
    a, _ = fakes
    client, events = make(a.url, **FAST)
    a.script.append(Fault(status=429, type="queue_full", headers={"Retry-After": "1"}))
    start = time.monotonic()
    assert client.score(texts("ok")).scores == [2.0]
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 2.5  # backoff alone is at most 0.05 s here
    assert [(e["status"], e["reason"], e["delay_s"]) for e in retries(events)] == [
        (429, "queue_full", 1.0)
    ]


def test_4xx_fails_fast_with_the_service_message(make, fakes) -> None:
    a, b = fakes
    client, events = make([a.url, b.url], **FAST)
    for replica in fakes:
        replica.script.append(
            Fault(status=422, type="validation_error", message="items[1].completion: required")
        )
    with pytest.raises(RewardServiceError) as caught:
        client.score(texts("a", "b"))
    err = caught.value
    assert not isinstance(err, RewardServiceUnavailable)
    assert (err.status, err.type, err.message) == (
        422,
        "validation_error",
        "items[1].completion: required",
    )
    assert err.url in (a.url, b.url) and "items[1].completion" in str(err)
    assert len(a.seen) + len(b.seen) == 1 and events == []  # neither retried nor failed over
    a.script.append(Fault(status=401, type="unauthorized", message="missing or wrong API key"))
    with pytest.raises(RewardServiceError, match="wrong API key") as caught:
        client.info()  # misconfiguration is raised, not skipped like an unreachable URL
    assert caught.value.status == 401


def test_retries_exhausted_raise_unavailable(make, fakes) -> None:
    a, _ = fakes
    client, events = make(a.url, max_retries=2, **FAST)
    a.script.extend(Fault(status=503, type="draining", message="shutting down") for _ in range(5))
    with pytest.raises(RewardServiceUnavailable, match="draining") as caught:
        client.score(texts("a"))
    assert (caught.value.status, caught.value.type) == (503, "draining")
    assert len(a.paths()) == 3 and len(retries(events)) == 2

    dead, _ = make([closed_port_url(), closed_port_url()], max_retries=1, **FAST)
    with pytest.raises(RewardServiceUnavailable) as caught:
        dead.score(texts("a"))
    assert (caught.value.status, caught.value.type) == (None, "connect_error")


def test_invalid_response_is_an_error_not_a_score(make, fakes) -> None:
    a, _ = fakes
    client, events = make(a.url, **FAST)
    a.script.append(Fault(short=True))
    with pytest.raises(RewardServiceError, match="sent 3 items but got 2 scores") as caught:
        client.score(texts("a", "b", "c"))
    assert caught.value.type == "invalid_response" and len(a.paths()) == 1 and events == []


def test_weights_hash_change_is_an_event(make, fakes, caplog) -> None:
    a, _ = fakes
    client, events = make(a.url)
    client.score(texts("a"))
    assert client.client.weights_hash == "hash-a"
    a.script.append(Fault(weights_hash="hash-b"))
    with caplog.at_level(logging.WARNING, logger="common.client"):
        client.score(texts("a"))
        client.score(texts("a"))  # same new hash: no second event
    assert events == [
        (
            "reward_model_changed",
            {"old_hash": "hash-a", "new_hash": "hash-b", "model_id": "fake-rm", "url": a.url},
        )
    ]
    assert client.client.weights_hash == "hash-b"
    assert any("hash-a -> hash-b" in r.message for r in caplog.records)


def test_info_skips_unreachable_urls(make, fakes) -> None:
    a, b = fakes
    b.weights_hash = "hash-b"
    client, _ = make([closed_port_url(), a.url, b.url], max_retries=1, **FAST)
    infos = client.info()
    assert [i.weights_hash for i in infos] == ["hash-a", "hash-b"]
    assert len(a.paths("/info")) == 1 and len(b.paths("/info")) == 1
    assert client.client.model_id == "fake-rm"
    nobody, _ = make([closed_port_url()], max_retries=1, **FAST)
    with pytest.raises(RewardServiceUnavailable, match="none of 1"):
        nobody.info()


def test_async_client_native_use(fakes) -> None:
    a, b = fakes
    for replica in fakes:
        replica.script.extend(Fault(sleep=0.2) for _ in range(3))

    async def main() -> list[list[float]]:
        async with AsyncRewardClient([a.url, b.url], max_connections=4) as client:
            infos = await client.info()
            assert len(infos) == 2
            results = await asyncio.gather(*(client.score(texts("w" * i)) for i in range(1, 7)))
            return [r.scores for r in results]

    assert asyncio.run(main()) == [[float(i)] for i in range(1, 7)]
    assert len(a.paths()) == len(b.paths()) == 3


# ----------------------------------------------------------------------------- real service
@pytest.fixture(scope="module")
def real_service(reward_path: Path) -> Iterator[str]:
    """The demo reward model with an API key, in this process."""
    from reward_service.app import create_app
    from reward_service.settings import ServiceSettings

    with serve(create_app(ServiceSettings(model=str(reward_path), api_key=API_KEY))) as url:
        wait_ready(url)
        yield url


@pytest.mark.slow
def test_against_the_real_service(make, real_service) -> None:
    client, events = make(real_service)
    items = [
        {"text": "a great and wonderful day"},
        {"prompt": "The food was", "completion": " awful and bland."},
        {"messages": [{"role": "user", "content": "How was it?"},
                      {"role": "assistant", "content": "Lovely, really nice."}]},
    ]  # fmt: skip
    direct = httpx.post(
        f"{real_service}/score",
        json={"items": items},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).json()
    result = client.score(items)
    assert result.scores == direct["scores"]
    assert len(set(result.scores)) == 3  # really scored, not placeholders
    (info,) = client.info()
    assert (
        (client.client.model_id, client.client.weights_hash)
        == (
            info.model_id,
            info.weights_hash,
        )
        == (direct["model_id"], direct["weights_hash"])
    )
    with pytest.raises(RewardServiceError, match=r"items\[0\]") as caught:
        client.score([{"text": 5}])
    assert caught.value.status == 422 and events == []
