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
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import zmq
import zmq.asyncio

from bridges.errors import RequestError
from bridges.gateway import GRACEFUL_SHUTDOWN_S, Gateway, Outcome, Reply
from bridges.validation import check_parameters, requested_timeout_s
from inferoxy.bus import plain_socket
from inferoxy.protocol import ErrorCode
from inferoxy.reactor import send_nowait
from inferoxy.settings import Settings
from inferoxy.wire import WireError, check_tensors, pack_header, unpack_header

log = logging.getLogger(__name__)

MAX_ID_BYTES = 128


class ZmqBridge:
    name = "zmq_bridge"

    def __init__(self, settings: Settings, ctx: zmq.asyncio.Context, *, gateway: Gateway | None = None) -> None:
        self.settings = settings
        self.ctx = ctx
        self.gateway = gateway if gateway is not None else Gateway(settings, ctx)
        self.url = f"tcp://{settings.bind_host}:{settings.zmq_port}"
        self._sock: zmq.Socket[Any] | None = None

    async def run(self, ready: asyncio.Event) -> None:
        sock = plain_socket(self.ctx, zmq.ROUTER, bind=self.url, max_message_bytes=self.settings.max_message_bytes)
        self._sock = sock
        reactor = self.gateway.reactor
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
            try:
                await self.gateway.wait_idle(GRACEFUL_SHUTDOWN_S)
            finally:
                await self.gateway.close()
                sock.close()
                self._sock = None

    def _handle(self, message: list[Any]) -> None:
        # ROUTER prepends the peer's identity; REQ peers then send an empty delimiter frame.
        if len(message) > 1 and len(message[1]) == 0:
            envelope, body = message[:2], message[2:]
        else:
            envelope, body = message[:1], message[1:]
        rid: int | str | None = None
        try:
            if not body:
                raise RequestError(ErrorCode.BAD_INPUT, "empty message: a msgpack header frame is needed")
            try:
                header = unpack_header(body[0])
            except WireError as exc:
                raise RequestError(ErrorCode.BAD_INPUT, str(exc)) from None
            rid = _request_id(header)
            self._submit(header, body, envelope, rid)
        except RequestError as exc:
            self._send_error(envelope, rid, exc.code, exc.message)
        except Exception:
            log.exception("failed to handle a ZeroMQ request")
            self._send_error(envelope, rid, ErrorCode.INTERNAL.value, "the bridge failed to handle the request")

    def _submit(self, header: dict[str, Any], body: list[Any], envelope: list[Any], rid: int | str) -> None:
        model = header.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError(ErrorCode.BAD_INPUT, "'model' is required and must be a non-empty string")
        version = header.get("version")
        if version is not None and not isinstance(version, str):
            raise RequestError(ErrorCode.BAD_INPUT, "'version' must be a string")
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
        try:
            metas = check_tensors(header, frames)
        except WireError as exc:
            raise RequestError(ErrorCode.BAD_INPUT, str(exc)) from None
        requested_s = requested_timeout_s(params, header.get("timeout_ms"))
        timeout_s = self.gateway.default_timeout(requested_s)
        if requested_s is not None and (params is None or "timeout" not in params):
            # The batch manager reads a client's own deadline from the Open Inference Protocol `timeout`
            # parameter (µs); without it the model's default would apply over the client's `timeout_ms`.
            params = {**(params or {}), "timeout": int(requested_s * 1_000_000)}
        resolved = self.gateway.resolve(model, version)
        resolved.rules.check(metas)
        check_parameters(params)
        spec = resolved.spec
        internal = {"model": spec.name, "version": spec.version, "params": params, "tensors": metas}

        def answer(outcome: Outcome) -> None:
            if isinstance(outcome, Reply):
                self._send_reply(envelope, rid, outcome)
            else:
                self._send_error(envelope, rid, outcome.code, outcome.message)

        self.gateway.start_request(internal, frames, timeout_s, answer)

    def _send_reply(self, envelope: list[Any], rid: int | str, reply: Reply) -> None:
        header = reply.header
        out = {
            "id": rid,
            "ok": True,
            "model": header.get("model"),
            "version": header.get("version"),
            "tensors": header["tensors"],
        }
        self._send([*envelope, pack_header(out), *reply.frames])

    def _send_error(self, envelope: list[Any], rid: int | str | None, code: str, message: str) -> None:
        self._send([*envelope, pack_header({"id": rid, "ok": False, "error": {"code": code, "message": message}})])

    def _send(self, frames: list[Any]) -> None:
        sock = self._sock
        # False when the client has gone or stopped reading (its queue is full): nobody to tell.
        if sock is not None and not send_nowait(sock, frames):
            log.debug("dropped a reply for a client that is gone or not reading")


def _request_id(header: dict[str, Any]) -> int | str:
    rid = header.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        return rid
    if isinstance(rid, str) and len(rid.encode()) <= MAX_ID_BYTES:
        return rid
    raise RequestError(
        ErrorCode.BAD_INPUT, f"'id' is required: an int or a string of at most {MAX_ID_BYTES} bytes"
    )
