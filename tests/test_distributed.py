"""Scale: two-process DDP through ``accelerate launch`` (gloo on CPU), async generation, and
``num_samples_per_prompt`` K > 2 with best-vs-worst pairing and tied pairs skipped."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from datasets import Dataset
from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback

import trainer.rollouts as rollouts_module
from tests import support
from tests.support import exited_within, process_alive, tiny_config
from trainer.callbacks import MetricsJsonlCallback, read_metrics
from trainer.checkpoint import STAGING_DIR
from trainer.cli import main as cli_main
from trainer.losses import dpo_losses
from trainer.metrics import StepRecord
from trainer.rollouts import reference_split
from trainer.trainer import OnlineDPOTrainer

ROOT = Path(__file__).resolve().parents[1]


def service_counts(url: str) -> tuple[float, float]:
    """``(/score requests answered 200, items scored)`` from the service's ``/metrics``."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    requests = re.search(
        r'^reward_requests_total\{route="/score",status="200"\} (\S+)$', text, re.M
    )
    items = re.search(r"^reward_items_scored_total (\S+)$", text, re.M)
    return (float(requests.group(1)) if requests else 0.0), float(items.group(1))


def prompts(demo_models: Any, n: int | None = None) -> Dataset:
    lines = demo_models.train_prompts.read_text().splitlines()[:n]
    return Dataset.from_dict({"prompt": [json.loads(line)["prompt"] for line in lines]})


