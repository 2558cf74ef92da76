"""The autoscaler wired into the task manager (real replica processes, the test plays the batch manager and
reports its load): the target follows the load between min_replicas and max_replicas, down to zero and back."""

from __future__ import annotations

from typing import Any

import numpy as np

from inferoxy import metrics, wire
from tests.support import alive
from tests.test_task_manager import ECHO, Harness, eventually, redis_url, run, spec

__all__ = ["redis_url"]  # the fixture, shared with tests/test_task_manager.py


async def report(h: Harness, name: str, queued: int, in_flight: int) -> None:
    await h.bm.send_multipart(wire.encode(
        {"t": "load", "models": [{"model": name, "version": "1", "queued": queued, "in_flight": in_flight}]}))


def decisions(name: str, direction: str, reason: str) -> float:
    value = metrics.AUTOSCALER_DECISIONS.labels(name, "1", direction, reason)._value.get()
    return float(value)


def target(name: str) -> float:
    return float(metrics.AUTOSCALER_TARGET.labels(name, "1")._value.get())


def test_saturated_replicas_get_company_and_lose_it_once_the_load_is_gone(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        fields: dict[str, Any] = {"min_replicas": 1, "max_replicas": 2, "max_batch_size": 1,
                                  "scale_up_delay_s": 0.2, "scale_down_delay_s": 0.5}
        await h.store.put(spec("busy", ECHO, **fields))
        first, _ = await h.expect("replica_up", model="busy")
        assert first["capacity"] == 2
        ups = decisions("busy", "up", "saturated")
        # Its 2 slots full and 3 requests waiting, report after report (a batch manager reports every 0.5 s).
        await report(h, "busy", queued=3, in_flight=2)
        second, _ = await h.expect("replica_up", model="busy")
        assert second["replica"] != first["replica"]
        assert decisions("busy", "up", "saturated") == ups + 1 and target("busy") == 2
        status = await h.status_eventually("busy", "ready", ready_replicas=2)
        assert status.desired_replicas == 2, "the status record's target is the autoscaler's"

        await report(h, "busy", queued=0, in_flight=0)
        # Drained on purpose: batch managers hear `replica_draining` first (no new batch, none lost).
        draining, _ = await h.expect("replica_draining", timeout=10)
        assert draining["reason"] == "scaled down"
        await h.expect("replica_down", replica=draining["replica"])
        status = await h.status_eventually("busy", "ready", ready_replicas=1)
        assert status.desired_replicas == 1 and target("busy") == 1
        await eventually(lambda: len(h.replicas("busy/1")) == 1, what="one replica left (min_replicas)")

    run(redis_url, scenario)


def test_a_min_zero_model_goes_idle_and_a_request_brings_a_replica_back(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("lazy", ECHO, min_replicas=0, max_replicas=2, scale_down_delay_s=0.3,
                                scale_up_delay_s=30.0))
        status = await h.status_eventually("lazy", "idle")
        assert (status.ready_replicas, status.desired_replicas) == (0, 0)
        assert "scaled to zero" in (status.reason or "")
        idle, _ = await h.expect("model_status", model="lazy")
        assert idle["state"] == "idle", "batch managers hear `idle`: they keep its requests instead of refusing"

        # A batch manager with a request waiting and no replica reports at once: one replica starts, no delay.
        await report(h, "lazy", queued=1, in_flight=0)
        await h.expect("replica_up", model="lazy", timeout=20)
        assert decisions("lazy", "up", "cold_start") >= 1
        await h.status_eventually("lazy", "ready", ready_replicas=1)

        await report(h, "lazy", queued=0, in_flight=0)
        await h.expect("replica_draining", timeout=10)
        status = await h.status_eventually("lazy", "idle")
        assert status.desired_replicas == 0 and decisions("lazy", "down", "idle") >= 1

    run(redis_url, scenario)


def test_an_unloaded_model_never_starts_a_replica_for_a_request(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("off", ECHO, min_replicas=0, max_replicas=0))
        status = await h.status_eventually("off", "stopped")
        assert "max_replicas is 0" in (status.reason or "")
        await report(h, "off", queued=5, in_flight=0)
        await eventually(lambda: h.tm.loads.total("off/1").queued == 5, what="the report to be read")
        for _ in range(2):  # a supervision tick (it sends each heartbeat) after the report, too
            await h.expect("hb")
        assert not h.replicas("off/1"), "an unloaded model refuses; it never starts on demand"
        assert h.tm.status()["off/1"]["desired"] == 0

    run(redis_url, scenario)


def test_a_spec_change_clamps_the_target_and_drains_the_surplus(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("wide", ECHO, min_replicas=2, max_replicas=3))
        await h.expect("replica_up", model="wide")
        await h.expect("replica_up", model="wide")
        before = decisions("wide", "down", "bounds")
        await h.store.put(spec("wide", ECHO, min_replicas=1, max_replicas=1))
        draining, _ = await h.expect("replica_draining", timeout=10)
        assert draining["reason"] == "scaled down"
        assert decisions("wide", "down", "bounds") == before + 1 and target("wide") == 1
        status = await h.status_eventually("wide", "ready", ready_replicas=1)
        assert status.desired_replicas == 1

    run(redis_url, scenario)


async def scale_a_stateful_model_up_then_down(h: Harness, *, session_idle_timeout_s: float) -> dict[str, Any]:
    """A stateful model scaled 1 -> 2 by a reported load, then down again once it ends: the retiring replica's
    `replica_draining`."""
    await h.store.put(spec("chat", ECHO, stateful=True, min_replicas=1, max_replicas=2, max_batch_size=1,
                            scale_up_delay_s=0.1, scale_down_delay_s=0.3,
                            session_idle_timeout_s=session_idle_timeout_s))
    await h.expect("replica_up", model="chat")
    await report(h, "chat", queued=3, in_flight=2)
    await h.expect("replica_up", model="chat")
    await report(h, "chat", queued=0, in_flight=0)
    retiring, _ = await h.expect("replica_draining", timeout=10)
    return retiring


def test_scaling_a_stateful_model_down_lets_the_replicas_sessions_go_on_for_their_grace(redis_url: str) -> None:
    # The failure: `replica_draining` ended the drained replica's sessions at once (session_lost), although
    # sessions should move only when their replica drains, and be lost only if the drain times out.
    async def scenario(h: Harness) -> None:
        retiring = await scale_a_stateful_model_up_then_down(h, session_idle_timeout_s=1.5)
        assert (retiring["reason"], retiring["sessions_grace_s"]) == ("scaled down", 1.5)
        (pid,) = [r["pid"] for r in h.replicas("chat/1") if r["id"] == retiring["replica"]]
        assert alive(pid), "not stopped yet: its sessions go on until the grace is over"
        x = np.arange(3, dtype=np.float32).reshape(1, 3)
        await h.send_batch(retiring["replica"], 41, [("x", x)])  # a session's request, as the batch manager sends
        result, tensors = await h.expect("result", batch=41)
        np.testing.assert_array_equal(dict(tensors)["x"], x)
        final, _ = await h.expect("replica_draining", replica=retiring["replica"], timeout=10)
        assert "sessions_grace_s" not in final and "grace" in final["reason"]
        await h.expect("replica_down", replica=retiring["replica"])
        await eventually(lambda: not alive(pid), what="the retired replica to exit")

    run(redis_url, scenario)


def test_a_retiring_replica_is_stopped_at_shutdown_without_waiting_for_its_sessions(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        retiring = await scale_a_stateful_model_up_then_down(h, session_idle_timeout_s=3600)
        assert retiring["sessions_grace_s"] == 3600
        await h.stop()
        # Told to drain for good (its sessions end) as the task manager stops, not an hour later.
        final, _ = await h.expect("replica_draining", replica=retiring["replica"], timeout=5)
        assert "sessions_grace_s" not in final
        assert not h.tm._replicas, "every replica ended with the task manager"

    run(redis_url, scenario)
