"""Trainer callbacks that write run outputs: ``metrics.jsonl`` and ``reward_curve.png``."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "reward_curve.png"


def _json_value(value: Any) -> Any:
    # NaN/inf are not JSON; write null so every line parses with any JSON reader.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order."""
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def truncate_metrics(path: Path, max_step: int) -> None:
    """Drop the records logged after ``max_step`` (they belong to steps a resumed run redoes)."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= max_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


class MetricsJsonlCallback(TrainerCallback):
    """Append one JSON object per ``Trainer.log`` call to ``OUTPUT_DIR/metrics.jsonl``.

    Keys are the logged names (TRL's ``objective/kl``, ``rewards/chosen``, ...) plus ``step``
    and ``epoch``. Only the main process writes. A fresh run starts the file over; a run resumed
    at step N keeps the records up to step N, so no step appears twice.
    """

    def __init__(self, output_dir: str | Path | None = None) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None

    def path(self, args: TrainingArguments) -> Path:
        return (self.output_dir or Path(args.output_dir)) / METRICS_FILE

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        path = self.path(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        # On resume `state` is already the checkpoint's, so global_step is the step resumed from.
        if state.global_step == 0:
            path.unlink(missing_ok=True)
        else:
            truncate_metrics(path, state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch}
        record.update({k: _json_value(v) for k, v in logs.items()})
        path = self.path(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def plot_reward_curve(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Plot ``objective/scores`` (and eval reward, if logged) over steps above ``objective/kl``;
    with several reward sources, each source's ``rewards/<name>/mean`` beside the combined."""
    records = list(read_metrics(metrics_path))

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [s for s, _ in points], [v for _, v in points]

    # Imported here: matplotlib costs ~25 MiB and 60 ms, and only the plot needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot global state, no display backend needed.
    fig = Figure(figsize=(7, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    sources = sorted(
        {k for r in records for k in r if k.startswith("rewards/") and k.endswith("/mean")}
    )
    combined = "combined " if len(sources) > 1 else ""
    top.plot(*series("objective/scores"), label=f"train {combined}reward (objective/scores)")
    if len(sources) > 1:
        for key in sources:
            top.plot(*series(key), alpha=0.7, label=f"{key.split('/')[1]} ({key})")
    eval_steps, eval_values = series("eval_reward_mean")
    if eval_steps:
        top.plot(eval_steps, eval_values, "o-", label="held-out reward (eval_reward_mean)")
    top.set_ylabel("mean reward")
    top.legend(loc="lower right")
    top.grid(alpha=0.3)
    bottom.plot(*series("objective/kl"), color="tab:red", label="KL to reference")
    bottom.set_ylabel("objective/kl (nats)")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.suptitle("Online DPO")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


class RewardCurveCallback(TrainerCallback):
    """Write ``OUTPUT_DIR/reward_curve.png`` from ``metrics.jsonl`` when training ends."""

    def __init__(self, output_dir: str | Path | None = None) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        root = self.output_dir or Path(args.output_dir)
        if (root / METRICS_FILE).exists():
            plot_reward_curve(root / METRICS_FILE, root / CURVE_FILE)
