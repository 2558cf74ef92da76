"""Who may call the admin API: its error type, the admin key a call carries, and the browser rules.

A call a browser makes on another site's behalf (``Origin`` not this host, ``Sec-Fetch-Site`` other
than same-origin or none) is refused 403 whoever makes it, and bodies must be ``application/json``
(415): a page can send neither without a CORS preflight, which the admin API never answers. Without
an admin key, loopback callers must carry no browser header at all and a loopback ``Host`` (DNS
rebinding). bridges/admin.py applies these (docs/SECURITY.md).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any, NamedTuple

from starlette.requests import Request

ADMIN_KEY_HEADER = "x-inferoxy-admin-key"


class Caller(NamedTuple):
    """Who makes an admin call, as the access rules see it: the key it carries, its address, and whether it
    is (or may be) a browser. REST reads these from the HTTP request, gRPC from the call's metadata and peer."""

    key: str | None
    host: str
    browser: bool

    @classmethod
    def of_request(cls, request: Request) -> Caller:
        return cls(supplied_key(request.headers), request.client.host if request.client else "",
                   from_browser(request))


class AdminError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


# Sec-Fetch-Site values a browser sends for the proxy's own pages and for an address the user typed.
_OWN_SITE = frozenset({"same-origin", "none"})
# Headers (gRPC: metadata) only a browser sends, as the admin rules read them.
BROWSER_HEADERS = ("origin", "sec-fetch-site", "sec-fetch-mode", "sec-fetch-dest", "sec-fetch-user")


def refuse_cross_site(request: Request) -> None:
    """403 for a call a browser makes on another site's behalf (CSRF), whoever and wherever the caller is."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in _OWN_SITE:
        raise AdminError(403, f"refused: a browser sent this call from another site (Sec-Fetch-Site: {site})")
    origin = request.headers.get("origin")
    if origin is not None and _authority_of_origin(origin) != _authority(request.headers.get("host", "")):
        raise AdminError(403, f"refused: a browser sent this call from another site (Origin: {origin})")


def require_json(request: Request) -> None:
    """415 for a body not declared ``application/json``: the kinds a page may send cross-site unasked are not."""
    declared = request.headers.get("content-type")
    has_body = request.headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in request.headers
    if declared is None and not has_body:
        return  # no body (load, unload, delete, reads)
    media_type = (declared or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise AdminError(415, f"admin calls take application/json bodies only, not {declared or 'an undeclared body'}")


def from_browser(request: Request) -> bool:
    if any(name in request.headers for name in BROWSER_HEADERS):
        return True
    hostname = _hostname(_authority(request.headers.get("host", "")))
    return not (hostname == "localhost" or is_loopback(hostname))


def _hostname(authority: str) -> str:
    if authority.startswith("["):  # [IPv6]:port
        return authority[1:].split("]", 1)[0]
    return authority.rsplit(":", 1)[0]


def _authority_of_origin(origin: str) -> str:
    scheme, _, rest = origin.strip().partition("://")
    return _authority(rest) if scheme and rest else "(opaque origin)"  # "null": sandboxed frames, file:// pages


def _authority(host: str) -> str:
    """``host[:port]`` in lower case without a default port, so an Origin compares with a Host header."""
    host = host.strip().lower().rstrip("/")
    for default in (":80", ":443"):
        if host.endswith(default):
            return host[: -len(default)]
    return host


def supplied_key(headers: Mapping[str, str]) -> str | None:
    """The key an admin call carries: ``X-Inferoxy-Admin-Key: KEY`` or ``Authorization: Bearer KEY`` (HTTP
    headers, or a gRPC call's metadata)."""
    supplied = headers.get(ADMIN_KEY_HEADER)
    auth = headers.get("authorization", "")
    if supplied is None and auth.lower().startswith("bearer "):
        supplied = auth[7:].strip()
    return supplied


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
