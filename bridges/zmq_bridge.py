"""The ZeroMQ client bridge: external clients' msgpack protocol (docs/PROTOCOL.md) on a ROUTER.

Clients connect a DEALER (many requests in flight, answered in any order, matched by ``id``)
or a REQ socket (whose messages start with an empty delimiter frame, echoed in the reply).
Tensor frames are checked against their header with ``inferoxy.wire`` and the model's declared
inputs, then forwarded to the batch manager untouched: no numpy, no copy.

Every message gets exactly one answer, and nothing a client sends can stop the receive loop
or delay another client: each request is handed to the gateway with a callback that sends
its reply, so the loop never waits on a request. The one case ZeroMQ itself answers is a
single frame larger than ``max_message_bytes``: libzmq drops that connection (ZMQ_MAXMSGSIZE)
before the bridge sees the message, and the client's own timeout reports it.

What one client (a peer identity) may have buffered is bounded (bridges/budget.py): its requests
in flight plus its replies that libzmq still holds because the client has not read them. Replies
of ``TRACK_FROM_BYTES`` or more are sent with a ZeroMQ message tracker, so the bridge knows when
libzmq has let go of them; smaller ones (and refusals) are bounded by the socket's per-peer send
high-water mark, ``HWM_PER_REQUEST`` messages per allowed request. A reply for a peer that is gone
is dropped at once (ZMQ_ROUTER_MANDATORY).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import zmq
import zmq.asyncio

from bridges import metering, request_ids
from bridges.budget import ClientLimits, Usage
from bridges.catalog import metadata as model_metadata
from bridges.errors import RequestError
from bridges.gateway import GRACEFUL_SHUTDOWN_S, Gateway
from bridges.metering import clock
from bridges.pipeline import Answer, Pipeline
from inferoxy import curve, metrics
from inferoxy.bus import plain_socket
from inferoxy.curve import CurveServer
from inferoxy.protocol import ErrorCode, InferoxyError
from inferoxy.reactor import send_nowait
from inferoxy.settings import Settings
from inferoxy.wire import check_tensors, pack_header, unpack_header

log = logging.getLogger(__name__)

MAX_ID_BYTES = 128
# How often peers whose replies libzmq has all let go of are forgotten.
SWEEP_S = 1.0
# Replies this large are tracked until libzmq has written them; smaller ones are copied by pyzmq.
TRACK_FROM_BYTES = 4096
# The client socket's send high-water mark, in messages per allowed outstanding request: generous,
# because libzmq drops what passes it even for a client that reads (its I/O thread lags a burst).
HWM_PER_REQUEST = 10
MIN_HWM = 1000


class _Peer(Usage):
    """One client's usage, with its large replies that libzmq may still hold (tracker, bytes), oldest first."""

    __slots__ = ("unsent",)

    def __init__(self) -> None:
        super().__init__()
        self.unsent: collections.deque[tuple[zmq.MessageTracker, int]] = collections.deque()

    def prune(self) -> None:
        # libzmq writes a peer's messages in order, so the oldest tracker finishes first.
        unsent = self.unsent
        while unsent and unsent[0][0].done:
            _, size = unsent.popleft()
            self.add(-1, -size)


