"""The gateway as a user installs it: a wheel in a fresh virtual environment, no source tree."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import zipfile
from pathlib import Path

import asyncpg
import pytest

from e2e.proc import REPO_ROOT, database_env, start_gateway

pytestmark = pytest.mark.e2e

BUILD_TIMEOUT_S = 300.0


def _run(args: list[str], cwd: Path) -> None:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT_S, check=False)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def installed_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``device-gateway`` from a wheel of this tree, installed into a new virtual environment.

    The environment sees the test run's site-packages for the dependencies
    (no download), but its own copy of the gateway comes first on its path.
    """
    root = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(root),
          str(REPO_ROOT)], cwd=root)
    (wheel,) = root.glob("device_gateway-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped_sql = {Path(n).name for n in names if n.startswith("gateway/migrations/")}
    assert shipped_sql == {p.name for p in (REPO_ROOT / "migrations").glob("*.sql")}
    # Served at /internal/v1/openapi.json: the app cannot be built without it.
    assert "gateway/openapi.json" in names
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=root)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--quiet",
          str(wheel)], cwd=root)
    return venv / "bin" / "device-gateway"


async def _applied(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return [row["name"] for row in
                await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")]
    finally:
        await conn.close()


def test_the_installed_script_migrates_and_serves_from_another_directory(
    installed_script: Path, empty_database_url: str, tmp_path: Path,
) -> None:
    """pip install of the wheel, then `device-gateway` run elsewhere finds its migrations."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = start_gateway(database_env(empty_database_url), program=[str(installed_script)],
                         cwd=elsewhere, log_dir=tmp_path)
    try:
        proc.wait_ready()
    finally:
        code, _ = proc.stop()
    assert code == 0, proc.describe()
    shipped = sorted(p.name for p in (REPO_ROOT / "migrations").glob("*.sql"))
    assert asyncio.run(_applied(empty_database_url)) == shipped


def test_the_installed_gateway_reads_its_own_migrations(
    installed_script: Path, tmp_path: Path,
) -> None:
    """The wheel's copy is what runs, and its migrations are package data, not the source tree."""
    python = installed_script.parent / "python"
    result = subprocess.run(
        [str(python), "-c",
         "import gateway.migrate as m; print(m.default_migrations_dir())"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    used = Path(result.stdout.strip())
    assert used.is_relative_to(installed_script.parents[1]), used
    assert used.parts[-2:] == ("gateway", "migrations")
