"""The ``online-dpo`` command: YAML + flag precedence, one-line errors, train, build-demo-models."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from common.demo_models import DemoModels
from tests.support import TRL_METRIC_NAMES
from trainer.callbacks import read_metrics
from trainer.cli import main, parse_train_args
from trainer.service_process import running_service

ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def run_yaml(tmp_path: Path) -> Path:
    return write_yaml(
        tmp_path / "run.yaml",
        {
            "model_name_or_path": "some/policy",
            "dataset_name": "prompts.jsonl",
            "output_dir": str(tmp_path / "out"),
            "learning_rate": "2e-4",  # a string, as YAML 1.1 reads 2e-4
            "max_new_tokens": 16,
            "temperature": 1.0,
            "beta": 0.2,
            "reward_url": "http://127.0.0.1:8000",
            "report_to": "none",
            "env": {"ONLINE_DPO_TEST_VAR": "from-yaml"},
        },
    )


def test_yaml_gives_defaults_and_flags_override(
    run_yaml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ONLINE_DPO_TEST_VAR", raising=False)
    script, model, config = parse_train_args(
        ["--config", str(run_yaml), "--max_new_tokens", "32", "--beta", "0.05", "0.02"]
    )
    assert model.model_name_or_path == "some/policy"
    assert script.dataset_name == "prompts.jsonl"
    assert config.learning_rate == pytest.approx(2e-4)  # from the YAML, converted to float
    assert config.temperature == 1.0  # from the YAML
    assert config.max_new_tokens == 32  # the flag wins over the YAML
    assert list(config.beta) == [0.05, 0.02]  # the flag wins, as a per-epoch list
    assert config.top_p == 1.0  # neither: the dataclass default
    assert os.environ["ONLINE_DPO_TEST_VAR"] == "from-yaml"


def test_yaml_single_beta_is_accepted(run_yaml: Path) -> None:
    _, _, config = parse_train_args(["--config", str(run_yaml)])
    beta = config.beta if isinstance(config.beta, float) else list(config.beta)
    assert beta in (0.2, [0.2])


def test_flags_alone_work(tmp_path: Path) -> None:
    script, model, config = parse_train_args(
        [
            "--model_name_or_path", "p", "--dataset_name", "d", "--output_dir", str(tmp_path),
            "--learning_rate", "1e-5", "--reward_url", "http://127.0.0.1:9",
        ]
    )  # fmt: skip
    assert (model.model_name_or_path, script.dataset_name) == ("p", "d")
    assert config.learning_rate == pytest.approx(1e-5)


@pytest.mark.parametrize(
    ("extra", "yaml_extra", "expected"),
    [
        (["--loss_type", "hinge"], {}, "loss_type"),
        (["--learning_rate", "fast"], {}, "--learning_rate.*'fast'"),
        ([], {"learning_rate": "fast"}, "--learning_rate.*'fast'"),
        ([], {"lerning_rate": 0.1}, "unknown field.*lerning_rate"),
        (["--no_such_flag", "1"], {}, "unrecognized arguments: --no_such_flag 1"),
        (["--model_name_or_path", ""], {}, "model_name_or_path is required"),
    ],
)
def test_bad_values_are_one_line_errors(
    tmp_path: Path,
    run_yaml: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    yaml_extra: dict,
    expected: str,
) -> None:
    config = yaml.safe_load(run_yaml.read_text()) | yaml_extra
    path = write_yaml(tmp_path / "bad.yaml", config)
    assert main(["train", "--config", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("online-dpo: error: ")
    assert err.count("\n") == 1
    assert re.search(expected, err), err


def test_missing_or_broken_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: No such file" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert main(["train", "--config", str(tmp_path / "list.yaml")]) == 2
    assert "must be a YAML mapping" in capsys.readouterr().err


def test_bad_value_exit_code_and_no_traceback(run_yaml: Path) -> None:
    proc = run_cli("train", "--config", str(run_yaml), "--loss_type", "hinge")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("online-dpo: error: ") and "hinge" in last


TRL_KEYS = TRL_METRIC_NAMES


def test_train_from_yaml_against_a_real_service(tmp_path: Path, demo_models: DemoModels) -> None:
    out = tmp_path / "run"
    config = write_yaml(
        tmp_path / "run.yaml",
        {
            "model_name_or_path": str(demo_models.policy),
            "dataset_name": str(demo_models.train_prompts.parent),  # train + eval files
            "output_dir": str(out),
            "max_steps": 3,
            "per_device_train_batch_size": 4,
            "max_new_tokens": 8,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "eval_strategy": "steps",
            "eval_steps": 3,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
        },
    )
    with running_service(demo_models.reward) as url:
        proc = run_cli("train", "--config", str(config), "--reward_url", url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = list(read_metrics(out / "metrics.jsonl"))
    train = [r for r in records if "objective/scores" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert set(train[0]) >= TRL_KEYS
    # Evaluated once at step 3: by Trainer (eval_steps), not again by the CLI.
    assert [r["step"] for r in records if "eval_reward_mean" in r] == [3]
    assert (out / "reward_curve.png").stat().st_size > 0
    trained = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(demo_models.policy)
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)


def test_model_loading_options_from_yaml_and_flags(tmp_path: Path, run_yaml: Path) -> None:
    """TRL's ``model_init_kwargs`` (a YAML mapping, or JSON as a flag) and
    ``trust_remote_code``."""
    config = yaml.safe_load(run_yaml.read_text())
    config |= {"model_init_kwargs": {"dtype": "bfloat16", "revision": "v1"}}
    path = write_yaml(tmp_path / "kwargs.yaml", config)
    _, _, parsed = parse_train_args(["--config", str(path), "--trust_remote_code"])
    assert parsed.model_init_kwargs == {"dtype": "bfloat16", "revision": "v1"}
    assert parsed.trust_remote_code is True
    _, _, parsed = parse_train_args(
        ["--config", str(run_yaml), "--model_init_kwargs", '{"attn_implementation": "sdpa"}']
    )
    assert parsed.model_init_kwargs == {"attn_implementation": "sdpa"}
    assert parsed.trust_remote_code is False


CUSTOM_MODELING = """
from transformers import LlamaConfig, LlamaForCausalLM


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny-custom-llama"


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


