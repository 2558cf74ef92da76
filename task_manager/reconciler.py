"""Desired against actual replicas: what to start, what to drain, when to try again. Pure.

Every function here reads a ``ModelGroup`` (and its replicas) and the time it is given, and
returns a decision; none starts, stops or sends anything, and none reads a clock, so a test
drives them with plain objects and numbers (tests/test_reconciler.py). The task manager
(``task_manager.service``) carries the decisions out.

The rules:

- A group runs ``desired`` replicas of its current spec (its ``generation``). Surplus ones are
  drained, fewest losses first: replicas still starting, then the newest.
- A spec change that alters what replicas run is a rolling update: at most one replica more than
  wanted runs; an outdated replica that is not serving yet is drained at once; a serving one only
  while no other outdated replica is draining and the replicas left cover what is wanted. When
  a successor cannot be placed, an outdated replica is drained to make room.
- Unexpected ends back off exponentially (reset once a replica served ``backoff_max_s``), and
  ``crash_loop_failures`` of them in a row, or a start the runtime refuses, mark the model failed.
- A ready replica silent past the liveness limit, one holding batches without answering any for
  longer than any request may wait, or one that never became ready (its start timeout
  waits while a cluster cannot place it), is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from task_manager.replicas import ModelGroup, Replica, ReplicaState, backoff_delay

SCALED_DOWN = "scaled down"  # why a surplus replica is drained (a stateful one's sessions get a grace: service)


@dataclass
class Plan:
    """What one reconciliation decided, to be carried out in this order."""

    drain: list[tuple[Replica, str]] = field(default_factory=list)
    """Replicas to end on purpose (drained: they answer what they hold), with why."""
    start: int = 0
    """Replicas of the current spec to start now."""
    retry_at: float | None = None
    """Replicas are missing but the restart backoff holds until then: reconcile again at that time."""
    make_room: Replica | None = None
    """If a start finds no room, drain this outdated replica instead (its successor then fits)."""


def plan(group: ModelGroup, now: float) -> Plan:
    out = Plan()
    if group.removed:
        return out
    live = group.live()
    current = [r for r in live if r.generation == group.generation]
    outdated = [r for r in live if r.generation != group.generation]
    draining_outdated = any(r.generation != group.generation and not r.live for r in group.replicas.values())
    surplus = len(current) - group.desired
    if surplus > 0:
        # Fewest losses first: replicas still starting, then the newest.
        doomed = sorted(current, key=lambda r: (r.state is ReplicaState.READY, -r.started_at))[:surplus]
        for replica in doomed:
            out.drain.append((replica, SCALED_DOWN))
            current.remove(replica)
    for replica in [r for r in outdated if r.state is not ReplicaState.READY]:
        out.drain.append((replica, "the model's spec changed"))  # serves nothing yet: no wait
        outdated.remove(replica)
        draining_outdated = True
    if outdated and not draining_outdated:
        ready_current = sum(r.state is ReplicaState.READY for r in current)
        if ready_current + len(outdated) - 1 >= group.desired:
            out.drain.append((outdated.pop(0), "replaced after the model's spec changed"))
            draining_outdated = True
    missing = group.desired - len(current)
    if outdated:
        missing = min(missing, group.desired + 1 - len(current) - len(outdated))
    if missing <= 0:
        return out
    if group.not_before > now:
        out.retry_at = group.not_before
        return out
    out.start = missing
    if outdated and not draining_outdated:
        out.make_room = outdated[0]
    return out


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float
    backoff_max_s: float
    crash_loop_failures: int


def record_unexpected_end(group: ModelGroup, replica: Replica, reason: str, now: float, policy: RestartPolicy, *,
                          start_failed: bool = False) -> bool:
    """Count a replica of the current spec that ended unplanned: restarts, failures in a row, the backoff.

    True when this end makes the model ``failed`` (its reason set) and it was not already."""
    group.last_error = reason
    group.restarts += 1
    served_s = now - replica.ready_at if replica.ready_at is not None else 0.0
    group.failures = 1 if served_s >= policy.backoff_max_s else group.failures + 1
    group.not_before = now + backoff_delay(group.failures, policy.backoff_s, policy.backoff_max_s)
    if start_failed or group.failures >= policy.crash_loop_failures:
        newly = group.failed_reason is None
        group.failed_reason = reason
        return newly
    return False


def recovered(group: ModelGroup, now: float, healthy_after_s: float) -> bool:
    """Whether a model with failures has a replica of its spec that served ``healthy_after_s``: then it is
    healthy again (the caller clears its failures)."""
    if not (group.failures or group.failed_reason):
        return False
    return any(r.state is ReplicaState.READY and r.generation == group.generation and r.ready_at is not None
               and now - r.ready_at >= healthy_after_s for r in group.replicas.values())


@dataclass(frozen=True)
class Liveness:
    start_timeout_s: float
    silence_limit_s: float
    request_timeout_s: float
    """No request waits longer: a replica holding batches without answering for longer is stuck."""


def lost_because(replica: Replica, now: float, limits: Liveness) -> str | None:
    """Why a replica must be ended as lost (it never became ready, fell silent, or is stuck), or None."""
    if replica.state is ReplicaState.STARTING:
        # Waiting for a node is not failing to start: the model's status says why meanwhile.
        if replica.unplaced:
            return None
        since = replica.placed_at if replica.placed_at is not None else replica.started_at
        if now - since > limits.start_timeout_s:
            return f"not ready within {limits.start_timeout_s:g}s"
        return None
    if replica.state is not ReplicaState.READY:
        return None
    silent = now - replica.last_seen
    if silent > limits.silence_limit_s:
        return f"no heartbeat for {silent:.1f}s"
    # A replica that heartbeats fine but holds batches it answers none of (a hung ``predict``, an answer lost
    # on the way) would hold its credit for ever. The limit is ``request_timeout_s``, not the spec's default
    # timeout: a client may ask for longer than the model's default, never for longer than the server's, so
    # by then no request in those batches is waiting for the answer any more.
    stuck_s = now - replica.progress_at
    if replica.in_flight and stuck_s > limits.request_timeout_s:
        return (f"replica {replica.id} held {len(replica.in_flight)} batches for {stuck_s:.1f}s without answering "
                f"any (longer than any request may wait: {limits.request_timeout_s:g}s)")
    return None
