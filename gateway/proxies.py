"""The real client address behind a reverse proxy (GATEWAY_TRUSTED_PROXIES, PROTOCOL.md §4).

A forwarding header is believed only when the TCP peer is a trusted proxy;
from anyone else it is ignored, so a device cannot choose the address it is
logged under. The header read is ``X-Forwarded-For`` when present, else
``Forwarded`` (RFC 7239): a proxy that sets one of them must not pass a
client's copy of the other through (the shipped nginx config clears
``Forwarded``).

Which hop: the list is walked from the right (the hop nearest to us), skipping
trusted proxies; the first address that is not one is the client. Entries
further left were written by that client or by proxies we do not know, and
could be anything. An entry that is not an IP address (``unknown``, an
obfuscated ``_name``, garbage) ends the walk at the last address known, the
proxy's own. When every hop is trusted, the leftmost one is the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import web
from aiohttp.web import BaseRequest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import SETTINGS, IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> IPAddress | None:
    """``192.0.2.1``, ``192.0.2.1:443``, ``2001:db8::1``, ``[2001:db8::1]:443`` (quotes
    allowed); anything else is None."""
    text = text.strip().strip('"').strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1:] and not text[end + 1:].startswith(":")):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 has two or more
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def forwarded_for(value: str) -> list[IPAddress | None]:
    """The ``for=`` node of each element of a ``Forwarded`` header, left to right."""
    hops: list[IPAddress | None] = []
    for element in _split_outside_quotes(value, ","):
        node: IPAddress | None = None
        for pair in _split_outside_quotes(element, ";"):
            name, _, raw = pair.partition("=")
            if name.strip().lower() == "for":
                node = parse_address(raw)
        hops.append(node)
    return hops


def x_forwarded_for(value: str) -> list[IPAddress | None]:
    """Each entry of an ``X-Forwarded-For`` header, left to right."""
    return [parse_address(entry) for entry in value.split(",")]


def is_trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted)


def client_address(request: BaseRequest, trusted: Sequence[IPNetwork]) -> str | None:
    """The address logs and limits use: the peer's, or the one its trusted proxy names."""
    if not trusted:
        return request.remote
    return forwarded_client(request.remote, request.headers, trusted)


def forwarded_client(peer_text: str | None, headers: CIMultiDictProxy[str] | CIMultiDict[str],
                     trusted: Sequence[IPNetwork]) -> str | None:
    """``client_address`` on its parts: the TCP peer and the request's headers."""
    if peer_text is None:
        return None
    peer = parse_address(peer_text)
    if peer is None or not is_trusted(peer, trusted):
        return peer_text
    if "X-Forwarded-For" in headers:
        hops = x_forwarded_for(",".join(headers.getall("X-Forwarded-For")))
    elif "Forwarded" in headers:
        hops = forwarded_for(",".join(headers.getall("Forwarded")))
    else:
        return peer_text
    client = peer
    for hop in reversed(hops):
        if hop is None:
            break
        client = hop
        if not is_trusted(hop, trusted):
            break
    return str(client)


def request_client_address(request: BaseRequest) -> str | None:
    """``client_address`` with the gateway's own setting, for the access logger."""
    if isinstance(request, web.Request):
        settings = request.app.get(SETTINGS)
        if settings is not None:
            return client_address(request, settings.trusted_proxies)
    return request.remote
