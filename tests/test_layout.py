"""Tests and benchmarks stay apart: bench/ imports nothing from tests/ (shared launchers live in clients/servers.py)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_does_not_import_tests():
    found = []
    for path in sorted((REPO / "bench").rglob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text, str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            found += [f"{path.name}: import {n}" for n in names if n == "tests" or n.startswith("tests.")]
        if '"tests.' in text or "'tests." in text:  # a dotted path handed to a loader (scorer, redact hook)
            found.append(f"{path.name}: names a tests. module by string")
    assert not found, found
