"""The real ``tritonclient`` package (HTTP and gRPC, blocking and asyncio), unchanged, against Inferoxy.

Most tests run against the in-process bridges and the fake batch manager (tests/bridge_harness.py),
which echoes inputs back and records every message, so what reaches the bus can be checked.
``test_real_proxy_*`` run against a whole ``inferoxy serve`` with the echo model, so BYTES and FP16
tensors cross the real batch manager and model runtime too.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.bridge_harness import WAIT_S
from tests.support import ProxyProcess, wait_for

Protocol = str  # "http" or "grpc"


def client_for(stack_or_proxy: Any, protocol: Protocol) -> Any:
    if protocol == "http":
        return httpclient.InferenceServerClient(stack_or_proxy.rest_url.removeprefix("http://"))
    return grpcclient.InferenceServerClient(stack_or_proxy.grpc_url)


def module_for(protocol: Protocol) -> Any:
    return httpclient if protocol == "http" else grpcclient


def make_input(protocol: Protocol, name: str, array: np.ndarray, binary: bool = True) -> Any:
    tensor = module_for(protocol).InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    if protocol == "http":
        tensor.set_data_from_numpy(array, binary_data=binary)
    else:
        tensor.set_data_from_numpy(array)
    return tensor


def status_of(error: InferenceServerException) -> str:
    return str(error.status())


PROTOCOLS = ["http", "grpc"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_and_server_metadata(stack, protocol):
    client = client_for(stack, protocol)
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    if protocol == "grpc":
        name, extensions = metadata.name, list(metadata.extensions)
    else:
        name, extensions = metadata["name"], metadata["extensions"]
    assert name == "inferoxy" and "binary_tensor_data" in extensions and "sequence" in extensions


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_model_metadata_and_readiness(stack, protocol):
    client = client_for(stack, protocol)
    metadata = client.get_model_metadata("echo", as_json=True) if protocol == "grpc" else client.get_model_metadata(
        "echo"
    )
    assert metadata["name"] == "echo" and metadata["versions"] == ["1", "2"]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]] == [
        ("x", "FP32", [-1, 3]),
        ("mask", "BOOL", [-1, -1]),
    ]
    assert client.is_model_ready("echo")  # ready
    assert client.is_model_ready("echo", "2")  # degraded still serves
    assert not client.is_model_ready("fail")  # failed
    assert not client.is_model_ready("any")  # no status reported yet
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nope")
    assert status_of(unknown.value) in ("404", "StatusCode.NOT_FOUND")


def test_rest_model_ready_says_why_not(stack):
    with httpx.Client(base_url=stack.rest_url) as http:
        assert http.get("/v2/models/echo/ready").status_code == 200
        failed = http.get("/v2/models/fail/ready")
        assert failed.status_code == 503 and "image inferoxy/fail not found" in failed.json()["error"]
        assert http.get("/v2/models/nope/ready").status_code == 404
        assert http.get("/v2/models/echo/versions/9/ready").status_code == 404


DTYPES = [np.bool_, np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64,
          np.float16, np.float32, np.float64]


# The gRPC client always sends raw contents, so JSON is an HTTP-only case; typed gRPC contents
# are tested with the stub below.
@pytest.mark.parametrize(("protocol", "binary"), [("http", True), ("http", False), ("grpc", True)],
                         ids=["http-binary", "http-json", "grpc"])
def test_infer_every_datatype_and_shape(stack, protocol, binary):
    client = client_for(stack, protocol)
    rng = np.random.default_rng(0)
    for index, dtype in enumerate(DTYPES):
        shape = [(1, 1), (2, 3), (3, 2, 2)][index % 3]
        values = rng.random(shape) * 100
        array = (values > 50) if dtype is np.bool_ else values.astype(dtype)
        if dtype is np.float16 and not binary:
            continue  # tritonclient refuses FP16 as JSON data
        result = client.infer("any", [make_input(protocol, "t", array, binary)], request_id=f"r{index}")
        out = result.as_numpy("t")
        assert out.dtype == array.dtype and out.shape == array.shape, dtype
        np.testing.assert_array_equal(out, array)
        response = result.get_response(as_json=True) if protocol == "grpc" else result.get_response()
        assert response["id"] == f"r{index}"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bytes_tensors(stack, protocol):
    client = client_for(stack, protocol)
    strings = np.array([[b"hello", b""], [b"\xff\x00bin", "é".encode()]], dtype=np.object_)
    for binary in (True, False) if protocol == "http" else (True,):
        array = strings if binary else np.array([[b"hello", b""], [b"plain", "é".encode()]], dtype=np.object_)
        tensor = make_input(protocol, "s", array, binary)
        outputs = None
        if protocol == "http":
            outputs = [httpclient.InferRequestedOutput("s", binary_data=True)]
        result = client.infer("any", [tensor], outputs=outputs)
        np.testing.assert_array_equal(result.as_numpy("s"), array)
    infer = stack.batch_manager.messages("infer")[-1]
    assert infer["tensors"][0]["dtype"] == "bytes"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_requested_outputs_and_request_id(stack, protocol):
    client = client_for(stack, protocol)
    module = module_for(protocol)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    mask = np.ones((2, 4), dtype=bool)
    outputs = [module.InferRequestedOutput("mask")]
    result = client.infer("echo", [make_input(protocol, "x", x), make_input(protocol, "mask", mask)],
                          outputs=outputs, request_id="my-id")
    assert result.as_numpy("x") is None
    np.testing.assert_array_equal(result.as_numpy("mask"), mask)
    response = result.get_response(as_json=True) if protocol == "grpc" else result.get_response()
    assert response["id"] == "my-id" and response["model_name"] == "echo"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sequence_parameters_reach_the_bus(stack, protocol):
    client = client_for(stack, protocol)
    a = np.zeros((1, 1), np.int32)
    client.infer("any", [make_input(protocol, "a", a)], sequence_id=42, sequence_start=True, priority=2,
                 timeout=2_000_000)
    client.infer("any", [make_input(protocol, "a", a)], sequence_id=42, sequence_end=True)
    first, second = stack.batch_manager.messages("infer")[-2:]
    assert {k: first["params"][k] for k in ("sequence_id", "sequence_start", "sequence_end", "priority")} == {
        "sequence_id": 42, "sequence_start": True, "sequence_end": False, "priority": 2}
    assert first["timeout_ms"] == 2000
    assert (second["params"]["sequence_id"], second["params"]["sequence_end"]) == (42, True)


ERRORS = [
    # model, inputs, HTTP status, gRPC status, phrase
    ("nope", {"a": np.zeros((1, 1), np.int8)}, "404", "NOT_FOUND", "unknown model 'nope'"),
    ("echo", {"x": np.zeros((1, 3), np.float64), "mask": np.ones((1, 1), bool)}, "400", "INVALID_ARGUMENT",
     "input 'x' must be FP32"),
    ("echo", {"x": np.zeros((1, 4), np.float32), "mask": np.ones((1, 1), bool)}, "400", "INVALID_ARGUMENT",
     "must have shape [batch, 3]"),
    ("busy", {"a": np.zeros((1, 1), np.int8)}, "429", "RESOURCE_EXHAUSTED", "queue full"),
    ("fail", {"a": np.zeros((1, 1), np.int8)}, "500", "INTERNAL", "predict raised ValueError"),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(("model", "inputs", "http_status", "grpc_status", "phrase"), ERRORS,
                         ids=[e[4] for e in ERRORS])
def test_errors_and_their_codes(stack, protocol, model, inputs, http_status, grpc_status, phrase):
    client = client_for(stack, protocol)
    tensors = [make_input(protocol, name, array) for name, array in inputs.items()]
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, tensors)
    expected = http_status if protocol == "http" else f"StatusCode.{grpc_status}"
    assert status_of(caught.value) == expected and phrase in caught.value.message()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_deadline(stack, protocol):
    client = client_for(stack, protocol)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("slow", [make_input(protocol, "a", np.zeros((1, 1), np.int8))], timeout=300_000)
    assert status_of(caught.value) in ("504", "StatusCode.DEADLINE_EXCEEDED")
    if protocol == "grpc":  # the client's own gRPC deadline is honoured too
        with pytest.raises(InferenceServerException) as caught:
            client.infer("slow", [make_input(protocol, "a", np.zeros((1, 1), np.int8))], client_timeout=0.3)
        assert status_of(caught.value) == "StatusCode.DEADLINE_EXCEEDED"


def test_grpc_stream_infer_with_sequences(stack):
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    results: list[Any] = []  # appended from the client's stream thread

    def callback(result: Any, error: Any) -> None:
        results.append((result, error))

    client.start_stream(callback)
    try:
        for step in range(3):
            client.async_stream_infer("any", [make_input("grpc", "a", np.full((1, 1), step, np.int32))],
                                      request_id=f"s{step}", sequence_id=7, sequence_start=step == 0,
                                      sequence_end=step == 2)
        client.async_stream_infer("nope", [make_input("grpc", "a", np.zeros((1, 1), np.int32))], request_id="bad")
        wait_for(lambda: len(results) == 4, timeout=10, what="four stream answers")
    finally:
        client.stop_stream()
    good = {r.get_response().id: r.as_numpy("a").item() for r, e in results if e is None}
    assert good == {"s0": 0, "s1": 1, "s2": 2}
    errors = [e for r, e in results if e is not None]
    assert len(errors) == 1 and "NOT_FOUND" in str(errors[0]) and "unknown model 'nope'" in str(errors[0])
    sent = [m["params"] for m in stack.batch_manager.messages("infer") if m["params"].get("sequence_id") == 7]
    assert [(p["sequence_start"], p["sequence_end"]) for p in sent[-3:]] == [(True, False), (False, False),
                                                                          (False, True)]


def test_grpc_typed_contents_health_and_reflection(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from bridges.proto import grpc_predict_v2_pb2 as pb
    from bridges.proto import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(stack.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="any", id="typed")
        request.inputs.add(name="i", datatype="INT16", shape=[1, 3], contents=pb.InferTensorContents(
            int_contents=[-5, 0, 300]))
        request.inputs.add(name="s", datatype="BYTES", shape=[1, 1], contents=pb.InferTensorContents(
            bytes_contents=[b"abc"]))
        response = stub.ModelInfer(request)
        assert response.id == "typed" and [o.datatype for o in response.outputs] == ["INT16", "BYTES"]
        assert np.frombuffer(response.raw_output_contents[0], np.int16).tolist() == [-5, 0, 300]
        request.inputs[0].contents.int_contents[2] = 40_000  # out of INT16's range
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(answers).list_services_response.service}
        assert "inference.GRPCInferenceService" in names and "grpc.health.v1.Health" in names


def test_asyncio_clients(stack):
    async def main() -> None:
        x = np.arange(12, dtype=np.float32).reshape(4, 3)
        mask = np.zeros((4, 2), bool)
        http = httpclient_aio.InferenceServerClient(stack.rest_url.removeprefix("http://"))
        grpc_aio = grpcclient_aio.InferenceServerClient(stack.grpc_url)
        try:
            assert await http.is_server_ready() and await grpc_aio.is_server_ready()
            for protocol, client in (("http", http), ("grpc", grpc_aio)):
                inputs = [make_input(protocol, "x", x), make_input(protocol, "mask", mask)]
                results = await asyncio.gather(*(client.infer("echo", inputs) for _ in range(8)))
                for result in results:
                    np.testing.assert_array_equal(result.as_numpy("x"), x)
                with pytest.raises(InferenceServerException):
                    await client.infer("nope", inputs)
        finally:
            await http.close()
            await grpc_aio.close()

    asyncio.run(main())


def test_rest_image_upload(stack):
    from PIL import Image

    pixels = np.random.default_rng(1).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    with httpx.Client(base_url=stack.rest_url) as http:
        raw = http.post("/v2/models/any/infer/image?sequence_id=3&sequence_start=true",
                        content=png.getvalue(), headers={"content-type": "image/png"})
        assert raw.status_code == 200, raw.text
        output = raw.json()["outputs"][0]
        assert (output["name"], output["datatype"], output["shape"]) == ("image", "UINT8", [1, 5, 7, 3])
        assert output["data"] == pixels.reshape(-1).tolist()
        assert stack.batch_manager.messages("infer")[-1]["params"] == {"sequence_id": 3, "sequence_start": True}
        form = http.post("/v2/models/any/infer/image?input=frame", files={"file": ("f.png", png.getvalue())})
        assert form.status_code == 200 and form.json()["outputs"][0]["name"] == "frame"
        assert http.post("/v2/models/any/infer/image", content=b"not an image").status_code == 400
        assert http.post("/v2/models/any/infer/image", content=png.getvalue()[:40]).status_code == 400
        # echo v1 declares x: FP32 [batch, 3]; an image is uint8 [1, H, W, 3]
        wrong = http.post("/v2/models/echo/infer/image?input=x", content=png.getvalue())
        assert wrong.status_code == 400 and "input 'x' must be FP32" in wrong.json()["error"]


# -- a whole proxy -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    proxy = ProxyProcess(env={"INFEROXY_BRIDGES": "rest,zmq,grpc"})
    proxy.grpc_url = f"127.0.0.1:{proxy.grpc_port}"  # type: ignore[attr-defined]
    with proxy:
        yield proxy


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_real_proxy_echo_round_trips_through_the_runtime(proxy, protocol):
    client = client_for(proxy, protocol)
    wait_for(lambda: client.is_model_ready("echo"), timeout=60, interval=0.2, what="echo to be ready")
    metadata = client.get_model_metadata("digits", as_json=True) if protocol == "grpc" else \
        client.get_model_metadata("digits")
    assert [t["name"] for t in metadata["inputs"]] == ["image"]
    inputs = {
        "f16": np.array([[0.5, -1.25]], np.float16),
        "u64": np.array([[2**63 + 5]], np.uint64),
        "s": np.array([[b"frame-1", b"\x00\xff"]], np.object_),
    }
    result = client.infer("echo", [make_input(protocol, name, array) for name, array in inputs.items()])
    for name, array in inputs.items():
        np.testing.assert_array_equal(result.as_numpy(name), array)


def test_a_cancelled_grpc_call_cancels_its_request(stack):
    # "slow" is never answered; the client cancels its call while it waits, and the batch manager
    # must be told to drop the request (rather than keep it until its deadline).
    from bridges.proto import grpc_predict_v2_pb2 as pb
    from bridges.proto import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(stack.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="slow", id="to-cancel")
        request.parameters["tag"].string_param = "grpc-cancel"
        request.inputs.add(name="a", datatype="FP32", shape=[1, 1])
        request.raw_input_contents.append(np.zeros((1, 1), np.float32).tobytes())
        call = stub.ModelInfer.future(request)
        infer = wait_for(lambda: next((m for m in stack.batch_manager.messages("infer")
                                       if m["params"].get("tag") == "grpc-cancel"), None),
                         timeout=WAIT_S, what="the request to reach the batch manager")
        call.cancel()
        wait_for(lambda: any((c["id"], c["sender"]) == (infer["id"], infer["sender"])
                             for c in stack.batch_manager.messages("cancel")),
                 timeout=WAIT_S, what="a cancel for the cancelled call's request")
    assert infer["timeout_ms"] > 1000, "cancelled because the client did, not because a deadline passed"
