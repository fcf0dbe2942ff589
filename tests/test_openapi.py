"""gateway/openapi.json against the internal app: the same routes, parameters and body fields.

Schemathesis holds the document against the real process's answers
(tests/e2e/test_schemathesis.py); this file holds it against the code.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from harness import SERVICE_TOKEN, Harness
from openapi_spec_validator import validate

from gateway.http import internal_api

DOCUMENT_PATH = Path(__file__).resolve().parents[1] / "gateway" / "openapi.json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# What a handler reads: query parameters and body fields, spelled the ways internal_api.py does.
QUERY_READS = re.compile(r'(?:query\.get\(|_query_id\(request, )"(\w+)"')
BODY_READS = re.compile(r'(?:body\.get\(|_id_field\(body, |_seconds\(body, )"(\w+)"')


def document() -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads(DOCUMENT_PATH.read_bytes())
    return loaded


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def documented_operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method.upper(), path): operation
            for path, item in doc["paths"].items()
            for method, operation in item.items() if method in METHODS}


def routed_operations(app: web.Application) -> dict[tuple[str, str], str]:
    """(method, path) → handler name for every route but the catch-all and automatic HEADs."""
    routes: dict[tuple[str, str], str] = {}
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method == "*":  # route_miss: answers what no route matched
            assert path == "/{path}", f"unexpected catch-all {path}"
            continue
        routes[(route.method, path)] = route.handler.__name__
    for method, path in list(routes):
        if method == "HEAD" and ("GET", path) in routes:  # aiohttp adds one per GET
            del routes[(method, path)]
    return routes


def parameters_of(doc: dict[str, Any], path: str,
                  operation: dict[str, Any]) -> list[dict[str, Any]]:
    shared = doc["paths"][path].get("parameters", [])
    return [resolve(doc, p) for p in [*shared, *operation.get("parameters", [])]]


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    validate(doc)


def test_every_route_is_documented_and_every_documented_operation_is_routed(
    gateway: Harness,
) -> None:
    routed = routed_operations(gateway.internal.server.app)
    documented = documented_operations(document())
    assert sorted(set(routed) - set(documented)) == [], "routes missing from gateway/openapi.json"
    assert sorted(set(documented) - set(routed)) == [], "documented operations with no route"


def test_each_handler_reads_exactly_the_documented_query_parameters_and_body_fields(
    gateway: Harness,
) -> None:
    doc = document()
    documented = documented_operations(doc)
    checked = 0
    for (method, path), name in routed_operations(gateway.internal.server.app).items():
        if name == "get_openapi":  # the document's own handler reads nothing
            continue
        handler = getattr(internal_api, name, None)
        if handler is None:
            pytest.fail(f"{method} {path}: its handler {name} is not in internal_api.py; "
                        "teach this test where to read it")
        source = inspect.getsource(handler)
        operation = documented[(method, path)]
        params = parameters_of(doc, path, operation)
        assert {p["name"] for p in params if p["in"] == "query"} == set(
            QUERY_READS.findall(source)), f"{method} {path}: query parameters"
        assert {p["name"] for p in params if p["in"] == "path"} == set(
            re.findall(r"{(\w+)}", path)), f"{method} {path}: path parameters"
        body_fields = set(BODY_READS.findall(source))
        if "requestBody" in operation:
            schema = resolve(doc, operation["requestBody"]["content"]["application/json"]
                             ["schema"])
            assert set(schema["properties"]) == body_fields, f"{method} {path}: body fields"
            assert set(schema["required"]) <= body_fields
        else:
            assert body_fields == set(), f"{method} {path} reads a body it does not document"
        checked += 1
    assert checked == len(documented) - 1


def test_every_operation_documents_401_and_its_error_bodies_use_the_envelope() -> None:
    doc = document()
    for (method, path), operation in documented_operations(doc).items():
        responses = operation["responses"]
        assert "401" in responses, f"{method} {path}"
        for status, response in responses.items():
            response = resolve(doc, response)
            if int(status) >= 400:
                schema = response["content"]["application/json"]["schema"]
                assert schema["allOf"][0] == {"$ref": "#/components/schemas/Error"}, (
                    f"{method} {path} {status}")


async def test_the_document_is_served_as_checked_in(gateway: Harness) -> None:
    status, body = await gateway.api("GET", "/openapi.json")
    assert status == 200
    assert body == document()


@pytest.mark.parametrize("token", [None, "not-the-service-token", SERVICE_TOKEN[:-1]])
async def test_the_document_needs_a_service_token(gateway: Harness, token: str | None) -> None:
    status, body = await gateway.api("GET", "/openapi.json", token=token)
    assert status == 401
    assert body["error"] == "unauthorized"


async def test_the_document_refuses_other_methods(gateway: Harness) -> None:
    status, body = await gateway.api("POST", "/openapi.json", {})
    assert status == 405
    assert body["error"] == "method_not_allowed"
