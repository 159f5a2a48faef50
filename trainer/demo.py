"""``online-dpo demo``: the built-in tiny policy learns from a reward service over HTTP.

Builds (or loads from the cache) the demo models, starts the reward service as a real
subprocess on a free loopback port, measures the policy on held-out prompts (judged as the
trainer's evaluation judges them), trains it with :class:`~trainer.trainer.OnlineDPOTrainer`
for a few minutes on CPU, measures again and prints a before/after table. ``--output-dir``
keeps ``metrics.jsonl``, ``reward_curve.png`` and ``demo_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from common.demo_models import ensure_demo_models, true_score
from trainer.callbacks import CURVE_FILE, METRICS_FILE, MetricsJsonlCallback, RewardCurveCallback
from trainer.data import load_prompt_dataset
from trainer.service_process import running_service

if TYPE_CHECKING:
    from trainer.trainer import OnlineDPOTrainer

SUMMARY_FILE = "demo_summary.json"


@dataclass
class DemoOptions:
    """Knobs of the demo run (defaults: ~1 minute of training on 2 CPU cores)."""

    output_dir: Path | None = None
    max_steps: int = 200
    learning_rate: float = 2e-4
    beta: float = 0.1
    batch_size: int = 16
    max_new_tokens: int = 16
    eval_samples: int = 4
    seed: int = 0
    cache_dir: Path | None = None
    show: int = 4

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "max_new_tokens", "eval_samples"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("learning_rate", "beta"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")


@dataclass
class Snapshot:
    """The policy measured on held-out prompts."""

    reward_mean: float
    true_score_mean: float
    kl_mean: float
    eos_fraction: float
    samples: list[dict[str, Any]] = field(repr=False)


@dataclass
class DemoResult:
    before: Snapshot
    after: Snapshot
    steps: int
    train_seconds: float
    total_seconds: float
    eval_metrics: dict[str, float]


def measure(trainer: OnlineDPOTrainer, prompts: list[str], opts: DemoOptions) -> Snapshot:
    """Sample ``opts.eval_samples`` completions per held-out prompt and judge them as the
    trainer's evaluation does (the same sampling noise each time); add their true score.

    The KL estimate is the mean over samples of log π(y|x) − log π_ref(y|x), as TRL's
    ``objective/kl``, with padding after EOS left out.
    """
    k = opts.eval_samples
    with trainer.evaluation_noise():
        judged = trainer.judge(prompts, num_samples=k, against_reference=False)
    # Block layout (sample j of prompt i at j·B + i) to prompt by prompt, for the table.
    order = [j * len(prompts) + i for i in range(len(prompts)) for j in range(k)]
    rewards = judged.rewards.tolist()
    samples = [
        {"prompt": judged.prompts[i], "completion": judged.completions[i], "reward": rewards[i]}
        for i in order
    ]
    return Snapshot(
        reward_mean=statistics.fmean(rewards),
        true_score_mean=statistics.fmean(
            true_score(s["prompt"] + s["completion"]) for s in samples
        ),
        kl_mean=judged.kl.mean().item(),
        eos_fraction=judged.contain_eos.mean().item(),
        samples=samples,
    )


class _Progress(TrainerCallback):
    """One short line every ~10 % of the run instead of every logged dict."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self.start = time.perf_counter()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        every = max(1, state.max_steps // 10)
        if "objective/scores" in logs and (
            state.global_step % every == 0 or state.global_step == state.max_steps
        ):
            self.write(
                f"  step {state.global_step:4d}/{state.max_steps}  "
                f"reward {logs['objective/scores']:+.3f}  kl {logs.get('objective/kl', 0.0):6.2f}  "
                f"{time.perf_counter() - self.start:5.1f} s"
            )


