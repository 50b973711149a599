"""One error path: library code raises UserError; only `flywheel`'s main turns it into one stderr
line and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.clients.cli import main
from flywheel.server.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "/nonexistent/run"], "flywheel report: error: run directory not found: /nonexistent/run"),
        (["models", "--prepare", "no-such-model"], "flywheel models: error: unknown bundled model 'no-such-model'"),
        (["train", "plot", "/nonexistent/run"], "flywheel train plot: error: no metrics.jsonl in /nonexistent/run"),
        (
            ["eval", "compare", "a"],
            "flywheel eval compare: error: give exactly two run directories (RUN_A RUN_B), got 1",
        ),
        (["perf", "--input-len", "0"], "flywheel perf: error: --input-len and --output-len must be >= 1"),
    ],
)
def test_main_prints_one_line_and_returns_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_library_code_raises_user_error_instead_of_exiting(tmp_path):
    from flywheel.trainer.metrics import read_metrics

    with pytest.raises(UserError, match="no metrics.jsonl in"):
        read_metrics(tmp_path)


def test_console_script_exits_with_code_2():
    proc = subprocess.run(
        [sys.executable, "-m", "flywheel.clients.cli", "report", "/nonexistent/run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr == "flywheel report: error: run directory not found: /nonexistent/run\n"
