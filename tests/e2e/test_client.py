"""gateway.client from a service's side of the real process: the README's examples, run as written.

The examples in examples/ are what README "For service authors" shows; each
runs here as its own ``python`` process against ``run_gateway.py`` with the
device simulator answering.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.proc import E2E_SERVICE_TOKEN, REPO_ROOT, GatewayProcess, database_env, running_gateway
from e2e.simulated import running_simulator

pytestmark = pytest.mark.e2e

EXAMPLES = REPO_ROOT / "examples"
EXAMPLE_TIMEOUT_S = 60.0


@pytest.fixture
def gateway_with_device(database_url: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    with running_gateway(database_env(database_url), log_dir=tmp_path) as proc, \
            running_simulator(proc, user_id="dev-user", device_id="laptop-1", log_dir=tmp_path):
        yield proc


def run_example(name: str, proc: GatewayProcess, url: str | None = None) -> str:
    """``python examples/<name>`` as a service author runs it; its stdout."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=EXAMPLE_TIMEOUT_S, check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT),
             "GATEWAY_API_URL": url or f"http://127.0.0.1:{proc.internal_port}",
             "SERVICE_TOKEN": E2E_SERVICE_TOKEN},
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{proc.describe()}"
    return done.stdout


def test_the_five_line_example_calls_a_tool_on_a_device(
    gateway_with_device: GatewayProcess,
) -> None:
    assert run_example("call_tool.py", gateway_with_device) == "{'hi': 1}\n"


def test_the_example_accepts_the_url_with_its_prefix(gateway_with_device: GatewayProcess) -> None:
    url = gateway_with_device.internal_url + "/"
    assert run_example("call_tool.py", gateway_with_device, url) == "{'hi': 1}\n"


def test_the_errors_and_runs_example(gateway_with_device: GatewayProcess) -> None:
    assert run_example("follow_run.py", gateway_with_device).splitlines() == [
        "tool failed: tool_failed it failed",
        *(f"{i} {{'i': {i}, 'payload': '{'x' * 16}'}}" for i in (1, 2, 3)),
        "completed",
    ]


def test_without_a_device_the_example_fails_with_device_offline(
    database_url: str, tmp_path: Path,
) -> None:
    with running_gateway(database_env(database_url), log_dir=tmp_path) as proc:
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / "call_tool.py")], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S, check=False,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT),
                 "GATEWAY_API_URL": f"http://127.0.0.1:{proc.internal_port}",
                 "SERVICE_TOKEN": E2E_SERVICE_TOKEN})
    assert done.returncode == 1
    assert "gateway.client.DeviceOffline: no connected device for this user" in done.stderr


def test_readme_service_examples_are_the_tested_files() -> None:
    """README "For service authors" shows examples/*.py verbatim; the first is short."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## For service authors", 1)[-1].split("\n## ", 1)[0]
    for name in ("call_tool.py", "follow_run.py"):
        assert f"```python\n{(EXAMPLES / name).read_text()}```" in section, name
    code = [line for line in (EXAMPLES / "call_tool.py").read_text().splitlines() if line]
    assert len(code) <= 7  # two imports, the import of the client, four lines that work
