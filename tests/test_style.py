"""The code passes the linter and the formatter the project configures (pyproject's [tool.ruff]):
no undefined names, unused imports or variables, no syntax errors, and laid out as `ruff format`
lays it out, in hvae/, pipeline/, tests/ and benchmarks/ (the README's test command runs both
before pytest; this keeps them in the fast lane)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BESIDE = Path(sys.executable).parent / "ruff"
RUFF = str(BESIDE) if BESIDE.exists() else shutil.which("ruff")
PATHS = ["hvae", "pipeline", "tests", "benchmarks"]


def test_ruff_finds_nothing():
    done = subprocess.run(
        [RUFF, "check", "--output-format", "concise", *PATHS], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]


def test_the_code_is_formatted():
    done = subprocess.run([RUFF, "format", "--check", *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, "run `ruff format .`:\n" + done.stdout[-3000:] + done.stderr[-1000:]