class RecordingTrainer(OnlineDPOTrainer):
    """Records each step's prompts, rewards, pairs and loss (the test's window on a step)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.order: list[list[str]] = []
        self.steps: list[dict[str, Any]] = []

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.order.append(list(inputs["prompt"]))
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        self.steps[-1]["loss"] = loss.detach()
        return loss

    def _record_step(self, step: StepRecord) -> None:
        mask = step.rollout.completion_mask
        self.steps.append(
            {
                "rewards": step.rewards.detach().clone(),
                "pairs": step.pairs,
                # Summed here again: the test checks the loss against the log-probs.
                "seq": (step.logps.detach() * mask).sum(-1),
                "ref_seq": (step.ref_logps * mask).sum(-1),
                "beta": step.beta,
            }
        )
        super()._record_step(step)


def make_trainer(demo_models: Any, dataset: Dataset, output_dir: Path, url: str, **kw: Any) -> Any:
    """A ``RecordingTrainer`` with ``tiny_config(output_dir, url, **kw)`` that writes metrics."""
    return support.make_trainer(
        demo_models, tiny_config(output_dir, url, **kw), dataset,
        trainer_class=RecordingTrainer, callbacks=[MetricsJsonlCallback()],
    )  # fmt: skip


def train_records(output_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(output_dir / "metrics.jsonl") if "loss" in r]


# ----------------------------------------------------------------------------- DDP


def ddp_config(demo_models: Any, url: str) -> dict[str, Any]:
    """The CLI config both DDP tests start from: 4 short steps of the demo policy."""
    return {
        "model_name_or_path": str(demo_models.policy),
        "dataset_name": str(demo_models.train_prompts),
        "max_steps": 4,
        "max_new_tokens": 8,
        "learning_rate": 1e-3,
        "temperature": 1.0,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "ddp_find_unused_parameters": False,
        "seed": 0,
        "reward_url": url,
    }


def launch_two_ranks(config: Path) -> None:
    """``online-dpo train --config CONFIG`` on 2 DDP ranks through ``accelerate launch``."""
    # `--multi_gpu` selects torchrun's launcher; with use_cpu the processes join a gloo group.
    # (`--cpu --num_processes 2` without mpirun starts one process only, accelerate 1.15.)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
        "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "trainer.cli", "train", "--config", str(config),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_semantics(
    demo_models: Any, reward_service: str, tmp_path: Path
) -> None:
    """2 processes x batch 2 (``accelerate launch``, gloo) vs 1 process x batch 4: both
    finish with the same steps, logged keys and epoch (a global batch of 4 per step), loss
    ln 2 at step 1 in both, metrics and checkpoints written once, each rank scores its own
    pairs, and the staged checkpoint holds every rank's RNG state."""
    base = {**ddp_config(demo_models, reward_service), "save_strategy": "steps", "save_steps": 2}
    steps, k, global_batch = base["max_steps"], 2, 4
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp_yaml, single_yaml = tmp_path / "ddp.yaml", tmp_path / "single.yaml"
    half, full = global_batch // 2, global_batch
    for path, out, batch in ((ddp_yaml, ddp_out, half), (single_yaml, single_out, full)):
        config = {**base, "output_dir": str(out), "per_device_train_batch_size": batch}
        path.write_text(yaml.safe_dump(config))

    before = service_counts(reward_service)
    launch_two_ranks(ddp_yaml)
    after_ddp = service_counts(reward_service)
    assert cli_main(["train", "--config", str(single_yaml)]) == 0
    after_single = service_counts(reward_service)

    # Each rank sends its own /score request per step with its own K x B/2 completions.
    assert after_ddp[0] - before[0] == 2 * steps
    assert after_ddp[1] - before[1] == steps * 2 * k * (global_batch // 2)
    assert after_single[0] - after_ddp[0] == steps
    assert after_single[1] - after_ddp[1] == steps * k * global_batch

    ddp, single = train_records(ddp_out), train_records(single_out)
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == list(range(1, steps + 1))
    assert set(ddp[0]) == set(single[0])
    # Step 1: policy == reference, so every pair's loss is ln 2 and the KL is 0.
    for records in (ddp, single):
        assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert abs(records[0]["objective/kl"]) < 1e-4
        assert all(math.isfinite(r["loss"]) for r in records)
    # The same share of the data: a global batch of 4 per step in both.
    assert ddp[-1]["epoch"] == pytest.approx(single[-1]["epoch"])

    for out in (ddp_out, single_out):
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
        assert not (out / STAGING_DIR).exists()  # every staged save was renamed, staging gone
    # One checkpoint written once, holding each rank's RNG state (the resume needs both).
    names = {p.name for p in (ddp_out / "checkpoint-4").iterdir()}
    assert {"model.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth"} <= names
    assert "rng_state.pth" in {p.name for p in (single_out / "checkpoint-4").iterdir()}


@pytest.mark.slow
def test_ddp_async_ranks_sample_in_their_own_processes_and_resume_exactly(
    demo_models: Any, reward_service: str, tmp_path: Path
) -> None:
    """Async generation on 2 DDP ranks: each rank forks its own rollout process (staleness
    ``[0, 1, 1, 1]``), each checkpoint holds each rank's rollouts sampled ahead, and a run
    resumed from step 2 logs steps 3 and 4 exactly as the uninterrupted one."""
    base = {
        **ddp_config(demo_models, reward_service),
        "per_device_train_batch_size": 2,
        "async_generation": True,
    }
    full_out, resumed_out = tmp_path / "full", tmp_path / "resumed"
    full_yaml, resumed_yaml = tmp_path / "full.yaml", tmp_path / "resumed.yaml"
    full_yaml.write_text(yaml.safe_dump(
        {**base, "output_dir": str(full_out), "save_strategy": "steps", "save_steps": 2}
    ))  # fmt: skip
    resumed_yaml.write_text(yaml.safe_dump({
        **base, "output_dir": str(resumed_out), "save_strategy": "no",
        "resume_from_checkpoint": str(full_out / "checkpoint-2"),
    }))  # fmt: skip
    launch_two_ranks(full_yaml)
    names = {p.name for p in (full_out / "checkpoint-2").iterdir()}
    assert {"async_rollouts-0.pt", "async_rollouts-1.pt"} <= names
    launch_two_ranks(resumed_yaml)

    full, resumed = train_records(full_out), train_records(resumed_out)
    assert [r["async/staleness"] for r in full] == [0, 1, 1, 1]
    assert [r["step"] for r in resumed] == [3, 4]
    for again, first in zip(resumed, full[2:], strict=True):
        for key in ("loss", "grad_norm", "objective/scores", "objective/kl", "async/staleness"):
            assert again[key] == pytest.approx(first[key], rel=1e-6, abs=1e-6), key


# ----------------------------------------------------------------------------- async


@pytest.mark.parametrize(
    ("backend", "accumulation"), [("process", 1), ("thread", 1), ("process", 2)]
)
@pytest.mark.slow
@pytest.mark.integration
def test_async_generation_same_data_one_step_stale(
    demo_models: Any, reward_service: str, tmp_path: Path, backend: str, accumulation: int
) -> None:
    """Over 3 epochs, async mode trains the same batches in the same order as sync mode, each
    sampled by the weights of the step before: the next epoch's first batches are sampled
    during the epoch's last step, so only the run's first step samples its own. It scores no
    completion it does not train on."""
    dataset = prompts(demo_models, 22)  # 3 batches per epoch at batch 8, the last of 6 prompts
    steps = 3 * math.ceil(3 / accumulation)
    runs = {}
    for mode in (False, True):
        before = service_counts(reward_service)[1]
        trainer = make_trainer(
            demo_models, dataset, tmp_path / f"async-{mode}", reward_service,
            per_device_train_batch_size=8, num_train_epochs=3, async_generation=mode,
            async_generation_backend=backend, gradient_accumulation_steps=accumulation,
        )  # fmt: skip
        if mode:
            assert trainer.async_rollouts.backend == backend
        trainer.train()
        runs[mode] = (trainer, train_records(tmp_path / f"async-{mode}"))
        assert trainer.state.global_step == steps
        assert service_counts(reward_service)[1] - before == 3 * 22 * 2
    (sync, sync_records), (asy, async_records) = runs[False], runs[True]
    assert len(sync.order) == 9 and asy.order == sync.order
    epochs = [sorted(p for batch in sync.order[i : i + 3] for p in batch) for i in (0, 3, 6)]
    assert epochs[0] == epochs[1] == epochs[2] == sorted(dataset["prompt"])  # each once ...
    assert sync.order[0:3] != sync.order[3:6] != sync.order[6:9]  # ... in a new order
    assert [r["async/staleness"] for r in async_records] == [0] + [1] * (steps - 1)
    assert all("async/staleness" not in r for r in sync_records)
    # Step 1 is sampled from the same weights with the same seed: identical in both modes.
    assert torch.equal(asy.steps[0]["rewards"], sync.steps[0]["rewards"])
    assert async_records[0]["loss"] == pytest.approx(sync_records[0]["loss"], abs=1e-6)
    # Closed with the run: nothing queued, no sampling thread, no rollout process.
    queue = asy.async_rollouts
    assert not queue._pending and queue._pool is None and queue.process is None


@pytest.mark.slow
def test_async_process_backend_samples_in_another_process(
    demo_models: Any, reward_service: str, tmp_path: Path
) -> None:
    """The process backend's rollout process has its own pid, holds the reference, and its
    samples follow the published weights: two runs with the same seed are identical."""
    records = []
    for run in range(2):
        trainer = make_trainer(
            demo_models, prompts(demo_models, 16), tmp_path / f"p{run}", reward_service,
            per_device_train_batch_size=4, max_steps=4, async_generation=True,
            async_generation_backend="process",
        )  # fmt: skip
        pids: list[int] = []
        trainer.add_callback(RolloutPidSpy(trainer, pids))
        trainer.train()
        assert len(set(pids)) == 1 and pids[0] != os.getpid()
        assert not process_alive(pids[0])  # the process ends with the run
        records.append([{k: r[k] for k in ("loss", "objective/scores")} for r in train_records(
            tmp_path / f"p{run}")])  # fmt: skip
    assert records[0] == records[1]


class ProbedPolicy(LlamaForCausalLM):
    """A policy whose ``generate`` first notes its process and intra-op threads in ``probe``
    (a file: the rollout process is another process) and, for up to ``watch`` s, waits for
    its weights to change (fault injection: sampling slow enough for an optimizer step that
    is not held back to overtake it); its forward passes with autograd on (the trainer's
    policy pass) take ``train_delay`` s longer."""

    probe: Path | None = None
    watch = 0.0
    train_delay = 0.0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():  # the trainer's policy pass (sampling and reference: no)
            time.sleep(self.train_delay)
        return super().forward(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if self.probe is not None:
            with self.probe.open("a") as f:
                f.write(f"{os.getpid()} {torch.get_num_threads()}\n")
        weight = self.lm_head.weight
        first, deadline = weight[0, 0].item(), time.monotonic() + self.watch
        while time.monotonic() < deadline and weight[0, 0].item() == first:
            time.sleep(0.01)
        return super().generate(*args, **kwargs)


def probed_trainer(
    demo_models: Any, output_dir: Path, url: str, policy: dict[str, Any], **kw: Any
) -> OnlineDPOTrainer:
    """An async trainer (process backend unless ``kw`` says otherwise) on a
    :class:`ProbedPolicy` (``policy``: its class attributes)."""
    policy_class = type("Probed", (ProbedPolicy,), policy)
    kw = {"async_generation": True, "async_generation_backend": "process", **kw}
    return RecordingTrainer(
        policy_class.from_pretrained(demo_models.policy),
        args=tiny_config(output_dir, url, **{"max_steps": 4, **kw}),
        processing_class=AutoTokenizer.from_pretrained(demo_models.policy, padding_side="left"),
        train_dataset=prompts(demo_models, 16),
        callbacks=[MetricsJsonlCallback()],
    )


@pytest.mark.slow
def test_async_process_optimizer_step_waits_for_the_rollout_in_flight(
    demo_models: Any, reward_service: str, tmp_path: Path
) -> None:
    """The rollout process samples with the trainer's weights in place, so each optimizer
    step waits until the rollouts sampled with the weights it changes are done: with its
    sampling held for up to 1.5 s unless the weights change (an optimizer step not held
    back would overtake it), it trains exactly as the thread backend, which samples with a
    copy of the weights taken at the step before. (One intra-op thread everywhere: the same
    sums in the same order.)"""
    records = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for backend, watch in (("thread", 0.0), ("process", 1.5)):
            out = tmp_path / backend
            probed_trainer(
                demo_models, out, reward_service, {"watch": watch}, async_generation_backend=backend
            ).train()
            keys = ("loss", "objective/scores", "objective/kl")
            records.append([{k: r[k] for k in keys} for r in train_records(out)])
    finally:
        torch.set_num_threads(before)
    assert len(records[0]) == 4 and records[0] == records[1]


@pytest.mark.unit
def test_the_reference_split_evens_the_halves_of_the_step() -> None:
    """A step's halves: the trainer's F plus the reference pass of the prompts it keeps
    (c_t each), the rollout's G plus those it runs (c_r each), ``rollouts`` times a step.
    From any split, one full correction lands where the halves are even (clamped to 0..B),
    and rounded that is within one prompt's cost of the best whole split; a gain of 1/4 goes
    a quarter of the way."""
    b = 8
    grid = [0.05, 0.3, 1.0, 2.5]
    cases = itertools.product(grid, grid, [0.01, 0.05], [0.01, 0.04], [1, 3])
    for g, f, c_t, c_r, rollouts in cases:

        def halves(n: float) -> tuple[float, float]:
            return f + rollouts * (b - n) * c_t, g + rollouts * n * c_r  # noqa: B023

        even = min(b, max(0.0, (f + rollouts * b * c_t - g) / (rollouts * (c_t + c_r))))
        best = min(max(halves(n)) for n in range(b + 1))
        for current in (0.0, 3.0, 8.0):
            trainer, rollout = halves(current)
            split = reference_split(current, b, trainer - rollout, c_t, c_r, rollouts)
            assert split == pytest.approx(even)
            assert max(halves(round(split))) <= best + rollouts * max(c_t, c_r) + 1e-9
            damped = reference_split(current, b, trainer - rollout, c_t, c_r, rollouts, gain=0.25)
            unclamped = current + 0.25 * (trainer - rollout) / (rollouts * (c_t + c_r))
            assert damped == pytest.approx(min(b, max(0.0, unclamped)))


@pytest.mark.parametrize("pinned", [0, 2, 4], ids=["trainer", "split", "rollout"])
@pytest.mark.slow
def test_the_rollout_process_runs_the_reference_pass_with_the_trainers_numbers(
    demo_models: Any,
    reward_service: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pinned: int,
) -> None:
    """With the split pinned for the test (none, 2 or all of 4 prompts' reference pass in the
    rollout process), training gives the numbers of the thread backend, where the trainer
    runs every pass (one intra-op thread on both sides), from the first request placed after
    a measured step: the third step's."""
    monkeypatch.setattr(rollouts_module, "reference_split", lambda *args, **kwargs: pinned)
    records = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for backend in ("thread", "process"):
            out = tmp_path / backend
            make_trainer(
                demo_models, prompts(demo_models, 16), out, reward_service,
                per_device_train_batch_size=4, max_steps=4, async_generation=True,
                async_generation_backend=backend,
            ).train()  # fmt: skip
            records.append(train_records(out))
    finally:
        torch.set_num_threads(before)
    keys = ("loss", "objective/scores", "objective/kl", "logps/chosen")
    thread, process = ([{k: r[k] for k in keys} for r in run] for run in records)
    assert len(thread) == 4
    for ours, theirs in zip(process, thread, strict=True):
        assert ours == pytest.approx(theirs, rel=0, abs=1e-6)
    if pinned in (0, 4):  # the same passes over the same batches: the same bits
        assert process == thread
    placed = [r["async/reference_in_rollout"] for r in records[1]]
    assert placed == [0.0, 0.0, pinned / 4, pinned / 4]
    assert all(r["time/sampling_wait"] >= 0 for r in records[1][1:])
    assert all("async/reference_in_rollout" not in r for r in records[0])


@pytest.mark.parametrize(
    ("slowed", "start", "settled"), [("policy pass", 0.0, 1.0), ("sampling", 4.0, 0.0)]
)
@pytest.mark.slow
def test_the_reference_pass_moves_to_the_shorter_half(
    demo_models: Any, reward_service: str, tmp_path: Path, slowed: str, start: float, settled: float
) -> None:
    """With the trainer's policy pass 0.4 s slower, the reference pass of every prompt moves
    into the rollout process; with sampling 0.4 s slower, all of it (placed there to begin
    with) moves back to the trainer: from the third step on, the first placed by a measured
    step."""
    probe = {"train_delay": 0.4} if slowed == "policy pass" else {"watch": 0.4}
    trainer = probed_trainer(demo_models, tmp_path, reward_service, probe, max_steps=5)
    trainer.async_rollouts.reference_prompts = start
    trainer.train()
    placed = [r["async/reference_in_rollout"] for r in train_records(tmp_path)]
    assert placed == [start / 4] * 2 + [settled] * 3
    waits = [r["time/sampling_wait"] for r in train_records(tmp_path)]
    # The last step has no next rollout to wait for.
    assert (min(waits[:-1]) > 0.3) == (slowed == "sampling"), waits


@pytest.mark.parametrize("wanted", [None, 2])
@pytest.mark.slow
def test_the_rollout_process_samples_on_one_thread_beside_the_trainer(
    demo_models: Any, reward_service: str, tmp_path: Path, wanted: int | None
) -> None:
    """On a machine of 4 cores (torch's 4 intra-op threads), the rollout process samples on
    one thread (a thread team would wait forever: GNU OpenMP is not fork-safe) and the
    trainer keeps 3 (``async_trainer_num_threads``: as many as asked) while it runs, all 4
    after."""
    probe, seen = tmp_path / "probe", []

    class Threads(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        trainer = probed_trainer(
            demo_models, tmp_path / "t", reward_service, {"probe": probe},
            async_trainer_num_threads=wanted,
        )  # fmt: skip
        trainer.add_callback(Threads())
        trainer.train()
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
    assert seen == [wanted or 3] * 4
    calls = [tuple(map(int, line.split())) for line in probe.read_text().splitlines()]
    assert len(calls) == 4  # every rollout, the first step's too, is sampled in the process
    assert all(pid != os.getpid() and threads == 1 for pid, threads in calls), calls


@pytest.mark.slow
def test_async_process_death_is_a_clear_error(
    demo_models: Any, reward_service: str, tmp_path: Path
) -> None:
    """A rollout process killed mid-run stops training with an error that says so (no hang,
    no made-up rollout)."""
    trainer = make_trainer(
        demo_models, prompts(demo_models, 32), tmp_path / "dead", reward_service,
        per_device_train_batch_size=4, max_steps=8, async_generation=True,
        async_generation_backend="process",
    )  # fmt: skip

    class Killer(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 2:
                os.kill(trainer.async_rollouts.process.pid, signal.SIGKILL)

    trainer.add_callback(Killer())
    with pytest.raises(RuntimeError, match="rollout process exited with code -9"):
        trainer.train()
    # Step 3's rollout may have been sampled before the kill; nothing after it is trained.
    assert trainer.state.global_step in (2, 3)
    assert trainer.async_rollouts.process is None


UNGUARDED_SCRIPT = """
import sys
from transformers import AutoTokenizer, LlamaForCausalLM
from datasets import Dataset
from tests.support import tiny_config
from trainer.callbacks import MetricsJsonlCallback
from trainer.trainer import OnlineDPOTrainer


class ScriptPolicy(LlamaForCausalLM):
    # A policy class that exists only in this script.
    pass


policy, url, out = sys.argv[1:4]
trainer = OnlineDPOTrainer(
    ScriptPolicy.from_pretrained(policy),
    args=tiny_config(out, url, max_steps=3, async_generation=True,
                     async_generation_backend="process"),
    processing_class=AutoTokenizer.from_pretrained(policy, padding_side="left"),
    train_dataset=Dataset.from_dict({"prompt": ["the food was", "the film was"] * 8}),
    callbacks=[MetricsJsonlCallback()],
)
trainer.train()
print("STEPS", trainer.state.global_step)
"""


@pytest.mark.slow
def test_async_process_backend_in_a_script_without_main_guard_and_own_policy_class(
    demo_models: Any, reward_service: str, tmp_path: Path
) -> None:
    """The rollout process is forked, not spawned: it neither re-runs the training script
    nor needs to import the policy's class, so a script that trains at top level (no
    ``if __name__ == "__main__":``) with a policy class of its own works."""
    script = tmp_path / "train_unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(demo_models.policy), reward_service,
         str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STEPS 3" in proc.stdout
    assert [r["async/staleness"] for r in train_records(tmp_path / "out")] == [0, 1, 1]


KILLED_TRAINER_SCRIPT = """
import os, signal, sys
from transformers import AutoModelForCausalLM, GenerationConfig
from trainer.generation import Sampling
from trainer.rollout_process import RolloutProcess

policy = AutoModelForCausalLM.from_pretrained(sys.argv[1])
rollout = RolloutProcess(policy, Sampling(GenerationConfig(max_new_tokens=2), [2], 0))
print(rollout.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # fault injection: the trainer dies without cleaning up
"""


@pytest.mark.slow
def test_rollout_process_exits_when_the_trainer_is_killed(demo_models: Any, tmp_path: Path) -> None:
    script, out, err = (tmp_path / name for name in ("killed_trainer.py", "stdout", "stderr"))
    script.write_text(KILLED_TRAINER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    # Files, not pipes: an orphan holding a pipe's write end would keep its reader waiting.
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.run(
            [sys.executable, str(script), str(demo_models.policy)],
            env=env, stdout=stdout, stderr=stderr, timeout=120,
        )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, err.read_text()[-3000:]
    pid = int(out.read_text().split()[0])
    assert exited_within(pid, 15), "the rollout process outlived its killed trainer"


class RolloutPidSpy(TrainerCallback):
    def __init__(self, trainer: OnlineDPOTrainer, pids: list[int]) -> None:
        self.trainer, self.pids = trainer, pids

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.pids.append(self.trainer.async_rollouts.process.pid)


# ----------------------------------------------------------------------------- K samples


@pytest.mark.slow
@pytest.mark.integration
def test_k4_pairs_best_and_worst_sample(
    demo_models: Any, reward_service: str, tmp_path: Path
) -> None:
    """K=4: for every prompt the chosen sample has the highest reward of its 4 and the rejected
    one the lowest; the logged margin is their difference."""
    b, k = 4, 4
    trainer = make_trainer(
        demo_models, prompts(demo_models, 16), tmp_path / "k4", reward_service,
        per_device_train_batch_size=b, num_samples_per_prompt=k, max_steps=3,
    )  # fmt: skip
    trainer.train()
    records = train_records(tmp_path / "k4")
    for step, record in zip(trainer.steps, records, strict=True):
        per_prompt = step["rewards"].view(k, b)  # block layout: sample j of prompt i at j*B+i
        pairs = step["pairs"]
        assert torch.equal(step["rewards"][pairs.chosen], per_prompt.max(0).values)
        assert torch.equal(step["rewards"][pairs.rejected], per_prompt.min(0).values)
        columns = torch.arange(b)
        assert torch.equal(pairs.chosen % b, columns) and torch.equal(pairs.rejected % b, columns)
        margin = (per_prompt.max(0).values - per_prompt.min(0).values).mean().item()
        assert record["objective/scores_margin"] == pytest.approx(margin, abs=1e-6)


@pytest.mark.slow
@pytest.mark.integration
def test_skip_tied_pairs_leaves_ties_out_of_the_loss(
    demo_models: Any, reward_service: str, tmp_path: Path
) -> None:
    """Near-greedy sampling makes many identical (tied) pairs: ``val/tied_pairs`` logs their
    share and the loss averages the untied pairs only."""
    b = 8
    trainer = make_trainer(
        demo_models, prompts(demo_models, 32), tmp_path / "ties", reward_service,
        per_device_train_batch_size=b, temperature=0.05, skip_tied_pairs=True, max_steps=4,
    )  # fmt: skip
    trainer.train()
    records = train_records(tmp_path / "ties")
    shares = []
    for step, record in zip(trainer.steps, records, strict=True):
        rewards, pairs = step["rewards"], step["pairs"]
        tied = rewards[pairs.chosen] == rewards[pairs.rejected]
        assert torch.equal(pairs.tied, tied)
        assert record["val/tied_pairs"] == pytest.approx(tied.float().mean().item())
        shares.append(tied.float().mean().item())
        losses = dpo_losses(
            step["seq"][pairs.chosen], step["seq"][pairs.rejected],
            step["ref_seq"][pairs.chosen], step["ref_seq"][pairs.rejected],
            step["beta"], "sigmoid",
        )  # fmt: skip
        want = losses[~tied].mean() if (~tied).any() else torch.tensor(0.0)
        assert step["loss"].item() == pytest.approx(want.item(), abs=1e-6)
    # The run had both kinds, so the test shows exclusion (not an all-or-nothing batch).
    assert 0 < sum(shares) / len(shares) < 1, shares
