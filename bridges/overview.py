"""The whole proxy at a glance, as one JSON document: ``GET /dashboard/state``, which the dashboard page
(bridges/static/) and ``inferoxy status`` show.

Three sources meet here: the registry the gateway follows (every model version, its default), the status
records the task manager writes to Redis (serving state, replicas: model_manager/spec.py ``ModelStatus``),
and the merged metrics (inferoxy/metric_samples.py: requests, latency, queue depth, batch sizes). Counters
and histograms only ever grow, so rates and percentiles "now" are differences between two samples: the
overview keeps the samples of the last ``WINDOW_S`` (plus the one just before, the base), and reports the
difference between the newest and the base. A sample is taken only when someone asks and the last is at
least ``MIN_INTERVAL_S`` old (and ``COST_FACTOR`` times what reading it cost); a faster poller (or many viewers
at once) gets the cached document, so the cost of reading every process's samples is bounded however many
dashboards are open.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from inferoxy import metric_samples, metrics
from inferoxy.metric_samples import Key, ModelSamples
from model_manager.spec import ModelStatus, version_order
from model_manager.store import Registry

WINDOW_S = 10.0
MIN_INTERVAL_S = 1.0
# Reading every process's samples costs more with models x processes (bench/bench_dashboard.py: 9 ms at 3 models
# and 6 processes, 0.16 s at 50, seconds at 500, on a loaded 2-core machine): the next sample waits this many
# times the last read's cost, so the dashboard takes at most a tenth of a core however many pages poll.
COST_FACTOR = 10.0
# Every poller waits for the one sample in progress: a Redis that hangs must not hold them for its 10 s timeout.
STATUS_TIMEOUT_S = 2.0
# More than WINDOW_S / MIN_INTERVAL_S + 1, so the window always fits; a bound whatever the clock does.
MAX_SAMPLES = 64


@dataclass
class Sample:
    at: float  # monotonic
    models: dict[Key, ModelSamples]
    components: dict[str, float]


class Window:
    """The samples of the last ``window_s`` seconds and the one before them: bounded, whatever the poll rate."""

    def __init__(self, window_s: float = WINDOW_S, max_samples: int = MAX_SAMPLES) -> None:
        self.window_s = window_s
        self.samples: deque[Sample] = deque(maxlen=max_samples)

    def add(self, sample: Sample) -> Sample | None:
        """Keep ``sample``; return the base to take differences from (None: it is the first)."""
        self.samples.append(sample)
        start = sample.at - self.window_s
        # Keep one sample at or before the window's start, so the base spans the whole window when it can.
        while len(self.samples) > 2 and self.samples[1].at <= start:
            self.samples.popleft()
        return self.samples[0] if len(self.samples) > 1 else None


def build(registry: Registry | None, statuses: Mapping[str, ModelStatus], now: Sample, base: Sample | None, *,
          wall_time: float, problems: Iterable[str] = ()) -> dict[str, Any]:
    """The document ``GET /dashboard/state`` answers (docs/ADMIN.md, "The dashboard", describes each field)."""
    span = now.at - base.at if base is not None else None
    rows = []
    keys = sorted({(spec.name, spec.version) for spec in registry} if registry is not None else set(),
                  key=lambda k: (k[0], version_order(k[1])))
    for name, version in keys:
        spec = registry.specs[f"{name}/{version}"] if registry is not None else None
        status = statuses.get(f"{name}/{version}")
        samples = now.models.get((name, version), ModelSamples())
        past = base.models.get((name, version)) if base is not None else None
        rows.append({
            "name": name,
            "version": version,
            "default": registry is not None and registry.defaults.get(name) == version,
            "loaded": spec is not None and spec.max_replicas > 0,  # min_replicas 0 alone: it scales to zero
            "description": spec.description if spec is not None else None,
            "framework": spec.framework if spec is not None else None,
            **_serving(status, wall_time),
            "queue_depth": int(samples.queue_depth),
            "batches_in_flight": int(samples.batches_in_flight),
            "sessions_open": int(samples.sessions_open),
            "requests": int(samples.answered),
            "errors": int(samples.errors),
            "requests_by_bridge": {bridge: int(n) for bridge, n in sorted(samples.by_bridge().items())},
            **_recent(samples, past, span),
        })
    total_now = _total(now.models.values())
    total_base = _total(base.models.values()) if base is not None else None
    return {
        "time": wall_time,
        "window_s": None if span is None else round(span, 3),
        "registry_revision": registry.revision if registry is not None else None,
        "totals": {"requests": int(total_now.answered), "errors": int(total_now.errors),
                   **{k: v for k, v in _recent(total_now, total_base, span).items() if k.endswith("_rate")}},
        "components": {name: bool(up) for name, up in sorted(now.components.items())},
        "models": rows,
        "problems": list(problems),
    }


def _serving(status: ModelStatus | None, wall_time: float) -> dict[str, Any]:
    if status is None:  # statuses expire: no task manager has reported this version lately
        return {"state": "unknown", "reason": "no task manager has reported this model version recently",
                "ready_replicas": 0, "desired_replicas": None, "restarts": 0, "replicas": []}
    return {
        "state": status.state,
        "reason": status.reason,
        "ready_replicas": status.ready_replicas,
        "desired_replicas": status.desired_replicas,
        "restarts": status.restarts,
        "replicas": [{"id": r.id, "state": r.state, "gpu": r.gpu, "pid": r.pid,
                      "uptime_s": round(max(0.0, wall_time - r.started_at), 1),
                      "ready_for_s": None if r.ready_at is None else round(max(0.0, wall_time - r.ready_at), 1)}
                     for r in status.replicas],
    }


def _recent(now: ModelSamples, base: ModelSamples | None, span: float | None) -> dict[str, float | None]:
    """Rates and percentiles over the window (None with no window, or nothing in it)."""
    if span is None or span <= 0:
        return {"request_rate": None, "error_rate": None, "latency_p50_s": None, "latency_p99_s": None,
                "batch_size_mean": None}
    requests = _since(now.answered, base.answered if base is not None else None)
    errors = _since(now.errors, base.errors if base is not None else None)
    # Answered ok only: errors answer fast and would hide slowness.
    latency = now.duration_ok.minus(base.duration_ok if base is not None else None)
    batches = now.batch_size.minus(base.batch_size if base is not None else None)
    p50, p99 = latency.quantile(0.5), latency.quantile(0.99)
    return {
        "request_rate": round(requests / span, 3),
        "error_rate": round(errors / span, 3),
        "latency_p50_s": None if p50 is None else round(p50, 6),
        "latency_p99_s": None if p99 is None else round(p99, 6),
        "batch_size_mean": round(batches.total / batches.count, 2) if batches.count > 0 else None,
    }


def _since(now: float, base: float | None) -> float:
    """A counter's growth since ``base`` (all of it if it went back: the processes restarted)."""
    return now - base if base is not None and now >= base else now


