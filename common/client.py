"""HTTP client of the reward service, sync and async: pooled, retrying, routing over replicas.

Both :class:`RewardClient` and :class:`AsyncRewardClient` run the same sans-I/O request plan
(:meth:`_Core.plan`, a generator that yields "send to this URL" / "sleep this long" steps), so
the retry, failover and routing policy exists once; each class only does the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Collection, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from common.schemas import InfoResponse, ScoreItem, ScoreResponse

logger = logging.getLogger(__name__)

EventHook = Callable[[str, dict[str, Any]], None]
_Model = TypeVar("_Model", bound=BaseModel)

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# Retry rounds of a request before giving up. With the default backoff (0.5 s doubling, capped at
# 10 s, full jitter) twelve rounds wait at most ~85 s, ~43 s on average: long enough to ride out a
# redeploy of the service, short enough that a dead one fails the run within a minute or two.
DEFAULT_MAX_RETRIES = 12
# Where the trainer and the reward function read the API key from when none is given.
API_KEY_ENV = "REWARD_API_KEY"
# A server may ask for any Retry-After; past this we would rather fail than hang a training run.
MAX_RETRY_AFTER_S = 60.0
# Transport errors after which a URL is presumed dead for a cooldown. A read timeout is not one:
# the server is alive, only slow.
_DOWN_ERRORS = (httpx.NetworkError, httpx.ConnectTimeout, httpx.RemoteProtocolError)
_RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_MAX_ERROR_TEXT = 300


class RewardServiceError(Exception):
    """The reward service refused a request, or answered something unusable.

    ``status`` is the HTTP status (None when no answer came), ``type`` and ``message`` come from
    the service's error envelope, ``url`` is the replica that answered last.
    """

    def __init__(self, status: int | None, type_: str, message: str, url: str) -> None:
        super().__init__(f"{url}: {type_} (HTTP {status}): {message}")
        self.status = status
        self.type = type_
        self.message = message
        self.url = url


class RewardServiceUnavailable(RewardServiceError):
    """Every retry on every URL failed with a connection error, timeout, 429 or 5xx."""


# ----------------------------------------------------------------------------- pure policy
def backoff_delay(
    retry: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number ``retry`` (1-based): exponential with full jitter.

    Uniform in ``[0, min(cap, base * 2**(retry-1))]``, but never less than the server's
    ``Retry-After`` (itself capped at :data:`MAX_RETRY_AFTER_S`).
    """
    jittered = rand() * min(cap, base * 2 ** (retry - 1))
    if retry_after is None:
        return jittered
    return max(min(retry_after, MAX_RETRY_AFTER_S), jittered)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """Base URLs from one URL, a comma/space separated string, or a sequence; validated."""
    raw = urls.replace(",", " ").split() if isinstance(urls, str) else list(urls)
    out = []
    for url in raw:
        parsed = httpx.URL(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"reward service URL {url!r} must look like http://HOST:PORT")
        out.append(str(parsed).rstrip("/"))
    if not out:
        raise ValueError("give at least one reward service URL")
    return out


def redact(url: str) -> str:
    """The URL without user:password, for logs and events."""
    return str(httpx.URL(url).copy_with(username=None, password=None))


