"""`inferoxy serve` scaling on load (issue 12's first done-criterion): a min 1 / max 3 model rises to 2 or more
replicas under load and falls back to 1 once it stops, with every request answered; a min 0 model scales to
zero when idle and answers its next request (a cold start)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from inferoxy.client import AsyncClient, InferenceError
from tests.support import ProxyProcess, wait_for

REQUEST_TIMEOUT_S = 30.0
CLIENTS = 8  # closed loop, batches of 1 and 2 slots per replica: one replica holds 2, the other 6 wait

MODELS = """
models:
  busy:
    model_class: tests.models_for_tests:SlowModel
    env: {SLOW_MODEL_SECONDS: "0.05"}
    max_batch_size: 1
    max_batch_delay_ms: 1
    min_replicas: 1
    max_replicas: 3
    scale_up_delay_s: 0.5
    scale_down_delay_s: 2
  lazy:
    model_class: examples.models.echo.model:EchoModel
    min_replicas: 0
    max_replicas: 1
    scale_down_delay_s: 1
  counter:
    model_class: examples.models.counter.model:CounterModel
    stateful: true
    max_sessions_per_replica: 2
    session_idle_timeout_s: 20
    max_batch_size: 1
    max_batch_delay_ms: 1
    min_replicas: 1
    max_replicas: 2
    target_in_flight_per_replica: 1
    scale_up_delay_s: 0.3
    scale_down_delay_s: 1
"""
# 2 session slots per replica: with one replica, 2 sessions wait for a slot (requests waiting), and a counter
# is fast, so the target of 1 batch in flight per replica (not its capacity, 2) is what it saturates.
SESSIONS = 4


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    models: Path = tmp_path_factory.mktemp("scaling") / "models.yaml"
    models.write_text(MODELS)
    with ProxyProcess(env={"INFEROXY_MODELS_FILE": str(models),
                           "INFEROXY_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S)}) as running:
        yield running


def serving(proxy: ProxyProcess, name: str) -> dict[str, Any]:
    response = httpx.get(f"{proxy.rest_url}/v2/models/{name}", timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json()["serving"])


class Load:
    """Closed-loop ZeroMQ clients on ``busy``, each reply counted; ``clients`` may shrink while it runs."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.answered = 0
        self.errors: list[str] = []
        self.clients = CLIENTS
        self.stop = asyncio.Event()

    async def client(self, index: int) -> None:
        x = np.full((1, 2), index, np.float32)
        async with AsyncClient(self.proxy.zmq_url, timeout=REQUEST_TIMEOUT_S) as zmq_client:
            while not self.stop.is_set() and index < self.clients:
                try:
                    result = await zmq_client.infer("busy", {"x": x})
                except InferenceError as exc:
                    self.errors.append(f"{exc.code}: {exc}"[:300])
                    continue
                np.testing.assert_array_equal(result["x"], x)
                self.answered += 1


