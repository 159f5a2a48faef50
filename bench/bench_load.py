"""Reward service under load and overload, against one real ``python -m reward_service`` process.

Load: C concurrent clients (default 64) each send R requests (default 50) back to back, each with
1..16 items of mixed forms (text, prompt + completion, chat messages, prompt messages +
completion); every score is checked against a plain in-process transformers forward of the
same item. Overload: a service with a small queue (``REWARD_MAX_QUEUE_ITEMS``) gets bursts of
simultaneous requests; we count 429s (each must carry ``Retry-After``), other statuses and
transport errors, and track the service's resident memory (VmRSS / VmHWM).

    python bench/bench_load.py [--clients 64] [--requests 50] [--out bench/results/load.json]

The workload helpers here are shared with ``tests/test_reliability_service.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.demo_models import ensure_demo_models, generate_corpus  # noqa: E402
from trainer.service_process import ServiceProcess  # noqa: E402

MAX_ITEMS = 16


# ----------------------------------------------------------------------------- workload
def mixed_items(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct score items cycling through the four input forms, of varied lengths."""
    rng = random.Random(seed)
    corpus = generate_corpus(4 * n, seed=seed)
    items: list[dict[str, Any]] = []
    for k in range(n):
        text = " ".join(corpus[4 * k : 4 * k + rng.randint(1, 4)])
        cut = text.find(" ", len(text) // 3)
        prompt, completion = (text[:cut], text[cut:]) if cut > 0 else (text, " .")
        match k % 4:
            case 0:
                items.append({"text": text})
            case 1:
                items.append({"prompt": prompt, "completion": completion})
            case 2:
                items.append(
                    {
                        "messages": [
                            {"role": "user", "content": prompt},
                            {"role": "assistant", "content": completion.strip()},
                        ]
                    }
                )
            case _:
                items.append(
                    {"prompt": [{"role": "user", "content": prompt}], "completion": completion}
                )
    return items


class Reference:
    """Plain transformers, one item per forward: what every service score must equal."""

    def __init__(self, path: str | Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    def render(self, item: dict[str, Any]) -> str:
        if "text" in item:
            return item["text"]
        if "messages" in item:
            return self.tokenizer.apply_chat_template(item["messages"], tokenize=False)
        if isinstance(item["prompt"], list):
            reply = {"role": "assistant", "content": item["completion"].strip()}
            return self.tokenizer.apply_chat_template([*item["prompt"], reply], tokenize=False)
        return item["prompt"] + item["completion"]

    @torch.inference_mode()
    def score(self, item: dict[str, Any]) -> float:
        text = self.render(item)
        has_bos = text.startswith(self.tokenizer.bos_token)  # chat templates add BOS themselves
        ids = self.tokenizer(text, add_special_tokens=not has_bos)["input_ids"]
        return self.model(input_ids=torch.tensor([ids])).logits[0, 0].item()


@dataclass
class Result:
    """One request: which pool items it sent, what came back, how long it took."""

    indices: list[int]
    status: int | None  # None: no HTTP answer (timeout, connection error)
    latency_s: float
    scores: list[float] = field(default_factory=list)
    error: str = ""
    retry_after: str | None = None


async def _send(http: httpx.AsyncClient, path: str, body: dict[str, Any], indices: list[int]):
    start = time.perf_counter()
    try:
        response = await http.post(path, json=body)
    except httpx.HTTPError as exc:
        return Result(indices, None, time.perf_counter() - start, error=repr(exc))
    latency = time.perf_counter() - start
    if response.status_code != 200:
        return Result(
            indices, response.status_code, latency, error=response.text,
            retry_after=response.headers.get("retry-after"),
        )  # fmt: skip
    return Result(indices, 200, latency, scores=response.json()["scores"])


class RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a load generator light enough
    that on few cores it measures the server rather than itself (httpx costs more CPU per
    request than the service does)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.timeout_s = timeout_s
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: dict[str, Any], indices: list[int]) -> Result:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                status, headers, payload = await self._exchange(path, body)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, TimeoutError) as exc:
            self.close()
            return Result(indices, None, time.perf_counter() - start, error=repr(exc))
        latency = time.perf_counter() - start
        if status != 200:
            return Result(indices, status, latency, error=payload.decode(errors="replace"),
                          retry_after=headers.get("retry-after"))  # fmt: skip
        return Result(indices, 200, latency, scores=json.loads(payload)["scores"])

    async def _exchange(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
            sock = self.streams[1].get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader, writer = self.streams
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        writer.write(head.encode() + data)
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        payload = await reader.readexactly(int(headers.get("content-length", 0)))
        return status, headers, payload

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def run_load(
    url: str,
    pool: Sequence[dict[str, Any]],
    *,
    clients: int,
    requests: int,
    max_items: int = MAX_ITEMS,
    seed: int = 0,
    timeout_s: float = 60.0,
    raw: bool = False,
) -> tuple[list[Result], float]:
    """``clients`` concurrent clients, each sending ``requests`` requests of 1..max_items pool
    items back to back (one keep-alive connection each; httpx, or :class:`RawConnection` with
    ``raw``). Returns results and wall seconds."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(k: int, http: httpx.AsyncClient) -> list[Result]:
        rng = random.Random(seed * 100_003 + k)
        connection = RawConnection(url, timeout_s) if raw else None
        out = []
        for _ in range(requests):
            indices = [rng.randrange(len(pool)) for _ in range(rng.randint(1, max_items))]
            body = {"items": [pool[i] for i in indices]}
            if connection is not None:
                out.append(await connection.post("/score", body, indices))
            else:
                out.append(await _send(http, "/score", body, indices))
        if connection is not None:
            connection.close()
        return out

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client(k, http) for k in range(clients)))
        wall = time.perf_counter() - start
    return [r for results in per_client for r in results], wall


async def burst(
    url: str,
    body: dict[str, Any],
    n: int,
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> list[Result]:
    """``n`` copies of ``body`` sent at once, each on its own connection."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(
        base_url=url, timeout=timeout_s, limits=limits, headers=headers
    ) as http:
        return await asyncio.gather(*(_send(http, "/score", body, []) for _ in range(n)))


