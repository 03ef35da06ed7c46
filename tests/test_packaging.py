"""The set-up files agree with each other: README commands, CI, conda mirror of pip deps."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].strip().lower() for r in requirements if r.strip()}


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted |= _names(extra)
    env_lines = (ROOT / "environment.yml").read_text().splitlines()
    pip_entries = [line.strip()[2:] for line in env_lines if line.strip().startswith("- ") and not line.strip().startswith("- -e")]
    missing = wanted - _names(pip_entries)
    assert not missing, f"environment.yml lacks {sorted(missing)}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_cli_commands_point_at_modules_with_main():
    from samliver.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        path = ROOT / (module.replace(".", "/") + ".py")
        assert path.exists(), f"command {name} -> missing {path}"
        assert re.search(r"^def main\(", path.read_text(), re.M), f"{path} has no main()"


def test_public_api_resolves_every_name_lazily():
    """``import samliver as sl`` gives the notebook names; importing it does not load torch."""
    import subprocess
    import sys

    import samliver as sl

    for name in sl.__all__:
        assert getattr(sl, name) is not None, name
    assert sl.get_model.__module__ == "samliver.models" and isinstance(sl.build_head("linear"), sl.Head)
    with pytest.raises(AttributeError):
        sl.not_a_name  # noqa: B018
    code = "import sys, samliver; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
