"""The one reader of the merged metrics (inferoxy/metric_samples.py) that statistics and the dashboard share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from inferoxy import metric_samples, metrics
from inferoxy.metric_samples import ModelSamples


def test_every_family_it_reads_is_the_catalogues() -> None:
    catalogue = {metric._name: metric for metric in metrics.ALL}
    for name in metric_samples.FAMILIES:
        assert name in catalogue, name
    assert set(metric_samples.FAMILIES) == {
        metrics.REQUESTS._name, metrics.REQUEST_SECONDS._name, metrics.QUEUE_SECONDS._name, metrics.BATCH_SIZE._name,
        metrics.BATCH_COMPUTE_SECONDS._name, metrics.QUEUE_DEPTH._name, metrics.BATCHES_IN_FLIGHT._name,
        metrics.SESSIONS_OPEN._name, metrics.LAST_INFERENCE._name, metrics.COMPONENT_UP._name}


def private_copies() -> tuple[CollectorRegistry, dict[str, Any]]:
    """Every catalogue metric, copied (name, labels, buckets) into a private registry a test records into."""
    registry = CollectorRegistry()
    copies = {}
    catalogue: tuple[Any, ...] = metrics.ALL
    for metric in catalogue:
        kind = type(metric)
        args: dict[str, Any] = {"registry": registry}
        if kind is Histogram:
            args["buckets"] = metric._upper_bounds
        copies[metric._name] = kind(metric._name, metric._documentation, metric._labelnames, **args)
    return registry, copies


def test_one_pass_gives_every_field_of_each_model_version() -> None:
    registry, m = private_copies()
    requests, duration = m[metric_samples.REQUESTS], m[metric_samples.REQUEST_SECONDS]
    requests.labels("rest", "a", "1", "ok").inc(3)
    requests.labels("grpc", "a", "1", "ok").inc(2)
    requests.labels("zmq", "a", "1", "overloaded").inc(4)
    requests.labels("rest", "a", "1", "deadline").inc()
    for bridge, seconds in (("rest", 0.003), ("grpc", 0.003), ("rest", 0.3)):
        duration.labels(bridge, "a", "1", "ok").observe(seconds)
    duration.labels("zmq", "a", "1", "error").observe(0.0001)
    for wait_s in (0.001, 0.003):
        m[metric_samples.QUEUE_SECONDS].labels("a", "1").observe(wait_s)
    for size in (1, 3, 600):
        m[metric_samples.BATCH_SIZE].labels("a", "1").observe(size)
    m[metric_samples.BATCH_COMPUTE_SECONDS].labels("a", "1").observe(0.02)
    m[metric_samples.QUEUE_DEPTH].labels("a", "1").set(7)
    m[metric_samples.BATCHES_IN_FLIGHT].labels("a", "1").set(2)
    m[metric_samples.SESSIONS_OPEN].labels("a", "1").set(5)
    m[metric_samples.LAST_INFERENCE].labels("a", "1").set(1_700_000_000.25)
    requests.labels("rest", "a", "2", "ok").inc(9)  # another version: counted apart
    m[metric_samples.COMPONENT_UP].labels("batch_manager").set(1)
    m[metric_samples.COMPONENT_UP].labels("task_manager").set(0)
    m["inferoxy_replica_starts"].labels("a", "1").inc()  # a family neither document reads

    read = metric_samples.read(registry)
    assert set(read.models) == {("a", "1"), ("a", "2")}
    a = read.models[("a", "1")]
    assert a.requests == {("rest", "ok"): 3, ("grpc", "ok"): 2, ("zmq", "overloaded"): 4, ("rest", "deadline"): 1}
    assert (a.answered, a.ok, a.errors) == (10, 5, 5)
    assert a.by_bridge() == {"rest": 4, "grpc": 2, "zmq": 4}
    # The duration by outcome, every bridge's buckets added up.
    assert (a.duration_ok.count, a.duration_ok.total) == (3, pytest.approx(0.306))
    assert a.duration_ok.buckets[0.005] == 2 and a.duration_ok.buckets[0.5] == 3
    assert a.duration_ok.buckets[float("inf")] == 3 and len(a.duration_ok.buckets) == 19
    assert (a.duration_error.count, a.duration_error.total) == (1, pytest.approx(0.0001))
    assert (a.queue_wait.count, a.queue_wait.total) == (2, pytest.approx(0.004))
    assert a.queue_wait.buckets[0.001] == 1 and a.queue_wait.buckets[0.0025] == 1
    assert (a.batch_size.count, a.batch_size.total) == (3, 604)
    assert [a.batch_size.buckets[b] for b in (1.0, 2.0, 4.0, 512.0, 1024.0)] == [1, 1, 2, 2, 3]
    assert (a.batch_compute.count, a.batch_compute.total) == (1, pytest.approx(0.02))
    assert a.batch_compute.buckets[0.01] == 0 and a.batch_compute.buckets[0.025] == 1
    assert (a.queue_depth, a.batches_in_flight, a.sessions_open) == (7, 2, 5)
    assert a.last_inference_s == 1_700_000_000.25
    assert read.models[("a", "2")].requests == {("rest", "ok"): 9}
    assert read.components == {"batch_manager": 1, "task_manager": 0}


class Merged(Collector):
    """Samples as several processes' files merge: one label set per process for a gauge kept per process."""

    def __init__(self, *families: Metric) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def test_processes_add_up_and_the_last_inference_is_the_latest() -> None:
    depth = GaugeMetricFamily(metric_samples.QUEUE_DEPTH, "", labels=["model", "version", "pid"])
    depth.add_metric(["a", "1", "11"], 3)
    depth.add_metric(["a", "1", "12"], 4)
    last = GaugeMetricFamily(metric_samples.LAST_INFERENCE, "", labels=["model", "version", "pid"])
    last.add_metric(["a", "1", "11"], 200.0)
    last.add_metric(["a", "1", "12"], 100.0)
    registry = CollectorRegistry()
    registry.register(Merged(depth, last))
    a = metric_samples.read(registry).models[("a", "1")]
    assert a.queue_depth == 7 and a.last_inference_s == 200.0


def test_created_samples_are_not_counted() -> None:
    """A registry of one process adds ``_created`` timestamps to counters and histograms: not counts."""
    requests = Metric(metric_samples.REQUESTS, "", "counter")
    requests.samples = [Sample("inferoxy_requests_total", {"bridge": "rest", "model": "a", "version": "1",
                                                           "code": "ok"}, 2.0),
                        Sample("inferoxy_requests_created", {"bridge": "rest", "model": "a", "version": "1",
                                                             "code": "ok"}, 1.7e9)]
    registry = CollectorRegistry()
    registry.register(Merged(requests))
    assert metric_samples.read(registry).models[("a", "1")].answered == 2


def test_minus_is_what_was_observed_since_the_base() -> None:
    base = metric_samples.Histogram({1.0: 2, float("inf"): 3}, 3, 1.5)
    now = metric_samples.Histogram({1.0: 5, float("inf"): 7}, 7, 4.0)
    assert now.minus(base) == metric_samples.Histogram({1.0: 3, float("inf"): 4}, 4, 2.5)
    assert now.minus(None) is now
    assert base.minus(now) is base  # the counts went back (a restart): all of it


def test_an_empty_version_reads_as_zeros() -> None:
    empty = ModelSamples()
    assert (empty.answered, empty.ok, empty.errors, empty.by_bridge()) == (0, 0, 0, {})
    assert empty.duration_ok.quantile(0.5) is None and empty.last_inference_s == 0.0
