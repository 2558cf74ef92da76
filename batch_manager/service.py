"""The batch manager component: bridges' requests in, batches out to the task manager, replies back.

(About 455 lines: every socket event, timer and metrics flush of the batch manager lands here, each
handler a few lines turning one message into one scheduler call; the decisions live in the scheduler.)

It binds a ROUTER for bridges (``batch_manager_url``) and dials the task manager with a
DEALER (``task_manager_url``). Only headers are decoded; array frames are handed from one
socket to the other untouched. All decisions are the ``Scheduler``'s: this module turns
socket messages and timer expiries into scheduler calls and performs the actions it returns.

Everything after a receive is synchronous and sends without waiting, so one wake-up
drains a burst of messages (``reactor.Reactor``, which reads the sockets without
zmq.asyncio's per-message futures); the only timer is armed for the scheduler's next
wake-up, never a polling tick.

Liveness (docs/ARCHITECTURE.md, "When a component dies"): each bridge sends ``hb`` and is
answered at once with this run's ``epoch``, so a bridge notices a silent or restarted batch
manager. The task manager sends ``hb`` (carrying its own ``epoch``) and so does the batch
manager. When the task manager is silent for ``heartbeat_interval_s x heartbeat_liveness``, or
a new epoch shows it restarted, the replicas it announced are dropped (``replica_down``: their
batches are retried once or fail ``replica_lost``) until the task manager announces them again.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Iterable
from typing import Any

import zmq
import zmq.asyncio

from batch_manager.load_report import LOAD_REPORT_S, LoadReporter
from batch_manager.messages import ReplicaId
from batch_manager.params import parse_params
from batch_manager.recorder import Recorder
from batch_manager.scheduler import Action, Dispatch, ModelDrained, Reply, Request, Scheduler
from inferoxy import curve, envelope, metrics
from inferoxy import messages as m
from inferoxy.bus import plain_socket
from inferoxy.liveness import PeerLiveness
from inferoxy.protocol import ErrorCode
from inferoxy.reactor import Reactor, send_nowait
from inferoxy.settings import Settings
from inferoxy.tasks import cancel_and_wait
from inferoxy.wire import WireError, check_tensors
from model_manager.store import Registry, open_store

log = logging.getLogger(__name__)

# How long start-up waits for the first registry snapshot; requests before it are answered not_ready.
REGISTRY_WAIT_S = 5.0
# High-water marks (messages per peer; docs/BATCHING.md). Bridges: far above any bridge's max_outstanding,
# so only a bridge that stopped reading fills it, and its replies are dropped (it has timed them out).
# Task manager: batches are bounded by credit (capacity per replica), results likewise.
BRIDGE_HWM = 100_000
TASK_MANAGER_HWM = 100_000


class BatchManager:
    name = "batch_manager"

    def __init__(self, settings: Settings, ctx: zmq.asyncio.Context, *, max_queue_size: int | None = None) -> None:
        self.settings = settings
        self.ctx = ctx
        self.scheduler = Scheduler(max_queue_size=max_queue_size or settings.max_queue_size,
                                   priority_aging_s=settings.priority_aging_ms / 1000.0,
                                   max_batch_bytes=settings.max_message_bytes)
        self.recorder = Recorder(self.scheduler)
        self.load_reporter = LoadReporter()
        self._metrics_due: asyncio.TimerHandle | None = None
        self._default_timeout_s = settings.request_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        # Plain sockets: the reactor reads them, sends never wait.
        self._bridges: zmq.Socket[Any] | None = None
        self._task_manager: zmq.Socket[Any] | None = None
        self._reactor: Reactor | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._registry_loaded = asyncio.Event()
        # Liveness of the peers (set up in run()): the task manager, its run's epoch, the replicas it
        # announced (dropped together when it is lost), and when each bridge was last heard.
        self._tm_peer: PeerLiveness | None = None
        self._tm_epoch: str | None = None
        self._tm_replicas: set[ReplicaId] = set()
        self._bridges_heard: dict[bytes, float] = {}
        self.epoch = os.urandom(8).hex()  # fresh each run: bridges tell a restart by it

    async def run(self, ready: asyncio.Event) -> None:
        settings = self.settings
        self._loop = asyncio.get_running_loop()
        self._tm_peer = PeerLiveness(settings.heartbeat_interval_s, settings.heartbeat_liveness, self._now())
        store = open_store(settings.redis_url, settings.redis_prefix)
        sockets: list[zmq.Socket[Any]] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            # High-water marks (docs/BATCHING.md): above the most messages the queue bounds and credit let
            # through, so reaching one means a peer stopped reading; sends never wait and count as failed then.
            bus_secret = settings.bus_key_secret
            sockets.append(plain_socket(
                self.ctx, zmq.ROUTER, bind=settings.batch_manager_url, max_message_bytes=settings.max_message_bytes,
                hwm=BRIDGE_HWM,
                curve_server=curve.server_for(bus_secret, curve.BATCH_MANAGER, settings.batch_manager_url)))
            sockets.append(plain_socket(
                self.ctx, zmq.DEALER, connect=settings.task_manager_url, hwm=TASK_MANAGER_HWM,
                curve_client=curve.client_for(bus_secret, curve.TASK_MANAGER, settings.task_manager_url)))
            self._bridges, self._task_manager = sockets
            tasks.append(asyncio.create_task(store.watch(self._on_registry), name="batch_manager.registry"))
            loaded = asyncio.create_task(self._registry_loaded.wait())
            await asyncio.wait({loaded, tasks[0]}, timeout=REGISTRY_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
            loaded.cancel()
            if not self._registry_loaded.is_set():
                log.warning("no model registry after %.0fs; requests are refused until it loads", REGISTRY_WAIT_S)
            self._reactor = Reactor(after_drain=self._after_drain)
            self._reactor.add(self._bridges, self._on_bridge_message)
            self._reactor.add(self._task_manager, self._on_task_manager_message)
            tasks.append(asyncio.create_task(self._heartbeat(), name="batch_manager.heartbeat"))
            tasks.append(asyncio.create_task(self._report_load_periodically(), name="batch_manager.load"))
            self._reactor.wake()  # anything that arrived before the reader was registered
            ready.set()
            log.info("batch manager serving bridges on %s, task manager at %s",
                     settings.batch_manager_url, settings.task_manager_url)
            # Each task runs until cancelled; one that ends has failed, and takes the component down with it.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise RuntimeError("a batch manager task stopped")
        finally:
            if self._bridges is not None:
                # Bridges still connected hear now rather than at their own timeout.
                self._perform(self.scheduler.fail_all(ErrorCode.NOT_READY, "the batch manager is stopping"))
            if self._metrics_due is not None:
                self._metrics_due.cancel()
            self._flush_metrics()
            if self._reactor is not None:
                self._reactor.close()
                self._reactor = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_at = None
            await cancel_and_wait(tasks)
            self._bridges = self._task_manager = None
            for sock in sockets:
                sock.close()
            await store.close()

    async def _heartbeat(self) -> None:
        header = m.encode(m.Heartbeat())
        peer = self._tm_peer
        assert peer is not None
        while True:
            # The first one makes a task manager that never heard of us announce its replicas.
            self._send(self._task_manager, [header])
            # Read what waits first: if we were the one frozen (SIGSTOP, a stalled loop), peers' beats are there.
            self._wake()
            now = self._now()
            if peer.check(now):
                self._lose_task_manager(f"the task manager is silent ({peer.silent_for(now):.1f}s without a "
                                        "heartbeat)")
            self._forget_silent_bridges(now, peer.limit_s)
            self._wake()
            await asyncio.sleep(peer.next_check_s(self._now()))

    async def _report_load_periodically(self) -> None:
        while True:
            await asyncio.sleep(LOAD_REPORT_S)
            self._report_load()
            self._wake()

    def _report_load(self) -> None:
        report = self.load_reporter.report(self.scheduler.load())
        if report is not None:
            self._send(self._task_manager, [m.encode(report)])

    def _lose_task_manager(self, why: str) -> None:
        """Drop every replica the task manager announced: it is gone, or restarted and lost them."""
        lost, self._tm_replicas = list(self._tm_replicas), set()
        log.warning("%s; dropping its %d replica(s) until it announces them again", why, len(lost))
        for replica in lost:
            self._perform(self.scheduler.replica_down(replica, why, self._now()))

    def _heard_task_manager(self, epoch: str | None) -> None:
        peer = self._tm_peer
        if peer is not None and peer.heard(self._now()):
            # It may never have noticed our silence, and then would not announce its replicas again unasked.
            log.info("the task manager answers again; asking it for its replicas")
            self._send(self._task_manager, [m.encode(m.Heartbeat(resync=True))])
        if epoch is not None and epoch != self._tm_epoch:
            if self._tm_epoch is not None and self._tm_replicas:
                self._lose_task_manager("the task manager restarted")
            self._tm_epoch = epoch

    def _on_bridge_heartbeat(self, identity: bytes) -> None:
        if identity not in self._bridges_heard:
            log.info("bridge %s connected", identity.hex())
        self._bridges_heard[identity] = self._now()
        self._send_encoded(identity, m.encode(m.Heartbeat(epoch=self.epoch)))

    def _forget_silent_bridges(self, now: float, limit_s: float) -> None:
        # Their replies are dropped anyway (the bridge failed those requests); this keeps the table bounded.
        for identity, heard in list(self._bridges_heard.items()):
            if now - heard > limit_s:
                log.info("bridge %s went silent; forgetting it", identity.hex())
                del self._bridges_heard[identity]

    def _on_bridge_message(self, message: list[Any]) -> None:
        identity: bytes = message[0].bytes
        request_id: int | None = None
        rid: str | None = None  # the request's own id, for the log line if handling it fails
        try:
            if len(message) < 2:
                raise WireError("empty message: a header frame is required")
            try:
                msg = m.BRIDGE_TO_BATCH_MANAGER.decode(message[1])
            except WireError:
                # The reply still names the request when only another field was wrong.
                request_id = m.peek_id(message[1])
                raise
            if isinstance(msg, m.Infer):
                request_id, rid = msg.id, msg.rid
                self._on_infer(identity, msg, message[2:], len(message[1]))
            elif isinstance(msg, m.Heartbeat):
                self._on_bridge_heartbeat(identity)
            else:
                request_id = msg.id
                self._perform(self.scheduler.cancel((identity, msg.id), self._now()))
        except WireError as exc:
            self._send_encoded(identity, m.encode(m.Error(request_id, ErrorCode.BAD_INPUT, str(exc))))
        except Exception:
            # A bug must cost one request, not the component.
            log.exception("failed to handle a message from bridge %r", identity, extra={"request_id": rid})
            self._send_encoded(identity, m.encode(m.Error(request_id, ErrorCode.INTERNAL, "internal error")))

    def _on_infer(self, identity: bytes, msg: m.Infer, frames: list[Any], header_bytes: int) -> None:
        metas = check_tensors({"tensors": msg.tensors}, frames)
        params = parse_params(msg.params)
        timeout_s = self._default_timeout_s if msg.timeout_ms is None else msg.timeout_ms / 1000.0
        now = self._now()
        request = Request((identity, msg.id), msg.model, msg.version, metas, frames, now + timeout_s, params,
                          header_bytes, msg.rid)
        if log.isEnabledFor(logging.DEBUG):  # one line per request, and only when asked for: this is the hot path
            log.debug("request %d for %s/%s, timeout %.0f ms", msg.id, msg.model, msg.version or "default",
                      timeout_s * 1000, extra={"request_id": msg.rid, "model": msg.model})
        self._perform(self.scheduler.submit(request, now))

    def _on_task_manager_message(self, message: list[Any]) -> None:
        route: tuple[str, envelope.BatchId] | None = None
        try:
            if envelope.is_envelope(message[0]):
                # A replica's answer, behind the envelope the task manager routed it by (and checked is the
                # replica's own): it, not the header, says which batch this settles.
                route = envelope.unpack(message[0])
                message = message[1:]
                if not message:
                    raise WireError("no header frame follows the routing envelope")
            try:
                msg = m.TASK_MANAGER_TO_BATCH_MANAGER.decode(message[0])
            except WireError:
                self._heard_task_manager(None)
                raise
            self._heard_task_manager(msg.epoch if isinstance(msg, m.Heartbeat) else None)
            if route is not None:
                self._check_route(route, msg)
            actions = self._on_task_manager_header(msg, message[1:])
        except envelope.EnvelopeError as exc:
            log.warning("dropping an answer from the task manager whose envelope names no batch: %s", exc)
            return
        except WireError as exc:
            # An answer that cannot be read still settles its batch: its requests hear now and the credit comes back.
            if route is None and (ref := m.peek_batch(message[0])) is not None:
                route = (ref.replica, ref.batch)
            if route is not None:
                self._fail_unreadable_answer(route, exc)
                return
            # The task manager has no error message to receive; a bad message is its bug, worth a log line.
            log.warning("dropping a malformed message from the task manager: %s", exc)
            return
        except Exception:
            log.exception("failed to handle a message from the task manager")
            return
        self._perform(actions)

    def _on_task_manager_header(self, msg: m.Message, frames: list[Any]) -> list[Action]:
        now = self._now()
        match msg:
            case m.Result(replica=replica, batch=batch_id, items=items):
                self._check_known(msg)
                try:
                    metas = check_tensors({"tensors": msg.tensors}, frames)
                except WireError as exc:
                    # The batch is known, so its requests hear about it now rather than at their deadline.
                    return self.scheduler.on_failed(replica, batch_id, ErrorCode.INTERNAL.value,
                                                    f"the replica sent a malformed result: {exc}", now)
                if msg.compute_ns is not None:
                    self.recorder.computed(replica, msg.compute_ns)
                errors = None
                if any(item.code is not None for item in items):
                    errors = [None if item.code is None else (item.code, item.message or "the item failed")
                              for item in items]
                return self.scheduler.on_result(replica, batch_id, [item.n for item in items], metas, frames, now,
                                                errors)
            case m.Failed():
                self._check_known(msg)
                return self.scheduler.on_failed(msg.replica, msg.batch, msg.code, msg.message, now)
            case m.ReplicaUp(replica=replica):
                if replica in self._tm_replicas:
                    # Within one task manager run an id is announced once until its replica_down: this is the
                    # answer to a resync, and taking it as a new replica would fail what the replica holds. Its
                    # capacity is our share now, though (a task manager that forgot us split it afresh).
                    return self.scheduler.replica_credit(replica, msg.capacity, now)
                log.info("replica %r of %s/%s is up with capacity %d", replica, msg.model, msg.version, msg.capacity)
                actions = self.scheduler.replica_up(replica, msg.model, msg.version, msg.capacity, now)
                self._tm_replicas.add(replica)
                return actions
            case m.ReplicaDown(replica=replica):
                reason = msg.reason or "replica went down"
                log.info("replica %r is down: %s", replica, reason)
                self._tm_replicas.discard(replica)
                return self.scheduler.replica_down(replica, reason, now)
            case m.ReplicaDraining(replica=replica):
                reason = msg.reason or "replica went down"
                log.info("replica %r is draining: %s%s", replica, reason, "" if not msg.sessions_grace_s else
                         f" (its sessions go on for at most {msg.sessions_grace_s:g}s)")
                return self.scheduler.replica_draining(replica, reason, now, msg.sessions_grace_s)
            case m.Credit(replica=replica):
                log.debug("our share of replica %r is now %d", replica, msg.capacity)
                actions = self.scheduler.replica_credit(replica, msg.capacity, now)
                # Echoed once applied: every batch sent under the old share is ahead of it (task_manager/credit.py).
                self._send(self._task_manager, [m.encode(msg)])
                return actions
            case m.ModelStatus():
                shown = f": {msg.reason.splitlines()[0]}" if msg.reason else ""
                log.info("model %s/%s is %s%s", msg.model, msg.version, msg.state, shown)
                return self.scheduler.model_status(msg.model, msg.version, msg.state, msg.reason or None, now)
        return []  # hb

    @staticmethod
    def _check_route(route: tuple[str, envelope.BatchId], msg: m.Message) -> None:
        if not isinstance(msg, (m.Result, m.Failed)):
            raise WireError(f"a routed message must be an answer, not {type(msg).__name__}")
        if (msg.replica, msg.batch) != route:
            raise WireError(f"the answer names batch {msg.batch!r} of replica {msg.replica!r}, "
                            f"its envelope batch {route[1]!r} of replica {route[0]!r}")

    def _fail_unreadable_answer(self, route: tuple[str, envelope.BatchId], exc: Exception) -> None:
        replica, batch_id = route
        if not isinstance(batch_id, int) or not self.scheduler.knows_batch(replica, batch_id):
            log.warning("dropping an unreadable answer for batch %r of replica %r, which matches no batch sent "
                        "here: %s", batch_id, replica, exc)
            return
        log.warning("replica %r answered batch %s unreadably; the batch fails: %s", replica, batch_id, exc)
        self._perform(self.scheduler.on_failed(replica, batch_id, ErrorCode.INTERNAL.value,
                                               f"the replica sent an unreadable answer: {exc}", self._now()))

    def _check_known(self, answer: m.Result | m.Failed) -> None:
        """An answer for a batch this batch manager never sent (or already had answered) settles nothing: say so
        loudly, since a request or a replica's credit may be waiting for the answer that went astray."""
        if not self.scheduler.knows_batch(answer.replica, answer.batch):
            detail = f" ({answer.code}: {answer.message})" if isinstance(answer, m.Failed) else ""
            log.warning("a %s from the task manager for batch %s of replica %r matches no batch sent here; "
                        "dropped%s", answer.__struct_config__.tag, answer.batch, answer.replica, detail)

    def _on_registry(self, registry: Registry) -> None:
        log.info("model registry at revision %d: %d model versions", registry.revision, len(registry))
        self._perform(self.scheduler.set_registry(registry, self._now()))
        self._wake()
        self._registry_loaded.set()

    # --- actions -------------------------------------------------------------------------------------

    def _perform(self, actions: Iterable[Action]) -> None:
        # A worklist, not recursion: a batch the task manager cannot take fails, which frees credit for the next.
        work: deque[Action] = deque(actions)
        while work:
            action = work.popleft()
            if isinstance(action, Reply):
                self._send_encoded(action.origin[0], m.encode(action.header), action.frames)
            elif isinstance(action, ModelDrained):
                log.info("model %s/%s was removed and holds no request here any more", action.model, action.version)
                if not self._send(self._task_manager, [m.encode(action.header())]):
                    log.warning("could not tell the task manager that model %s/%s drained; it stops its replicas "
                                "after its grace", action.model, action.version)
            elif self._send_batch(action):
                self.recorder.dispatched(action)
            else:
                work.extend(self.scheduler.on_failed(
                    action.replica, action.batch_id, ErrorCode.NOT_READY.value,
                    "the task manager cannot take batches now", self._now()))

    def _send_batch(self, dispatch: Dispatch) -> bool:
        # The envelope in front is all the task manager reads (inferoxy.envelope); the header travels unread.
        route = envelope.pack(dispatch.replica, dispatch.batch_id)
        return self._send(self._task_manager, [route, m.encode(dispatch.header()), *dispatch.frames])

    def _send_encoded(self, identity: bytes, header: bytes, frames: list[Any] | None = None) -> None:
        if not self._send(self._bridges, [identity, header, *(frames or ())]):
            # The bridge is gone (or its queue is full); there is no one else to tell.
            log.debug("dropped a reply to unreachable bridge %r", identity)

    @staticmethod
    def _send(sock: zmq.Socket[Any] | None, frames: list[Any]) -> bool:
        return sock is not None and send_nowait(sock, frames)

    def _wake(self) -> None:
        """After sending from outside a socket handler: a send may swallow a socket's read edge."""
        if self._reactor is not None:
            self._reactor.wake()
        else:
            self._after_drain()

    # --- time ----------------------------------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _after_drain(self) -> None:
        if self.scheduler.take_cold_demand():
            self._report_load()
        if self._metrics_due is None and self._loop is not None:
            # At most once per FLUSH_S: under load a drain carries a message or two, and each flush is
            # several locked mmap writes under serve (docs/ARCHITECTURE.md, "Decisions").
            self._metrics_due = self._loop.call_later(metrics.FLUSH_S, self._flush_metrics)
        self._arm_timer()

    def _flush_metrics(self) -> None:
        self._metrics_due = None
        self.recorder.flush()

    def _arm_timer(self) -> None:
        """Sleep exactly until the scheduler's next wake-up: no polling tick on the request path."""
        when = self.scheduler.next_wakeup()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer_at = when
        self._timer = None if when is None else self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        due = self._timer_at
        self._timer = self._timer_at = None
        try:
            # The loop may fire a timer a clock-resolution early; the scheduler must see the time it asked for.
            now = self._now() if due is None else max(self._now(), due)
            self._perform(self.scheduler.tick(now))
        except Exception:
            log.exception("batch manager timer failed")
        finally:
            self._wake()