class ZmqBridge:
    name = "zmq_bridge"

    def __init__(self, settings: Settings, ctx: zmq.asyncio.Context, *, gateway: Gateway | None = None) -> None:
        self.settings = settings
        self.ctx = ctx
        self.gateway = gateway if gateway is not None else Gateway(settings, ctx)
        self.pipeline = Pipeline(self.gateway, "zmq")
        self.url = f"tcp://{settings.bind_host}:{settings.zmq_port}"
        self._sock: zmq.Socket[Any] | None = None
        self.limits = ClientLimits(settings, "ZeroMQ client")
        self._peers: dict[bytes, _Peer] = {}

    async def run(self, ready: asyncio.Event) -> None:
        sock = plain_socket(
            self.ctx,
            zmq.ROUTER,
            bind=self.url,
            max_message_bytes=self.settings.max_message_bytes,
            # Per peer: small replies a client has not read beyond this are dropped (it is refused by then).
            hwm=max(MIN_HWM, HWM_PER_REQUEST * self.settings.client_max_outstanding),
            curve_server=client_encryption(self.settings),
        )
        sock.copy_threshold = TRACK_FROM_BYTES
        self._sock = sock
        reactor = self.gateway.reactor
        sweeper = asyncio.create_task(self._sweep(), name="zmq-bridge-peers")
        try:
            await self.gateway.start()
            # The gateway's reactor drains both sockets: a reply to the client is sent from the same
            # pass that read it from the batch manager.
            reactor.add(sock, self._handle)
            # Ready means able to answer: until the registry is read every request would be refused.
            await self.gateway.registry_loaded.wait()
            ready.set()
            log.info("ZeroMQ bridge listening on %s", self.url)
            await asyncio.Future()  # everything happens in reactor callbacks until cancelled
        finally:
            # Stop reading new requests, give those in flight a moment to be answered, then fail the rest.
            reactor.remove(sock)
            sweeper.cancel()
            try:
                await self.gateway.wait_idle(GRACEFUL_SHUTDOWN_S)
            finally:
                await self.gateway.close()
                sock.close()
                self._sock = None
                metering.flush_all()  # the last counts, before the process ends

    @property
    def peers(self) -> int:
        """How many clients the bridge keeps usage for (for tests: it must come back to 0)."""
        return len(self._peers)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            for identity, peer in list(self._peers.items()):
                self._forget_if_idle(identity, peer)

    def _forget_if_idle(self, identity: bytes, peer: _Peer) -> None:
        peer.prune()
        if peer.idle:
            self._peers.pop(identity, None)

    def _handle(self, message: list[Any]) -> None:
        # ROUTER prepends the peer's identity; REQ peers then send an empty delimiter frame.
        if len(message) > 1 and len(message[1]) == 0:
            envelope, body = message[:2], message[2:]
        else:
            envelope, body = message[:1], message[1:]
        started = clock()
        rid: int | str | None = None
        request_id: str | None = None  # the request's id for logs (bridges/request_ids.py); `id` only matches replies
        header: dict[str, Any] = {}
        try:
            if not body:
                raise RequestError(ErrorCode.BAD_INPUT, "empty message: a msgpack header frame is needed")
            header = unpack_header(body[0])
            request_id = request_ids.choose(header.get("request_id"))
            rid = _request_id(header)
            if "op" in header:  # not an inference (docs/PROTOCOL.md, "Other operations"): never metered as one
                self._operation(header, envelope, rid, request_id)
                return
            self._submit(header, body, envelope, rid, request_id, started)
            return
        except InferoxyError as exc:
            error = RequestError.of(exc)
        except Exception:
            log.exception("failed to handle a ZeroMQ request", extra={"request_id": request_id})
            error = RequestError(ErrorCode.INTERNAL, "the bridge failed to handle the request")
        self._send_error(envelope, rid, request_id, error.code, error.message, error.retry_after_s)
        self.pipeline.meter.record(header.get("model"), header.get("version"), error.code, started)

    def _operation(self, header: dict[str, Any], envelope: list[Any], rid: int | str, request_id: str) -> None:
        """``op: metadata``: the model version's metadata as ``GET /v2/models/{name}`` gives it (less ``serving``),
        under the same rule (open unless ``INFEROXY_AUTH_METADATA`` closes it), so a ZeroMQ client such as
        ``inferoxy batch`` learns a model's declared inputs without the REST port."""
        try:
            if header["op"] != "metadata":
                raise RequestError(ErrorCode.BAD_INPUT, f"'op' must be 'metadata' (or absent, to infer), not "
                                   f"{str(header['op'])[:64]!r}")
            model = header.get("model")
            version = header.get("version")
            if not isinstance(model, str) or not model:
                raise RequestError(ErrorCode.BAD_INPUT, "'model' is required and must be a non-empty string")
            if version is not None and not isinstance(version, str):
                raise RequestError(ErrorCode.BAD_INPUT, "'version' must be a string")
            self.gateway.auth.check_metadata(header.get("api_key"), model)
            spec = self.gateway.resolve(model, version).spec
        except InferoxyError as exc:
            error = RequestError.of(exc)
            self._send_error(envelope, rid, request_id, error.code, error.message, error.retry_after_s)
            return
        reply = {"id": rid, "request_id": request_id, "ok": True, "model": spec.name, "version": spec.version,
                 "metadata": model_metadata(spec, self.gateway.versions(spec.name))}
        self._send([*envelope, pack_header(reply)])

    def _submit(self, header: dict[str, Any], body: list[Any], envelope: list[Any], rid: int | str,
                request_id: str, started: float) -> None:
        model = header.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError(ErrorCode.BAD_INPUT, "'model' is required and must be a non-empty string")
        version = header.get("version")
        if version is not None and not isinstance(version, str):
            raise RequestError(ErrorCode.BAD_INPUT, "'version' must be a string")
        resolved = self.pipeline.admit(header.get("api_key"), model, version)
        params = header.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RequestError(ErrorCode.BAD_INPUT, "'parameters' must be a map")
        size = sum(len(frame) for frame in body)
        if size > self.settings.max_message_bytes:
            raise RequestError(
                ErrorCode.BAD_INPUT,
                f"the message is {size} bytes, more than the limit of {self.settings.max_message_bytes}",
            )
        frames = body[1:]
        # Clients' BYTES data enters the bus here: its lengths are walked once, now (wire.scan_bytes).
        metas = check_tensors(header, frames, scan_bytes=True)
        prepared = self.pipeline.prepare(resolved, metas, frames, params, timeout_ms=header.get("timeout_ms"),
                                         request_id=request_id)
        identity = bytes(envelope[0].bytes if isinstance(envelope[0], zmq.Frame) else envelope[0])
        peer = self._peers.get(identity)
        if peer is None:
            peer = self._peers[identity] = _Peer()
        peer.prune()
        self.limits.admit(peer, size)

        meter = self.pipeline.meter

        def answer(outcome: Answer | RequestError) -> None:
            peer.add(-1, -size)
            if isinstance(outcome, Answer):
                self._send_reply(envelope, rid, request_id, outcome, peer)
                meter.record(model, version, metrics.OK, started)
            else:
                self._send_error(envelope, rid, request_id, outcome.code, outcome.message)
                meter.record(model, version, outcome.code, started)
            self._forget_if_idle(identity, peer)

        try:
            self.pipeline.start(prepared, answer)
        except RequestError:
            peer.add(-1, -size)
            self._forget_if_idle(identity, peer)
            raise

    def _send_reply(self, envelope: list[Any], rid: int | str, request_id: str, reply: Answer, peer: _Peer) -> None:
        out = {"id": rid, "request_id": request_id, "ok": True, "model": reply.model, "version": reply.version,
               "tensors": reply.metas}
        sock = self._sock
        if sock is None:
            return
        tracked = send_tracked(sock, [*envelope, pack_header(out), *reply.frames])
        if tracked is None:
            log.debug("dropped a reply for a client that is gone or not reading")
        elif not tracked.done:
            # Counted against the client until libzmq has written it out (or dropped it with the peer).
            size = sum(len(frame) for frame in reply.frames)
            peer.add(1, size)
            peer.unsent.append((tracked, size))

    def _send_error(
        self, envelope: list[Any], rid: int | str | None, request_id: str | None, code: str, message: str,
        retry_after_s: float | None = None,
    ) -> None:
        error: dict[str, Any] = {"code": code, "message": message}
        if retry_after_s is not None:
            error["retry_after_ms"] = max(1, round(retry_after_s * 1000))
        reply: dict[str, Any] = {"id": rid, "ok": False, "error": error}
        if request_id is not None:  # None: the header could not be read, so no id was chosen
            reply["request_id"] = request_id
        self._send([*envelope, pack_header(reply)])

    def _send(self, frames: list[Any]) -> None:
        sock = self._sock
        # False when the client has gone or stopped reading (its queue is full): nobody to tell.
        if sock is not None and not send_nowait(sock, frames):
            log.debug("dropped a reply for a client that is gone or not reading")


