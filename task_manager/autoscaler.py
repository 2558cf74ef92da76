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
- **Down** one replica at a time, when the load *averaged over the last* ``scale_down_delay_s`` fits in one
  replica fewer at half the up threshold (``DOWN_FRACTION``: the hysteresis). The load is the batches at
  replicas plus the batches the waiting requests make, weighted by how long each report held: reports are
  instants, and a request caught in its batching window, or one late burst, must not restart a wait of
  minutes (it did, when every report had to fit: in one bench run of three the last replica never went).
  The load reported last must also fit in the replicas left without saturating them.
  To zero stays strict: not one request for the whole delay. The reconciler drains the replica it picks
  ("scaled down"): its batches are answered, none is lost.
- **From zero** at once: a model scaled to zero (target 0, ``max_replicas`` >= 1) with any request waiting
  gets one replica without waiting for ``scale_up_delay_s`` (the request is already waiting for its start).
- Both clocks start again after every move (the cooldown: the down window then needs a whole delay of
  reports again), and a single report off the up condition restarts that clock, so a load that hovers at a
  threshold moves the target at most once per delay, never back and forth.
- A spec change clamps the target into the new ``min_replicas..max_replicas`` at once.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
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
    """Since when no request has been queued or at a replica (None: one is): the clock of the move to zero."""
    loads: deque[tuple[float, float]] = field(default_factory=deque)
    """(time, batches of load) reported since the last move, back to the last one before the down window."""
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
        self._record(seen.in_flight + seen.queued / spec.max_batch_size, now, spec.scale_down_delay_s)
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
        if self.target <= spec.min_replicas:
            self.quiet_since = None
            return None
        if fewer == 0:
            if seen.queued or seen.in_flight:
                self.quiet_since = None
                return None
            if self.quiet_since is None:
                self.quiet_since = now
            quiet_s = now - self.quiet_since
            if quiet_s < spec.scale_down_delay_s:
                return None
            return self._move(0, "down", "idle", f"no request for {quiet_s:.1f}s")
        limit = DOWN_FRACTION * per_replica * fewer
        mean = self._mean_load(now, spec.scale_down_delay_s)
        if mean is None or mean > limit or self.loads[-1][1] > per_replica * fewer:
            return None  # (the last: a load that rose at the window's end would saturate the replicas left)
        reason = (f"{mean:.2f} batches on average over {spec.scale_down_delay_s:g}s at {seen.ready} ready "
                  f"replicas fit in {fewer} (at most {limit:g})")
        return self._move(fewer, "down", "underused", reason)

    def _record(self, load: float, now: float, window_s: float) -> None:
        self.loads.append((now, load))
        start = now - window_s
        while len(self.loads) >= 2 and self.loads[1][0] <= start:
            self.loads.popleft()  # the one after it already covers the window's start

    def _mean_load(self, now: float, window_s: float) -> float | None:
        """The load over ``[now - window_s, now]``, each report holding until the next; None while the reports
        since the last move do not reach back that far (the cooldown)."""
        start = now - window_s
        if not self.loads or self.loads[0][0] > start:
            return None
        if window_s <= 0:
            return self.loads[-1][1]
        times = [t for t, _ in self.loads][1:] + [now]
        held = sum(load * (until - max(t, start)) for (t, load), until in zip(self.loads, times, strict=True))
        return held / window_s

    def _move(self, target: int, direction: Direction, cause: Cause, reason: str) -> Decision:
        self.target = target
        self.busy_since = self.quiet_since = None  # the cooldown: each clock starts again from this move
        self.loads.clear()
        return Decision(target, direction, cause, reason)
