"""ruff, as the style guide asks: lint and format checks run with the tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [p for p in ("dpo_xpu", "tests", "scripts", "benchmarks", "docs/hooks.py") if (ROOT / p).exists()]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed (pip install -e '.[test]')")


def test_ruff_check():
    result = subprocess.run([*_ruff(), "check", *TARGETS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format():
    result = subprocess.run([*_ruff(), "format", "--check", *TARGETS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"run `ruff format {' '.join(TARGETS)}`:\n{result.stdout}"
