"""Constants and helpers shared by tests: the tiny training config, one trainer builder, an
in-thread uvicorn server for apps with special settings, and process checks."""

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from datasets import Dataset
from fastapi import FastAPI
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.demo_models import DemoModels
from trainer.config import OnlineDPOConfig
from trainer.trainer import OnlineDPOTrainer

# The metric names TRL 1.16's OnlineDPOTrainer logs with a reward model (the issue's list).
TRL_METRIC_NAMES = frozenset(
    {
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "objective/scores",
        "objective/scores_margin",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "val/contain_eos_token",
        "beta",
    }
)
TIMING_NAMES = frozenset({"time/generate", "time/score_wait", "time/forward_backward"})


def tiny_config(output_dir: Path, url: str | None, **overrides: Any) -> OnlineDPOConfig:
    """A few fast CPU steps on the demo models (small batch, short completions, no saving)."""
    defaults: dict[str, Any] = {
        "output_dir": str(output_dir),
        "reward_url": url,
        "per_device_train_batch_size": 4,
        "max_new_tokens": 8,
        "temperature": 1.0,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    return OnlineDPOConfig(**{**defaults, **overrides})


def make_trainer(
    demo_models: DemoModels,
    args: OnlineDPOConfig,
    prompts: list[Any] | Dataset | None = None,
    *,
    trainer_class: type[OnlineDPOTrainer] = OnlineDPOTrainer,
    model: Any = None,
    **kwargs: Any,
) -> Any:
    """``trainer_class`` on the demo policy (or ``model``) and its tokenizer (left padding, as
    saved); ``prompts`` is a
    list, a ``Dataset`` or ``None`` for the demo's training prompts; ``kwargs`` go to the
    trainer (``callbacks``, ``ref_model``, ``eval_dataset``, ...)."""
    if prompts is None:
        lines = demo_models.train_prompts.read_text().splitlines()
        prompts = [json.loads(line)["prompt"] for line in lines]
    dataset = prompts if isinstance(prompts, Dataset) else Dataset.from_dict({"prompt": prompts})
    return trainer_class(
        model if model is not None else AutoModelForCausalLM.from_pretrained(demo_models.policy),
        args=args,
        processing_class=AutoTokenizer.from_pretrained(demo_models.policy),
        train_dataset=dataset,
        **kwargs,
    )


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """A real uvicorn server for ``app`` on a free loopback port, in a thread (for apps built
    with special settings or injected faults; the plain service is ``reward_service``).

    Yields the base URL once the socket listens (the model may still be loading)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_ready(
    url: str,
    timeout: float = 60,
    headers: dict[str, str] | None = None,
    alive: Callable[[], None] | None = None,
) -> None:
    """Poll ``GET /ready`` until 200; anything but 200 must be the ``loading`` error.
    ``alive`` (if given) runs before each poll and fails fast when the service died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None:
            alive()
        try:
            response = httpx.get(f"{url}/ready", timeout=2, headers=headers)
            if response.status_code == 200:
                return
            assert response.json()["error"]["type"] == "loading", response.text
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} not ready after {timeout} s")


def process_alive(pid: int) -> bool:
    """Is ``pid`` a live (not zombie) process?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def exited_within(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` (an orphan) to exit; SIGKILL it if it does not, so
    a failing test leaves nothing running."""
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)
        return False
    return True
