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
from tests.test_end_to_end import replica_pids

CLIENTS = 16
REQUEST_TIMEOUT_S = 20.0

TWO_SLOW_REPLICAS = """
models:
  busy:
    model_class: tests.models_for_tests:SlowModel
    max_batch_size: 4
    max_batch_delay_ms: 1
    min_replicas: 2
    max_replicas: 2
    env: {SLOW_MODEL_SECONDS: "0.02"}
"""

NO_REPLICAS = """
models:
  echo:
    model_class: examples.models.echo.model:EchoModel
  idle:
    model_class: examples.models.echo.model:EchoModel
    min_replicas: 0
"""


def test_killing_one_of_two_replicas_under_load_fails_no_stateless_request(tmp_path: Path) -> None:
    # The failure: the requests the dead replica held failed `replica_lost` (3 times out of 3) although the
    # other replica was healthy, because the retry was sent to the dead one.
    models = tmp_path / "models.yaml"
    models.write_text(TWO_SLOW_REPLICAS)
    with ProxyProcess(env={"INFEROXY_MODELS_FILE": str(models)}) as proxy:
        victim, survivor = wait_for(lambda: sorted(replica_pids(proxy, "busy")) if len(replica_pids(proxy, "busy")) == 2
                                    else None, timeout=30, what="two replicas")

        async def load() -> tuple[int, list[BaseException]]:
            answered = 0
            errors: list[BaseException] = []
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
                        if answered == 200:  # well under load: every replica holds batches
                            killed.set()

            async def kill_then_wait_for_replacement() -> None:
                await killed.wait()
                os.kill(victim, signal.SIGKILL)
                while not {pid for pid in replica_pids(proxy, "busy") if alive(pid)} - {victim, survivor}:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # a process table has no event to wait on
                replaced.set()

            async with asyncio.timeout(60):
                await asyncio.gather(kill_then_wait_for_replacement(), *(client(i) for i in range(CLIENTS)))
            return answered, errors

        answered, errors = asyncio.run(load())
        assert not errors, [f"{getattr(e, 'code', '?')}: {e}" for e in errors[:5]]
        assert answered > 200
        assert not alive(victim)
        assert "ended unexpectedly" in proxy.log()  # the kill landed while it served
        # The `failed` of each batch the dead replica held follows its replica_down, and is known as late.
        assert "matches no batch" not in "".join(proxy.output)


def test_a_model_without_replicas_answers_not_ready_at_once(tmp_path: Path) -> None:
    # The failure: with min_replicas 0, or after `inferoxy models unload`, requests waited their whole timeout
    # and got `deadline` (504 over REST).
    models = tmp_path / "models.yaml"
    models.write_text(NO_REPLICAS)
    with ProxyProcess(env={"INFEROXY_MODELS_FILE": str(models), "INFEROXY_REQUEST_TIMEOUT_S": "30"}) as proxy:
        x = {"x": np.ones((1, 1), np.float32)}
        with Client(proxy.zmq_url, timeout=REQUEST_TIMEOUT_S) as client:
            # Not `deadline`: the answer came before the request's timeout.
            with pytest.raises(InferenceError) as idle:
                client.infer("idle", x)
            assert idle.value.code == "not_ready", idle.value
            assert "min_replicas is 0" in str(idle.value)

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
