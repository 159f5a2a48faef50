"""Step time and peak memory: our OnlineDPOTrainer (reward over HTTP) vs TRL's (reward in-process).

Both train the same policy on the same prompts with the same config; TRL 1.16's
``trl.experimental.online_dpo.OnlineDPOTrainer`` holds the reward model in its own process,
ours asks a real reward-service subprocess over HTTP, in sync and in async mode. Each trainer
runs in its own subprocess so that its peak RSS is its own. In async mode the rollout process
(forked from the trainer, sharing its pages copy-on-write) adds its private memory: the peak is
the largest of the trainer's own peak RSS and, polled from ``/proc`` every 20 ms, the
trainer's RSS plus the rollout process's private memory (``smaps_rollup``, every 0.5 s).

Policies (``--policy``, one row each; see ``bench/policies.py``): ``demo`` (the trained demo
policy, 16 prompts x 2 samples, 16 new tokens) and random-init Llamas with the demo tokenizer,
``4m`` (4.3 M parameters) and ``25m`` (25.4 M), 8 prompts x 2 samples, 32 new tokens, where
the step costs what the model's arithmetic costs rather than per-op overhead. Repeat ``i``
runs every policy and trainer, the trainers' order alternating, so that drift on a shared
machine hits all. Prints the per-policy tables and a summary (ratios to TRL, async/sync
throughput, against the targets) and writes JSON::

    python bench/bench_trainer.py [--policy demo 4m 25m] [--steps 20] [--repeats 3]
                                  [--out bench/results/trainer.json] [--table FILE]
                                  [--reward-model large] [--device cuda --bf16]

``--reward-model large`` swaps the demo reward model (0.14 M parameters) for one of the same
architecture at ~10x its size (random weights) on both sides. ``--device cuda`` runs the
trainers and the reward service on the GPU (``bench/gpu_check.sh``); the targets are CPU ones
and are not judged there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import operator
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.policies import POLICIES, build_policy, num_parameters  # noqa: E402

IMPLS = ("trl", "ours", "ours-async")
LABELS = {"trl": "TRL 1.16", "ours": "ours (sync)", "ours-async": "ours (async)"}
# Per policy: ratio -> (comparison, bound). Ratios of step time and memory are ours / TRL;
# throughput_async_over_sync is sync's step time / async's (the same samples per step).
TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    "demo": {
        "step_time_ratio_sync": ("<=", 0.8),
        "step_time_ratio_async": ("<=", 0.8),
        "rss_ratio_sync": ("<=", 1.0),
        "rss_ratio_async": ("<=", 1.0),
    },
    "4m": {
        "step_time_ratio_async": ("<=", 0.75),
        "throughput_async_over_sync": (">=", 1.3),
        "rss_ratio_async": ("<=", 1.05),
    },
    "25m": {
        "step_time_ratio_async": ("<=", 0.85),
        "throughput_async_over_sync": (">=", 1.3),
        "rss_ratio_async": ("<=", 1.05),
    },
}
COMPARE = {"<=": operator.le, ">=": operator.ge}
# What our trainer logs per step, to show where its time goes (and, in async mode, the
# optimizer step's wait for the next rollout and the share of prompts whose reference pass the
# rollout process ran).
TIMING_KEYS = (
    "time/generate", "time/score_wait", "time/forward_backward", "time/sampling_wait",
    "async/reference_in_rollout",
)  # fmt: skip


def _worker_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _config_kwargs(opts: argparse.Namespace, output_dir: str) -> dict[str, Any]:
    """The training config both trainers share (TRL field names)."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": opts.batch_size,
        "max_new_tokens": opts.max_new_tokens,
        "temperature": 1.0,
        "learning_rate": 2e-4,
        "max_steps": opts.warmup + opts.steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": opts.bf16,
        "gradient_checkpointing": opts.gradient_checkpointing,
        "disable_dropout": True,
        "use_cpu": opts.device == "cpu",
        "disable_tqdm": True,
        "seed": 0,
    }


