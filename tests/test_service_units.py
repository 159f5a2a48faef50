"""Parts of the reward service on their own: truncation, padding, batch planning, error
formatting, settings, the direct dispatch of the scoring routes, the model in its own process,
and the batcher's queue driving the real demo model without HTTP."""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send
from torch._dynamo.utils import counters

from common.demo_models import ensure_demo_models, generate_corpus
from common.schemas import ScoreRequest
from reward_service.batch_loop import (
    BatchLimits,
    Forward,
    ForwardCost,
    _fill,
    plan_batches,
    serve_in_thread,
)
from reward_service.batcher import Batcher, Draining, QueueFull
from reward_service.errors import ApiError, format_loc, from_validation_error
from reward_service.metrics import ServiceMetrics
from reward_service.middleware import DirectRoutes
from reward_service.runner import LocalRunner, ModelProcessExited, ProcessRunner, pad_right
from reward_service.scorer import Scorer, truncate
from reward_service.settings import ServiceSettings


@pytest.mark.parametrize(
    ("side", "head", "tail", "expected"),
    [
        ("left", 0, 0, [6, 7, 8, 9]),
        ("right", 0, 0, [1, 2, 3, 4]),
        ("left", 1, 0, [1, 7, 8, 9]),  # BOS kept, the end kept
        ("right", 1, 1, [1, 2, 3, 9]),  # BOS and a trailing special kept
        ("left", 1, 1, [1, 7, 8, 9]),
    ],
)
def test_truncate(side: str, head: int, tail: int, expected: list[int]) -> None:
    ids = list(range(1, 10))
    assert truncate(ids, 4, side, head, tail) == expected  # type: ignore[arg-type]
    assert truncate(ids, 9, side, head, tail) == ids  # type: ignore[arg-type]


def test_truncate_needs_room_for_content() -> None:
    with pytest.raises(ValueError, match="no room"):
        truncate(list(range(10)), 2, "left", 1, 1)


def test_pad_right() -> None:
    input_ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert input_ids.dtype == torch.long


def test_plan_batches_sorts_by_length_and_respects_limits() -> None:
    lengths = [50, 3, 40, 4, 5, 41, 2, 6]
    batches = plan_batches(lengths, max_batch_size=3, max_batch_tokens=1000)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 for b in batches)
    assert [sorted(lengths[i] for i in b) for b in batches] == [[2, 3, 4], [5, 6, 40], [41, 50]]
    by_tokens = plan_batches(lengths, max_batch_size=8, max_batch_tokens=100)
    for b in by_tokens:
        assert len(b) * max(lengths[i] for i in b) <= 100 or len(b) == 1
    # An item over the token budget still gets a batch of its own.
    assert plan_batches([500, 1], max_batch_size=8, max_batch_tokens=100) == [[1], [0]]


def test_plan_batches_evens_out_sizes() -> None:
    sizes = [len(b) for b in plan_batches([10] * 100, max_batch_size=64, max_batch_tokens=10**6)]
    assert sizes == [50, 50]


def padded_tokens(plan: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in plan)


def test_plan_batches_weighs_a_forward_passs_fixed_cost_against_padding() -> None:
    lengths = [50, 2] * 8
    # Tokens free: the fewest batches. A fixed cost of 10 tokens: the short items apart.
    assert [len(b) for b in plan_batches(lengths, 64, 10**6)] == [16]
    plan = plan_batches(lengths, 64, 10**6, overhead_tokens=10)
    assert [sorted({lengths[i] for i in b}) for b in plan] == [[2], [50]]
    assert 2 * 10 + padded_tokens(plan, lengths) < 10 + 16 * 50
    # A fixed cost above what splitting saves (8 x 48 padded tokens): one batch.
    assert len(plan_batches(lengths, 64, 10**6, overhead_tokens=400)) == 1
    # Nothing to save (equal lengths): the fewest batches even when forwards cost nothing.
    assert [len(b) for b in plan_batches([10] * 100, 64, 10**6, overhead_tokens=0)] == [50, 50]
    # The limits still hold.
    mixed = [(7 * i) % 61 + 1 for i in range(200)]
    plan = plan_batches(mixed, 64, 1000, overhead_tokens=30)
    assert sorted(i for b in plan for i in b) == list(range(200))
    assert all(len(b) <= 64 and len(b) * max(mixed[i] for i in b) <= 1000 for b in plan)
    # It costs less, by its own measure, than the fewest batches do.
    fewest = plan_batches(mixed, 64, 1000)
    assert 30 * len(plan) + padded_tokens(plan, mixed) < 30 * len(fewest) + padded_tokens(
        fewest, mixed
    )