def error_from_response(response: httpx.Response) -> tuple[str, str]:
    """``(type, message)`` from the service's ``{"error": {...}}`` envelope, or a fallback."""
    try:
        error = response.json()["error"]
        return str(error["type"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        text = response.text[:_MAX_ERROR_TEXT] or response.reason_phrase
        return "http_error", f"HTTP {response.status_code} without an error envelope: {text}"


# ----------------------------------------------------------------------------- shared state
@dataclass
class _Endpoint:
    """One replica: its URL, its connection pool, and what the router knows about it."""

    index: int
    url: str
    client: Any  # httpx.Client or httpx.AsyncClient
    outstanding: int = 0
    down_until: float = 0.0


class _Router:
    """Least-outstanding-requests routing (ties round-robin) with a cooldown for dead URLs.

    ``pick`` counts the request as outstanding; the caller must ``release`` it.
    """

    def __init__(self, endpoints: Sequence[_Endpoint], cooldown: float) -> None:
        self.endpoints = list(endpoints)
        self.cooldown = cooldown
        self._next = 0  # round-robin start among equally loaded URLs
        self._lock = threading.Lock()  # only held for bookkeeping, never across I/O

    def pick(self, avoid: Collection[int] = ()) -> _Endpoint:
        """The least loaded URL that is up and not in ``avoid``; else any up URL; else the one
        whose cooldown ends first (trying it beats giving up)."""
        now = time.monotonic()
        with self._lock:
            n = len(self.endpoints)
            order = [self.endpoints[(self._next + i) % n] for i in range(n)]
            up = [e for e in order if e.down_until <= now]
            fresh = [e for e in up if e.index not in avoid]
            if fresh or up:
                chosen = min(fresh or up, key=lambda e: e.outstanding)
            else:
                chosen = min(order, key=lambda e: e.down_until)
            self._next = (chosen.index + 1) % n
            chosen.outstanding += 1
            return chosen

    def acquire(self, endpoint: _Endpoint) -> _Endpoint:
        """Count a request to a URL chosen by the caller (not by :meth:`pick`)."""
        with self._lock:
            endpoint.outstanding += 1
            return endpoint

    def release(self, endpoint: _Endpoint) -> None:
        with self._lock:
            endpoint.outstanding -= 1

    def mark_down(self, endpoint: _Endpoint) -> bool:
        """Start (or extend) the URL's cooldown; True if it was up until now."""
        now = time.monotonic()
        with self._lock:
            was_up = endpoint.down_until <= now
            endpoint.down_until = now + self.cooldown
            return was_up

    def mark_up(self, endpoint: _Endpoint) -> None:
        with self._lock:
            endpoint.down_until = 0.0

    def has_fresh(self, avoid: Collection[int]) -> bool:
        """Whether some URL outside ``avoid`` is up (so a failed request can fail over now)."""
        now = time.monotonic()
        with self._lock:
            return any(e.index not in avoid and e.down_until <= now for e in self.endpoints)


@dataclass
class _Identity:
    """The reward model last seen (model id + weights hash); reports redeploys."""

    emit: Callable[[str, dict[str, Any]], None]
    model_id: str | None = None
    weights_hash: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def observe(self, model_id: str, weights_hash: str, url: str) -> None:
        with self.lock:
            old = self.weights_hash
            self.model_id, self.weights_hash = model_id, weights_hash
        if old is None:
            logger.info("reward model %s (hash %s) at %s", model_id, weights_hash, redact(url))
        elif old != weights_hash:
            logger.warning(
                "reward model changed: %s (hash %s -> %s) at %s",
                model_id, old, weights_hash, redact(url),
            )  # fmt: skip
            self.emit(
                "reward_model_changed",
                {"old_hash": old, "new_hash": weights_hash, "model_id": model_id,
                 "url": redact(url)},
            )  # fmt: skip


@dataclass(frozen=True)
class _Send:
    """Plan step: send the request to ``endpoint`` (already counted as outstanding)."""

    endpoint: _Endpoint


@dataclass(frozen=True)
class _Sleep:
    """Plan step: wait ``seconds`` before the next attempt."""

    seconds: float


_Outcome = httpx.Response | httpx.TransportError
# Sends steps, receives each step's outcome (None after a sleep), returns (response, URL).
_Plan = Generator[_Send | _Sleep, _Outcome | None, tuple[httpx.Response, str]]


class _Core:
    """What the sync and async clients share: URLs, settings, routing, retries, identity."""

    def __init__(
        self,
        urls: str | Sequence[str],
        make_client: Callable[[str], Any],
        *,
        max_retries: int,
        backoff_base: float,
        backoff_max: float,
        cooldown: float,
        on_event: EventHook | None,
    ) -> None:
        if max_retries < 0 or backoff_base < 0 or backoff_max < 0 or cooldown < 0:
            raise ValueError("max_retries, backoff_base, backoff_max and cooldown must be >= 0")
        self.urls = split_urls(urls)
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.on_event = on_event
        self.router = _Router(
            [_Endpoint(i, url, make_client(url)) for i, url in enumerate(self.urls)], cooldown
        )
        self.identity = _Identity(self.emit)
        self._rng = random.Random()

    def emit(self, name: str, payload: dict[str, Any]) -> None:
        """Call the user's event hook; a failing hook is logged, never fatal to scoring."""
        if self.on_event is None:
            return
        try:
            self.on_event(name, payload)
        except Exception:
            logger.exception("on_event hook failed on %r", name)

    def plan(self, pinned: _Endpoint | None = None) -> _Plan:
        """Attempts of one request until a usable response: failover, retries, backoff.

        Send the request where told and send back the response or transport error. A
        retryable failure fails over at once to a URL not yet tried in this round; when every
        URL has been tried, the round ends with a backoff sleep, at most ``max_retries`` times.
        ``pinned`` sends every attempt to that one URL.
        """
        retries = 0
        attempts = 0
        tried: set[int] = set()
        while True:
            if pinned is None:
                endpoint = self.router.pick(avoid=tried)
            else:
                endpoint = self.router.acquire(pinned)
            tried.add(endpoint.index)
            attempts += 1
            outcome = yield _Send(endpoint)
            url = redact(endpoint.url)
            if isinstance(outcome, httpx.Response) and outcome.status_code < 400:
                self.router.mark_up(endpoint)
                return outcome, url
            status, type_, message, retry_after = _classify(outcome, url)
            if isinstance(outcome, _DOWN_ERRORS) and self.router.mark_down(endpoint):
                logger.warning("reward service %s unreachable (%s); cooling down", url, type_)
            event = {"url": url, "status": status, "reason": type_, "attempt": attempts}
            if pinned is None and self.router.has_fresh(tried):
                self.emit("reward_retry", {**event, "delay_s": 0.0, "failover": True})
                continue
            if retries >= self.max_retries:
                raise RewardServiceUnavailable(
                    status, type_, f"{message} (gave up after {attempts} attempts)", url
                )
            retries += 1
            delay = backoff_delay(
                retries,
                base=self.backoff_base,
                cap=self.backoff_max,
                retry_after=retry_after,
                rand=self._rng.random,
            )
            logger.info(
                "reward request to %s failed (%s); retry %d/%d in %.2f s",
                url, type_, retries, self.max_retries, delay,
            )  # fmt: skip
            self.emit("reward_retry", {**event, "delay_s": delay, "failover": False})
            yield _Sleep(delay)
            tried.clear()

    def score_body(
        self, items: Sequence[ScoreItem | Mapping[str, Any]], label: int | str | None
    ) -> dict[str, Any]:
        if not items:
            raise ValueError("items must not be empty")
        body: dict[str, Any] = {
            "items": [
                i.model_dump(mode="json", exclude_none=True) if isinstance(i, BaseModel) else i
                for i in items
            ]
        }
        if label is not None:
            body["label"] = label
        return body

    def parse_score(self, response: httpx.Response, url: str, n_items: int) -> ScoreResponse:
        """The validated body of a 200 from /score: one finite score per item."""
        parsed = _parse(ScoreResponse, response, url)
        lengths = {len(parsed.scores), len(parsed.num_tokens), len(parsed.truncated)}
        if lengths != {n_items}:
            raise RewardServiceError(
                response.status_code,
                "invalid_response",
                f"sent {n_items} items but got {len(parsed.scores)} scores, "
                f"{len(parsed.num_tokens)} token counts, {len(parsed.truncated)} truncated flags",
                url,
            )
        bad = [i for i, s in enumerate(parsed.scores) if not math.isfinite(s)]
        if bad:
            raise RewardServiceError(
                response.status_code,
                "invalid_response",
                f"non-finite scores at items {bad[:10]}",
                url,
            )
        self.identity.observe(parsed.model_id, parsed.weights_hash, url)
        return parsed

    def parse_info(self, response: httpx.Response, url: str) -> InfoResponse:
        info = _parse(InfoResponse, response, url)
        self.identity.observe(info.model_id, info.weights_hash, url)
        return info

    def collect_infos(self, results: Sequence[InfoResponse | BaseException]) -> list[InfoResponse]:
        """The answers of the URLs that answered. Unavailable URLs are skipped with a warning;
        any other error (e.g. 401) is raised, as is unavailability of every URL. Warns when
        replicas serve different weights."""
        infos = []
        for url, result in zip(self.urls, results, strict=True):
            if isinstance(result, RewardServiceUnavailable):
                logger.warning("reward service %s skipped: %s", redact(url), result.message)
            elif isinstance(result, BaseException):
                raise result
            else:
                infos.append(result)
        if not infos:
            last = results[-1]
            assert isinstance(last, RewardServiceUnavailable)
            raise RewardServiceUnavailable(
                last.status,
                last.type,
                f"none of {len(self.urls)} reward service URLs answered /info; last: "
                f"{last.message}",
                last.url,
            )
        hashes = {i.weights_hash for i in infos}
        if len(hashes) > 1:
            logger.warning("reward service replicas serve different weights: %s", sorted(hashes))
        return infos


def _classify(outcome: _Outcome | None, url: str) -> tuple[int | None, str, str, float | None]:
    """``(status, type, message, retry_after)`` of a failed attempt; raises unless retryable."""
    if isinstance(outcome, httpx.Response):
        type_, message = error_from_response(outcome)
        if outcome.status_code not in RETRYABLE_STATUSES:
            raise RewardServiceError(outcome.status_code, type_, message, url)
        retry_after = parse_retry_after(outcome.headers.get("retry-after"))
        return outcome.status_code, type_, message, retry_after
    if isinstance(outcome, _RETRYABLE_ERRORS):
        return None, _error_kind(outcome), str(outcome) or type(outcome).__name__, None
    raise RewardServiceError(None, "transport_error", repr(outcome), url)


def _error_kind(exc: httpx.TransportError) -> str:
    """``ConnectError`` -> ``"connect_error"``: a short reason for logs and events."""
    name = type(exc).__name__
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def _parse(model: type[_Model], response: httpx.Response, url: str) -> _Model:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)[:5]
        )
        raise RewardServiceError(
            response.status_code, "invalid_response", f"unexpected response body: {errors}", url
        ) from None


