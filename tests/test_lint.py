"""Static checks that catch what tests may not reach: undefined names, syntax errors (pyflakes via ruff)."""

from __future__ import annotations

import ast
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


def _jit_functions(tree):
    """The functions of a module decorated with ``@triton.jit``, ``@gluon.jit`` or ``@jit_unspecialized(...)``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                if name in ("jit", "jit_unspecialized"):
                    yield node
                    break


def test_no_defaulted_constexpr_parameters_in_jit_functions():
    """A ``tl.constexpr`` parameter with a default, omitted by a calling kernel, compiles under TRITON_INTERPRET=1
    but not for the GPU (Triton 3.6: "'str' object has no attribute 'type'" at the call): the CPU tests pass while
    every kernel that calls the helper fails on the GPU (23 GPU tests at 08cb705). Constexprs are passed
    explicitly."""
    bad = []
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        for fn in _jit_functions(ast.parse(path.read_text())):
            args = fn.args.args
            defaults = dict(zip([a.arg for a in args[len(args) - len(fn.args.defaults):]], fn.args.defaults))
            for a in args:
                if a.arg in defaults and a.annotation is not None and "constexpr" in ast.unparse(a.annotation):
                    bad.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}({a.arg}=...)")
    assert not bad, "defaulted constexpr parameters of jit functions: " + ", ".join(bad)
