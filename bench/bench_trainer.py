"""Step time and peak memory: our OnlineDPOTrainer (reward over HTTP) vs TRL's (reward in-process).

Both train the built-in demo policy on the same prompts with the same config; TRL 1.16's
``trl.experimental.online_dpo.OnlineDPOTrainer`` holds the reward model in its own process,
ours asks a real reward-service subprocess over HTTP. Each trainer runs in its own
subprocess so that its peak RSS is its own. In async mode the rollout process (forked from
the trainer, sharing its pages copy-on-write) adds its private memory: the peak is the
largest of the trainer's own peak RSS and, polled from ``/proc`` every 20 ms, the trainer's
RSS plus the rollout process's private memory (polled every 0.5 s). Prints a table and writes JSON.

    python bench/bench_trainer.py [--steps 40] [--repeats 2] [--out bench/results/trainer.json]
                                  [--reward-model large]

``--reward-model large`` swaps the demo reward model (0.14 M parameters, a few percent of
TRL's step) for one of the same architecture at ~10x its size (random weights; about the
policy's size), on both sides: what hiding the reward forward is worth when it is not tiny.
"""

from __future__ import annotations

import argparse
import itertools
import json
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
IMPLS = ("trl", "ours", "ours-async")
LABELS = {"trl": "TRL 1.16", "ours": "ours (sync)", "ours-async": "ours (async)"}
TARGETS = {"step_time_ratio": 0.8, "rss_ratio": 1.0}
# What our trainer logs per step, to show where its time goes.
TIMING_KEYS = ("time/generate", "time/score_wait", "time/forward_backward")


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
        "bf16": False,
        "gradient_checkpointing": opts.gradient_checkpointing,
        "disable_dropout": True,
        "use_cpu": True,
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
        me, page_mb = os.getpid(), os.sysconf("SC_PAGE_SIZE") / 2**20
        children_mb = 0.0
        for tick in itertools.count():
            if self._stop.wait(interval):
                return
            if tick % child_every == 0:
                children_mb = 0.0
                for pid in Path(f"/proc/{me}/task/{me}/children").read_text().split():
                    try:
                        children_mb += _private_mb(int(pid))
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
        TrainerCallback,
    )

    from common.demo_models import ensure_demo_models
    from trainer.data import load_prompt_dataset

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.logs: list[dict[str, float]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            self.logs.append(dict(logs or {}))

    models = ensure_demo_models()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(models.policy, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(models.policy, dtype=torch.float32)
    dataset = load_prompt_dataset(models.train_prompts)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        kwargs = _config_kwargs(opts, out)
        if opts.worker == "trl":
            from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

            trainer = OnlineDPOTrainer(
                model=policy,
                reward_funcs=AutoModelForSequenceClassification.from_pretrained(
                    opts.reward_path, num_labels=1
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
        "step_time_mean_s": statistics.fmean(steps),
        "step_time_median_s": statistics.median(steps),
        "train_wall_s": total,
        # ru_maxrss (KiB on Linux) is this process's exact peak; the polled peak adds what
        # the rollout process of async mode holds privately at the same instant.
        "peak_rss_mb": max(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, memory.peak_mb
        ),
        "child_peak_private_mb": memory.child_peak_private_mb,
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


def _run_one(impl: str, opts: argparse.Namespace, url: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        cmd = [
            sys.executable, __file__, "--worker", impl, "--url", url, "--result", result.name,
            "--reward-path", str(opts.reward_path),
            "--steps", str(opts.steps), "--warmup", str(opts.warmup),
            "--batch-size", str(opts.batch_size), "--max-new-tokens", str(opts.max_new_tokens),
        ]  # fmt: skip
        if opts.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        proc = subprocess.run(cmd, env=_worker_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{impl} worker failed:\n{proc.stderr[-4000:]}")
        return json.loads(Path(result.name).read_text())


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-implementation medians over repeats (median resists a noisy neighbour)."""
    keys = (
        "step_time_mean_s", "step_time_median_s", "peak_rss_mb", "child_peak_private_mb",
        "final_scores",
    )  # fmt: skip
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    if runs[0]["timing_s"]:
        out["timing_s"] = {
            k: statistics.median(r["timing_s"][k] for r in runs) for k in runs[0]["timing_s"]
        }
    return out


def _table(results: dict[str, Any]) -> str:
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
    head = "".join(f"{LABELS[i]:>14}" for i in IMPLS)
    lines = [f"{'':40}{head}{'sync/TRL':>10}{'async/TRL':>10}"]
    for name, get in rows:
        values = {i: get(results[i], i) for i in IMPLS}
        cells = "".join(f"{values[i]:14.3f}" for i in IMPLS)
        if values["trl"]:
            cells += "".join(f"{values[i] / values['trl']:10.2f}" for i in ("ours", "ours-async"))
        lines.append(f"{name:40}{cells}")
    for key in TIMING_KEYS:
        cells = "".join(
            f"{results[i].get('timing_s', {}).get(key, float('nan')):14.3f}" for i in IMPLS
        )
        lines.append(f"  {key:38}{cells}")
    ratios = results["ratios"]
    for key, target in TARGETS.items():
        for mode in ("sync", "async"):
            value = ratios[f"{key}_{mode}"]
            verdict = "met" if value <= target else "MISSED"
            lines.append(f"{key} ({mode}): {value:.2f} (target <= {target}) {verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=2, help="runs per implementation")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--service-threads", type=int, default=1, help="torch threads of the reward service"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer.json")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--reward-model",
        choices=["demo", "large"],
        default="demo",
        help="demo: the built-in reward model; large: ~10x its parameters, random weights",
    )
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--reward-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        run_worker(opts)
        return

    sys.path.insert(0, str(ROOT))
    from common.demo_models import ensure_demo_models
    from trainer.service_process import ServiceProcess

    models = ensure_demo_models()
    opts.reward_path = models.reward
    scratch = tempfile.TemporaryDirectory(prefix="bench-trainer-")
    if opts.reward_model == "large":
        from bench_service import make_large_model

        opts.reward_path = make_large_model(models.reward, Path(scratch.name) / "reward-large")
    service = ServiceProcess(
        opts.reward_path,
        env={"REWARD_LOG_LEVEL": "warning", "REWARD_NUM_THREADS": str(opts.service_threads)},
    )
    url = service.start()
    runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in IMPLS}
    try:
        for i in range(opts.repeats):
            # Alternate the order so drift on a shared machine hits both alike.
            for impl in IMPLS if i % 2 == 0 else IMPLS[::-1]:
                run = _run_one(impl, opts, url)
                runs[impl].append(run)
                print(
                    f"[{impl} #{i + 1}] {run['step_time_mean_s']:.3f} s/step, "
                    f"{run['peak_rss_mb']:.0f} MiB",
                    flush=True,
                )
        service_rss = _peak_rss_mb(service.process.pid)
    finally:
        service.stop()
        scratch.cleanup()
    results: dict[str, Any] = {impl: _summary(runs[impl]) for impl in IMPLS}
    results["service_peak_rss_mb"] = service_rss
    trl = results["trl"]
    results["ratios"] = {}
    for mode, impl in (("sync", "ours"), ("async", "ours-async")):
        ours = results[impl]
        results["ratios"][f"step_time_ratio_{mode}"] = (
            ours["step_time_mean_s"] / trl["step_time_mean_s"]
        )
        results["ratios"][f"rss_ratio_{mode}"] = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        results["ratios"][f"rss_ratio_with_service_{mode}"] = (
            ours["peak_rss_mb"] + service_rss
        ) / trl["peak_rss_mb"]
    results["targets"] = TARGETS
    results["runs"] = runs
    results["config"] = {
        "steps": opts.steps,
        "warmup": opts.warmup,
        "repeats": opts.repeats,
        "batch_size": opts.batch_size,
        "samples_per_prompt": 2,
        "max_new_tokens": opts.max_new_tokens,
        "gradient_checkpointing": opts.gradient_checkpointing,
        "reward_model": opts.reward_model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    print(_table(results))
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
