"""The JavaScript device SDK (``clients/js``) against the real gateway process.

Each test starts ``python run_gateway.py`` on a database of its own and runs
``node --test`` on some of ``clients/js/test/*.test.mjs``, passing where the
gateway is through ``GW_*`` environment variables; the test fails when node
fails and shows node's output. The node tests kill and restart the gateway
through a small loopback control server owned here, so the process is always
this test's child and is always cleaned up.

``continuity.test.mjs`` covers PROTOCOL §1.8: runs resumed after ``kill -9``
and a drain, with ``event_acks``, each event stored once.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import attrs
import pytest
from system_tools import require

from e2e.proc import (
    E2E_JWT_SECRET,
    E2E_SERVICE_TOKEN,
    REPO_ROOT,
    GatewayProcess,
    database_env,
    start_gateway,
)

pytestmark = pytest.mark.e2e

JS_ROOT = REPO_ROOT / "clients" / "js"
NODE_TIMEOUT_S = 240.0
NPM_TIMEOUT_S = 300.0
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# Gateway settings that let the node tests see expiry, heartbeats and the
# device limit in seconds instead of minutes.
GATEWAY_SETTINGS = {
    "GATEWAY_JWT_LEEWAY_S": "0",
    "GATEWAY_HEARTBEAT_S": "1",
    "GATEWAY_MAX_DEVICES_PER_USER": "4",
    "GATEWAY_LOG_LEVEL": "warning",
}


def node() -> str:
    return require("node", "Node.js 20 or newer")


@pytest.fixture(scope="module")
def js_dependencies() -> Path:
    """clients/js/node_modules, installed from the lock file when missing (as .ci/run does)."""
    node()
    if not (JS_ROOT / "node_modules" / "ws").is_dir():
        npm = require("npm", "Node.js's npm")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_ROOT,
                              capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False)
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return JS_ROOT / "node_modules"


class GatewayControl:
    """The gateway under test, which node may kill (SIGKILL) and start again on the same ports."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.proc = start_gateway(self.env)
        self.proc.wait_ready()
        self.lock = threading.Lock()
        self.history: list[GatewayProcess] = [self.proc]

    def kill(self) -> None:
        with self.lock:
            self.proc.kill()

    def stop(self) -> None:
        """SIGTERM: the gateway drains (closes devices with 1001) and exits."""
        with self.lock:
            self.proc.stop()

    def start(self) -> None:
        with self.lock:
            if self.proc.popen.poll() is None:
                raise RuntimeError("the gateway is still running")
            self.proc = start_gateway(self.env, public_port=self.proc.public_port,
                                      internal_port=self.proc.internal_port)
            self.history.append(self.proc)
            self.proc.wait_ready()

    def close(self) -> None:
        with self.lock:
            for proc in self.history:
                proc.kill()

    def describe(self) -> str:
        return "\n".join(proc.describe() for proc in self.history)


def serve_control(control: GatewayControl) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            actions = {"/kill": control.kill, "/stop": control.stop, "/start": control.start}
            action = actions.get(self.path)
            if action is None:
                self.send_error(404)
                return
            try:
                action()
            except Exception as exc:
                body = repr(exc).encode()
                self.send_response(500)
            else:
                body = b"ok"
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: node prints what matters."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, name="gateway-control", daemon=True).start()
    return server


@attrs.frozen
class NodeTarget:
    control: GatewayControl
    env: Mapping[str, str]


@pytest.fixture
def gateway_for_node(database_url: str, js_dependencies: Path,
                     request: pytest.FixtureRequest) -> Iterator[NodeTarget]:
    """A real gateway plus its control server, and the environment that tells node where."""
    marker = request.node.get_closest_marker("gateway_env")
    extra = dict(marker.args[0]) if marker else {}
    control = GatewayControl(database_env(database_url, **{**GATEWAY_SETTINGS, **extra}))
    server = serve_control(control)
    proc = control.proc
    try:
        yield NodeTarget(control, {
            "GW_WS_URL": proc.ws_url,
            "GW_PUBLIC_URL": proc.public_url,
            "GW_INTERNAL_URL": proc.internal_url,
            "GW_SERVICE_TOKEN": E2E_SERVICE_TOKEN,
            "GW_JWT_SECRET": E2E_JWT_SECRET,
            "GW_CONTROL_URL": f"http://127.0.0.1:{server.server_address[1]}",
        })
    finally:
        server.shutdown()
        server.server_close()
        control.close()


def run_node_tests(files: Sequence[str], target: NodeTarget, *, expect_at_least: int) -> str:
    """``node --test files`` in clients/js; a failure shows node's and the gateway's output."""
    child_env = {key: value for key, value in os.environ.items() if not key.startswith("GW_")}
    child_env.update(target.env)
    done = subprocess.run(
        [node(), "--test", "--test-reporter=tap", *files], cwd=JS_ROOT, env=child_env,
        capture_output=True, text=True, timeout=NODE_TIMEOUT_S, check=False,
    )
    output = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, (f"node --test {' '.join(files)} failed:\n{output}\n"
                                  f"--- gateway ---\n{target.control.describe()}")
    # node exits 0 on no tests at all: count them (TAP's closing lines).
    passed = re.search(r"^# pass (\d+)$", done.stdout, re.MULTILINE)
    assert passed is not None and int(passed.group(1)) >= expect_at_least, output
    assert re.search(r"^# fail 0$", done.stdout, re.MULTILINE), output
    return output


def test_readme_device_example_is_the_tested_file() -> None:
    """The README's "For device authors" example is examples/echo-device.mjs, verbatim."""
    readme = (REPO_ROOT / "README.md").read_text()
    example = (JS_ROOT / "examples" / "echo-device.mjs").read_text()
    section = readme.split("## For device authors", 1)[-1].split("\n## ", 1)[0]
    assert f"```js\n{example}```" in section
    assert len([line for line in example.splitlines() if line.strip()]) <= 10


def test_sdk_type_declarations(js_dependencies: Path) -> None:
    """src/index.d.ts compiles and describes the README's usage (tsc, nothing emitted)."""
    done = subprocess.run([node(), str(js_dependencies / "typescript" / "bin" / "tsc"), "-p", "."],
                          cwd=JS_ROOT, capture_output=True, text=True, timeout=NODE_TIMEOUT_S,
                          check=False)
    assert done.returncode == 0, f"tsc failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.gateway_env({"GATEWAY_RUN_RESUME_S": "0"})
def test_sdk_against_the_real_gateway(gateway_for_node: NodeTarget) -> None:
    # GATEWAY_RUN_RESUME_S=0: runs end on disconnect (revision .4 behaviour), which
    # gateway.test.mjs expects; continuity.test.mjs covers the resuming gateway.
    run_node_tests(["test/unit.test.mjs", "test/gateway.test.mjs",
                    "test/example.test.mjs"], gateway_for_node, expect_at_least=25)


def test_sdk_in_headless_chromium(gateway_for_node: NodeTarget) -> None:
    for path in (CHROMIUM, CHROMEDRIVER):
        require(str(path), "apt-get install chromium chromium-driver")
    run_node_tests(["test/browser.test.mjs"], gateway_for_node, expect_at_least=1)


@pytest.mark.gateway_env({"GATEWAY_RUN_RESUME_S": "30"})
def test_sdk_session_continuity(gateway_for_node: NodeTarget) -> None:
    run_node_tests(["test/continuity.test.mjs"], gateway_for_node, expect_at_least=3)
