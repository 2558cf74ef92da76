"""Safer defaults (issue 10, item 7): `inferoxy serve` on a host listens on loopback unless told otherwise.

The attack: a developer runs `inferoxy serve` on a laptop or a shared host, and every bridge (inference
without a credential; the admin API's loopback rule aside) was reachable from the whole network because
the bridges bound 0.0.0.0. The container image sets INFEROXY_BIND_HOST=0.0.0.0 itself, where the
container's network decides who reaches it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from inferoxy.cli import auth_is_off, warn_if_exposed
from inferoxy.settings import Settings
from tests.support import REPO, ProxyProcess


def listening_addresses(port: int) -> set[str]:
    """The local IPv4 and IPv6 addresses a listening TCP socket on ``port`` is bound to, read from /proc/net."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


# 127.0.0.1, ::ffff:127.0.0.1 (grpcio binds an IPv6 socket) and ::1 as /proc/net writes them (little-endian words).
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def test_the_default_bind_host_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFEROXY_BIND_HOST", raising=False)
    monkeypatch.delenv("INFEROXY_CONFIG", raising=False)
    assert Settings().bind_host == "127.0.0.1"


def test_the_proxy_image_keeps_listening_on_every_address() -> None:
    # In a container, loopback would be unreachable from outside it: the image sets 0.0.0.0 on purpose.
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r"^\s*INFEROXY_BIND_HOST=0\.0\.0\.0\b", dockerfile, flags=re.M), dockerfile


def test_serve_with_the_defaults_listens_on_loopback_only() -> None:
    # Attack: `inferoxy serve` with no bind setting, reached from another machine. Every bridge's
    # listening socket must be bound to 127.0.0.1, not to every address.
    proxy = ProxyProcess(env={"INFEROXY_MODELS_FILE": ""})
    del proxy.env["INFEROXY_BIND_HOST"]
    with proxy:
        for port in (proxy.rest_port, proxy.grpc_port, proxy.zmq_port):
            bound = listening_addresses(port)
            assert bound and bound <= LOOPBACK, f"port {port} listens on {bound}"


@pytest.mark.parametrize(
    ("host", "auth", "warned"),
    [
        ("0.0.0.0", "auto", True),  # open until the first key exists
        ("0.0.0.0", "off", True),
        ("::", "auto", True),
        ("192.0.2.10", "auto", True),  # a documentation address: never bound here, only classified
        ("proxy.example", "auto", True),  # a name may resolve to anything
        ("0.0.0.0", "required", False),
        ("127.0.0.1", "auto", False),
        ("::1", "off", False),
        ("localhost", "auto", False),
    ],
)
def test_serve_warns_when_it_listens_beyond_loopback_with_auth_off(
    caplog: pytest.LogCaptureFixture, host: str, auth: str, warned: bool
) -> None:
    settings = Settings(bind_host=host, auth=auth, models_file="")
    assert auth_is_off(settings) is (auth != "required")
    with caplog.at_level(logging.WARNING, logger="inferoxy.serve"):
        warn_if_exposed(settings)
    messages = [r.getMessage() for r in caplog.records if r.name == "inferoxy.serve"]
    assert bool(messages) is warned, messages
    if warned:
        assert host in messages[0] and "keys" in messages[0] and "INFEROXY_BIND_HOST" in messages[0]
