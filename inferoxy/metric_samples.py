"""The merged metrics read once, per model version: what Triton's statistics (bridges/statistics.py) and the
dashboard's JSON (bridges/overview.py) derive their documents from.

``read()`` walks ``metrics.registry().collect()`` (what ``GET /metrics`` shows: every process's samples merged
under ``inferoxy serve``) in one pass and sums each model version's samples over bridges, label sets and
processes, so the statistics, the dashboard and a scrape never disagree. Counters and histograms are
cumulative; gauges are as they stand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from inferoxy import metrics

# Family names as prometheus-client reports them (counters without "_total"); tests/test_metric_samples.py checks
# them against inferoxy/metrics.py, which cannot be read here once INFEROXY_METRICS=false swapped its metrics
# for no-ops.
REQUESTS = "inferoxy_requests"
REQUEST_SECONDS = "inferoxy_request_duration_seconds"
QUEUE_SECONDS = "inferoxy_queue_wait_seconds"
BATCH_SIZE = "inferoxy_batch_size"
BATCH_COMPUTE_SECONDS = "inferoxy_batch_compute_seconds"
QUEUE_DEPTH = "inferoxy_queue_depth"
BATCHES_IN_FLIGHT = "inferoxy_batches_in_flight"
SESSIONS_OPEN = "inferoxy_sessions_open"
LAST_INFERENCE = "inferoxy_last_inference_timestamp_seconds"
COMPONENT_UP = "inferoxy_component_up"

Key = tuple[str, str]  # (model, version)


@dataclass
class Histogram:
    """One histogram's cumulative buckets (upper bound -> count), count and sum, summed over label sets."""

    buckets: dict[float, float] = field(default_factory=dict)
    count: float = 0.0
    total: float = 0.0

    def add(self, suffix: str, labels: dict[str, str], value: float) -> None:
        """Add one sample of the family (``suffix``: what follows the family name in the sample's name)."""
        if suffix == "_bucket":
            bound = float(labels["le"])
            self.buckets[bound] = self.buckets.get(bound, 0.0) + value
        elif suffix == "_count":
            self.count += value
        elif suffix == "_sum":
            self.total += value

    def minus(self, base: Histogram | None) -> Histogram:
        """What was observed since ``base`` (all of it if the counts went back: the processes restarted)."""
        if base is None or self.count < base.count:
            return self
        return Histogram({le: value - base.buckets.get(le, 0.0) for le, value in self.buckets.items()},
                         self.count - base.count, self.total - base.total)

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile of the observations, as Prometheus's ``histogram_quantile`` estimates it: linear
        within the bucket the rank falls in; the highest finite bound if it falls in the +Inf bucket."""
        bounds = sorted(self.buckets)
        if not bounds:
            return None
        total = self.buckets[bounds[-1]]
        if total <= 0:
            return None
        rank = q * total
        lower, below = 0.0, 0.0
        for upper in bounds:
            count = self.buckets[upper]
            if count >= rank:
                if upper == float("inf"):
                    return lower
                if count == below:
                    return upper
                return lower + (upper - lower) * (rank - below) / (count - below)
            lower, below = upper, count
        return lower


@dataclass
class ModelSamples:
    """One model version's merged samples."""

    requests: dict[tuple[str, str], float] = field(default_factory=dict)  # (bridge, code) -> requests answered
    duration_ok: Histogram = field(default_factory=Histogram)  # request duration of the answers that were ok
    duration_error: Histogram = field(default_factory=Histogram)  # ... and of every other outcome
    queue_wait: Histogram = field(default_factory=Histogram)
    batch_size: Histogram = field(default_factory=Histogram)
    batch_compute: Histogram = field(default_factory=Histogram)
    queue_depth: float = 0.0
    batches_in_flight: float = 0.0
    sessions_open: float = 0.0
    last_inference_s: float = 0.0  # the latest any process reported (0: none)

    @property
    def answered(self) -> float:
        return sum(self.requests.values())

    @property
    def ok(self) -> float:
        return sum(n for (_, code), n in self.requests.items() if code == metrics.OK)

    @property
    def errors(self) -> float:
        """Answered with any error code."""
        return sum(n for (_, code), n in self.requests.items() if code != metrics.OK)

    def by_bridge(self) -> dict[str, float]:
        found: dict[str, float] = {}
        for (bridge, _), n in self.requests.items():
            found[bridge] = found.get(bridge, 0.0) + n
        return found


@dataclass
class Samples:
    models: dict[Key, ModelSamples]
    components: dict[str, float]  # component -> its up gauge


# Adds one sample of a family to a model version: (into, suffix after the family's name, labels, value).
Reader = Callable[[ModelSamples, str, dict[str, str], float], None]


def _requests(into: ModelSamples, suffix: str, labels: dict[str, str], value: float) -> None:
    if suffix == "_total":  # not "_created"
        key = (labels.get("bridge", ""), labels.get("code", ""))
        into.requests[key] = into.requests.get(key, 0.0) + value


def _duration(into: ModelSamples, suffix: str, labels: dict[str, str], value: float) -> None:
    ok = labels.get("outcome") == metrics.OK
    (into.duration_ok if ok else into.duration_error).add(suffix, labels, value)


def _histogram(name: str) -> Reader:
    def add(into: ModelSamples, suffix: str, labels: dict[str, str], value: float) -> None:
        getattr(into, name).add(suffix, labels, value)
    return add


def _gauge(name: str) -> Reader:
    """Gauges of several label sets (or processes, as merged) add up."""
    def add(into: ModelSamples, suffix: str, labels: dict[str, str], value: float) -> None:
        if suffix == "":
            setattr(into, name, getattr(into, name) + value)
    return add


def _last_inference(into: ModelSamples, suffix: str, labels: dict[str, str], value: float) -> None:
    if suffix == "":
        into.last_inference_s = max(into.last_inference_s, value)


_READERS: dict[str, Reader] = {
    REQUESTS: _requests,
    REQUEST_SECONDS: _duration,
    QUEUE_SECONDS: _histogram("queue_wait"),
    BATCH_SIZE: _histogram("batch_size"),
    BATCH_COMPUTE_SECONDS: _histogram("batch_compute"),
    QUEUE_DEPTH: _gauge("queue_depth"),
    BATCHES_IN_FLIGHT: _gauge("batches_in_flight"),
    SESSIONS_OPEN: _gauge("sessions_open"),
    LAST_INFERENCE: _last_inference,
}
FAMILIES = frozenset({*_READERS, COMPONENT_UP})


def read(registry: CollectorRegistry | None = None) -> Samples:
    """Every model version's samples in ``registry`` (default: the proxy's merged metrics), and each component's
    up gauge."""
    models: dict[Key, ModelSamples] = {}
    components: dict[str, float] = {}
    for family in (registry if registry is not None else metrics.registry()).collect():
        if family.name == COMPONENT_UP:
            for sample in family.samples:
                if sample.name == COMPONENT_UP:
                    components[sample.labels.get("component", "")] = sample.value
            continue
        reader = _READERS.get(family.name)
        if reader is None:
            continue
        prefix = len(family.name)
        for sample in family.samples:
            labels = sample.labels
            key = (labels.get("model", ""), labels.get("version", ""))
            into = models.get(key)
            if into is None:
                into = models[key] = ModelSamples()
            reader(into, sample.name[prefix:], labels, sample.value)
    return Samples(models, components)
