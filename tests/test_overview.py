"""The dashboard's JSON (bridges/overview.py): what it reads of the metrics, its window, its rates and percentiles."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bridges import overview
from bridges.overview import Overview, Sample, Window
from inferoxy import metric_samples, metrics
from inferoxy.metric_samples import ModelSamples
from model_manager.spec import ModelSpec, ModelStatus, ReplicaStatus
from model_manager.store import Registry


class Recorder:
    """The catalogue's metrics the overview reads, copied into a private registry a test records into."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def copy(metric: Any) -> Any:
            kind = type(metric)
            args: dict[str, Any] = {"registry": self.registry}
            if kind is Histogram:
                args["buckets"] = metric._upper_bounds
            return kind(metric._name, metric._documentation, metric._labelnames, **args)

        self.requests = copy(next(m for m in metrics.ALL if m._name == metric_samples.REQUESTS))
        self.latency = copy(next(m for m in metrics.ALL if m._name == metric_samples.REQUEST_SECONDS))
        self.batch = copy(next(m for m in metrics.ALL if m._name == metric_samples.BATCH_SIZE))
        self.queue = copy(next(m for m in metrics.ALL if m._name == metric_samples.QUEUE_DEPTH))
        self.up = copy(next(m for m in metrics.ALL if m._name == metric_samples.COMPONENT_UP))
        assert isinstance(self.requests, Counter) and isinstance(self.queue, Gauge)

    def answered(self, n: int, *, model: str = "m", bridge: str = "rest", code: str = "ok",
                 seconds: float = 0.003) -> None:
        for _ in range(n):
            self.requests.labels(bridge, model, "1", code).inc()
            self.latency.labels(bridge, model, "1", "ok" if code == "ok" else "error").observe(seconds)


def test_the_samples_read_sum_bridges_and_count_errors_apart() -> None:
    r = Recorder()
    r.answered(3, bridge="rest")
    r.answered(2, bridge="grpc")
    r.answered(4, bridge="zmq", code="overloaded", seconds=0.0001)
    r.batch.labels("m", "1").observe(4)
    r.queue.labels("m", "1").set(7)
    r.up.labels("batch_manager").set(1)
    r.up.labels("task_manager").set(0)

    read = metric_samples.read(r.registry)
    m = read.models[("m", "1")]
    assert (m.answered, m.errors) == (9, 4)
    assert m.by_bridge() == {"rest": 3, "grpc": 2, "zmq": 4}
    assert m.duration_ok.count == 5  # only the answers that were ok
    assert m.batch_size.count == 1 and m.batch_size.total == 4
    assert m.queue_depth == 7
    assert read.components == {"batch_manager": 1, "task_manager": 0}


def hist(**counts: float) -> metric_samples.Histogram:
    buckets = {float(k.removeprefix("le_").replace("_", ".")) if k != "inf" else float("inf"): v
               for k, v in counts.items()}
    return metric_samples.Histogram(buckets, max(buckets.values()), 0.0)


def test_quantile_interpolates_within_the_bucket_as_prometheus_does() -> None:
    # 10 observations in (0, 1], 10 more in (1, 2]: the median is the top of the first bucket.
    h = hist(le_1=10, le_2=20, inf=20)
    assert h.quantile(0.5) == pytest.approx(1.0)
    assert h.quantile(0.75) == pytest.approx(1.5)
    assert h.quantile(0.25) == pytest.approx(0.5)  # the first bucket starts at 0
    # A rank in the +Inf bucket: the highest finite bound, as histogram_quantile says.
    assert hist(le_1=1, le_2=1, inf=100).quantile(0.99) == pytest.approx(2.0)
    assert hist(le_1=0, inf=0).quantile(0.5) is None
    assert metric_samples.Histogram().quantile(0.5) is None


