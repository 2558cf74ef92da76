"""The secrets ``inferoxy serve`` makes at start, and how URLs that carry one are shown.

``serve`` makes the embedded Redis's password and the bus's CURVE secret once and puts them
in its own environment, which every component it starts (and restarts) inherits; they never
reach replicas (task_manager.runtimes.base.replica_environment) and are never printed.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit, urlunsplit

from inferoxy.settings import Settings

MASK = "****"


def mask_url(url: str | None) -> str:
    """``url`` with its password (if any) replaced by ``****``: what logs and banners show."""
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}{port}"))


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def make_serve_secrets(settings: Settings) -> dict[str, str]:
    """The variables ``serve`` must add to its environment: a secret for each one the operator did not set."""
    made: dict[str, str] = {}
    if settings.bus_curve and settings.bus_secret is None:
        made["INFEROXY_BUS_SECRET"] = new_secret()
    if not settings.redis_url and settings.embedded_redis_password is None:
        made["INFEROXY_EMBEDDED_REDIS_PASSWORD"] = new_secret()
    return made
