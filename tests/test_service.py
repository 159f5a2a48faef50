"""Reward service over real HTTP: real uvicorn servers on free loopback ports, real httpx clients,
the real demo reward model, compared with plain in-process transformers forwards."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common.demo_models import ensure_demo_models, generate_corpus
from common.schemas import ErrorResponse, InfoResponse, ScoreResponse
from reward_service.__main__ import _Server
from reward_service.app import SCORING_ROUTES, create_app, direct_endpoints
from reward_service.metrics import ServiceMetrics
from reward_service.runner import ProcessRunner
from reward_service.scorer import Scorer
from reward_service.settings import ServiceSettings
from reward_service.state import ServiceState
from tests.support import exited_within

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "s3cret-key-for-tests"
SECRET_TEXT = "zebra-marker-that-must-not-be-logged"


# ----------------------------------------------------------------------------- helpers
@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """A real uvicorn server for ``app`` on a free loopback port, in a thread.

    Yields the base URL once the socket listens (the model may still be loading)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_ready(url: str, timeout: float = 60, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/ready", timeout=2, headers=headers)
            if response.status_code == 200:
                return
            assert response.json()["error"]["type"] == "loading", response.text
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} not ready after {timeout} s")


def assert_error(response: httpx.Response, status: int, type_: str, *fragments: str) -> None:
    """The one error envelope, with this status and type, and a message naming ``fragments``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    error = ErrorResponse.model_validate(body).error
    assert error.type == type_, body
    assert "Traceback" not in response.text
    for fragment in fragments:
        assert fragment in error.message, (fragment, error.message)


def metric(url: str, name: str) -> float:
    """Sum of the Prometheus samples whose name+labels start with ``name``."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Reference:
    """Plain transformers, one item per forward: what the service must reproduce."""

    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    def ids(self, text: str) -> list[int]:
        has_bos = text.startswith(self.tokenizer.bos_token)  # chat templates add BOS themselves
        return self.tokenizer(text, add_special_tokens=not has_bos)["input_ids"]

    @torch.inference_mode()
    def logits_of_ids(self, ids: list[int]) -> list[float]:
        return self.model(input_ids=torch.tensor([ids])).logits[0].tolist()

    def score(self, text: str) -> float:
        return self.logits_of_ids(self.ids(text))[0]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def reward_path(request: pytest.FixtureRequest) -> Path:
    try:
        demo = request.getfixturevalue("demo_models")
    except pytest.FixtureLookupError:
        demo = ensure_demo_models()
    return demo.reward


