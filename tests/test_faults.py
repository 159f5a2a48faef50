"""Faults during training: the reward service killed and restarted, a replica killed, the
trainer killed, a crash in the middle of a checkpoint save.

Every run here uses the same small configuration and seed, so sampling, scoring and updates
are deterministic: a run that survives a fault must reproduce the uninterrupted run's data order
and metrics, step by step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_utils import get_last_checkpoint

from tests.support import tiny_config
from trainer.callbacks import MetricsJsonlCallback, read_metrics
from trainer.checkpoint import STAGING_DIR
from trainer.config import OnlineDPOConfig
from trainer.service_process import ServiceProcess
from trainer.trainer import OnlineDPOTrainer

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 6
SAVE_STEPS = 2
# Metrics that must match an uninterrupted run (loss to ~1e-5, as float32 on another path).
COMPARED = ("loss", "objective/scores", "objective/kl", "rewards/margins", "grad_norm")


def run_config(output_dir: Path, url: str, **overrides: Any) -> OnlineDPOConfig:
    # Enough retries for a service restart on a loaded 2-core machine (the default 12 is ~80 s).
    return tiny_config(
        output_dir, url, **{"max_steps": MAX_STEPS, "reward_max_retries": 30, **overrides}
    )


class RecordingTrainer(OnlineDPOTrainer):
    """Records ``(step, prompts)`` of every training step in ``order``."""

    order: list[tuple[int, list[str]]]

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any) -> Any:
        self.order.append((self.state.global_step + 1, list(inputs["prompt"])))
        return super().training_step(model, inputs, *args)


class StepCounter(TrainerCallback):
    """Counts optimizer steps as they happen (``on_step_end`` runs once per update)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps.append(state.global_step)


def make_trainer(models_root: Path, args: Any, callbacks: list[Any] | None = None) -> Any:
    """The trainer of these tests; it records the prompts of every step in ``trainer.order``."""
    prompts = [json.loads(line)["prompt"] for line in (models_root / "data" / "train_prompts.jsonl")
               .read_text().splitlines()]  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(models_root / "policy", padding_side="left")
    trainer = RecordingTrainer(
        AutoModelForCausalLM.from_pretrained(models_root / "policy"),
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        callbacks=[MetricsJsonlCallback(), StepCounter(), *(callbacks or [])],
    )
    trainer.order = []
    return trainer


def counted_steps(trainer: Any) -> list[int]:
    (counter,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, StepCounter)]
    return counter.steps


