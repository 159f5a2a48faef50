"""Completion logs: ``completions.jsonl`` records, the console table, and the ``completions``
table in W&B (offline run directory) and Trackio (local database), logged with the calls of
TRL 1.16's ``GRPOTrainer.log`` (``trl/trainer/grpo_trainer.py``:
``logging_backend.log({"completions": logging_backend.Table(dataframe=df)})``)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from trainer.completion_log import (
    COMPLETIONS_FILE,
    CompletionLog,
    completion_records,
    table_rows,
)
from trainer.losses import select_pairs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the movie was", "the plot is"]
# K=3 samples per prompt, block layout: sample k of prompt i is k·B + i.
COMPLETIONS = [" great .", " dull .", " fine .", " superb and great .", " bad .", " long ."]
REWARDS = {
    "reward": [0.9, -0.8, 0.1, 1.0, -1.0, 0.0],
    "answer_check": [1.0, None, 0.0, 1.0, None, 1.0],
}
COMBINED = [1.9, -0.8, 0.1, 2.0, -1.0, 1.0]


def add_step(log: CompletionLog, step: int) -> None:
    pairs = select_pairs(torch.tensor(COMBINED), 3)
    log.add(
        step, PROMPTS, COMPLETIONS, REWARDS, COMBINED, pairs.chosen.tolist(),
        pairs.rejected.tolist(), columns={"answer": ["great", None]},
    )  # fmt: skip


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_group_each_prompts_samples_with_rewards_and_pair() -> None:
    pairs = select_pairs(torch.tensor(COMBINED), 3)
    records = completion_records(
        4, PROMPTS, COMPLETIONS, REWARDS, COMBINED, pairs.chosen.tolist(), pairs.rejected.tolist()
    )
    assert records == [
        {
            "step": 4,
            "prompt": "the movie was",
            "completions": [" great .", " fine .", " bad ."],
            "rewards": {"reward": [0.9, 0.1, -1.0], "answer_check": [1.0, 0.0, None]},
            "reward": [1.9, 0.1, -1.0],
            "chosen": 0,
            "rejected": 2,
        },
        {
            "step": 4,
            "prompt": "the plot is",
            "completions": [" dull .", " superb and great .", " long ."],
            "rewards": {"reward": [-0.8, 1.0, 0.0], "answer_check": [None, 1.0, 1.0]},
            "reward": [-0.8, 2.0, 1.0],
            "chosen": 1,
            "rejected": 0,
        },
    ]
    with pytest.raises(ValueError, match="the pair of prompt 0 is not among its samples"):
        completion_records(4, PROMPTS, COMPLETIONS, REWARDS, COMBINED, [1, 1], [0, 1])


def test_log_extra_columns_go_into_the_records_and_the_table() -> None:
    """Columns reward functions added with TRL's ``log_extra`` (per sample) follow each
    prompt's samples in the record and come after the combined reward in the table; a batch
    that did not log a column has None there."""
    pairs = select_pairs(torch.tensor(COMBINED), 3)
    words = [2, 2, 2, 4, 2, 2]
    args = (PROMPTS, COMPLETIONS, REWARDS, COMBINED, pairs.chosen.tolist(), pairs.rejected.tolist())
    records = completion_records(4, *args, extra={"words": words})
    assert [r["extra"] for r in records] == [{"words": [2, 2, 2]}, {"words": [2, 4, 2]}]
    columns, rows = table_rows([*records, *completion_records(4, *args)])
    assert columns == [
        "step", "prompt", "completion", "reward", "answer_check", "combined", "words", "pair",
    ]  # fmt: skip
    assert [row[6] for row in rows] == [2, 2, 2, 2, 4, 2] + [None] * 6


def test_flush_appends_the_latest_steps_records_and_prints_a_table(tmp_path: Path) -> None:
    out = io.StringIO()
    log = CompletionLog(
        tmp_path, is_main_process=True, num_completions_to_print=2,
        console=Console(file=out, width=200),
    )  # fmt: skip
    log.start(0)
    add_step(log, 1)  # never logged: replaced by step 2's samples
    add_step(log, 2)
    add_step(log, 2)  # a second micro-batch of step 2
    written = log.flush()
    assert [r["step"] for r in written] == [2, 2, 2, 2]
    path = tmp_path / COMPLETIONS_FILE
    assert read(path) == written
    assert written[0]["columns"] == {"answer": "great"} and written[1]["columns"] == {
        "answer": None
    }
    table = out.getvalue()
    assert "Step 2" in table and "answer_check" in table and "chosen" in table
    # The first 2 completions: prompt 0's samples 0 and 1.
    assert table.count("the movie was") == 2 and "great ." in table and "fine ." in table
    assert "bad ." not in table and "the plot is" not in table
    assert log.flush() == [] and len(read(path)) == 4  # nothing new: nothing written
    add_step(log, 3)
    log.flush()
    assert [r["step"] for r in read(path)] == [2, 2, 2, 2, 3, 3]


def test_a_resumed_run_keeps_the_records_up_to_its_step(tmp_path: Path) -> None:
    log = CompletionLog(tmp_path, is_main_process=True, console=Console(file=io.StringIO()))
    for step in (1, 2, 3):
        add_step(log, step)
        log.flush()
    log.start(2)  # resumed from checkpoint-2: step 3 is redone
    assert [r["step"] for r in read(tmp_path / COMPLETIONS_FILE)] == [1, 1, 2, 2]
    log.start(0)  # a fresh run starts over
    assert not (tmp_path / COMPLETIONS_FILE).exists()


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    out = io.StringIO()
    log = CompletionLog(tmp_path, is_main_process=False, console=Console(file=out))
    log.start(0)
    add_step(log, 1)
    assert log.flush() == []
    assert not (tmp_path / COMPLETIONS_FILE).exists() and out.getvalue() == ""


def test_wandb_offline_run_holds_the_completions_table(tmp_path: Path, wandb_offline: Any) -> None:
    wandb = wandb_offline
    log = CompletionLog(
        tmp_path / "out", is_main_process=True, report_to=["wandb"],
        console=Console(file=io.StringIO()),
    )  # fmt: skip
    add_step(log, 5)
    log.flush()  # no W&B run yet: only the file
    run = wandb.init(project="online-dpo-test")
    try:
        add_step(log, 6)
        log.flush()
    finally:
        wandb.finish()
    tables = list(Path(run.dir).glob("media/table/completions_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == [
        "step", "prompt", "completion", "reward", "answer_check", "combined", "pair",
    ]  # fmt: skip
    assert len(table["data"]) == 6
    first = dict(zip(table["columns"][:3], table["data"][0][:3], strict=True))
    assert first == {"step": 6, "prompt": "the movie was", "completion": " great ."}
    assert [row[-1] for row in table["data"]] == [
        "chosen",
        "",
        "rejected",
        "rejected",
        "chosen",
        "",
    ]


TRACKIO_SCRIPT = """
import io, json, sys
import trackio
from rich.console import Console
from trackio.sqlite_storage import SQLiteStorage
from tests.test_completion_log import add_step
from trainer.completion_log import CompletionLog

log = CompletionLog(sys.argv[1], is_main_process=True, report_to=["trackio"],
                    console=Console(file=io.StringIO()))
trackio.init(project="online-dpo-test", name="run")
add_step(log, 7)
log.flush()
trackio.finish()
print(json.dumps(SQLiteStorage.get_logs("online-dpo-test", "run")))
"""


def test_trackio_run_holds_the_completions_table(tmp_path: Path) -> None:
    """In a child process: Trackio reads ``TRACKIO_DIR`` (its local database) at import."""
    pytest.importorskip("trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", TRACKIO_SCRIPT, str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    logs = json.loads(done.stdout.strip().splitlines()[-1])
    tables = [entry["completions"] for entry in logs if "completions" in entry]
    assert len(tables) == 1 and tables[0]["_type"] == "trackio.table"
    rows = tables[0]["_value"]
    assert len(rows) == 6
    assert rows[0] == {
        "step": 7, "prompt": "the movie was", "completion": " great .", "reward": 0.9,
        "answer_check": 1.0, "combined": 1.9, "pair": "chosen",
    }  # fmt: skip
