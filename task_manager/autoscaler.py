"""The autoscaler: a model version's target replica count, between ``min_replicas`` and ``max_replicas``. Pure.

It scales on what the batch managers report (``task_manager.load``: requests queued, batches at replicas, over
every batch manager) against what the ready replicas hold at once. Nothing here reads a clock, sends or starts
anything: the task manager passes the time and what it sees (``Observation``) on each load report and each
supervision tick, and carries a ``Decision`` out by reconciling (tests/test_autoscaler.py drives time by hand).

The rules (docs/MODELS.md, "Scaling"):

- **Up** when the ready replicas hold at least ``target_in_flight_per_replica`` batches each (unset: their
  capacity, i.e. they are saturated) *and* requests wait, continuously for ``scale_up_delay_s``. It goes up to
  what the load needs (batches in flight plus the batches the waiting requests make, over the per-replica
  target), at least one, at most ``max_replicas``. A replica still starting is capacity on its way: no further
  step up until every replica of the target is ready, and the clock starts again then.
- **Down** one replica at a time, when the load fitted in one replica fewer *at half the up threshold*
  (``DOWN_FRACTION``: the hysteresis) with nothing waiting, continuously for ``scale_down_delay_s``.
  The reconciler drains the replica it picks ("scaled down"): its batches are answered, none is lost.
- **From zero** at once: a model scaled to zero (target 0, ``max_replicas`` >= 1) with any request waiting
  gets one replica without waiting for ``scale_up_delay_s`` (the request is already waiting for its start).
- Both clocks start again after every move (the cooldown), and a single report off the condition restarts
  them, so a load that hovers at a threshold moves the target at most once per delay, never back and forth.
- A spec change clamps the target into the new ``min_replicas..max_replicas`` at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from model_manager.spec import ModelSpec

# A replica fewer must be able to carry the load at this fraction of the up threshold before one is drained:
# well under the up threshold, so the count a load settles at is not one it would leave again.
DOWN_FRACTION = 0.5

Direction = Literal["up", "down"]
# Why the target moved, as the decisions metric counts it (a few fixed values: a label, not free text).
Cause = Literal["saturated", "cold_start", "underused", "idle", "bounds"]


@dataclass(frozen=True)
class Observation:
    """What the task manager sees of one model version when it asks the autoscaler."""

    queued: int
    """Requests waiting in batch managers for a batch."""
    in_flight: int
    """Batches at the model version's replicas."""
    ready: int
    """Replicas serving."""
    capacity: int
    """Batches the ready replicas hold at once, together (0 when none is ready)."""


@dataclass(frozen=True)
class Decision:
    target: int
    direction: Direction
    cause: Cause
    reason: str
    """For the log: the figures behind the move."""


@dataclass
class Autoscaler:
    """One model version's target and the clocks of the moves it is considering."""

    target: int
    busy_since: float | None = None
    """Since when the replicas have been saturated with requests waiting (None: they are not)."""
    quiet_since: float | None = None
    """Since when the load has fitted in one replica fewer (None: it has not)."""
    per_replica_seen: float = 1.0
    """The last per-replica capacity seen while replicas were ready: the unit when none is (scaled to zero)."""

    def bound(self, spec: ModelSpec) -> Decision | None:
        """Clamp the target into the spec's ``min_replicas..max_replicas`` (a spec change)."""
        clamped = min(max(self.target, spec.min_replicas), spec.max_replicas)
        if clamped == self.target:
            return None
        direction: Direction = "up" if clamped > self.target else "down"
        reason = (f"the spec allows {spec.min_replicas}..{spec.max_replicas} replicas "
                  f"(target was {self.target})")
        return self._move(clamped, direction, "bounds", reason)

    def observe(self, spec: ModelSpec, seen: Observation, now: float) -> Decision | None:
        """The move this observation at ``now`` calls for, if any (the target is updated to it)."""
        bounded = self.bound(spec)
        if bounded is not None:
            return bounded
        if seen.ready:
            self.per_replica_seen = seen.capacity / seen.ready
        per_replica = spec.target_in_flight_per_replica or self.per_replica_seen
        if self.target == 0:
            if (seen.queued or seen.in_flight) and spec.max_replicas > 0:
                return self._move(1, "up", "cold_start",
                                  f"{seen.queued} requests waiting while scaled to zero")
            return None
        decision = self._up(spec, seen, per_replica, now)
        if decision is None:
            decision = self._down(spec, seen, per_replica, now)
        return decision

    def _up(self, spec: ModelSpec, seen: Observation, per_replica: float, now: float) -> Decision | None:
        coming = self.target > seen.ready  # replicas of the target still starting (or not placed yet)
        saturated = seen.queued > 0 and seen.ready > 0 and seen.in_flight >= per_replica * seen.ready
        if not saturated or coming or self.target >= spec.max_replicas:
            self.busy_since = None
            return None
        if self.busy_since is None:
            self.busy_since = now
        if now - self.busy_since < spec.scale_up_delay_s:
            return None
        # The batches the load makes: those at replicas, and those the waiting requests would fill.
        demand = seen.in_flight + math.ceil(seen.queued / spec.max_batch_size)
        wanted = min(spec.max_replicas, max(self.target + 1, math.ceil(demand / per_replica)))
        reason = (f"{seen.in_flight} batches at {seen.ready} ready replicas (target {per_replica:g} each) and "
                  f"{seen.queued} requests waiting for {now - self.busy_since:.1f}s")
        return self._move(wanted, "up", "saturated", reason)

    def _down(self, spec: ModelSpec, seen: Observation, per_replica: float, now: float) -> Decision | None:
        fewer = self.target - 1
        fits = seen.queued == 0 and seen.in_flight <= DOWN_FRACTION * per_replica * fewer
        if not fits or self.target <= spec.min_replicas:
            self.quiet_since = None
            return None
        if self.quiet_since is None:
            self.quiet_since = now
        quiet_s = now - self.quiet_since
        if quiet_s < spec.scale_down_delay_s:
            return None
        if fewer == 0:
            return self._move(0, "down", "idle", f"no request for {quiet_s:.1f}s")
        reason = (f"{seen.in_flight} batches at {seen.ready} ready replicas fitted in {fewer} "
                  f"(at most {DOWN_FRACTION * per_replica * fewer:g}) for {quiet_s:.1f}s")
        return self._move(fewer, "down", "underused", reason)

    def _move(self, target: int, direction: Direction, cause: Cause, reason: str) -> Decision:
        self.target = target
        self.busy_since = self.quiet_since = None  # the cooldown: each clock starts again from this move
        return Decision(target, direction, cause, reason)
