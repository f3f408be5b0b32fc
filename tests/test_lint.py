"""Static checks that catch what tests may not reach: undefined names, syntax errors (pyflakes via ruff)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_no_undefined_names_or_syntax_errors():
    beside = Path(sys.executable).parent / "ruff"  # the venv's ruff: `make test` does not put it on PATH
    ruff = str(beside) if beside.exists() else shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    paths = ["accordion", "cluster", "workers", "kernels", "client", "protos", "bench", "deploy", "tests"]
    res = subprocess.run([ruff, "check", "--select", "F,E9", "--output-format", "concise",
                          *[p for p in paths if (ROOT / p).exists()]], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