def test_plan_batches_picks_the_number_of_even_batches_whose_plan_costs_least() -> None:
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 80) for _ in range(rng.randint(1, 200))]
        max_size, max_tokens = rng.choice([4, 16, 64]), rng.choice([100, 1000, 10**6])
        overhead = rng.choice([0.5, 5, 50, 500])
        plan = plan_batches(lengths, max_size, max_tokens, overhead)
        assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        n = len(lengths)
        sizes = {math.ceil(n / count) for count in range(math.ceil(n / max_size), n + 1)}
        cheapest = min(
            overhead * len(p) + padded_tokens(p, lengths)
            for p in (_fill(order, lengths, size, max_tokens) for size in sizes)
        )
        assert overhead * len(plan) + padded_tokens(plan, lengths) == pytest.approx(cheapest)


def test_format_loc_and_validation_messages() -> None:
    assert format_loc(("items", 3, "completion")) == "items[3].completion"
    assert format_loc(()) == "body"
    with pytest.raises(ValidationError) as info:
        ScoreRequest.model_validate_json('{"items": [{"text": "a"}, {"text": 1}]}')
    error = from_validation_error(info.value)
    assert (error.status, error.type) == (422, "validation_error")
    assert error.message.startswith("items[1].text: ")
    with pytest.raises(ValidationError) as info:
        ScoreRequest.model_validate_json("{not json")
    assert (from_validation_error(info.value).status, from_validation_error(info.value).type) == (
        400, "invalid_json",
    )  # fmt: skip


