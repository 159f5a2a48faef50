"""Completion logs (TRL's ``log_completions`` / ``num_completions_to_print``): what the policy
writes during a run, with each reward source's verdict and the pair chosen from it.

At each logging step the latest step's samples are appended to ``OUTPUT_DIR/completions.jsonl``
(one JSON object per prompt: its ``K`` completions, each source's rewards, the combined reward,
which sample was chosen and which rejected), printed as a small ``rich`` table, and logged as a
``completions`` table to W&B and/or Trackio when they are in ``report_to`` (TRL's calls).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trainer.callbacks import truncate_metrics
from trainer.generation import Prompt

COMPLETIONS_FILE = "completions.jsonl"
TABLE_KEY = "completions"
# The table's column of the combined reward (a source may itself be named "reward").
COMBINED_COLUMN = "combined"


def _json_number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def completion_records(
    step: int,
    prompts: Sequence[Prompt],
    completions: Sequence[Any],
    rewards: Mapping[str, Sequence[float | None]],
    combined: Sequence[float],
    chosen: Sequence[int],
    rejected: Sequence[int],
    columns: Mapping[str, Sequence[Any]] | None = None,
    extra: Mapping[str, Sequence[Any]] | None = None,
) -> list[dict[str, Any]]:
    """One record per prompt from the trainer's ``K·B`` samples (block layout: sample ``k`` of
    prompt ``i`` is ``k·B + i``). ``prompts`` and ``columns`` are per prompt; ``rewards`` (per
    source), ``combined``, ``completions`` and ``extra`` (the columns reward functions added
    with TRL's ``log_extra``) per sample; ``chosen`` / ``rejected`` are each
    prompt's sample indices into the ``K·B`` samples (as ``select_pairs`` gives them). In the
    record, ``chosen`` / ``rejected`` index the prompt's ``completions``."""
    batch = len(prompts)
    if batch == 0 or len(completions) % batch:
        raise ValueError(f"{len(completions)} completions for {batch} prompts")
    k = len(completions) // batch
    records = []
    for i, prompt in enumerate(prompts):
        samples = [s * batch + i for s in range(k)]
        if chosen[i] % batch != i or rejected[i] % batch != i:
            raise ValueError(f"the pair of prompt {i} is not among its samples")
        record: dict[str, Any] = {
            "step": step,
            "prompt": prompt,
            "completions": [completions[s] for s in samples],
            "rewards": {
                name: [_json_number(values[s]) for s in samples] for name, values in rewards.items()
            },
            "reward": [_json_number(combined[s]) for s in samples],
            "chosen": int(chosen[i]) // batch,
            "rejected": int(rejected[i]) // batch,
        }
        if columns:
            record["columns"] = {name: values[i] for name, values in columns.items()}
        if extra:
            record["extra"] = {name: [values[s] for s in samples] for name, values in extra.items()}
        records.append(record)
    return records


def text_of(value: Prompt | Any) -> str:
    """A prompt or completion as one string: messages as ``role: content`` lines."""
    if isinstance(value, list):
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in value)
    return str(value)


def _extra_value(record: Mapping[str, Any], column: str, k: int) -> Any:
    """The record's ``log_extra`` value of ``column`` for its completion ``k`` (None if the
    column was not logged for this batch)."""
    values = record.get("extra", {}).get(column)
    return None if values is None else values[k]


