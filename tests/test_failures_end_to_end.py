"""`inferoxy serve` with the process runtime when a replica dies under load or a model has none (issue 9)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest

from inferoxy.client import AsyncClient, Client, InferenceError
from tests.support import ProxyProcess, alive, wait_for

CLIENTS = 16
REQUEST_TIMEOUT_S = 20.0

NO_REPLICAS = """
models:
  echo:
    model_class: examples.models.echo.model:EchoModel
  idle:
    model_class: examples.models.echo.model:EchoModel
    min_replicas: 0
    max_replicas: 0
"""

CAPACITY, MAX_BATCH_SIZE = 2, 4  # Model.capacity's default; the spec below


def slow_replicas(count: int) -> str:
    """A model that takes ~20 ms per batch, with ``count`` replicas."""
    return f"""
models:
  busy:
    model_class: tests.models_for_tests:SlowModel
    max_batch_size: {MAX_BATCH_SIZE}
    max_batch_delay_ms: 1
    min_replicas: {count}
    max_replicas: {count}
    env: {{SLOW_MODEL_SECONDS: "0.02"}}
"""


def serve_replicas(tmp_path: Path, count: int) -> ProxyProcess:
    models = tmp_path / "models.yaml"
    models.write_text(slow_replicas(count))
    return ProxyProcess(env={"INFEROXY_MODELS_FILE": str(models)})


def load_while_killing(proxy: ProxyProcess, victim: int) -> tuple[int, list[InferenceError]]:
    """CLIENTS closed-loop clients; once 200 requests were answered (every replica busy, requests queued),
    ``kill -9`` the victim; stop once a replacement process is up. (answered, errors)."""
    before = set(proxy.replica_pids("busy"))

    async def load() -> tuple[int, list[InferenceError]]:
        answered = 0
        errors: list[InferenceError] = []
        replaced = asyncio.Event()
        killed = asyncio.Event()

        async def client(index: int) -> None:
            nonlocal answered
            x = np.full((1, 2), index, np.float32)
            async with AsyncClient(proxy.zmq_url, timeout=REQUEST_TIMEOUT_S) as zmq_client:
                while not replaced.is_set():
                    try:
                        result = await zmq_client.infer("busy", {"x": x})
                    except InferenceError as exc:
                        errors.append(exc)
                        continue
                    np.testing.assert_array_equal(result["x"], x)
                    answered += 1
                    if answered == 200:
                        killed.set()

        async def kill_then_wait_for_replacement() -> None:
            await killed.wait()
            os.kill(victim, signal.SIGKILL)
            while not {pid for pid in proxy.replica_pids("busy") if alive(pid)} - before:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # a process table has no event to wait on
            replaced.set()

        async with asyncio.timeout(60):
            await asyncio.gather(kill_then_wait_for_replacement(), *(client(i) for i in range(CLIENTS)))
        return answered, errors

    answered, errors = asyncio.run(load())
    output = "".join(proxy.output)
    seen = [f"{e.code}: {e}"[:300] for e in errors[:10]]
    assert answered > 200, (answered, seen)
    assert not alive(victim)
    assert "ended unexpectedly" in output, seen  # the kill landed while it served
    # The `failed` of each batch the dead replica held follows its replica_down, and is known as late.
    assert "matches no batch" not in output, [line for line in proxy.output if "matches no batch" in line][:5]
    return answered, errors


def test_killing_one_of_two_replicas_under_load_fails_no_stateless_request(tmp_path: Path) -> None:
    # The failure: the requests the dead replica held failed `replica_lost` (3 times out of 3) although the
    # other replica was healthy, because the retry was sent to the dead one.
    with serve_replicas(tmp_path, 2) as proxy:
        victim, _ = wait_for(lambda: sorted(pids) if len(pids := proxy.replica_pids("busy")) == 2 else None,
                             timeout=30, what="two replicas")
        _, errors = load_while_killing(proxy, victim)
        assert not errors, [f"{e.code}: {e}" for e in errors[:5]]


def test_killing_the_only_replica_fails_only_the_requests_it_held(tmp_path: Path) -> None:
    # The failure: with one replica, the dead replica got its credit back from each `failed`, so requests
    # queued behind it (which it never held) were sent to it and failed too.
    with serve_replicas(tmp_path, 1) as proxy:
        (victim,) = wait_for(lambda: proxy.replica_pids("busy"), timeout=30, what="the replica")
        _, errors = load_while_killing(proxy, victim)
        assert {e.code for e in errors} <= {"replica_lost"}, [f"{e.code}: {e}" for e in errors[:5]]
        # At most what its credit let it hold; CLIENTS - that many were queued and waited for the replacement.
        assert len(errors) <= CAPACITY * MAX_BATCH_SIZE < CLIENTS, [f"{e.code}: {e}" for e in errors[:5]]


def test_a_model_without_replicas_answers_not_ready_at_once(tmp_path: Path) -> None:
    # The failure: with no replica allowed (max_replicas 0, what `inferoxy models unload` sets), requests waited
    # their whole timeout and got `deadline` (504 over REST). (min_replicas 0 alone scales to zero: it waits.)
    models = tmp_path / "models.yaml"
    models.write_text(NO_REPLICAS)
    with ProxyProcess(env={"INFEROXY_MODELS_FILE": str(models), "INFEROXY_REQUEST_TIMEOUT_S": "30"}) as proxy:
        x = {"x": np.ones((1, 1), np.float32)}
        with Client(proxy.zmq_url, timeout=REQUEST_TIMEOUT_S) as client:
            # Not `deadline`: the answer came before the request's timeout.
            with pytest.raises(InferenceError) as idle:
                client.infer("idle", x)
            assert idle.value.code == "not_ready", idle.value
            assert "max_replicas is 0" in str(idle.value)

            np.testing.assert_array_equal(client.infer("echo", x)["x"], x["x"])
            response = httpx.post(f"{proxy.rest_url}/v2/repository/models/echo/unload", timeout=10)
            assert response.status_code == 200, response.text
            wait_for(lambda: httpx.get(f"{proxy.rest_url}/v2/models/echo/ready").status_code != 200, timeout=20,
                     what="echo to be unloaded")

            def refused() -> InferenceError | None:
                try:
                    client.infer("echo", x)
                except InferenceError as exc:
                    return exc if exc.code == "not_ready" else None
                return None  # a replica still draining served it

            unloaded = wait_for(refused, timeout=20, what="echo to refuse")
            assert "stopped" in str(unloaded), unloaded

        body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
        response = httpx.post(f"{proxy.rest_url}/v2/models/echo/infer", json=body, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 503, response.text
