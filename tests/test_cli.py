import importlib
import subprocess
import sys

import pytest

from samliver import cli


def test_usage_lists_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_user_error_is_one_line(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "missing.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("samliver info: error:") and "does not exist" in err and "\n" not in err


@pytest.mark.parametrize("name", ["fetch-sample", "info", "demo"])
def test_foundation_commands_have_main(name):
    module = importlib.import_module(cli.COMMANDS[name][0])
    assert callable(module.main)


def test_console_script_fetch_sample_json():
    import json

    proc = subprocess.run([sys.executable, "-m", "samliver.cli", "fetch-sample", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["labels_present"] == [0, 1, 2]


def test_help_does_not_import_torch():
    code = "import sys; from samliver import cli; cli.main(['--help']); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().endswith("False")