@pytest.fixture(scope="module")
def ref(reward_path: Path) -> Reference:
    return Reference(reward_path)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Short and long texts, so a mixed batch really pads."""
    corpus = generate_corpus(40, seed=5)
    return ["great", corpus[0], " ".join(corpus[1:4]), corpus[4] + " " + corpus[5], *corpus[6:14]]


@pytest.fixture(scope="module")
def service(reward_path: Path) -> Iterator[str]:
    settings = ServiceSettings(
        model=str(reward_path), max_items_per_request=32, max_body_bytes=200_000
    )
    with serve(create_app(settings)) as url:
        wait_ready(url)
        yield url


@pytest.fixture(scope="module")
def client(service: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, timeout=30) as c:
        yield c


class HangingForward:
    """Fault injection: once ``armed``, the next forward pass (``entered``) hangs until
    ``release``. Pass ``loader`` to ``create_app`` with ``forward_process=False``: the model
    must run in this process for the batching loop to run the patched forward."""

    def __init__(self) -> None:
        self.armed, self.entered, self.release = (threading.Event() for _ in range(3))

    def loader(self, settings: ServiceSettings) -> Scorer:
        scorer = Scorer.load(settings)
        forward = scorer.runner.forward

        def hanging_forward(seqs: list[list[int]]) -> torch.Tensor:
            if self.armed.is_set() and not self.entered.is_set():
                self.entered.set()
                self.release.wait(timeout=30)
            return forward(seqs)

        scorer.runner.forward = hanging_forward  # type: ignore[method-assign]
        return scorer


def score(client: httpx.Client, items: list[dict], **extra: object) -> ScoreResponse:
    response = client.post("/score", json={"items": items, **extra})
    assert response.status_code == 200, response.text
    return ScoreResponse.model_validate(response.json())


# ----------------------------------------------------------------------------- scoring
def test_scores_equal_in_process_forwards_alone_and_in_mixed_batch(
    client: httpx.Client, ref: Reference, texts: list[str], reward_path: Path
) -> None:
    expected = [ref.score(t) for t in texts]
    batched = score(client, [{"text": t} for t in texts])
    alone = [score(client, [{"text": t}]).scores[0] for t in texts]
    assert batched.scores == pytest.approx(expected, abs=1e-5)
    assert alone == pytest.approx(expected, abs=1e-5)
    assert batched.num_tokens == [len(ref.ids(t)) for t in texts]
    assert len(set(batched.num_tokens)) > 3  # really a padded, mixed-length batch
    assert batched.truncated == [False] * len(texts)
    assert batched.model_id == str(reward_path)
    assert len(batched.weights_hash) == 16 and int(batched.weights_hash, 16) >= 0
    assert batched.logits is None
    # The demo reward model learned the property: positive reviews beat negative ones.
    pair = score(client, [{"text": "the movie was great ."}, {"text": "the movie was awful ."}])
    assert pair.scores[0] > 0.5 > -0.5 > pair.scores[1]


def test_prompt_completion_is_concatenated_as_trl_does(
    client: httpx.Client, ref: Reference
) -> None:
    got = score(client, [{"prompt": "the plot", "completion": " was dull ."}]).scores[0]
    assert got == pytest.approx(ref.score("the plot was dull ."), abs=1e-5)


def test_chat_items_use_the_reward_tokenizers_template(
    client: httpx.Client, ref: Reference
) -> None:
    messages = [
        {"role": "user", "content": "the acting"},
        {"role": "assistant", "content": "was superb ."},
    ]
    rendered = ref.tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.startswith(ref.tokenizer.bos_token) and "### User:" in rendered
    result = score(
        client,
        [
            {"messages": messages},
            # prompt as messages + a decoded completion (leading space, as sampled)
            {"prompt": messages[:1], "completion": " was superb ."},
            {"text": rendered},
            {"text": "the acting was superb ."},
        ],
    )
    conversational, prompt_form, as_text, plain = result.scores
    assert conversational == pytest.approx(ref.score(rendered), abs=1e-5)
    assert prompt_form == pytest.approx(conversational, abs=1e-6)
    assert as_text == pytest.approx(conversational, abs=1e-6)
    assert abs(plain - conversational) > 1e-4  # the template changed the input
    # Exactly one BOS: the template's, none added by the tokenizer on top.
    assert result.num_tokens[0] == len(
        ref.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    )


def test_get_reward_is_openrlhf_compatible(client: httpx.Client, ref: Reference) -> None:
    queries = ["the film was lovely .", "the script felt tedious and weak ."]
    response = client.post("/get_reward", json={"query": queries})
    assert response.status_code == 200
    body = response.json()
    assert body == {"rewards": body["rewards"], "scores": body["rewards"], "extra_logs": {}}
    assert body["rewards"] == pytest.approx([ref.score(q) for q in queries], abs=1e-5)


def test_info_health_ready_metrics_docs(client: httpx.Client, reward_path: Path) -> None:
    info = InfoResponse.model_validate(client.get("/info").json())
    assert info.model_id == str(reward_path)
    assert (info.num_labels, info.score_label, info.id2label) == (1, 0, {0: "LABEL_0"})
    assert (info.dtype, info.device, info.max_length, info.truncation_side) == (
        "float32", "cpu", 256, "left",
    )  # fmt: skip
    assert info.has_chat_template and info.max_items_per_request == 32
    assert not info.compiled
    assert info.forward_fixed_ms and info.forward_fixed_ms > 0  # fitted at warm-up
    assert info.forward_per_token_us and info.forward_per_token_us > 0
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "reward_batch_size_bucket" in metrics.text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/score", "/get_reward", "/info", "/ready"} <= set(spec["paths"])
    body_ref = spec["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]
    assert body_ref["schema"]["$ref"].endswith("/ScoreRequest")
    assert {"ScoreRequest", "ScoreItem", "Message", "ScoreResponse"} <= set(
        spec["components"]["schemas"]
    )


def test_concurrent_clients_are_merged_into_batches(
    service: str, ref: Reference, texts: list[str]
) -> None:
    per_request, n_clients, rounds = 2, 16, 4
    batches_before = metric(service, "reward_batches_total")
    items_before = metric(service, "reward_batch_size_sum")

    async def one_client(k: int, http: httpx.AsyncClient) -> list[tuple[str, float]]:
        out = []
        for r in range(rounds):
            chosen = [texts[(k + r + j) % len(texts)] for j in range(per_request)]
            response = await http.post("/score", json={"items": [{"text": t} for t in chosen]})
            assert response.status_code == 200, response.text
            out += zip(chosen, response.json()["scores"], strict=True)
        return out

    async def run() -> list[list[tuple[str, float]]]:
        async with httpx.AsyncClient(base_url=service, timeout=30) as http:
            return await asyncio.gather(*(one_client(k, http) for k in range(n_clients)))

    results = asyncio.run(run())
    expected = {t: ref.score(t) for t in texts}
    for pairs in results:
        for text, got in pairs:
            assert got == pytest.approx(expected[text], abs=1e-5)
    batches = metric(service, "reward_batches_total") - batches_before
    items = metric(service, "reward_batch_size_sum") - items_before
    n_requests = n_clients * rounds
    assert items == n_requests * per_request
    # How many requests meet in a pass depends on how fast the clients (in this process, on
    # the same cores) come back: 16-35 passes here, 49 once on a loaded CI machine, 64 without
    # merging. The next test makes the merge certain.
    assert batches < n_requests


def test_requests_queued_during_a_pass_share_the_next(reward_path: Path, ref: Reference) -> None:
    # 32 texts of one token length: no plan would split them for padding.
    by_length: dict[int, list[str]] = {}
    for text in generate_corpus(200, seed=7):
        by_length.setdefault(len(ref.ids(text)), []).append(text)
    same = max(by_length.values(), key=len)[:32]
    assert len(same) == 32
    bodies = [{"items": [{"text": t} for t in same[2 * k : 2 * k + 2]]} for k in range(16)]
    hang = HangingForward()
    # No wait window: the merge below comes from the queue alone (with one, the loop would
    # wait for the first client to return, then split the round in halves; see BatchLoop).
    settings = ServiceSettings(model=str(reward_path), forward_process=False, max_wait_ms=0)
    with serve(create_app(settings, loader=hang.loader)) as url:
        wait_ready(url)
        batches_before = metric(url, "reward_batches_total")
        hang.armed.set()

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                first = asyncio.create_task(http.post("/score", json=bodies[0]))
                await asyncio.to_thread(hang.entered.wait, 10)
                rest = [asyncio.create_task(http.post("/score", json=b)) for b in bodies[1:]]
                while metric(url, "reward_queue_depth") < 30:  # all 15 wait for the loop
                    await asyncio.sleep(0.01)
                hang.release.set()
                return [await first, *[await r for r in rest]]

        responses = asyncio.run(run())
        batches = metric(url, "reward_batches_total") - batches_before
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200, response.text
        expected = [ref.score(item["text"]) for item in body["items"]]
        assert response.json()["scores"] == pytest.approx(expected, abs=1e-5)
    assert batches == 2  # the hung pass, then the 15 queued requests together


# ----------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_keeps_the_configured_end(
    side: str, reward_path: Path, ref: Reference, texts: list[str]
) -> None:
    long_text, short_text = texts[2], texts[1]
    full = ref.ids(long_text)
    max_length = 12
    assert len(full) > max_length >= len(ref.ids(short_text))
    # The model in the server process (forward_process off): scores must not change with it.
    settings = ServiceSettings(
        model=str(reward_path), max_length=max_length, truncation_side=side, forward_process=False
    )
    with serve(create_app(settings)) as url:
        wait_ready(url)
        with httpx.Client(base_url=url) as c:
            result = score(c, [{"text": long_text}, {"text": short_text}])
            truncations = metric(url, f'reward_truncations_total{{side="{side}"}}')
    bos = full[0]
    assert bos == ref.tokenizer.bos_token_id
    kept = [bos, *full[-(max_length - 1) :]] if side == "left" else full[:max_length]
    assert result.truncated == [True, False]
    assert result.num_tokens == [max_length, len(ref.ids(short_text))]
    assert result.scores[0] == pytest.approx(ref.logits_of_ids(kept)[0], abs=1e-5)
    assert result.scores[1] == pytest.approx(ref.score(short_text), abs=1e-5)
    assert truncations == 1


def test_truncation_error_mode_rejects_naming_the_item(reward_path: Path, texts: list[str]) -> None:
    settings = ServiceSettings(
        model=str(reward_path), max_length=12, truncation_side="error", forward_process=False
    )
    with serve(create_app(settings)) as url:
        wait_ready(url)
        items = [{"text": texts[1]}, {"text": texts[2]}]
        response = httpx.post(f"{url}/score", json={"items": items})
    assert_error(response, 422, "validation_error", "items[1]", "max_length 12")


# ----------------------------------------------------------------------------- errors
MATRIX = [
    # (body, status, type, fragments)
    ({"items": "abc"}, 422, "validation_error", ["items:"]),
    ({"items": []}, 422, "validation_error", ["items:", "at least 1"]),
    ({}, 422, "validation_error", ["items: Field required"]),
    ([1, 2], 422, "validation_error", ["body:"]),
    ({"items": [{}]}, 422, "validation_error", ["items[0]:", "exactly one"]),
    ({"items": [{"text": "a"}, {"text": 5}]}, 422, "validation_error", ["items[1].text"]),
    (
        {"items": [{"text": "a"}] * 3 + [{"prompt": "p", "completion": 7}]},
        422, "validation_error", ["items[3].completion"],
    ),
    ({"items": [{"prompt": "p"}]}, 422, "validation_error", ["items[0]:", "together"]),
    ({"items": [{"text": "a", "prompt": "p", "completion": "c"}]}, 422, "validation_error",
     ["items[0]:"]),
    ({"items": [{"text": "a", "score": 1}]}, 422, "validation_error", ["items[0].score", "Extra"]),
    ({"items": [{"text": "a"}], "extra": 1}, 422, "validation_error", ["extra:"]),
    ({"items": [{"messages": [{"role": "wizard", "content": "hi"}]}]}, 422, "validation_error",
     ["items[0].messages[0].role"]),
    ({"items": [{"messages": [{"role": "user"}]}]}, 422, "validation_error",
     ["items[0].messages[0].content"]),
    ({"items": [{"messages": []}]}, 422, "validation_error", ["items[0]:", "empty"]),
    ({"items": [{"text": "a"}], "label": 3}, 422, "validation_error", ["label"]),
    ({"items": [{"text": "a"}], "label": "helpfulness"}, 422, "validation_error", ["label"]),
    ({"items": [{"text": "a"}] * 33}, 413, "too_many_items", ["33 items", "32"]),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "type_", "fragments"), MATRIX)
def test_malformed_score_bodies(
    client: httpx.Client, body: object, status: int, type_: str, fragments: list[str]
) -> None:
    assert_error(client.post("/score", json=body), status, type_, *fragments)


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"query": "abc"}, ["query"]),
        ({"query": [1]}, ["query[0]"]),
        ({"query": ["a", "b"], "prompts": ["p"]}, ["prompts:", "1 entries for 2 queries"]),
        ({"query": ["a"], "labels": []}, ["labels:", "0 entries for 1 queries"]),
    ],
)
def test_malformed_get_reward_bodies(
    client: httpx.Client, body: object, fragments: list[str]
) -> None:
    assert_error(client.post("/get_reward", json=body), 422, "validation_error", *fragments)


def test_raw_body_errors(client: httpx.Client) -> None:
    json_header = {"Content-Type": "application/json"}
    assert_error(
        client.post("/score", content=b'{"items": [{"text": "\xff\xfe"}]}', headers=json_header),
        400, "invalid_encoding", "UTF-8",
    )  # fmt: skip
    assert_error(
        client.post("/score", content=b'{"items": [', headers=json_header),
        400, "invalid_json",
    )  # fmt: skip
    assert_error(
        client.post("/score", content=b'{"items": []}', headers={"Content-Type": "text/plain"}),
        415, "unsupported_media_type", "text/plain",
    )  # fmt: skip
    assert_error(client.post("/score", content=b"{}"), 415, "unsupported_media_type")
    huge = json.dumps({"items": [{"text": "great " * 40_000}]}).encode()
    assert_error(client.post("/score", content=huge, headers=json_header), 413, "body_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the actual size is what counts
        yield b'{"items": [{"text": "'
        for _ in range(30):
            yield b"great " * 2_000
        yield b'"}]}'

    with httpx.Client(base_url=str(client.base_url)) as fresh:  # 413 closes the connection
        assert_error(
            fresh.post("/score", content=chunks(), headers=json_header), 413, "body_too_large"
        )
    assert_error(client.get("/score"), 405, "method_not_allowed")
    assert_error(client.get("/nope"), 404, "not_found")


def test_a_client_that_hangs_up_is_counted_not_logged_as_an_error(
    service: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="reward_service")
    before = metric(service, 'reward_client_disconnects_total{route="/score"}')
    port = int(service.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:  # half a body, then gone
        sock.sendall(
            b"POST /score HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"items": [{"text": "the pl'
        )
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while metric(service, 'reward_client_disconnects_total{route="/score"}') == before:
        assert time.monotonic() < deadline, "the hang-up was never counted"
        time.sleep(0.05)
    assert metric(service, 'reward_requests_total{route="/score",status="499"}') >= 1
    assert metric(service, 'reward_errors_total{type="internal_error"}') == 0
    records = [r for r in caplog.records if r.name.startswith("reward_service")]
    assert not [r for r in records if r.levelno >= logging.WARNING], caplog.text
    assert any(
        r.levelno == logging.INFO and "client went away" in r.getMessage() for r in records
    ), caplog.text
    assert httpx.post(f"{service}/score", json={"items": [{"text": "a"}]}).status_code == 200


def test_huge_text_under_the_body_limit_is_truncated_not_rejected(client: httpx.Client) -> None:
    result = score(client, [{"text": "the plot was dull . " * 2_000}, {"text": "great"}])
    assert result.truncated == [True, False]
    assert result.num_tokens[0] == 256


def test_errors_are_counted_in_metrics(service: str, client: httpx.Client) -> None:
    before = metric(service, 'reward_errors_total{type="validation_error"}')
    client.post("/score", json={"items": []})
    assert metric(service, 'reward_errors_total{type="validation_error"}') == before + 1
    assert metric(service, 'reward_requests_total{route="/score",status="422"}') >= 1


# ----------------------------------------------------------------------------- auth
def test_api_key_guards_scoring_routes_and_info(
    reward_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = ServiceSettings(model=str(reward_path), api_key=API_KEY)
    body = {"items": [{"text": SECRET_TEXT}]}
    with serve(create_app(settings)) as url, httpx.Client(base_url=url) as c:
        wait_ready(url)
        for method, path, payload in [
            ("POST", "/score", body),
            ("POST", "/get_reward", {"query": [SECRET_TEXT]}),
            ("GET", "/info", None),
        ]:
            missing = c.request(method, path, json=payload)
            assert_error(missing, 401, "unauthorized", "API key")
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = c.request(method, path, json=payload, headers={"X-API-Key": API_KEY + "x"})
            assert_error(wrong, 401, "unauthorized")
            not_bearer = c.request(method, path, json=payload, headers={"Authorization": API_KEY})
            assert_error(not_bearer, 401, "unauthorized")
            bearer = {"Authorization": f"Bearer {API_KEY}"}
            assert c.request(method, path, json=payload, headers=bearer).status_code == 200
            x_api_key = {"X-API-Key": API_KEY}
            assert c.request(method, path, json=payload, headers=x_api_key).status_code == 200
        for path in ("/health", "/ready", "/metrics"):
            assert c.get(path).status_code == 200
        # Auth is checked before the body: a bad body without a key is still a 401.
        assert_error(c.post("/score", content=b"garbage"), 401, "unauthorized")
    assert caplog.records, "expected some log records"
    assert API_KEY not in caplog.text and SECRET_TEXT not in caplog.text
    assert API_KEY not in repr(settings)


# ----------------------------------------------------------------------------- extending the app
def test_middleware_and_dependencies_added_the_fastapi_way_apply_to_score(
    reward_path: Path, ref: Reference
) -> None:
    """``app.add_middleware`` (here through ``@app.middleware("http")``) wraps the scoring POSTs
    too, which stay on the direct dispatch; a dependency given as ``dependencies=`` applies to
    them as to any route (FastAPI's router then serves them) and its errors use the envelope."""
    checked: list[str] = []

    def require_tenant(request: Request, x_tenant: str = Header()) -> None:
        if x_tenant != "acme":
            raise HTTPException(403, f"unknown tenant {x_tenant!r}")
        checked.append(request.url.path)

    def with_middleware(app: FastAPI) -> list[str]:
        seen: list[str] = []

        @app.middleware("http")
        async def tag(request: Request, call_next: Callable[..., Any]) -> Any:
            seen.append(f"{request.method} {request.url.path}")
            response = await call_next(request)
            response.headers["X-Tagged"] = "yes"
            return response

        return seen

    settings = ServiceSettings(model=str(reward_path), api_key=API_KEY)
    key = {"X-API-Key": API_KEY}
    body = {"items": [{"text": "the movie was great ."}]}
    expected = ref.score("the movie was great .")
    plain = create_app(settings)
    guarded = create_app(settings, dependencies=[Depends(require_tenant)])
    assert set(direct_endpoints(plain.routes, SCORING_ROUTES)) == {
        "/score", "/get_reward", "/classify", "/pooling", "/predict",
    }  # fmt: skip
    assert direct_endpoints(guarded.routes, SCORING_ROUTES) == {}  # the router solves them
    for app in (plain, guarded):
        seen = with_middleware(app)
        tenant = {"X-Tenant": "acme"} if app is guarded else {}
        with serve(app) as url, httpx.Client(base_url=url, headers=key) as c:
            wait_ready(url, headers=tenant)  # an app's dependencies apply to /ready too
            response = c.post("/score", json=body, headers=tenant)
            assert response.status_code == 200, response.text
            assert response.headers["x-tagged"] == "yes"
            assert response.json()["scores"] == pytest.approx([expected], abs=1e-5)
            assert "POST /score" in seen
            # Outside the key check: the middleware sees (and tags) a refused request too.
            refused = c.post("/score", json=body, headers={"X-API-Key": "wrong", **tenant})
            assert_error(refused, 401, "unauthorized")
            assert refused.headers["x-tagged"] == "yes"
            if app is guarded:
                assert checked.count("/score") == 1
                assert_error(c.post("/score", json=body), 422, "validation_error", "x-tenant")
                wrong = c.post("/get_reward", json={"query": ["a"]}, headers={"X-Tenant": "x"})
                assert_error(wrong, 403, "forbidden", "unknown tenant 'x'")
                assert c.get("/info", headers=tenant).status_code == 200
                assert_error(c.get("/info"), 422, "validation_error", "x-tenant")


# ----------------------------------------------------------------------------- lifecycle
def test_ready_is_503_until_loaded_and_warmed_up(reward_path: Path) -> None:
    gate = threading.Event()

    def slow_loader(settings: ServiceSettings) -> Scorer:
        gate.wait(timeout=30)  # fault injection: a model that takes long to load
        return Scorer.load(settings)

    settings = ServiceSettings(model=str(reward_path))
    with serve(create_app(settings, loader=slow_loader)) as url, httpx.Client(base_url=url) as c:
        assert c.get("/health").status_code == 200
        assert_error(c.get("/ready"), 503, "loading")
        assert_error(c.post("/score", json={"items": [{"text": "a"}]}), 503, "loading")
        assert_error(c.get("/info"), 503, "loading")
        gate.set()
        wait_ready(url)
        assert c.post("/score", json={"items": [{"text": "a"}]}).status_code == 200


def test_failed_load_is_reported_by_health_and_ready(tmp_path: Path) -> None:
    settings = ServiceSettings(model=str(tmp_path / "no-model-here"))
    with serve(create_app(settings)) as url, httpx.Client(base_url=url) as c:
        deadline = time.monotonic() + 30
        while c.get("/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert_error(c.get("/health"), 503, "load_failed", "no-model-here")
        assert_error(c.get("/ready"), 503, "load_failed")


def test_a_dead_model_process_turns_health_ready_and_scoring_to_503(reward_path: Path) -> None:
    app = create_app(ServiceSettings(model=str(reward_path)))
    with serve(app) as url, httpx.Client(base_url=url) as c:
        wait_ready(url)
        assert c.post("/score", json={"items": [{"text": "a"}]}).status_code == 200
        runner = app.state.service.scorer.runner
        assert isinstance(runner, ProcessRunner)
        os.kill(runner._process.pid, signal.SIGKILL)  # fault injection: the model process dies
        response = c.post("/score", json={"items": [{"text": "a"}]})
        assert_error(response, 503, "model_process_exited", "exit code -9", "restart")
        for path in ("/health", "/ready"):
            assert_error(c.get(path), 503, "model_process_exited", "exit code -9")
        assert metric(url, 'reward_errors_total{type="model_process_exited"}') == 3


def test_queue_full_is_429_with_retry_after_and_draining_is_503(reward_path: Path) -> None:
    hang = HangingForward()
    settings = ServiceSettings(
        model=str(reward_path), max_queue_items=4, max_items_per_request=4, max_wait_ms=0,
        forward_process=False,
    )  # fmt: skip
    four = {"items": [{"text": f"the movie was great {i}"} for i in range(4)]}
    app = create_app(settings, loader=hang.loader)
    with serve(app) as url:
        wait_ready(url)
        hang.armed.set()

        async def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                first = asyncio.create_task(http.post("/score", json=four))
                await asyncio.to_thread(hang.entered.wait, 10)  # first batch is in the forward
                second = asyncio.create_task(http.post("/score", json=four))  # fills the queue
                while metric(url, "reward_queue_depth") < 4:
                    await asyncio.sleep(0.01)
                third = await http.post("/score", json={"items": [{"text": "one more"}]})
                hang.release.set()
                return await first, await second, third

        first, second, third = asyncio.run(run())
        assert first.status_code == 200 and second.status_code == 200
        assert_error(third, 429, "queue_full")
        assert int(third.headers["retry-after"]) >= 1
        again = httpx.post(f"{url}/score", json=four)
        assert again.status_code == 200  # the queue drained: accepted again
        app.state.service.draining = True  # what SIGTERM does (see the next test)
        assert_error(httpx.get(f"{url}/ready"), 503, "draining")
        assert_error(httpx.post(f"{url}/score", json=four), 503, "draining")


def test_sigterm_marks_draining_before_uvicorn_stops() -> None:
    state = ServiceState(settings=ServiceSettings(model="m"), metrics=ServiceMetrics())
    server = _Server(uvicorn.Config(app=None), state)  # type: ignore[arg-type]
    server.handle_exit(signal.SIGTERM, None)
    assert state.draining and server.should_exit


@pytest.fixture(scope="module")
def multilabel_path(reward_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-label head on the demo architecture (random weights), saved like a real model."""
    from transformers import AutoConfig

    out = tmp_path_factory.mktemp("multilabel")
    config = AutoConfig.from_pretrained(reward_path)
    config.num_labels = 3
    config.id2label = {0: "helpful", 1: "harmless", 2: "honest"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(reward_path).save_pretrained(out)
    return out


def test_multi_label_heads(multilabel_path: Path, texts: list[str]) -> None:
    ref = Reference(multilabel_path)
    expected = [ref.logits_of_ids(ref.ids(t)) for t in texts[:4]]
    items = [{"text": t} for t in texts[:4]]
    settings = ServiceSettings(model=str(multilabel_path), score_label="harmless")
    with serve(create_app(settings)) as url, httpx.Client(base_url=url) as c:
        wait_ready(url)
        info = InfoResponse.model_validate(c.get("/info").json())
        default = score(c, items)
        by_index = score(c, items, label=2, return_logits=True)
        by_name = score(c, items, label="honest")
        rewards = c.post("/get_reward", json={"query": texts[:4]}).json()["rewards"]
        assert_error(c.post("/score", json={"items": items, "label": 3}), 422, "validation_error")
    assert (info.num_labels, info.score_label) == (3, 1)
    assert info.id2label == {0: "helpful", 1: "harmless", 2: "honest"}
    assert default.scores == pytest.approx([e[1] for e in expected], abs=1e-5)
    assert rewards == pytest.approx(default.scores, abs=1e-6)
    assert by_index.scores == pytest.approx([e[2] for e in expected], abs=1e-5)
    assert by_name.scores == by_index.scores
    assert by_index.logits is not None
    for got, want in zip(by_index.logits, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-5)


# ----------------------------------------------------------------------------- the CLI process
def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "reward_service", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "--model"),
        (["--model", "m", "--max-batch-size", "0"], "--max-batch-size"),
        (["--model", "m", "--truncation-side", "middle"], "truncation-side"),
        (["--model", "./missing-dir"], "no such directory: './missing-dir'"),
        (["--model", "m", "--parent-pid", "0"], "--parent-pid"),
        (["--model", "m", "--dtype", "float64"], "--dtype"),
        (["--model", "m", "--device-map", "balanced"], "--device-map"),
        (["--model", "m", "--device", "cpu", "--device-map", "auto"], "give one of them"),
    ],
)
def test_cli_rejects_bad_settings_naming_them(args: list[str], fragment: str) -> None:
    proc = _cli(*args)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert fragment in out


CUSTOM_MODELING = '''
"""A reward model class transformers does not know: only trust_remote_code loads it."""
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolRMConfig(PretrainedConfig):
    model_type = "mean-pool-rm-test"

    def __init__(self, vocab_size=2048, hidden_size=16, max_position_embeddings=128, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)


class MeanPoolRMForSequenceClassification(PreTrainedModel):
    config_class = MeanPoolRMConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return SequenceClassifierOutput(logits=self.score(pooled))
'''


@pytest.fixture(scope="module")
def custom_code_model(reward_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose class lives in its own modeling file, named by ``auto_map``."""
    import importlib.util

    out = tmp_path_factory.mktemp("custom-code-rm")
    (out / "modeling_mean_pool_rm.py").write_text(CUSTOM_MODELING)
    spec = importlib.util.spec_from_file_location(
        "modeling_mean_pool_rm", out / "modeling_mean_pool_rm.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = AutoTokenizer.from_pretrained(reward_path)
    config = module.MeanPoolRMConfig(num_labels=1, pad_token_id=tokenizer.pad_token_id)
    config.auto_map = {
        "AutoConfig": "modeling_mean_pool_rm.MeanPoolRMConfig",
        "AutoModelForSequenceClassification": (
            "modeling_mean_pool_rm.MeanPoolRMForSequenceClassification"
        ),
    }
    torch.manual_seed(0)
    module.MeanPoolRMForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_trust_remote_code_loads_a_custom_class_and_is_required_for_it(
    custom_code_model: Path,
) -> None:
    proc = _cli("--model", str(custom_code_model))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reward-service: error: "), out
    assert "--trust-remote-code" in lines[0] and "auto_map" in lines[0]

    from transformers import AutoModelForSequenceClassification as Auto

    model = Auto.from_pretrained(custom_code_model, trust_remote_code=True).eval()
    assert type(model).__name__ == "MeanPoolRMForSequenceClassification"
    tokenizer = AutoTokenizer.from_pretrained(custom_code_model)
    texts = ["the movie was great .", "a dull plot"]
    with torch.inference_mode():
        expected = [model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _cli(
        "--model", str(custom_code_model), "--port", str(port), "--trust-remote-code",
        "--revision", "main", "--served-model-name", "custom-rm",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=120)
        info = InfoResponse.model_validate(httpx.get(f"{url}/info").json())
        response = httpx.post(f"{url}/score", json={"items": [{"text": t} for t in texts]})
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert info.trust_remote_code and info.served_model_name == "custom-rm"
    assert info.revision == "main"
    assert response.status_code == 200, response.text
    assert response.json()["scores"] == pytest.approx(expected, abs=1e-5)
    assert "Traceback" not in out


def test_loading_options_dtype_attention_and_device_map(reward_path: Path, ref: Reference) -> None:
    text = "the movie was great ."
    settings = ServiceSettings(
        model=str(reward_path), dtype="bfloat16", attn_implementation="eager",
        device_map="auto", forward_process=False,
    )  # fmt: skip
    with serve(create_app(settings)) as url, httpx.Client(base_url=url) as c:
        wait_ready(url)
        info = InfoResponse.model_validate(c.get("/info").json())
        got = score(c, [{"text": text}]).scores[0]
    assert (info.dtype, info.attn_implementation, info.device_map) == ("bfloat16", "eager", "auto")
    assert info.device == "cpu" and info.served_model_name == reward_path.name
    assert info.revision is None and not info.trust_remote_code
    assert got == pytest.approx(ref.score(text), abs=0.05)  # bfloat16 weights
    assert got != pytest.approx(ref.score(text), abs=1e-6)  # really not float32


def test_cli_serves_with_env_settings_and_sigterm_drains_in_flight_requests(
    reward_path: Path,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _cli(
        "--model", str(reward_path), "--port", str(port), "--max-batch-size", "16",
        env={"REWARD_MAX_BATCH_SIZE": "8", "REWARD_MAX_WAIT_MS": "1", "REWARD_LOG_LEVEL": "info"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        info = httpx.get(f"{url}/info").json()
        assert info["max_batch_size"] == 16  # the flag wins over the environment
        long_items = [{"text": "the plot was dull and the music was lovely . " * 20}] * 64

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                tasks = [
                    asyncio.create_task(http.post("/score", json={"items": long_items}))
                    for _ in range(3)
                ]
                while metric(url, "reward_batches_total") < 2:  # scoring has started
                    await asyncio.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        responses = asyncio.run(run())
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert all(len(r.json()["scores"]) == 64 for r in responses)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    assert "Shutting down" in out and "ready: model" in out
    assert "the plot was dull" not in out  # request texts never reach the log


PARENT_SCRIPT = """
import sys, time
from trainer.service_process import ServiceProcess
service = ServiceProcess(sys.argv[1], log_path=sys.argv[2])
service.start()
print(service.process.pid, service.url, flush=True)
time.sleep(600)
"""


def test_service_exits_when_the_process_that_started_it_is_killed(
    reward_path: Path, tmp_path: Path
) -> None:
    script, log, out = tmp_path / "parent.py", tmp_path / "service.log", tmp_path / "out"
    script.write_text(PARENT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with out.open("w") as stdout:  # a file: an orphan holding a pipe would block its reader
        parent = subprocess.Popen(
            [sys.executable, str(script), str(reward_path), str(log)], env=env, stdout=stdout
        )
    try:
        deadline = time.monotonic() + 90
        while not out.read_text().strip():
            assert parent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        pid_text, url = out.read_text().split()
        pid = int(pid_text)
        assert httpx.get(f"{url}/ready").status_code == 200
    finally:
        parent.kill()  # SIGKILL: no chance to stop the service itself
        parent.wait()
    assert exited_within(pid, 10), "the reward service outlived the process that started it"
    assert f"parent process {parent.pid} is gone" in log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)
