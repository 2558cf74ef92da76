"""The ZeroMQ and REST bridges, run in-process against a fake batch manager and fakeredis.

Models (tests/bridge_harness.py): ``echo`` v1 declares x: FP32 [batch, 3] and mask: BOOL
[batch, any]; ``echo`` v2 declares x: INT64 [batch, any, 2]; ``any`` declares nothing. The
fake batch manager echoes inputs back, except for ``slow`` (never answers), ``late`` (answers
only after a cancel), ``fail`` (model_error), ``busy`` (overloaded) and ``garbled``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import numpy as np
import orjson
import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from bridges.errors import RequestError
from bridges.gateway import Gateway, Outcome, Reply
from inferoxy import messages as m
from inferoxy.client import Client, InferenceError
from inferoxy.wire import decode, encode, pack_header, unpack_header
from tests.bridge_harness import WAIT_S, BridgeStack
from tests.support import wait_for


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def dealer(ctx: zmq.Context, stack: BridgeStack, kind: int = zmq.DEALER) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(stack.zmq_url)
    return sock


def receive(sock: zmq.Socket, timeout: float = WAIT_S) -> list[bytes]:
    if not sock.poll(int(timeout * 1000)):
        raise AssertionError("no reply from the bridge")
    return sock.recv_multipart()


def echo_inputs(rows: int = 2) -> dict[str, np.ndarray]:
    return {
        "x": np.arange(rows * 3, dtype=np.float32).reshape(rows, 3),
        "mask": np.ones((rows, 4), dtype=bool),
    }


def echo_request(rid: Any, rows: int = 2, **fields: Any) -> list[Any]:
    return encode({"id": rid, "model": "echo", **fields}, list(echo_inputs(rows).items()))


def header(rid: Any = 7, model: Any = "echo", tensors: Any = None, **fields: Any) -> bytes:
    fields = {"id": rid, "model": model, "tensors": tensors if tensors is not None else [], **fields}
    return pack_header({k: v for k, v in fields.items() if v is not ...})


def meta(name: str, dtype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape}


X = meta("x", "float32", [1, 3])
MASK = meta("mask", "bool", [1, 2])
X_BYTES = b"\0" * 12
MASK_BYTES = b"\1\0"
BIG = 600 * 1024  # two of these exceed the stack's 1 MiB message limit; one does not

# What a client sends, the error code it must get, the id the error must carry, and a phrase of its message.
BAD_ZMQ_MESSAGES = [
    ("bytes that are not msgpack", [b"\xc1\xc1not msgpack"], "bad_input", None, "not valid msgpack"),
    ("a msgpack list as header", [msgpack.packb([1, 2])], "bad_input", None, "must be a msgpack map"),
    ("only an empty frame", [b""], "bad_input", None, "empty message"),
    ("a header with no id", [header(rid=..., tensors=[X, MASK]), X_BYTES, MASK_BYTES], "bad_input", None,
     "'id' is required"),
    ("a float id", [header(rid=1.5)], "bad_input", None, "'id' is required"),
    ("a 200-byte id", [header(rid="i" * 200)], "bad_input", None, "at most 128 bytes"),
    ("no model", [header(model=..., tensors=[X, MASK]), X_BYTES, MASK_BYTES], "bad_input", 7, "'model'"),
    ("a model that is an int", [header(model=3)], "bad_input", 7, "'model'"),
    ("a version that is an int", [header(version=2, tensors=[X, MASK]), X_BYTES, MASK_BYTES], "bad_input", 7,
     "'version' must be a string"),
    ("parameters that are a list", [header(parameters=[1], tensors=[X, MASK]), X_BYTES, MASK_BYTES],
     "bad_input", 7, "'parameters' must be a map"),
    ("a negative timeout_ms", [header(timeout_ms=-5, tensors=[X, MASK]), X_BYTES, MASK_BYTES], "bad_input", 7,
     "'timeout_ms' must be a positive integer"),
    ("tensors that are a map", [header(tensors={"x": 1})], "bad_input", 7, "'tensors' must be a list"),
    ("two tensors described, one frame sent", [header(tensors=[X, MASK]), X_BYTES], "bad_input", 7,
     "describes 2 tensors but 1 data frames"),
    ("8 bytes for a float32 [1, 3]", [header(tensors=[X, MASK]), b"\0" * 8, MASK_BYTES], "bad_input", 7,
     "needs 12 bytes, frame has 8"),
    ("a complex64 tensor", [header(tensors=[meta("x", "complex64", [1])]), b"\0" * 8], "bad_input", 7,
     "dtype 'complex64' is not one of"),
    ("two tensors of 600 KiB", [header(model="any", tensors=[meta("a", "uint8", [BIG]), meta("b", "uint8", [BIG])]),
                                b"\0" * BIG, b"\0" * BIG], "bad_input", 7, "more than the limit"),
    ("an unknown model", [header(model="nope", tensors=[X]), X_BYTES], "unknown_model", 7, "unknown model 'nope'"),
    ("an unknown version", [header(version="9", tensors=[X, MASK]), X_BYTES, MASK_BYTES], "unknown_model", 7,
     "has no version '9'; it has 1, 2"),
    ("x as float64", [header(tensors=[meta("x", "float64", [1, 3]), MASK]), b"\0" * 24, MASK_BYTES], "bad_input", 7,
     "input 'x' must be FP32 (float32), got FP64 (float64)"),
    ("x of shape [1, 4]", [header(tensors=[meta("x", "float32", [1, 4]), MASK]), b"\0" * 16, MASK_BYTES],
     "bad_input", 7, "input 'x' must have shape [batch, 3], got [1, 4]"),
    ("x without mask", [header(tensors=[X]), X_BYTES], "bad_input", 7, "needs input(s) 'mask'"),
    ("an extra input y", [header(tensors=[X, MASK, meta("y", "int8", [1])]), X_BYTES, MASK_BYTES, b"\0"],
     "bad_input", 7, "has no input 'y'"),
    ("x with 2 rows, mask with 1", [header(tensors=[meta("x", "float32", [2, 3]), MASK]), X_BYTES * 2, MASK_BYTES],
     "bad_input", 7, "share their leading (batch) dimension"),
    ("zero rows", [header(tensors=[meta("x", "float32", [0, 3]), meta("mask", "bool", [0, 2])]), b"", b""],
     "bad_input", 7, "must be at least 1"),
    ("a scalar with no batch dimension", [header(model="any", tensors=[meta("s", "int8", [])]), b"\0"],
     "bad_input", 7, "has shape []"),
    ("the same input twice", [header(model="any", tensors=[meta("a", "int8", [1]), meta("a", "int8", [1])]),
                              b"\0", b"\0"], "bad_input", 7, "given more than once"),
    ("uint8 for an input declared BYTES", [header(model="bytes", tensors=[meta("s", "uint8", [1, 1])]), b"\0"],
     "bad_input", 7, "input 's' must be BYTES (bytes), got UINT8 (uint8)"),
    # Room for the element's length, so only the bridge's full scan of the lengths (not the bus's O(1) check) sees it.
    ("BYTES whose lengths do not add up", [header(model="bytes", tensors=[meta("s", "bytes", [1, 1])]),
                                           b"\x09\x00\x00\x00abcd"], "bad_input", 7,
     "tensor 's': BYTES element 0 claims 9 bytes; only 4 are left"),
]


@pytest.mark.parametrize(
    ("what", "frames", "code", "rid", "phrase"), BAD_ZMQ_MESSAGES, ids=[m[0] for m in BAD_ZMQ_MESSAGES]
)
def test_zmq_bad_input_gets_an_error_and_a_concurrent_good_request_its_answer(
    stack, ctx, what, frames, code, rid, phrase
):
    bad, good = dealer(ctx, stack), dealer(ctx, stack)
    # Both in flight at once: the bad message first, then a good request from another client.
    bad.send_multipart(frames)
    good.send_multipart(echo_request("good"))

    answer_frames = receive(bad)
    if frames[0] == b"":  # taken for a REQ envelope's delimiter, so it comes back before the header
        assert answer_frames[0] == b""
        answer_frames = answer_frames[1:]
    reply = unpack_header(answer_frames[0])
    assert reply["ok"] is False, what
    assert reply["id"] == rid
    assert reply["error"]["code"] == code
    assert phrase in reply["error"]["message"]

    answer, outputs = decode(receive(good))
    assert answer["ok"] is True and answer["id"] == "good"
    np.testing.assert_array_equal(dict(outputs)["x"], echo_inputs()["x"])


def test_zmq_round_trip_forwards_frames_and_names_the_version(stack, ctx):
    sock = dealer(ctx, stack)
    sock.send_multipart(echo_request(41, rows=3, parameters={"sequence_id": 9}))
    reply, outputs = decode(receive(sock))
    assert reply["ok"] is True
    assert (reply["id"], reply["model"], reply["version"]) == (41, "echo", "1")
    assert [name for name, _ in outputs] == ["x", "mask"]
    for name, array in outputs:
        np.testing.assert_array_equal(array, echo_inputs(3)[name])

    # What the batch manager was asked: the resolved version, the parameters, the server's deadline.
    infer = next(m for m in stack.batch_manager.messages("infer") if m["params"] == {"sequence_id": 9})
    assert infer["model"] == "echo" and infer["version"] == "1"
    assert infer["timeout_ms"] == 5000
    assert infer["tensors"] == [meta("x", "float32", [3, 3]), meta("mask", "bool", [3, 4])]


def test_zmq_explicit_version_and_shorter_timeouts(stack, ctx):
    sock = dealer(ctx, stack)
    x = np.arange(2 * 5 * 2, dtype=np.int64).reshape(2, 5, 2)
    # both kinds of timeout: 800 ms and 300_000 us; the shorter wins
    sock.send_multipart(encode(
        {"id": "v2", "model": "echo", "version": "2", "timeout_ms": 800, "parameters": {"timeout": 300_000}},
        [("x", x)],
    ))
    reply, outputs = decode(receive(sock))
    assert (reply["ok"], reply["version"]) == (True, "2")
    np.testing.assert_array_equal(dict(outputs)["x"], x)
    infer = next(m for m in stack.batch_manager.messages("infer") if m["version"] == "2")
    assert infer["timeout_ms"] == 300


def test_zmq_timeout_ms_reaches_the_batch_manager_as_the_clients_own_deadline(stack, ctx):
    # Only `timeout_ms`, no parameters: the batch manager must still see a client-chosen deadline
    # (the `timeout` parameter), or the model's default deadline would replace it.
    sock = dealer(ctx, stack)
    inputs = [("x", np.ones((1, 3), np.float32)), ("mask", np.ones((1, 4), bool))]
    sock.send_multipart(encode({"id": "own-deadline", "model": "echo", "timeout_ms": 700}, inputs))
    reply, _ = decode(receive(sock))
    assert reply["ok"] is True, reply
    infer = next(m for m in stack.batch_manager.messages("infer") if (m["params"] or {}).get("timeout") == 700_000)
    assert infer["timeout_ms"] == 700


def test_zmq_pipelined_requests_on_one_dealer_are_matched_by_id(stack, ctx):
    sock = dealer(ctx, stack)
    for i in range(200):
        sock.send_multipart(encode({"id": f"r{i}", "model": "any"}, [("v", np.full((1, 4), i, np.int32))]))
    seen = {}
    for _ in range(200):
        reply, outputs = decode(receive(sock))
        seen[reply["id"]] = dict(outputs)["v"]
    assert sorted(seen) == sorted(f"r{i}" for i in range(200))
    for i in range(200):
        assert seen[f"r{i}"].tolist() == [[i] * 4]


def test_zmq_req_socket_gets_answers_and_errors(stack, ctx):
    sock = dealer(ctx, stack, zmq.REQ)
    sock.send_multipart(echo_request(5))
    reply, outputs = decode(receive(sock))  # REQ has taken the delimiter off again
    assert reply["ok"] is True and reply["id"] == 5
    np.testing.assert_array_equal(dict(outputs)["mask"], echo_inputs()["mask"])

    sock.send(b"\x93garbage")  # a REQ socket that gets no answer is stuck for good
    reply = unpack_header(receive(sock)[0])
    assert reply["ok"] is False and reply["id"] is None
    assert reply["error"]["code"] == "bad_input"


def test_zmq_frame_over_the_size_limit_drops_only_that_connection(stack, ctx):
    big = ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    # The monitor first: a connection made before it is watched never reports EVENT_CONNECTED.
    monitor = big.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    big.connect(stack.zmq_url)
    event = recv_monitor_message(monitor) if monitor.poll(int(WAIT_S * 1000)) else None
    assert event is not None and event["event"] == zmq.EVENT_CONNECTED

    # one 2 MiB frame, over the 1 MiB limit: libzmq drops the connection before the bridge sees it
    big.send_multipart([header(model="any", tensors=[meta("a", "uint8", [2 << 20])]), b"\0" * (2 << 20)])
    with Client(stack.zmq_url, timeout=WAIT_S) as client:
        out = client.infer("any", {"a": np.arange(4, dtype=np.uint8)[None]})
    assert out["a"].tolist() == [[0, 1, 2, 3]]
    assert monitor.poll(int(WAIT_S * 1000)), "the oversized sender was not disconnected"
    assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    big.disable_monitor()
    monitor.close()


def test_zmq_model_error_and_overload_pass_through(stack):
    with Client(stack.zmq_url, timeout=WAIT_S) as client:
        with pytest.raises(InferenceError) as failed:
            client.infer("fail", {"a": np.zeros((1, 1), np.float32)})
        assert (failed.value.code, failed.value.message) == ("model_error", "predict raised ValueError")
        with pytest.raises(InferenceError) as busy:
            client.infer("busy", {"a": np.zeros((1, 1), np.float32)})
        assert busy.value.code == "overloaded"


def test_zmq_garbled_batch_manager_reply_is_an_internal_error(stack):
    with Client(stack.zmq_url, timeout=WAIT_S) as client, pytest.raises(InferenceError) as caught:
        # the fake batch manager answers "garbled" with a header describing a tensor but no frame
        client.infer("garbled", {"a": np.zeros((1, 1), np.float32)})
    assert caught.value.code == "internal"


def test_zmq_deadline_gives_an_error_and_cancels_the_request(stack, ctx):
    sock = dealer(ctx, stack)
    # "slow" is never answered; the request asks for 300 ms
    sock.send_multipart(encode({"id": "s", "model": "slow", "timeout_ms": 300}, [("a", np.zeros((1, 1)))]))
    reply = unpack_header(receive(sock)[0])
    assert (reply["id"], reply["ok"], reply["error"]["code"]) == ("s", False, "deadline")
    assert "0.3s" in reply["error"]["message"]

    infer = next(m for m in stack.batch_manager.messages("infer") if m["model"] == "slow")
    wait_for(lambda: any(c["id"] == infer["id"] for c in stack.batch_manager.messages("cancel")),
             what="a cancel for the expired request")


def test_zmq_late_answer_after_the_deadline_is_dropped(stack, ctx):
    sock = dealer(ctx, stack)
    # "late" is answered only once the bridge cancels it, i.e. after its deadline
    sock.send_multipart(encode({"id": "late", "model": "late", "timeout_ms": 200}, [("a", np.ones((1, 1)))]))
    reply = unpack_header(receive(sock)[0])
    assert (reply["id"], reply["error"]["code"]) == ("late", "deadline")
    # the next request gets its own answer, not the late one
    sock.send_multipart(echo_request("next"))
    reply, _ = decode(receive(sock))
    assert (reply["id"], reply["ok"]) == ("next", True)
    assert sock.poll(0) == 0  # nothing else: the late answer never reached the client


# -- the gateway ----------------------------------------------------------------------------------


def test_gateway_refuses_beyond_its_bound_and_answers_all_on_close(stack):
    async def scenario() -> list[Outcome]:
        ctx = zmq.asyncio.Context()
        gateway = Gateway(stack.settings, ctx, max_outstanding=2)
        with pytest.raises(RequestError) as early:
            gateway.resolve("echo")
        assert early.value.code == "not_ready"  # no registry snapshot yet
        await gateway.start()
        await asyncio.wait_for(gateway.registry_loaded.wait(), WAIT_S)
        outcomes: list[Outcome] = []
        gateway.start_request("slow", "1", [], [], 30.0, outcomes.append)
        gateway.start_request("slow", "1", [], [], 30.0, outcomes.append)
        with pytest.raises(RequestError) as refused:
            gateway.start_request("slow", "1", [], [], 30.0, outcomes.append)
        assert refused.value.code == "overloaded"
        assert gateway.outstanding == 2
        await gateway.close()
        ctx.term()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert [o.code for o in outcomes if isinstance(o, RequestError)] == ["not_ready", "not_ready"]


def test_gateway_submit_returns_the_reply(stack):
    async def scenario() -> tuple[m.Reply, list[Any]]:
        ctx = zmq.asyncio.Context()
        gateway = Gateway(stack.settings, ctx)
        await gateway.start()
        try:
            return await gateway.submit("any", "1", [meta("a", "int8", [1])], [b"\x07"], 5.0)
        finally:
            await gateway.close()
            ctx.term()

    reply, frames = asyncio.run(scenario())
    assert reply == m.Reply(reply.id, "any", "1", [meta("a", "int8", [1])])
    assert [bytes(f) for f in frames] == [b"\x07"]
    assert isinstance(Reply(reply, frames), tuple)


# -- REST ----------------------------------------------------------------------------------------


def rest_tensor(name: str, datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


GOOD_REST = {
    "id": "r1",
    "inputs": [
        rest_tensor("x", "FP32", [2, 3], [[1, 2, 3], [4, 5, 6.5]]),
        rest_tensor("mask", "BOOL", [2, 1], [True, False]),
    ],
}


def test_rest_infer_round_trip(stack):
    response = httpx.post(f"{stack.rest_url}/v2/models/echo/infer", json=GOOD_REST)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "model_name": "echo",
        "model_version": "1",
        "id": "r1",
        "outputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1.0, 2.0, 3.0, 4.0, 5.0, 6.5]},
            {"name": "mask", "datatype": "BOOL", "shape": [2, 1], "data": [True, False]},
        ],
    }


def test_rest_versioned_infer_and_requested_outputs(stack):
    body = {"inputs": [rest_tensor("x", "INT64", [1, 2, 2], [1, 2, 3, 4])], "outputs": [{"name": "x"}]}
    response = httpx.post(f"{stack.rest_url}/v2/models/echo/versions/2/infer", json=body)
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["model_version"] == "2" and "id" not in document
    assert document["outputs"] == [{"name": "x", "datatype": "INT64", "shape": [1, 2, 2], "data": [1, 2, 3, 4]}]


def test_rest_binary_tensor_data(stack):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    json_part = (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[2,3],"parameters":{"binary_data_size":24}},'
        b'{"name":"mask","datatype":"BOOL","shape":[2,1],"data":[true,true]}],'
        b'"outputs":[{"name":"x","parameters":{"binary_data":true}}]}'
    )
    response = httpx.post(
        f"{stack.rest_url}/v2/models/echo/infer",
        content=json_part + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(json_part))},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    document = orjson.loads(response.content[:length])
    assert document["outputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}}
    ]
    np.testing.assert_array_equal(np.frombuffer(response.content[length:], np.float32).reshape(2, 3), x)


def test_rest_health_and_metadata(stack):
    with httpx.Client(base_url=stack.rest_url) as http:
        assert http.get("/v2/health/live").status_code == 200
        ready = http.get("/v2/health/ready")
        assert ready.status_code == 200 and ready.json() == {"ready": True}
        assert http.get("/v2").json()["name"] == "inferoxy"

        echo = http.get("/v2/models/echo")
        assert echo.status_code == 200
        assert echo.json() == {
            "name": "echo",
            "versions": ["1", "2"],
            "platform": "inferoxy",
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [-1, 3]},
                {"name": "mask", "datatype": "BOOL", "shape": [-1, -1]},
            ],
            "outputs": [
                {"name": "x", "datatype": "FP32", "shape": [-1, 3]},
                {"name": "mask", "datatype": "BOOL", "shape": [-1, -1]},
            ],
            "serving": {"state": "ready", "ready": True, "reason": "model echo/1 is ready", "replicas": 1, "target": 1,
                        "min": 1, "max": 1},
        }
        # A model the task manager reported failed says so, with the reason, in its metadata too.
        failed = http.get("/v2/models/fail").json()["serving"]
        assert (failed["state"], failed["ready"]) == ("failed", False)
        assert "image inferoxy/fail not found" in failed["reason"]
        v2 = http.get("/v2/models/echo/versions/2").json()
        assert v2["inputs"] == [{"name": "x", "datatype": "INT64", "shape": [-1, -1, 2]}]
        # The spec's metadata, beyond the protocol's fields (version 1 has none, and shows none above).
        assert (v2["description"], v2["framework"], v2["labels"]) == ("Echo, taking pairs.", "numpy",
                                                                      {"team": "vision", "stage": "beta"})
        # The scale as the task manager reported it: 1 replica ready of the 2 the autoscaler keeps.
        assert {k: v2["serving"][k] for k in ("state", "replicas", "target")} == {"state": "degraded", "replicas": 1,
                                                                                  "target": 2}
        unreported = http.get("/v2/models/bytes").json()["serving"]
        assert (unreported["state"], unreported["replicas"], unreported["target"]) == ("unknown", 0, None), \
            "no task manager reports it: no target to show"

        missing = http.get("/v2/models/nope")
        assert missing.status_code == 404 and missing.json() == {"error": "unknown model 'nope'"}
        assert http.get("/v2/models/echo/versions/9").status_code == 404
        nowhere = http.get("/v2/nowhere")
        assert nowhere.status_code == 404 and "error" in nowhere.json()
        wrong_method = http.get("/v2/models/echo/infer")
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def json_body(document: Any) -> bytes:
    return orjson.dumps(document)


# What is sent, to which model, the status it must get, and a phrase of the error.
BAD_REST = [
    ("malformed JSON", "echo", b'{"inputs": [', 400, "not valid JSON"),
    ("an unknown model", "nope", json_body(GOOD_REST), 404, "unknown model 'nope'"),
    ("BYTES data that are numbers", "any", json_body({"inputs": [rest_tensor("s", "BYTES", [1], [1])]}), 400,
     "BYTES data must be strings"),
    ("INT32 for an input declared BYTES", "bytes", json_body({"inputs": [rest_tensor("s", "INT32", [1, 1], [1])]}),
     400, "input 's' must be BYTES"),
    ("3 values for shape [2, 3]", "echo",
     json_body({"inputs": [rest_tensor("x", "FP32", [2, 3], [1, 2, 3]), GOOD_REST["inputs"][1]]}), 400,
     "holds 6 elements, 'data' has 3"),
    ("x as INT32 where FP32 is declared", "echo",
     json_body({"inputs": [rest_tensor("x", "INT32", [2, 3], [1] * 6), GOOD_REST["inputs"][1]]}), 400,
     "input 'x' must be FP32 (float32), got INT32 (int32)"),
    ("an output the model does not declare", "echo", json_body({**GOOD_REST, "outputs": [{"name": "z"}]}), 400,
     "has no output(s) 'z'"),
    ("a negative timeout parameter", "echo", json_body({**GOOD_REST, "parameters": {"timeout": -1}}), 400,
     "parameter 'timeout' (microseconds) must be a positive integer"),
    ("a model that raises", "fail", json_body({"inputs": [rest_tensor("a", "INT8", [1], [1])]}), 500,
     "predict raised ValueError"),
    ("a model whose queue is full", "busy", json_body({"inputs": [rest_tensor("a", "INT8", [1], [1])]}), 429,
     "queue full"),
    ("a 2 MiB body, over the 1 MiB limit", "any", b" " * (2 << 20), 400, "more than the limit of 1048576"),
    ("a model that never answers, with a 300 ms timeout", "slow",
     json_body({"inputs": [rest_tensor("a", "INT8", [1], [1])], "parameters": {"timeout": 300_000}}), 504,
     "no answer within"),
]


@pytest.mark.parametrize(("what", "model", "body", "status", "phrase"), BAD_REST, ids=[b[0] for b in BAD_REST])
def test_rest_errors_are_clear_and_do_not_hold_up_others(stack, what, model, body, status, phrase):
    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.rest_url, timeout=WAIT_S) as http:
            return await asyncio.gather(
                http.post(f"/v2/models/{model}/infer", content=body),
                http.post("/v2/models/echo/infer", json=GOOD_REST),
            )

    bad, good = asyncio.run(scenario())
    assert bad.status_code == status, (what, bad.text)
    assert bad.headers["content-type"] == "application/json"
    assert phrase in bad.json()["error"]
    if status == 429:
        assert bad.headers["retry-after"] == "1"
    assert good.status_code == 200 and good.json()["id"] == "r1"


def test_stopping_the_bridges_still_answers_requests_in_flight(ctx):
    """A request to "slow" with 0.5 s left when the ZeroMQ bridge is told to stop: it gets its deadline error
    (not silence), and the stop does not wait out the 5 s grace period."""
    stack = BridgeStack().start()
    try:
        sock = dealer(ctx, stack)
        sock.send_multipart(encode({"id": "inflight", "model": "slow", "timeout_ms": 500}, [("a", np.zeros((1, 1)))]))
        wait_for(lambda: stack.batch_manager.messages("infer"), what="the request to reach the batch manager")
        zmq_task = stack.tasks[0]
        stack.loop.call_soon_threadsafe(zmq_task.cancel)
        reply = unpack_header(receive(sock)[0])
        assert (reply["id"], reply["error"]["code"]) == ("inflight", "deadline")
        wait_for(zmq_task.done, timeout=4.0, what="the ZeroMQ bridge to stop once idle")
    finally:
        stack.tasks = stack.tasks[1:]  # already stopped
        stack.stop()


def test_rest_client_that_disconnects_cancels_its_request(stack):
    # A raw HTTP request for "slow" (never answered by the fake batch manager); the client hangs up
    # while it waits, and the batch manager must be told to drop the request.
    body = orjson.dumps({"parameters": {"tag": "hang-up"},
                         "inputs": [{"name": "a", "shape": [1, 1], "datatype": "FP32", "data": [0.5]}]})
    port = int(stack.rest_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as conn:
        conn.sendall(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        infer = wait_for(lambda: next((m for m in stack.batch_manager.messages("infer")
                                       if (m["params"] or {}).get("tag") == "hang-up"), None),
                         timeout=WAIT_S, what="the request to reach the batch manager")
    wait_for(lambda: any((c["id"], c["sender"]) == (infer["id"], infer["sender"])
                         for c in stack.batch_manager.messages("cancel")),
             timeout=WAIT_S, what="a cancel for the disconnected client's request")
    assert infer["timeout_ms"] > 1000, "cancelled because the client left, not because a deadline passed"
