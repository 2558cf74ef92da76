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
``restart_backoff_max_s``; ``crash_loop_failures`` such ends in a row (or a start the runtime
refuses, such as a missing image) mark the model ``failed``, and restarts go on.

Planned stops drain: batch managers get ``replica_draining`` (no new batches), the replica gets
``stop`` and answers what it holds, and ``replica_down`` follows its exit. A model removed from the
registry first serves what batch managers still queue for it: its replicas are drained once every
batch manager it knows sent ``model_drained`` for it, or after ``request_timeout_s``. A spec change that
alters what replicas run is a rolling update: one replica of the new spec starts, and only once
it is ready is one old replica drained, one at a time.

Placement: a ``run_on_gpu`` replica gets a GPU from the ``GpuAllocator`` (one per model per
GPU), any other replica one of ``cpu_slots``. A replica that cannot be placed leaves its model
``unschedulable`` (logged, in its status) until a replica elsewhere ends and frees room.

Each model's ``ModelStatus`` goes to Redis whenever it changes, and its serving state and reason
to every batch manager (``model_status``), which answers requests for a model that cannot run at
once instead of letting them wait for their deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import zmq
import zmq.asyncio

from inferoxy import curve, protocol, wire
from inferoxy.settings import Settings
from inferoxy.tasks import cancel_and_wait
from model_manager.spec import ModelStatus, ServingState
from model_manager.store import Registry, SpecStore, open_store
from task_manager.gpus import GpuAllocator, gpu_inventory
from task_manager.relay import Relay
from task_manager.replicas import (
    ModelGroup,
    Replica,
    ReplicaState,
    backoff_delay,
    new_nonce,
    replica_fields_differ,
    replica_id,
)
from task_manager.runtimes.base import ReplicaHandle, ReplicaPlan, Runtime
from task_manager.runtimes.factory import make_runtime

log = logging.getLogger(__name__)

# A reason travels in message headers and may reach clients: the first line (how it ended) and the last log lines.
MAX_REASON_CHARS = 4000
STOP_GRACE_S = 5.0  # a replica drained while the proxy runs may finish the batches it holds (at least this long)
KILL_GRACE_S = 1.0  # a replica that stopped answering gets little patience
# At shutdown, past the drain budget (INFEROXY_SHUTDOWN_DRAIN_S): time for the runtime to kill and remove.
SHUTDOWN_KILL_MARGIN_S = 3.0


