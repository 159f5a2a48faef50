"""Reward service benchmark: batched service vs in-process limit vs naive per-request endpoint.

For the built-in demo reward model and a ~10x larger random model of the same architecture,
in one run, on the same texts:

(a) in-process: tokenize + length-sorted batched forwards, no HTTP (the limit), over windows of
    the texts as they are in flight (clients x items per request: all the service can ever
    batch together), planned into batches as the service plans them (its limits and the
    forward cost it fitted), timed just before and just after each (b); (a*) the same over
    the whole set sorted at once, for reference; (a½) the same over windows of half that: what
    each of two alternating halves of the clients has in flight, which is what a service whose
    forward overlaps the other half's HTTP work batches per round (a diagnostic, not a target:
    it shows whether rounds of that size cost (b) much);
(b) the real service (``python -m reward_service``) under N concurrent clients, each sending
    its next request as soon as it has the answer, in steady state (a timed window after a
    warm-up, so neither the ramp-up nor the drain counts);
(c) a naive endpoint that scores each request alone as it arrives (OpenRLHF ``serve_rm``
    pattern: tokenize with padding and run the model inside the async handler);
plus single-item /score p50 latency against an in-process single-item encode + forward, timed
in interleaved rounds (the overhead is the median of the per-round differences);
(r) the same workload as (b) on each route in another tool's shape (``--routes``: OpenRLHF's
    /get_reward, vLLM's /classify and /pooling, TEI's /predict), each timed right after a run
    of /score and reported as its items/s over that run's (the target: at least 0.95).

The load generator is a minimal keep-alive HTTP/1.1 client on asyncio streams, so that it
measures the servers rather than itself (both servers get the same client). The p50 of the
project's httpx client is reported as well.

    python bench/bench_service.py [--out bench/results/service.json] [--quick] [--routes ...]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import psutil
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.demo_models import ensure_demo_models, generate_corpus  # noqa: E402
from reward_service.batch_loop import ForwardCost, plan_batches  # noqa: E402
from reward_service.scorer import Scorer  # noqa: E402
from reward_service.settings import ServiceSettings  # noqa: E402


# ----------------------------------------------------------------------------- naive server
def naive_server(model: str, port: int, num_threads: int, compiled: bool) -> None:
    """The OpenRLHF ``serve_rm`` pattern: each request is tokenized and scored on its own,
    inside the async handler (so requests are served strictly one after another)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(num_threads)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "right"
    net = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch.float32).eval()

    def score_texts(texts: list[str]) -> list[float]:
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
        with torch.no_grad():
            return net(**batch).logits[:, 0].tolist()

    if compiled:  # as the service does: dynamic shapes, each shape kind compiled before serving
        net.compile(dynamic=True)
        for texts in (["a"], ["a"] * 2, ["a good film ."], ["a good film ."] * 2, ["a", "a b c"]):
            score_texts(texts)
    app = FastAPI()

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        texts = [item["text"] for item in (await request.json())["items"]]
        return JSONResponse({"scores": score_texts(texts)})

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ----------------------------------------------------------------------------- HTTP client
class RawClient:
    """One keep-alive HTTP/1.1 connection on asyncio streams: POST JSON, read the answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.writer.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
            )
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        if b" 200 " not in status_line:
            raise RuntimeError(f"{status_line!r}: {payload[:200]!r}")
        return payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd} not ready in time")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


# ----------------------------------------------------------------------------- measurements
@dataclass(frozen=True)
class Throughput:
    """Items per second, with the mean items and padded tokens per item of the forward passes
    that scored them (None where unknown: the naive server reports neither)."""

    items_per_s: float
    mean_batch: float | None = None
    padded_per_item: float | None = None


# How each route takes a list of texts to score.
ROUTE_BODIES: dict[str, Callable[[Sequence[str]], dict[str, Any]]] = {
    "/score": lambda texts: {"items": [{"text": t} for t in texts]},
    "/get_reward": lambda texts: {"query": list(texts)},
    "/classify": lambda texts: {"input": list(texts)},
    "/pooling": lambda texts: {"input": list(texts)},
    "/predict": lambda texts: {"inputs": [[t] for t in texts]},  # a batch, even of one
}
COMPAT_ROUTES = ("/get_reward", "/classify", "/pooling", "/predict")


def bodies(
    texts: Sequence[str], per_request: int, route: str = "/score"
) -> list[tuple[bytes, int]]:
    """``route``'s bodies of ``per_request`` texts each, with their item counts."""
    chunks = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    return [(json.dumps(ROUTE_BODIES[route](c)).encode(), len(c)) for c in chunks]


