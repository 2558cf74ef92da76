"""Sockets of the internal bus, made one way everywhere.

High-water marks are set on purpose: a ROUTER drops messages for a peer whose queue
is full, and a DEALER refuses the send (every send is non-blocking), so every socket gets
a bound that is larger than the credit and queue limits above it will ever let it
reach. Linger is short so a stopping component never hangs on unsent messages.
"""

from __future__ import annotations

from typing import Any

import zmq
import zmq.asyncio

from inferoxy import curve
from inferoxy.curve import CurveClient, CurveServer

DEFAULT_HWM = 100_000
LINGER_MS = 200


def plain_socket(
    ctx: zmq.asyncio.Context,
    kind: int,
    *,
    bind: str | None = None,
    connect: str | None = None,
    identity: bytes | None = None,
    hwm: int = DEFAULT_HWM,
    max_message_bytes: int | None = None,
    curve_server: CurveServer | None = None,
    curve_client: CurveClient | None = None,
) -> zmq.Socket[Any]:
    """A non-asyncio socket on ``ctx`` (so inproc:// peers still meet) for ``inferoxy.reactor`` to drive: every
    component reads its bus sockets that way (one I/O model on the data path)."""
    sock: zmq.Socket[Any] = zmq.Context.shadow(ctx.underlying).socket(kind)
    _configure(sock, kind, bind=bind, connect=connect, identity=identity, hwm=hwm,
               max_message_bytes=max_message_bytes, curve_server=curve_server, curve_client=curve_client)
    return sock


def _configure(
    sock: zmq.Socket[Any],
    kind: int,
    *,
    bind: str | None,
    connect: str | None,
    identity: bytes | None,
    hwm: int,
    max_message_bytes: int | None,
    curve_server: CurveServer | None,
    curve_client: CurveClient | None,
) -> None:
    """``curve_server``/``curve_client``: CURVE for this socket (inferoxy.curve)."""
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if max_message_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if kind == zmq.ROUTER:
        # Fail loudly rather than silently dropping a reply for a peer that is gone.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    try:
        curve.apply(sock, curve_server, curve_client)
        if bind:
            sock.bind(bind)
        if connect:
            sock.connect(connect)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