def mismatches(
    results: Sequence[Result], expected: Sequence[float], atol: float = 1e-5
) -> list[str]:
    """Descriptions of the 200 answers whose scores differ from ``expected`` by more than atol."""
    bad = []
    for r in results:
        if r.status != 200:
            continue
        want = [expected[i] for i in r.indices]
        if len(r.scores) != len(want) or any(
            abs(g - w) > atol for g, w in zip(r.scores, want, strict=True)
        ):
            bad.append(f"items {r.indices}: got {r.scores}, want {want}")
    return bad


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) in kB, summed over a process and its
    descendants (the service's model process and multiprocessing's resource tracker)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    pending = [pid]
    while pending:
        proc = Path(f"/proc/{pending.pop()}")
        try:
            for line in (proc / "status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in out:
                    out[name] += int(value.split()[0])
            for task in (proc / "task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # exited meanwhile
            continue
    return out


def summarize(results: Sequence[Result], wall_s: float) -> dict[str, Any]:
    """Latency percentiles, throughput and error counts of a load run."""
    latencies = sorted(r.latency_s for r in results)
    ok = [r for r in results if r.status == 200]
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "requests": len(results),
        "items": sum(len(r.indices) for r in results),
        "errors": len(results) - len(ok),
        "wall_s": wall_s,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * q[98],
        "max_ms": 1000 * latencies[-1],
        "requests_per_s": len(results) / wall_s,
        "items_per_s": sum(len(r.indices) for r in ok) / wall_s,
        "error_samples": sorted(
            {f"{r.status}: {r.error[:200]}" for r in results if r.status != 200}
        )[:5],
    }


def burst_summary(results: Sequence[Result]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for r in results:
        key = "transport_error" if r.status is None else str(r.status)
        statuses[key] = statuses.get(key, 0) + 1
    rejected = [r for r in results if r.status == 429]
    return {
        "requests": len(results),
        "statuses": statuses,
        "share_429": len(rejected) / len(results),
        "retry_after_missing": sum(1 for r in rejected if not r.retry_after),
    }


# ----------------------------------------------------------------------------- main
def _load_run(
    model: Path, pool: list[dict[str, Any]], expected: list[float], args: argparse.Namespace
) -> dict[str, Any]:
    service = ServiceProcess(model, env={"REWARD_LOG_LEVEL": "warning", **_threads(args)})
    url = service.start()
    try:
        assert service.process is not None
        asyncio.run(run_load(url, pool, clients=4, requests=5, seed=99))  # warm up
        results, wall = asyncio.run(
            run_load(
                url, pool, clients=args.clients, requests=args.requests, seed=args.seed,
                raw=args.client == "raw",
            )
        )  # fmt: skip
        memory = memory_kb(service.process.pid)
    finally:
        service.stop()
    summary = summarize(results, wall)
    summary["score_mismatches"] = len(mismatches(results, expected))
    summary["service_rss_mb"] = memory["VmRSS"] / 1024
    summary["service_peak_rss_mb"] = memory["VmHWM"] / 1024
    return summary


def _overload_run(
    model: Path, pool: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    env = {
        "REWARD_LOG_LEVEL": "warning",
        "REWARD_MAX_QUEUE_ITEMS": str(args.queue_items),
        "REWARD_MAX_ITEMS_PER_REQUEST": str(MAX_ITEMS),
        **_threads(args),
    }
    service = ServiceProcess(model, env=env)
    url = service.start()
    body = {"items": [pool[i % len(pool)] for i in range(MAX_ITEMS)]}
    try:
        assert service.process is not None
        pid = service.process.pid
        before = memory_kb(pid)
        rounds = []
        for _ in range(args.bursts):
            results = asyncio.run(burst(url, body, args.burst))
            rounds.append(
                {**burst_summary(results), "rss_mb_after": memory_kb(pid)["VmRSS"] / 1024}
            )
        after = memory_kb(pid)
        healthy = httpx.post(f"{url}/score", json=body, timeout=30).status_code == 200
    finally:
        service.stop()
    total = sum(r["requests"] for r in rounds)
    return {
        "max_queue_items": args.queue_items,
        "burst": args.burst,
        "bursts": args.bursts,
        "items_per_request": MAX_ITEMS,
        "share_429": sum(r["share_429"] * r["requests"] for r in rounds) / total,
        "non_200_429": sum(
            n for r in rounds for k, n in r["statuses"].items() if k not in ("200", "429")
        ),
        "retry_after_missing": sum(r["retry_after_missing"] for r in rounds),
        "rss_mb_before": before["VmRSS"] / 1024,
        "rss_mb_after": after["VmRSS"] / 1024,
        "max_rss_mb": after["VmHWM"] / 1024,
        "serves_after": healthy,
        "rounds": rounds,
    }


def _threads(args: argparse.Namespace) -> dict[str, str]:
    return {"REWARD_NUM_THREADS": str(args.service_threads)} if args.service_threads else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--pool", type=int, default=256, help="distinct items to draw from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queue-items", type=int, default=64, help="overload service's queue")
    parser.add_argument("--burst", type=int, default=256, help="simultaneous requests")
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument(
        "--client", choices=["raw", "httpx"], default="raw",
        help="load generator: minimal asyncio HTTP/1.1 (default) or httpx",
    )  # fmt: skip
    parser.add_argument(
        "--service-threads", type=int, default=0, help="REWARD_NUM_THREADS (0: torch's choice)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    args = parser.parse_args()

    model = ensure_demo_models().reward
    pool = mixed_items(args.pool, seed=args.seed)
    ref = Reference(model)
    expected = [ref.score(item) for item in pool]
    load = _load_run(model, pool, expected, args)
    overload = _overload_run(model, pool, args)

    print(f"\nLoad: {args.clients} clients x {args.requests} requests, 1..{MAX_ITEMS} mixed items, "
          f"{args.client} client")  # fmt: skip
    print(f"{'requests':>9} {'items':>7} {'errors':>6} {'mismatch':>8} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'req/s':>7} {'items/s':>8} {'RSS MB':>7}")  # fmt: skip
    print(f"{load['requests']:>9} {load['items']:>7} {load['errors']:>6} "
          f"{load['score_mismatches']:>8} {load['p50_ms']:>7.1f} {load['p99_ms']:>7.1f} "
          f"{load['requests_per_s']:>7.0f} {load['items_per_s']:>8.0f} "
          f"{load['service_peak_rss_mb']:>7.0f}")  # fmt: skip
    print(f"\nOverload: queue {args.queue_items} items, {args.bursts} bursts of {args.burst} "
          f"requests x {MAX_ITEMS} items")  # fmt: skip
    print(f"{'burst':>5} {'statuses':<32} {'429 share':>9} {'RSS MB after':>12}")
    for k, r in enumerate(overload["rounds"], 1):
        print(f"{k:>5} {json.dumps(r['statuses']):<32} {r['share_429']:>9.2f} "
              f"{r['rss_mb_after']:>12.1f}")  # fmt: skip
    print(f"RSS before {overload['rss_mb_before']:.1f} MB, after {overload['rss_mb_after']:.1f} "
          f"MB, max {overload['max_rss_mb']:.1f} MB; other statuses: {overload['non_200_429']}; "
          f"Retry-After missing: {overload['retry_after_missing']}; "
          f"serves afterwards: {overload['serves_after']}")  # fmt: skip

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "cpus": os.cpu_count(),
        "service_threads": args.service_threads or "torch default",
        "client": args.client,
        "pool": args.pool,
        "load_average_at_end": os.getloadavg(),
    }
    args.out.write_text(json.dumps({"meta": meta, "load": load, "overload": overload}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
