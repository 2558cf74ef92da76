"""The task manager: keeps each model's replicas running and carries batches to them.

This module is the composition, and the replica lifecycle that ties the parts together (about 595
lines: starting, ending and replacing a replica, registry changes, retirement, the autoscaler's moves and
a stateful scale-down's grace all act on the same replica table and must run in order inside one
handler, so they stay in one place). The parts:

- ``relay``: the two ROUTER sockets (batch managers dial ``task_manager_url``, replicas dial
  ``replica_bind_url``); batches and answers move by their routing envelope, headers unread.
- ``reconciler``: what to start and drain, backoff, crash loops, lost replicas. Pure.
- ``autoscaler``: each model's target replica count from the load batch managers report (``load``). Pure.
- ``placement``: GPU or CPU slot, and what a replica is started with.
- ``status`` (Redis records with a TTL) and ``announce`` (what batch managers are told, and each one's share
  of every replica's credit, from ``credit``, pure).
- ``replica_task``: one replica's start-to-end as an asyncio task.

A replica's life: ``starting`` (its runtime started it; only the identity we gave it is
listened to) -> ``ready`` (it said ``ready``; batch managers get ``replica_up``) -> gone
(it exited, missed heartbeats, or was stopped; batch managers get ``replica_down`` and its
unanswered batches fail with ``replica_lost``). A replica that ends unexpectedly is
replaced after an exponential backoff, which resets once a replica has served for
``restart_backoff_max_s``; ``crash_loop_failures`` such ends in a row (or a start the runtime
refuses, such as a missing image) mark the model ``failed``, and restarts go on. The only timer
is the supervision tick, which sends heartbeats and ends replicas that fell silent or never
became ready.

Planned stops drain: batch managers get ``replica_draining`` (no new batches), the replica gets
``stop`` and answers what it holds, and ``replica_down`` follows its exit. A stateful replica scaled
down first retires: its sessions go on there (nothing else does) for the model's
``session_idle_timeout_s``, then the drain proper ends what is left of them. A model removed from the
registry first serves what batch managers still queue for it: its replicas are drained once every
batch manager it knows sent ``model_drained`` for it, or after ``request_timeout_s``. A spec change that
alters what replicas run is a rolling update: one replica of the new spec starts, and only once
it is ready is one old replica drained, one at a time.

A replica that cannot be placed leaves its model ``unschedulable`` (logged, in its status) until a
replica elsewhere ends and frees room. Each model's ``ModelStatus`` goes to Redis whenever it changes,
and its serving state and reason to every batch manager (``model_status``), which answers requests for
a model that cannot run at once instead of letting them wait for their deadline.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import zmq
import zmq.asyncio

from inferoxy import curve, metrics
from inferoxy import messages as m
from inferoxy.settings import Settings
from inferoxy.tasks import cancel_and_wait
from model_manager.store import Registry, SpecStore, open_store
from task_manager import replica_metrics
from task_manager.announce import Announcer
from task_manager.autoscaler import Decision, Observation
from task_manager.gpus import GpuAllocator, gpu_inventory
from task_manager.load import LoadBook
from task_manager.placement import Placement, replica_plan
from task_manager.reconciler import (
    SCALED_DOWN,
    Liveness,
    RestartPolicy,
    lost_because,
    plan,
    record_unexpected_end,
    recovered,
)
from task_manager.relay import Relay
from task_manager.replica_task import KILL_GRACE_S, run_replica
from task_manager.replicas import (
    ModelGroup,
    Replica,
    ReplicaState,
    new_nonce,
    replica_fields_differ,
    replica_id,
)
from task_manager.runtimes.base import ReplicaPlan, Runtime
from task_manager.runtimes.factory import make_runtime
from task_manager.status import StatusWriter, clip_reason

__all__ = ["TaskManager", "clip_reason"]

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0  # a replica drained while the proxy runs may finish the batches it holds (at least this long)
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
        # Each replica dials with a CURVE key of its own, admitted only while it runs. None: the bus is plain, or
        # the replica link is an ipc:// socket in serve's private directory, which only this uid's processes (the
        # local replicas among them) can reach, the same rule as the components' own links (curve.needs_curve).
        bus_secret = settings.bus_key_secret
        keyed = bool(bus_secret) and curve.needs_curve(settings.replica_bind_url)
        self._replica_keys = curve.ReplicaKeys(bus_secret) if keyed and bus_secret else None
        self.relay = Relay(settings, self._replicas, self, self._replica_keys)
        self.placement = Placement(settings)
        # Status records expire after the same silence that makes every other peer give up on us.
        self.statuses = StatusWriter(self._groups, ttl_s=self._silence_limit_s,
                                     refresh_s=settings.heartbeat_interval_s)
        self._restart_policy = RestartPolicy(settings.restart_backoff_s, settings.restart_backoff_max_s,
                                             settings.crash_loop_failures)
        self._liveness = Liveness(settings.replica_start_timeout_s, self._silence_limit_s, settings.request_timeout_s)
        self.loads = LoadBook()  # what each batch manager last reported (``load``)
        self.announce = Announcer(self.relay, self._groups, self._replicas, self.loads)  # and each one's credit
        # Removed models whose replicas still serve what batch managers queued for them, by spec key.
        self._retiring: dict[str, ModelGroup] = {}
        # ``model_drained`` notices that came before the task manager saw the removal: key -> sender -> when.
        self._early_drained: dict[str, dict[bytes, float]] = {}

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
            runtime.events = self
            await runtime.claim_instance()  # another live proxy with this instance name: refuse to start
            self._owns_instance = True
            # nvidia-smi may take seconds: not on the event loop.
            inventory = await asyncio.to_thread(gpu_inventory, settings.gpus)
            self.placement.gpus = GpuAllocator(inventory, allow_sharing=settings.gpu_sharing)
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
                asyncio.create_task(self.statuses.run(store), name="tm status"),
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

    @property
    def epoch(self) -> str:
        return self.announce.epoch

    def announce_to(self, sender: bytes) -> None:
        self.announce.to(sender)

    def model_drained(self, sender: bytes, msg: m.ModelDrained) -> None:
        key = f"{msg.model}/{msg.version}"
        group = self._retiring.get(key)
        if group is None:
            # The batch manager may see the removal before we do: keep the notice for a while.
            self._early_drained.setdefault(key, {})[sender] = time.monotonic()
            return
        group.awaiting.discard(sender)
        self._retire_if_drained(key)

    def load_reported(self, sender: bytes, msg: m.Load) -> None:
        for key in self.loads.report(sender, msg):
            self._load_changed(key)

    def _load_changed(self, key: str) -> None:
        """A model version's load moved (a report, or a batch manager that went away)."""
        group = self._groups.get(key)
        if group is not None:
            self._autoscale(group, time.monotonic())
        self.announce.rebalance(key)

    def _autoscale(self, group: ModelGroup, now: float) -> None:
        """Let the autoscaler see the group's load and ready replicas, and carry out a move it decides."""
        load = self.loads.total(group.spec.key)
        ready = [r for r in group.replicas.values() if r.state is ReplicaState.READY]
        seen = Observation(load.queued, load.in_flight, len(ready), sum(r.capacity for r in ready))
        if self._scaled(group, group.autoscaler.observe(group.spec, seen, now)):
            self._reconcile(group)

    def _scaled(self, group: ModelGroup, decision: Decision | None) -> bool:
        """Log and count a move of the group's target (the caller reconciles). False: there was none."""
        spec = group.spec
        metrics.AUTOSCALER_TARGET.labels(spec.name, spec.version).set(group.desired)
        if decision is None:
            return False
        log.info("model %s: scaling %s to %d replicas: %s", spec.key, decision.direction, decision.target,
                 decision.reason)
        metrics.AUTOSCALER_DECISIONS.labels(spec.name, spec.version, decision.direction, decision.cause).inc()
        self._status_changed(group)
        return True

    def credit_acked(self, sender: bytes, msg: m.Credit) -> None:
        self.announce.credit_acked(sender, msg)

    def credit_freed(self, replica: Replica) -> None:
        self.announce.settle(replica)

    def batch_manager_gone(self, sender: bytes, why: str) -> None:
        if self.relay.batch_managers.pop(sender, None) is None:
            return
        log.info("batch manager %s %s; forgetting it", sender.hex(), why)
        self.announce.batch_manager_gone(sender)
        for key in self.loads.forget(sender):
            self._load_changed(key)
        for key in list(self._retiring):
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

    def replica_unschedulable(self, replica_id: str, reason: str | None) -> None:
        """The runtime's scheduler cannot place a replica yet (``RuntimeEvents``): its model says why meanwhile."""
        replica = self._replicas.get(replica_id.encode())
        if replica is None:
            return
        if replica.unplaced and reason is None:
            replica.placed_at = time.monotonic()  # its start timeout runs from now (reconciler.lost_because)
        replica.unplaced = reason is not None
        if replica.group.unschedulable == reason:
            return
        if reason is not None:
            log.warning("model %s: replica %s cannot be placed yet: %s", replica.group.spec.key, replica_id, reason)
        replica.group.unschedulable = reason
        self._status_changed(replica.group)

    def replica_unreachable(self, replica: Replica) -> None:
        self._end(replica, "a batch could not be delivered to it: it is not connected", wanted=False)

    def replica_ready(self, replica: Replica, msg: m.Ready) -> None:
        if replica.state is not ReplicaState.STARTING:
            return
        replica.capacity = max(msg.capacity, 1)
        replica.pid = msg.pid
        replica.state = ReplicaState.READY
        replica.ready_at = time.monotonic()
        replica_metrics.ready(replica, msg.warmup_s)
        if self.runtime is not None and self.runtime.places_replicas:
            replica.group.unschedulable = None  # it was placed after all
        log.info("replica %s ready after %.1fs (pid %s, capacity %d%s)", replica.id,
                 replica.ready_at - replica.started_at, replica.pid, replica.capacity,
                 "" if msg.warmup_s is None else f", warmup {msg.warmup_s:.2f}s")
        self.announce.replica_up(replica)
        self._status_changed(replica.group)
        self._reconcile(replica.group)  # a rolling update waits for this

    # ------------------------------------------------------------------------------------------
    # Supervision

    async def _supervise(self) -> None:
        heartbeat = [m.encode(m.Heartbeat())]
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            now = time.monotonic()
            for replica in list(self._replicas.values()):
                if replica.state is not ReplicaState.STARTING:
                    self.relay.send_replica(replica, heartbeat)
                reason = lost_because(replica, now, self._liveness)
                if reason is not None:
                    self._end(replica, reason, wanted=False)
            for group in list(self._groups.values()):
                if recovered(group, now, self.settings.restart_backoff_max_s):
                    group.failures, group.failed_reason = 0, None  # it served long enough: healthy again
                    self._status_changed(group)
                self._autoscale(group, now)  # its delays run out without new load reports too
            self.relay.to_batch_managers(self.announce.heartbeat())
            for identity, seen in list(self.relay.batch_managers.items()):
                if now - seen > self._silence_limit_s:
                    self.batch_manager_gone(identity, "went silent")
            stale = now - self.settings.request_timeout_s
            for key, senders in list(self._early_drained.items()):
                for identity, when in list(senders.items()):
                    if when < stale:
                        del senders[identity]
                if not senders:
                    del self._early_drained[key]

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
                log.info("model %s: keeping %d..%d replicas", spec.key, spec.min_replicas, spec.max_replicas)
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
            self._scaled(group, group.autoscaler.bound(spec))
            self._status_changed(group)
            self._reconcile(group)
        for key in set(self._groups) - set(registry.specs):
            group = self._groups.pop(key)
            group.removed = True
            metrics.AUTOSCALER_TARGET.labels(group.spec.name, group.spec.version).set(0)
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
        """Carry out what ``reconciler.plan`` decides for the group: drains first, then starts."""
        if self._closing:
            return
        decided = plan(group, time.monotonic())
        for replica, why in decided.drain:
            self._end(replica, why, wanted=True)
        if decided.retry_at is not None and group.retry is None:
            group.retry = asyncio.get_running_loop().call_later(
                max(0.0, decided.retry_at - time.monotonic()), self._retry, group)
        for _ in range(decided.start):
            if not self._start_replica(group):
                if decided.make_room is not None:
                    # No room to start the successor first: make room by draining an old replica.
                    self._end(decided.make_room, "replaced after the model's spec changed (no room to start "
                              "its successor first)", wanted=True)
                break

    def _retry(self, group: ModelGroup) -> None:
        group.retry = None
        self._reconcile(group)

    def _start_replica(self, group: ModelGroup) -> bool:
        """Place and start one replica of the group's spec; False (and the group unschedulable) if it has no room."""
        spec = group.spec
        index = group.next_index
        new_id = replica_id(self.settings.instance, spec.name, spec.version, index, new_nonce())
        assert self.runtime is not None
        gpu: str | None = None
        if not self.runtime.places_replicas:  # a cluster runtime's scheduler places, and says when it cannot
            on_cpu = sum(r.gpu is None for r in self._replicas.values())  # draining ones hold theirs until gone
            gpu, problem = self.placement.place(spec.key, spec.run_on_gpu, new_id, on_cpu=on_cpu)
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
        replica.task = asyncio.create_task(
            run_replica(self.runtime, self._plan(replica), replica, self._ended),
            name=f"replica {new_id}")
        replica_metrics.started(replica, group)
        self._status_changed(group)
        return True

    def _plan(self, replica: Replica) -> ReplicaPlan:
        return replica_plan(self.settings, replica, self._replica_keys)

    def _end(self, replica: Replica, reason: str, *, wanted: bool) -> None:
        """Begin ending a replica.

        ``wanted``: a planned stop. The batch managers hear ``replica_draining`` (no new batches),
        the replica is told ``stop`` and may answer the batches it holds; ``replica_down`` waits
        for its exit (``_ended``). Otherwise it is lost: ``replica_down`` and its batches fail now.
        """
        if not replica.live:
            return
        (log.info if wanted else log.warning)("ending replica %s: %s", replica.id, reason)
        # A stateful replica scaled down keeps serving its sessions (nothing else) until they end or this passes.
        grace_s = (replica.spec.session_idle_timeout_s if wanted and reason == SCALED_DOWN and replica.spec.stateful
                   and replica.state is ReplicaState.READY and not self._closing else None)
        replica.state = ReplicaState.STOPPING
        replica.end_reason = reason
        replica.wanted_gone = wanted
        replica_metrics.moved(replica)
        if wanted:
            self.announce.replica_draining(replica, reason, grace_s)
            if grace_s is not None:
                replica.sessions_timer = asyncio.get_running_loop().call_later(grace_s, self._stop_retired, replica)
                self._status_changed(replica.group)
                return
            self._send_stop(replica)
        else:
            replica.group.replacing[replica.id] = reason  # readiness says which replica is replaced, and why
            self.announce.replica_down(replica, reason)  # before the `failed`s: see `_ended`
            self.relay.fail_in_flight(replica, reason)
            replica.stop_grace_s = KILL_GRACE_S
        replica.stop_requested.set()
        self._status_changed(replica.group)

    def _stop_retired(self, replica: Replica) -> None:
        """The sessions' grace of a stateful replica scaled down is over (or the task manager stops): the drain
        proper, which ends what sessions are left there (``session_lost``) and stops it."""
        if replica.sessions_timer is not None:
            replica.sessions_timer.cancel()
            replica.sessions_timer = None
        if replica.stop_requested.is_set() or self._replicas.get(replica.identity) is not replica:
            return
        self.announce.replica_draining(replica, f"{replica.end_reason}; the grace for its sessions is over")
        self._send_stop(replica)
        replica.stop_requested.set()

    def _send_stop(self, replica: Replica) -> None:
        """Tell a draining replica to stop: it answers what it holds, within its grace."""
        self.relay.send_replica(replica, [m.encode(m.Stop())])
        replica.stop_grace_s = (self.settings.shutdown_drain_s if self._closing
                                else max(STOP_GRACE_S, self.settings.request_timeout_s))

    def _ended(self, replica: Replica, how: str, start_failed: bool) -> None:
        """Forget a replica that is gone, tell the batch managers, and replace it if it should be."""
        if replica.sessions_timer is not None:
            replica.sessions_timer.cancel()
            replica.sessions_timer = None
        self._replicas.pop(replica.identity, None)
        if self._replica_keys is not None:
            self._replica_keys.revoke(replica.id)
        self.placement.release(replica.id)
        group = replica.group
        group.replicas.pop(replica.id, None)
        group.replacing.pop(replica.id, None)
        replica_metrics.gone(replica)
        if not replica.wanted_gone:
            replica_metrics.died(replica, group)
        reason = clip_reason(f"{replica.end_reason}; {how}" if replica.end_reason else how)
        # Down first: a batch manager must know the replica is dead before any `failed` of its batches, or
        # the credit each returns would send the retry and the queue to the corpse.
        self.announce.replica_down(replica, reason)
        self.relay.fail_in_flight(replica, reason)
        self._status_changed(group)
        if self._closing:
            return
        if replica.wanted_gone:
            log.info("replica %s ended: %s", replica.id, how)
        elif replica.generation == group.generation:  # an outdated replica's failure is no news
            log.warning("replica %s of %s ended unexpectedly: %s", replica.id, group.spec.key, reason)
            if record_unexpected_end(group, replica, reason, time.monotonic(), self._restart_policy,
                                     start_failed=start_failed):
                log.error("model %s failed: %s", group.spec.key, reason)
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
            if replica.sessions_timer is not None:
                self._stop_retired(replica)  # scaled down and keeping its sessions: no grace at shutdown
        tasks = [replica.task for replica in replicas if replica.task is not None]
        if tasks:
            budget_s = self.settings.shutdown_drain_s + SHUTDOWN_KILL_MARGIN_S
            _done, late = await asyncio.wait(tasks, timeout=budget_s)
            # One cancel each: a replica task's cancellation handler still has to stop its process.
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for replica in replicas:
            replica_metrics.gone(replica)  # a replica task cancelled past the budget never reported its end
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
            self.statuses.mark(group)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.statuses.flush(store, stopped=True), timeout=5.0)
        await runtime.close()
        await store.close()

    def _status_changed(self, group: ModelGroup) -> None:
        self.statuses.mark(group)
        self.announce.state_changed(group)
