"""Triton's statistics extension, read from the proxy's Prometheus metrics (docs/METRICS.md, "Statistics").

The metrics are the one source: ``metrics.registry()`` is what ``GET /metrics`` shows (every component's
samples merged under ``inferoxy serve``), so statistics and a scrape never disagree. Each Triton field
is a sum over those samples for one model version:

- ``inference_stats.success`` / ``fail``: ``inferoxy_requests_total`` (code ``ok`` / any error code), every
  bridge added up; ``ns`` from ``inferoxy_request_duration_seconds`` (outcome ``ok`` / ``error``).
- ``queue``: ``inferoxy_queue_wait_seconds`` (count and sum).
- ``compute_infer``: ``inferoxy_batch_compute_seconds``: counted per batch, not per request as Triton does.
- ``compute_input`` / ``compute_output``: not measured apart from the compute (zero).
- ``inference_count`` / ``execution_count``: ``inferoxy_batch_size``'s sum (requests sent in batches) and
  count (batches); Triton counts rows of a batched request, Inferoxy counts the request once.
- ``batch_stats``: ``inferoxy_batch_size``'s buckets (powers of two): sizes 1 and 2 exactly, larger sizes
  summed under their bucket's upper bound (4 holds batches of 3 and 4); ``ns`` is 0 (not measured per size).
- ``last_inference``: ``inferoxy_last_inference_timestamp_seconds``, in milliseconds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from bridges.errors import RequestError
from inferoxy import metrics
from inferoxy.protocol import ErrorCode
from model_manager.spec import ModelSpec

# Family names as prometheus-client reports them (counters without "_total"); a test checks them against
# inferoxy/metrics.py, which cannot be read here once INFEROXY_METRICS=false swapped its metrics for no-ops.
REQUESTS = "inferoxy_requests"
REQUEST_SECONDS = "inferoxy_request_duration_seconds"
QUEUE_SECONDS = "inferoxy_queue_wait_seconds"
BATCH_SIZE = "inferoxy_batch_size"
BATCH_COMPUTE_SECONDS = "inferoxy_batch_compute_seconds"
LAST_INFERENCE = "inferoxy_last_inference_timestamp_seconds"
_FAMILIES = frozenset({REQUESTS, REQUEST_SECONDS, QUEUE_SECONDS, BATCH_SIZE, BATCH_COMPUTE_SECONDS, LAST_INFERENCE})


@dataclass
class Totals:
    """What the metrics say of one model version, summed over bridges and processes."""

    success: float = 0.0
    fail: float = 0.0
    success_s: float = 0.0
    fail_s: float = 0.0
    queue: float = 0.0
    queue_s: float = 0.0
    computed: float = 0.0
    compute_s: float = 0.0
    batches: float = 0.0
    batched_requests: float = 0.0
    # Cumulative batch counts by bucket bound (``le``), as Prometheus keeps them.
    batch_buckets: dict[float, float] = field(default_factory=dict)
    last_inference_s: float = 0.0


def totals(registry: CollectorRegistry | None = None) -> dict[tuple[str, str], Totals]:
    """Every model version's totals in ``registry`` (default: the proxy's merged metrics)."""
    found: dict[tuple[str, str], Totals] = defaultdict(Totals)
    for family in (registry if registry is not None else metrics.registry()).collect():
        if family.name not in _FAMILIES:
            continue
        for sample in family.samples:
            labels = sample.labels
            key = (labels.get("model", ""), labels.get("version", ""))
            _add(found[key], family.name, sample.name[len(family.name):], labels, sample.value)
    return dict(found)


def _add(into: Totals, family: str, suffix: str, labels: dict[str, str], value: float) -> None:
    if family == REQUESTS and suffix == "_total":
        if labels.get("code") == metrics.OK:
            into.success += value
        else:
            into.fail += value
    elif family == REQUEST_SECONDS and suffix == "_sum":
        if labels.get("outcome") == metrics.OK:
            into.success_s += value
        else:
            into.fail_s += value
    elif family == QUEUE_SECONDS:
        if suffix == "_count":
            into.queue += value
        elif suffix == "_sum":
            into.queue_s += value
    elif family == BATCH_COMPUTE_SECONDS:
        if suffix == "_count":
            into.computed += value
        elif suffix == "_sum":
            into.compute_s += value
    elif family == BATCH_SIZE:
        if suffix == "_count":
            into.batches += value
        elif suffix == "_sum":
            into.batched_requests += value
        elif suffix == "_bucket":
            bound = float(labels["le"])
            into.batch_buckets[bound] = into.batch_buckets.get(bound, 0.0) + value
    elif family == LAST_INFERENCE and suffix == "":
        into.last_inference_s = max(into.last_inference_s, value)


def _duration(count: float, seconds: float = 0.0) -> dict[str, int]:
    return {"count": int(round(count)), "ns": int(round(seconds * 1e9))}


def _batch_stats(buckets: dict[float, float]) -> list[dict[str, Any]]:
    stats = []
    below = 0.0
    for bound in sorted(buckets):
        batches = buckets[bound] - below
        below = buckets[bound]
        if batches <= 0 or math.isinf(bound):
            continue  # +Inf holds only what passed the largest bound, which the bounds cover (1024 rows)
        executed = _duration(batches)
        stats.append({"batch_size": int(bound), "compute_input": executed, "compute_infer": executed,
                      "compute_output": executed})
    return stats


def model_stats(spec: ModelSpec, found: Totals | None) -> dict[str, Any]:
    """One model version's ``$model_stat`` (the statistics extension's JSON object)."""
    t = found or Totals()
    return {
        "name": spec.name,
        "version": spec.version,
        "last_inference": int(t.last_inference_s * 1000),
        "inference_count": int(round(t.batched_requests)),
        "execution_count": int(round(t.batches)),
        "inference_stats": {
            "success": _duration(t.success, t.success_s),
            "fail": _duration(t.fail, t.fail_s),
            "queue": _duration(t.queue, t.queue_s),
            "compute_input": _duration(0),
            "compute_infer": _duration(t.computed, t.compute_s),
            "compute_output": _duration(0),
            "cache_hit": _duration(0),
            "cache_miss": _duration(0),
        },
        "batch_stats": _batch_stats(t.batch_buckets),
        "memory_usage": [],
    }


def statistics(specs: Iterable[ModelSpec], registry: CollectorRegistry | None = None) -> dict[str, Any]:
    """``{"model_stats": [...]}`` for ``specs``, in name and version order."""
    found = totals(registry)
    ordered = sorted(specs, key=lambda s: (s.name, _version_key(s.version)))
    return {"model_stats": [model_stats(spec, found.get((spec.name, spec.version))) for spec in ordered]}


def _version_key(version: str) -> tuple[int, int, str]:
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


def requested(gateway: Any, credential: object, name: str | None, version: str | None) -> list[ModelSpec]:
    """The model versions a statistics call asks for, once its caller may see them: every model (the observer
    rule, ``Authorizer.check_observer``), every version of one model, or one version (the metadata rule)."""
    if not name:
        gateway.auth.check_observer(credential)
        if gateway.registry is None:
            raise RequestError(ErrorCode.NOT_READY, "the model registry has not been read yet; retry shortly")
        return list(gateway.registry)
    gateway.auth.check_metadata(credential, name)
    spec = gateway.resolve(name, version).spec  # unknown_model for a name or version not registered
    if version:
        return [spec]
    return [other for other in gateway.registry if other.name == name]
