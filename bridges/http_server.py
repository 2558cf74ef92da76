"""uvicorn as a bridge component: listening on a socket we bind, and a deadline on each request head.

The REST bridge (bridges/rest.py) serves its application with these. uvicorn picks its HTTP/1.1
protocol class by what is installed (``AutoHTTPProtocol``: httptools, the C parser, when present;
it is a dependency) and runs on the process's event loop, uvloop for a bridge run alone
(``inferoxy.runner.loop_factory``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger(__name__)


class ComponentServer(uvicorn.Server):
    """uvicorn as a component: it reports when it is listening and leaves signals to the process runner."""

    def __init__(self, config: uvicorn.Config, started: asyncio.Event) -> None:
        super().__init__(config)
        self._started_event = started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._started_event.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _HeadDeadline(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP/1.1 protocol with a deadline on each request's head (request line and headers).

    uvicorn waits for a request head for ever: a connection that sends nothing, or sends its headers
    a byte at a time (slowloris), would hold a socket and its buffers for good. The deadline starts
    when the connection opens and again after each response; if no new request has begun (uvicorn
    starts a request cycle once its head is complete) when it passes, the connection is closed.
    Reading the body has the server's request timeout (``_within``); idle keep-alive has uvicorn's.
    """

    head_timeout_s = 10.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_deadline(None)

    def on_response_complete(self) -> None:
        finished = self.cycle  # a pipelined request may start inside super(): it must not be timed out
        super().on_response_complete()
        self._arm_head_deadline(finished)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _arm_head_deadline(self, finished: Any) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_deadline_passed, finished)

    def _head_deadline_passed(self, finished: Any) -> None:
        self._head_timer = None
        if self.cycle is finished and not self.transport.is_closing():
            log.info("closing a connection from %s that sent no complete request within %gs",
                     _peer_name(self.client), self.head_timeout_s)
            self.transport.close()


def head_deadline_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class, closing connections that send no complete request head within ``timeout_s``."""
    return type("HeadDeadlineProtocol", (_HeadDeadline,), {"head_timeout_s": timeout_s})


def _peer_name(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "an unknown client"


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be named: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto is IPPROTO_TCP,
    # and without that every small response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