def _total(models: Iterable[ModelSamples]) -> ModelSamples:
    """Every model version's requests added up (all the totals show)."""
    total = ModelSamples()
    for samples in models:
        for key, n in samples.requests.items():
            total.requests[key] = total.requests.get(key, 0.0) + n
    return total


class Overview:
    """Answers ``GET /dashboard/state``: samples the metrics when asked, no more often than their cost allows."""

    def __init__(self, registry: Callable[[], Registry | None],
                 statuses: Callable[[], Awaitable[dict[str, ModelStatus]]], *,
                 collect: Callable[[], CollectorRegistry] | None = None, window_s: float = WINDOW_S,
                 min_interval_s: float = MIN_INTERVAL_S, status_timeout_s: float = STATUS_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self._registry = registry
        self._statuses = statuses
        self._collect = collect or metrics.registry
        self._window = Window(window_s)
        self._min_interval_s = min_interval_s
        self._status_timeout_s = status_timeout_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._cached: bytes | None = None
        self._next_at = 0.0  # monotonic time before which the cached document is answered
        self._lock = asyncio.Lock()  # one sample at a time; the others wait for it and share it

    async def state(self) -> bytes:
        """The document as JSON bytes: the cached one until ``min_interval_s`` (or ``COST_FACTOR`` times what the
        last read of the metrics cost) has passed since that read began, else a fresh one."""
        async with self._lock:
            if self._cached is not None and self._clock() < self._next_at:
                return self._cached
            problems = []
            try:
                statuses = await asyncio.wait_for(self._statuses(), self._status_timeout_s)
            except asyncio.TimeoutError:
                statuses = {}
                problems.append(f"the serving statuses cannot be read: Redis did not answer within "
                                f"{self._status_timeout_s:g} s")
            except Exception as exc:  # Redis away: show the rest, and say why the states are missing
                statuses = {}
                problems.append(f"the serving statuses cannot be read from Redis: {type(exc).__name__}: {exc}")
            # Reading every process's sample files is blocking I/O: off the event loop, which serves inference.
            started = self._clock()
            read = await asyncio.to_thread(lambda: metric_samples.read(self._collect()))
            sample = Sample(self._clock(), read.models, read.components)
            self._next_at = started + max(self._min_interval_s, COST_FACTOR * (sample.at - started))
            base = self._window.add(sample)
            document = build(self._registry(), statuses, sample, base, wall_time=self._wall_clock(),
                             problems=problems)
            self._cached = orjson.dumps(document)
            return self._cached