def test_direct_routes_serve_post_on_their_paths_and_pass_everything_else_on() -> None:
    metrics = ServiceMetrics()
    passed_on: list[tuple[str, str]] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        passed_on.append((scope["method"], scope["path"]))
        await PlainTextResponse("routed", status_code=405)(scope, receive, send)

    async def endpoint(request: Request) -> Response:
        body = await request.body()
        if body == b"bad":
            raise ApiError(422, "validation_error", "items[0].text: bad", {"X-Why": "test"})
        return JSONResponse({"echo": body.decode()})

    async def run() -> list[httpx.Response]:
        app = DirectRoutes(inner, {"/score": endpoint}, metrics)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                await client.post("/score", content=b"hi"),
                await client.post("/score", content=b"bad"),
                await client.get("/score"),
                await client.post("/other", content=b"hi"),
            ]

    ok, bad, get, other = asyncio.run(run())
    assert ok.json() == {"echo": "hi"}
    assert bad.status_code == 422 and bad.headers["x-why"] == "test"
    assert bad.json() == {"error": {"type": "validation_error", "message": "items[0].text: bad"}}
    counted = metrics.registry.get_sample_value("reward_errors_total", {"type": "validation_error"})
    assert counted == 1
    assert (get.status_code, get.text, other.text) == (405, "routed", "routed")
    assert passed_on == [("GET", "/score"), ("POST", "/other")]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REWARD_MODEL", "/models/rm")
    monkeypatch.setenv("REWARD_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("REWARD_API_KEY", "hunter2-key")
    monkeypatch.setenv("REWARD_TRUNCATION_SIDE", "right")
    settings = ServiceSettings()
    assert (settings.model, settings.max_batch_size, settings.truncation_side) == (
        "/models/rm", 7, "right",
    )  # fmt: skip
    assert settings.tokenizer is None and settings.host == "127.0.0.1"
    assert settings.api_key is not None and "hunter2" not in repr(settings)
    assert settings.served_model_name == "rm"  # the last part of the model path
    assert (settings.revision, settings.trust_remote_code, settings.device_map) == (
        None, False, None,
    )  # fmt: skip
    loading = {
        "REWARD_SERVED_MODEL_NAME": "my-rm", "REWARD_REVISION": "v2",
        "REWARD_TRUST_REMOTE_CODE": "true", "REWARD_DTYPE": "bfloat16",
        "REWARD_ATTN_IMPLEMENTATION": "sdpa", "REWARD_DEVICE_MAP": "auto",
    }  # fmt: skip
    for name, value in loading.items():
        monkeypatch.setenv(name, value)
    settings = ServiceSettings()
    assert (
        settings.served_model_name, settings.revision, settings.trust_remote_code,
        settings.dtype, settings.attn_implementation, settings.device_map,
    ) == ("my-rm", "v2", True, "bfloat16", "sdpa", "auto")  # fmt: skip
    for name in loading:
        monkeypatch.delenv(name)
    monkeypatch.setenv("REWARD_TRUNCATION_SIDE", "middle")
    with pytest.raises(ValidationError, match="truncation_side"):
        ServiceSettings()
    monkeypatch.delenv("REWARD_TRUNCATION_SIDE")
    with pytest.raises(ValidationError, match="max_queue_items"):
        ServiceSettings(max_items_per_request=10, max_queue_items=5)


@pytest.fixture(scope="module")
def reward_path(request: pytest.FixtureRequest) -> Path:
    try:
        demo = request.getfixturevalue("demo_models")
    except pytest.FixtureLookupError:
        demo = ensure_demo_models()
    return demo.reward


@pytest.fixture(scope="module")
def scorer(reward_path: Path) -> Scorer:
    """The demo reward model in this process."""
    return Scorer.load(ServiceSettings(model=str(reward_path), forward_process=False))


def test_scorer_forward_builds_no_kv_cache(scorer: Scorer) -> None:
    ids = scorer.encode(["great", "a dull plot"]).ids
    input_ids, attention_mask = pad_right(ids, scorer.pad_id)
    assert isinstance(scorer.runner, LocalRunner)
    with torch.inference_mode():
        out = scorer.runner.model(input_ids=input_ids, attention_mask=attention_mask)
    assert out.cache is None
    assert torch.equal(out.logits, scorer.forward(ids))


def test_compiled_model_scores_like_the_eager_one_and_compiles_only_at_warm_up(
    scorer: Scorer, reward_path: Path
) -> None:
    settings = ServiceSettings(model=str(reward_path), forward_process=False, compile=True)
    compiled = Scorer.load(settings)
    compiled.warmup()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    ids = scorer.encode(generate_corpus(20, seed=4)).ids
    # Batch sizes and lengths the warm-up never ran, padded or not, one token or more.
    for batch in (ids[:3], ids[3:10], [ids[0][:1]], [seq[:1] for seq in ids[:5]], ids[-1:]):
        assert torch.allclose(compiled.forward(batch), scorer.forward(batch), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after the warm-up


def test_model_process_scores_like_the_model_in_process_and_reports_its_exit(
    scorer: Scorer, reward_path: Path
) -> None:
    settings = ServiceSettings(model=str(reward_path))
    runner = ProcessRunner.start(settings, scorer.pad_id)
    try:
        assert runner.info == scorer.runner.info and runner.failure() is None
        ids = scorer.encode(["the movie was great .", "dull", "an awful , boring plot"]).ids
        assert torch.equal(runner.forward(ids), scorer.forward(ids))
        assert 0 < runner.time_forward(ids) < 10  # timed in the child
        # An error in the child comes back as itself, and the child keeps serving.
        with pytest.raises(IndexError):
            runner.forward([[10**6]])  # fault injection: a token id outside the vocabulary
        assert torch.equal(runner.forward(ids[:1]), scorer.forward(ids[:1]))
        os.kill(runner._process.pid, signal.SIGKILL)  # fault injection: the model process dies
        with pytest.raises(ModelProcessExited, match="exit code -9"):
            runner.forward(ids)
        assert runner.failure() == "the model process exited (exit code -9)"
    finally:
        runner.close()


def test_batching_loop_in_the_model_process_scores_and_reports_its_exit(
    scorer: Scorer, reward_path: Path
) -> None:
    runner = ProcessRunner.start(ServiceSettings(model=str(reward_path)), scorer.pad_id)
    texts = generate_corpus(12, seed=9)
    requests = [scorer.encode(texts[i : i + 3]).ids for i in range(0, 12, 3)]
    metrics = ServiceMetrics()

    async def run() -> None:
        limits = BatchLimits(max_batch_size=8, max_batch_tokens=1000, max_wait_s=0.0)
        link = runner.serve(limits)
        batcher = await Batcher.connect(
            link, metrics, limits=limits, max_queue_items=100, lost=runner.lost
        )
        with pytest.raises(RuntimeError, match="batching loop"):
            runner.forward(requests[0])  # the child runs the loop now
        for _ in range(2):  # a failed forward pass fails its request only; the loop goes on
            results = await asyncio.gather(*(batcher.score(r) for r in requests))
            for seqs, rows in zip(requests, results, strict=True):
                for seq, row in zip(seqs, rows, strict=True):
                    assert row == pytest.approx(scorer.forward([seq])[0].tolist(), abs=1e-5)
            with pytest.raises(IndexError):
                await batcher.score([[10**6]])  # fault injection: an id outside the vocabulary
        assert metrics.batches._value.get() < 2 * len(requests)  # requests shared passes
        os.kill(runner._process.pid, signal.SIGKILL)  # fault injection: the model process dies
        for _ in range(2):
            with pytest.raises(ModelProcessExited, match="exit code -9"):
                await batcher.score(requests[0])
        await batcher.close(timeout_s=1)

    try:
        asyncio.run(run())
        assert runner.failure() == "the model process exited (exit code -9)"
    finally:
        runner.close()


def test_model_process_reraises_its_load_error(tmp_path: Path) -> None:
    settings = ServiceSettings(model=str(tmp_path / "no-model-here"))
    started = time.monotonic()
    with pytest.raises(OSError, match="no-model-here"):
        ProcessRunner.start(settings, pad_fallback=0)
    assert time.monotonic() - started < 60


def test_forward_cost_fits_the_fixed_and_per_token_parts_of_a_forward_pass(
    scorer: Scorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []

    def forward(seqs: list[list[int]]) -> torch.Tensor:  # 20 ms + 0.1 ms per padded token
        sizes.append(len(seqs))
        time.sleep(0.020 + 0.0001 * len(seqs) * max(len(s) for s in seqs))
        return torch.zeros(len(seqs), 1)

    monkeypatch.setattr(scorer.runner, "forward", forward)
    cost = scorer.forward_cost(max_batch_size=8, max_batch_tokens=10_000, repeats=3)
    assert cost.fixed_s == pytest.approx(0.020, abs=0.005)
    assert cost.per_token_s == pytest.approx(0.0001, rel=0.3)
    assert cost.fixed_tokens == pytest.approx(200, rel=0.5)
    assert max(sizes) == 8  # the per-token part is a full batch's


def test_forward_cost_times_batches_within_the_limits_and_stops_at_a_slow_one(
    scorer: Scorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes: list[tuple[int, int]] = []

    def forward(seqs: list[list[int]]) -> torch.Tensor:  # 16 items of 64 ids: 0.1 s
        shapes.append((len(seqs), max(len(s) for s in seqs)))
        time.sleep(0.001 + 1e-4 * len(seqs) * max(len(s) for s in seqs) / 1.024)
        return torch.zeros(len(seqs), 1)

    monkeypatch.setattr(scorer.runner, "forward", forward)
    scorer.forward_cost(max_batch_size=1024, max_batch_tokens=1_000_000, slow_s=0.05, repeats=2)
    assert max(n for n, _ in shapes) == 16  # 4 items (26 ms) grow to 16 (101 ms): too slow
    shapes.clear()
    scorer.forward_cost(max_batch_size=1024, max_batch_tokens=64 * 8, slow_s=10, repeats=2)
    assert max(n * length for n, length in shapes) <= 64 * 8
    assert max(n for n, _ in shapes) == 8


async def start_batcher(
    forward: Forward,
    metrics: ServiceMetrics,
    *,
    max_queue_items: int,
    forward_cost: ForwardCost | None = None,
    **limits: float,
) -> Batcher:
    """A batcher whose loop runs ``forward`` in a thread of this process, as with the model
    in-process."""
    batch_limits = BatchLimits(
        forward_cost=forward_cost or ForwardCost(math.inf, 0.0),
        **limits,  # type: ignore[arg-type]
    )
    return await Batcher.connect(
        serve_in_thread(forward, batch_limits),
        metrics,
        limits=batch_limits,
        max_queue_items=max_queue_items,
        lost=lambda: RuntimeError("the batching thread stopped"),
    )


def test_batcher_plans_batches_by_the_forward_cost(scorer: Scorer) -> None:
    short, long = scorer.encode(["good", " ".join(generate_corpus(6, seed=5))]).ids
    request = [short, long] * 4
    sizes: list[int] = []

    def forward(seqs: list[list[int]]) -> torch.Tensor:
        sizes.append(len(seqs))
        return scorer.forward(seqs)

    async def run(cost: ForwardCost | None) -> list[list[float]]:
        batcher = await start_batcher(
            forward, ServiceMetrics(), max_batch_size=64, max_batch_tokens=10_000,
            max_wait_s=0.0, max_queue_items=100, forward_cost=cost,
        )  # fmt: skip
        rows = await batcher.score(request)
        await batcher.close(timeout_s=5)
        return rows

    # A forward pass that costs little next to its tokens: the short items run apart.
    split = asyncio.run(run(ForwardCost(fixed_s=1e-6, per_token_s=1e-3)))
    assert sizes == [4, 4]
    whole = asyncio.run(run(None))  # no cost known: the fewest batches
    assert sizes == [4, 4, 8]
    for seq, a, b in zip(request, split, whole, strict=True):
        alone = scorer.forward([seq])[0].tolist()
        assert a == pytest.approx(alone, abs=1e-5) and b == pytest.approx(alone, abs=1e-5)


def test_batcher_returns_each_requests_rows_in_order_and_merges_requests(scorer: Scorer) -> None:
    metrics = ServiceMetrics()
    texts = generate_corpus(30, seed=3)
    requests = [scorer.encode(texts[i : i + i % 3 + 1]).ids for i in range(12)]

    async def run() -> list[list[list[float]]]:
        batcher = await start_batcher(
            scorer.forward, metrics, max_batch_size=8, max_batch_tokens=1000, max_wait_s=0.0,
            max_queue_items=100,
        )  # fmt: skip
        results = await asyncio.gather(*(batcher.score(r) for r in requests))
        await batcher.close(timeout_s=5)
        return results

    results = asyncio.run(run())
    for seqs, rows in zip(requests, results, strict=True):
        expected = [scorer.forward([s])[0].tolist() for s in seqs]
        assert len(rows) == len(seqs)
        for got, want in zip(rows, expected, strict=True):
            assert got == pytest.approx(want, abs=1e-5)
    assert metrics.items_scored._value.get() == sum(len(r) for r in requests)
    assert metrics.batches._value.get() < 12  # 12 concurrent requests shared passes


def test_batcher_queue_limit_and_draining(scorer: Scorer) -> None:
    ids = scorer.encode(["the movie was great .", "dull", "the end"]).ids
    started, release = threading.Event(), threading.Event()

    def held(seqs: list[list[int]]) -> torch.Tensor:
        started.set()
        release.wait(10)  # the thread stays in this forward until the queue has been checked
        return scorer.forward(seqs)

    async def run() -> None:
        batcher = await start_batcher(
            held, ServiceMetrics(), max_batch_size=4, max_batch_tokens=1000,
            max_wait_s=0.0, max_queue_items=3,
        )  # fmt: skip
        running = asyncio.ensure_future(batcher.score(ids[:1]))
        assert await asyncio.to_thread(started.wait, 5)
        queued = asyncio.ensure_future(batcher.score(ids))  # fills the queue: 3 of 3 items
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as info:
            await batcher.score(ids[:1])
        assert info.value.retry_after_s >= 1
        release.set()
        assert len(await running) == 1 and len(await queued) == 3
        closing = asyncio.ensure_future(batcher.close(timeout_s=5))
        await asyncio.sleep(0)  # close() has begun
        with pytest.raises(Draining):
            await batcher.score(ids[:1])
        await closing

    asyncio.run(run())


def test_batcher_skips_the_items_of_a_request_whose_handler_is_gone(scorer: Scorer) -> None:
    first, second = scorer.encode(["the movie was great .", "a dull , boring plot"]).ids
    started, release = threading.Event(), threading.Event()
    ran: list[list[int]] = []

    def held(seqs: list[list[int]]) -> torch.Tensor:
        ran.extend(seqs)
        started.set()
        release.wait(10)  # the loop stays in this forward while the second request is cancelled
        return scorer.forward(seqs)

    async def run() -> None:
        metrics = ServiceMetrics()
        batcher = await start_batcher(
            held, metrics, max_batch_size=4, max_batch_tokens=1000, max_wait_s=0.0,
            max_queue_items=10,
        )  # fmt: skip
        running = asyncio.ensure_future(batcher.score([first]))
        assert await asyncio.to_thread(started.wait, 5)
        gone = asyncio.ensure_future(batcher.score([second] * 3))
        await asyncio.sleep(0.05)
        assert metrics.queue_depth._value.get() == 3
        gone.cancel()  # fault injection: the client went away while the request was queued
        await asyncio.sleep(0.05)
        assert metrics.queue_depth._value.get() == 0
        release.set()
        assert len(await running) == 1
        assert len(await batcher.score([first])) == 1  # the loop goes on after the cancel
        await batcher.close(timeout_s=5)

    asyncio.run(run())
    assert second not in ran  # the cancelled request's items never reached the model


def test_batcher_reports_a_failed_forward_to_its_requests_only(scorer: Scorer) -> None:
    bad_ids, good_ids = scorer.encode(["the plot was awful .", "great"]).ids

    def failing(seqs: list[list[int]]) -> torch.Tensor:
        if bad_ids in seqs:  # fault injection: this batch's forward pass crashes
            raise RuntimeError("bad batch")
        return scorer.forward(seqs)

    async def run() -> None:
        batcher = await start_batcher(
            failing, ServiceMetrics(), max_batch_size=1, max_batch_tokens=1000,
            max_wait_s=0.0, max_queue_items=10,
        )  # fmt: skip
        bad, good = await asyncio.gather(
            batcher.score([bad_ids]), batcher.score([good_ids]), return_exceptions=True
        )
        assert isinstance(bad, RuntimeError)
        assert good == [scorer.forward([good_ids])[0].tolist()]
        await batcher.close(timeout_s=5)

    asyncio.run(run())


@pytest.mark.parametrize(("fixed_s", "split"), [(0.0, True), (10.0, False)])
def test_batcher_splits_rounds_that_waited_longer_than_a_forward_costs(
    scorer: Scorer, fixed_s: float, split: bool
) -> None:
    ids = scorer.encode(["the movie was great ."]).ids
    sizes: list[int] = []

    def forward(seqs: list[list[int]]) -> torch.Tensor:
        sizes.append(len(seqs))
        return scorer.forward(seqs)

    async def client(batcher: Batcher, request: list[list[int]]) -> None:
        for _ in range(3):
            await batcher.score(request)
            await asyncio.sleep(0.01)  # the client's own work before its next request

    async def run() -> None:
        batcher = await start_batcher(
            forward, ServiceMetrics(), max_batch_size=64, max_batch_tokens=10_000,
            max_wait_s=0.5, max_queue_items=100,
            forward_cost=ForwardCost(fixed_s=fixed_s, per_token_s=0.0),
        )  # fmt: skip
        # A lone client's request is never split: that would answer nobody sooner, and the
        # same requests in the same order keep giving bit-identical scores. Its 8 items are
        # also what the loop then expects back, so it waits for all 8 clients below.
        await client(batcher, ids * 8)
        await asyncio.gather(*(client(batcher, ids) for _ in range(8)))
        await batcher.close(timeout_s=5)

    asyncio.run(run())
    assert sizes[:3] == [8, 8, 8]
    # Costly forwards: whole rounds. Cheap ones: the first round of 8 clients runs as two
    # halves, and the clients then come back in smaller groups (how they regroup depends on
    # the machine's timing).
    if split:
        assert sizes[3:5] == [4, 4] and sum(sizes[3:]) == 24
    else:
        assert sizes[3:] == [8, 8, 8]


def test_batcher_thread_runs_batches_and_rounds_back_to_back_while_the_loop_is_busy(
    scorer: Scorer,
) -> None:
    ids = scorer.encode(["the movie was great .", "dull", "the end"]).ids
    starts: list[float] = []
    ends: list[float] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()

        def forward(seqs: list[list[int]]) -> torch.Tensor:
            starts.append(time.perf_counter())
            if len(starts) == 1:  # fault injection: the event loop is stuck for 1 s
                loop.call_soon_threadsafe(time.sleep, 1.0)
                time.sleep(0.05)  # until it is
            out = scorer.forward(seqs)
            ends.append(time.perf_counter())
            return out

        batcher = await start_batcher(
            forward, ServiceMetrics(), max_batch_size=1, max_batch_tokens=1000,
            max_wait_s=0.0, max_queue_items=10,
        )  # fmt: skip
        # Six 1-item batches; a round takes at most four: two rounds.
        first, second = await asyncio.gather(batcher.score(ids), batcher.score(ids))
        assert len(first) == len(second) == 3
        await batcher.close(timeout_s=5)

    asyncio.run(run())
    assert len(starts) == 6
    # The next batch, and the next round, started in the thread: neither waited out the stuck
    # event loop.
    assert max(b - a for a, b in zip(ends[:-1], starts[1:], strict=True)) < 0.5


def test_batcher_drain_timeout_fails_queued_and_running_requests(scorer: Scorer) -> None:
    ids = scorer.encode(["the movie was great ."]).ids
    release = threading.Event()
    loops: list[threading.Thread] = []

    def stuck(seqs: list[list[int]]) -> torch.Tensor:
        loops.append(threading.current_thread())
        release.wait(10)  # fault injection: a forward pass that hangs
        return scorer.forward(seqs)

    async def run() -> None:
        batcher = await start_batcher(
            stuck, ServiceMetrics(), max_batch_size=1, max_batch_tokens=1000,
            max_wait_s=0.0, max_queue_items=10,
        )  # fmt: skip
        requests = [asyncio.ensure_future(batcher.score(ids)) for _ in range(6)]
        await asyncio.sleep(0.1)  # the first round (four of them) is running
        start = time.perf_counter()
        await batcher.close(timeout_s=0.2)
        assert time.perf_counter() - start < 1.0
        for request in requests:
            with pytest.raises(Draining):
                await request
        release.set()

    asyncio.run(run())
    # Released, the loop finishes its forward pass, finds the link closed, and stops.
    loops[0].join(timeout=5)
    assert not loops[0].is_alive()