def test_the_window_is_bounded_and_keeps_one_sample_before_its_start() -> None:
    window = Window(window_s=10.0, max_samples=64)
    first = Sample(0.0, {}, {})
    assert window.add(first) is None
    bases = [window.add(Sample(t, {}, {})) for t in (1.0, 2.0, 5.0, 11.0, 12.5)]
    assert [b.at if b else None for b in bases] == [0.0, 0.0, 0.0, 1.0, 2.0]
    for t in range(13, 10_000):
        window.add(Sample(float(t), {}, {}))
    assert len(window.samples) <= 12  # the window's worth at one sample a second, and one before
    assert window.samples[0].at <= 9_999 - 10.0 < window.samples[1].at
    # A long silence: the base is the last sample before it, and the span says how long that was.
    assert window.add(Sample(20_000.0, {}, {})).at == 9_999.0  # type: ignore[union-attr]


def registry_of(*specs: ModelSpec) -> Registry:
    defaults = {}
    for spec in specs:
        defaults.setdefault(spec.name, spec.version)
    return Registry({spec.key: spec for spec in specs}, defaults, revision=5)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_overview(r: Recorder, statuses: dict[str, ModelStatus] | None = None, *, fail: bool = False) -> tuple[
        Overview, Clock]:
    clock = Clock()
    specs = registry_of(ModelSpec(name="m", model_class="x:Y"), ModelSpec(name="m", version="2", model_class="x:Y"),
                        ModelSpec(name="idle", model_class="x:Y", min_replicas=0, max_replicas=0))

    async def read_statuses() -> dict[str, ModelStatus]:
        if fail:
            raise ConnectionError("Redis is away")
        return statuses or {}

    view = Overview(lambda: specs, read_statuses, collect=lambda: r.registry, window_s=10.0, min_interval_s=0.5,
                    clock=clock, wall_clock=lambda: clock.now + 1_000_000)
    return view, clock


def state(view: Overview) -> dict[str, Any]:
    return dict(orjson.loads(asyncio.run(view.state())))


