"""The task manager's replica metrics: replicas by state, starts, deaths, restarts, time to ready.

The service calls ``moved`` whenever a replica's state may have changed and ``gone`` once it is forgotten;
each replica remembers the state it is counted under (``Replica.counted_as``), so a repeated call is a no-op
and the ``inferoxy_replicas`` gauge always equals this process's replica table (``livesum`` adds processes),
back at 0 once the replicas are gone. Not on the request path: a replica changes state a few times in its life.
"""

from __future__ import annotations

from inferoxy import metrics
from task_manager.replicas import ModelGroup, Replica, ReplicaState


def state_of(replica: Replica) -> str:
    """The state ``inferoxy_replicas`` counts it under (metrics.REPLICA_STATES)."""
    if replica.state is ReplicaState.STARTING:
        return "starting"
    if replica.state is ReplicaState.READY:
        return "ready"
    # Stopping: on purpose it drains; otherwise it was lost (dead, silent, stuck) and is being killed.
    return "draining" if replica.wanted_gone else "failed"


def moved(replica: Replica) -> None:
    """Count the replica under its current state (and no longer under its last one)."""
    state = state_of(replica)
    if state == replica.counted_as:
        return
    model, version = replica.spec.name, replica.spec.version
    if replica.counted_as is not None:
        metrics.REPLICAS.labels(model, version, replica.counted_as).dec()
    metrics.REPLICAS.labels(model, version, state).inc()
    replica.counted_as = state


def gone(replica: Replica) -> None:
    """The replica is forgotten: it leaves the gauge."""
    if replica.counted_as is not None:
        metrics.REPLICAS.labels(replica.spec.name, replica.spec.version, replica.counted_as).dec()
        replica.counted_as = None


def started(replica: Replica, group: ModelGroup) -> None:
    """A replica was started; a restart when it takes the place of one that died."""
    model, version = replica.spec.name, replica.spec.version
    metrics.REPLICA_STARTS.labels(model, version).inc()
    if group.dead_unreplaced > 0:
        group.dead_unreplaced -= 1
        metrics.REPLICA_RESTARTS.labels(model, version).inc()
    moved(replica)


def ready(replica: Replica, warmup_s: float | None = None) -> None:
    """The replica said ``ready``: how long it took from its start, and its warmup's share of that if it had one."""
    if replica.ready_at is not None:
        metrics.REPLICA_READY_SECONDS.labels(replica.spec.name, replica.spec.version).observe(
            max(0.0, replica.ready_at - replica.started_at))
    if warmup_s is not None:
        metrics.REPLICA_WARMUP_SECONDS.labels(replica.spec.name, replica.spec.version).observe(warmup_s)
    moved(replica)


def died(replica: Replica, group: ModelGroup) -> None:
    """The replica ended without being asked to (it died, could not start, or was killed as lost)."""
    metrics.REPLICA_DEATHS.labels(replica.spec.name, replica.spec.version).inc()
    if not group.removed:
        # The next start of its model replaces it; never more owed than the model wants (it may scale down).
        group.dead_unreplaced = min(group.dead_unreplaced + 1, max(group.desired, 1))
