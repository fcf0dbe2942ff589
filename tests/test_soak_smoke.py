"""The soak command runs and judges (a few seconds of it; the real run is minutes, README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def test_a_short_soak_returns_to_baseline(database_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--minutes", "0.1", "--devices", "6",
         "--callers", "2", "--database-url", database_url],
        cwd=ROOT, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["counts"]["connections"] > 6
    assert summary["counts"].get("tool-calls_200", 0) > 0
    assert summary["end"]["devices"] == 0