def train_metrics(output_dir: Path) -> dict[int, dict[str, Any]]:
    records = [r for r in read_metrics(output_dir / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r for r in records}


def assert_same_metrics(got: dict[int, dict], want: dict[int, dict], steps: range) -> None:
    for step in steps:
        for key in COMPARED:
            assert got[step][key] == pytest.approx(want[step][key], abs=1e-5, rel=1e-4), (
                step,
                key,
            )


def events(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def items_scored(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return float(re.search(r"^reward_items_scored_total (\S+)$", text, re.M).group(1))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared_service(demo_models: Any) -> Any:
    """The module's reward service; the kill test kills and restarts it on the same port."""
    service = ServiceProcess(demo_models.reward)
    service.start()
    yield service
    service.stop()
    service.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def service(shared_service: ServiceProcess) -> str:
    return shared_service.url


@pytest.fixture(scope="module")
def reference(demo_models: Any, service: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The uninterrupted run: its data order and metrics."""
    out = tmp_path_factory.mktemp("reference")
    trainer = make_trainer(demo_models.root, run_config(out, service))
    trainer.train()
    assert trainer.state.global_step == MAX_STEPS
    return trainer.order, train_metrics(out)


# ----------------------------------------------------------------------------- reward faults


@pytest.mark.slow
def test_reward_service_killed_and_restarted(
    demo_models: Any, shared_service: ServiceProcess, reference: Any, tmp_path: Path
) -> None:
    """kill -9 the only reward service after step 2, restart it on the same port 10 s later:
    the trainer waits and retries, then finishes exactly as the uninterrupted run."""
    service = shared_service
    timeline: dict[str, float] = {}
    restarter = threading.Thread(target=lambda: restart_later(), daemon=True)

    def restart_later() -> None:
        time.sleep(10)
        timeline["restart"] = time.monotonic()
        service.start()  # same port, so the trainer's URL stays valid
        timeline["ready"] = time.monotonic()

    class KillService(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                service.process.send_signal(signal.SIGKILL)
                service.process.wait()
                timeline["kill"] = time.monotonic()
                restarter.start()

    out = tmp_path / "run"
    try:
        trainer = make_trainer(demo_models.root, run_config(out, service.url), [KillService()])
        trainer.train()
        finished = time.monotonic()
    finally:
        if restarter.is_alive():
            restarter.join()
        if service.process.poll() is not None:  # leave a live service to the other tests
            service.start()

    order, metrics = reference
    assert trainer.state.global_step == MAX_STEPS
    assert counted_steps(trainer) == list(range(1, MAX_STEPS + 1))  # none lost, none repeated
    assert trainer.order == order
    assert_same_metrics(train_metrics(out), metrics, range(1, MAX_STEPS + 1))
    # It did wait for the restart, retrying on connection errors meanwhile.
    assert finished > timeline["ready"] > timeline["kill"] + 10
    retries = [e for e in events(out) if e["event"] == "reward_retry"]
    assert retries and all(e["step"] == 2 for e in retries)
    assert "connect_error" in {e["reason"] for e in retries}


@pytest.mark.slow
def test_one_of_two_replicas_killed(
    demo_models: Any, service: str, reference: Any, tmp_path: Path
) -> None:
    """Two replicas; kill -9 one after step 3: the run finishes on the other, unchanged."""
    doomed = ServiceProcess(demo_models.reward, log_path=tmp_path / "doomed.log")
    doomed.start()
    before: dict[str, float] = {}

    class KillReplica(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:
                before["doomed"] = items_scored(doomed.url)
                before["survivor"] = items_scored(service)
                doomed.process.send_signal(signal.SIGKILL)
                doomed.process.wait()

    out = tmp_path / "run"
    try:
        urls = f"{doomed.url},{service}"
        trainer = make_trainer(demo_models.root, run_config(out, urls), [KillReplica()])
        trainer.train()
    finally:
        doomed.stop()

    order, metrics = reference
    assert trainer.state.global_step == MAX_STEPS
    assert counted_steps(trainer) == list(range(1, MAX_STEPS + 1))
    assert trainer.order == order
    assert_same_metrics(train_metrics(out), metrics, range(1, MAX_STEPS + 1))
    assert before["doomed"] > 0  # both replicas served before the kill
    k, b = 2, 4
    # Steps 4..8 were all scored by the survivor.
    assert items_scored(service) - before["survivor"] >= (MAX_STEPS - 3) * k * b


# ----------------------------------------------------------------------------- trainer faults


def _worker(args_json: str) -> None:
    """Subprocess entry: train like :func:`make_trainer`; with ``block_at``, stop after that
    step (a marker file says so) and wait to be killed."""
    spec = json.loads(args_json)
    out, block_at, marker = Path(spec["output_dir"]), spec["block_at"], Path(spec["marker"])

    class BlockAt(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == block_at:
                marker.write_text(str(state.global_step))
                time.sleep(600)

    config = run_config(out, spec["url"], save_strategy="steps", save_steps=SAVE_STEPS)
    make_trainer(Path(spec["models_root"]), config, [BlockAt()]).train()


@pytest.mark.slow
def test_trainer_killed_then_resumed(
    demo_models: Any, service: str, reference: Any, tmp_path: Path
) -> None:
    """SIGKILL the trainer process after step 5 (updated, not saved; checkpoints 2 and 4
    exist), resume from the newest checkpoint: the resumed run's metrics (step 5 redone, then
    6) equal the uninterrupted run's."""
    out, marker = tmp_path / "run", tmp_path / "blocked"
    spec = {
        "output_dir": str(out),
        "url": service,
        "models_root": str(demo_models.root),
        "block_at": 5,
        "marker": str(marker),
    }
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_faults; "
    code += f"test_faults._worker({json.dumps(spec)!r})"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the trainer subprocess never reached step 5"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    trainer = make_trainer(demo_models.root, run_config(out, service, save_strategy="no"))
    trainer.train(resume_from_checkpoint=True)

    order, metrics = reference
    assert trainer.state.global_step == MAX_STEPS
    assert counted_steps(trainer) == list(range(5, MAX_STEPS + 1))
    assert trainer.order == order[4:]
    # Steps 1..4 come from the killed process, 5..6 from the resumed one (step 5 redone).
    assert_same_metrics(train_metrics(out), metrics, range(1, MAX_STEPS + 1))


def test_crash_mid_save_keeps_previous_checkpoint(
    demo_models: Any, service: str, reference: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """A crash after the weights of checkpoint 4 are written but before its optimizer state:
    no ``checkpoint-4`` appears, resuming picks ``checkpoint-2`` and reproduces the run."""
    save_optimizer = Trainer._save_optimizer_and_scheduler

    def crash_at_step_4(self: Any, output_dir: str) -> None:
        if self.state.global_step == 4:
            raise OSError("injected: disk vanished mid-save")
        save_optimizer(self, output_dir)

    out = tmp_path / "run"
    config = run_config(out, service, save_strategy="steps", save_steps=SAVE_STEPS)
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", crash_at_step_4)
    with pytest.raises(OSError, match="injected"):
        make_trainer(demo_models.root, config).train()
    monkeypatch.undo()

    half = out / STAGING_DIR / "checkpoint-4"
    assert (half / "model.safetensors").exists() and not (half / "optimizer.pt").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    complete = {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"}
    assert complete <= {p.name for p in (out / "checkpoint-2").iterdir()}

    trainer = make_trainer(demo_models.root, config)
    trainer.train(resume_from_checkpoint=True)
    order, metrics = reference
    assert trainer.state.global_step == MAX_STEPS
    assert counted_steps(trainer) == list(range(3, MAX_STEPS + 1))
    assert trainer.order == order[2:]
    assert_same_metrics(train_metrics(out), metrics, range(1, MAX_STEPS + 1))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        f"checkpoint-{s}" for s in range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS)
    ]
    assert not (out / STAGING_DIR).exists()  # cleared by the next save