class TaskManager:
    name = "task_manager"

    def __init__(self, settings: Settings, ctx: zmq.asyncio.Context, *, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self.ctx = ctx
        self.runtime = runtime
        self._groups: dict[str, ModelGroup] = {}  # by spec key, name/version
        self._replicas: dict[bytes, Replica] = {}  # by ZeroMQ identity, which is the replica id
        self._closing = False
        self._owns_instance = False  # only the instance's owner may sweep what is labelled with it
        # Each replica dials with a CURVE key of its own, admitted only while it runs (None: the bus is plain).
        bus_secret = settings.bus_key_secret
        self._replica_keys = curve.ReplicaKeys(bus_secret) if bus_secret else None
        self.relay = Relay(settings, self._replicas, self, self._replica_keys)
        self.gpus = GpuAllocator([], allow_sharing=settings.gpu_sharing)  # the inventory is read in run()
        # Status records to (re)write: by spec key, the group (removed groups too, to delete theirs).
        self._dirty: dict[str, ModelGroup] = {}
        self._dirty_event = asyncio.Event()
        self._written: dict[str, tuple[Any, ...]] = {}  # what Redis holds, to write only changes
        # The status records last written, by spec key: rewritten every heartbeat interval, since they expire.
        self._live_statuses: dict[str, ModelStatus] = {}
        # Serving states to announce to batch managers, by spec key; sent after the handler that changed
        # them, so they go out once, in their final form (``_ended`` sets the failure after the change).
        self._to_announce: dict[str, ModelGroup] = {}
        self._announce_scheduled = False
        self._announced: dict[str, tuple[ServingState, str | None]] = {}  # what batch managers were told
        # Removed models whose replicas still serve what batch managers queued for them, by spec key.
        self._retiring: dict[str, ModelGroup] = {}
        # ``model_drained`` notices that came before the task manager saw the removal: key -> sender -> when.
        self._early_drained: dict[str, dict[bytes, float]] = {}
        # Fresh each run and sent in every ``hb`` to batch managers: a new one tells them this task manager
        # restarted, so the replicas the old one announced (and the batches they held) are gone.
        self.epoch = os.urandom(8).hex()

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
        registry_task: asyncio.Task[None] | None = None
        try:
            await runtime.claim_instance()  # another live proxy with this instance name: refuse to start
            self._owns_instance = True
            # nvidia-smi may take seconds: not on the event loop.
            inventory = await asyncio.to_thread(gpu_inventory, settings.gpus)
            self.gpus = GpuAllocator(inventory, allow_sharing=settings.gpu_sharing)
            if inventory:
                log.info("GPUs for replicas: %s (sharing between models %s)", ", ".join(inventory),
                         "on" if settings.gpu_sharing else "off")
            self.relay.open(self.ctx)
            removed = await runtime.remove_orphans()
            if removed:
                log.info("removed %d replicas an earlier run left behind", removed)
            registry_task = asyncio.create_task(store.watch(self._apply_registry), name="tm registry")
            tasks = [
                asyncio.create_task(self._supervise(), name="tm supervise"),
                *self.relay.refusal_logger(self.ctx),
                asyncio.create_task(self._write_statuses(store), name="tm status"),
                registry_task,
            ]
            log.info("task manager up: batch managers at %s, replicas dial %s (%s runtime)",
                     settings.task_manager_url, settings.replica_url, runtime.name)
            ready.set()
            # asyncio.wait, not gather: being cancelled must leave the tasks running, since draining
            # replicas at shutdown still needs their answers forwarded and their heartbeats sent.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a task that failed takes the task manager down with its error
        finally:
            if registry_task is not None:
                await cancel_and_wait([registry_task])
            await self._stop_all_replicas()
            await cancel_and_wait(tasks)
            await self._final_cleanup(runtime, store)
            self.relay.close()

    def status(self) -> dict[str, Any]:
        """Per model: its replicas and their states, restarts, and the last error. Read-only, JSON-able."""
        now = time.monotonic()
        return {
            key: {
                "name": group.spec.name,
                "version": group.spec.version,
                "desired": group.desired,
                "state": group.serving_state()[0],
                "restarts": group.restarts,
                "last_error": group.last_error,
                "replicas": [
                    {
                        "id": replica.id,
                        "state": replica.state.value,
                        "draining": replica.state is ReplicaState.STOPPING and replica.wanted_gone,
                        "gpu": replica.gpu,
                        "generation": replica.generation,
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

    def announce_to(self, sender: bytes) -> None:
        """A new, restarted or resyncing batch manager learns every replica it can use."""
        self.relay.send_batch_manager(sender, self._heartbeat_header())  # first: our epoch, before what it announces
        for replica in self._replicas.values():
            if replica.announced and replica.state is ReplicaState.READY:
                self.relay.send_batch_manager(sender, self._replica_up(replica))
        for group in self._groups.values():
            self.relay.send_batch_manager(sender, self._model_status(group, *self._serving_state(group)))

    def _heartbeat_header(self) -> dict[str, Any]:
        return {"t": protocol.HEARTBEAT, "epoch": self.epoch}

    def model_drained(self, sender: bytes, header: Mapping[str, Any]) -> None:
        model, version = header.get("model"), header.get("version")
        if not isinstance(model, str) or not isinstance(version, str):
            log.warning("dropping a model_drained message without model and version: %r", header)
            return
        key = f"{model}/{version}"
        group = self._retiring.get(key)
        if group is None:
            # The batch manager may see the removal before we do: keep the notice for a while.
            self._early_drained.setdefault(key, {})[sender] = time.monotonic()
            return
        group.awaiting.discard(sender)
        self._retire_if_drained(key)

    def _retire_if_drained(self, key: str) -> None:
        group = self._retiring.get(key)
        if group is not None and not (group.awaiting & self.relay.batch_managers.keys()):
            self._retire(key, "every batch manager has answered what it queued for it")

    def _retire(self, key: str, why: str) -> None:
        """Drain and stop the replicas of a removed model (its retirement's wait is over)."""
        group = self._retiring.pop(key, None)
        if group is None:
            return
        if group.retire_timer is not None:
            group.retire_timer.cancel()
            group.retire_timer = None
        live = group.live()
        if live:
            log.info("model %s was removed; draining its replicas (%s)", key, why)
        for replica in live:
            self._end(replica, "the model was removed", wanted=True)
        self._status_changed(group)

    def replica_unreachable(self, replica: Replica) -> None:
        self._end(replica, "a batch could not be delivered to it: it is not connected", wanted=False)

    def replica_ready(self, replica: Replica, header: Mapping[str, Any]) -> None:
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
        self.relay.to_batch_managers(self._replica_up(replica))
        self._status_changed(replica.group)
        self._reconcile(replica.group)  # a rolling update waits for this

    def _replica_up(self, replica: Replica) -> dict[str, Any]:
        return {"t": protocol.REPLICA_UP, "replica": replica.id, "model": replica.spec.name,
                "version": replica.spec.version, "capacity": replica.capacity}

    @staticmethod
    def _model_status(group: ModelGroup, state: ServingState, reason: str | None) -> dict[str, Any]:
        return {"t": protocol.MODEL_STATUS, "model": group.spec.name, "version": group.spec.version,
                "state": state, "reason": reason}

    @staticmethod
    def _serving_state(group: ModelGroup) -> tuple[ServingState, str | None]:
        state, reason = group.serving_state()
        return state, clip_reason(reason) if reason else None

    def _announce_states(self) -> None:
        """Tell every batch manager of each changed serving state (only real changes: they log each one)."""
        self._announce_scheduled = False
        pending, self._to_announce = self._to_announce, {}
        if not self.relay.is_open:
            return  # scheduled as the task manager stopped: no one left to tell
        for key, group in pending.items():
            if self._groups.get(key) is not group:
                self._announced.pop(key, None)  # removed: a model added again under the key is news
                continue
            state = self._serving_state(group)
            if self._announced.get(key) != state:
                self._announced[key] = state
                self.relay.to_batch_managers(self._model_status(group, *state))

    def _announce_down(self, replica: Replica, reason: str) -> None:
        if replica.announced:
            replica.announced = False
            self.relay.to_batch_managers({"t": protocol.REPLICA_DOWN, "replica": replica.id, "reason": reason})

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
                self.relay.send_replica(replica, heartbeat)
                silent = now - replica.last_seen
                if replica.state is ReplicaState.READY and silent > self._silence_limit_s:
                    self._end(replica, f"no heartbeat for {silent:.1f}s", wanted=False)
                elif replica.state is ReplicaState.READY:
                    self._recycle_if_stuck(replica, now)
            self._forgive_recovered(now)
            self.relay.to_batch_managers(self._heartbeat_header())
            forgot = False
            for identity, seen in list(self.relay.batch_managers.items()):
                if now - seen > self._silence_limit_s:
                    log.info("batch manager %s went silent; forgetting it", identity.hex())
                    del self.relay.batch_managers[identity]
                    forgot = True
            if forgot:
                for key in list(self._retiring):
                    self._retire_if_drained(key)
            stale = now - self.settings.request_timeout_s
            for key, senders in list(self._early_drained.items()):
                for identity, when in list(senders.items()):
                    if when < stale:
                        del senders[identity]
                if not senders:
                    del self._early_drained[key]

    def _recycle_if_stuck(self, replica: Replica, now: float) -> None:
        """Replace a replica that holds batches but answered none for longer than any request may wait: it
        heartbeats fine (a hung ``predict``, an answer lost on the way) yet would hold its credit for ever.

        The timeout is ``request_timeout_s``, not the spec's ``default_timeout_s``: a client may ask for
        longer than the model's default, never for longer than the server's, so by then no request in
        those batches is waiting for the answer any more.
        """
        timeout_s = self.settings.request_timeout_s
        stuck_s = now - replica.progress_at
        if replica.in_flight and stuck_s > timeout_s:
            self._end(replica, f"replica {replica.id} held {len(replica.in_flight)} batches for {stuck_s:.1f}s "
                      f"without answering any (longer than any request may wait: {timeout_s:g}s)", wanted=False)

    def _forgive_recovered(self, now: float) -> None:
        """A model whose replica has served for restart_backoff_max_s since its failures is healthy again."""
        healthy_after = self.settings.restart_backoff_max_s
        for group in self._groups.values():
            if not (group.failures or group.failed_reason):
                continue
            if any(r.state is ReplicaState.READY and r.generation == group.generation and r.ready_at is not None
                   and now - r.ready_at >= healthy_after for r in group.replicas.values()):
                group.failures, group.failed_reason = 0, None
                self._status_changed(group)

    def _apply_registry(self, registry: Registry) -> None:
        for spec in registry:
            group = self._groups.get(spec.key)
            if group is None and spec.key in self._retiring:
                # Added again before its replicas were drained: it keeps them.
                group = self._groups[spec.key] = self._retiring.pop(spec.key)
                log.info("model %s was added again; keeping its replicas", spec.key)
                if group.retire_timer is not None:
                    group.retire_timer.cancel()
                    group.retire_timer = None
                group.awaiting = set()
                group.removed = False
            if group is None:
                log.info("model %s: keeping %d replicas", spec.key, spec.min_replicas)
                group = self._groups[spec.key] = ModelGroup(spec)
            elif replica_fields_differ(group.spec, spec):
                log.info("model %s changed; replacing its replicas one by one", spec.key)
                group.generation += 1
                group.failures, group.not_before = 0, 0.0
                group.failed_reason = group.unschedulable = None
                if group.retry is not None:
                    group.retry.cancel()
                    group.retry = None
            group.spec = spec
            self._status_changed(group)
            self._reconcile(group)
        for key in set(self._groups) - set(registry.specs):
            group = self._groups.pop(key)
            group.removed = True
            if group.retry is not None:
                group.retry.cancel()
                group.retry = None
            # Batch managers still serve what they queued for it: its replicas stay until each says it
            # holds nothing more (model_drained), or until a request's timeout has surely passed.
            self._retiring[key] = group
            early = self._early_drained.pop(key, {})
            group.awaiting = set(self.relay.batch_managers) - set(early)
            if group.awaiting and group.live():
                log.info("model %s was removed; its replicas stay until batch managers drained it (at most %gs)",
                         key, self.settings.request_timeout_s)
                group.retire_timer = asyncio.get_running_loop().call_later(
                    self.settings.request_timeout_s, self._retire, key, "the grace for batch managers passed")
                self._status_changed(group)
            else:
                self._retire(key, "no batch manager holds requests for it")

    def _reconcile(self, group: ModelGroup) -> None:
        """Start or drain replicas until the group runs as many of its current spec as it wants.

        During a rolling update at most one replica more than wanted runs, and an outdated replica
        is drained only while no other is draining and the replicas left cover what is wanted.
        """
        if self._closing or group.removed:
            return
        live = group.live()
        current = [r for r in live if r.generation == group.generation]
        outdated = [r for r in live if r.generation != group.generation]
        surplus = len(current) - group.desired
        if surplus > 0:
            # Fewest losses first: replicas still starting, then the newest.
            doomed = sorted(current, key=lambda r: (r.state is ReplicaState.READY, -r.started_at))[:surplus]
            for replica in doomed:
                self._end(replica, "scaled down", wanted=True)
                current.remove(replica)
        for replica in [r for r in outdated if r.state is not ReplicaState.READY]:
            self._end(replica, "the model's spec changed", wanted=True)  # serves nothing yet: no wait
            outdated.remove(replica)
        if outdated and not self._draining_outdated(group):
            ready_current = sum(r.state is ReplicaState.READY for r in current)
            if ready_current + len(outdated) - 1 >= group.desired:
                self._end(outdated.pop(0), "replaced after the model's spec changed", wanted=True)
        missing = group.desired - len(current)
        if outdated:
            missing = min(missing, group.desired + 1 - len(current) - len(outdated))
        if missing <= 0:
            return
        wait_s = group.not_before - time.monotonic()
        if wait_s > 0:
            if group.retry is None:
                group.retry = asyncio.get_running_loop().call_later(wait_s, self._retry, group)
            return
        for _ in range(missing):
            if not self._start_replica(group):
                if outdated and not self._draining_outdated(group):
                    # No room to start the successor first: make room by draining an old replica.
                    self._end(outdated.pop(0), "replaced after the model's spec changed (no room to start "
                              "its successor first)", wanted=True)
                break

    @staticmethod
    def _draining_outdated(group: ModelGroup) -> bool:
        return any(r.generation != group.generation and not r.live for r in group.replicas.values())

    def _retry(self, group: ModelGroup) -> None:
        group.retry = None
        self._reconcile(group)

    def _start_replica(self, group: ModelGroup) -> bool:
        """Place and start one replica of the group's spec; False (and the group unschedulable) if it has no room."""
        spec = group.spec
        index = group.next_index
        new_id = replica_id(self.settings.instance, spec.name, spec.version, index, new_nonce())
        gpu, problem = self._place(spec.key, spec.run_on_gpu, new_id)
        if problem is not None:
            if group.unschedulable != problem:
                log.warning("model %s: cannot place another replica: %s", spec.key, problem)
                group.unschedulable = problem
                self._status_changed(group)
            return False
        if group.unschedulable is not None:
            group.unschedulable = None
            self._status_changed(group)
        group.next_index = index + 1
        replica = Replica(new_id, spec, group, started_at=time.monotonic(), generation=group.generation, gpu=gpu)
        group.replicas[new_id] = replica
        self._replicas[replica.identity] = replica
        replica.task = asyncio.create_task(self._run_replica(replica), name=f"replica {new_id}")
        self._status_changed(group)
        return True

    def _place(self, model_key: str, run_on_gpu: bool, new_id: str) -> tuple[str | None, str | None]:
        """(GPU or None, None) when the replica fits; (None, why not) when it does not."""
        if run_on_gpu:
            gpu = self.gpus.allocate(model_key, new_id)
            if gpu is not None:
                return gpu, None
            if not self.gpus.gpus:
                return None, "it runs on a GPU and this machine has none (INFEROXY_GPUS, nvidia-smi)"
            sharing = "" if self.gpus.allow_sharing else " or by another model (INFEROXY_GPU_SHARING is off)"
            return None, (f"no GPU free: each of {', '.join(self.gpus.gpus)} is taken by a replica of this "
                          f"model{sharing}")
        on_cpu = sum(r.gpu is None for r in self._replicas.values())  # draining ones hold theirs until gone
        if on_cpu >= self.settings.cpu_slots:
            return None, f"all {self.settings.cpu_slots} CPU slots are taken (INFEROXY_CPU_SLOTS)"
        return None, None

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
        if self._replica_keys is not None:
            env.update(self._replica_keys.issue(replica.id))
        labels = {"inferoxy.instance": settings.instance, "inferoxy.model": spec.name,
                  "inferoxy.version": spec.version, "inferoxy.replica": replica.id}
        return ReplicaPlan(replica_id=replica.id, spec=spec, env=env, gpu=replica.gpu, labels=labels)

    async def _run_replica(self, replica: Replica) -> None:
        """Own one replica's handle from start to end; the only place that stops it."""
        runtime = self.runtime
        assert runtime is not None
        try:
            handle = await _start_uncancelled(runtime, self._plan(replica))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._ended(replica, f"could not start: {exc}", start_failed=True)
            return
        replica.handle = handle
        waiting = asyncio.create_task(handle.wait())
        stopping = asyncio.create_task(replica.stop_requested.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                await handle.stop(replica.stop_grace_s)
            how = (await waiting).describe()
        except asyncio.CancelledError:  # the task manager is shutting down, past its drain budget
            await _stop_quietly(handle, 0)
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
        """Begin ending a replica.

        ``wanted``: a planned stop. The batch managers hear ``replica_draining`` (no new batches),
        the replica is told ``stop`` and may answer the batches it holds; ``replica_down`` waits
        for its exit (``_ended``). Otherwise it is lost: ``replica_down`` and its batches fail now.
        """
        if not replica.live:
            return
        (log.info if wanted else log.warning)("ending replica %s: %s", replica.id, reason)
        replica.state = ReplicaState.STOPPING
        replica.end_reason = reason
        replica.wanted_gone = wanted
        if wanted:
            if replica.announced:
                self.relay.to_batch_managers({"t": protocol.REPLICA_DRAINING, "replica": replica.id, "reason": reason})
            self.relay.send_replica(replica, [wire.pack_header({"t": protocol.STOP})])
            replica.stop_grace_s = (self.settings.shutdown_drain_s if self._closing
                                    else max(STOP_GRACE_S, self.settings.request_timeout_s))
        else:
            replica.group.replacing[replica.id] = reason  # readiness says which replica is replaced, and why
            self._announce_down(replica, reason)  # before the `failed`s: see `_ended`
            self.relay.fail_in_flight(replica, reason)
            replica.stop_grace_s = KILL_GRACE_S
        replica.stop_requested.set()
        self._status_changed(replica.group)

    def _ended(self, replica: Replica, how: str, *, start_failed: bool = False) -> None:
        """Forget a replica that is gone, tell the batch managers, and replace it if it should be."""
        self._replicas.pop(replica.identity, None)
        if self._replica_keys is not None:
            self._replica_keys.revoke(replica.id)
        self.gpus.release(replica.id)
        group = replica.group
        group.replicas.pop(replica.id, None)
        group.replacing.pop(replica.id, None)
        reason = clip_reason(f"{replica.end_reason}; {how}" if replica.end_reason else how)
        # Down first: a batch manager must know the replica is dead before any `failed` of its batches, or
        # the credit each returns would send the retry and the queue to the corpse.
        self._announce_down(replica, reason)
        self.relay.fail_in_flight(replica, reason)
        self._status_changed(group)
        if self._closing:
            return
        if replica.wanted_gone:
            log.info("replica %s ended: %s", replica.id, how)
        elif replica.generation == group.generation:  # an outdated replica's failure is no news
            log.warning("replica %s of %s ended unexpectedly: %s", replica.id, group.spec.key, reason)
            group.last_error = reason
            group.restarts += 1
            now = time.monotonic()
            served_s = now - replica.ready_at if replica.ready_at is not None else 0.0
            group.failures = 1 if served_s >= self.settings.restart_backoff_max_s else group.failures + 1
            group.not_before = now + backoff_delay(
                group.failures, self.settings.restart_backoff_s, self.settings.restart_backoff_max_s
            )
            if start_failed or group.failures >= self.settings.crash_loop_failures:
                if group.failed_reason is None:
                    log.error("model %s failed: %s", group.spec.key, reason)
                group.failed_reason = reason
        self._reconcile(group)
        # The room it held may be what another model waits for.
        for other in list(self._groups.values()):
            if other is not group and other.unschedulable is not None:
                self._reconcile(other)

    async def _stop_all_replicas(self) -> None:
        """Drain every replica (as a planned stop) within the shutdown drain budget, then cancel the stragglers.

        The budget is short (``shutdown_drain_s``): by now the bridges have stopped, so what a replica still
        holds has nobody to answer, and ``docker stop`` kills the proxy after 10 s, orphaning its replicas.
        """
        self._closing = True
        for group in self._groups.values():
            if group.retry is not None:
                group.retry.cancel()
        for group in self._retiring.values():
            if group.retire_timer is not None:
                group.retire_timer.cancel()
        self._retiring.clear()
        replicas = list(self._replicas.values())
        for replica in replicas:
            self._end(replica, "the task manager is stopping", wanted=True)
        tasks = [replica.task for replica in replicas if replica.task is not None]
        if tasks:
            budget_s = self.settings.shutdown_drain_s + SHUTDOWN_KILL_MARGIN_S
            _done, late = await asyncio.wait(tasks, timeout=budget_s)
            # One cancel each: a replica task's cancellation handler still has to stop its process.
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._replicas.clear()

    async def _final_cleanup(self, runtime: Runtime, store: SpecStore) -> None:
        """Sweep containers of this instance a failed stop left, record every model stopped, let go."""
        try:
            swept = await runtime.remove_orphans() if self._owns_instance else 0
            if swept:
                log.warning("removed %d replicas that outlived their stop", swept)
        except Exception as exc:
            log.warning("could not sweep leftover replicas: %s", exc)
        for group in self._groups.values():
            self._dirty[group.spec.key] = group
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush_statuses(store, stopped=True), timeout=5.0)
        await runtime.close()
        await store.close()

    # ------------------------------------------------------------------------------------------
    # Status records in Redis

    def _status_changed(self, group: ModelGroup) -> None:
        self._dirty[group.spec.key] = group
        self._dirty_event.set()
        self._to_announce[group.spec.key] = group
        if not self._announce_scheduled:
            self._announce_scheduled = True
            asyncio.get_running_loop().call_soon(self._announce_states)

    @property
    def _status_ttl_s(self) -> float:
        # Readers must find no status once this task manager is gone (docs/ARCHITECTURE.md): it expires
        # after the same silence that makes every other peer give up on us.
        return self._silence_limit_s

    async def _write_statuses(self, store: SpecStore) -> None:
        interval = self.settings.heartbeat_interval_s
        next_refresh = time.monotonic()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty_event.wait(), max(0.0, next_refresh - time.monotonic()))
            self._dirty_event.clear()
            try:
                await self._flush_statuses(store)
                if time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + interval
                    await self._refresh_statuses(store)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: keep serving, write when it is back
                log.warning("could not write model status to Redis (%s); retrying", exc)
                self._dirty_event.set()
                await asyncio.sleep(1.0)

    async def _flush_statuses(self, store: SpecStore, *, stopped: bool = False) -> None:
        while self._dirty:
            # Taken before the write: a change made while the write is in flight marks the model again and is
            # written in turn. (Dropping the mark after the write lost such changes: it is always the same group.)
            key, group = self._dirty.popitem()
            try:
                await self._write_status(store, key, group, stopped=stopped)
            except BaseException:
                self._dirty.setdefault(key, group)  # left for the retry
                raise

    async def _write_status(self, store: SpecStore, key: str, group: ModelGroup, *, stopped: bool) -> None:
        spec = group.spec
        if group.removed and key not in self._groups:
            if not group.replicas:
                await store.delete_status(spec.name, spec.version)
                self._written.pop(key, None)
                self._live_statuses.pop(key, None)
            return
        record: tuple[ServingState, int, int, str | None]
        if stopped:
            record = ("stopped", 0, group.desired, "the task manager stopped")
        else:
            state, reason = group.serving_state()
            record = (state, group.ready_count(), group.desired, clip_reason(reason) if reason else None)
        if self._written.get(key) == record:
            return
        status = ModelStatus(name=spec.name, version=spec.version, state=record[0], ready_replicas=record[1],
                             desired_replicas=record[2], reason=record[3], updated_at=time.time())
        # The final "stopped" record stays (it claims nothing, and says why); live ones expire.
        await store.put_status(status, ttl_s=None if stopped else self._status_ttl_s)
        self._live_statuses[key] = status
        previous = self._written.get(key, ("none",))[0]
        if previous != record[0]:
            log.info("model %s is %s (%d of %d replicas ready)%s", key, record[0], record[1], record[2],
                     f": {record[3].splitlines()[0]}" if record[3] else "")
        self._written[key] = record

    async def _refresh_statuses(self, store: SpecStore) -> None:
        """Write every live status again before its TTL runs out (and into a Redis that restarted empty)."""
        if self._live_statuses:
            await store.put_statuses(list(self._live_statuses.values()), ttl_s=self._status_ttl_s)


async def _start_uncancelled(runtime: Runtime, plan: ReplicaPlan) -> ReplicaHandle:
    """``runtime.start`` that, when cancelled, still stops whatever it started instead of orphaning it."""
    starting = asyncio.ensure_future(runtime.start(plan))
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await _stop_quietly(await starting, KILL_GRACE_S)  # cancelled: the task manager is stopping
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
