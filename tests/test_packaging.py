"""The set-up files agree with each other: README commands, CI, conda mirror of pip deps."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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
