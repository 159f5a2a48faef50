"""The trainer benchmarks' parts that need no long run: the policy sizes they build, the
ratios and verdicts they report, and the GPU check's refusal on a machine without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.bench_trainer import IMPLS, parse_args, ratios, summarize, write_results
from bench.policies import POLICIES, build_policy, num_parameters
from common.demo_models import DemoModels

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("name", "millions"), [("4m", 4.33), ("25m", 25.44)])
def test_built_policies_have_the_stated_size(
    demo_models: DemoModels, tmp_path: Path, name: str, millions: float
) -> None:
    path = build_policy(name, demo_models.policy, tmp_path)
    assert num_parameters(path) / 1e6 == pytest.approx(millions, abs=0.01)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    assert config.hidden_size == POLICIES[name].hidden
    assert config.intermediate_size == 4 * config.hidden_size
    assert config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    # Random init, the same every time (seed 0): both trainers of a bench start alike.
    again = AutoModelForCausalLM.from_pretrained(build_policy(name, demo_models.policy, tmp_path))
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)


def test_the_demo_policy_is_the_trained_one(demo_models: DemoModels, tmp_path: Path) -> None:
    assert build_policy("demo", demo_models.policy, tmp_path) == demo_models.policy
    assert not any(tmp_path.iterdir())


def _run(step_s: float, rss_mb: float, private_mb: float = 0.0) -> dict:
    return {
        "step_time_mean_s": step_s,
        "step_time_median_s": step_s,
        "peak_rss_mb": rss_mb,
        "child_peak_private_mb": private_mb,
        "gpu_peak_mb": 0.0,
        "final_scores": 0.5,
        "timing_s": {},
        "load_avg_1min": [1.0, 1.5],
    }


def test_ratios_verdicts_and_table(tmp_path: Path) -> None:
    figures = {
        "4m": {"trl": [(1.0, 600), (1.2, 620)], "ours": [(1.0, 590)], "ours-async": [(0.7, 610)]},
        "25m": {"trl": [(2.0, 1000)], "ours": [(2.0, 990)], "ours-async": [(1.6, 1100)]},
    }
    results: dict = {"service_peak_rss_mb": 300.0, "policies": {}, "load_avg_1min": [0.5, 2.5]}
    results["config"] = {"device": "cpu"}
    for policy, per_impl in figures.items():
        row = {i: summarize([_run(*f, private_mb=40.0) for f in per_impl[i]]) for i in IMPLS}
        row["ratios"] = ratios(row, results["service_peak_rss_mb"])
        results["policies"][policy] = row
    r4, r25 = results["policies"]["4m"]["ratios"], results["policies"]["25m"]["ratios"]
    assert r4["step_time_ratio_async"] == pytest.approx(0.7 / 1.1)  # TRL's median of 2 runs
    assert r4["throughput_async_over_sync"] == pytest.approx(1.0 / 0.7)
    assert r25["rss_ratio_async"] == pytest.approx(1.1)
    assert r25["rss_ratio_with_service_sync"] == pytest.approx(1.29)

    out, table = tmp_path / "r" / "trainer.json", tmp_path / "t" / "table.md"
    text = write_results(results, out, table)
    assert table.read_text() == text + "\n"
    assert json.loads(out.read_text())["policies"]["4m"]["ratios"] == r4
    assert "| 4m | 0.91 | 0.64 | 1.43 | 0.97 | 1.00 | 40 |" in text
    assert "4m: step_time_ratio_async 0.64 (target <= 0.75) met" in text
    assert "25m: step_time_ratio_async 0.80 (target <= 0.85) met" in text
    assert "25m: throughput_async_over_sync 1.25 (target >= 1.3) MISSED" in text
    assert "25m: rss_ratio_async 1.10 (target <= 1.05) MISSED" in text
    assert "load average (1 min) over the runs: 0.5-2.5" in text


def test_policy_option_and_per_policy_shapes() -> None:
    opts = parse_args(["--policy", "25m", "4m", "25m", "--steps", "4"])
    assert opts.policy == ["25m", "4m"]
    assert (POLICIES["4m"].batch_size, POLICIES["4m"].max_new_tokens) == (8, 32)
    with pytest.raises(SystemExit):
        parse_args(["--policy", "1b"])
    with pytest.raises(SystemExit):
        parse_args(["--steps", "1"])
    assert parse_args(["--async-trainer-threads", "2"]).async_trainer_threads == 2
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parse_args(["--async-trainer-threads", bad])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_check_stops_at_once_without_cuda(tmp_path: Path) -> None:
    table = tmp_path / "gpu.md"
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(table)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--device cuda: torch sees no CUDA device" in proc.stderr
    assert time.monotonic() - start < 60
    assert not table.exists() and not table.with_suffix(".json").exists()
