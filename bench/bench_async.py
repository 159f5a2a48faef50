"""Sync vs async generation on the same budget: throughput and final reward.

Each mode trains the same policy (``--policy``: the built-in demo policy, or a random-init
4.3 M / 25.4 M Llama with the demo tokenizer, built at run time; see ``bench/policies.py``)
against a real reward-service subprocess with the same config and number of steps; only
``async_generation`` (and its backend: the rollout process, the default on CPU, or a thread)
differs. Repeat ``i`` runs every mode with seed
``--seed + i``, so the spread over repeats is the seed-to-seed noise of the reward figures and
each seed gives one paired async-minus-sync difference. Each run is its own subprocess (clean
threads and memory), and the modes alternate over repeats so that a noisy neighbour hits all.
Measured per run:

- completion tokens/s: completion tokens sampled for training / wall time of ``train()``
  (it moves with the completions' length, which each mode's policy sets for itself);
- samples/s: completions sampled for training / wall time (the same count in both modes);
- step time (median over the steps after the warm-up);
- reward: mean ``objective/scores`` over the last ``--last`` steps, and ``eval_reward_mean``
  (one completion per held-out prompt, fixed sampling seed) after training.

Prints a table and writes JSON (default ``bench/results/async.json``)::

    python bench/bench_async.py [--steps 200] [--repeats 3] [--modes sync async]
    python bench/bench_async.py --policy 25m --steps 40 --repeats 3   # 8 prompts, 32 tokens

A random-init policy learns little in a short run: its reward figures check that async mode
does not change what is learnt, its throughput what async mode gains at that size.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.policies import POLICIES, build_policy  # noqa: E402

# "async" is the default backend on CPU (a rollout process); "async-thread" the thread one.
MODES = ("sync", "async", "async-thread")
TARGET_SPEEDUP = 1.3


def _worker_env(threads: int | None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        # Intra-op threads of every torch thread (the trainer's and the sampler's).
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_worker(opts: argparse.Namespace) -> None:
    """Train one mode in this process and write its measurements as JSON."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.step_clock import StepClock
    from common.demo_models import ensure_demo_models
    from trainer.config import OnlineDPOConfig
    from trainer.data import load_prompt_dataset
    from trainer.trainer import OnlineDPOTrainer

    models = ensure_demo_models()
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        config = OnlineDPOConfig(
            output_dir=out,
            reward_url=opts.url,
            async_generation=opts.worker != "sync",
            async_generation_backend="thread" if opts.worker == "async-thread" else "auto",
            max_steps=opts.steps,
            per_device_train_batch_size=opts.batch_size,
            num_samples_per_prompt=opts.k,
            max_new_tokens=opts.max_new_tokens,
            temperature=1.0,
            learning_rate=opts.lr,
            beta=0.1,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            per_device_eval_batch_size=32,
            seed=opts.seed,
        )
        trainer = OnlineDPOTrainer(
            AutoModelForCausalLM.from_pretrained(opts.policy_path),
            args=config,
            processing_class=AutoTokenizer.from_pretrained(opts.policy_path, padding_side="left"),
            train_dataset=load_prompt_dataset(models.train_prompts),
            eval_dataset=load_prompt_dataset(models.eval_prompts),
        )
        trainer.add_callback(clock)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        evaluation = trainer.evaluate()
    per_step = opts.batch_size * opts.k
    tokens = sum(log["val/completion_length"] * per_step for log in clock.logs)
    steps = [b - a for a, b in itertools.pairwise(clock.ends[opts.warmup - 1 :])]
    measured, last = clock.logs[opts.warmup :], clock.logs[-opts.last :]
    result = {
        "mode": opts.worker,
        "steps": len(clock.logs),
        "train_wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "samples_per_s": per_step * len(clock.logs) / wall,
        "completion_length": tokens / (per_step * len(clock.logs)),
        "step_time_median_s": statistics.median(steps),
        "final_scores": statistics.fmean(
            log["objective/scores"] for log in clock.logs[-opts.last :]
        ),
        "eval_reward_mean": evaluation["eval_reward_mean"],
        "eval_win_rate": evaluation["eval_win_rate"],
        "final_kl": statistics.fmean(log["objective/kl"] for log in last),
        "timing_s": {
            key: statistics.fmean(log[key] for log in measured)
            for key in ("time/generate", "time/score_wait", "time/forward_backward")
        },
        "staleness_mean": statistics.fmean(log.get("async/staleness", 0.0) for log in clock.logs),
        "scores_curve": [log["objective/scores"] for log in clock.logs],
        "length_curve": [log["val/completion_length"] for log in clock.logs],
    }
    Path(opts.result).write_text(json.dumps(result))


