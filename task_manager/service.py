"""The task manager: keeps each model's replicas running and carries batches to them.

It binds two ROUTER sockets: one for batch managers (``task_manager_url``) and one that
replicas dial (``replica_bind_url``). Batches and their answers are forwarded as they
arrive, frames untouched; the only timer is the supervision tick, which sends heartbeats
and ends replicas that fell silent or never became ready.

A replica's life: ``starting`` (its runtime started it; only the identity we gave it is
listened to) -> ``ready`` (it said ``ready``; batch managers get ``replica_up``) -> gone
(it exited, missed heartbeats, or was stopped; batch managers get ``replica_down`` and its
unanswered batches fail with ``replica_lost``). A replica that ends unexpectedly is
replaced after an exponential backoff, which resets once a replica has served for
``restart_backoff_max_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import zmq
import zmq.asyncio

from inferoxy import bus, protocol, wire
from inferoxy.protocol import ErrorCode
from inferoxy.runtime import failed_message
from inferoxy.settings import Settings
from model_manager.store import Registry, open_store
from task_manager.replicas import (
    ModelGroup,
    Replica,
    ReplicaState,
    backoff_delay,
    replica_fields_differ,
    replica_id,
)
from task_manager.runtimes.base import ReplicaHandle, ReplicaPlan, Runtime
from task_manager.runtimes.factory import make_runtime

log = logging.getLogger(__name__)

# A reason travels in message headers and may reach clients: the first line (how it ended) and the last log lines.
MAX_REASON_CHARS = 4000
STOP_GRACE_S = 5.0  # a replica asked to stop may finish the batches it holds
KILL_GRACE_S = 1.0  # a replica that stopped answering gets little patience


class TaskManager:
    name = "task_manager"

    def __init__(self, settings: Settings, ctx: zmq.asyncio.Context, *, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self.ctx = ctx
        self.runtime = runtime
        self._groups: dict[str, ModelGroup] = {}  # by spec key, name/version
        self._replicas: dict[bytes, Replica] = {}  # by ZeroMQ identity, which is the replica id
        self._batch_managers: dict[bytes, float] = {}  # identity -> when last heard
        self._closing = False
        self._bm_sock: zmq.asyncio.Socket | None = None
        self._replica_sock: zmq.asyncio.Socket | None = None

    @property
    def _silence_limit_s(self) -> float:
        return self.settings.heartbeat_interval_s * self.settings.heartbeat_liveness

    # ------------------------------------------------------------------------------------------
    # Service

    async def run(self, ready: asyncio.Event) -> None:
        settings = self.settings
        runtime = self.runtime = self.runtime or make_runtime(settings)
        store = open_store(settings.redis_url, settings.redis_prefix)
        tasks: list[asyncio.Task[None]] = []
        try:
            self._bm_sock = bus.make_socket(self.ctx, zmq.ROUTER, bind=settings.task_manager_url,
                                            max_message_bytes=settings.max_message_bytes)
            self._replica_sock = bus.make_socket(self.ctx, zmq.ROUTER, bind=settings.replica_bind_url,
                                                 max_message_bytes=settings.max_message_bytes)
            removed = await runtime.remove_orphans()
            if removed:
                log.info("removed %d replicas an earlier run left behind", removed)
            tasks = [
                asyncio.create_task(self._serve(self._bm_sock, self._on_batch_manager_message), name="tm bm"),
                asyncio.create_task(self._serve(self._replica_sock, self._on_replica_message), name="tm replicas"),
                asyncio.create_task(self._supervise(), name="tm supervise"),
                asyncio.create_task(store.watch(self._apply_registry), name="tm registry"),
            ]
            log.info("task manager up: batch managers at %s, replicas dial %s (%s runtime)",
                     settings.task_manager_url, settings.replica_url, runtime.name)
            ready.set()
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._stop_all_replicas()
            await runtime.close()
            await store.close()
            for sock in (self._bm_sock, self._replica_sock):
                if sock is not None:
                    sock.close(linger=0)

    def status(self) -> dict[str, Any]:
        """Per model: its replicas and their states, restarts, and the last error. Read-only, JSON-able."""
        now = time.monotonic()
        return {
            key: {
                "name": group.spec.name,
                "version": group.spec.version,
                "desired": group.desired,
                "restarts": group.restarts,
                "last_error": group.last_error,
                "replicas": [
                    {
                        "id": replica.id,
                        "state": replica.state.value,
                        "pid": replica.pid,
                        "capacity": replica.capacity,
                        "in_flight": len(replica.in_flight),
                        "age_s": round(now - replica.started_at, 3),
                    }
                    for replica in group.replicas.values()
                ],
            }
            for key, group in sorted(self._groups.items())
        }

    # ------------------------------------------------------------------------------------------
    # Messages

    async def _serve(self, sock: zmq.asyncio.Socket, handle: Callable[[list[Any]], None]) -> None:
        while True:
            frames: list[Any] | None = await bus.recv(sock)
            while frames is not None:  # drain a burst in one wake-up
                try:
                    handle(frames)
                except Exception:  # one bad message must not stop the task manager
                    log.exception("error handling a message")
                frames = bus.recv_nowait(sock)

    def _on_batch_manager_message(self, frames: list[Any]) -> None:
        if len(frames) < 2:
            return
        sender = frames[0].bytes
        self._heard_batch_manager(sender)
        try:
            header = wire.unpack_header(frames[1])
        except wire.WireError as exc:
            log.warning("dropping an unreadable message from a batch manager: %s", exc)
            return
        kind = header.get("t")
        if kind == protocol.BATCH:
            self._forward_batch(sender, header, frames)
        elif kind != protocol.HEARTBEAT:
            log.warning("ignoring a %r message from a batch manager", kind)

    def _heard_batch_manager(self, sender: bytes) -> None:
        if sender not in self._batch_managers:
            # A new or restarted batch manager learns every replica it can use.
            log.info("batch manager %s connected", sender.hex())
            for replica in self._replicas.values():
                if replica.announced:
                    self._send_batch_manager(sender, self._replica_up(replica))
        self._batch_managers[sender] = time.monotonic()

    def _forward_batch(self, sender: bytes, header: Mapping[str, Any], frames: list[Any]) -> None:
        target, batch_id = header.get("replica"), header.get("batch")
        replica = self._replicas.get(target.encode()) if isinstance(target, str) else None
        if not isinstance(batch_id, (int, str)):
            problem = (ErrorCode.INTERNAL, f"batch id {batch_id!r} must be an int or a string")
        elif replica is None or replica.state is not ReplicaState.READY:
            problem = (ErrorCode.REPLICA_LOST, f"replica {target!r} is not serving")
        elif batch_id in replica.in_flight:
            problem = (ErrorCode.INTERNAL, f"batch {batch_id} is already at replica {target}")
        elif len(replica.in_flight) >= replica.capacity:
            problem = (ErrorCode.OVERLOADED, f"replica {target} already holds {replica.capacity} batches")
        elif not self._send_replica(replica, frames[1:]):
            problem = (ErrorCode.REPLICA_LOST, f"replica {target} is not connected")
        else:
            replica.in_flight[batch_id] = sender
            return
        code, message = problem
        self._send_batch_manager(sender, failed_message(str(target), batch_id, code, message))

    def _on_replica_message(self, frames: list[Any]) -> None:
        if len(frames) < 2:
            return
        replica = self._replicas.get(frames[0].bytes)
        if replica is None:
            return  # not a replica we started (or one we already gave up on)
        replica.last_seen = time.monotonic()
        try:
            header = wire.unpack_header(frames[1])
        except wire.WireError as exc:
            log.warning("dropping an unreadable message from replica %s: %s", replica.id, exc)
            return
        kind = header.get("t")
        if kind == protocol.READY:
            self._on_ready(replica, header)
        elif kind in (protocol.RESULT, protocol.FAILED):
            self._on_answer(replica, header, frames)
        elif kind != protocol.HEARTBEAT:
            log.warning("ignoring a %r message from replica %s", kind, replica.id)

    def _on_ready(self, replica: Replica, header: Mapping[str, Any]) -> None:
        if replica.state is not ReplicaState.STARTING:
            return
        capacity, pid = header.get("capacity"), header.get("pid")
        replica.capacity = capacity if isinstance(capacity, int) and capacity >= 1 else 1
        replica.pid = pid if isinstance(pid, int) else None
        replica.state = ReplicaState.READY
        replica.ready_at = time.monotonic()
        replica.announced = True
        log.info("replica %s ready after %.1fs (pid %s, capacity %d)", replica.id,
                 replica.ready_at - replica.started_at, replica.pid, replica.capacity)
        self._to_batch_managers(self._replica_up(replica))

    def _on_answer(self, replica: Replica, header: Mapping[str, Any], frames: list[Any]) -> None:
        if header.get("replica") != replica.id:
            log.warning("replica %s answered as %r; dropped", replica.id, header.get("replica"))
            return
        batch_id = header.get("batch")
        sender = replica.in_flight.pop(batch_id, None) if isinstance(batch_id, (int, str)) else None
        if sender is None:
            log.warning("replica %s answered batch %r, which it does not hold; dropped", replica.id, batch_id)
            return
        if not bus.send_nowait(self._sock(self._bm_sock), [sender, *frames[1:]]):
            log.warning("the batch manager that sent batch %r is gone; its answer is dropped", batch_id)

    def _replica_up(self, replica: Replica) -> dict[str, Any]:
        return {"t": protocol.REPLICA_UP, "replica": replica.id, "model": replica.spec.name,
                "version": replica.spec.version, "capacity": replica.capacity}

    def _announce_down(self, replica: Replica, reason: str) -> None:
        if replica.announced:
            replica.announced = False
            self._to_batch_managers({"t": protocol.REPLICA_DOWN, "replica": replica.id, "reason": reason})

    def _fail_in_flight(self, replica: Replica, reason: str) -> None:
        for batch_id, sender in replica.in_flight.items():
            message = f"replica {replica.id} was lost: {reason}"
            self._send_batch_manager(sender, failed_message(replica.id, batch_id, ErrorCode.REPLICA_LOST, message))
        replica.in_flight.clear()

    def _to_batch_managers(self, header: Mapping[str, Any]) -> None:
        for sender in self._batch_managers:
            self._send_batch_manager(sender, header)

    def _send_batch_manager(self, identity: bytes, message: Mapping[str, Any] | Sequence[Any]) -> None:
        frames = [wire.pack_header(message)] if isinstance(message, Mapping) else list(message)
        bus.send_nowait(self._sock(self._bm_sock), [identity, *frames])

    def _send_replica(self, replica: Replica, frames: Sequence[Any]) -> bool:
        return bus.send_nowait(self._sock(self._replica_sock), [replica.identity, *frames])

    @staticmethod
    def _sock(sock: zmq.asyncio.Socket | None) -> zmq.asyncio.Socket:
        assert sock is not None, "sockets exist while the task manager runs"
        return sock

    # ------------------------------------------------------------------------------------------
    # Supervision

    async def _supervise(self) -> None:
        heartbeat = [wire.pack_header({"t": protocol.HEARTBEAT})]
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            now = time.monotonic()
            for replica in list(self._replicas.values()):
                if replica.state is ReplicaState.STARTING:
                    if now - replica.started_at > self.settings.replica_start_timeout_s:
                        self._end(replica, f"not ready within {self.settings.replica_start_timeout_s:g}s",
                                  wanted=False)
                    continue
                self._send_replica(replica, heartbeat)
                silent = now - replica.last_seen
                if replica.state is ReplicaState.READY and silent > self._silence_limit_s:
                    self._end(replica, f"no heartbeat for {silent:.1f}s", wanted=False)
            for identity, seen in list(self._batch_managers.items()):
                if now - seen > self._silence_limit_s:
                    log.info("batch manager %s went silent; forgetting it", identity.hex())
                    del self._batch_managers[identity]

    def _apply_registry(self, registry: Registry) -> None:
        for spec in registry:
            group = self._groups.get(spec.key)
            if group is None:
                log.info("model %s: keeping %d replicas", spec.key, spec.min_replicas)
                group = self._groups[spec.key] = ModelGroup(spec)
            elif replica_fields_differ(group.spec, spec):
                log.info("model %s changed; replacing its replicas", spec.key)
                for replica in group.live():
                    self._end(replica, "the model's spec changed", wanted=True)
                group.failures, group.not_before = 0, 0.0
            group.spec = spec
            self._reconcile(group)
        for key in set(self._groups) - set(registry.specs):
            group = self._groups.pop(key)
            log.info("model %s was removed; stopping its replicas", key)
            group.removed = True
            if group.retry is not None:
                group.retry.cancel()
            for replica in group.live():
                self._end(replica, "the model was removed", wanted=True)

    def _reconcile(self, group: ModelGroup) -> None:
        """Start or stop replicas until the group has as many as it wants (after any backoff)."""
        if self._closing or group.removed:
            return
        live = group.live()
        missing = group.desired - len(live)
        if missing < 0:
            # Fewest losses first: replicas still starting, then the newest.
            doomed = sorted(live, key=lambda r: (r.state is ReplicaState.READY, -r.started_at))[:-missing]
            for replica in doomed:
                self._end(replica, "scaled down", wanted=True)
            return
        wait_s = group.not_before - time.monotonic()
        if missing and wait_s > 0:
            if group.retry is None:
                group.retry = asyncio.get_running_loop().call_later(wait_s, self._retry, group)
            return
        for _ in range(missing):
            self._start_replica(group)

    def _retry(self, group: ModelGroup) -> None:
        group.retry = None
        self._reconcile(group)

    def _start_replica(self, group: ModelGroup) -> None:
        spec = group.spec
        while True:
            new_id = replica_id(self.settings.instance, spec.name, spec.version, group.next_index)
            group.next_index += 1
            if new_id.encode() not in self._replicas:
                break
        replica = Replica(new_id, spec, group, started_at=time.monotonic())
        group.replicas[new_id] = replica
        self._replicas[replica.identity] = replica
        replica.task = asyncio.create_task(self._run_replica(replica), name=f"replica {new_id}")

    def _plan(self, replica: Replica) -> ReplicaPlan:
        spec, settings = replica.spec, self.settings
        env = {
            "INFEROXY_REPLICA_URL": settings.replica_url,
            "INFEROXY_REPLICA_ID": replica.id,
            "INFEROXY_MODEL_NAME": spec.name,
            "INFEROXY_MODEL_VERSION": spec.version,
            "INFEROXY_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
            "INFEROXY_HEARTBEAT_LIVENESS": str(settings.heartbeat_liveness),
            "INFEROXY_LOG_LEVEL": settings.log_level,
        }
        if spec.model_class:
            env["INFEROXY_MODEL_CLASS"] = spec.model_class
        labels = {"inferoxy.instance": settings.instance, "inferoxy.model": spec.name,
                  "inferoxy.version": spec.version, "inferoxy.replica": replica.id}
        return ReplicaPlan(replica_id=replica.id, spec=spec, env=env, labels=labels)

    async def _run_replica(self, replica: Replica) -> None:
        """Own one replica's handle from start to end; the only place that stops it."""
        runtime = self.runtime
        assert runtime is not None
        try:
            handle = await _start_uncancelled(runtime, self._plan(replica))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._ended(replica, f"could not start: {exc}")
            return
        replica.handle = handle
        waiting = asyncio.create_task(handle.wait())
        stopping = asyncio.create_task(replica.stop_requested.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                await handle.stop(replica.stop_grace_s)
            how = (await waiting).describe()
        except asyncio.CancelledError:  # the task manager is shutting down
            await _stop_quietly(handle, STOP_GRACE_S)
            raise
        except Exception as exc:  # the runtime failed us; the replica is as good as gone
            log.exception("lost track of replica %s", replica.id)
            how = f"the {runtime.name} runtime lost track of it: {exc}"
        finally:
            stopping.cancel()
            waiting.cancel()
        self._ended(replica, how)
        await _stop_quietly(handle, 0)  # removes what the replica left behind (process group, container)

    def _end(self, replica: Replica, reason: str, *, wanted: bool) -> None:
        """Begin ending a replica. ``wanted``: on purpose, so it may finish its batches and its end is no failure."""
        if not replica.live:
            return
        (log.info if wanted else log.warning)("ending replica %s: %s", replica.id, reason)
        replica.state = ReplicaState.STOPPING
        replica.end_reason = reason
        replica.wanted_gone = wanted
        self._announce_down(replica, reason)
        if wanted:
            self._send_replica(replica, [wire.pack_header({"t": protocol.STOP})])
            replica.stop_grace_s = STOP_GRACE_S
        else:
            self._fail_in_flight(replica, reason)
            replica.stop_grace_s = KILL_GRACE_S
        replica.stop_requested.set()

    def _ended(self, replica: Replica, how: str) -> None:
        """Forget a replica that is gone, tell the batch managers, and replace it if it should be."""
        self._replicas.pop(replica.identity, None)
        group = replica.group
        group.replicas.pop(replica.id, None)
        reason = clip_reason(f"{replica.end_reason}; {how}" if replica.end_reason else how)
        self._fail_in_flight(replica, reason)
        self._announce_down(replica, reason)
        if self._closing:
            return
        if replica.wanted_gone:
            log.info("replica %s ended: %s", replica.id, how)
        else:
            log.warning("replica %s of %s ended unexpectedly: %s", replica.id, group.spec.key, reason)
            group.last_error = reason
            group.restarts += 1
            now = time.monotonic()
            served_s = now - replica.ready_at if replica.ready_at is not None else 0.0
            group.failures = 1 if served_s >= self.settings.restart_backoff_max_s else group.failures + 1
            group.not_before = now + backoff_delay(
                group.failures, self.settings.restart_backoff_s, self.settings.restart_backoff_max_s
            )
        self._reconcile(group)

    async def _stop_all_replicas(self) -> None:
        self._closing = True
        for group in self._groups.values():
            if group.retry is not None:
                group.retry.cancel()
        replicas = list(self._replicas.values())
        for replica in replicas:
            self._fail_in_flight(replica, "the task manager is stopping")
            self._announce_down(replica, "the task manager is stopping")
            if replica.state is ReplicaState.READY:
                self._send_replica(replica, [wire.pack_header({"t": protocol.STOP})])
        tasks = [replica.task for replica in replicas if replica.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._replicas.clear()


async def _start_uncancelled(runtime: Runtime, plan: ReplicaPlan) -> ReplicaHandle:
    """``runtime.start`` that, when cancelled, still stops whatever it started instead of orphaning it."""
    starting = asyncio.ensure_future(runtime.start(plan))
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await _stop_quietly(await starting, STOP_GRACE_S)
        raise


async def _stop_quietly(handle: ReplicaHandle, grace_s: float) -> None:
    try:
        await handle.stop(grace_s)
    except Exception:
        log.exception("could not stop replica %s", handle.replica_id)


def clip_reason(text: str, limit: int = MAX_REASON_CHARS) -> str:
    if len(text) <= limit:
        return text
    first_line = text.partition("\n")[0][: limit // 4]
    return f"{first_line}\n[...]\n{text[-(limit - len(first_line) - 7):]}"