def table_rows(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the completions table: one row per completion."""
    names = list(records[0]["rewards"]) if records else []
    # log_extra's columns (a function may log one in some batches only)
    extra = list(dict.fromkeys(name for r in records for name in r.get("extra", {})))
    columns = ["step", "prompt", "completion", *names, COMBINED_COLUMN, *extra, "pair"]
    rows = []
    for record in records:
        for k, completion in enumerate(record["completions"]):
            pair = (
                "chosen" if k == record["chosen"]
                else "rejected" if k == record["rejected"]
                else ""
            )  # fmt: skip
            rows.append(
                [
                    record["step"],
                    text_of(record["prompt"]),
                    text_of(completion),
                    *(record["rewards"][n][k] for n in names),
                    record["reward"][k],
                    *(_extra_value(record, name, k) for name in extra),
                    pair,
                ]
            )
    return columns, rows


class CompletionLog:
    """Buffers the latest step's records (:meth:`add`, every micro-batch) and writes them at
    each logging step (:meth:`flush`). Only the main process writes; elsewhere every method
    does nothing."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        is_main_process: bool,
        num_completions_to_print: int | None = None,
        report_to: Sequence[str] = (),
        console: Console | None = None,
    ) -> None:
        # report_to as TrainingArguments leaves it: a list, "all" and "none" already expanded.
        self.path = Path(output_dir) / COMPLETIONS_FILE
        self.is_main_process = is_main_process
        self.num_completions_to_print = num_completions_to_print
        self.report_to = report_to
        self.console = console or Console()
        self._records: list[dict[str, Any]] = []

    @classmethod
    def from_args(cls, args: Any, is_main_process: bool) -> CompletionLog | None:
        """The log ``args.log_completions`` asks for (``OUTPUT_DIR/completions.jsonl``), or
        ``None``."""
        if not args.log_completions:
            return None
        return cls(
            args.output_dir,
            is_main_process=is_main_process,
            num_completions_to_print=args.num_completions_to_print,
            report_to=args.report_to,
        )

    def start(self, global_step: int) -> None:
        """At the start of training: a fresh run (step 0) starts the file over; a run resumed
        at step N keeps the records up to step N, so no step appears twice."""
        if not self.is_main_process:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if global_step == 0:
            self.path.unlink(missing_ok=True)
        else:
            truncate_metrics(self.path, global_step)
        self._records.clear()

    def add(self, step: int, *args: Any, **kwargs: Any) -> None:
        """Buffer a micro-batch's records (arguments of :func:`completion_records`). ``step``
        is the step these samples train, the one :meth:`flush` will be called at; a new step
        replaces what an earlier, unlogged step left."""
        if not self.is_main_process:
            return
        if self._records and self._records[0]["step"] != step:
            self._records.clear()
        self._records.extend(completion_records(step, *args, **kwargs))

    def flush(self) -> list[dict[str, Any]]:
        """Write the buffered records (file, console, W&B / Trackio); returns them."""
        records, self._records = self._records, []
        if not self.is_main_process or not records:
            return records
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for record in records:
                # One write(2) per line on an O_APPEND file: a line is whole or absent.
                line = (json.dumps(record) + "\n").encode()
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
        finally:
            os.close(fd)
        columns, rows = table_rows(records)
        self.print_table(columns, rows)
        self.log_table(columns, rows)
        return records

    def print_table(self, columns: list[str], rows: list[list[Any]]) -> None:
        """The first ``num_completions_to_print`` rows (all when None) as a rich table."""
        shown = (
            rows if self.num_completions_to_print is None else rows[: self.num_completions_to_print]
        )
        if not shown:
            return
        table = Table(show_header=True, header_style="bold white", expand=True)
        for name in columns[1:]:
            numeric = name not in ("prompt", "completion", "pair")
            table.add_column(name, justify="right" if numeric else "left")
        for row in shown:
            table.add_row(
                *(
                    "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
                    for v in row[1:]
                )
            )
        self.console.print(Panel(table, title=f"Step {rows[0][0]}", expand=False))

    def log_table(self, columns: list[str], rows: list[list[Any]]) -> None:
        """``{"completions": Table}`` to W&B (when its run is active) and Trackio, as TRL does,
        when they are in ``report_to``."""
        if "wandb" in self.report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({TABLE_KEY: wandb.Table(columns=columns, data=rows)})
        if "trackio" in self.report_to:
            import pandas as pd
            import trackio

            frame = pd.DataFrame(rows, columns=columns)
            trackio.log({TABLE_KEY: trackio.Table(dataframe=frame)})


class CompletionLogStart(TrainerCallback):
    """Starts a :class:`CompletionLog` when training begins, at the step the run starts from
    (a resumed run's, known only once Trainer has loaded its state)."""

    def __init__(self, log: CompletionLog) -> None:
        self.log = log

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.log.start(state.global_step)
