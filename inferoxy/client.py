"""A client for Inferoxy's ZeroMQ bridge (docs/PROTOCOL.md, "The ZeroMQ client bridge").

    with Client("tcp://127.0.0.1:7787") as client:
        outputs = client.infer("echo", {"x": np.ones((1, 3), np.float32)})

    async with AsyncClient("tcp://127.0.0.1:7787") as client:
        results = await asyncio.gather(*(client.infer("echo", {"x": row}) for row in rows))

Inputs travel as raw frames (no copy for C-contiguous arrays); outputs come back as numpy
arrays over the received frames (copied only when a frame is not aligned for its dtype).
Failures raise ``InferenceError`` with the bridge's error code (``bad_input``,
``unknown_model``, ``deadline``, ``unauthenticated``, ...). ``api_key=`` sends an API key with
every request. This module depends on pyzmq, numpy and msgpack
only, so it fits any client image.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from inferoxy.protocol import ErrorCode
from inferoxy.reactor import recv_nowait
from inferoxy.wire import Frame, WireError, as_array, check_tensors, encode, pack_header, unpack_header

DEFAULT_URL = "tcp://127.0.0.1:7787"
DEFAULT_TIMEOUT_S = 30.0
# The bridge's default limit; ZeroMQ silently drops the connection of a peer sending a larger frame,
# so the client refuses such a request itself and says why.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Requests an AsyncClient may have queued towards a bridge that is not taking them; beyond: overloaded.
MAX_QUEUED = 100_000
# Replies read per wake-up before the waiting callers get the event loop.
DRAIN_BURST = 1024

Outputs = dict[str, np.ndarray]


class InferenceError(Exception):
    """A request that failed; ``code`` is one of ``inferoxy.protocol.ErrorCode``'s values."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        # ``rate_limited``: when the key may send again.
        self.retry_after_s = retry_after_s
        # The id the proxy logged the request under (docs/PROTOCOL.md, "Request ids"): quote it to an operator.
        self.request_id = request_id


def _request_frames(
    rid: int,
    model: str,
    inputs: Mapping[str, Any],
    version: str | None,
    parameters: Mapping[str, Any] | None,
    timeout_s: float,
    max_message_bytes: int | None,
    api_key: str | None = None,
    request_id: str | None = None,
) -> list[Frame]:
    if not isinstance(inputs, Mapping) or not inputs:
        raise InferenceError(ErrorCode.BAD_INPUT.value, "inputs must be a non-empty mapping of name to array")
    header: dict[str, Any] = {"id": rid, "model": model, "timeout_ms": max(1, math.ceil(timeout_s * 1000))}
    if version is not None:
        header["version"] = version
    if parameters:
        header["parameters"] = dict(parameters)
    if api_key is not None:
        header["api_key"] = api_key
    if request_id is not None:
        header["request_id"] = request_id
    try:
        frames = encode(header, [(name, np.asarray(value)) for name, value in inputs.items()])
    except WireError as exc:
        raise InferenceError(ErrorCode.BAD_INPUT.value, str(exc)) from None
    if max_message_bytes is not None:
        size = sum(memoryview(frame).nbytes for frame in frames)
        if size > max_message_bytes:
            raise InferenceError(
                ErrorCode.BAD_INPUT.value,
                f"the request is {size} bytes, more than the bridge's limit of {max_message_bytes}",
            )
    return frames


def _outputs(header: dict[str, Any], frames: list[Any]) -> Outputs:
    """The outputs of a reply whose header is already read, or the InferenceError it carries."""
    if header.get("ok") is not True:
        error = header.get("error")
        if not isinstance(error, dict):
            raise InferenceError(ErrorCode.INTERNAL.value, "the bridge sent a malformed error reply")
        retry_ms = error.get("retry_after_ms")
        retry_s = retry_ms / 1000 if isinstance(retry_ms, int | float) and not isinstance(retry_ms, bool) else None
        request_id = header.get("request_id")
        raise InferenceError(str(error.get("code", ErrorCode.INTERNAL.value)), str(error.get("message", "")), retry_s,
                             request_id if isinstance(request_id, str) else None)
    try:
        metas = check_tensors(header, frames)
    except WireError as exc:
        raise InferenceError(ErrorCode.INTERNAL.value, f"the bridge sent a malformed reply: {exc}") from None
    outputs = {}
    for meta, frame in zip(metas, frames, strict=True):
        array = as_array(meta, frame)
        # Small frames of one message share libzmq's receive buffer at any offset; numpy and the
        # libraries fed from it want aligned data, and copying a small array costs next to nothing.
        outputs[meta["name"]] = array if array.flags.aligned else array.copy()
    return outputs