def _private_mb(pid: int) -> float:
    """A live process's private (unshared) resident memory now, in MiB. Reading
    ``smaps_rollup`` walks every mapping (~14 ms here): poll it rarely."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def _children() -> list[int]:
    """This process's child processes (forked by any of its threads)."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue  # the thread ended
    return pids


class TreeMemory:
    """Peak memory of this process and its children (the rollout process of async mode).

    A forked child shares its parent's pages until either side writes them, so its RSS counts
    pages the trainer's RSS already holds; its private memory is what it adds. The tree's
    footprint at an instant is this process's RSS (``statm``, polled every ``interval`` s)
    plus the children's private memory (``smaps_rollup``, every ``child_every`` polls: reading
    it often would slow the processes measured).
    """

    def __init__(self, interval: float = 0.02, child_every: int = 25) -> None:
        self.peak_mb = self.child_peak_private_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._poll, args=(interval, child_every), daemon=True
        )
        self._thread.start()

    def _poll(self, interval: float, child_every: int) -> None:
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        children_mb = 0.0
        for tick in itertools.count():
            if self._stop.wait(interval):
                return
            if tick % child_every == 0:
                children_mb = 0.0
                for pid in _children():
                    try:
                        children_mb += _private_mb(pid)
                    except (FileNotFoundError, ProcessLookupError, KeyError):
                        continue  # it ended between the listing and the read
                self.child_peak_private_mb = max(self.child_peak_private_mb, children_mb)
            own_mb = int(Path("/proc/self/statm").read_text().split()[1]) * page_mb
            self.peak_mb = max(self.peak_mb, own_mb + children_mb)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_worker(opts: argparse.Namespace) -> None:
    """Train one implementation in this process; write its timings and peak RSS as JSON."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from bench.step_clock import StepClock
    from common.demo_models import ensure_demo_models
    from trainer.data import load_prompt_dataset

    models = ensure_demo_models()
    torch.manual_seed(0)
    load = {"dtype": torch.float32}
    if opts.attn_implementation:
        load["attn_implementation"] = opts.attn_implementation
    tokenizer = AutoTokenizer.from_pretrained(opts.policy_path, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(opts.policy_path, **load)
    dataset = load_prompt_dataset(models.train_prompts)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        kwargs = _config_kwargs(opts, out)
        if opts.worker == "trl":
            from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

            reward_load = {**load, "dtype": torch.bfloat16 if opts.bf16 else torch.float32}
            trainer = OnlineDPOTrainer(
                model=policy,
                reward_funcs=AutoModelForSequenceClassification.from_pretrained(
                    opts.reward_path, num_labels=1, **reward_load
                ),
                reward_processing_classes=AutoTokenizer.from_pretrained(opts.reward_path),
                args=OnlineDPOConfig(**kwargs, beta=[0.1]),
                processing_class=tokenizer,
                train_dataset=dataset,
                callbacks=[clock],
            )
        else:
            from trainer.config import OnlineDPOConfig
            from trainer.trainer import OnlineDPOTrainer

            config = OnlineDPOConfig(
                **kwargs,
                beta=0.1,
                reward_url=opts.url,
                async_generation=opts.worker == "ours-async",
            )
            if opts.worker == "ours-async":
                config.async_trainer_num_threads = opts.async_trainer_threads
            trainer = OnlineDPOTrainer(
                model=policy,
                args=config,
                processing_class=tokenizer,
                train_dataset=dataset,
                callbacks=[clock],
            )
        memory = TreeMemory()
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
        memory.stop()
    timed = clock.ends[opts.warmup - 1 :]
    steps = [b - a for a, b in itertools.pairwise(timed)]
    train_logs = [log for log in clock.logs if "objective/scores" in log]
    measured = train_logs[opts.warmup :]
    result = {
        "impl": opts.worker,
        "steps_timed": len(steps),
        "step_times_s": steps,
        "step_time_mean_s": statistics.fmean(steps),
        "step_time_median_s": statistics.median(steps),
        "train_wall_s": total,
        # ru_maxrss (KiB on Linux) is this process's exact peak; the polled peak adds what
        # the rollout process of async mode holds privately at the same instant.
        "peak_rss_mb": max(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, memory.peak_mb
        ),
        "child_peak_private_mb": memory.child_peak_private_mb,
        "gpu_peak_mb": (
            torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        ),
        "final_scores": statistics.fmean(log["objective/scores"] for log in train_logs[-5:]),
        "timing_s": {
            key: statistics.fmean(log[key] for log in measured)
            for key in TIMING_KEYS
            if measured and key in measured[0]
        },
    }
    Path(opts.result).write_text(json.dumps(result))


def _peak_rss_mb(pid: int) -> float:
    """A live process's peak resident set size (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def _run_one(
    impl: str, opts: argparse.Namespace, url: str, policy_path: Path, shape: tuple[int, int]
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        cmd = [
            sys.executable, __file__, "--worker", impl, "--url", url, "--result", result.name,
            "--reward-path", str(opts.reward_path), "--policy-path", str(policy_path),
            "--steps", str(opts.steps), "--warmup", str(opts.warmup),
            "--batch-size", str(shape[0]), "--max-new-tokens", str(shape[1]),
            "--device", opts.device,
        ]  # fmt: skip
        if opts.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        if opts.bf16:
            cmd.append("--bf16")
        if opts.attn_implementation:
            cmd += ["--attn-implementation", opts.attn_implementation]
        if opts.async_trainer_threads:
            cmd += ["--async-trainer-threads", str(opts.async_trainer_threads)]
        load_before = os.getloadavg()[0]
        proc = subprocess.run(cmd, env=_worker_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{impl} worker failed:\n{proc.stderr[-4000:]}")
        run = json.loads(Path(result.name).read_text())
        run["load_avg_1min"] = [load_before, os.getloadavg()[0]]
        return run


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-implementation medians over repeats (median resists a noisy neighbour)."""
    keys = (
        "step_time_mean_s", "step_time_median_s", "peak_rss_mb", "child_peak_private_mb",
        "gpu_peak_mb", "final_scores",
    )  # fmt: skip
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    if runs[0]["timing_s"]:
        out["timing_s"] = {
            k: statistics.median(r["timing_s"][k] for r in runs) for k in runs[0]["timing_s"]
        }
    return out


def ratios(row: dict[str, Any], service_rss_mb: float) -> dict[str, float]:
    """One policy's figures against TRL's (and async's throughput against sync's)."""
    trl, sync, asyn = row["trl"], row["ours"], row["ours-async"]
    out = {"throughput_async_over_sync": sync["step_time_mean_s"] / asyn["step_time_mean_s"]}
    for mode, ours in (("sync", sync), ("async", asyn)):
        out[f"step_time_ratio_{mode}"] = ours["step_time_mean_s"] / trl["step_time_mean_s"]
        out[f"rss_ratio_{mode}"] = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        out[f"rss_ratio_with_service_{mode}"] = (ours["peak_rss_mb"] + service_rss_mb) / trl[
            "peak_rss_mb"
        ]
    return out


def verdicts(policy: str, row_ratios: dict[str, float]) -> list[tuple[str, float, str, bool]]:
    """``(ratio, value, bound, met)`` for each target of ``policy``."""
    out = []
    for key, (op, bound) in TARGETS.get(policy, {}).items():
        value = row_ratios[key]
        out.append((key, value, f"{op} {bound}", COMPARE[op](value, bound)))
    return out


def policy_table(policy: str, results: dict[str, Any]) -> str:
    """One policy's absolute figures, trainer by trainer, with the ratios to TRL."""
    row = results["policies"][policy]
    service_rss = results["service_peak_rss_mb"]
    rows = [
        ("step time, mean (s)", lambda r, i: r["step_time_mean_s"]),
        ("step time, median (s)", lambda r, i: r["step_time_median_s"]),
        ("peak RSS (MiB), + rollout private", lambda r, i: r["peak_rss_mb"]),
        ("  rollout process private, peak (MiB)", lambda r, i: r["child_peak_private_mb"]),
        (
            "trainer + service peak RSS (MiB)",
            lambda r, i: r["peak_rss_mb"] + (service_rss if i != "trl" else 0.0),
        ),
        ("objective/scores, last 5 steps", lambda r, i: r["final_scores"]),
    ]
    if results["config"]["device"] == "cuda":
        rows.append(("GPU memory, peak allocated (MiB)", lambda r, i: r["gpu_peak_mb"]))
    head = "".join(f"{LABELS[i]:>14}" for i in IMPLS)
    lines = [f"{policy}: {POLICIES[policy].about}"]
    lines.append(f"{'':40}{head}{'sync/TRL':>10}{'async/TRL':>10}")
    for name, get in rows:
        values = {i: get(row[i], i) for i in IMPLS}
        cells = "".join(f"{values[i]:14.3f}" for i in IMPLS)
        if values["trl"]:
            cells += "".join(f"{values[i] / values['trl']:10.2f}" for i in ("ours", "ours-async"))
        lines.append(f"{name:40}{cells}")
    for key in TIMING_KEYS:
        cells = "".join(f"{row[i].get('timing_s', {}).get(key, float('nan')):14.3f}" for i in IMPLS)
        lines.append(f"  {key:38}{cells}")
    return "\n".join(lines)


def summary_table(results: dict[str, Any]) -> str:
    """One row per policy (markdown): the ratios, and each target met or missed."""
    lines = [
        "| policy | sync / TRL step | async / TRL step | async / sync throughput "
        "| sync / TRL peak memory | async / TRL peak memory | rollout private (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    judge = results["config"]["device"] == "cpu"
    notes = []
    for policy, row in results["policies"].items():
        r = row["ratios"]
        lines.append(
            f"| {policy} | {r['step_time_ratio_sync']:.2f} | {r['step_time_ratio_async']:.2f} "
            f"| {r['throughput_async_over_sync']:.2f} | {r['rss_ratio_sync']:.2f} "
            f"| {r['rss_ratio_async']:.2f} | {row['ours-async']['child_peak_private_mb']:.0f} |"
        )
        for key, value, bound, met in verdicts(policy, r) if judge else []:
            verdict = "met" if met else "MISSED"
            notes.append(f"{policy}: {key} {value:.2f} (target {bound}) {verdict}")
    loads = results["load_avg_1min"]
    lines.append("")
    lines.append(f"load average (1 min) over the runs: {min(loads):.1f}-{max(loads):.1f}")
    return "\n".join(lines + notes)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--policy",
        "--policy-size",
        nargs="+",
        choices=list(POLICIES),
        default=list(POLICIES),
        help="policies to benchmark, one row each (default: all)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="runs per trainer and policy")
    parser.add_argument(
        "--batch-size", type=int, help="prompts per step (default: the policy's, 16 or 8)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help="tokens per completion (default: the policy's)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument(
        "--attn-implementation", help="e.g. sdpa or eager (default: transformers' choice)"
    )
    parser.add_argument(
        "--async-trainer-threads",
        type=int,
        choices=range(1, 65),
        metavar="N",
        help="async mode: the trainer's intra-op threads beside the rollout process (default: "
        "async_trainer_num_threads' rule, torch's threads less one)",
    )
    parser.add_argument(
        "--service-threads", type=int, default=1, help="torch threads of the reward service"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer.json")
    parser.add_argument("--table", type=Path, help="also write the tables to this file")
    parser.add_argument(
        "--reward-model",
        choices=["demo", "large"],
        default="demo",
        help="demo: the built-in reward model; large: ~10x its parameters, random weights",
    )
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--reward-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--policy-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _parser()
    opts = parser.parse_args(argv)
    if opts.steps < 2 or opts.warmup < 1 or opts.repeats < 1:
        parser.error("need --steps >= 2, --warmup >= 1 and --repeats >= 1")
    opts.policy = list(dict.fromkeys(opts.policy))
    if opts.device == "cuda" and not opts.worker:
        import torch

        if not torch.cuda.is_available():
            parser.error(
                "--device cuda: torch sees no CUDA device (torch.cuda.is_available() is "
                f"False; torch {torch.__version__}, CUDA build {torch.version.cuda})"
            )
    return opts


def write_results(results: dict[str, Any], out: Path, table: Path | None) -> str:
    """Print the tables, write the JSON to ``out`` (and the tables to ``table``)."""
    text = "\n\n".join(
        [*(policy_table(p, results) for p in results["policies"]), summary_table(results)]
    )
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    if table is not None:
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(text + "\n")
        print(f"wrote {table}")
    return text


def main() -> None:
    opts = parse_args()
    if opts.worker:
        run_worker(opts)
        return

    from common.demo_models import ensure_demo_models
    from trainer.service_process import ServiceProcess

    models = ensure_demo_models()
    opts.reward_path = models.reward
    scratch = tempfile.TemporaryDirectory(prefix="bench-trainer-")
    if opts.reward_model == "large":
        from bench.bench_service import make_large_model

        opts.reward_path = make_large_model(models.reward, Path(scratch.name) / "reward-large")
    paths = {p: build_policy(p, models.policy, Path(scratch.name)) for p in opts.policy}
    shapes = {
        p: (
            opts.batch_size or POLICIES[p].batch_size,
            opts.max_new_tokens or POLICIES[p].max_new_tokens,
        )
        for p in opts.policy
    }
    env = {"REWARD_LOG_LEVEL": "warning", "REWARD_NUM_THREADS": str(opts.service_threads)}
    env["REWARD_DEVICE"] = opts.device
    if opts.bf16:
        env["REWARD_DTYPE"] = "bfloat16"
    service = ServiceProcess(opts.reward_path, env=env)
    url = service.start()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        p: {impl: [] for impl in IMPLS} for p in opts.policy
    }
    try:
        for i in range(opts.repeats):
            for policy in opts.policy:
                # Alternate the order so drift on a shared machine hits all alike.
                for impl in IMPLS if i % 2 == 0 else IMPLS[::-1]:
                    run = _run_one(impl, opts, url, paths[policy], shapes[policy])
                    runs[policy][impl].append(run)
                    print(
                        f"[{policy} {impl} #{i + 1}] {run['step_time_mean_s']:.3f} s/step, "
                        f"{run['peak_rss_mb']:.0f} MiB (load {run['load_avg_1min'][0]:.1f})",
                        flush=True,
                    )
        service_rss = _peak_rss_mb(service.process.pid)
    finally:
        service.stop()
    results: dict[str, Any] = {"service_peak_rss_mb": service_rss, "policies": {}}
    for policy in opts.policy:
        row: dict[str, Any] = {impl: summarize(runs[policy][impl]) for impl in IMPLS}
        row["ratios"] = ratios(row, service_rss)
        row["targets"] = {k: list(v) for k, v in TARGETS.get(policy, {}).items()}
        row["parameters"] = num_parameters(paths[policy])
        row["runs"] = runs[policy]
        results["policies"][policy] = row
    scratch.cleanup()
    results["load_avg_1min"] = [
        load for p in runs.values() for rs in p.values() for r in rs for load in r["load_avg_1min"]
    ]
    results["config"] = {
        "policies": {p: {"batch_size": b, "max_new_tokens": t} for p, (b, t) in shapes.items()},
        "steps": opts.steps,
        "warmup": opts.warmup,
        "repeats": opts.repeats,
        "samples_per_prompt": 2,
        "gradient_checkpointing": opts.gradient_checkpointing,
        "device": opts.device,
        "bf16": opts.bf16,
        "attn_implementation": opts.attn_implementation,
        "async_trainer_threads": opts.async_trainer_threads,
        "reward_model": opts.reward_model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    write_results(results, opts.out, opts.table)


if __name__ == "__main__":
    main()
