"""Metrics recorded inside the proxy: the batch manager, the replica's compute time, the task manager, the registry.

Each test drives a component as its own tests do (tests/test_batch_manager_service.py,
tests/test_task_manager.py) and reads the values back through ``metrics.registry()``. Metrics are
process-wide and other tests may record the same ones, so every test uses model names of its own and
compares counters with what they were before it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from batch_manager.params import RequestParams, SessionParams
from batch_manager.scheduler import Dispatch, Request, Scheduler
from inferoxy import batches, metrics, wire
from inferoxy.model import Model
from model_manager.spec import ModelSpec
from model_manager.store import Registry, SpecStore
from tests import test_batch_manager_service as bm
from tests import test_task_manager as tm
from tests.support import ProxyProcess, free_port, tcp_fakeredis, wait_for
from tests.test_registry_live import redis_server

_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}x{next(_names)}"


def value(name: str, **labels: str) -> float:
    """A sample's value, 0 when it was never recorded."""
    found = metrics.registry().get_sample_value(name, labels)
    return 0.0 if found is None else found


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A fakeredis over TCP of this module's own (tests.support.tcp_fakeredis)."""
    with tcp_fakeredis() as url:
        yield url


# --- batch manager ---------------------------------------------------------------------------------------------


def test_batch_manager_records_queue_batches_waits_and_compute(redis_url: str) -> None:
    name = unique("bmm")
    model = {"model": name, "version": "1"}

    async def body() -> None:
        spec = ModelSpec(name=name, model_class="examples.models.echo:Echo", max_batch_size=4, max_batch_delay_ms=20)
        async with bm.running_batch_manager(redis_url, spec=spec) as running:
            service, task_manager, bridge = running.service, running.task_manager, running.bridge()
            for i in range(6):
                await bridge.infer(i, np.full((1, 3), i, dtype=np.float32), model=name)
            # No replica yet: all six wait, and the gauge says so once the batch manager drained the burst.
            await bm.poll(lambda: value("inferoxy_queue_depth", **model) == 6, "queue depth 6")
            assert service.scheduler.queued(f"{name}/1") == 6

            task_manager.hold = True
            await task_manager.replica_up(capacity=2, model=name)
            await bm.poll(lambda: len(task_manager.held) == 2, "two batches at the replica")
            # Written together, at most metrics.FLUSH_S after the drain that sent the batches.
            await bm.poll(lambda: value("inferoxy_batch_size_count", **model) == 2, "the batches' sizes written")
            assert value("inferoxy_queue_depth", **model) == 0
            assert value("inferoxy_batches_in_flight", **model) == 2
            assert value("inferoxy_batch_size_count", **model) == 2
            assert value("inferoxy_batch_size_sum", **model) == 6  # 4 + 2 requests
            assert value("inferoxy_queue_wait_seconds_count", **model) == 6
            assert value("inferoxy_queue_wait_seconds_sum", **model) > 0

            # One answer reports its compute time, the other comes from a replica built before the field existed.
            (first, *first_frames), (second, *second_frames) = task_manager.held
            task_manager.held.clear()
            await send_result(task_manager, first, first_frames, compute_ns=2_500_000)
            await send_result(task_manager, second, second_frames)
            replies = await bridge.receive_all(6)
            assert all(header["t"] == "reply" for header, _ in replies.values())
            await bm.poll(lambda: value("inferoxy_batches_in_flight", **model) == 0, "no batch in flight")
            assert value("inferoxy_batch_compute_seconds_count", **model) == 1
            assert value("inferoxy_batch_compute_seconds_sum", **model) == pytest.approx(0.0025)
            assert value("inferoxy_batch_compute_seconds_bucket", **model, le="0.0025") == 1
            assert value("inferoxy_batch_compute_seconds_bucket", **model, le="0.001") == 0
            bridge.sock.close()

    bm.run(body())


async def send_result(task_manager: bm.FakeTaskManager, header: dict[str, Any], frames: list[Any],
                      compute_ns: int | None = None) -> None:
    result = {"t": "result", "replica": header["replica"], "batch": header["batch"],
              "items": [{"n": item["n"]} for item in header["items"]], "tensors": header["tensors"]}
    if compute_ns is not None:
        result["compute_ns"] = compute_ns
    await task_manager.send(result, frames, route=(header["replica"], header["batch"]))


