"""The internal API's OpenAPI document (gateway/openapi.json), served as it is checked in.

The JSON file is the one source: tests/test_openapi.py holds it against the
router, and schemathesis against the real process (tests/e2e/test_schemathesis.py).
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web
from aiohttp.typedefs import Handler

DOCUMENT = "openapi.json"


def document_bytes() -> bytes:
    """The document as shipped: package data, so an installed wheel serves it too."""
    return resources.files("gateway").joinpath(DOCUMENT).read_bytes()


def document_handler() -> Handler:
    """A handler answering the document, read once (it cannot change under a process)."""
    body = document_bytes()

    async def get_openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return get_openapi