def _deadline_error(timeout_s: float) -> InferenceError:
    return InferenceError(ErrorCode.DEADLINE.value, f"no reply within {timeout_s:g}s")


def _reply_id(message: list[Any]) -> tuple[Any, dict[str, Any]] | None:
    try:
        header = unpack_header(message[0])
    except (WireError, IndexError):
        return None  # not from a bridge: nothing to match it to
    return header.get("id"), header


_NOWAIT = int(zmq.NOBLOCK)
_NOWAIT_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def _send_nowait(sock: zmq.Socket[Any], frames: list[Frame]) -> None:
    """Send one request frame by frame with integer flags; raises zmq.Again when the queue is full.

    pyzmq's send_multipart and its enum flags cost about twice as much per message (micro-benchmark
    in inferoxy/reactor.py's docstring); at c=64 the client's own CPU is a third of a request's.
    ZeroMQ checks the high-water mark on the first frame only: once it is queued the rest follow.
    """
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        sock.send(frame, _NOWAIT_MORE if index < last else _NOWAIT, copy=False)


def _expire(future: asyncio.Future[Any], timeout_s: float) -> None:
    if not future.done():
        future.set_exception(_deadline_error(timeout_s))


def _dealer(url: str, context: zmq.Context[Any] | None, hwm: int | None = None,
            server_key: str | bytes | None = None) -> zmq.Socket[Any]:
    base = context if context is not None else zmq.Context.instance()
    # A plain socket even on a zmq.asyncio context (sharing it, so inproc:// works): reads are ours.
    ctx = zmq.Context.shadow(base.underlying) if isinstance(base, zmq.asyncio.Context) else base
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if hwm is not None:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
    if server_key is not None:  # the proxy encrypts its port (INFEROXY_ZMQ_CURVE_SECRET_KEY): a throwaway keypair
        sock.curve_serverkey = server_key.encode() if isinstance(server_key, str) else server_key
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.connect(url)
    return sock