def test_queue_depth_returns_to_zero_when_requests_time_out_and_in_flight_when_the_replica_dies(
        redis_url: str) -> None:
    name = unique("bmd")
    model = {"model": name, "version": "1"}

    async def body() -> None:
        spec = ModelSpec(name=name, model_class="examples.models.echo:Echo", max_batch_size=4, max_batch_delay_ms=1)
        async with bm.running_batch_manager(redis_url, spec=spec) as running:
            task_manager, bridge = running.task_manager, running.bridge()
            await bridge.infer(1, np.zeros((1, 3), dtype=np.float32), model=name, timeout_ms=1500)  # past a flush
            await bm.poll(lambda: value("inferoxy_queue_depth", **model) == 1, "queue depth 1")
            reply, _ = await bridge.receive()
            assert reply["code"] == "deadline"
            await bm.poll(lambda: value("inferoxy_queue_depth", **model) == 0, "queue depth back at 0")

            task_manager.hold = True
            await task_manager.replica_up("r-dies", capacity=1, model=name)
            await bridge.infer(2, np.zeros((1, 3), dtype=np.float32), model=name)
            await bm.poll(lambda: value("inferoxy_batches_in_flight", **model) == 1, "one batch in flight")
            await task_manager.send({"t": "replica_down", "replica": "r-dies", "reason": "killed"})
            reply, _ = await bridge.receive()
            assert reply["code"] == "replica_lost"
            await bm.poll(lambda: value("inferoxy_batches_in_flight", **model) == 0, "in flight back at 0")
            bridge.sock.close()

    bm.run(body())


def test_the_scheduler_reports_pinned_sessions_and_each_request_s_wait() -> None:
    spec = ModelSpec(name="sess", model_class="x:Y", stateful=True, max_batch_size=4, max_batch_delay_ms=0)
    scheduler = Scheduler(Registry({spec.key: spec}, {"sess": "1"}, 1))
    scheduler.replica_up("r1", "sess", "1", 2, 0.0)
    assert dict(scheduler.take_changed()).get("sess/1", (0, 0, 0)) == (0, 0, 0)

    metas = [{"name": "x", "dtype": "float32", "shape": [1, 3]}]

    def request(seq: int, start: bool, end: bool) -> Request:
        return Request((b"b", seq), "sess", None, metas, [b"\0" * 12], 100.0,
                       RequestParams(session=SessionParams(7, start, end)))

    actions = scheduler.submit(request(1, True, False), 1.0)
    (dispatch,) = [a for a in actions if isinstance(a, Dispatch)]
    assert dispatch.waits == [0.0]
    assert dict(scheduler.take_changed())["sess/1"] == (0, 1, 1)  # nothing queued, one batch out, one session
    assert scheduler.take_changed() == []  # asked again with nothing changed: nothing to set
    scheduler.on_result("r1", dispatch.batch_id, [1], metas, [b"\0" * 12], 1.5)
    assert dict(scheduler.take_changed())["sess/1"] == (0, 0, 1)
    actions = scheduler.submit(request(2, False, True), 2.0)
    (dispatch,) = [a for a in actions if isinstance(a, Dispatch)]
    scheduler.on_result("r1", dispatch.batch_id, [1], metas, [b"\0" * 12], 2.5)
    assert dict(scheduler.take_changed())["sess/1"] == (0, 0, 0)  # sequence_end: the slot is free


def test_buffered_observations_flush_to_what_observing_each_gives() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    direct = Histogram("one", "h", ["m"], buckets=metrics.LATENCY_BUCKETS_S, registry=registry).labels("a")
    pending: list[metrics.BufferedHistogram] = []
    every = Histogram("all", "h", ["m"], buckets=metrics.LATENCY_BUCKETS_S, registry=registry)
    buffered = metrics.BufferedHistogram(every.labels("a"), pending)

    def samples(name: str) -> dict[tuple[str, str], float]:
        return {(s.name.removeprefix(name), s.labels.get("le", "")): s.value
                for family in registry.collect() if family.name == name for s in family.samples
                if not s.name.endswith("_created")}

    # Below, on and between bounds, past the last bound, repeated, zero.
    amounts = [0.0, 0.0001, 0.00011, 0.0003, 0.0003, 0.001, 0.004, 61.0, 1e9, 0.0001]
    for amount in amounts:
        direct.observe(amount)
        buffered.observe(amount)
    assert pending == [buffered]  # listed once, however many observations wait
    assert samples("all")[("_count", "")] == 0  # nothing written before the flush
    buffered.flush()
    assert samples("one") == samples("all")
    buffered.observe(0.002)
    direct.observe(0.002)
    buffered.flush()
    assert samples("one") == samples("all") and samples("one")[("_count", "")] == len(amounts) + 1


# --- replica ---------------------------------------------------------------------------------------------------


class Doubler(Model):
    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": batch["x"] * 2}


class Failing(Model):
    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise ValueError("no")


class FakeClock:
    """``time`` as inferoxy.batches sees it: each perf_counter_ns call moves 250 µs on."""

    def __init__(self) -> None:
        self.now = 1_000

    def perf_counter_ns(self) -> int:
        self.now += 250_000
        return self.now


