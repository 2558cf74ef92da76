"""Reading a bridge's ZeroMQ sockets straight from the event loop's selector.

zmq.asyncio wraps every receive and send in a Future and re-polls the socket's events after
each; at thousands of requests a second that bookkeeping cost the ZeroMQ bridge about a
third of its CPU (measured with py-spy under the bridge benchmark). Here each socket's
ZMQ_FD is registered with ``loop.add_reader``, and one callback drains the sockets, handing
each message to its handler synchronously. Sockets are plain (non-asyncio) sockets and every
send is non-blocking, so nothing here ever waits.

ZMQ_FD is edge-triggered, and any operation on a socket (a send included) may consume its
notification. The rule kept here: a drain ends only after a pass over every socket that
received nothing, with no send since. Code that sends outside a handler (a timer, an HTTP
handler) calls ``wake_soon()`` afterwards, so a swallowed notification is re-checked.

(The batch manager has the same machinery in batch_manager/reactor.py; the two could become
one module in ``inferoxy``.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from inferoxy import bus

log = logging.getLogger(__name__)

Handler = Callable[[list[Any]], None]

# Messages per socket per pass, so one flooded socket cannot starve the other.
BURST = 256
# Messages per wake-up before the event loop gets a turn (timers, HTTP, the registry watch).
YIELD_AFTER = 2048


def plain_socket(
    ctx: zmq.asyncio.Context,
    kind: int,
    *,
    bind: str | None = None,
    connect: str | None = None,
    max_message_bytes: int | None = None,
) -> zmq.Socket[Any]:
    """A non-asyncio socket on ``ctx`` (so inproc:// peers still meet), set up as ``bus.make_socket`` does."""
    sock: zmq.Socket[Any] = zmq.Context.shadow(ctx.underlying).socket(kind)
    sock.setsockopt(zmq.LINGER, bus.LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, bus.DEFAULT_HWM)
    sock.setsockopt(zmq.RCVHWM, bus.DEFAULT_HWM)
    if max_message_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer fails instead of vanishing
    try:
        if bind:
            sock.bind(bind)
        if connect:
            sock.connect(connect)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock


def send_nowait(sock: zmq.Socket[Any], frames: list[Any]) -> bool:
    """Send without waiting. False when the peer is gone or its queue is full (the message is dropped)."""
    try:
        sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
    except zmq.ZMQError:  # EAGAIN (queue full), EHOSTUNREACH (ROUTER peer gone), ENOTSOCK (closed)
        return False
    return True


class Reactor:
    """Drains a set of sockets whenever any of them may have input."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sockets: list[tuple[zmq.Socket[Any], Handler]] = []
        self._draining = False
        self._again = False
        self._scheduled = False

    def add(self, sock: zmq.Socket[Any], handle: Handler) -> None:
        """Pass every message ``sock`` receives to ``handle``; call from the event loop."""
        self._loop = asyncio.get_running_loop()
        self._sockets.append((sock, handle))
        self._loop.add_reader(sock.fileno(), self.wake)
        self.wake_soon()  # messages may already be queued, their notification long gone

    def remove(self, sock: zmq.Socket[Any]) -> None:
        """Stop reading ``sock`` (before closing it)."""
        if self._loop is not None and not sock.closed:
            self._loop.remove_reader(sock.fileno())
        self._sockets = [(s, h) for s, h in self._sockets if s is not sock]

    def wake_soon(self) -> None:
        """Re-check the sockets after a send made outside a handler."""
        if self._draining:
            self._again = True
        elif not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self.wake)

    def wake(self) -> None:
        self._scheduled = False
        if self._draining:
            self._again = True
            return
        self._draining = True
        try:
            self._drain()
        finally:
            self._draining = False

    def _drain(self) -> None:
        handled = 0
        while True:
            self._again = False
            before = handled
            for sock, handle in self._sockets:
                for _ in range(BURST):
                    try:
                        message = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    except zmq.ZMQError as exc:  # closed under us: nothing more to read from it
                        log.debug("socket stopped reading: %s", exc)
                        break
                    handled += 1
                    try:
                        handle(message)
                    except Exception:
                        # A handler's bug must not leave sockets undrained: their FD would not fire again.
                        log.exception("failed to handle a message")
            if handled == before and not self._again:
                return
            if handled >= YIELD_AFTER:
                self._resume_soon()
                return

    def _resume_soon(self) -> None:
        if self._loop is not None and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.wake)
