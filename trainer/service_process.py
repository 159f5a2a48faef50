"""Run the reward service as a real subprocess on a free loopback port (demo, tests, bench)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServiceProcess:
    """A ``python -m reward_service`` child process; its output goes to ``log_path``. It
    shuts down by itself if this process dies without stopping it (``--parent-pid``)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.model_path = Path(model_path)
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.owns_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="reward-service-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.args = [
            sys.executable, "-m", "reward_service",
            "--model", str(self.model_path), "--host", HOST, "--port", str(self.port),
            *extra_args,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 90.0) -> str:
        """Start the process and wait until ``GET /ready`` answers 200; return the base URL."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.args, "--parent-pid", str(os.getpid())],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"reward service exited with code {self.process.returncode} before it was "
                    f"ready; its log ({self.log_path}) ends with:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/ready", timeout=1.0).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(
            f"reward service not ready after {ready_timeout:.0f} s; its log ends with:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (the service drains in-flight requests), then SIGKILL after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@contextmanager
def running_service(
    model_path: str | Path,
    *,
    port: int | None = None,
    log_path: str | Path | None = None,
    ready_timeout: float = 90.0,
    **env: str,
) -> Iterator[str]:
    """Start the reward service for ``model_path``; yield its base URL; stop it on exit.

    Keyword arguments other than the named ones are extra environment variables for the
    service (its settings, e.g. ``REWARD_MAX_BATCH_SIZE="8"``).
    """
    service = ServiceProcess(model_path, port=port, env=env, log_path=log_path)
    try:
        yield service.start(ready_timeout)
    except BaseException:
        # Keep the service log of a failed run for diagnosis.
        service.stop()
        raise
    service.stop()
    if service.owns_log:
        service.log_path.unlink(missing_ok=True)
