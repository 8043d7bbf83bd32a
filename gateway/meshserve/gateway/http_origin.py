"""Which web pages may drive the HTTP API: a browser sends whatever a page tells it to, to any address.

Two attacks reach a mesh on a developer's loopback from a page they merely visit:
- A cross-site request: the page posts to http://127.0.0.1:8080/v1/... directly. The browser says which
  page sent it in `Origin`; anything but the gateway's own page (and origins the operator allows) is refused.
- DNS rebinding: the page's own name is re-pointed at 127.0.0.1, so its requests are same-origin and carry
  no foreign `Origin`, but they still name the page's host in `Host`. A gateway bound to loopback answers
  only to loopback names (and hosts the operator allows).

Callers that are not browsers (SDKs, curl) send no `Origin` and a loopback `Host`, and pass untouched.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import grpc
from aiohttp import web

from meshserve.common.errors import MeshError
from meshserve.common.tls import is_loopback

LOOPBACK_NAMES = frozenset({"localhost", "localhost."})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BrowserGuard:
    def __init__(self, bound_host: str, allowed_origins: str, allowed_hosts: str) -> None:
        # Only a gateway reachable on loopback alone can be rebound to; one serving a network has real names.
        self.check_host = is_loopback(bound_host)
        self.allowed_origins = frozenset(_origin_key(o) for o in _items(allowed_origins))
        self.allowed_hosts = frozenset(h.lower() for h in _items(allowed_hosts))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> Any:
        self.check(request)
        return await handler(request)

    def check(self, request: web.Request) -> None:
        host = request.headers.get("Host", "")
        if self.check_host and not self._loopback_host(host):
            raise MeshError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Host: {host[:100]!r} is not a name of this loopback gateway (a page re-pointing its name at "
                "127.0.0.1 would look like this); use localhost or 127.0.0.1, or allow the name with "
                "--http-allowed-hosts",
            )
        origin = request.headers.get("Origin")
        if origin is None:
            return
        key = _origin_key(origin)
        if key in self.allowed_origins or (key is not None and key[1:] == _host_key(host, key[0])):
            return
        raise MeshError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"Origin: pages of {origin[:100]!r} may not call this API; allow them with --http-allowed-origins",
        )

    def _loopback_host(self, host: str) -> bool:
        name = _hostname(host)
        if name is None:
            return False
        if name in LOOPBACK_NAMES or name in self.allowed_hosts or host.lower() in self.allowed_hosts:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _hostname(host: str) -> str | None:
    """The name in a Host header value (without its port); None when it is not one."""
    try:
        parts = urlsplit(f"//{host}")
        return parts.hostname.lower() if parts.hostname else None
    except ValueError:
        return None


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin value, the port made explicit; None for "null" and anything odd."""
    try:
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            return None
        return parts.scheme, parts.hostname.lower(), parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None


def _host_key(host: str, scheme: str) -> tuple[str, int] | None:
    """(host, port) the request was sent to, as its Host header says."""
    try:
        parts = urlsplit(f"//{host}")
        if not parts.hostname:
            return None
        return parts.hostname.lower(), parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        return None
