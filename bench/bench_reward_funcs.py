"""What a slow reward function costs the step: the reward service alone against the service plus
a function that takes ``--ms`` milliseconds per call, sync (run in a worker thread) and
``async def``.

Reward functions run beside the HTTP scoring, which itself overlaps the reference forward, so
a function shorter than that overlap should cost the step nothing but the thread hand-offs.
The functions here sleep and return 0.0 for every sample, so the combined reward, the pairs
and hence the samples are the same in every variant: only the waiting differs. Each variant
trains the chosen policy (``bench/policies.py``) in sync generation mode (the default) against
one reward-service subprocess; repeat ``i`` runs every variant, the order alternating, so that
drift on a shared machine hits all. Prints a table and writes JSON::

    python bench/bench_reward_funcs.py [--policy demo] [--ms 10] [--steps 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.policies import POLICIES, build_policy  # noqa: E402

TIMING_KEYS = ("time/generate", "time/score_wait", "time/forward_backward")
DELAY_S = 0.010  # set from --ms


def slow_sync_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """A function that takes ``DELAY_S`` and changes no reward."""
    time.sleep(DELAY_S)
    return [0.0] * len(completions)


async def slow_async_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """The ``async def`` counterpart of ``slow_sync_reward``."""
    await asyncio.sleep(DELAY_S)
    return [0.0] * len(completions)


# Each variant's reward function beside the service (None: the service alone).
FUNCTIONS: dict[str, Any] = {
    "service": None,
    "service + sync fn": slow_sync_reward,
    "service + async fn": slow_async_reward,
}
VARIANTS = tuple(FUNCTIONS)


def train_once(
    variant: str, url: str, policy: Path, opts: argparse.Namespace, out: str
) -> dict[str, Any]:
    """Train ``opts.warmup + opts.steps`` steps with ``variant``'s reward sources; the timed
    steps' mean time and our trainer's per-step timings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.step_clock import StepClock
    from common.demo_models import ensure_demo_models
    from trainer.config import OnlineDPOConfig
    from trainer.data import load_prompt_dataset
    from trainer.trainer import OnlineDPOTrainer

    torch.manual_seed(0)
    function = FUNCTIONS[variant]
    size = POLICIES[opts.policy]
    config = OnlineDPOConfig(
        output_dir=out,
        reward_funcs=[url] if function is None else [url, function],
        per_device_train_batch_size=size.batch_size,
        max_new_tokens=size.max_new_tokens,
        learning_rate=2e-4,
        max_steps=opts.warmup + opts.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    clock = StepClock()
    trainer = OnlineDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32),
        args=config,
        processing_class=AutoTokenizer.from_pretrained(policy, padding_side="left"),
        train_dataset=load_prompt_dataset(ensure_demo_models().train_prompts),
        callbacks=[clock],
    )
    with trainer:
        trainer.train()
    steps = [b - a for a, b in itertools.pairwise(clock.ends[opts.warmup - 1 :])]
    measured = clock.logs[opts.warmup :]
    return {
        "step_time_mean_s": statistics.fmean(steps),
        "timing_s": {k: statistics.fmean(log[k] for log in measured) for k in TIMING_KEYS},
        "final_scores": clock.logs[-1]["objective/scores"],
    }


def table(results: dict[str, Any], ms: float) -> str:
    base = results["service"]["step_time_mean_s"]
    lines = [
        f"| variant ({ms:g} ms function) | step (s) | / service alone | extra per step (ms) "
        "| generate / score_wait / forward_backward (s) |",
        "|---|---:|---:|---:|---|",
    ]
    for variant in VARIANTS:
        r = results[variant]
        t = r["timing_s"]
        lines.append(
            f"| {variant} | {r['step_time_mean_s']:.3f} | {r['step_time_mean_s'] / base:.3f} "
            f"| {(r['step_time_mean_s'] - base) * 1000:+.1f} | "
            + " / ".join(f"{t[k]:.3f}" for k in TIMING_KEYS)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    global DELAY_S
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", choices=sorted(POLICIES), default="demo")
    parser.add_argument("--ms", type=float, default=10.0, help="the function's time per call")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/reward_funcs.json")
    opts = parser.parse_args()
    DELAY_S = opts.ms / 1000

    from common.demo_models import ensure_demo_models
    from trainer.service_process import ServiceProcess

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    models = ensure_demo_models()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-reward-funcs-") as scratch:
        policy = build_policy(opts.policy, models.policy, Path(scratch))
        # One torch thread, as in bench_trainer.py: the service shares the trainer's cores.
        env = {"REWARD_LOG_LEVEL": "warning", "REWARD_NUM_THREADS": "1"}
        service = ServiceProcess(models.reward, env=env)
        url = service.start()
        try:
            for i in range(opts.repeats):
                for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
                    load = os.getloadavg()[0]
                    run = train_once(variant, url, policy, opts, f"{scratch}/out")
                    run["load_avg_1min"] = load
                    runs[variant].append(run)
                    print(
                        f"[{variant} #{i + 1}] {run['step_time_mean_s']:.3f} s/step "
                        f"(load {load:.1f})",
                        flush=True,
                    )
        finally:
            service.stop()
    results: dict[str, Any] = {
        v: {
            "step_time_mean_s": statistics.median(r["step_time_mean_s"] for r in rs),
            "timing_s": {k: statistics.median(r["timing_s"][k] for r in rs) for k in TIMING_KEYS},
            "final_scores": [r["final_scores"] for r in rs],
            "runs": rs,
        }
        for v, rs in runs.items()
    }
    results["config"] = {**vars(opts), "out": str(opts.out), "cpus": os.cpu_count()}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=2))
    print(f"\npolicy {opts.policy}, medians of {opts.repeats} runs x {opts.steps} steps:\n")
    print(table(results, opts.ms))


if __name__ == "__main__":
    main()
