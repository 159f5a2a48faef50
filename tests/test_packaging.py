"""Packaging: the client installs and imports alone; extras are complete and named on failure.

The light install itself (``pip install .`` into an empty venv: httpx + pydantic only, then the
imports below, and ``reward-service`` naming the missing extra) was checked by hand; these tests
cover what can be checked inside the test environment.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common.extras import missing_requirements, run_main

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("requirements", ROOT / "docker" / "requirements.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
requirements = _module.requirements  # what the Dockerfile installs per EXTRAS

HEAVY = ("torch", "transformers", "datasets")


def test_client_and_reward_function_import_without_torch() -> None:
    """A fresh interpreter imports the client and the reward function without torch,
    transformers or datasets (nor anything that imports them)."""
    code = (
        "import sys, json\n"
        "from common.client import AsyncRewardClient, RewardClient\n"
        "from common.reward_function import RewardServiceFunction\n"
        "RewardServiceFunction('http://127.0.0.1:8000')\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_the_trainer_imports_matplotlib_only_to_plot() -> None:
    """matplotlib (~25 MiB of every trainer's memory) is imported by the reward-curve plot
    alone, not by importing the trainer."""
    code = "import sys\nimport trainer.trainer\nprint('matplotlib' in sys.modules)\n"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_extras_of_the_project() -> None:
    """Base: httpx + pydantic. The service image gets no trainer stack, the trainer image no
    web server; ``all`` is their union (plus peft), ``test`` includes ``all`` and trl 1.16."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]

    def names(extras: list[str]) -> set[str]:
        return {r.split("[")[0].split(">")[0].split("=")[0] for r in requirements(project, extras)}

    assert names([]) == {"httpx", "pydantic"}
    service, trainer = names(["service"]), names(["trainer"])
    assert {"torch", "transformers", "fastapi", "uvicorn"} <= service
    assert "accelerate" in service  # --device-map auto
    assert not {"datasets", "matplotlib", "pyyaml"} & service
    assert {"torch", "transformers", "datasets", "accelerate"} <= trainer
    assert not {"fastapi", "uvicorn", "prometheus-client"} & trainer
    assert names(["all"]) == service | trainer | {"peft"}
    assert names(["all"]) <= names(["test"])
    assert "trl==1.16.0" in requirements(project, ["test"])
    with pytest.raises(ValueError, match="unknown extra 'srv'"):
        requirements(project, ["srv"])


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An installed distribution ``fake-odpo`` whose [service] extra lacks one package, and a
    console-script module that imports it."""
    info = tmp_path / "fake_odpo-1.0.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-odpo\nVersion: 1.0\n"
        "Provides-Extra: service\nProvides-Extra: all\n"
        "Requires-Dist: httpx>=0.27\n"
        'Requires-Dist: pydantic>=2.7; extra == "service"\n'
        'Requires-Dist: not-installed-odpo-pkg>=1; extra == "service"\n'
        'Requires-Dist: fake-odpo[service]; extra == "all"\n'
    )
    tmp_path.joinpath("fake_odpo_cli.py").write_text(
        "import not_installed_odpo_pkg\n\ndef main():\n    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fake-odpo"


def test_console_script_names_the_missing_extra(
    fake_dist: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert missing_requirements("service", fake_dist) == ["not-installed-odpo-pkg"]
    assert missing_requirements("all", fake_dist) == []  # its own extras are not packages
    assert run_main("fake-cli", "service", "fake_odpo_cli", fake_dist) == 1
    assert capsys.readouterr().err == (
        "fake-cli: error: not_installed_odpo_pkg is not installed: fake-cli needs the 'service' "
        "extra (missing: not-installed-odpo-pkg); pip install 'fake-odpo[service]'\n"
    )
    # Nothing of the extra missing by its metadata: the real error is not hidden.
    with pytest.raises(ModuleNotFoundError, match="not_installed_odpo_pkg"):
        run_main("fake-cli", "all", "fake_odpo_cli", fake_dist)
