"""``reward-service`` CLI (also ``python -m reward_service``): settings as flags, then uvicorn."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp

from reward_service.settings import ServiceSettings

if TYPE_CHECKING:
    from reward_service.state import ServiceState

_PATH_PREFIXES = ("/", "./", "../", "~")
logger = logging.getLogger("reward_service")


class _Server(uvicorn.Server):
    """uvicorn, plus: /ready turns 503 on SIGTERM, a failed model load or an exited model
    process stops the server (exit code 1), and with ``parent_pid`` the service stops when its
    parent is gone."""

    def __init__(
        self, config: uvicorn.Config, state: ServiceState, parent_pid: int | None = None
    ) -> None:
        super().__init__(config)
        self.state = state
        self.parent_pid = parent_pid
        self.failed = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.draining = True
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if not self.should_exit and (failure := self.state.failure()) is not None:
            logger.error("%s; shutting down", failure.message)
            self.failed = self.should_exit = True
        # uvicorn ticks every 0.1 s. A dead parent's children are re-parented (to init or a
        # subreaper), so a changed parent pid is how a SIGKILL of the parent shows here.
        if self.parent_pid is not None and not self.should_exit:
            parent = os.getppid()
            if parent != self.parent_pid:
                logger.warning(
                    "parent process %d is gone (parent now %d); shutting down",
                    self.parent_pid,
                    parent,
                )
                self.state.draining = True
                self.should_exit = True
        return await super().on_tick(counter)


def parse_settings(argv: list[str]) -> ServiceSettings:
    """Flags override ``REWARD_*`` environment variables; exits 2 naming a bad value."""
    try:
        settings = CliApp.run(ServiceSettings, cli_args=argv)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            if not err["loc"]:  # a rule across several settings
                print(f"reward-service: error: {err['msg']}", file=sys.stderr)
                continue
            name = str(err["loc"][0])
            where = f"--{name.replace('_', '-')} / REWARD_{name.upper()}"
            field = ServiceSettings.model_fields.get(name)
            secret = field is not None and "SecretStr" in str(field.annotation)
            echo = err["type"] != "missing" and not secret  # a key is never printed
            got = f" (got {err['input']!r})" if echo else ""
            print(f"reward-service: error: {where}: {err['msg']}{got}", file=sys.stderr)
        raise SystemExit(2) from None
    model = settings.model
    if model.startswith(_PATH_PREFIXES) and not Path(model).expanduser().is_dir():
        print(f"reward-service: error: --model: no such directory: {model!r}", file=sys.stderr)
        raise SystemExit(2)
    return settings


def main(argv: list[str] | None = None) -> int:
    """Run the service until SIGTERM/SIGINT; in-flight requests finish first."""
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    # After parsing: flag errors come without torch.
    from reward_service.app import create_app
    from reward_service.loading import remote_code_refusal

    if (refusal := remote_code_refusal(settings)) is not None:  # say so before serving
        print(f"reward-service: error: {refusal}", file=sys.stderr)
        raise SystemExit(2)

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.drain_timeout_s,
        # Longer than clients' pool idle expiry (httpx: 5 s), so a client never reuses a
        # connection the server is closing at that moment (a ReadError under load).
        timeout_keep_alive=75,
        lifespan="on",
    )
    state: ServiceState = app.state.service
    server = _Server(config, state, settings.parent_pid)
    server.run()
    return 1 if server.failed else 0


if __name__ == "__main__":
    sys.exit(main())
