"""How a bridge reaches the batch manager, and what it knows of the model registry.

(About 450 lines, a quarter of them this docstring: one job, the bridge's end of the bus link. Sending,
settling each request exactly once, deadlines, cancels and the batch manager's liveness all touch the
same table of requests in flight, so they stay together; the registry view is bridges/catalog.py.)

Each bridge owns one Gateway: one DEALER connected to ``settings.batch_manager_url``. Every
request gets an int id unique to this gateway, goes out as an ``infer`` message
(docs/PROTOCOL.md), and is settled exactly once: by the matching ``reply`` or ``error``, by its
deadline (a ``deadline`` error, and a ``cancel`` to the batch manager so it can drop the work),
or by the gateway closing, or with ``unavailable`` when the batch manager falls silent.
Answers are matched to requests by id; an id the gateway no longer holds (a late answer after the
deadline) is dropped, and an error that matches no request this gateway ever sent (the batch
manager could not read it) is logged as an error. Headers are read and built with
``inferoxy.messages`` (``BATCH_MANAGER_TO_BRIDGE``); an answer that codec refuses fails the request
it names (``peek_id``) as ``internal`` at once, rather than leaving it to its deadline.

The hot path is callback based (``start_request``): the ZeroMQ bridge answers from the
callback without a task or a future per request. ``submit`` wraps it for handlers that await.
The DEALER is read by a ``Reactor`` (inferoxy/reactor.py) that the ZeroMQ bridge shares for its
client socket, so one drain serves both sides.

Heartbeats: the gateway sends ``hb`` every heartbeat interval and the batch manager answers each
one. When nothing comes back for ``heartbeat_interval_s x heartbeat_liveness`` the batch manager
is taken as lost (killed, stopped, or restarting): every request in flight fails ``unavailable``
(the batch manager that held it is gone) and new ones are refused ``unavailable`` at once, until
it is heard again. ZeroMQ reconnects the DEALER to a restarted batch manager by itself; the
batch manager's answers carry its ``epoch`` (fresh each run), so a restart quicker than the
silence limit is noticed too, and what the old run held fails ``unavailable`` at once.

The gateway also follows the model registry in Redis in a background task, so a bridge
answers unknown models, input errors and metadata without a round trip (``Catalog``,
bridges/catalog.py, holds what it read).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import zmq
import zmq.asyncio

from bridges.auth import Authorizer
from bridges.catalog import Catalog, Readiness, ResolvedModel
from bridges.errors import RequestError
from inferoxy import curve
from inferoxy import messages as m
from inferoxy.bus import plain_socket
from inferoxy.liveness import PeerLiveness
from inferoxy.protocol import ErrorCode
from inferoxy.reactor import Reactor, send_nowait
from inferoxy.settings import Settings
from inferoxy.tasks import cancel_and_wait
from inferoxy.wire import MAX_HEADER_BYTES, Frame, WireError
from model_manager.spec import ModelStatus
from model_manager.store import Registry, SpecStore, open_store

log = logging.getLogger(__name__)

DEFAULT_MAX_OUTSTANDING = 10_000
SERVER_NAME = "inferoxy"
# Open Inference Protocol extensions the REST and gRPC bridges serve, as server metadata lists them.
EXTENSIONS = ["binary_tensor_data", "parameters", "sequence", "image_upload", "model_repository", "model_configuration",
              "statistics"]
# How long start() waits for the first registry snapshot before the bridge serves anyway (refusing until it loads).
REGISTRY_WAIT_S = 5.0
# How long a stopping bridge lets requests in flight finish before failing them. Short enough that the bridges'
# wait, the task manager's drain and container removal fit inside `docker stop`'s 10 s with room to spare.
GRACEFUL_SHUTDOWN_S = 3


class Reply(NamedTuple):
    """The batch manager's answer: its ``reply`` header (``model``, ``version``, ``tensors``) and frames."""

    header: m.Reply
    frames: list[Any]


Outcome = Reply | RequestError
Callback = Callable[[Outcome], None]


def server_version() -> str:
    try:
        from importlib.metadata import version

        return version("inferoxy")
    except Exception:  # running from a checkout that was never installed
        return "0.1.0"


class _Pending:
    __slots__ = ("callback", "timeout_s", "timer", "request_id")

    def __init__(self, callback: Callback, timeout_s: float, timer: asyncio.TimerHandle,
                 request_id: str | None = None) -> None:
        self.callback = callback
        self.timeout_s = timeout_s
        self.timer = timer
        self.request_id = request_id  # only to name the request in a log line


