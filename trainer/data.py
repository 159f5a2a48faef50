"""Loading prompt datasets (a ``prompt`` column) through ``datasets``."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, Features, List, Value, load_dataset

PROMPT_COLUMN = "prompt"

# File suffix -> the `datasets` packaged builder that reads it.
_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


def load_prompt_dataset(
    name_or_path: str | Path, split: str = "train", config_name: str | None = None
) -> Dataset:
    """Load a prompt dataset: a ``prompt`` column, and any others (reward functions get
    them by name, e.g. ``answer``).

    ``name_or_path`` is a local json/jsonl/parquet/csv file, a local directory of such files
    (split names come from the file names, e.g. ``train.jsonl`` / ``test.jsonl``), or a Hub
    dataset name. ``split`` accepts ``datasets`` slicing such as ``"train[:90%]"``; a single
    file holds only the ``train`` split. Prompts are strings or chat message lists
    (``[{"role": ..., "content": ...}]``).
    """
    source = str(name_or_path)
    path = Path(source).expanduser()
    if path.suffix.lower() in _BUILDERS and not path.is_file():
        # Fail here rather than let `datasets` look the file name up on the Hub.
        raise ValueError(f"{source}: no such file")
    try:
        if path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"{source}: unsupported file type {path.suffix!r} "
                    f"(use one of {', '.join(sorted(_BUILDERS))})"
                )
            dataset = load_dataset(builder, data_files=str(path), split=split)
        else:
            dataset = load_dataset(source, config_name, split=split)
    except ValueError as e:
        # `datasets` reports unknown splits and unreadable files as bare ValueErrors
        # without the source; say which dataset and split were asked for.
        if str(e).startswith(source):
            raise
        raise ValueError(f"{source} (split {split!r}): {e}") from e
    except (FileNotFoundError, ConnectionError) as e:
        raise ValueError(f"{source}: cannot load dataset: {e}") from e
    if isinstance(dataset, dict):
        raise ValueError(f"{source}: expected one split, got {sorted(dataset)}")
    check_prompt_column(dataset.features, source)
    nulls = dataset.with_format("arrow")[PROMPT_COLUMN].null_count
    if nulls:
        raise ValueError(f"{source}: {nulls} row(s) have an empty {PROMPT_COLUMN!r}")
    return dataset


def check_prompt_column(features: Features, source: str) -> None:
    """Raise ``ValueError`` unless ``features`` has a string or chat-message ``prompt`` column."""
    if PROMPT_COLUMN not in features:
        raise ValueError(
            f"{source}: no {PROMPT_COLUMN!r} column (columns: {', '.join(features) or 'none'})"
        )
    feature = features[PROMPT_COLUMN]
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return
    if (
        isinstance(feature, List)
        and isinstance(feature.feature, dict)
        and {"role", "content"} <= set(feature.feature)
    ):
        return
    raise ValueError(
        f"{source}: the {PROMPT_COLUMN!r} column must hold strings or lists of "
        f"{{'role', 'content'}} messages, not {feature}"
    )