async def poll(check: Any, timeout: float, what: str) -> Any:
    """Poll the REST metadata (in a thread: httpx's sync client) until ``check`` holds; a scale has no event."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(check)
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


def test_load_scales_a_model_up_and_its_end_scales_it_back_with_every_request_answered(proxy: ProxyProcess) -> None:
    assert wait_for(lambda: serving(proxy, "busy")["replicas"] == 1, timeout=30, what="busy's first replica")
    load = Load(proxy)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        clients = [asyncio.create_task(load.client(i)) for i in range(CLIENTS)]
        try:
            up = await poll(lambda: (s := serving(proxy, "busy"))["replicas"] >= 2 and s, 60, "a second replica")
            answered_at_up = load.answered
            # A light load goes on (one client: it fits in one replica at half its capacity) across the drain.
            load.clients = 1
            down = await poll(lambda: (s := serving(proxy, "busy"))["replicas"] == 1 and s["target"] == 1 and s,
                              60, "back to one replica")
            assert load.answered > answered_at_up, "requests kept flowing while it scaled down"
            return up, down
        finally:
            load.stop.set()
            await asyncio.gather(*clients)

    up, down = asyncio.run(scenario())
    assert up["target"] >= 2 and (up["min"], up["max"]) == (1, 3), up
    assert down["state"] == "ready", down
    assert not load.errors, load.errors[:5]
    assert load.answered > CLIENTS, load.answered
    output = "".join(proxy.output)
    assert "scaling up" in output and "scaling down" in output, "each decision is logged with its reason"
    assert "scaled down" in output, "the surplus replica was drained"


def test_a_min_zero_model_goes_idle_and_answers_its_next_request(proxy: ProxyProcess) -> None:
    idle = wait_for(lambda: (s := serving(proxy, "lazy"))["state"] == "idle" and s, timeout=30, what="lazy idle")
    assert (idle["replicas"], idle["target"], idle["min"]) == (0, 0, 0), idle
    assert not proxy.replica_pids("lazy")
    # Ready: it takes requests (the first waits for a start). A load balancer that skipped it would never send
    # the request that brings its replica back.
    assert idle["ready"] is True
    assert httpx.get(f"{proxy.rest_url}/v2/models/lazy/ready", timeout=10).status_code == 200
    x = {"x": np.ones((1, 3), np.float32)}

    async def infer() -> tuple[dict[str, np.ndarray], float]:
        async with AsyncClient(proxy.zmq_url, timeout=REQUEST_TIMEOUT_S) as client:
            started = time.perf_counter()
            result = await client.infer("lazy", x)
            return result, time.perf_counter() - started

    for _ in range(2):  # scaled to zero again in between: a second cold start
        result, cold_s = asyncio.run(infer())
        np.testing.assert_array_equal(result["x"], x["x"])
        print(f"cold start of a process replica, request to answer: {cold_s:.2f}s")
        assert serving(proxy, "lazy")["replicas"] == 1
        wait_for(lambda: (s := serving(proxy, "lazy"))["state"] == "idle" and s["replicas"] == 0, timeout=30,
                 what="lazy idle again")


def test_sessions_on_a_replica_scaled_down_go_on_and_end_without_being_lost(proxy: ProxyProcess) -> None:
    # The failure: a scale-down drain ended the drained replica's sessions at once (session_lost); they go on
    # there until they end (or the grace, session_idle_timeout_s, is over).
    assert wait_for(lambda: serving(proxy, "counter")["replicas"] == 1, timeout=30, what="counter's replica")
    counts: dict[int, list[int]] = {sid: [] for sid in range(SESSIONS)}
    errors: list[str] = []
    phase = {"busy": True, "ending": False}

    async def session(client: AsyncClient, sid: int) -> None:
        params: dict[str, Any] = {"sequence_id": 1000 + sid, "sequence_start": True}
        slow_left = 3  # requests after the scale-down began, then the end
        while True:
            if phase["ending"]:
                slow_left -= 1
                params["sequence_end"] = slow_left == 0
            try:
                out = await client.infer("counter", {"x": np.ones((1, 1), np.float32)}, parameters=params)
            except InferenceError as exc:
                errors.append(f"session {sid}: {exc.code}: {exc}"[:300])
                return
            counts[sid].append(int(out["count"][0]))
            params = {"sequence_id": 1000 + sid}
            if slow_left == 0:  # that was its sequence_end
                return
            if not phase["busy"]:
                await asyncio.sleep(0.2)  # a trickle: the load fits in one replica, so it scales down

    async def scenario() -> None:
        async with AsyncClient(proxy.zmq_url, timeout=REQUEST_TIMEOUT_S) as client:
            streams = [asyncio.create_task(session(client, sid)) for sid in range(SESSIONS)]
            try:
                await poll(lambda: serving(proxy, "counter")["replicas"] >= 2, 60, "a second counter replica")
                phase["busy"] = False
                await poll(lambda: serving(proxy, "counter")["target"] == 1, 60, "the scale-down to begin")
                phase["ending"] = True
                await asyncio.wait_for(asyncio.gather(*streams), REQUEST_TIMEOUT_S)
            finally:
                for stream in streams:
                    stream.cancel()
                await asyncio.gather(*streams, return_exceptions=True)

    asyncio.run(scenario())
    assert not errors, errors
    for sid, seen in counts.items():
        assert seen == list(range(1, len(seen) + 1)), f"session {sid} lost its state: {seen}"
    assert "its sessions go on" in "".join(proxy.output), "the drained replica retired with its sessions"
