"""The whole proxy, started with `inferoxy serve`, answering through its REST and ZeroMQ bridges."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
import zmq

from examples.train_digits import held_out_split
from inferoxy.client import AsyncClient, Client, InferenceError
from tests.models_for_tests import SLOW_MODEL_SLEEPING
from tests.support import ProxyProcess, alive, wait_for

SLOW_MODELS = """
models:
  echo:
    model_class: examples.models.echo.model:EchoModel
    max_batch_size: 16
    max_batch_delay_ms: 1
  slow:
    model_class: tests.models_for_tests:SlowModel
    max_batch_size: 4
    max_batch_delay_ms: 0
    env: {SLOW_MODEL_SECONDS: "30"}
"""


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    with ProxyProcess() as running:
        yield running


def infer_json(name: str, data: list, shape: list[int], datatype: str = "FP32") -> dict:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


def test_echo_over_rest(proxy: ProxyProcess) -> None:
    body = infer_json("x", [1.5, 2.5, 3.5, 4.5], [2, 2])
    body["id"] = "req-7"
    response = httpx.post(f"{proxy.rest_url}/v2/models/echo/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["id"] == "req-7"
    assert reply["model_name"] == "echo"
    (output,) = reply["outputs"]
    assert (output["name"], output["shape"], output["datatype"]) == ("x", [2, 2], "FP32")
    assert output["data"] == [1.5, 2.5, 3.5, 4.5]


def test_health_and_metadata_over_rest(proxy: ProxyProcess) -> None:
    assert httpx.get(f"{proxy.rest_url}/v2/health/live").status_code == 200
    assert httpx.get(f"{proxy.rest_url}/v2/health/ready").status_code == 200
    metadata = httpx.get(f"{proxy.rest_url}/v2/models/digits").json()
    assert metadata["name"] == "digits"
    assert {i["name"]: i["shape"] for i in metadata["inputs"]} == {"image": [-1, 64]}


def test_echo_over_zmq_blocking_and_async(proxy: ProxyProcess) -> None:
    frame = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    with Client(proxy.zmq_url, timeout=30) as client:
        result = client.infer("echo", {"frame": frame})
    np.testing.assert_array_equal(result["frame"], frame)

    async def many() -> list[dict[str, np.ndarray]]:
        async with AsyncClient(proxy.zmq_url, timeout=30) as client:
            return await asyncio.gather(*(client.infer("echo", {"v": np.full((1, 5), i, np.int32)})
                                          for i in range(200)))

    for i, result in enumerate(asyncio.run(many())):
        np.testing.assert_array_equal(result["v"], np.full((1, 5), i, np.int32))


def test_digits_accuracy_through_both_bridges(proxy: ProxyProcess) -> None:
    images, labels = held_out_split()
    images = images.astype(np.float32)

    async def over_zmq() -> np.ndarray:
        async with AsyncClient(proxy.zmq_url, timeout=60) as client:
            # One image per request, all at once: the batch manager has to form the batches.
            results = await asyncio.gather(*(client.infer("digits", {"image": image[None]}) for image in images))
        return np.concatenate([r["label"] for r in results])

    zmq_accuracy = float(np.mean(asyncio.run(over_zmq()) == labels))

    rest_labels = []
    with httpx.Client(base_url=proxy.rest_url, timeout=60) as http:
        for start in range(0, len(images), 32):
            chunk = images[start:start + 32]
            response = http.post("/v2/models/digits/infer",
                                 json=infer_json("image", chunk.ravel().tolist(), list(chunk.shape)))
            assert response.status_code == 200, response.text
            outputs = {o["name"]: o for o in response.json()["outputs"]}
            rest_labels.extend(outputs["label"]["data"])
    rest_accuracy = float(np.mean(np.array(rest_labels) == labels))

    assert zmq_accuracy >= 0.95, zmq_accuracy
    assert rest_accuracy >= 0.95, rest_accuracy


@pytest.mark.parametrize(
    ("what", "path", "content", "status", "words"),
    [
        ("a body that is not JSON", "/v2/models/echo/infer", b"{not json", 400, "json"),
        ("JSON that is not an object", "/v2/models/echo/infer", b"[1, 2]", 400, "object"),
        ("no inputs", "/v2/models/echo/infer", b'{"inputs": []}', 400, "input"),
        ("six values for a 2x2 shape", "/v2/models/echo/infer",
         b'{"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1,2,3,4,5,6]}]}', 400, "4"),
        ("an unknown datatype", "/v2/models/echo/infer",
         b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP33", "data": [1]}]}', 400, "FP33"),
        ("strings in an FP32 tensor", "/v2/models/echo/infer",
         b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}', 400, "x"),
        ("the wrong input name for digits", "/v2/models/digits/infer",
         b'{"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": '
         + str([0.0] * 64).encode() + b"}]}", 400, "image"),
        ("the wrong width for digits", "/v2/models/digits/infer",
         b'{"inputs": [{"name": "image", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}', 400, "64"),
        ("a model that does not exist", "/v2/models/nope/infer",
         b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', 404, "nope"),
    ],
)
def test_bad_rest_input_gets_a_clear_error_and_others_still_served(
    proxy: ProxyProcess, what: str, path: str, content: bytes, status: int, words: str
) -> None:
    with httpx.Client(base_url=proxy.rest_url, timeout=30) as http:
        response = http.post(path, content=content, headers={"content-type": "application/json"})
        assert response.status_code == status, f"{what}: {response.status_code} {response.text}"
        assert words.lower() in response.json()["error"].lower(), f"{what}: {response.json()}"
        good = http.post("/v2/models/echo/infer", json=infer_json("x", [1.0], [1, 1]))
        assert good.status_code == 200, f"after {what}: {good.text}"


def test_bad_zmq_input_gets_a_clear_error_and_others_still_served(proxy: ProxyProcess) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(proxy.zmq_url)
    good_header = {"id": 1, "model": "echo", "tensors": [{"name": "x", "dtype": "float32", "shape": [1, 2]}]}
    garbage: list[tuple[str, list[bytes]]] = [
        ("a header that is not msgpack", [b"\xc1\xc1\xc1"]),
        ("a header that is a list", [msgpack.packb([1, 2, 3])]),
        ("two data frames for one described tensor", [msgpack.packb(good_header), b"\0" * 8, b"\0" * 8]),
        ("7 bytes for a float32 [1, 2]", [msgpack.packb(good_header), b"\0" * 7]),
        ("no model field", [msgpack.packb({"id": 5, "tensors": []})]),
        ("an unknown dtype", [msgpack.packb({**good_header, "tensors": [{"name": "x", "dtype": "object",
                                                                       "shape": [1]}]}), b"\0" * 8]),
        ("an unknown model", [msgpack.packb({**good_header, "model": "nope"}), b"\0" * 8]),
    ]
    try:
        for what, frames in garbage:
            sock.send_multipart(frames)
            assert sock.poll(10_000), f"no reply to {what}"
            reply = msgpack.unpackb(sock.recv_multipart()[0])
            assert reply["ok"] is False, what
            assert reply["error"]["code"] in {"bad_input", "unknown_model"}, (what, reply)
            assert reply["error"]["message"], what
        with Client(proxy.zmq_url, timeout=30) as client:
            result = client.infer("echo", {"x": np.ones((1, 2), np.float32)})
        np.testing.assert_array_equal(result["x"], np.ones((1, 2), np.float32))
    finally:
        sock.close()


def test_unknown_model_over_zmq_client(proxy: ProxyProcess) -> None:
    with Client(proxy.zmq_url, timeout=30) as client, pytest.raises(InferenceError) as raised:
        client.infer("no-such-model", {"x": np.zeros((1,), np.float32)})
    assert raised.value.code == "unknown_model"


def test_killed_replica_fails_its_requests_and_is_replaced(tmp_path: Path) -> None:
    # Two requests: the replica's credit (Model.capacity, 2 batches) covers both, so the dead replica held
    # every one of them and each must fail with replica_lost at once. Requests it never held wait for the
    # replacement instead (tests/test_failures_end_to_end.py), which here would sleep for 30 s as well.
    models = tmp_path / "models.yaml"
    models.write_text(SLOW_MODELS)
    with ProxyProcess(env={"INFEROXY_MODELS_FILE": str(models)}) as proxy:
        (victim,) = wait_for(lambda: proxy.replica_pids("slow"), timeout=30, what="the slow replica")

        async def pending_then_kill() -> list[BaseException | dict]:
            async with AsyncClient(proxy.zmq_url, timeout=60) as client:
                calls = [asyncio.ensure_future(client.infer("slow", {"x": np.zeros((1, 1), np.float32)}))
                         for _ in range(2)]
                # The replica says when it starts sleeping on a batch: from then on it holds the requests.
                await asyncio.to_thread(proxy.wait_for_line, SLOW_MODEL_SLEEPING, 30)
                assert not any(call.done() for call in calls)
                os.kill(victim, signal.SIGKILL)
                return await asyncio.gather(*calls, return_exceptions=True)

        started = time.monotonic()
        results = asyncio.run(pending_then_kill())
        assert time.monotonic() - started < 20, "errors must come when the replica dies, not at a timeout"
        codes = [r.code for r in results if isinstance(r, InferenceError)]
        assert codes == ["replica_lost", "replica_lost"], results
        assert not alive(victim)

        (replacement,) = wait_for(lambda: proxy.replica_pids("slow"), timeout=30, what="a new slow replica")
        assert replacement != victim
        with Client(proxy.zmq_url, timeout=30) as client:
            np.testing.assert_array_equal(client.infer("echo", {"x": np.ones((1, 1), np.float32)})["x"], 1)


def test_serve_with_a_real_redis(real_redis_url: str, redis_prefix: str) -> None:
    with ProxyProcess(env={"INFEROXY_REDIS_URL": real_redis_url, "INFEROXY_REDIS_PREFIX": redis_prefix}) as proxy:
        assert "(embedded)" not in "".join(proxy.output)
        with Client(proxy.zmq_url, timeout=30) as client:
            result = client.infer("echo", {"x": np.arange(3, dtype=np.float64)[None]})
        np.testing.assert_array_equal(result["x"], np.arange(3, dtype=np.float64)[None])


def test_serve_in_one_process_over_inproc_endpoints() -> None:
    env = {"INFEROXY_BATCH_MANAGER_URL": "inproc://batch-manager", "INFEROXY_TASK_MANAGER_URL": "inproc://tasks"}
    with ProxyProcess(env=env, args=["--in-process"]) as proxy:
        with Client(proxy.zmq_url, timeout=30) as client:
            result = client.infer("echo", {"x": np.ones((2, 2), np.int16)})
        np.testing.assert_array_equal(result["x"], np.ones((2, 2), np.int16))


def test_sigterm_stops_everything() -> None:
    proxy = ProxyProcess().start()
    children = wait_for(lambda: proxy.replica_pids("echo") and proxy.pids(), timeout=30, what="replicas")
    assert len(children) >= 6, "supervisor children plus replicas"
    assert proxy.stop() == 0
    assert not [pid for pid in children if alive(pid)]