async def _throughput(
    port: int,
    requests: list[tuple[bytes, int]],
    clients: int,
    warmup_s: float,
    seconds: float,
    scored_items: bool,
    server_pid: int | None = None,
    route: str = "/score",
) -> tuple[Throughput, dict[str, float] | None]:
    """Steady-state throughput (items/s, mean batch, padded tokens per item) and CPU time per
    item: every client sends the requests (in turn, round and round) back to back, and only a
    window of ``seconds`` after ``warmup_s`` counts, so neither the ramp-up nor the drain does.

    With ``scored_items`` (the service), the items its forward passes scored in the window,
    read from its ``/metrics``, count: responses come in bursts (a request is answered when the
    last of its items, spread over the length-sorted batches of a round, is scored), so
    counting responses would quantize the figure by a whole round. Without (the naive server,
    one forward per request; it has no /metrics, and a request for it would queue behind the
    load), the items of the responses that arrive in the window count.

    With ``server_pid`` (and ``scored_items``), the CPU microseconds per item that the server
    process, its children (the model process) and this one (the clients) spent in the window.
    """
    conns = [RawClient(port) for _ in range(clients)]
    for conn in conns:  # connect outside the timed part
        await conn.post(route, requests[0][0])
    turns = itertools.cycle(requests)
    t0 = time.perf_counter() + warmup_s
    t1 = t0 + seconds
    answered = 0

    async def worker(conn: RawClient) -> None:
        nonlocal answered
        while time.perf_counter() < t1:
            body, n = next(turns)
            await conn.post(route, body)
            if t0 <= time.perf_counter() <= t1:
                answered += n

    async def snapshot(at: float) -> tuple[float, tuple[float, ...], tuple[float, ...]]:
        await asyncio.sleep(at - time.perf_counter())
        # Both readings in a thread: the clients' event loop keeps running meanwhile.
        stats, cpu = await asyncio.to_thread(
            lambda: (_batch_stats(port), _cpu_seconds(server_pid) if server_pid else ())
        )
        return time.perf_counter(), stats, cpu

    async def scored() -> tuple[Throughput, dict[str, float] | None]:
        (start, before, cpu0), (end, after, cpu1) = await snapshot(t0), await snapshot(t1)
        items, batches, padded = (b - a for a, b in zip(before, after, strict=True))
        cpu = None
        if server_pid is not None:
            used = [(b - a) / max(items, 1) * 1e6 for a, b in zip(cpu0, cpu1, strict=True)]
            cpu = dict(zip(("server", "model", "client"), used, strict=True))
        n = max(items, 1)
        return Throughput(items / (end - start), items / max(batches, 1), padded / n), cpu

    clients_done = asyncio.gather(*(worker(c) for c in conns))
    if scored_items:
        _, result = await asyncio.gather(clients_done, scored())
    else:
        await clients_done
        result = (Throughput(answered / seconds), None)
    for conn in conns:
        conn.close()
    return result


def http_items_per_s(
    port: int,
    texts: Sequence[str],
    per_request: int,
    args: argparse.Namespace,
    scored_items: bool = True,
    server_pid: int | None = None,
    route: str = "/score",
) -> tuple[Throughput, dict[str, float] | None]:
    """Steady-state throughput of a server's ``route`` under ``args.clients`` clients and the
    CPU time per item (see :func:`_throughput`)."""
    requests = bodies(texts, per_request, route)
    return asyncio.run(
        _throughput(
            port,
            requests,
            args.clients,
            args.warmup,
            args.seconds,
            scored_items,
            server_pid,
            route,
        )
    )


