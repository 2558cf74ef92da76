"""The batch manager's metrics: what the service records as it performs the scheduler's actions.

The scheduler stays pure (no globals, no clock): it says which model versions' counts moved
(``Scheduler.take_changed``) and puts each request's queue wait on its ``Dispatch``; this records them.
Gauges are set from the scheduler's own counts, never nudged up and down, so they cannot drift from the
truth and return to 0 with the queue. Each is this process's value (``livesum`` across processes).

Hot path. Under ``inferoxy serve`` every metric write goes to the shared samples directory (an mmap
write under a lock, 1-2 µs), and a batch of one request would cost six of them. So observations are
counted in plain ints per bucket (``metrics.BufferedHistogram``) and written, one write per bucket
touched, at ``flush``, which the service calls at most once per ``metrics.FLUSH_S`` after a drain, with the
gauges (set only for the model versions whose counts changed, and only the values that moved).
"""

from __future__ import annotations

from typing import Any

from batch_manager.actions import Dispatch
from batch_manager.scheduler import Scheduler
from batch_manager.state import ModelCounts
from inferoxy import metrics


class _Children:
    """One model version's labelled metrics, looked up once."""

    __slots__ = ("queue_depth", "queue_wait", "batch_size", "compute", "in_flight", "sessions", "shown")

    def __init__(self, model: str, version: str, pending: list[metrics.BufferedHistogram]) -> None:
        self.queue_depth: Any = metrics.QUEUE_DEPTH.labels(model, version)
        self.queue_wait = metrics.BufferedHistogram(metrics.QUEUE_SECONDS.labels(model, version), pending)
        self.batch_size = metrics.BufferedHistogram(metrics.BATCH_SIZE.labels(model, version), pending)
        self.compute = metrics.BufferedHistogram(metrics.BATCH_COMPUTE_SECONDS.labels(model, version), pending)
        self.in_flight: Any = metrics.BATCHES_IN_FLIGHT.labels(model, version)
        self.sessions: Any = metrics.SESSIONS_OPEN.labels(model, version)
        self.shown: ModelCounts = (0, 0, 0)  # what the gauges were last set to


class Recorder:
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        # By model version (name/version). Bounded by the model versions this process has served, as
        # prometheus-client's own table of labelled children is.
        self._children: dict[str, _Children] = {}
        self._pending: list[metrics.BufferedHistogram] = []  # histograms observed since the last flush

    def _of(self, key: str) -> _Children:
        children = self._children.get(key)
        if children is None:
            model, _, version = key.partition("/")  # names and versions never hold "/" (spec.NAME_PATTERN)
            children = self._children[key] = _Children(model, version, self._pending)
        return children

    def dispatched(self, dispatch: Dispatch) -> None:
        """A batch went to a replica: its size, and how long each of its requests waited for it."""
        if not dispatch.items:
            return  # only ends sessions: no request rode it
        children = self._of(f"{dispatch.model}/{dispatch.version}")
        children.batch_size.observe(len(dispatch.items))
        observe = children.queue_wait.observe
        for wait in dispatch.waits:
            observe(wait)

    def computed(self, replica: str, compute_ns: int) -> None:
        """A replica's report of how long its model computed a batch."""
        key = self._scheduler.model_of(replica)
        if key is not None:
            self._of(key).compute.observe(compute_ns / 1e9)

    def flush(self) -> None:
        """Write what was observed since the last call, and set the gauges of the model versions that changed."""
        pending = self._pending
        if pending:
            for histogram in pending:
                histogram.flush()
            pending.clear()
        for key, counts in self._scheduler.take_changed():
            children = self._of(key)
            shown = children.shown
            if counts == shown:
                continue  # under load a drain often ends where it began (a batch out, its answer back)
            queued, in_flight, sessions = counts
            if queued != shown[0]:
                children.queue_depth.set(queued)
            if in_flight != shown[1]:
                children.in_flight.set(in_flight)
            if sessions != shown[2]:
                children.sessions.set(sessions)
            children.shown = counts
