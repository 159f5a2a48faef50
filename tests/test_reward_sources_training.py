"""Training with several reward sources (issue 26): two reward-service subprocesses plus
Python reward functions in real runs of the trainer; a function reading a dataset column;
async generation and resume with functions; two-process DDP; the errors at start-up and
during training; ``reward_model_change: stop``; completion logs.

TRL's conventions followed are those of ``trl/trainer/grpo_trainer.py`` (1.16), as in
tests/test_rewards.py: functions get ``prompts``, ``completions``, ``completion_ids``,
``trainer_state`` and the dataset's other columns by name; the weighted ``nansum``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from common.client import RewardClient
from common.demo_models import DemoModels
from tests import reward_funcs as funcs
from tests.support import tiny_config
from tests.test_distributed import launch_two_ranks, service_counts
from trainer.callbacks import MetricsJsonlCallback, read_metrics
from trainer.checkpoint import STAGING_DIR
from trainer.cli import main as cli_main
from trainer.data import load_prompt_dataset
from trainer.losses import select_pairs
from trainer.metrics import EVENTS_FILE, StepRecord
from trainer.reward_specs import RewardConfigError
from trainer.rewards import RewardBatch, RewardFunctionError, RewardModelChanged
from trainer.rollouts import ROLLOUTS_FILE
from trainer.rules import brevity_reward
from trainer.scoring import score_items
from trainer.service_process import ServiceProcess, free_port, running_service
from trainer.trainer import OnlineDPOTrainer

pytestmark = pytest.mark.slow

# Eight prompts, batch 2: one epoch is 4 steps (async mode samples a step ahead within one).
PROMPTS = ["the movie was", "my friends found the cast", "the plot is", "i think the film",
           "the ending", "overall the show", "the music was", "this book is"]  # fmt: skip


@pytest.fixture(scope="module")
def services(demo_models: DemoModels) -> Iterator[tuple[str, str]]:
    """Two reward services: the demo reward model and the alternative one."""
    with running_service(demo_models.reward) as a, running_service(demo_models.reward_alt) as b:
        yield a, b


class RecordingTrainer(OnlineDPOTrainer):
    """Keeps each step's combined rewards, pairs and :class:`RewardBatch`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: list[tuple[torch.Tensor, Any, RewardBatch, list[str]]] = []

    def _record_step(self, step: StepRecord) -> None:
        scored = step.rollout.rewards.result()
        self.recorded.append((step.rewards.clone(), step.pairs, scored, step.rollout.completions))
        super()._record_step(step)


def make(
    demo_models: DemoModels,
    tmp_path: Path,
    url: str | None,
    dataset: Dataset | None = None,
    **overrides: Any,
) -> RecordingTrainer:
    small = {"per_device_train_batch_size": 2, "max_new_tokens": 6, "max_steps": 2}
    args = tiny_config(tmp_path / "out", url, **{**small, **overrides})
    return RecordingTrainer(
        AutoModelForCausalLM.from_pretrained(demo_models.policy),
        args=args,
        processing_class=AutoTokenizer.from_pretrained(demo_models.policy, padding_side="left"),
        train_dataset=dataset if dataset is not None else Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}),
        callbacks=[MetricsJsonlCallback()],
    )


def direct_scores(url: str, prompts: list[Any], completions: list[str]) -> list[float]:
    with RewardClient([url]) as client:
        return client.score(score_items(prompts, completions)).scores


def train_logs(trainer: OnlineDPOTrainer) -> dict[int, dict[str, float]]:
    return {r["step"]: r for r in trainer.state.log_history if "loss" in r}


# ----------------------------------------------------------------------------- combining


