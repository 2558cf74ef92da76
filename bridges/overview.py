"""The whole proxy at a glance, as one JSON document: ``GET /dashboard/state``, which the dashboard page
(bridges/static/) and ``inferoxy status`` show.

Three sources meet here: the registry the gateway follows (every model version, its default), the status
records the task manager writes to Redis (serving state, replicas: model_manager/spec.py ``ModelStatus``),
and the merged metrics (``metrics.registry()``: requests, latency, queue depth, batch sizes). Counters and
histograms only ever grow, so rates and percentiles "now" are differences between two samples: the overview
keeps the samples of the last ``WINDOW_S`` (plus the one just before, the base), and reports the
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
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from inferoxy import metrics
from model_manager.spec import ModelStatus
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

# The catalogue's names (inferoxy/metrics.py) as a scrape shows them; tests/test_overview.py checks them.
REQUESTS = "inferoxy_requests_total"
LATENCY = "inferoxy_request_duration_seconds"
QUEUE_DEPTH = "inferoxy_queue_depth"
BATCH_SIZE = "inferoxy_batch_size"
BATCHES_IN_FLIGHT = "inferoxy_batches_in_flight"
SESSIONS_OPEN = "inferoxy_sessions_open"
COMPONENT_UP = "inferoxy_component_up"
GAUGES = {QUEUE_DEPTH: "queue_depth", BATCHES_IN_FLIGHT: "batches_in_flight", SESSIONS_OPEN: "sessions_open"}

Key = tuple[str, str]  # (model, version)


@dataclass
class Histogram:
    """One histogram's cumulative buckets (upper bound -> count), count and sum, summed over label sets."""

    buckets: dict[float, float] = field(default_factory=dict)
    count: float = 0.0
    total: float = 0.0

    def add_bucket(self, le: float, value: float) -> None:
        self.buckets[le] = self.buckets.get(le, 0.0) + value

    def minus(self, base: Histogram | None) -> Histogram:
        """What was observed since ``base`` (all of it if the counts went back: the processes restarted)."""
        if base is None or self.count < base.count:
            return self
        return Histogram({le: value - base.buckets.get(le, 0.0) for le, value in self.buckets.items()},
                         self.count - base.count, self.total - base.total)


@dataclass
class Counters:
    """A model version's numbers at one sample: counters and histograms cumulative, gauges as they stand."""

    requests: float = 0.0
    errors: float = 0.0
    by_bridge: dict[str, float] = field(default_factory=dict)
    latency: Histogram = field(default_factory=Histogram)  # answered ok: errors answer fast and would hide slowness
    batch_size: Histogram = field(default_factory=Histogram)
    gauges: dict[str, float] = field(default_factory=dict)


@dataclass
class Sample:
    at: float  # monotonic
    models: dict[Key, Counters]
    components: dict[str, float]


def read_metrics(registry: CollectorRegistry) -> tuple[dict[Key, Counters], dict[str, float]]:
    """Per model version, what the dashboard shows of the metrics; and each component's up gauge."""
    models: dict[Key, Counters] = {}
    components: dict[str, float] = {}

    def of(labels: Mapping[str, str]) -> Counters:
        key = (labels.get("model", ""), labels.get("version", ""))
        found = models.get(key)
        if found is None:
            found = models[key] = Counters()
        return found

    for family in registry.collect():
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == REQUESTS:
                counters = of(labels)
                counters.requests += value
                if labels.get("code") != metrics.OK:
                    counters.errors += value
                bridge = labels.get("bridge", "")
                counters.by_bridge[bridge] = counters.by_bridge.get(bridge, 0.0) + value
            elif name.startswith(LATENCY) and labels.get("outcome") == metrics.OK:
                _add(of(labels).latency, name.removeprefix(LATENCY), labels, value)
            elif name.startswith(BATCH_SIZE):
                _add(of(labels).batch_size, name.removeprefix(BATCH_SIZE), labels, value)
            elif name in GAUGES:
                gauges = of(labels).gauges
                gauges[GAUGES[name]] = gauges.get(GAUGES[name], 0.0) + value
            elif name == COMPONENT_UP:
                components[labels.get("component", "")] = value
    return models, components