def _cpu_seconds(pid: int) -> tuple[float, float, float]:
    """CPU seconds (user + system) so far of process ``pid``, of its children and of this
    process."""

    def used(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    server = psutil.Process(pid)
    children = sum(used(child) for child in server.children(recursive=True))
    return used(server), children, used(psutil.Process())


def paired_latencies_ms(
    scorer: Scorer, ports: Sequence[int], text: str, n: int
) -> tuple[list[float], list[list[float]]]:
    """Single-item latencies, interleaved: each round times one in-process encode + forward,
    then one /score request to each server. Pairing the in-process call with the requests of
    the same round cancels the machine's drift (CPU clock, neighbours), which separate blocks
    of calls leave in their difference."""
    body = json.dumps({"items": [{"text": text}]}).encode()

    async def run() -> tuple[list[float], list[list[float]]]:
        conns = [RawClient(port) for port in ports]
        inproc: list[float] = []
        served: list[list[float]] = [[] for _ in ports]
        for i in range(n + 20):  # the first 20 rounds warm up
            start = time.perf_counter()
            scorer.forward(scorer.encode([text]).ids)
            times = [time.perf_counter() - start]
            for conn in conns:
                start = time.perf_counter()
                await conn.post("/score", body)
                times.append(time.perf_counter() - start)
            if i >= 20:
                inproc.append(times[0] * 1e3)
                for out, t in zip(served, times[1:], strict=True):
                    out.append(t * 1e3)
        for conn in conns:
            conn.close()
        return inproc, served

    return asyncio.run(run())


def httpx_p50_ms(port: int, text: str, n: int) -> float:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        return p50_ms(lambda: client.post("/score", json={"items": [{"text": text}]}), n)


def p50_ms(fn: Callable[[], object], n: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def in_process_items_per_s(
    scorer: Scorer,
    texts: Sequence[str],
    s: ServiceSettings,
    cost: ForwardCost,
    window: int | None,
    seconds: float,
) -> Throughput:
    """Items/s of tokenize + forward in-process, no HTTP, in micro-batches planned as the
    service plans them (its limits and ``cost``, the forward cost it fitted), passing
    over the texts again until ``seconds`` have passed (as long as an HTTP run, so that both
    meet the same machine).

    ``window``: the texts are taken in order, ``window`` at a time (what is in flight when all
    clients wait, i.e. all that the service could ever batch together), and each window is
    length-sorted and split. ``None``: the whole set is length-sorted at once, which no online
    service can do (shown for reference).
    """
    step = window or len(texts)
    done = batches = padded = 0
    start_t = time.perf_counter()
    while True:  # at least one pass
        for start in range(0, len(texts), step):
            ids = scorer.encode(texts[start : start + step]).ids
            lengths = [len(x) for x in ids]
            plan = plan_batches(lengths, s.max_batch_size, s.max_batch_tokens, cost.fixed_tokens)
            for batch in plan:
                scorer.forward([ids[i] for i in batch])
                padded += len(batch) * max(lengths[i] for i in batch)
            done += len(ids)
            batches += len(plan)
        elapsed = time.perf_counter() - start_t
        if elapsed >= seconds:
            return Throughput(done / elapsed, done / batches, padded / done)


# ----------------------------------------------------------------------------- models, texts
def make_texts(n: int, seed: int = 0) -> list[str]:
    """Reviews of 1-3 generated sentences: short and long items mixed, as real batches are."""
    rng = random.Random(seed)
    corpus = generate_corpus(3000, seed=seed + 99)
    return [" ".join(rng.sample(corpus, rng.randint(1, 3))) for _ in range(n)]


def make_large_model(base: Path, out: Path) -> Path:
    """Same architecture as ``base`` at ~10x the parameters, random weights, saved to ``out``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(base)
    config.hidden_size, config.intermediate_size = 160, 480
    config.num_hidden_layers, config.head_dim = 4, 40
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def n_params(path: Path) -> int:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- main
def bench_model(name: str, path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start both servers; for each request size interleave (a), (b), (a) again, (c), (a*)
    and (a½) ``repeats`` times and keep medians (the machine's speed drifts, so side-by-side
    rounds compare like with like); then the single-item latencies. One row per request
    size."""
    texts = make_texts(args.items)
    flags = ["--num-threads", str(args.num_threads), "--max-batch-size", str(args.max_batch_size)]
    compile_flags = ["--compile"] if args.compile else []
    settings = ServiceSettings(
        model=str(path),
        num_threads=args.num_threads,
        max_batch_size=args.max_batch_size,
        forward_process=False,  # (a) is the model in this process; the service has its own
        compile=args.compile,
    )
    scorer = Scorer.load(settings)
    scorer.warmup()
    # What the service measures at its warm-up, here in-process (reported beside the service's).
    cost = scorer.forward_cost(settings.max_batch_size, settings.max_batch_tokens)
    probe = texts[0]
    params = n_params(path)

    service_port, naive_port = free_port(), free_port()
    service_cmd = [sys.executable, "-m", "reward_service", "--model", str(path)]
    naive_cmd = [sys.executable, __file__, "--naive-server", str(path)]
    service = start([*service_cmd, "--port", str(service_port), "--log-level", "warning", *flags,
                     *compile_flags], service_port)  # fmt: skip
    try:
        naive = start(
            [*naive_cmd, "--port", str(naive_port), *flags[:2], *compile_flags], naive_port
        )
    except BaseException:
        stop(service)
        raise
    rows = []
    try:
        # (a) plans with the cost the service fitted at its own warm-up, so that both sides
        # cut the same pools into the same batches (the fit moves between processes: 5-15 us
        # per padded token for the demo model).
        info = httpx.get(f"http://127.0.0.1:{service_port}/info", timeout=10).json()
        plan_cost = ForwardCost(info["forward_fixed_ms"] / 1e3, info["forward_per_token_us"] / 1e6)
        for per_request in args.per_request:
            window = args.clients * per_request
            rounds = _throughput_rounds(
                scorer, settings, plan_cost, texts, per_request, window, service, service_port,
                naive_port, args,
            )  # fmt: skip
            med = statistics.median
            rows.append(
                {
                    "model": name,
                    "params": params,
                    "inproc_forward_fixed_ms": cost.fixed_s * 1e3,
                    "inproc_forward_per_token_us": cost.per_token_s * 1e6,
                    "service_forward_fixed_ms": info["forward_fixed_ms"],
                    "service_forward_per_token_us": info["forward_per_token_us"],
                    "items": len(texts),
                    "per_request": per_request,
                    "inproc_items_per_s": med(rounds["a"]),
                    "inproc_global_sort_items_per_s": med(rounds["a_global"]),
                    "inproc_half_window_items_per_s": med(rounds["a_half"]),
                    "service_items_per_s": med(rounds["b"]),
                    "naive_items_per_s": med(rounds["c"]),
                    "service_mean_batch": med(rounds["batch"]),
                    "inproc_mean_batch": med(rounds["a_batch"]),
                    # Padded tokens per item scored: what sorting a window by length saves.
                    "inproc_padded_per_item": med(rounds["a_padded"]),
                    "service_padded_per_item": med(rounds["b_padded"]),
                    # CPU per item: (a) runs on one thread, busy throughout.
                    "inproc_cpu_us_per_item": med(1e6 / a for a in rounds["a"]),
                    "service_cpu_us_per_item": {
                        part: med(rounds[f"cpu_{part}"]) for part in ("server", "model", "client")
                    },
                    # The share of the window in which the model process was on a CPU.
                    "model_process_busy": med(
                        _ratios(rounds["cpu_model"], [1e6 / b for b in rounds["b"]])
                    ),
                    "b_over_a": med(_ratios(rounds["b"], rounds["a"])),
                    "b_over_a_min": min(_ratios(rounds["b"], rounds["a"])),
                    "b_over_a_max": max(_ratios(rounds["b"], rounds["a"])),
                    "b_over_a_global": med(_ratios(rounds["b"], rounds["a_global"])),
                    "b_over_a_half": med(_ratios(rounds["b"], rounds["a_half"])),
                    "b_over_c": med(_ratios(rounds["b"], rounds["c"])),
                    "a_over_c": med(_ratios(rounds["a"], rounds["c"])),
                    # (r): each route against the /score run beside it.
                    "routes": {
                        route: {
                            "items_per_s": med(rounds[f"route:{route}"]),
                            "score_items_per_s": med(rounds[f"score:{route}"]),
                            "over_score": med(
                                _ratios(rounds[f"route:{route}"], rounds[f"score:{route}"])
                            ),
                            "over_score_min": min(
                                _ratios(rounds[f"route:{route}"], rounds[f"score:{route}"])
                            ),
                            "over_score_max": max(
                                _ratios(rounds[f"route:{route}"], rounds[f"score:{route}"])
                            ),
                        }
                        for route in args.routes
                    },
                    "rounds": rounds,
                }
            )
        latency: dict[str, list[float]] = {k: [] for k in ("inproc", "service", "naive")}
        overhead: list[float] = []
        httpx_p50: list[float] = []
        for _ in range(args.repeats):
            inproc, (service_ms, naive_ms) = paired_latencies_ms(
                scorer, (service_port, naive_port), probe, args.latency_n
            )
            latency["inproc"].append(statistics.median(inproc))
            latency["service"].append(statistics.median(service_ms))
            latency["naive"].append(statistics.median(naive_ms))
            overhead.append(statistics.median(_ratios(service_ms, inproc, op=float.__sub__)))
            httpx_p50.append(httpx_p50_ms(service_port, probe, args.latency_n))
    finally:
        stop(service)
        stop(naive)
    single = {
        "inproc_single_p50_ms": statistics.median(latency["inproc"]),
        "service_single_p50_ms": statistics.median(latency["service"]),
        "service_single_p50_httpx_ms": statistics.median(httpx_p50),
        "naive_single_p50_ms": statistics.median(latency["naive"]),
        # The median of the per-round differences (service minus in-process, same round).
        "single_overhead_ms": statistics.median(overhead),
        "single_overhead_rounds_ms": overhead,
    }
    return [{**row, **single} for row in rows]


def _throughput_rounds(
    scorer: Scorer,
    settings: ServiceSettings,
    cost: ForwardCost,
    texts: list[str],
    per_request: int,
    window: int,
    service: subprocess.Popen[bytes],
    service_port: int,
    naive_port: int,
    args: argparse.Namespace,
) -> dict[str, list[float]]:
    """Per round: (a) just before and just after (b), so that (b) is compared with the
    machine it met (the round's (a) is the mean of the two); then (c), (a*) and (a½); then
    each of ``args.routes`` beside a run of /score of its own (in turns: /score first in even
    rounds, the route first in odd ones), keys ``route:ROUTE`` and ``score:ROUTE``."""

    def inproc(window: int | None) -> Throughput:
        return in_process_items_per_s(scorer, texts, settings, cost, window, args.seconds)

    in_process_items_per_s(scorer, texts[: window * 2], settings, cost, window, 0)  # warm-up
    keys = (
        "a", "a_global", "a_half", "b", "c", "a_batch", "a_padded", "batch", "b_padded",
        "cpu_server", "cpu_model", "cpu_client",
    )  # fmt: skip
    rounds: dict[str, list[float]] = {k: [] for k in keys}
    for route in args.routes:
        rounds[f"route:{route}"], rounds[f"score:{route}"] = [], []
    for round_index in range(args.repeats):
        before = inproc(window)
        served, cpu = http_items_per_s(
            service_port, texts, per_request, args, server_pid=service.pid
        )
        after = inproc(window)
        rounds["a"].append((before.items_per_s + after.items_per_s) / 2)
        rounds["a_batch"].append(before.mean_batch or 0.0)
        rounds["a_padded"].append(before.padded_per_item or 0.0)
        rounds["b"].append(served.items_per_s)
        rounds["batch"].append(served.mean_batch or 0.0)
        rounds["b_padded"].append(served.padded_per_item or 0.0)
        for part, us in (cpu or {}).items():
            rounds[f"cpu_{part}"].append(us)
        naive, _ = http_items_per_s(naive_port, texts, per_request, args, scored_items=False)
        rounds["c"].append(naive.items_per_s)
        rounds["a_global"].append(inproc(None).items_per_s)
        rounds["a_half"].append(inproc(max(1, window // 2)).items_per_s)
        for route in args.routes:
            pair = ("/score", route) if round_index % 2 == 0 else (route, "/score")
            for path in pair:
                run, _ = http_items_per_s(service_port, texts, per_request, args, route=path)
                key = "score" if path == "/score" else "route"
                rounds[f"{key}:{route}"].append(run.items_per_s)
    return rounds


def _ratios(
    xs: Sequence[float],
    ys: Sequence[float],
    op: Callable[[float, float], float] = float.__truediv__,
) -> list[float]:
    return [op(x, y) for x, y in zip(xs, ys, strict=True)]


def _batch_stats(port: int) -> tuple[float, float, float]:
    """(items, forward passes, padded tokens) so far, from the service's /metrics."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics")
    response.raise_for_status()
    values = {}
    for line in response.text.splitlines():
        if not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return (
        values.get("reward_batch_size_sum", 0.0),
        values.get("reward_batch_size_count", 0.0),
        values.get("reward_batch_tokens_sum", 0.0),
    )


def _print_head(before: str, header: str) -> None:
    """A markdown table's header row (after ``before``) and its separator."""
    print(before + header)
    print("|" + "---|" * header.count(" | ") + "---|")


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\n{args.clients} concurrent clients ({args.seconds:g} s after {args.warmup:g} s of "
        f"warm-up), {args.items} texts, torch threads "
        f"{args.num_threads}{' (torch.compile)' if args.compile else ''}, max_batch_size "
        f"{args.max_batch_size}, medians of {args.repeats} "
        "interleaved rounds\n"
    )
    header = (
        "| model | params | items/request | (a) in-process | (a*) global sort | "
        "(a½) half windows | (b) service | (c) naive | (b)/(a) | (b)/(a) per round | (b)/(a*) | "
        "(b)/(a½) | (b)/(c) | (a)/(c) | mean batch (a) / (b) | padded tokens per item (a) / (b) |"
    )
    _print_head("", header)
    for r in rows:
        print(
            f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['per_request']} | "
            f"{r['inproc_items_per_s']:.0f}/s | {r['inproc_global_sort_items_per_s']:.0f}/s | "
            f"{r['inproc_half_window_items_per_s']:.0f}/s | "
            f"{r['service_items_per_s']:.0f}/s | {r['naive_items_per_s']:.0f}/s | "
            f"{r['b_over_a']:.2f} | {r['b_over_a_min']:.2f}–{r['b_over_a_max']:.2f} | "
            f"{r['b_over_a_global']:.2f} | {r['b_over_a_half']:.2f} | {r['b_over_c']:.2f} | "
            f"{r['a_over_c']:.2f} | {r['inproc_mean_batch']:.1f} / {r['service_mean_batch']:.1f} | "
            f"{r['inproc_padded_per_item']:.1f} / {r['service_padded_per_item']:.1f} |"
        )
    header = (
        "| model | in-process 1-item p50 | /score 1-item p50 | overhead | /score p50 via httpx | "
        "naive 1-item p50 |"
    )
    _print_head("\n", header)
    for r in {r["model"]: r for r in rows}.values():
        print(
            f"| {r['model']} | {r['inproc_single_p50_ms']:.2f} ms | "
            f"{r['service_single_p50_ms']:.2f} ms | {r['single_overhead_ms']:+.2f} ms | "
            f"{r['service_single_p50_httpx_ms']:.2f} ms | {r['naive_single_p50_ms']:.2f} ms |"
        )
    header = (
        "| model | items/request | (a) in-process | (b) server | (b) model process | "
        "(b) clients | (b) total | (b) total / (a) | model process busy |"
    )
    _print_head("\nCPU time per item (user + system, microseconds):\n\n", header)
    for r in rows:
        cpu = r["service_cpu_us_per_item"]
        total = sum(cpu.values())
        print(
            f"| {r['model']} | {r['per_request']} | {r['inproc_cpu_us_per_item']:.0f} | "
            f"{cpu['server']:.0f} | {cpu['model']:.0f} | {cpu['client']:.0f} | {total:.0f} | "
            f"{total / r['inproc_cpu_us_per_item']:.2f} | {r['model_process_busy']:.0%} |"
        )
    print(
        f"(a) keeps one core busy; (b) shares the machine's {os.cpu_count()} cores between the "
        "server, its model process and the clients. (b)/(a) = the model process's busy share x "
        "(a)'s CPU per item / the model process's."
    )
    print(
        "\nforward cost fitted at warm-up (fixed + per padded token); the service's sets the "
        "plans of (a) and (b):"
    )
    for r in {r["model"]: r for r in rows}.values():
        print(
            f"  {r['model']}: service {r['service_forward_fixed_ms']:.2f} ms + "
            f"{r['service_forward_per_token_us']:.1f} us (in-process here: "
            f"{r['inproc_forward_fixed_ms']:.2f} ms + {r['inproc_forward_per_token_us']:.1f} us)"
        )
    if args.routes:
        header = (
            "| model | items/request | route | (r) route | /score beside it | (r)/(b) | "
            "(r)/(b) per round |"
        )
        _print_head("\n(r) routes in other tools' shapes, each beside a /score run:\n\n", header)
        for r in rows:
            for route, x in r["routes"].items():
                print(
                    f"| {r['model']} | {r['per_request']} | {route} | "
                    f"{x['items_per_s']:.0f}/s | {x['score_items_per_s']:.0f}/s | "
                    f"{x['over_score']:.3f} | {x['over_score_min']:.3f}–"
                    f"{x['over_score_max']:.3f} |"
                )
    print(
        "\ntargets: (b)/(a) >= 0.9, (b)/(c) >= 3, overhead <= 2 ms, (r)/(b) >= 0.95; (a)/(c) is "
        "the most any batcher could reach for (b)/(c)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "service.json")
    parser.add_argument(
        "--items", type=int, default=1024, help="texts: (a) scores them all, clients cycle them"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="timed window per HTTP run")
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed start of each run")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--per-request", type=int, nargs="+", default=[1, 8, 32], help="items per request (each)"
    )
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads (all three)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model in (a), (b) (the service's --compile) and (c)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="interleaved rounds of each measurement; medians are kept",
    )
    parser.add_argument("--latency-n", type=int, default=200)
    parser.add_argument(
        "--quick", action="store_true", help="small run (512 texts, 2 rounds of 1.5 s)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=["demo", "large"],
        default=["demo", "large"],
        help="demo: the built-in reward model; large: ~10x its parameters, random weights",
    )
    parser.add_argument(
        "--routes",
        nargs="*",
        choices=COMPAT_ROUTES,
        default=list(COMPAT_ROUTES),
        help="(r): routes in other tools' shapes to time beside /score (none: --routes alone)",
    )
    parser.add_argument("--naive-server", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_server:
        naive_server(args.naive_server, args.port, args.num_threads, args.compile)
        return
    if args.quick:
        args.items, args.repeats, args.latency_n, args.seconds = 512, 2, 50, 1.5
    torch.set_num_threads(args.num_threads)

    demo = ensure_demo_models()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-large-") as tmp:
        models = []
        if "demo" in args.models:
            models.append(("demo", demo.reward))
        if "large" in args.models:
            models.append(("demo x10", make_large_model(demo.reward, Path(tmp) / "large")))
        for name, path in models:
            rows += bench_model(name, path, args)
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "naive_server", "port")}
    args.out.write_text(json.dumps({"settings": settings, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
