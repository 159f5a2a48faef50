"""Console scripts that name the missing extra instead of failing with an import traceback.

``pip install online-dpo-service`` installs the client only (httpx + pydantic), yet pip installs
every console script; ``reward-service`` needs the ``[service]`` extra and ``online-dpo`` the
``[trainer]`` extra. When one fails on a missing module and the installed metadata confirms
that the extra is incomplete, it says so in one line and exits 1.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys

DISTRIBUTION = "online-dpo-service"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_requirements(extra: str, distribution: str = DISTRIBUTION) -> list[str]:
    """Distributions that ``distribution[extra]`` requires directly and that are not
    installed; empty when this package's metadata is not installed (a bare source tree)."""
    try:
        requirements = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    missing = []
    for requirement in requirements:
        spec, _, markers = requirement.partition(";")
        match = _NAME.match(spec.strip())
        if match is None or not marker.search(markers):
            continue
        name = match.group(0)
        if _normalize(name) == _normalize(distribution):
            continue  # an extra that includes other extras of this project
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def run_main(prog: str, extra: str, module: str, distribution: str = DISTRIBUTION) -> int:
    """``module.main()``; a missing module while ``distribution[extra]`` is incomplete
    becomes one line on stderr and exit status 1."""
    try:
        return importlib.import_module(module).main()
    except ModuleNotFoundError as exc:
        missing = missing_requirements(extra, distribution)
        if not missing:
            raise
        print(
            f"{prog}: error: {exc.name} is not installed: {prog} needs the '{extra}' extra "
            f"(missing: {', '.join(missing)}); pip install '{distribution}[{extra}]'",
            file=sys.stderr,
        )
        return 1


def reward_service() -> int:
    """The ``reward-service`` console script."""
    return run_main("reward-service", "service", "reward_service.__main__")


def online_dpo() -> int:
    """The ``online-dpo`` console script."""
    return run_main("online-dpo", "trainer", "trainer.cli")