def _add(histogram: Histogram, suffix: str, labels: Mapping[str, str], value: float) -> None:
    if suffix == "_bucket":
        histogram.add_bucket(float(labels["le"]), value)
    elif suffix == "_count":
        histogram.count += value
    elif suffix == "_sum":
        histogram.total += value


def quantile(q: float, histogram: Histogram) -> float | None:
    """The ``q`` quantile of a histogram's observations, as Prometheus's ``histogram_quantile`` estimates it:
    linear within the bucket the rank falls in; the highest finite bound if it falls in the +Inf bucket."""
    bounds = sorted(histogram.buckets)
    if not bounds:
        return None
    total = histogram.buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = histogram.buckets[upper]
        if count >= rank:
            if upper == float("inf"):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


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
                  key=lambda k: (k[0], _version_order(k[1])))
    for name, version in keys:
        spec = registry.specs[f"{name}/{version}"] if registry is not None else None
        status = statuses.get(f"{name}/{version}")
        counters = now.models.get((name, version), Counters())
        past = base.models.get((name, version)) if base is not None else None
        rows.append({
            "name": name,
            "version": version,
            "default": registry is not None and registry.defaults.get(name) == version,
            "loaded": spec is not None and spec.min_replicas > 0,
            **_serving(status, wall_time),
            **{gauge: int(counters.gauges.get(gauge, 0)) for gauge in GAUGES.values()},
            "requests": int(counters.requests),
            "errors": int(counters.errors),
            "requests_by_bridge": {bridge: int(n) for bridge, n in sorted(counters.by_bridge.items())},
            **_recent(counters, past, span),
        })
    total_now = _total(now.models.values())
    total_base = _total(base.models.values()) if base is not None else None
    return {
        "time": wall_time,
        "window_s": None if span is None else round(span, 3),
        "registry_revision": registry.revision if registry is not None else None,
        "totals": {"requests": int(total_now.requests), "errors": int(total_now.errors),
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


def _recent(now: Counters, base: Counters | None, span: float | None) -> dict[str, float | None]:
    """Rates and percentiles over the window (None with no window, or nothing in it)."""
    if span is None or span <= 0:
        return {"request_rate": None, "error_rate": None, "latency_p50_s": None, "latency_p99_s": None,
                "batch_size_mean": None}
    requests = now.requests - base.requests if base is not None and now.requests >= base.requests else now.requests
    errors = now.errors - base.errors if base is not None and now.errors >= base.errors else now.errors
    latency = now.latency.minus(base.latency if base is not None else None)
    batches = now.batch_size.minus(base.batch_size if base is not None else None)
    p50, p99 = quantile(0.5, latency), quantile(0.99, latency)
    return {
        "request_rate": round(requests / span, 3),
        "error_rate": round(errors / span, 3),
        "latency_p50_s": None if p50 is None else round(p50, 6),
        "latency_p99_s": None if p99 is None else round(p99, 6),
        "batch_size_mean": round(batches.total / batches.count, 2) if batches.count > 0 else None,
    }


def _total(models: Iterable[Counters]) -> Counters:
    total = Counters()
    for counters in models:
        total.requests += counters.requests
        total.errors += counters.errors
    return total


def _version_order(version: str) -> tuple[int, int | str]:
    return (1, int(version)) if version.isdigit() else (0, version)


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
            models, components = await asyncio.to_thread(lambda: read_metrics(self._collect()))
            sample = Sample(self._clock(), models, components)
            self._next_at = started + max(self._min_interval_s, COST_FACTOR * (sample.at - started))
            base = self._window.add(sample)
            document = build(self._registry(), statuses, sample, base, wall_time=self._wall_clock(),
                             problems=problems)
            self._cached = orjson.dumps(document)
            return self._cached
