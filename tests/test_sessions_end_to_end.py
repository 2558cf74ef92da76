"""Sessions of a stateful model (examples/models/counter) through the whole proxy: ZeroMQ, REST and gRPC."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from inferoxy.client import AsyncClient, Client, InferenceError
from tests.support import ProxyProcess, wait_for

COUNTER_MODELS = """
models:
  counter:
    model_class: examples.models.counter.model:CounterModel
    stateful: true
    max_sessions_per_replica: 8
    session_idle_timeout_s: 1.5
    max_batch_size: 16
    max_batch_delay_ms: 2
    inputs:
      - {name: x, datatype: FP32, shape: [-1]}
"""


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    models = tmp_path_factory.mktemp("sessions") / "models.yaml"
    models.write_text(COUNTER_MODELS)
    env = {"INFEROXY_MODELS_FILE": str(models), "INFEROXY_BRIDGES": "rest,zmq,grpc",
           "INFEROXY_HEARTBEAT_INTERVAL_S": "0.2"}
    with ProxyProcess(env=env) as running:
        wait_for(lambda: running.replica_pids("counter"), timeout=30, what="the counter replica")
        yield running


def frame(value: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 2), value, np.float32)}


def test_two_concurrent_streams_keep_separate_state_over_zmq(proxy: ProxyProcess) -> None:
    async def stream(client: AsyncClient, sequence_id: int, value: float, frames: int) -> list[tuple[int, float]]:
        seen = []
        for index in range(frames):
            params = {"sequence_id": sequence_id, "sequence_start": index == 0, "sequence_end": index == frames - 1}
            out = await client.infer("counter", frame(value), parameters=params)
            seen.append((int(out["count"][0]), float(out["total"][0])))
        return seen

    async def both() -> list[list[tuple[int, float]]]:
        async with AsyncClient(proxy.zmq_url, timeout=30) as client:
            return await asyncio.gather(stream(client, 101, 1.0, 20), stream(client, 102, 10.0, 20))

    first, second = asyncio.run(both())
    assert first == [(i, 2.0 * i) for i in range(1, 21)]
    assert second == [(i, 20.0 * i) for i in range(1, 21)]


def test_pipelined_requests_of_one_session_run_in_order(proxy: ProxyProcess) -> None:
    async def pipelined() -> list[dict[str, np.ndarray]]:
        async with AsyncClient(proxy.zmq_url, timeout=30) as client:
            await client.infer("counter", frame(0.0), parameters={"sequence_id": "cam-7", "sequence_start": True})
            # Sent all at once: the batch manager keeps at most one in the replica's hands, in arrival order.
            return await asyncio.gather(*(client.infer("counter", frame(float(i)), parameters={"sequence_id": "cam-7"})
                                          for i in range(1, 11)))

    results = asyncio.run(pipelined())
    assert [int(out["count"][0]) for out in results] == list(range(2, 12))
    assert [float(out["total"][0]) for out in results] == [float(i * (i + 1)) for i in range(1, 11)]


def test_a_session_over_rest_ends_and_then_is_lost(proxy: ProxyProcess) -> None:
    def post(params: dict, value: float) -> httpx.Response:
        body = {"parameters": params, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                                  "data": [value, value]}]}
        return httpx.post(f"{proxy.rest_url}/v2/models/counter/infer", json=body, timeout=30)

    first = post({"sequence_id": 201, "sequence_start": True}, 1.0)
    assert first.status_code == 200, first.text
    second = post({"sequence_id": 201, "sequence_end": True}, 2.0)
    assert second.status_code == 200, second.text
    outputs = {o["name"]: o["data"] for o in second.json()["outputs"]}
    assert outputs["count"] == [2] and outputs["total"] == [6.0]
    after = post({"sequence_id": 201}, 3.0)
    assert after.status_code == 409, after.text
    assert "session" in after.text
    # A stream never started is refused the same way: never a silent fresh state.
    assert post({"sequence_id": 202}, 1.0).status_code == 409


def test_requests_without_a_sequence_id_are_refused(proxy: ProxyProcess) -> None:
    with Client(proxy.zmq_url, timeout=30) as client, pytest.raises(InferenceError) as caught:
        client.infer("counter", frame(1.0))
    assert caught.value.code == "bad_input" and "sequence_id" in caught.value.message


def test_idle_sessions_are_reaped(proxy: ProxyProcess) -> None:
    with Client(proxy.zmq_url, timeout=30) as client:
        client.infer("counter", frame(1.0), parameters={"sequence_id": 301, "sequence_start": True})
        client.infer("counter", frame(1.0), parameters={"sequence_id": 301})
        time.sleep(2.5)  # session_idle_timeout_s is 1.5
        with pytest.raises(InferenceError) as caught:
            client.infer("counter", frame(1.0), parameters={"sequence_id": 301})
        assert caught.value.code == "session_lost" and "idle" in caught.value.message
        restarted = client.infer("counter", frame(1.0), parameters={"sequence_id": 301, "sequence_start": True})
        assert int(restarted["count"][0]) == 1


def test_sessions_over_grpc(proxy: ProxyProcess) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{proxy.grpc_port}")
    wait_for(lambda: client.is_server_live(), timeout=10, what="the gRPC bridge")

    def send(sequence_id: int, value: float, start: bool = False, end: bool = False) -> tuple[int, float]:
        data = grpcclient.InferInput("x", [1, 2], "FP32")
        data.set_data_from_numpy(np.full((1, 2), value, np.float32))
        result = client.infer("counter", [data], sequence_id=sequence_id, sequence_start=start, sequence_end=end)
        return int(result.as_numpy("count")[0]), float(result.as_numpy("total")[0])

    assert send(401, 1.0, start=True) == (1, 2.0)
    assert send(402, 5.0, start=True) == (1, 10.0)
    assert send(401, 1.0) == (2, 4.0)
    assert send(402, 5.0, end=True) == (2, 20.0)
    with pytest.raises(Exception, match="session"):
        send(402, 5.0)


def test_a_killed_replica_loses_its_sessions(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(COUNTER_MODELS)
    env = {"INFEROXY_MODELS_FILE": str(models), "INFEROXY_HEARTBEAT_INTERVAL_S": "0.2"}
    with ProxyProcess(env=env) as proxy, Client(proxy.zmq_url, timeout=30) as client:
        (victim,) = wait_for(lambda: proxy.replica_pids("counter"), timeout=30, what="the counter replica")
        client.infer("counter", frame(1.0), parameters={"sequence_id": 501, "sequence_start": True})
        os.kill(victim, signal.SIGKILL)
        # Whether it reaches the batch manager before or after the replica's death is noticed, the
        # answer is the same: the state is gone, and the client is told so.
        with pytest.raises(InferenceError) as caught:
            client.infer("counter", frame(1.0), parameters={"sequence_id": 501})
        assert caught.value.code == "session_lost", caught.value
        with pytest.raises(InferenceError) as again:
            client.infer("counter", frame(1.0), parameters={"sequence_id": 501})
        assert again.value.code == "session_lost", again.value
        # A new session works once the replacement is up.
        (replacement,) = wait_for(lambda: proxy.replica_pids("counter"), timeout=30, what="a new counter replica")
        assert replacement != victim
        out = wait_for(lambda: client.infer("counter", frame(2.0), parameters={"sequence_id": 501,
                                                                                "sequence_start": True}),
                       timeout=30, what="a fresh session")
        assert int(out["count"][0]) == 1