def _trainer(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_prompts: Any,
    eval_prompts: Any,
    url: str,
    run_dir: Path,
    opts: DemoOptions,
    write: Callable[[str], None],
) -> OnlineDPOTrainer:
    from trainer.config import OnlineDPOConfig
    from trainer.trainer import OnlineDPOTrainer

    args = OnlineDPOConfig(
        output_dir=str(run_dir),
        per_device_train_batch_size=opts.batch_size,
        max_new_tokens=opts.max_new_tokens,
        temperature=1.0,
        beta=opts.beta,
        learning_rate=opts.learning_rate,
        max_steps=opts.max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=False,
        use_cpu=True,
        seed=opts.seed,
        reward_url=url,
    )
    callbacks: list[TrainerCallback] = [_Progress(write)]
    if opts.output_dir is not None:
        callbacks += [MetricsJsonlCallback(), RewardCurveCallback()]
    trainer = OnlineDPOTrainer(
        model=policy,
        args=args,
        processing_class=tokenizer,
        train_dataset=train_prompts,
        eval_dataset=eval_prompts,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # _Progress prints instead
    return trainer


def run_demo(opts: DemoOptions, write: Callable[[str], None] = print) -> DemoResult:
    """Run the whole demo; print progress and the before/after table with ``write``."""
    opts.validate()
    start = time.perf_counter()
    write("[1/4] demo models (built once, then cached) ...")
    models = ensure_demo_models(opts.cache_dir)
    write(f"      {models.root}")
    tokenizer = AutoTokenizer.from_pretrained(models.policy, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(models.policy, dtype=torch.float32)
    train_prompts = load_prompt_dataset(models.train_prompts)
    eval_prompts = load_prompt_dataset(models.eval_prompts)
    held_out = list(eval_prompts["prompt"])

    write("[2/4] starting the reward service (a separate process) ...")
    with (
        running_service(models.reward, REWARD_LOG_LEVEL="warning") as url,
        tempfile.TemporaryDirectory() as tmp,
    ):
        write(f"      {url}  model {models.reward.name}")
        run_dir = opts.output_dir or Path(tmp)
        args = (policy, tokenizer, train_prompts, eval_prompts, url, run_dir, opts, write)
        with _trainer(*args) as trainer:
            before = measure(trainer, held_out, opts)
            write(
                f"[3/4] training {opts.max_steps} steps ({opts.batch_size} prompts x 2 samples) ..."
            )
            train_start = time.perf_counter()
            trainer.train()
            eval_metrics = trainer.evaluate()
            train_seconds = time.perf_counter() - train_start
            write("[4/4] measuring on held-out prompts ...")
            after = measure(trainer, held_out, opts)
    result = DemoResult(
        before=before,
        after=after,
        steps=opts.max_steps,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - start,
        eval_metrics={k: v for k, v in eval_metrics.items() if isinstance(v, int | float)},
    )
    write(format_result(result, opts))
    if opts.output_dir is not None:
        summary = opts.output_dir / SUMMARY_FILE
        summary.write_text(json.dumps(asdict(result), indent=2))
        for name in (METRICS_FILE, CURVE_FILE, SUMMARY_FILE):
            write(f"wrote {opts.output_dir / name}")
    return result


def format_result(result: DemoResult, opts: DemoOptions) -> str:
    """The before/after table and a few sample completions, as plain text."""
    b, a = result.before, result.after
    n = len(b.samples)
    rows = [
        ("mean reward (reward service)", b.reward_mean, a.reward_mean),
        ("mean true score (ground truth)", b.true_score_mean, a.true_score_mean),
        ("KL to reference (nats/sample)", b.kl_mean, a.kl_mean),
        ("samples ending with EOS", b.eos_fraction, a.eos_fraction),
    ]
    lines = [
        "",
        f"Held-out prompts: {n // opts.eval_samples} x {opts.eval_samples} samples each",
        f"{'':32} {'before':>8} {'after':>8} {'change':>8}",
    ]
    lines += [f"{name:32} {x:8.3f} {y:8.3f} {y - x:+8.3f}" for name, x, y in rows]
    win_rate = result.eval_metrics.get("eval_win_rate")
    if win_rate is not None:
        lines.append(f"{'win rate vs reference (evaluate)':32} {'':8} {win_rate:8.3f}")
    lines += ["", "Samples (same prompts and sampling seed):"]
    step = max(1, n // opts.show)
    for i in range(0, step * opts.show, step):
        before, after = b.samples[i], a.samples[i]
        lines.append(f"  {before['prompt']!r}")
        lines.append(f"    before {before['reward']:+.2f} |{before['completion']}")
        lines.append(f"    after  {after['reward']:+.2f} |{after['completion']}")
    lines.append(
        f"\n{result.steps} steps in {result.train_seconds:.0f} s; "
        f"whole demo {result.total_seconds:.0f} s"
    )
    return "\n".join(lines)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoOptions()
    parser.add_argument("--output-dir", type=Path, help="keep metrics.jsonl and reward_curve.png")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--beta", type=float, default=defaults.beta)
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="prompts per step"
    )
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=defaults.eval_samples,
        help="samples per held-out prompt for the before/after table",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--cache-dir", type=Path, help="demo model cache (default ~/.cache/online-dpo)"
    )


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    names = DemoOptions.__dataclass_fields__
    return DemoOptions(**{k: v for k, v in vars(args).items() if k in names})
