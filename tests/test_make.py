"""The Makefile that CI and the README use: .venv follows the interpreter that PYTHON names."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def check_venv(directory: Path, python: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "check-venv", f"PYTHON={python}"], cwd=directory,
                          capture_output=True, text=True, timeout=60)


def test_make_rebuilds_the_venv_when_python_names_another_interpreter(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path)
    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)  # a .venv made from the interpreter running this test

    same = check_venv(tmp_path, sys.executable)
    assert same.returncode == 0, same.stderr
    assert venv_python.is_symlink() and "rebuilding" not in same.stdout

    other = tmp_path / "python9"
    other.write_text("#!/bin/sh\necho /opt/python9/bin/python9 9.9.0\n")
    other.chmod(0o755)
    changed = check_venv(tmp_path, str(other))
    assert changed.returncode == 0, changed.stderr
    assert "/opt/python9/bin/python9 9.9.0': rebuilding it" in changed.stdout
    assert not (tmp_path / ".venv").exists()


def test_a_python_that_does_not_run_stops_make_before_touching_the_venv(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path)
    (tmp_path / ".venv").mkdir()
    result = check_venv(tmp_path, str(tmp_path / "no-such-python"))
    assert result.returncode != 0
    assert (tmp_path / ".venv").is_dir()