def send_tracked(sock: zmq.Socket[Any], frames: list[Any]) -> zmq.MessageTracker | None:
    """``send_nowait`` that tracks the message's last frame of at least ``sock.copy_threshold`` bytes (pyzmq
    copies smaller ones, which then need no tracking). Returns that frame's tracker (a finished one when no
    frame is that large), or None when the message was dropped (the peer is gone or its queue is full)."""
    track_from = sock.copy_threshold
    last = len(frames) - 1
    tracked = max((i for i, frame in enumerate(frames) if len(frame) >= track_from), default=-1)
    tracker: zmq.MessageTracker = zmq.MessageTracker()
    try:
        for index, frame in enumerate(frames):
            flags = _NOWAIT if index == last else _NOWAIT_MORE
            if index == tracked:
                data = frame.buffer if isinstance(frame, zmq.Frame) else frame  # a Frame object cannot be tracked
                tracker = sock.send(data, flags, copy=False, track=True)
            else:
                sock.send(frame, flags, copy=False)
    except zmq.ZMQError:  # EAGAIN (the client's queue is full), EHOSTUNREACH (the peer is gone)
        return None
    return tracker


_NOWAIT = int(zmq.NOBLOCK)
_NOWAIT_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def _request_id(header: dict[str, Any]) -> int | str:
    rid = header.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        return rid
    if isinstance(rid, str) and len(rid.encode()) <= MAX_ID_BYTES:
        return rid
    raise RequestError(
        ErrorCode.BAD_INPUT, f"'id' is required: an int or a string of at most {MAX_ID_BYTES} bytes"
    )


def client_encryption(settings: Settings) -> CurveServer | None:
    """CURVE on the clients' port when a server key is set: any client that knows the public key gets in
    (encryption, not authentication: API keys decide who may call what)."""
    if settings.zmq_curve_secret_key is None:
        return None
    return CurveServer(secret=settings.zmq_curve_secret_key.get_secret_value().encode(), domain=curve.CLIENTS,
                       check=lambda _public: True)