def by_key(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{row['name']}/{row['version']}": row for row in document["models"]}


def test_rates_and_percentiles_cover_the_window_between_two_samples() -> None:
    r = Recorder()
    r.answered(50, seconds=0.003)  # before the first sample: counted in the totals, not in the rate
    view, clock = make_overview(r)
    first = state(view)
    row = by_key(first)["m/1"]
    assert first["window_s"] is None and row["request_rate"] is None and row["requests"] == 50

    clock.now += 2.0
    r.answered(20, seconds=0.003)
    r.answered(20, seconds=0.3)
    r.answered(10, code="bad_input")
    r.batch.labels("m", "1").observe(2)
    r.batch.labels("m", "1").observe(6)
    second = state(view)
    row = by_key(second)["m/1"]
    assert second["window_s"] == 2.0
    assert row["requests"] == 100 and row["errors"] == 10
    assert row["request_rate"] == 25.0 and row["error_rate"] == 5.0
    # Half the ok answers took 3 ms (the 2.5-5 ms bucket), half 300 ms (250-500 ms): p50 in the first, p99 in the last.
    assert 0.0025 <= row["latency_p50_s"] <= 0.005
    assert 0.25 <= row["latency_p99_s"] <= 0.5
    assert row["batch_size_mean"] == 4.0
    assert second["totals"] == {"requests": 100, "errors": 10, "request_rate": 25.0, "error_rate": 5.0}

    clock.now += 2.0
    quiet = by_key(state(view))["m/1"]
    assert quiet["request_rate"] == pytest.approx(50 / 4.0)  # the window still holds the burst
    assert quiet["latency_p50_s"] is not None


def test_a_poll_within_the_minimum_interval_gets_the_same_document() -> None:
    r = Recorder()
    view, clock = make_overview(r)
    first = asyncio.run(view.state())
    r.answered(5)
    clock.now += 0.2
    assert asyncio.run(view.state()) == first  # cached: no new sample
    clock.now += 0.4
    assert by_key(orjson.loads(asyncio.run(view.state())))["m/1"]["requests"] == 5


def test_every_registered_version_appears_with_its_serving_state_and_replicas() -> None:
    r = Recorder()
    r.queue.labels("m", "1").set(3)
    wall = 100.0 + 1_000_000
    status = ModelStatus(name="m", version="1", state="degraded", ready_replicas=1, desired_replicas=2,
                         reason="replica x is being replaced", updated_at=wall, restarts=2, replicas=[
                             ReplicaStatus(id="a", state="ready", gpu="0", pid=11, started_at=wall - 60,
                                           ready_at=wall - 30),
                             ReplicaStatus(id="b", state="starting", started_at=wall - 5)])
    view, _ = make_overview(r, {"m/1": status})
    document = state(view)
    rows = by_key(document)
    assert list(rows) == ["idle/1", "m/1", "m/2"]
    m1 = rows["m/1"]
    assert (m1["state"], m1["ready_replicas"], m1["desired_replicas"], m1["restarts"]) == ("degraded", 1, 2, 2)
    assert m1["default"] is True and rows["m/2"]["default"] is False
    assert rows["idle/1"]["loaded"] is False and m1["loaded"] is True
    assert m1["queue_depth"] == 3
    assert m1["replicas"] == [
        {"id": "a", "state": "ready", "gpu": "0", "pid": 11, "uptime_s": 60.0, "ready_for_s": 30.0},
        {"id": "b", "state": "starting", "gpu": None, "pid": None, "uptime_s": 5.0, "ready_for_s": None}]
    # No status (the task manager never reported it, or its record expired): unknown, and why.
    assert rows["m/2"]["state"] == "unknown" and "recently" in rows["m/2"]["reason"]
    assert document["registry_revision"] == 5 and document["problems"] == []


def test_redis_away_still_answers_with_the_metrics_and_says_why() -> None:
    r = Recorder()
    r.answered(3)
    view, _ = make_overview(r, fail=True)
    document = state(view)
    assert by_key(document)["m/1"]["requests"] == 3
    assert by_key(document)["m/1"]["state"] == "unknown"
    assert "Redis is away" in document["problems"][0]


def test_counters_that_went_back_count_from_zero() -> None:
    """A new samples directory (or a process's files gone) makes a counter smaller: take it as a reset."""
    now = ModelSamples(requests={("rest", "ok"): 4})
    base = ModelSamples(requests={("rest", "ok"): 10})
    assert overview._recent(now, base, 2.0)["request_rate"] == 2.0


def test_a_slow_sample_spaces_the_next_ones_out() -> None:
    """Reading every process's samples grows with models x processes (bench/bench_dashboard.py: 0.1 s at 50 models
    and 6 processes, seconds at 500): however many pages poll, sampling takes at most 1/COST_FACTOR of the time."""
    r = Recorder()
    clock = Clock()

    def slow_collect() -> CollectorRegistry:
        clock.now += 1.0  # this read takes a second
        return r.registry

    async def no_statuses() -> dict[str, ModelStatus]:
        return {}

    view = Overview(lambda: None, no_statuses, collect=slow_collect, min_interval_s=0.5, clock=clock)
    first = asyncio.run(view.state())
    r.answered(1)
    clock.now += overview.COST_FACTOR * 1.0 - 1.5  # sooner than COST_FACTOR times the read's cost after it
    assert asyncio.run(view.state()) == first
    clock.now += 1.0
    assert orjson.loads(asyncio.run(view.state()))["totals"]["requests"] == 1


def test_a_redis_that_does_not_answer_delays_the_document_only_briefly() -> None:
    """Redis's own read timeout is 10 s; every poller waits on one sample, so the overview gives up sooner."""
    r = Recorder()
    r.answered(2)

    async def hanging() -> dict[str, ModelStatus]:
        await asyncio.Event().wait()
        return {}

    view = Overview(lambda: None, hanging, collect=lambda: r.registry, status_timeout_s=0.05)
    document = orjson.loads(asyncio.run(asyncio.wait_for(view.state(), 5.0)))
    assert document["totals"]["requests"] == 2
    assert "did not answer within 0.05 s" in document["problems"][0]
