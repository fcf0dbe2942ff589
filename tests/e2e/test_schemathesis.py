"""Schemathesis against the real gateway process: gateway/openapi.json is what it answers.

One process (its own database) for the module, a device simulator
(``run_gateway.py device``) connected as ``dev-user`` answering the document's
examples, and per operation a bounded, seeded set of generated requests.
Every response must match the document (status, content type, body, headers)
and no 5xx may come back but the documented ones with their documented code
(a tool call given ``timeout_s: 0.001`` rightly answers 504 ``timeout``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import attrs
import orjson
import pytest
import schemathesis
import urllib3
from hypothesis import HealthCheck, settings
from hypothesis import seed as hypothesis_seed
from pg import create_database, drop_database, dsn_with_database, run_blocking, unique_database_name
from schemathesis.checks import not_a_server_error, positive_data_acceptance
from schemathesis.core.failures import ServerError

from e2e.proc import E2E_SERVICE_TOKEN, REPO_ROOT, GatewayProcess, database_env, running_gateway
from e2e.simulated import running_simulator

pytestmark = pytest.mark.e2e

DOCUMENT = REPO_ROOT / "gateway" / "openapi.json"
SCHEMA = schemathesis.openapi.from_path(DOCUMENT)
USER = "dev-user"  # the document's examples name this user and the simulator's tools
EXAMPLES_PER_OPERATION = 25
SEED = 20261130
REQUEST_TIMEOUT_S = 15.0
RUN_TIMEOUT_S = 15.0
# Failures schemathesis finds in today's gateway, each fixed elsewhere: strict,
# so the test fails (XPASS) once the fix lands and the entry must go.
KNOWN_FAILURES: dict[str, str] = {}


def crosses_the_timeout_rule(case: Any) -> bool:
    """A tool call whose max_timeout_s is below its timeout_s (default 30).

    The one rule between two fields, which JSON Schema cannot say (the document
    says it in words): schema-valid, yet rightly refused with 400.
    """
    body = case.body
    if not case.operation.path.endswith("/tool-calls") or not isinstance(body, dict):
        return False

    def seconds(name: str, default: float | None) -> float | None:
        value = body.get(name, default)
        if value is None:
            return default
        return None if isinstance(value, bool) or not isinstance(value, int | float) else value

    timeout_s, max_timeout_s = seconds("timeout_s", 30.0), seconds("max_timeout_s", None)
    return timeout_s is not None and max_timeout_s is not None and max_timeout_s < timeout_s


def documented_server_errors_only(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 5xx is a failure unless the operation documents that status and that error code."""
    if response.status_code < 500:
        return None
    documented = case.operation.definition.raw.get("responses", {}).get(
        str(response.status_code))
    if documented is not None:
        schema = documented["content"]["application/json"]["schema"]["allOf"][1]
        codes = schema["properties"]["error"]
        allowed = codes.get("enum", [codes.get("const")])
        try:
            code = orjson.loads(response.content).get("error")
        except orjson.JSONDecodeError:
            code = None
        if code in allowed:
            return None
    raise ServerError(operation=case.operation.label, status_code=response.status_code)


@pytest.fixture(scope="module")
def module_database(pg_server_dsn: str, template_database: str) -> Iterator[str]:
    """One migrated database for the module's one gateway process."""
    name = unique_database_name("gw_schemathesis")
    run_blocking(create_database(pg_server_dsn, name, template=template_database))
    try:
        yield dsn_with_database(pg_server_dsn, name)
    finally:
        run_blocking(drop_database(pg_server_dsn, name))


@attrs.frozen
class Api:
    base_url: str
    # Ids of finished runs (one with events, one cancelled): generated ids are
    # random, so only these let /events, /cancel and /runs/{id} reach the
    # database. Finished, so that an /events stream ends.
    run_ids: tuple[str, ...]


def _finished_runs(proc: GatewayProcess) -> tuple[str, ...]:
    http = urllib3.PoolManager()
    headers = {"Authorization": f"Bearer {E2E_SERVICE_TOKEN}"}

    def post(path: str, body: Any = None) -> Any:
        answer = http.request("POST", f"{proc.internal_url}{path}", headers=headers,
                              body=orjson.dumps(body) if body is not None else None,
                              timeout=REQUEST_TIMEOUT_S)
        assert answer.status in (200, 201), answer.data
        return orjson.loads(answer.data)

    streamed = post("/runs", {"user_id": USER, "agent_id": "stream", "input": {"events": 3}})
    idle = post("/runs", {"user_id": USER, "agent_id": "nobody-runs-this"})
    post(f"/runs/{idle['run_id']}/cancel")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while http.request("GET", f"{proc.internal_url}/runs/{streamed['run_id']}",
                       headers=headers).json()["status"] != "completed":
        assert time.monotonic() < deadline, "the simulator did not complete its run"
        time.sleep(0.05)
    return streamed["run_id"], idle["run_id"]


@pytest.fixture(scope="module")
def api(module_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The real gateway with a simulated device of USER connected, and runs that exist."""
    logs = tmp_path_factory.mktemp("schemathesis-logs")
    with running_gateway(database_env(module_database), log_dir=logs) as proc, \
            running_simulator(proc, user_id=USER, device_id="sim-1", log_dir=logs) as simulator:
        yield Api(f"http://127.0.0.1:{proc.internal_port}", _finished_runs(proc))
        assert simulator.poll() is None, "the simulator fell over during the run"
        assert proc.popen.poll() is None, proc.describe()


@SCHEMA.parametrize()
@hypothesis_seed(SEED)
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck), print_blob=True)
def test_the_gateway_answers_as_its_openapi_document_says(
    case: Any, api: Api, request: pytest.FixtureRequest,
) -> None:
    reason = KNOWN_FAILURES.get(case.operation.label)
    if reason is not None:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    run_id = (case.path_parameters or {}).get("run_id")
    if isinstance(run_id, str):
        # Two of three generated ids become an existing run's (deterministically).
        pick = sum(map(ord, run_id)) % 3
        if pick < len(api.run_ids):
            case.path_parameters["run_id"] = api.run_ids[pick]
    excluded = [not_a_server_error]
    if crosses_the_timeout_rule(case):
        excluded.append(positive_data_acceptance)
    response = case.call_and_validate(
        base_url=api.base_url, headers={"Authorization": f"Bearer {E2E_SERVICE_TOKEN}"},
        excluded_checks=excluded, additional_checks=[documented_server_errors_only],
        timeout=REQUEST_TIMEOUT_S,
    )
    if crosses_the_timeout_rule(case):
        assert response.status_code == 400, response.text