def custom_code_model(demo_models: DemoModels, out: Path) -> Path:
    """The demo policy as a model whose classes transformers does not have: its config names
    them in ``auto_map`` and ``modeling_tiny_custom.py`` beside it defines them (what a Hub
    model with custom code looks like)."""
    shutil.copytree(demo_models.policy, out)
    (out / "modeling_tiny_custom.py").write_text(CUSTOM_MODELING)
    config = json.loads((out / "config.json").read_text())
    config |= {
        "model_type": "tiny-custom-llama",
        "architectures": ["TinyCustomForCausalLM"],
        "auto_map": {
            "AutoConfig": "modeling_tiny_custom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
        },
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_custom_code_model_needs_trust_remote_code(tmp_path: Path, demo_models: DemoModels) -> None:
    """Without ``trust_remote_code`` the CLI refuses a model that ships code, in one line; with
    it the model's own class trains, loaded with ``model_init_kwargs`` (bfloat16 here, over
    the ``dtype`` field's float32)."""
    model = custom_code_model(demo_models, tmp_path / "custom")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}  # where transformers imports it from
    out = tmp_path / "run"
    args = [
        "train", "--model_name_or_path", str(model),
        "--dataset_name", str(demo_models.train_prompts), "--output_dir", str(out),
        "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_new_tokens", "4",
        "--report_to", "none", "--use_cpu", "true", "--save_strategy", "no", "--logging_steps", "1",
    ]  # fmt: skip
    refused = run_cli(*args, "--reward_url", "http://127.0.0.1:9", env=env)
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("online-dpo: error: model ") and "trust_remote_code" in last, last
    assert "custom code" in last
    with running_service(demo_models.reward) as url:
        kwargs = '{"dtype": "bfloat16"}'
        proc = run_cli(
            *args, "--reward_url", url, "--trust_remote_code", "--model_init_kwargs", kwargs,
            env=env,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1]
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["TinyCustomForCausalLM"]
    assert saved["dtype"] == "bfloat16"


def test_reward_service_not_reachable_is_one_line(
    tmp_path: Path, demo_models: DemoModels, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.service_process import free_port

    url = f"http://127.0.0.1:{free_port()}"
    argv = [
        "train", "--model_name_or_path", str(demo_models.policy),
        "--dataset_name", str(demo_models.train_prompts), "--output_dir", str(tmp_path),
        "--reward_url", url, "--reward_max_retries", "0", "--report_to", "none",
        "--use_cpu", "true",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("online-dpo: error: reward_url: ") and url in err[-1], err


def test_bad_demo_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--max-steps", "0"]) == 2
    assert capsys.readouterr().err == "online-dpo: error: --max-steps must be >= 1, got 0\n"


@pytest.mark.slow
def test_build_demo_models(tmp_path: Path) -> None:
    proc = run_cli("build-demo-models", "--out", str(tmp_path / "m"), "--policy-steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    policy = tmp_path / "m" / "policy"
    assert f"policy:        {policy}" in proc.stdout
    AutoModelForCausalLM.from_pretrained(policy)
    for name in ("reward", "reward_alt"):
        config = AutoConfig.from_pretrained(tmp_path / "m" / name)
        assert config.num_labels == 1 and config.architectures == ["LlamaForSequenceClassification"]
    prompts = (tmp_path / "m" / "data" / "eval_prompts.jsonl").read_text().splitlines()
    assert prompts and all("prompt" in json.loads(line) for line in prompts)
