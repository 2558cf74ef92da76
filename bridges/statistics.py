"""Triton's statistics extension, read from the proxy's Prometheus metrics (docs/METRICS.md, "Statistics").

The metrics are the one source: inferoxy/metric_samples.py reads what ``GET /metrics`` shows (every
component's samples merged under ``inferoxy serve``), so statistics and a scrape never disagree. Each Triton
field is a sum over those samples for one model version:

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
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry

from bridges.errors import RequestError
from inferoxy import metric_samples
from inferoxy.metric_samples import ModelSamples
from inferoxy.protocol import ErrorCode
from model_manager.spec import ModelSpec, version_order


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


def model_stats(spec: ModelSpec, found: ModelSamples | None) -> dict[str, Any]:
    """One model version's ``$model_stat`` (the statistics extension's JSON object)."""
    m = found or ModelSamples()
    return {
        "name": spec.name,
        "version": spec.version,
        "last_inference": int(m.last_inference_s * 1000),
        "inference_count": int(round(m.batch_size.total)),
        "execution_count": int(round(m.batch_size.count)),
        "inference_stats": {
            "success": _duration(m.ok, m.duration_ok.total),
            "fail": _duration(m.errors, m.duration_error.total),
            "queue": _duration(m.queue_wait.count, m.queue_wait.total),
            "compute_input": _duration(0),
            "compute_infer": _duration(m.batch_compute.count, m.batch_compute.total),
            "compute_output": _duration(0),
            "cache_hit": _duration(0),
            "cache_miss": _duration(0),
        },
        "batch_stats": _batch_stats(m.batch_size.buckets),
        "memory_usage": [],
    }


def statistics(specs: Iterable[ModelSpec], registry: CollectorRegistry | None = None) -> dict[str, Any]:
    """``{"model_stats": [...]}`` for ``specs``, in name and version order."""
    found = metric_samples.read(registry).models
    ordered = sorted(specs, key=lambda s: (s.name, version_order(s.version)))
    return {"model_stats": [model_stats(spec, found.get((spec.name, spec.version))) for spec in ordered]}


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