def test_two_services_and_a_function_with_weights_k4(
    demo_models: DemoModels, services: tuple[str, str], tmp_path: Path
) -> None:
    """Each source's rewards are what it gives on its own (each service asked directly, the
    rule computed here); the step pairs best vs worst of K=4 on the weighted sum; every source
    has ``rewards/<name>/mean|std`` and evaluation its ``eval_rewards/<name>/mean``."""
    a, b = services
    weights = [1.0, 0.5, 2.0]
    trainer = make(
        demo_models, tmp_path, None, num_samples_per_prompt=4,
        reward_funcs=[a, b, "trainer.rules:brevity_reward"], reward_weights=weights,
    )  # fmt: skip
    with trainer:
        trainer.train()
        metrics = trainer.evaluate()
    assert len(trainer.recorded) == 2
    names = ("reward", "reward_alt", "brevity_reward")
    for rewards, pairs, scored, completions in trainer.recorded:
        assert scored.names == names
        n = len(completions)
        assert n == 2 * 4 and scored.per_source.shape == (n, 3)
        expected = torch.tensor(brevity_reward(completions), dtype=torch.float32)
        assert torch.equal(scored.per_source[:, 2], expected)
        combined = (scored.per_source * torch.tensor(weights)).sum(dim=1)
        assert torch.equal(scored.combined, combined)
        assert torch.equal(rewards, combined)
        want = select_pairs(combined, 4)
        assert torch.equal(pairs.chosen, want.chosen) and torch.equal(pairs.rejected, want.rejected)
    logs = train_logs(trainer)
    for step in (1, 2):
        for name in names:
            assert math.isfinite(logs[step][f"rewards/{name}/mean"])
            assert math.isfinite(logs[step][f"rewards/{name}/std"])
        scored = trainer.recorded[step - 1][2]
        assert logs[step]["objective/scores"] == pytest.approx(scored.combined.mean().item())
    for name in names:
        assert math.isfinite(metrics[f"eval_rewards/{name}/mean"])


def test_each_service_scores_what_it_scores_alone(
    demo_models: DemoModels, services: tuple[str, str], tmp_path: Path
) -> None:
    """The services' columns equal direct ``/score`` requests for the same samples."""
    a, b = services
    trainer = make(demo_models, tmp_path, None, max_steps=1, reward_funcs=[a, b])
    sent: list[list[Any]] = []
    submit = trainer.rewards.submit

    def spy(prompts: list[Any], *args: Any, **kwargs: Any) -> Any:
        sent.append(list(prompts))
        return submit(prompts, *args, **kwargs)

    trainer.rewards.submit = spy  # type: ignore[method-assign]
    with trainer:
        trainer.train()
    (_, _, scored, completions) = trainer.recorded[0]
    assert scored.per_source[:, 0].tolist() == pytest.approx(
        direct_scores(a, sent[0], completions), abs=1e-6
    )
    assert scored.per_source[:, 1].tolist() == pytest.approx(
        direct_scores(b, sent[0], completions), abs=1e-6
    )


def test_a_function_reads_the_answer_column(
    demo_models: DemoModels, services: tuple[str, str], tmp_path: Path
) -> None:
    """A jsonl dataset with an ``answer`` column (None for one row) through the CLI's loader:
    the function gets each sample's answer by name, aligned with its prompt, and answers
    None ("does not apply") where there is none; the service's reward still counts there."""
    answers = {"the movie was": "great", "my friends found the cast": None,
               "the plot is": ".", "i think the film": "and"}  # fmt: skip
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in answers.items())
    )
    dataset = load_prompt_dataset(path)
    trainer = make(
        demo_models, tmp_path, None, dataset, max_steps=2,
        reward_funcs=[services[0], "tests.reward_funcs:answer_check"],
    )  # fmt: skip
    seen: list[tuple[list[Any], list[Any]]] = []
    submit = trainer.rewards.submit

    def spy(prompts: list[Any], *args: Any, columns: dict[str, list[Any]], **kwargs: Any) -> Any:
        seen.append((list(prompts), list(columns["answer"])))
        return submit(prompts, *args, columns=columns, **kwargs)

    trainer.rewards.submit = spy  # type: ignore[method-assign]
    with trainer:
        trainer.train()
    assert trainer.reward_columns == ["answer"]
    for (prompts, given), (_, _, scored, completions) in zip(seen, trainer.recorded, strict=True):
        assert given == [answers[p] for p in prompts]
        check = scored.per_source[:, 1].tolist()
        for answer, completion, value in zip(given, completions, check, strict=True):
            if answer is None:
                assert math.isnan(value)
            else:
                assert value == float(answer in completion)
        service = scored.per_source[:, 0]
        assert torch.equal(scored.combined, service + torch.nan_to_num(scored.per_source[:, 1]))