def _timeout(timeout: float, connect_timeout: float) -> httpx.Timeout:
    return httpx.Timeout(timeout, connect=connect_timeout)


def _limits(max_connections: int) -> httpx.Limits:
    return httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# ----------------------------------------------------------------------------- the clients
class AsyncRewardClient:
    """Async client of one or several reward service replicas (one httpx pool per URL).

    ``timeout`` bounds each attempt's read/write/pool wait, ``connect_timeout`` its connect;
    a request is retried up to ``max_retries`` rounds (each round tries every up URL once)
    with exponential backoff and full jitter, honouring ``Retry-After``. A URL with a
    connection error is skipped for ``cooldown`` seconds. Errors are raised, never scored.
    Use one instance per event loop; it is safe for many concurrent tasks.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff_base: float = 0.5,
        backoff_max: float = 10.0,
        max_connections: int = 32,
        on_event: EventHook | None = None,
        cooldown: float = 5.0,
    ) -> None:
        def make_client(url: str) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=url,
                headers=_headers(api_key),
                timeout=_timeout(timeout, connect_timeout),
                limits=_limits(max_connections),
            )

        self._core = _Core(
            urls,
            make_client,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            cooldown=cooldown,
            on_event=on_event,
        )

    @property
    def urls(self) -> list[str]:
        return list(self._core.urls)

    @property
    def model_id(self) -> str | None:
        """Model id of the last /score or /info response (None before the first)."""
        return self._core.identity.model_id

    @property
    def weights_hash(self) -> str | None:
        """Weights hash of the last /score or /info response (None before the first)."""
        return self._core.identity.weights_hash

    async def score(
        self, items: Sequence[ScoreItem | Mapping[str, Any]], *, label: int | str | None = None
    ) -> ScoreResponse:
        """Scores of ``items``, in order. Raises :class:`RewardServiceError` on a 4xx or an
        invalid answer, :class:`RewardServiceUnavailable` when retries are exhausted."""
        body = self._core.score_body(items, label)
        response, url = await self._run(self._core.plan(), "POST", "/score", body)
        return self._core.parse_score(response, url, len(items))

    async def info(self) -> list[InfoResponse]:
        """``GET /info`` of every URL (concurrently, with retries); unreachable ones are
        skipped with a warning; raises :class:`RewardServiceUnavailable` if none answers."""

        async def one(endpoint: _Endpoint) -> InfoResponse:
            response, url = await self._run(self._core.plan(pinned=endpoint), "GET", "/info")
            return self._core.parse_info(response, url)

        endpoints = self._core.router.endpoints
        results = await asyncio.gather(*(one(e) for e in endpoints), return_exceptions=True)
        return self._core.collect_infos(results)

    async def _run(
        self, plan: _Plan, method: str, path: str, body: Any = None
    ) -> tuple[httpx.Response, str]:
        step = next(plan)
        while True:
            outcome: _Outcome | None = None
            if isinstance(step, _Sleep):
                await asyncio.sleep(step.seconds)
            else:
                try:
                    outcome = await step.endpoint.client.request(method, path, json=body)
                except httpx.TransportError as exc:
                    outcome = exc
                finally:
                    self._core.router.release(step.endpoint)
            try:
                step = plan.send(outcome)
            except StopIteration as done:
                return done.value

    async def aclose(self) -> None:
        for endpoint in self._core.router.endpoints:
            await endpoint.client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


class RewardClient:
    """Synchronous twin of :class:`AsyncRewardClient` (same arguments, same policy);
    safe to share between threads."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff_base: float = 0.5,
        backoff_max: float = 10.0,
        max_connections: int = 32,
        on_event: EventHook | None = None,
        cooldown: float = 5.0,
    ) -> None:
        def make_client(url: str) -> httpx.Client:
            return httpx.Client(
                base_url=url,
                headers=_headers(api_key),
                timeout=_timeout(timeout, connect_timeout),
                limits=_limits(max_connections),
            )

        self._core = _Core(
            urls,
            make_client,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            cooldown=cooldown,
            on_event=on_event,
        )

    @property
    def urls(self) -> list[str]:
        return list(self._core.urls)

    @property
    def model_id(self) -> str | None:
        """Model id of the last /score or /info response (None before the first)."""
        return self._core.identity.model_id

    @property
    def weights_hash(self) -> str | None:
        """Weights hash of the last /score or /info response (None before the first)."""
        return self._core.identity.weights_hash

    def score(
        self, items: Sequence[ScoreItem | Mapping[str, Any]], *, label: int | str | None = None
    ) -> ScoreResponse:
        """Scores of ``items``, in order. Raises :class:`RewardServiceError` on a 4xx or an
        invalid answer, :class:`RewardServiceUnavailable` when retries are exhausted."""
        body = self._core.score_body(items, label)
        response, url = self._run(self._core.plan(), "POST", "/score", body)
        return self._core.parse_score(response, url, len(items))

    def info(self) -> list[InfoResponse]:
        """``GET /info`` of every URL (in parallel threads, with retries); unreachable ones
        are skipped with a warning; raises :class:`RewardServiceUnavailable` if none answers."""

        def one(endpoint: _Endpoint) -> InfoResponse | Exception:
            try:
                response, url = self._run(self._core.plan(pinned=endpoint), "GET", "/info")
                return self._core.parse_info(response, url)
            except Exception as exc:  # sorted out by collect_infos, as asyncio.gather does
                return exc

        endpoints = self._core.router.endpoints
        with ThreadPoolExecutor(max_workers=len(endpoints)) as pool:
            results = list(pool.map(one, endpoints))
        return self._core.collect_infos(results)

    def _run(
        self, plan: _Plan, method: str, path: str, body: Any = None
    ) -> tuple[httpx.Response, str]:
        step = next(plan)
        while True:
            outcome: _Outcome | None = None
            if isinstance(step, _Sleep):
                time.sleep(step.seconds)
            else:
                try:
                    outcome = step.endpoint.client.request(method, path, json=body)
                except httpx.TransportError as exc:
                    outcome = exc
                finally:
                    self._core.router.release(step.endpoint)
            try:
                step = plan.send(outcome)
            except StopIteration as done:
                return done.value

    def close(self) -> None:
        for endpoint in self._core.router.endpoints:
            endpoint.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