class Gateway:
    """A bridge's connection to the batch manager and its view of the model registry."""

    def __init__(
        self,
        settings: Settings,
        ctx: zmq.asyncio.Context,
        *,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
        store: SpecStore | None = None,
    ) -> None:
        self.settings = settings
        self.max_outstanding = max_outstanding
        self.catalog = Catalog()
        # Set once the first registry snapshot is in; REST's /v2/health/ready follows it.
        self.registry_loaded = asyncio.Event()
        self.reactor = Reactor()
        # API keys (bridges/auth.py): every bridge checks a request with ``auth.check`` before resolving it.
        self.auth = Authorizer(settings)
        self.auth.on_loaded = self._maybe_loaded
        self._ctx = ctx
        self._store = store
        self._sock: zmq.Socket[Any] | None = None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._last_id = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle_waiter: asyncio.Future[None] | None = None
        self._batch_manager: PeerLiveness | None = None  # set by start()
        self._batch_manager_epoch: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the batch manager and start following the registry."""
        self._loop = asyncio.get_running_loop()
        if self._store is None:
            # Raises at once when no Redis is configured, so a misconfigured bridge fails to start.
            self._store = open_store(self.settings.redis_url, self.settings.redis_prefix)
        url = self.settings.batch_manager_url
        self._sock = plain_socket(self._ctx, zmq.DEALER, connect=url,
                                  curve_client=curve.client_for(self.settings.bus_key_secret, curve.BATCH_MANAGER, url))
        self._batch_manager = PeerLiveness(self.settings.heartbeat_interval_s, self.settings.heartbeat_liveness,
                                           self._loop.time())
        self.reactor.add(self._sock, self._dispatch)
        self._tasks = [asyncio.create_task(self._store.watch(self._on_registry), name="gateway-registry"),
                       asyncio.create_task(self._heartbeat(), name="gateway-heartbeat")]
        self.auth.start(self._store.client, self._store.prefix)
        # A bridge that answers before it knows the models refuses every request (not_ready); a restarted one
        # would cost clients errors for nothing. Wait a little for the first snapshot, as the batch manager does.
        loaded = asyncio.create_task(self.registry_loaded.wait())
        await asyncio.wait({loaded, self._tasks[0]}, timeout=REGISTRY_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        loaded.cancel()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight, for at most ``timeout_s``; True if none is."""
        if not self._pending:
            return True
        self._idle_waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._idle_waiter), timeout_s)
        except asyncio.TimeoutError:
            return False
        finally:
            self._idle_waiter = None
        return True

    def _settled_one(self) -> None:
        waiter = self._idle_waiter
        if waiter is not None and not self._pending and not waiter.done():
            waiter.set_result(None)

    async def close(self) -> None:
        """Stop; requests still waiting are answered with ``not_ready``."""
        await cancel_and_wait(self._tasks)
        self._tasks = []
        await self.auth.close()
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.timer.cancel()
            _settle(entry, RequestError(ErrorCode.NOT_READY, "the bridge is shutting down"))
        if self._sock is not None:
            self.reactor.remove(self._sock)
            self._sock.close()
            self._sock = None
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.close()
            self._store = None

    # -- the batch manager's liveness ----------------------------------------------------------

    @property
    def batch_manager_lost(self) -> bool:
        """True while the batch manager is silent past the heartbeat limit."""
        return self._batch_manager is not None and self._batch_manager.lost

    async def _heartbeat(self) -> None:
        header = m.encode(m.Heartbeat())
        peer, loop = self._batch_manager, self._loop
        assert peer is not None and loop is not None
        while True:
            if self._sock is not None:
                send_nowait(self._sock, [header])  # a full queue: the batch manager is not reading, a loss too
                # Read what waits first: if this bridge was the one frozen, the batch manager's answers are there.
                self.reactor.wake()
            if peer.check(loop.time()):
                silent_s = peer.silent_for(loop.time())
                log.warning("the batch manager at %s is silent (%.1fs); refusing new requests until it answers "
                            "again", self.settings.batch_manager_url, silent_s)
                self._fail_in_flight(f"the batch manager stopped answering ({silent_s:.1f}s without a heartbeat); "
                                     "retry shortly")
            await asyncio.sleep(peer.next_check_s(loop.time()))

    def _fail_in_flight(self, message: str) -> None:
        """The batch manager is gone (or restarted): what it held will never be answered, so answer it now."""
        pending, self._pending = self._pending, {}
        if pending:
            log.warning("failing %d request(s) in flight: %s", len(pending), message)
        for entry in pending.values():
            entry.timer.cancel()
            _settle(entry, RequestError(ErrorCode.UNAVAILABLE, message))
        self._settled_one()
        self.reactor.wake_soon()  # callbacks may have sent replies to clients

    def _heard_batch_manager(self, epoch: str | None) -> None:
        peer, loop = self._batch_manager, self._loop
        if peer is not None and loop is not None and peer.heard(loop.time()):
            log.info("the batch manager at %s answers again; taking requests", self.settings.batch_manager_url)
        if epoch is not None and epoch != self._batch_manager_epoch:
            if self._batch_manager_epoch is not None:
                self._fail_in_flight("the batch manager restarted and lost the request; retry")
            self._batch_manager_epoch = epoch

    # -- the registry (bridges/catalog.py) ----------------------------------------------------------

    @property
    def registry(self) -> Registry | None:
        return self.catalog.registry

    def _on_registry(self, registry: Registry) -> None:
        self.catalog.apply(registry)
        self._maybe_loaded()

    def _maybe_loaded(self) -> None:
        # Loaded once both the models and the API keys are read: before that a request could be refused wrongly.
        if self.catalog.registry is not None and self.auth.loaded.is_set():
            self.registry_loaded.set()

    def resolve(self, name: str, version: str | None = None) -> ResolvedModel:
        """The model a request for ``name`` (at ``version``, else the default) goes to."""
        return self.catalog.resolve(name, version)

    async def readiness(self, name: str, version: str | None = None) -> Readiness:
        """A model version's readiness (``Catalog.readiness``)."""
        return await self.catalog.readiness(self._store, name, version)

    async def statuses(self) -> dict[str, ModelStatus]:
        """Every model version's serving status in Redis, by ``name/version`` (the dashboard's overview)."""
        if self._store is None:
            raise RequestError(ErrorCode.NOT_READY, "the bridge is not connected to the model registry")
        return await self._store.statuses()

    def versions(self, name: str) -> list[str]:
        """Every registered version of ``name``, in version order."""
        return self.catalog.versions(name)

    # -- requests ----------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def default_timeout(self, requested_s: float | None) -> float:
        """The deadline a request runs under: its own when given, never longer than the server's."""
        limit = self.settings.request_timeout_s
        return limit if requested_s is None else min(requested_s, limit)

    def start_request(
        self,
        model: str,
        version: str | None,
        tensors: list[m.TensorMeta],
        frames: Sequence[Frame],
        timeout_s: float,
        callback: Callback,
        *,
        params: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> int:
        """Send one request; ``callback`` gets its outcome exactly once, later, from the event loop.

        ``tensors`` describes the inputs, one per frame; the frames go out untouched. ``params`` are
        the request parameters (``batch_manager.params``); ``request_id`` its id (``bridges.request_ids``),
        which travels with it to the replica for log lines. Raises RequestError (``overloaded``) instead of
        queueing past ``max_outstanding`` or when the batch manager's socket is full; the callback is then
        never called. Returns the request's id, for ``cancel``.
        """
        sock, loop = self._sock, self._loop
        if sock is None or loop is None:
            raise RequestError(ErrorCode.NOT_READY, "the bridge is not connected to the batch manager")
        if self.batch_manager_lost:
            raise RequestError(ErrorCode.UNAVAILABLE, "the batch manager is not answering (restarting?); retry shortly")
        if len(self._pending) >= self.max_outstanding:
            raise RequestError(
                ErrorCode.OVERLOADED, f"{self.max_outstanding} requests are already in flight; retry later"
            )
        rid = self._last_id = next(self._ids)
        packed = m.encode(m.Infer(rid, model, version, max(1, math.ceil(timeout_s * 1000)), params or {}, tensors,
                                  request_id))
        self._check_size(packed, frames)
        if not send_nowait(sock, [packed, *frames]):
            raise RequestError(ErrorCode.OVERLOADED, "the batch manager's queue is full; retry later")
        self.reactor.wake_soon()
        timer = loop.call_later(timeout_s, self._expire, rid)
        self._pending[rid] = _Pending(callback, timeout_s, timer, request_id)
        if log.isEnabledFor(logging.DEBUG):  # one line per request, and only when asked for: this is the hot path
            log.debug("request %d for %s/%s sent, timeout %g s", rid, model, version or "default", timeout_s,
                      extra={"request_id": request_id, "model": model})
        return rid

    def _check_size(self, packed: bytes, frames: Sequence[Frame]) -> None:
        if len(packed) > MAX_HEADER_BYTES:
            raise RequestError(
                ErrorCode.BAD_INPUT,
                f"the request's header (names, shapes, parameters) takes {len(packed)} bytes, more than the "
                f"bus limit of {MAX_HEADER_BYTES}",
            )
        limit = self.settings.max_message_bytes
        size = len(packed) + sum(len(frame) for frame in frames)
        if size > limit:
            raise RequestError(
                ErrorCode.BAD_INPUT,
                f"the request's tensors take {size} bytes, more than the message limit of {limit} "
                "(INFEROXY_MAX_MESSAGE_BYTES)",
            )

    def cancel(self, rid: int) -> None:
        """The client gave up: forget the request and let the batch manager drop it if it still queues it.

        Its callback is never called."""
        entry = self._pending.pop(rid, None)
        if entry is None:
            return
        entry.timer.cancel()
        self._settled_one()
        if self._sock is not None:
            send_nowait(self._sock, [m.encode(m.Cancel(rid))])
            self.reactor.wake_soon()

    async def submit(
        self,
        model: str,
        version: str | None,
        tensors: list[m.TensorMeta],
        frames: Sequence[Frame],
        timeout_s: float,
        *,
        params: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> tuple[m.Reply, list[Any]]:
        """``start_request`` for callers that await: the reply header and frames, or RequestError."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

        def settle(outcome: Outcome) -> None:
            if not future.done():  # the awaiting handler may have been cancelled meanwhile
                future.set_result(outcome)

        rid = self.start_request(model, version, tensors, frames, timeout_s, settle, params=params,
                                 request_id=request_id)
        try:
            outcome = await future
        except asyncio.CancelledError:
            # The caller went away (a gRPC client cancelled, an HTTP client disconnected).
            self.cancel(rid)
            raise
        if isinstance(outcome, RequestError):
            raise outcome
        return outcome.header, outcome.frames

    def _expire(self, rid: int) -> None:
        entry = self._pending.get(rid)
        if entry is None:
            return
        self.cancel(rid)
        _settle(
            entry,
            RequestError(ErrorCode.DEADLINE, f"no answer within the request's timeout of {entry.timeout_s:g}s"),
        )
        self.reactor.wake_soon()  # this ran from a timer, and the callback may have sent too

    def _dispatch(self, message: list[Any]) -> None:
        try:
            answer = m.BATCH_MANAGER_TO_BRIDGE.decode(message[0])
        except WireError as exc:
            self._malformed(message[0], exc)
            return
        if isinstance(answer, m.Heartbeat):
            self._heard_batch_manager(answer.epoch)
            return
        self._heard_batch_manager(None)
        entry = self._pending.pop(answer.id, None) if answer.id is not None else None
        if entry is None:
            self._unmatched(answer)
            return
        entry.timer.cancel()
        self._settled_one()
        outcome: Outcome
        if isinstance(answer, m.Error):
            outcome = RequestError(answer.code, answer.message or "the request failed")
        elif len(answer.tensors) == len(message) - 1:
            outcome = Reply(answer, message[1:])
        else:
            outcome = _malformed_answer(f"{len(answer.tensors)} tensors described, {len(message) - 1} frames sent")
        _settle(entry, outcome)

    def _malformed(self, frame: Frame, exc: WireError) -> None:
        """An answer the codec refused: the request it names (if it can be read) fails now, not at its deadline."""
        rid = m.peek_id(frame)
        entry = self._pending.pop(rid, None) if rid is not None else None
        log.error("the batch manager sent a message this bridge cannot read: %s", exc,
                  extra={"request_id": entry.request_id if entry is not None else None})
        if entry is not None:
            entry.timer.cancel()
            self._settled_one()
            _settle(entry, _malformed_answer(str(exc)))

    def _unmatched(self, answer: m.Reply | m.Error) -> None:
        """An answer no request waits for. A late one (its request timed out or was cancelled) is normal;
        an error for an id this gateway never issued means the batch manager could not read a request,
        whose client then waits for its deadline, so it is logged loudly."""
        rid = answer.id
        # Ids count up from 1, so every id up to the last one handed out has been issued.
        issued = rid is not None and 0 < rid <= self._last_id
        if isinstance(answer, m.Reply):
            log.debug("dropping a late reply for request %r", rid)
        elif not issued:
            log.error("the batch manager sent an error for no request of this bridge (id %r): %s: %s",
                      rid, answer.code, _clip(answer.message))
        elif answer.code != ErrorCode.DEADLINE.value:
            log.warning("the batch manager's %s error for request %r came after the request was settled: %s",
                        answer.code, rid, _clip(answer.message))
        else:
            log.debug("dropping a late deadline error for request %r", rid)


def _malformed_answer(why: str) -> RequestError:
    return RequestError(ErrorCode.INTERNAL, f"the batch manager sent a malformed answer: {why}")


def _clip(text: Any) -> str:
    shown = str(text)
    return shown if len(shown) <= 300 else shown[:297] + "..."


def _settle(entry: _Pending, outcome: Outcome) -> None:
    # A failing callback is a bug in one bridge handler; it must not stop the receive loop.
    try:
        entry.callback(outcome)
    except Exception:
        log.exception("request callback failed", extra={"request_id": entry.request_id})