def _run_one(
    mode: str, opts: argparse.Namespace, url: str, seed: int, policy_path: Path
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        cmd = [
            sys.executable, __file__, "--worker", mode, "--url", url, "--result", result.name,
            "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--last", str(opts.last),
            "--batch-size", str(opts.batch_size), "--k", str(opts.k), "--lr", str(opts.lr),
            "--max-new-tokens", str(opts.max_new_tokens), "--seed", str(seed),
            "--policy-path", str(policy_path),
        ]  # fmt: skip
        load_before = os.getloadavg()[0]
        proc = subprocess.run(cmd, env=_worker_env(opts.threads), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} worker failed:\n{proc.stderr[-4000:]}")
        run = json.loads(Path(result.name).read_text())
        run["load_avg_1min"] = [load_before, os.getloadavg()[0]]
        return run


SUMMARY_KEYS = (
    "tokens_per_s", "samples_per_s", "completion_length", "step_time_median_s", "train_wall_s",
    "final_scores", "eval_reward_mean", "eval_win_rate", "final_kl",
)  # fmt: skip


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-mode medians over repeats (seeds), plus the spread of the reward figures."""
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in SUMMARY_KEYS}
    out["timing_s"] = {
        k: statistics.median(r["timing_s"][k] for r in runs) for k in runs[0]["timing_s"]
    }
    for key in ("final_scores", "eval_reward_mean", "tokens_per_s"):
        values = [r[key] for r in runs]
        out[f"{key}_range"] = [min(values), max(values)]
    return out


def _paired(runs: dict[str, list[dict[str, Any]]], mode: str) -> dict[str, Any]:
    """Per seed: ``mode`` minus sync, for the reward figures (the same seed in both)."""
    out: dict[str, Any] = {}
    for key in ("final_scores", "eval_reward_mean"):
        diffs = [a[key] - s[key] for a, s in zip(runs[mode], runs["sync"], strict=True)]
        spread = [r[key] for r in runs["sync"]]
        out[key] = {
            "differences": diffs,
            "mean_difference": statistics.fmean(diffs),
            "sync_seed_stdev": statistics.stdev(spread) if len(spread) > 1 else float("nan"),
        }
    return out


def _table(results: dict[str, Any], modes: list[str]) -> str:
    rows = [
        ("completion tokens/s", "tokens_per_s", "{:14.1f}"),
        ("samples/s", "samples_per_s", "{:14.1f}"),
        ("completion length (tokens)", "completion_length", "{:14.2f}"),
        ("step time, median (s)", "step_time_median_s", "{:14.3f}"),
        ("train wall time (s)", "train_wall_s", "{:14.1f}"),
        ("objective/scores, last steps", "final_scores", "{:14.3f}"),
        ("eval_reward_mean", "eval_reward_mean", "{:14.3f}"),
        ("eval_win_rate vs reference", "eval_win_rate", "{:14.3f}"),
        ("objective/kl, last steps", "final_kl", "{:14.2f}"),
    ]
    head = "".join(f"{m:>14}" for m in modes) + "".join(f"{m + '/sync':>20}" for m in modes[1:])
    lines = [f"{'':32}{head}"]
    for name, key, fmt in rows:
        values = [results[m][key] for m in modes]
        cells = "".join(fmt.format(v) for v in values)
        base = values[0] or float("nan")
        ratios = "".join(f"{v / base:20.2f}" for v in values[1:])
        lines.append(f"{name:32}{cells}{ratios}")
    for key in ("time/generate", "time/score_wait", "time/forward_backward"):
        cells = "".join(f"{results[m]['timing_s'][key]:14.3f}" for m in modes)
        lines.append(f"{key + ' (s)':32}{cells}")
    for mode in modes[1:]:
        for key, paired in results["paired"][mode].items():
            diffs = ", ".join(f"{d:+.3f}" for d in paired["differences"])
            lines.append(
                f"{key}, {mode} - sync per seed: {diffs} (mean {paired['mean_difference']:+.3f}; "
                f"sync's seed-to-seed stdev {paired['sync_seed_stdev']:.3f})"
            )
    for name, key in (("completion tokens/s", "speedup"), ("samples/s", "speedup_samples")):
        speedup = results[key]
        verdict = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
        lines.append(f"speedup in {name}: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x: {verdict})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--policy",
        "--policy-size",
        choices=list(POLICIES),
        default="demo",
        help="the policy trained (default: the demo's)",
    )
    parser.add_argument("--steps", type=int, default=200, help="the demo's length")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of step times")
    parser.add_argument("--last", type=int, default=20, help="steps averaged for the reward")
    parser.add_argument("--batch-size", type=int, help="prompts per step (default: the policy's)")
    parser.add_argument("--k", type=int, default=2, help="num_samples_per_prompt")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-new-tokens", type=int, help="default: the policy's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="seeds --seed, --seed + 1, ...")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of the workers (default: torch's, one per core)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "async.json")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--policy-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        run_worker(opts)
        return
    if opts.steps <= opts.warmup + 1 or opts.last < 1 or opts.repeats < 1:
        parser.error("need --steps > --warmup + 1, --last >= 1 and --repeats >= 1")
    modes = [m for m in MODES if m in opts.modes]
    if modes[:2] != ["sync", "async"]:
        parser.error("--modes must include sync and async")

    from common.demo_models import ensure_demo_models
    from trainer.service_process import running_service

    models = ensure_demo_models()
    size = POLICIES[opts.policy]
    opts.batch_size = opts.batch_size or size.batch_size
    opts.max_new_tokens = opts.max_new_tokens or size.max_new_tokens
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    with (
        tempfile.TemporaryDirectory(prefix="bench-async-") as scratch,
        running_service(models.reward) as url,
    ):
        policy_path = build_policy(opts.policy, models.policy, Path(scratch))
        for i in range(opts.repeats):
            for mode in modes if i % 2 == 0 else modes[::-1]:
                run = _run_one(mode, opts, url, opts.seed + i, policy_path)
                runs[mode].append(run)
                print(
                    f"  {mode:12} seed {opts.seed + i}: {run['tokens_per_s']:.1f} tokens/s, "
                    f"{run['samples_per_s']:.1f} samples/s, scores {run['final_scores']:.3f}, "
                    f"eval {run['eval_reward_mean']:.3f} (load {run['load_avg_1min'][0]:.1f})",
                    flush=True,
                )
    results: dict[str, Any] = {m: _summary(runs[m]) for m in modes}
    results["paired"] = {m: _paired(runs, m) for m in modes[1:]}
    results["speedup"] = results["async"]["tokens_per_s"] / results["sync"]["tokens_per_s"]
    results["speedup_samples"] = (
        results["async"]["samples_per_s"] / results["sync"]["samples_per_s"]
    )
    results["target_speedup"] = TARGET_SPEEDUP
    results["config"] = {
        k: getattr(opts, k)
        for k in ("steps", "warmup", "last", "batch_size", "k", "lr", "max_new_tokens", "seed")
    } | {"policy": opts.policy, "repeats": opts.repeats, "threads": opts.threads, "modes": modes}
    results["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg_1min": [x for m in modes for r in runs[m] for x in r["load_avg_1min"]],
    }
    results["runs"] = runs
    print(_table(results, modes))
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
