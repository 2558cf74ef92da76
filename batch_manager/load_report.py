"""What this batch manager tells the task manager about its load (``m.Load``, docs/PROTOCOL.md).

The task manager's autoscaler scales on it, and it splits each replica's credit between batch managers by it.
A report goes out every ``LOAD_REPORT_S`` while any model version has requests queued or batches at replicas,
once more with zeros for each version whose load just ended, and at once when requests start waiting for a
model version with no replica (``Scheduler.take_cold_demand``: scale from zero should not wait for the next
tick). An idle batch manager sends nothing.
"""

from __future__ import annotations

from inferoxy import messages as m

LOAD_REPORT_S = 0.5


class LoadReporter:
    def __init__(self) -> None:
        self._loaded: set[str] = set()  # model versions the last report gave a load to

    def report(self, loads: dict[str, tuple[int, int]]) -> m.Load | None:
        """The report for ``loads`` (``Scheduler.load``), or None when there is nothing to say."""
        entries = []
        for key, (queued, in_flight) in loads.items():
            name, _, version = key.partition("/")
            entries.append(m.ModelLoad(name, version, queued, in_flight))
        for key in self._loaded - loads.keys():
            name, _, version = key.partition("/")
            entries.append(m.ModelLoad(name, version, 0, 0))
        self._loaded = set(loads)
        return m.Load(entries) if entries else None
