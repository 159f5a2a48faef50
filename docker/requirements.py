"""Print the requirements of the project with some extras, one per line, from pyproject.toml.

    python requirements.py pyproject.toml service        # base + [service]
    python requirements.py pyproject.toml trainer,peft   # base + [trainer] + [peft]

The Dockerfile installs them in a layer of their own, before the sources are copied, so that
layer is reused while only the sources change; docker/build-test-base.sh pins them. Extras that
name the project itself (``all = ["online-dpo-service[service,trainer,peft]"]``) are expanded.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Iterable
from typing import Any

_SELF = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*\[([^\]]*)\]\s*$")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(project: dict[str, Any], extras: Iterable[str]) -> list[str]:
    """Base dependencies plus those of ``extras`` (in order, without duplicates); raises
    ``ValueError`` naming an extra the project does not define."""
    name = _normalize(project["name"])
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen: set[str] = set()

    def add(requirement: str) -> None:
        self_ref = _SELF.match(requirement)
        if self_ref and _normalize(self_ref.group(1)) == name:
            for extra in self_ref.group(2).split(","):
                add_extra(extra.strip())
        elif requirement not in out:
            out.append(requirement)

    def add_extra(extra: str) -> None:
        if extra in seen:
            return
        if extra not in optional:
            raise ValueError(f"unknown extra {extra!r}; the project has {sorted(optional)}")
        seen.add(extra)
        for requirement in optional[extra]:
            add(requirement)

    for requirement in project.get("dependencies", []):
        add(requirement)
    for extra in extras:
        add_extra(extra)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: requirements.py PYPROJECT EXTRA[,EXTRA...]", file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        project = tomllib.load(f)["project"]
    extras = [e.strip() for e in argv[1].split(",") if e.strip()]
    try:
        print("\n".join(requirements(project, extras)))
    except ValueError as e:
        print(f"requirements.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
