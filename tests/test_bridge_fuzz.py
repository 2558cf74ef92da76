"""Property-based tests: random, truncated and malformed requests at the REST, gRPC and ZeroMQ decoders.

Each must get a clear client error (HTTP 4xx, gRPC INVALID_ARGUMENT / NOT_FOUND, ZeroMQ
``bad_input`` / ``unknown_model``), never a 500 or a dead bridge: after every example a good
request still gets its answer. Runs against the in-process bridges (tests/bridge_harness.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import msgpack
import numpy as np
import orjson
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridges.proto import grpc_predict_v2_pb2 as pb
from inferoxy.client import Client
from tests.bridge_harness import WAIT_S, BridgeStack

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES", "FLOAT", "", "fp32"]
CLIENT_ERRORS_GRPC = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


@pytest.fixture(scope="module")
def http(stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.rest_url, timeout=WAIT_S) as client:
        yield client


@pytest.fixture(scope="module")
def channel(stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.grpc_url) as channel:
        yield channel


GOOD_JSON = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
                        {"name": "mask", "datatype": "BOOL", "shape": [1, 1], "data": [True]}]}


def rest_still_works(http: httpx.Client) -> None:
    response = http.post("/v2/models/echo/infer", content=orjson.dumps(GOOD_JSON))
    assert response.status_code == 200, response.text


# -- REST ------------------------------------------------------------------------------------------

shapes = st.lists(st.integers(-2, 5), max_size=4)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
                    st.text(max_size=5))
data = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6), max_leaves=20)
tensor = st.fixed_dictionaries(
    {"name": st.sampled_from(["x", "mask", "a", ""]), "datatype": st.sampled_from(DATATYPES), "shape": shapes},
    optional={"data": data, "parameters": st.one_of(
        st.fixed_dictionaries({"binary_data_size": st.integers(-1, 64)}), st.just([]))},
)
documents = st.fixed_dictionaries(
    {"inputs": st.lists(tensor, max_size=3)},
    optional={"id": st.one_of(st.text(max_size=4), st.integers(-(2**63), 2**63 - 1)),
              "parameters": st.dictionaries(st.sampled_from(["sequence_id", "sequence_start", "priority", "timeout",
                                                              "binary_data_output"]), scalars, max_size=3),
              "outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=3)}), max_size=2)},
)


@FUZZ
@given(document=documents, tail=st.binary(max_size=64), model=st.sampled_from(["echo", "any", "bytes", "nope"]))
def test_rest_random_tensors_get_4xx(stack, http, document, tail, model):
    body = orjson.dumps(document)
    headers = {"Inference-Header-Content-Length": str(len(body))} if tail else {}
    response = http.post(f"/v2/models/{model}/infer", content=body + tail, headers=headers)
    assert response.status_code in (200, 400, 404), response.text
    assert response.status_code == 200 or "error" in response.json()


@FUZZ
@given(garbage=st.binary(max_size=256), cut=st.integers(0, 200), header_length=st.one_of(
    st.none(), st.integers(-5, 400).map(str), st.sampled_from(["abc", "1e3", "+5", "9" * 40])))
def test_rest_garbage_truncated_bodies_and_headers_get_4xx(stack, http, garbage, cut, header_length):
    good = orjson.dumps(GOOD_JSON)
    for body in (garbage, good[:cut]):
        headers = {"Inference-Header-Content-Length": header_length} if header_length is not None else {}
        response = http.post("/v2/models/echo/infer", content=body, headers=headers)
        if body == good and header_length in (None, str(len(good))):
            continue
        assert response.status_code == 400, response.text
        assert response.json()["error"]
    rest_still_works(http)


def test_rest_oversized_headers_and_bodies(stack, http):
    response = http.post("/v2/models/echo/infer", content=orjson.dumps(GOOD_JSON),
                         headers={"X-Huge": "a" * 70_000})
    assert response.status_code == 200 or 400 <= response.status_code < 500  # served, or refused by uvicorn
    response = http.post("/v2/models/echo/infer", content=orjson.dumps(GOOD_JSON),
                         headers={"Inference-Header-Content-Length": "9" * 5000})
    assert response.status_code == 400 and "is not a byte count" in response.json()["error"]
    response = http.post("/v2/models/echo/infer", content=b"{" * (2 << 20))
    assert response.status_code == 400 and "limit" in response.json()["error"]
    rest_still_works(http)


# -- gRPC ------------------------------------------------------------------------------------------


def grpc_still_works(channel: grpc.Channel) -> None:
    request = pb.ModelInferRequest(model_name="any")
    request.inputs.add(name="a", datatype="INT8", shape=[1, 2])
    request.raw_input_contents.append(b"\x01\x02")
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=pb.ModelInferRequest.SerializeToString,
                                response_deserializer=pb.ModelInferResponse.FromString)
    assert infer(request, timeout=WAIT_S).raw_output_contents[0] == b"\x01\x02"


def raw_infer(channel: grpc.Channel, body: bytes) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
    try:
        call(body, timeout=WAIT_S)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@FUZZ
@given(garbage=st.binary(max_size=300))
def test_grpc_garbage_messages_are_invalid_argument(stack, channel, garbage):
    code, details = raw_infer(channel, garbage)
    assert code in CLIENT_ERRORS_GRPC, (code, details)
    grpc_still_works(channel)


@FUZZ
@given(
    inputs=st.lists(st.tuples(st.sampled_from(["a", "x", ""]), st.sampled_from(DATATYPES),
                              st.lists(st.integers(-3, 4), max_size=4), st.binary(max_size=40)), max_size=3),
    raw=st.booleans(), drop_raw=st.booleans(), model=st.sampled_from(["any", "echo", "bytes", "nope"]),
    params=st.dictionaries(st.sampled_from(["sequence_id", "sequence_start", "priority", "timeout"]),
                           st.one_of(st.booleans(), st.integers(-5, 2**40), st.text(max_size=3)), max_size=3),
)
def test_grpc_random_tensors_get_client_errors(stack, channel, inputs, raw, drop_raw, model, params):
    request = pb.ModelInferRequest(model_name=model)
    for key, value in params.items():
        kind = "bool_param" if isinstance(value, bool) else "int64_param" if isinstance(value, int) else "string_param"
        setattr(request.parameters[key], kind, value)
    for name, datatype, shape, payload in inputs:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if raw:
            request.raw_input_contents.append(payload)
        else:
            tensor.contents.int_contents.extend(payload[:5])
    if raw and drop_raw and request.raw_input_contents:
        del request.raw_input_contents[-1]
    body = request.SerializeToString()
    for sent in (body, body[: len(body) // 2]):
        code, details = raw_infer(channel, sent)
        assert code in CLIENT_ERRORS_GRPC | {grpc.StatusCode.OK}, (code, details)
    grpc_still_works(channel)


# -- ZeroMQ ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dealer(stack) -> Iterator[zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(stack.zmq_url)
    yield sock
    sock.close()
    ctx.term()


def zmq_still_works(stack: BridgeStack) -> None:
    with Client(stack.zmq_url, timeout=WAIT_S) as client:
        assert client.infer("any", {"a": np.ones((1, 2), np.int8)})["a"].tolist() == [[1, 1]]


def zmq_answer(sock: zmq.Socket, frames: list[bytes]) -> dict[str, Any]:
    sock.send_multipart(frames)
    assert sock.poll(int(WAIT_S * 1000)), "no answer from the ZeroMQ bridge"
    reply = sock.recv_multipart()
    if reply[0] == b"" and len(reply) > 1:  # an empty first frame was taken for a REQ delimiter, and echoed
        reply = reply[1:]
    return msgpack.unpackb(reply[0], raw=False)


wire_meta = st.fixed_dictionaries({
    "name": st.sampled_from(["a", "x", "", 5]),
    "dtype": st.sampled_from(["int8", "float32", "bytes", "uint64", "complex64", "object", None]),
    "shape": st.one_of(st.lists(st.integers(-2, 4), max_size=3), st.text(max_size=2)),
})


@FUZZ
@given(metas=st.lists(wire_meta, max_size=3), frames=st.lists(st.binary(max_size=40), max_size=4),
       model=st.sampled_from(["any", "echo", "bytes", "nope", 3]),
       params=st.one_of(st.none(), st.dictionaries(st.sampled_from(["sequence_id", "sequence_end", "timeout"]),
                                                   st.one_of(st.booleans(), st.integers(-3, 9), st.text(max_size=2)),
                                                   max_size=2)))
def test_zmq_random_messages_get_client_errors(stack, dealer, metas, frames, model, params):
    header = {"id": 1, "model": model, "tensors": metas}
    if params is not None:
        header["parameters"] = params
    reply = zmq_answer(dealer, [msgpack.packb(header), *frames])
    assert reply["ok"] or reply["error"]["code"] in ("bad_input", "unknown_model"), reply


@FUZZ
@given(garbage=st.lists(st.binary(max_size=64), min_size=1, max_size=3))
def test_zmq_garbage_frames_get_bad_input(stack, dealer, garbage):
    reply = zmq_answer(dealer, garbage)
    assert reply["ok"] is False and reply["error"]["code"] in ("bad_input", "unknown_model"), reply


def test_zmq_bridge_still_answers_after_the_fuzzing(stack):
    zmq_still_works(stack)