class Client:
    """A blocking client: one request at a time over one DEALER socket. Not thread-safe (no ZeroMQ socket is)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        context: zmq.Context[Any] | None = None,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        api_key: str | None = None,
        server_key: str | bytes | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._api_key = api_key  # sent in every request's header (docs/PROTOCOL.md); never shown
        self._sock = _dealer(url, context, server_key=server_key)
        self._ids = itertools.count(1)

    @property
    def closed(self) -> bool:
        return bool(self._sock.closed)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        version: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Outputs:
        """Run ``model`` on ``inputs`` (name -> array, leading dimension = batch rows); its outputs by name.

        ``request_id``: the id the proxy logs the request under (else it makes one; ``InferenceError.request_id``)."""
        timeout_s = self.timeout if timeout is None else timeout
        rid = next(self._ids)
        frames = _request_frames(
            rid, model, inputs, version, parameters, timeout_s, self.max_message_bytes, self._api_key, request_id
        )
        deadline = time.monotonic() + timeout_s
        sock = self._sock
        sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.Again:
            raise _deadline_error(timeout_s) from None
        while True:
            remaining_ms = (deadline - time.monotonic()) * 1000
            if remaining_ms <= 0 or not sock.poll(max(1, math.ceil(remaining_ms)), zmq.POLLIN):
                raise _deadline_error(timeout_s)
            message = sock.recv_multipart(copy=False)
            found = _reply_id(message)
            # Anything else is a late answer to an earlier request this client gave up on.
            if found is not None and found[0] == rid:
                return _outputs(found[1], message[1:])

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """An asyncio client: any number of concurrent ``infer`` calls share one DEALER socket.

    The socket is read straight from the event loop's selector (``loop.add_reader`` on its
    ZMQ_FD) and replies are matched to calls by id, with no task or zmq.asyncio future per
    call: at thousands of calls a second that bookkeeping would cost more than the calls.
    A client serves one event loop at a time (a later one once the first has closed).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        context: zmq.Context[Any] | None = None,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        api_key: str | None = None,
        server_key: str | bytes | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._api_key = api_key  # sent in every request's header (docs/PROTOCOL.md); never shown
        self._sock = _dealer(url, context, hwm=MAX_QUEUED, server_key=server_key)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[tuple[dict[str, Any], list[Any]]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False

    @property
    def closed(self) -> bool:
        return bool(self._sock.closed)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        version: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Outputs:
        """Run ``model`` on ``inputs`` (name -> array, leading dimension = batch rows); its outputs by name.

        ``request_id``: the id the proxy logs the request under (else it makes one; ``InferenceError.request_id``)."""
        if self._sock.closed:
            raise RuntimeError("the client is closed")
        loop = self._attach()
        timeout_s = self.timeout if timeout is None else timeout
        rid = next(self._ids)
        frames = _request_frames(
            rid, model, inputs, version, parameters, timeout_s, self.max_message_bytes, self._api_key, request_id
        )
        try:
            _send_nowait(self._sock, frames)
        except zmq.Again:
            raise InferenceError(
                ErrorCode.OVERLOADED.value, f"{MAX_QUEUED} requests are already queued for {self.url}; is it up?"
            ) from None
        header, reply = await self._reply(loop, rid, timeout_s)
        return _outputs(header, reply)

    async def _reply(self, loop: asyncio.AbstractEventLoop, rid: int,
                     timeout_s: float) -> tuple[dict[str, Any], list[Any]]:
        """The reply to request ``rid``, just sent: its header and frames (InferenceError ``deadline`` after
        ``timeout_s``)."""
        # The send may have consumed the socket's edge-triggered notification. Asking ZMQ_EVENTS re-arms
        # it, so a reply that is not queued yet will signal; one that is gets drained soon. Cheaper than
        # a drain after every send, which ends in a raised zmq.Again (about 2 vs 6 µs, and a callback).
        if int(self._sock.getsockopt(_EVENTS)) & _POLLIN:
            self._drain_soon(loop)
        future: asyncio.Future[tuple[dict[str, Any], list[Any]]] = loop.create_future()
        self._waiting[rid] = future
        timer = loop.call_later(timeout_s, _expire, future, timeout_s)
        try:
            return await future
        finally:
            timer.cancel()
            self._waiting.pop(rid, None)

    async def metadata(self, model: str, *, version: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """The model version's metadata (name, versions, inputs, outputs, as ``GET /v2/models/{name}``) with the
        resolved ``version``; raises InferenceError (``unknown_model``, ``unauthenticated``, ...)."""
        header: dict[str, Any] = {"op": "metadata", "model": model}
        if version is not None:
            header["version"] = version
        reply = await self._exchange(header, timeout)
        meta = reply.get("metadata")
        if reply.get("ok") is not True or not isinstance(meta, dict):
            _outputs(reply, [])  # raises the error the reply carries
            raise InferenceError(ErrorCode.INTERNAL.value, "the bridge sent a malformed metadata reply")
        return {**meta, "version": reply.get("version")}

    async def _exchange(self, header: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """Send a header-only message with a fresh id; its reply's header."""
        if self._sock.closed:
            raise RuntimeError("the client is closed")
        loop = self._attach()
        timeout_s = self.timeout if timeout is None else timeout
        rid = next(self._ids)
        header = {**header, "id": rid, "timeout_ms": max(1, math.ceil(timeout_s * 1000))}
        if self._api_key is not None:
            header["api_key"] = self._api_key
        try:
            _send_nowait(self._sock, [pack_header(header)])
        except (zmq.Again, WireError) as exc:
            raise InferenceError(ErrorCode.OVERLOADED.value, f"cannot send to {self.url}: {exc}") from None
        reply, _ = await self._reply(loop, rid, timeout_s)
        return reply

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise RuntimeError("an AsyncClient serves one event loop at a time; make one per loop")
            # First use, or the loop it served has ended (asyncio.run after asyncio.run): read on this one.
            self._loop = loop
            self._drain_scheduled = False
            loop.add_reader(self._sock.fileno(), self._drain)
        return loop

    def _drain_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            loop.call_soon(self._drain)

    def _drain(self) -> None:
        # Nothing in here sends (set_result only schedules the caller), so one receive that finds
        # nothing proves the socket empty and its notification re-armed.
        self._drain_scheduled = False
        sock = self._sock
        for _ in range(DRAIN_BURST):
            try:
                message = recv_nowait(sock)
            except zmq.ZMQError:  # closed meanwhile
                return
            if message is None:
                return
            found = _reply_id(message)
            if found is None:
                continue  # not an answer at all
            rid, header = found
            future = self._waiting.get(rid) if isinstance(rid, int) else None
            # None: a late answer to a call that timed out or was cancelled.
            if future is not None and not future.done():
                future.set_result((header, message[1:]))
        if self._loop is not None:  # a flood: let the callers run before reading on
            self._drain_soon(self._loop)

    def close(self) -> None:
        """Close the socket; calls still waiting fail with InferenceError."""
        if self._sock.closed:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(InferenceError(ErrorCode.INTERNAL.value, "the client was closed"))
        self._waiting.clear()
        self._sock.close(linger=0)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __enter__(self) -> AsyncClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
