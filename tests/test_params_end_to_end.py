"""Request parameters reach the model: the whole proxy (`inferoxy serve`), over REST, ZeroMQ and gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from examples.models.digits.threshold import NOT_SURE
from examples.train_digits import held_out_split
from inferoxy.client import AsyncClient, Client
from tests.support import ProxyProcess

MODELS = """
models:
  probe:
    model_class: tests.models_for_tests:ParamsProbeModel
    # Two rows fill a batch; the delay is long enough that two requests sent together always share one.
    max_batch_size: 2
    max_batch_delay_ms: 2000
  threshold:
    model_class: examples.models.digits.threshold:ThresholdDigitsModel
    description: Digits, answering -1 for rows less sure than the request's threshold parameter.
    max_batch_size: 32
    max_batch_delay_ms: 1
    inputs:
      - {name: image, datatype: FP32, shape: [64]}
"""


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    models = Path(tmp_path_factory.mktemp("models")) / "models.yaml"
    models.write_text(MODELS)
    with ProxyProcess(env={"INFEROXY_MODELS_FILE": str(models)}) as running:
        yield running


def rest_body(x: list[float], parameters: dict) -> dict:
    return {"inputs": [{"name": "x", "shape": [1, len(x)], "datatype": "FP32", "data": x}], "parameters": parameters}


def outputs_of(reply: dict) -> dict[str, list]:
    return {output["name"]: output["data"] for output in reply["outputs"]}


def test_two_rest_requests_in_one_batch_each_get_their_own_parameters(proxy: ProxyProcess) -> None:
    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=proxy.rest_url, timeout=60) as client:
            return await asyncio.gather(
                client.post("/v2/models/probe/infer", json=rest_body([1.0, 2.0], {"scale": 10, "priority": "high"})),
                client.post("/v2/models/probe/infer", json=rest_body([1.0, 2.0], {"scale": -1, "timeout": 30_000_000})))

    first, second = asyncio.run(both())
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    a, b = outputs_of(first.json()), outputs_of(second.json())
    assert a["batch_rows"] == b["batch_rows"] == [2]  # one batch held both
    assert (a["y"], b["y"]) == ([10.0, 20.0], [-1.0, -2.0])
    assert a["leaked"] == b["leaked"] == [False]  # priority and timeout are the proxy's, never the model's


def test_two_zmq_requests_in_one_batch_each_get_their_own_parameters(proxy: ProxyProcess) -> None:
    x = np.array([[3.0]], np.float32)

    async def both() -> list[dict[str, np.ndarray]]:
        async with AsyncClient(proxy.zmq_url, timeout=60) as client:
            return await asyncio.gather(client.infer("probe", {"x": x}, parameters={"scale": 2}),
                                        client.infer("probe", {"x": x}))

    with_scale, without = asyncio.run(both())
    assert with_scale["batch_rows"].tolist() == without["batch_rows"].tolist() == [2]
    assert (with_scale["y"].tolist(), without["y"].tolist()) == ([[6.0]], [[3.0]])


def test_the_threshold_example_over_rest_and_zmq(proxy: ProxyProcess) -> None:
    images = held_out_split()[0][:30].astype(np.float32)
    with Client(proxy.zmq_url, timeout=60) as client:
        everything = client.infer("threshold", {"image": images})
        surest = everything["probabilities"].max(axis=1)
        cut = float(np.median(surest))
        picky = client.infer("threshold", {"image": images}, parameters={"threshold": cut})
    assert NOT_SURE not in everything["label"]
    expected = np.where(surest >= cut, everything["label"], NOT_SURE)
    np.testing.assert_array_equal(picky["label"], expected)
    assert 0 < int((picky["label"] == NOT_SURE).sum()) < len(images)

    body = {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32",
                        "data": images.ravel().tolist()}], "parameters": {"threshold": cut}}
    response = httpx.post(f"{proxy.rest_url}/v2/models/threshold/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert outputs_of(response.json())["label"] == expected.tolist()


def test_a_grpc_request_s_parameters_reach_the_model_too(proxy: ProxyProcess) -> None:
    import grpc

    from bridges.proto import grpc_predict_v2_pb2 as pb
    from bridges.proto import grpc_predict_v2_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name="probe")
    request.parameters["scale"].double_param = 4.0
    request.parameters["priority"].string_param = "low"
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.array([[1.0, 2.0]], np.float32).tobytes())
    with grpc.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    outputs = {o.name: raw for o, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)}
    assert np.frombuffer(outputs["y"], np.float32).tolist() == [4.0, 8.0]
    assert np.frombuffer(outputs["leaked"], np.bool_).tolist() == [False]
