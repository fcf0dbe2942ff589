"""Programs a few tests run for real (nginx, promtool, node, chromium): found, or why not.

Under CI (``CI=true``) a missing program fails the test: ``.ci/run`` installs
every one of them, so a missing one is a broken install. Elsewhere the test is
skipped with the command that installs it, so ``python -m pytest`` works on a
fresh machine that has only Python (README, "Tests").
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def require(program: str, install: str) -> str:
    """The path of ``program`` (a name on PATH, or an absolute path)."""
    found = shutil.which(program) if not program.startswith("/") else (
        program if Path(program).exists() else None)
    if found is not None:
        return found
    message = f"{program} is not installed ({install})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; .ci/run installs it")
    pytest.skip(f"{message}; CI always runs this test")
