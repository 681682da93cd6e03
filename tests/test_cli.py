"""The `cellular` command line."""

import subprocess
import sys

import pytest

from cellular import CELLULAR
from cellular._cli import main


def test_demo_runs_and_saves_model(tmp_path, capsys):
    assert main(["demo", "--epochs", "3", "--quiet", "-o", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "pbmc68k_reduced" in out and "kNN label accuracy" in out and "trained: 3 epochs" in out
    model = CELLULAR.load(tmp_path / "demo")
    assert model.is_trained and model.n_latent == 32


def test_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "cellular._cli", "demo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--epochs" in result.stdout


def test_bad_arguments_exit_with_2():
    with pytest.raises(SystemExit) as excinfo:
        main(["demo", "--epochs", "many"])
    assert excinfo.value.code == 2