# ----------------------------------------------------------------------------- async, resume


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_async_generation_with_functions_resumes_exactly(
    demo_models: DemoModels, services: tuple[str, str], tmp_path: Path, backend: str
) -> None:
    """Async generation (both backends) with a service and a function; the step-2 checkpoint
    holds step 3's rollout with each source's rewards, and a run resumed from it logs the
    uninterrupted run's steps 3 and 4, per-source metrics included."""
    funcs_ = [services[0], "tests.reward_funcs:word_count"]
    mode = {"async_generation": True, "async_generation_backend": backend}
    common = {"reward_funcs": funcs_, "reward_weights": [1.0, 0.05], "max_steps": 4, **mode}
    full = make(demo_models, tmp_path / "full", None, save_strategy="steps", save_steps=2, **common)
    with full:
        full.train()
    logs = train_logs(full)
    assert [logs[s]["async/staleness"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    saved = torch.load(checkpoint / ROLLOUTS_FILE.format(rank=0), weights_only=True)
    (record,) = saved["rollouts"]
    assert record["rewards"]["names"] == ["reward", "word_count"]
    assert record["rewards"]["per_source"].shape == (4, 2)
    words = [float(len(c.split())) for c in record["completions"]]
    assert record["rewards"]["per_source"][:, 1].tolist() == words

    resumed = make(demo_models, tmp_path / "resumed", None, save_strategy="no", **common)
    with resumed:
        resumed.train(resume_from_checkpoint=str(checkpoint))
    again = train_logs(resumed)
    keys = ("loss", "objective/scores", "rewards/reward/mean", "rewards/word_count/mean",
            "rewards/margins", "logps/chosen")  # fmt: skip
    for step in (3, 4):
        for key in keys:
            assert again[step][key] == pytest.approx(logs[step][key], rel=1e-5, abs=1e-5), (
                step, key,
            )  # fmt: skip


# ----------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_ranks_score_their_own_samples_with_functions(
    demo_models: DemoModels, services: tuple[str, str], tmp_path: Path, monkeypatch: Any
) -> None:
    """2 ranks (``accelerate launch``, gloo): each rank calls the function on its own K·B
    samples only, the service scores every sample once, and the logged per-source means
    cover both ranks."""
    url = services[1]
    monkeypatch.setenv("REWARD_CALLS_DIR", str(tmp_path))
    before = service_counts(url)[1]
    out = tmp_path / "ddp"
    config = {
        "model_name_or_path": str(demo_models.policy),
        "dataset_name": str(demo_models.train_prompts),
        "output_dir": str(out), "max_steps": 2, "max_new_tokens": 6,
        "per_device_train_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1,
        "report_to": "none", "use_cpu": True, "disable_tqdm": True,
        "ddp_find_unused_parameters": False, "seed": 0, "save_strategy": "no",
        "reward_funcs": [url, "tests.reward_funcs:rank_calls"],
    }  # fmt: skip
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    launch_two_ranks(path)
    calls = {
        rank: [
            json.loads(line) for line in (tmp_path / f"rank-{rank}.jsonl").read_text().splitlines()
        ]
        for rank in (0, 1)
    }
    for rank in (0, 1):
        assert [c["step"] for c in calls[rank]] == [1, 2]
        assert all(len(c["completions"]) == 2 * 2 for c in calls[rank])  # its K·B only
    assert service_counts(url)[1] - before == 2 * 2 * 2 * 2  # steps x ranks x B x K
    logged = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["rewards/rank_calls/mean"] for r in logged] == [0.0, 0.0]
    assert all(math.isfinite(r["rewards/reward_alt/mean"]) for r in logged)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("reward_funcs", "weights", "named"),
    [
        (["tests.no_such_module:fn"], None, "tests.no_such_module"),
        (["tests.reward_funcs:no_kwargs"], None, "no_kwargs"),
        (
            ["trainer.rules:brevity_reward", "tests.reward_funcs:word_count"],
            [1.0],
            "reward_weights",
        ),
        (["neither a url nor a path"], None, "neither a url nor a path"),
    ],
    ids=["import", "signature", "weights", "entry"],
)
def test_bad_reward_config_is_one_cli_line_before_any_model_loads(
    demo_models: DemoModels,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    reward_funcs: list[str],
    weights: list[float] | None,
    named: str,
) -> None:
    """The model path does not exist: the reward error comes first, so nothing loaded."""
    config = {
        "model_name_or_path": str(tmp_path / "no-model-here"),
        "dataset_name": str(demo_models.train_prompts),
        "output_dir": str(tmp_path / "out"),
        "reward_funcs": reward_funcs,
        **({"reward_weights": weights} if weights else {}),
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("online-dpo: error: ") and named in err[0], err
    assert "no-model-here" not in err[0]


def test_a_function_the_dataset_cannot_serve_is_refused_before_the_model_loads(
    tmp_path: Path,
) -> None:
    args = tiny_config(tmp_path, None, reward_funcs=[funcs.needs_label])
    with pytest.raises(RewardConfigError, match="label"):
        OnlineDPOTrainer("no/such/model", args=args, processing_class=object(),
                         train_dataset=Dataset.from_dict({"prompt": PROMPTS}))  # fmt: skip


@pytest.mark.parametrize("func", ["fails_at_step_2_count", "fails_at_step_2_text"])
def test_a_bad_function_answer_stops_at_its_step_leaving_whole_files(
    demo_models: DemoModels, services: tuple[str, str], tmp_path: Path, func: str
) -> None:
    """Step 1 trains and is checkpointed; step 2's bad answer stops the run with an error
    naming the function and the step; no step-2 checkpoint, no staging directory, and the
    completion log holds step 1 only, every line whole."""
    trainer = make(
        demo_models, tmp_path, None, max_steps=3, save_strategy="steps", save_steps=1,
        log_completions=True, reward_funcs=[services[0], f"tests.reward_funcs:{func}"],
    )  # fmt: skip
    with trainer, pytest.raises(RewardFunctionError, match=rf"'{func}'.*step 2"):
        trainer.train()
    out = tmp_path / "out"
    assert (out / "checkpoint-1" / "trainer_state.json").exists()
    assert not (out / "checkpoint-2").exists() and not (out / STAGING_DIR).exists()
    lines = (out / "completions.jsonl").read_text().splitlines()
    assert lines and {json.loads(line)["step"] for line in lines} == {1}


class _Redeploy(TrainerCallback):
    """After step 1, another reward model takes the service's port (a redeploy)."""

    def __init__(self, first: ServiceProcess, second: ServiceProcess) -> None:
        self.first, self.second = first, second

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if state.global_step == 1:
            self.first.stop()
            self.second.start()


@pytest.mark.slow
def test_reward_model_change_stop_saves_a_checkpoint_and_stops(
    demo_models: DemoModels, tmp_path: Path
) -> None:
    port = free_port()
    first = ServiceProcess(demo_models.reward, port=port, log_path=tmp_path / "first.log")
    second = ServiceProcess(demo_models.reward_alt, port=port, log_path=tmp_path / "second.log")
    try:
        url = first.start()
        trainer = make(
            demo_models, tmp_path, url, max_steps=3, reward_model_change="stop",
            reward_max_retries=20,
        )  # fmt: skip
        trainer.add_callback(_Redeploy(first, second))
        with trainer, pytest.raises(RewardModelChanged) as stopped:
            trainer.train()
    finally:
        first.stop()
        second.stop()
    out = tmp_path / "out"
    assert stopped.value.checkpoint == str(out / "checkpoint-1")
    assert (out / "checkpoint-1" / "model.safetensors").exists()
    assert trainer.state.global_step == 1
    events = [json.loads(line) for line in (out / EVENTS_FILE).read_text().splitlines()]
    changes = [e for e in events if e["event"] == "reward_model_changed"]
    assert len(changes) == 1 and changes[0]["source"] == "reward"


# ----------------------------------------------------------------------------- completion logs


def test_log_completions_writes_jsonl_prints_and_logs_a_wandb_table(
    demo_models: DemoModels,
    services: tuple[str, str],
    tmp_path: Path,
    wandb_offline: object,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``log_completions`` with W&B offline in ``report_to``: completions.jsonl holds each
    logged step's prompts, K completions, per-source and combined rewards and the pair; the
    console shows a table; the offline W&B run directory holds the completions table."""
    trainer = make(
        demo_models, tmp_path, None, log_completions=True, num_completions_to_print=1,
        report_to=["wandb"],
        reward_funcs=[services[0], "trainer.rules:brevity_reward", "tests.reward_funcs:logs_words"],
    )  # fmt: skip
    with trainer:
        trainer.train()
    records = [
        json.loads(x) for x in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()
    ]
    # TRL's log_extra column is in each record, its log_metric in the step's metrics.
    for record in records:
        assert record["extra"]["words"] == [len(c.split()) for c in record["completions"]]
    metrics = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    for row in metrics:
        words = [w for r in records if r["step"] == row["step"] for w in r["extra"]["words"]]
        assert row["words/mean"] == pytest.approx(sum(words) / len(words))
    assert [r["step"] for r in records] == [1, 1, 2, 2]
    for record, (rewards, pairs, scored, completions) in zip(
        records[::2], trainer.recorded, strict=True
    ):
        assert record["completions"] == completions[0::2]
        assert record["rewards"]["brevity_reward"] == scored.per_source[0::2, 1].tolist()
        assert record["reward"] == pytest.approx(rewards[0::2].tolist())
        assert record["chosen"] == int(pairs.chosen[0]) // 2
    assert "Step 2" in capsys.readouterr().out
    tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/completions_*.table.json"))
    assert len(tables) == 2, list(tmp_path.rglob("*"))
    assert "words" in json.loads(tables[0].read_text())["columns"]