def answer(model: Model, header: dict[str, Any], tensors: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
    frames = batches.answer_batch(model, "r1", {"t": "batch", "batch": 1, **header}, tensors)
    decoded, _ = wire.decode([zmq.Frame(bytes(f)) if not isinstance(f, zmq.Frame) else f for f in frames])
    return decoded


def test_a_replica_reports_how_long_predict_took(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batches, "time", FakeClock())
    x = np.ones((2, 1), np.float32)
    result = answer(Doubler(), {"items": [{"id": 1, "n": 1}]}, [("x", x)])
    assert result["t"] == "result" and result["compute_ns"] == 250_000  # one clock step around predict alone

    failed = answer(Failing(), {"items": [{"id": 1, "n": 1}]}, [("x", x)])
    assert failed["t"] == "failed" and "compute_ns" not in failed


def test_a_stateful_replica_reports_compute_only_when_predict_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    from examples.models.counter.model import CounterModel

    monkeypatch.setattr(batches, "time", FakeClock())
    model = CounterModel()
    store = batches.SessionStore(model)
    x = np.ones((1, 2), np.float32)
    frames = batches.answer_batch(model, "r1", {"t": "batch", "batch": 1, "items": [
        {"id": 1, "n": 1, "session": "a", "start": True, "end": False}]}, [("x", x)], store)
    header, _ = wire.decode([zmq.Frame(bytes(f)) for f in frames])
    assert header["compute_ns"] == 250_000
    frames = batches.answer_batch(model, "r1", {"t": "batch", "batch": 2, "items": [], "end_sessions": ["a"]}, [],
                                  store)
    header, _ = wire.decode([zmq.Frame(bytes(f)) for f in frames])
    assert header["t"] == "result" and "compute_ns" not in header


# --- task manager ----------------------------------------------------------------------------------------------


def replicas_by_state(model: str) -> dict[str, float]:
    return {state: value("inferoxy_replicas", model=model, version="1", state=state)
            for state in metrics.REPLICA_STATES}


def test_task_manager_counts_replicas_starts_deaths_and_restarts(redis_url: str) -> None:
    name = unique("tmm")
    model = {"model": name, "version": "1"}

    async def scenario(h: tm.Harness) -> None:
        await h.store.put(tm.spec(name, tm.ECHO))
        up, _ = await h.expect("replica_up")
        assert replicas_by_state(name) == {"starting": 0, "ready": 1, "draining": 0, "failed": 0}
        assert value("inferoxy_replica_starts_total", **model) == 1
        assert value("inferoxy_replica_ready_seconds_count", **model) == 1
        assert value("inferoxy_replica_deaths_total", **model) == 0

        os.kill(h.pid_of(f"{name}/1", up["replica"]), signal.SIGKILL)
        await h.expect("replica_down", replica=up["replica"])
        again, _ = await h.expect("replica_up")
        assert again["replica"] != up["replica"]
        assert value("inferoxy_replica_deaths_total", **model) == 1
        assert value("inferoxy_replica_restarts_total", **model) == 1
        assert value("inferoxy_replica_starts_total", **model) == 2
        assert value("inferoxy_replica_ready_seconds_count", **model) == 2
        assert replicas_by_state(name) == {"starting": 0, "ready": 1, "draining": 0, "failed": 0}

        await h.delete(name)  # a planned stop: drained, not dead
        await h.expect("replica_down", replica=again["replica"])
        await tm.eventually(lambda: not any(replicas_by_state(name).values()), what="the replicas gauge back at 0")
        assert value("inferoxy_replica_deaths_total", **model) == 1

    tm.run(redis_url, scenario)


def test_a_replica_is_counted_under_one_state_at_a_time() -> None:
    from task_manager import replica_metrics
    from task_manager.replicas import ModelGroup, Replica, ReplicaState

    name = unique("tmu")
    spec = ModelSpec(name=name, model_class="x:Y", min_replicas=1)
    group = ModelGroup(spec)
    lost = Replica("a", spec, group, started_at=10.0)
    drained = Replica("b", spec, group, started_at=10.0)
    for replica in (lost, drained):
        replica_metrics.started(replica, group)
        replica_metrics.moved(replica)  # again: no change, no double count
    assert replicas_by_state(name) == {"starting": 2, "ready": 0, "draining": 0, "failed": 0}
    for replica in (lost, drained):
        replica.state, replica.ready_at = ReplicaState.READY, 12.5
        replica_metrics.ready(replica)
    assert replicas_by_state(name) == {"starting": 0, "ready": 2, "draining": 0, "failed": 0}
    assert value("inferoxy_replica_ready_seconds_sum", model=name, version="1") == 5.0
    lost.state, lost.wanted_gone = ReplicaState.STOPPING, False  # silent: killed as lost
    drained.state, drained.wanted_gone = ReplicaState.STOPPING, True  # scaled down: drained
    replica_metrics.moved(lost)
    replica_metrics.moved(drained)
    assert replicas_by_state(name) == {"starting": 0, "ready": 0, "draining": 1, "failed": 1}
    replica_metrics.gone(lost)
    replica_metrics.died(lost, group)
    replica_metrics.gone(drained)
    replica_metrics.gone(drained)  # again: it left the gauge once
    assert replicas_by_state(name) == {"starting": 0, "ready": 0, "draining": 0, "failed": 0}
    replica_metrics.started(Replica("c", spec, group, started_at=20.0), group)
    replica_metrics.started(Replica("d", spec, group, started_at=20.0), group)  # one died: one restart, not two
    assert value("inferoxy_replica_restarts_total", model=name, version="1") == 1
    assert value("inferoxy_replica_starts_total", model=name, version="1") == 4
    assert value("inferoxy_replica_deaths_total", model=name, version="1") == 1


def test_replicas_gauge_returns_to_zero_when_the_task_manager_stops(redis_url: str) -> None:
    name = unique("tms")

    async def main() -> None:
        async with tm.Harness(redis_url) as h:
            await h.store.put(tm.spec(name, tm.ECHO, min_replicas=2, max_replicas=2))
            await h.expect("replica_up")
            await h.expect("replica_up")
            assert replicas_by_state(name)["ready"] == 2
            await h.stop()
            assert replicas_by_state(name) == {"starting": 0, "ready": 0, "draining": 0, "failed": 0}

    asyncio.run(main())


# --- registry ----------------------------------------------------------------------------------------------------


def test_redis_up_and_registry_revision_follow_the_watched_redis() -> None:
    port = free_port()

    async def watch_until_down(server: Any) -> None:
        store = SpecStore.from_url(f"redis://127.0.0.1:{port}", unique("reg"), resync_interval_s=0.1)
        seen: list[int] = []
        watcher = asyncio.create_task(store.watch(lambda registry: seen.append(registry.revision), retry_max_s=0.2))
        try:
            revision = await store.put(ModelSpec(name="r", model_class="x:Y"))
            await bm.poll(lambda: seen and seen[-1] == revision, "the watcher to read the revision")
            assert value("inferoxy_redis_up") == 1
            assert value("inferoxy_registry_revision") == revision
            server.__exit__(None, None, None)  # SIGKILL: Redis stops answering
            await bm.poll(lambda: value("inferoxy_redis_up") == 0, "redis_up to fall to 0")
            assert value("inferoxy_registry_revision") == revision  # still the revision last read
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await store.close()

    server = redis_server(port)
    server.__enter__()
    try:
        bm.run(watch_until_down(server))
    finally:
        server.__exit__(None, None, None)


# --- the whole proxy: every component's samples in one scrape ----------------------------------------------------


def test_serve_shows_the_core_metrics_of_every_component_in_one_scrape(tmp_path: Any) -> None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    models = tmp_path / "models.yaml"
    models.write_text("models:\n  echo:\n    model_class: examples.models.echo.model:EchoModel\n"
                      "    max_batch_size: 8\n    max_batch_delay_ms: 0\n")
    requests = 5
    env = {"INFEROXY_MODELS_FILE": str(models), "INFEROXY_BRIDGES": "rest"}
    with ProxyProcess(env=env) as proxy:
        body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}

        def infer() -> bool:
            return httpx.post(f"{proxy.rest_url}/v2/models/echo/infer", json=body, timeout=30).status_code == 200

        wait_for(infer, timeout=60, interval=0.2, what="the echo model to serve")
        for _ in range(requests - 1):
            assert infer()

        def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            text = httpx.get(f"{proxy.rest_url}/metrics", timeout=10).text
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(text) for s in family.samples}

        echo = (("model", "echo"), ("version", "1"))
        # The batch manager writes its histograms at the end of the drain that sent the reply: poll.
        samples = wait_for(lambda: (found := scrape()).get(("inferoxy_batch_compute_seconds_count", echo)) == requests
                           and found, timeout=10, what="every batch's compute time in the scrape")
        # Sequential requests, so one batch each (the first may have waited for the replica).
        assert samples[("inferoxy_batch_size_count", echo)] == requests
        assert samples[("inferoxy_batch_size_sum", echo)] == requests
        assert samples[("inferoxy_queue_wait_seconds_count", echo)] == requests
        assert samples[("inferoxy_queue_depth", echo)] == 0
        assert samples[("inferoxy_batches_in_flight", echo)] == 0
        assert samples[("inferoxy_replicas", tuple(sorted((*echo, ("state", "ready")))))] == 1
        assert samples[("inferoxy_replica_starts_total", echo)] == 1
        assert samples[("inferoxy_replica_ready_seconds_count", echo)] == 1
        assert samples[("inferoxy_redis_up", ())] == 1
        assert samples[("inferoxy_registry_revision", ())] >= 1
