"""`docker compose` end to end: build the images (docker/build-test-base.sh), `up` the demo,
score over the published port, redeploy `reward` with the second model while the trainer runs,
then train against two replicas; `down -v` at the end.

Needs a Docker engine (started here as `dockerd` when installed but not running), a compose
client (`docker compose` or `docker-compose` 1.29+) and mmdebstrap; skipped with the reason
otherwise. The `models` volume is seeded from the demo models the suite already built. Measured
on 2 cores with the base image cached by its tag: 2 min 10 s (quiet), 6 min 47 s (load average
~5); the base image's first build adds ~5 min.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.demo_models import DemoModels, builder_key
from tests.support import wait_ready
from trainer.service_process import free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
# Only `reward2` and the trainer runs against it get a key: `reward` runs on the defaults.
API_KEY = "docker-test-key"
# Long enough that the redeploy (after step 2) happens mid-run on a fast machine.
MAX_STEPS = 80
# Within the first epoch (92 prompts, 16 a step): every step scores 16 x 2 completions.
SCALE_STEPS = 5


def _run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _docker_up() -> bool:
    try:
        return _run(["docker", "info"], timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    """A reachable Docker engine; starts `dockerd` for the session when it is installed."""
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI (apt-get install docker.io docker-compose mmdebstrap)")
    if _docker_up():
        yield
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        pytest.skip("Docker engine not running, and dockerd cannot be started (not installed/root)")
    log = open(Path(tempfile.gettempdir()) / "online-dpo-test-dockerd.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while not _docker_up():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.close()
            pytest.skip(f"dockerd did not start (log: {log.name})")
        time.sleep(1)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _compose_command() -> list[str]:
    if _run(["docker", "compose", "version"], timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("no compose client (`docker compose` plugin or docker-compose 1.29+)")


@dataclass
class Stack:
    """One compose project of the repo's docker-compose.yml, isolated by name and env file."""

    compose: list[str]
    project: str
    env_file: Path
    url: str
    url2: str

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            *self.compose, "--project-name", self.project, "--env-file", str(self.env_file),
            "--profile", "scale", *args,
        ]  # fmt: skip
        result = _run(cmd, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
        assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
        return result

    def container(self, service: str) -> str:
        ids = self("ps", "-a", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]


def _items_scored(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "reward_items_scored":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError(f"no reward_items_scored in {url}/metrics")


def _info(url: str) -> dict:
    response = httpx.get(f"{url}/info", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    response.raise_for_status()
    return response.json()


def _wait_exit(container: str, timeout: float) -> int:
    result = _run(["docker", "wait", container], timeout=timeout)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


def _copy_out(container: str, path: str) -> dict[str, bytes]:
    """Files under ``path`` (a volume) of a container, even a stopped one: name -> bytes."""
    result = subprocess.run(
        ["docker", "cp", f"{container}:{path}", "-"], capture_output=True, timeout=120
    )
    assert result.returncode == 0, result.stderr.decode()
    files = {}
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                files[member.name] = tar.extractfile(member).read()
    return files


def _seed_models_volume(project: str, image: str, demo: DemoModels) -> None:
    """Fill the project's `models` volume with the demo models this machine already built.

    The `models` service then finds its BUILD_KEY and exits at once: building them again in
    the container (the path a user's first `up` takes, same code) would add minutes of CI time.
    """
    volume = f"{project}_models"
    labels = [f"com.docker.compose.project={project}", "com.docker.compose.volume=models"]
    create = ["docker", "volume", "create", *(f"--label={x}" for x in labels), volume]
    assert _run(create, timeout=60).returncode == 0
    # Root in the container: the host cache may be private to root; the service runs as uid 1000.
    script = (
        f"cp -r /src/. /models/ && echo {builder_key()} >/models/BUILD_KEY && chown -R 1000 /models"
    )
    cmd = [
        "docker", "run", "--rm", "--user", "0", "--entrypoint", "sh",
        "-v", f"{volume}:/models", "-v", f"{demo.root}:/src:ro", image, "-c", script,
    ]  # fmt: skip
    seed = _run(cmd, timeout=120)
    assert seed.returncode == 0, seed.stderr


@pytest.fixture(scope="module")
def stack(
    docker_engine: None, demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Images built, `compose up -d` done (so `reward` is healthy and `trainer` started)."""
    compose = _compose_command()
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap not installed (needed for the local base image without Docker Hub)")
    # This interpreter's installed versions pin the base image's packages (and its cache key).
    build = _run(
        [str(ROOT / "docker" / "build-test-base.sh")],
        timeout=1200,
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert build.returncode == 0, f"build-test-base.sh failed:\n{build.stderr[-5000:]}"
    image = build.stdout.strip().splitlines()[-1].removeprefix("IMAGE=")
    port, port2 = free_port(), free_port()
    env_file = tmp_path_factory.mktemp("compose") / "test.env"
    env_file.write_text(
        f"IMAGE={image}\n"
        f"REWARD_HOST_PORT={port}\n"
        f"REWARD2_HOST_PORT={port2}\n"
        f"TRAINER_ARGS=--max_steps {MAX_STEPS} --eval_strategy no --save_steps {MAX_STEPS // 2}\n"
    )
    s = Stack(
        compose, f"odpotest{os.getpid()}", env_file,
        f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port2}",
    )  # fmt: skip
    try:
        _seed_models_volume(s.project, image, demo_models)
        # `reward2` is in the `scale` profile: start the default services only.
        s("up", "-d", "--no-build", "models", "reward", "trainer", timeout=900)
        yield s
    finally:
        s("down", "-v", "--remove-orphans", timeout=300)


def test_score_on_published_port(stack: Stack) -> None:
    wait_ready(stack.url, timeout=60)
    body = {
        "items": [
            {"text": "The film was wonderful , great and lovely ."},
            {"prompt": "The film was", "completion": " awful , boring and bad ."},
        ]
    }
    # No REWARD_API_KEY configured: open access (compose passes it as "", which means none).
    response = httpx.post(f"{stack.url}/score", json=body, timeout=30)
    assert response.status_code == 200, response.text
    scored = response.json()
    positive, negative = scored["scores"]
    assert positive > negative
    assert scored["model_id"] == "/models/reward"
    assert scored["weights_hash"] == _info(stack.url)["weights_hash"]


def test_trainer_survives_redeploy_with_other_reward_model(stack: Stack) -> None:
    wait_ready(stack.url, timeout=60)
    trainer = stack.container("trainer")
    old_hash = _info(stack.url)["weights_hash"]
    # Redeploy once the trainer has scored two steps (16 prompts x 2 samples per step).
    deadline = time.monotonic() + 300
    while _items_scored(stack.url) < 2 * 32:
        assert time.monotonic() < deadline, "the trainer scored nothing for 300 s"
        assert _run(["docker", "inspect", "-f", "{{.State.Running}}", trainer]).stdout.strip() == (
            "true"
        ), _run(["docker", "logs", trainer]).stderr[-3000:]
        time.sleep(0.5)

    stack("up", "-d", "--no-build", "reward", env={"REWARD_MODEL": "/models/reward_alt"})
    wait_ready(stack.url, timeout=120)
    info = _info(stack.url)
    assert info["model_id"] == "/models/reward_alt"
    assert info["weights_hash"] != old_hash

    exit_code = _wait_exit(trainer, timeout=600)
    logs = _run(["docker", "logs", trainer])
    log_text = logs.stdout + logs.stderr
    assert exit_code == 0, log_text[-5000:]
    # The client's warning in the container log, the event in OUTPUT_DIR/events.jsonl.
    changed = [line for line in log_text.splitlines() if "reward model changed" in line]
    assert any(info["weights_hash"] in line for line in changed), log_text[-5000:]
    assert _items_scored(stack.url) > 0, "the redeployed service scored nothing"

    outputs = _copy_out(trainer, "/outputs/demo")
    assert "demo/events.jsonl" in outputs, "no reward events: was the run over before the redeploy?"
    events = [json.loads(line) for line in outputs["demo/events.jsonl"].decode().splitlines()]
    changes = [e for e in events if e["event"] == "reward_model_changed"]
    assert [(e["old_hash"], e["new_hash"]) for e in changes] == [
        (old_hash, info["weights_hash"])
    ], events
    assert 0 < changes[0]["step"] < MAX_STEPS, "the change came after the last step"
    # The trainer rode out the outage by retrying, at the step where the model changed.
    retries = [e for e in events if e["event"] == "reward_retry"]
    assert any(e["step"] == changes[0]["step"] for e in retries), events
    steps = [json.loads(line) for line in outputs["demo/metrics.jsonl"].decode().splitlines()]
    assert max(row["step"] for row in steps) == MAX_STEPS
    logged_changes = [row["reward/model_changes"] for row in steps if "reward/model_changes" in row]
    assert logged_changes[0] == 0 and logged_changes[-1] == 1, logged_changes
    assert outputs["demo/reward_curve.png"].startswith(b"\x89PNG")
    assert f"demo/checkpoint-{MAX_STEPS // 2}/trainer_state.json" in outputs
    assert "demo/model.safetensors" in outputs


def test_trainer_uses_two_replicas(stack: Stack) -> None:
    # Both replicas serve the model `reward` was redeployed with (replicas must agree); the
    # new one with an API key, which the trainer gets through compose (REWARD_API_KEY).
    alt = {"REWARD_MODEL": "/models/reward_alt", "REWARD_API_KEY": API_KEY}
    stack("up", "-d", "--no-build", "reward2", env=alt)
    wait_ready(stack.url2, timeout=120)
    denied = httpx.post(f"{stack.url2}/score", json={"items": [{"text": "good ."}]}, timeout=30)
    assert denied.status_code == 401
    assert denied.json()["error"]["type"] == "unauthorized"
    assert _info(stack.url2)["weights_hash"] == _info(stack.url)["weights_hash"]
    before = _items_scored(stack.url), _items_scored(stack.url2)
    args = f"--max_steps {SCALE_STEPS} --eval_strategy no --save_strategy no"
    stack(
        "run", "--rm", "--no-deps", "-T",
        "-e", "REWARD_URLS=http://reward:8000,http://reward2:8000",
        "-e", f"TRAINER_ARGS={args} --output_dir /outputs/scale",
        "trainer",
        env=alt,
        timeout=600,
    )  # fmt: skip
    after = _items_scored(stack.url), _items_scored(stack.url2)
    assert after[0] > before[0] and after[1] > before[1], (before, after)
    assert sum(after) - sum(before) == SCALE_STEPS * 32
