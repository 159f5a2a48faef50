"""Run outputs and the demo: metrics.jsonl (resume-safe), reward_curve.png, a short demo run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerState, TrainingArguments

from common.demo_models import DemoModels
from tests.support import TIMING_NAMES, TRL_METRIC_NAMES
from trainer.callbacks import MetricsJsonlCallback, plot_reward_curve, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TRL_KEYS = TRL_METRIC_NAMES | TIMING_NAMES


class _Regression(torch.nn.Module):
    """A one-weight model: enough for a real ``Trainer`` loop with checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": ((self.w * x - y) ** 2).mean()}


def _run_trainer(out: Path, max_steps: int, resume: str | None = None) -> None:
    data = Dataset.from_dict({"x": [float(i) for i in range(8)], "y": [2.0 * i for i in range(8)]})
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=0.01,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=_Regression(),
        args=args,
        train_dataset=data,
        callbacks=[MetricsJsonlCallback()],
    )
    trainer.train(resume_from_checkpoint=resume)


@pytest.mark.integration
def test_metrics_jsonl_resume_does_not_duplicate_steps(tmp_path: Path) -> None:
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run_trainer(full, max_steps=4)
    _run_trainer(resumed, max_steps=3)  # the "crashed" run: saved step 2, logged step 3
    _run_trainer(resumed, max_steps=4, resume=str(resumed / "checkpoint-2"))

    def train_logs(root: Path) -> list[dict]:
        return [r for r in read_metrics(root / "metrics.jsonl") if "loss" in r]

    assert [r["step"] for r in train_logs(resumed)] == [1, 2, 3, 4]
    losses = [r["loss"] for r in train_logs(resumed)]
    assert losses == pytest.approx([r["loss"] for r in train_logs(full)])


@pytest.mark.integration
def test_fresh_run_starts_metrics_over(tmp_path: Path) -> None:
    _run_trainer(tmp_path, max_steps=2)
    _run_trainer(tmp_path, max_steps=2)
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2]


@pytest.mark.unit
def test_metrics_are_valid_json_with_nan_as_null(tmp_path: Path) -> None:
    callback = MetricsJsonlCallback(tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = TrainerState()
    state.global_step, state.epoch = 5, 0.5
    callback.on_log(args, state, None, logs={"objective/kl": float("nan"), "beta": 0.1})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"step": 5, "epoch": 0.5, "objective/kl": None, "beta": 0.1}


@pytest.mark.unit
def test_reward_curve_png(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "objective/scores": s / 10, "objective/kl": s / 5} for s in range(1, 11)]
    rows.append({"step": 10, "eval_reward_mean": 0.9, "eval_win_rate": 0.8})
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot_reward_curve(metrics, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def run_demo(demo_models: DemoModels, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``online-dpo demo`` (``python -m trainer demo``) on 4 prompts a step, 1 eval sample,
    writing into ``out``; fails the test unless it exits 0."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "trainer", "demo", "--output-dir", str(out), *args,
            "--batch-size", "4", "--eval-samples", "1",
            "--cache-dir", str(demo_models.root.parent),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_short_demo_run(tmp_path: Path, demo_models: DemoModels) -> None:
    out = tmp_path / "demo"
    proc = run_demo(demo_models, out, "--max-steps", "3")
    assert re.search(r"mean reward \(reward service\)\s+-?\d+\.\d+\s+-?\d+\.\d+", proc.stdout)
    assert "before" in proc.stdout and "after" in proc.stdout
    train = [r for r in read_metrics(out / "metrics.jsonl") if "objective/scores" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert set(train[-1]) >= TRL_KEYS
    assert (out / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "demo_summary.json").read_text())
    n_prompts = len(demo_models.eval_prompts.read_text().splitlines())
    assert len(summary["before"]["samples"]) == len(summary["after"]["samples"]) == n_prompts
    assert summary["before"]["kl_mean"] == 0.0  # the policy is still the reference
    assert -1.5 < summary["after"]["reward_mean"] < 1.5


def test_short_demo_with_rule_shows_each_source(tmp_path: Path, demo_models: DemoModels) -> None:
    """``--with-rule``: the reward model plus the brevity rule at weight 0.5; the table shows
    the combined reward, each source's mean and the completions' length; the metrics log
    each source."""
    out = tmp_path / "demo"
    proc = run_demo(demo_models, out, "--with-rule", "--max-steps", "2")
    number = r"\s+-?\d+\.\d+\s+-?\d+\.\d+"
    for row in ("mean combined reward", r"reward \(weight 1\)", r"brevity_reward \(weight 0\.5\)",
                "words per completion"):  # fmt: skip
        assert re.search(row + number, proc.stdout), (row, proc.stdout)
    train = [r for r in read_metrics(out / "metrics.jsonl") if "objective/scores" in r]
    assert {"rewards/reward/mean", "rewards/brevity_reward/mean"} <= set(train[-1])
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["after"]["source_means"]) == {"reward", "brevity_reward"}
    assert (out / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
