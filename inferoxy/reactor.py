"""Reading ZeroMQ sockets straight from the event loop's selector, without a future per message.

zmq.asyncio wraps every receive and send in a Future and re-polls the socket's events after
each one; at thousands of messages a second that bookkeeping cost the batch manager about a
quarter of its CPU and the ZeroMQ bridge about a third (measured with py-spy under
bench/bench_bridges.py). Here each socket's ZMQ_FD is registered with ``loop.add_reader``
and one callback drains every socket until all are empty, handing each message to its
handler synchronously. Sockets are plain (non-asyncio) ones and every send is
non-blocking, so nothing here ever waits.

ZMQ_FD is edge-triggered, and any operation on a socket (a send included) may consume its
notification. The rule kept here: a drain ends only after a pass over every socket that
received nothing, with no send since. Code that sends outside a handler (a timer, an HTTP
handler, a heartbeat) calls ``wake_soon()`` afterwards, so a swallowed notification is
re-checked.

``recv_nowait`` and ``send_nowait`` move one multipart message frame by frame with integer
flags: pyzmq's ``recv_multipart``/``send_multipart`` sugar costs about three times as much
per message (measured: 6 vs 2 µs to receive, 9.6 vs 3.2 µs to send three frames).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import zmq

log = logging.getLogger(__name__)

Handler = Callable[[list[Any]], None]

_NOWAIT = int(zmq.NOBLOCK)
_NOWAIT_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)

# Messages per socket per pass, so one flooded socket cannot starve another.
BURST = 256
# Messages per wake-up before the event loop gets a turn (timers, HTTP, the registry watch).
YIELD_AFTER = 4096


def recv_nowait(sock: zmq.Socket[Any]) -> list[Any] | None:
    """The next message as zmq.Frame objects (no copy of large frames), or None if none is queued."""
    try:
        frame = sock.recv(_NOWAIT, copy=False)
    except zmq.Again:
        return None
    frames = [frame]
    # The parts of a message arrive together: once the first is here, the rest are too.
    while frame.more:
        frame = sock.recv(_NOWAIT, copy=False)
        frames.append(frame)
    return frames


def send_nowait(sock: zmq.Socket[Any], frames: Sequence[Any]) -> bool:
    """Send one message without waiting. False when the peer is unreachable or its queue is full (dropped).

    Frames under the socket's copy_threshold are copied anyway; larger ones (arrays) travel by reference.
    """
    last = len(frames) - 1
    try:
        # ZeroMQ checks the queue limit and the route on the first part; the rest of a message always follows.
        for index, frame in enumerate(frames):
            sock.send(frame, _NOWAIT_MORE if index < last else _NOWAIT, copy=False)
    except zmq.ZMQError:  # EAGAIN (queue full), EHOSTUNREACH (ROUTER peer gone), ENOTSOCK (closed)
        return False
    return True


class Reactor:
    """Drains a set of sockets whenever any of them may have input.

    ``after_drain`` runs once each drain has finished (the batch manager re-arms its batch
    timer there, after a burst of messages rather than after each).
    """

    def __init__(self, after_drain: Callable[[], None] | None = None) -> None:
        self._after_drain = after_drain
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

    def close(self) -> None:
        for sock, _ in list(self._sockets):
            self.remove(sock)

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
            # Called from a handler: the running drain will look at every socket again.
            self._again = True
            return
        self._draining = True
        try:
            self._drain()
        finally:
            self._draining = False
            if self._after_drain is not None:
                self._after_drain()

    def _drain(self) -> None:
        handled = 0
        while True:
            self._again = False
            before = handled
            for sock, handle in self._sockets:
                for _ in range(BURST):
                    try:
                        message = recv_nowait(sock)
                    except zmq.ZMQError as exc:  # closed under us: nothing more to read from it
                        log.debug("socket stopped reading: %s", exc)
                        break
                    if message is None:
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
