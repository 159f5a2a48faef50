"""Prompt datasets: local files of every supported kind, directories, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from trainer.data import load_prompt_dataset

PROMPTS = ["the movie was", "my friends found the plot"]
CHATS = [
    [{"role": "user", "content": "the movie was"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "my friends found the plot"},
    ],
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_keeps_every_column_for_reward_functions(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)])
    ds = load_prompt_dataset(f)
    assert ds.column_names == ["prompt", "id"]
    assert list(ds["prompt"]) == PROMPTS
    assert list(ds["id"]) == list(range(len(PROMPTS)))


def test_json_parquet_and_csv_give_the_same_prompts(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": p} for p in PROMPTS]))
    pd.DataFrame({"prompt": PROMPTS, "n": [1, 2]}).to_parquet(tmp_path / "p.parquet")
    pd.DataFrame({"n": [1, 2], "prompt": PROMPTS}).to_csv(tmp_path / "p.csv", index=False)
    for name in ("p.json", "p.parquet", "p.csv"):
        assert list(load_prompt_dataset(tmp_path / name)["prompt"]) == PROMPTS, name


def test_conversational_prompts(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": c} for c in CHATS])
    ds = load_prompt_dataset(f)
    assert [list(m) for m in ds["prompt"]] == CHATS


def test_directory_splits_and_slices(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train_prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    write_jsonl(tmp_path / "eval_prompts.jsonl", [{"prompt": "held out"}])
    assert list(load_prompt_dataset(tmp_path, "train")["prompt"]) == PROMPTS
    # `datasets` maps "eval" file names to the test split.
    assert list(load_prompt_dataset(tmp_path, "test")["prompt"]) == ["held out"]
    assert list(load_prompt_dataset(tmp_path, "train[:1]")["prompt"]) == PROMPTS[:1]


def test_missing_prompt_column_names_file_and_columns(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 1}])
    expected = r"bad\.jsonl: no 'prompt' column \(columns: text, label\)"
    with pytest.raises(ValueError, match=expected):
        load_prompt_dataset(f)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": 3}], r"must hold strings or lists of .*Value\('int64'\)"),
        ([{"prompt": [{"speaker": "me", "text": "hi"}]}], "must hold strings or lists"),
    ],
)
def test_wrong_prompt_types(tmp_path: Path, rows: list[dict], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_prompt_dataset(write_jsonl(tmp_path / "p.jsonl", rows))


def test_empty_csv_prompt_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("prompt,n\nhello,1\n,2\n")
    with pytest.raises(ValueError, match=r"p\.csv: 1 row\(s\) have an empty 'prompt'"):
        load_prompt_dataset(tmp_path / "p.csv")


def test_unknown_split_and_missing_file(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    with pytest.raises(ValueError, match=r"p\.jsonl \(split 'test'\): Unknown split"):
        load_prompt_dataset(f, "test")
    with pytest.raises(ValueError, match=r"nope\.jsonl: no such file"):
        load_prompt_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'"):
        load_prompt_dataset(tmp_path / "p.txt")
