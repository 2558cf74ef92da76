"""Limits the bridges enforce where a message is built, and what a slow or silent client may cost them.

Run against tests/bridge_harness.py (fake batch manager, fakeredis; the stack's message limit is
1 MiB). Each test names the hostile input it sends and the answer it must get instead of what
it got before: a name that blows the bus's header limit downstream, a tensor that only passes the
message limit once decoded, a client that never reads, a connection that never finishes its headers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
import zmq

from batch_manager.params import parse_params
from bridges.catalog import Catalog
from bridges.errors import RequestError
from bridges.grpc_bridge import InferenceServicer
from bridges.proto import grpc_predict_v2_pb2 as pb
from bridges.validation import check_parameters
from bridges.zmq_bridge import _Peer, send_tracked
from inferoxy.settings import Settings
from inferoxy.wire import WireError, encode, pack_header, unpack_header
from tests.bridge_harness import WAIT_S, BridgeStack
from tests.support import wait_for

LIMIT = 1 << 20  # the harness's max_message_bytes


@pytest.fixture(scope="module")
def stack() -> Iterator[BridgeStack]:
    stack = BridgeStack().start()
    yield stack
    stack.stop()


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def http(stack: BridgeStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.rest_url, timeout=WAIT_S) as client:
        yield client


@pytest.fixture
def channel(stack: BridgeStack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.grpc_url, options=[("grpc.max_send_message_length", -1)]) as channel:
        yield channel


def zmq_call(ctx: zmq.Context, url: str, frames: list[Any]) -> dict[str, Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    sock.send_multipart(frames)
    assert sock.poll(int(WAIT_S * 1000)), "no reply from the ZeroMQ bridge"
    reply = unpack_header(sock.recv_multipart()[0])
    sock.close()
    return reply


def grpc_infer(channel: grpc.Channel, request: pb.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    try:
        call(request.SerializeToString(), timeout=WAIT_S)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def rest_tensor(name: str, datatype: str, data: Any, shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


# -- names (item 2): at most 256 bytes, refused by the bridge before anything reaches the bus ------------


def test_rest_input_name_of_a_megabyte_is_refused_twice_and_the_model_still_serves(stack, http):
    # Before: both requests reached the batch manager, whose batch header then passed the bus's 1 MiB limit.
    before = len(stack.batch_manager.messages("infer"))
    body = {"inputs": [rest_tensor("n" * 1_000_000, "UINT8", [1])]}
    for _ in range(2):
        response = http.post("/v2/models/any/infer", content=orjson.dumps(body))
        assert response.status_code == 400, response.text
        assert "256" in response.json()["error"] and len(response.text) < 1000
    assert len(stack.batch_manager.messages("infer")) == before, "an oversized name reached the bus"
    ok = http.post("/v2/models/any/infer", content=orjson.dumps({"inputs": [rest_tensor("a", "UINT8", [1])]}))
    assert ok.status_code == 200, ok.text


def test_rest_output_name_too_long_is_refused(http):
    body = {"inputs": [rest_tensor("a", "UINT8", [1])], "outputs": [{"name": "o" * 300}]}
    response = http.post("/v2/models/any/infer", content=orjson.dumps(body))
    assert response.status_code == 400 and "256" in response.json()["error"], response.text


def test_zmq_input_model_and_version_names_too_long_are_bad_input(stack, ctx):
    long = "n" * 300
    cases = [
        encode({"id": 1, "model": "any"}, [(long, np.zeros(1, np.uint8))]),
        encode({"id": 2, "model": long}, [("a", np.zeros(1, np.uint8))]),
        encode({"id": 3, "model": "any", "version": long}, [("a", np.zeros(1, np.uint8))]),
    ]
    for frames in cases:
        reply = zmq_call(ctx, stack.zmq_url, frames)
        assert reply["error"]["code"] == "bad_input" and "256" in reply["error"]["message"], reply


def test_grpc_input_and_model_names_too_long_are_invalid_argument(channel):
    for model, name in (("any", "n" * 300), ("m" * 300, "a")):
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name=name, datatype="UINT8", shape=[1])
        request.raw_input_contents.append(b"\0")
        code, details = grpc_infer(channel, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "256" in details, (code, details)


# -- decoded size (item 2): computed from shape and datatype before decoding --------------------------


def test_rest_json_int64_that_passes_the_limit_once_decoded_is_refused(stack, http):
    # 200 000 zeros: a 400 KB body that decodes to 1.6 MB, past the 1 MiB message limit. Before: sent on.
    count = 200_000
    body = orjson.dumps({"inputs": [{"name": "a", "datatype": "INT64", "shape": [1, count], "data": [0] * count}]})
    assert len(body) < LIMIT
    response = http.post("/v2/models/any/infer", content=body)
    assert response.status_code == 400, response.text
    assert f"message limit of {LIMIT}" in response.json()["error"]


def test_grpc_int64_contents_that_pass_the_limit_once_decoded_are_invalid_argument(channel):
    # Packed varints of 0 take one byte each: 200 000 of them decode to 1.6 MB. Before: sent on.
    count = 200_000
    request = pb.ModelInferRequest(model_name="any")
    tensor = request.inputs.add(name="a", datatype="INT64", shape=[1, count])
    tensor.contents.int64_contents.extend([0] * count)
    code, details = grpc_infer(channel, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"message limit of {LIMIT}" in details, (code, details)


def test_gateway_logs_an_error_no_request_matches(stack, caplog):
    # The batch manager answers a request it could not read with "id": null; nobody waits for that answer,
    # so it must be logged loudly. Before: dropped without a word.
    gateway = stack.zmq_bridge.gateway

    async def inject() -> None:
        gateway._dispatch([pack_header({"t": "error", "id": None, "code": "bad_input", "message": "header too big"})])

    with caplog.at_level(logging.WARNING, logger="bridges.gateway"):
        stack.call(inject())
    errors = [r for r in caplog.records if r.name == "bridges.gateway" and r.levelno >= logging.ERROR]
    assert errors and "header too big" in errors[0].getMessage()


# -- small ones (item 6) -----------------------------------------------------------------------------


def test_grpc_typed_contents_with_65_dims_are_invalid_argument(channel):
    # Before: numpy's reshape raised and the client got INTERNAL.
    request = pb.ModelInferRequest(model_name="any")
    tensor = request.inputs.add(name="a", datatype="FP32", shape=[1] * 65)
    tensor.contents.fp32_contents.append(1.0)
    code, details = grpc_infer(channel, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)


def test_zmq_timeout_ms_of_2_pow_64_minus_1_is_bad_input(stack, ctx):
    # Before: accepted, then the deadline in µs overflowed msgpack and the client got `internal`.
    frames = encode({"id": 5, "model": "any", "timeout_ms": 2**64 - 1}, [("a", np.zeros(1, np.uint8))])
    reply = zmq_call(ctx, stack.zmq_url, frames)
    assert (reply["id"], reply["error"]["code"]) == (5, "bad_input"), reply
    assert "timeout_ms" in reply["error"]["message"]


@pytest.mark.parametrize(("what", "data", "phrase"), [
    ("1e39, beyond FP32's range (was returned as null)", [1e39], "must lie within"),
    ("[true, 1] (was accepted while [true, true] was refused)", [True, 1], "got booleans"),
    ("[true, true]", [True, True], "got booleans"),
    ("[1.5, false]", [1.5, False], "got booleans"),
])
def test_rest_fp32_data_out_of_range_or_boolean_is_refused(http, what, data, phrase):
    body = {"inputs": [rest_tensor("a", "FP32", data)]}
    response = http.post("/v2/models/any/infer", content=orjson.dumps(body))
    assert response.status_code == 400 and phrase in response.json()["error"], (what, response.text)


def test_rest_bool_tensors_take_booleans(http):
    body = {"inputs": [rest_tensor("a", "BOOL", [True, False])]}
    response = http.post("/v2/models/any/infer", content=orjson.dumps(body))
    assert response.status_code == 200 and response.json()["outputs"][0]["data"] == [True, False], response.text


def test_named_priorities_are_accepted_by_every_bridge(stack, http, ctx, channel):
    # Before: every bridge wanted an int, although the batch manager (and docs/BATCHING.md) take names.
    rest = http.post("/v2/models/any/infer", content=orjson.dumps(
        {"parameters": {"priority": "high"}, "inputs": [rest_tensor("a", "UINT8", [1])]}))
    assert rest.status_code == 200, rest.text
    reply = zmq_call(ctx, stack.zmq_url, encode({"id": 9, "model": "any", "parameters": {"priority": "low"}},
                                                [("a", np.zeros(1, np.uint8))]))
    assert reply["ok"], reply
    request = pb.ModelInferRequest(model_name="any")
    request.parameters["priority"].string_param = "high"
    request.inputs.add(name="a", datatype="UINT8", shape=[1])
    request.raw_input_contents.append(b"\0")
    assert grpc_infer(channel, request) == (grpc.StatusCode.OK, "")


def test_a_200_byte_sequence_id_is_refused_at_the_bridge(stack, http):
    # Before: the bridge sent it on and the batch manager refused it.
    before = len(stack.batch_manager.messages("infer"))
    body = {"parameters": {"sequence_id": "s" * 200}, "inputs": [rest_tensor("a", "UINT8", [1])]}
    response = http.post("/v2/models/any/infer", content=orjson.dumps(body))
    assert response.status_code == 400 and "sequence_id" in response.json()["error"], response.text
    assert len(stack.batch_manager.messages("infer")) == before


PARAMETER_SAMPLES: list[Any] = [
    {}, {"priority": "high"}, {"priority": "HIGH"}, {"priority": "urgent"}, {"priority": 1}, {"priority": 7},
    {"priority": -1}, {"priority": True}, {"priority": 2**64}, {"sequence_id": 5}, {"sequence_id": -5},
    {"sequence_id": "s" * 128}, {"sequence_id": "s" * 129}, {"sequence_id": 1.5}, {"sequence_id": 0,
    "sequence_start": "yes"}, {"sequence_id": 3, "sequence_end": 1}, {"timeout": 1000}, {"timeout": 0},
    {"timeout": 2**63}, {"timeout": "5"}, {"k" * 257: 1}, {"tag": "t" * 20_000}, {"tag": [1, 2, 3]},
]


@pytest.mark.parametrize("params", PARAMETER_SAMPLES, ids=range(len(PARAMETER_SAMPLES)))
def test_bridges_and_batch_manager_accept_and_refuse_the_same_parameters(params):
    # One reader (batch_manager/params.py) for all: before, the bridges had a table of their own that
    # disagreed with the batch manager's (names, sequence_id length, negative ids).
    try:
        parse_params(params)
        batch_manager_accepts = True
    except WireError:
        batch_manager_accepts = False
    try:
        check_parameters(params)
        bridge_accepts = True
    except RequestError as exc:
        assert exc.code == "bad_input"
        bridge_accepts = False
    assert bridge_accepts == batch_manager_accepts


# -- slow and silent clients (item 5) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tight() -> Iterator[BridgeStack]:
    """Bridges with small per-client bounds and a short REST header deadline."""
    stack = BridgeStack(client_max_outstanding=4, client_max_buffered_bytes=256 * 1024, http_header_timeout_s=0.5,
                        request_timeout_s=1.0)
    stack.start()
    yield stack
    stack.stop()


def test_zmq_client_that_never_reads_is_refused_overloaded_past_its_bound(tight, ctx):
    # 20 requests for "slow" (never answered) from one client that does not read. Before: all 20 went to the
    # batch manager, and a client with big requests grew the bridge without bound.
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(tight.zmq_url)
    for rid in range(20):
        sock.send_multipart(encode({"id": rid, "model": "slow", "timeout_ms": 2000}, [("a", np.zeros(1, np.uint8))]))
    replies: dict[int, dict[str, Any]] = {}
    while len(replies) < 20:
        assert sock.poll(int(WAIT_S * 1000)), f"only {len(replies)} of 20 requests were answered"
        reply = unpack_header(sock.recv_multipart()[0])
        assert reply["id"] not in replies, "a request was answered twice"
        replies[reply["id"]] = reply
    codes = sorted(r["error"]["code"] for r in replies.values())
    assert codes == ["deadline"] * 4 + ["overloaded"] * 16, codes
    assert "INFEROXY_CLIENT_MAX_OUTSTANDING" in next(
        r["error"]["message"] for r in replies.values() if r["error"]["code"] == "overloaded")
    sock.close()
    wait_for(lambda: tight.zmq_bridge.peers == 0, what="the bridge to forget the client")


def test_zmq_client_bytes_in_flight_are_bounded(tight, ctx):
    # Three 100 KB requests for "slow": the third would pass the 256 KiB per-client bound.
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(tight.zmq_url)
    for rid in range(3):
        sock.send_multipart(encode({"id": rid, "model": "slow", "timeout_ms": 1000},
                                   [("a", np.zeros(100_000, np.uint8))]))
    first = unpack_header(sock.recv_multipart()[0]) if sock.poll(int(WAIT_S * 1000)) else None
    assert first is not None and (first["id"], first["error"]["code"]) == (2, "overloaded"), first
    assert "INFEROXY_CLIENT_MAX_BUFFERED_BYTES" in first["error"]["message"]
    sock.close()


def test_zmq_large_reply_counts_against_its_client_until_the_client_reads_it(ctx):
    # What the bound counts for a client that does not read: a reply libzmq still holds. Over inproc the message
    # stays in the pipe until the client receives it, so the tracker says exactly when that happens.
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.copy_threshold = 4096  # as the bridge's: frames this large are sent without a copy, so trackable
    router.bind("inproc://tracked-replies")
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.IDENTITY, b"client")
    client.connect("inproc://tracked-replies")
    client.send(b"hello")
    router.recv_multipart()  # the route to the client exists from here
    peer = _Peer()
    tracker = send_tracked(router, [b"client", b"header", b"x" * 10_000])
    assert tracker is not None and not tracker.done
    peer.add(1, 10_000)
    peer.unsent.append((tracker, 10_000))
    peer.prune()
    assert (peer.requests, peer.bytes) == (1, 10_000), "an unread reply was let go of"
    client.recv_multipart()
    tracker.wait(WAIT_S)
    peer.prune()
    assert peer.idle
    assert send_tracked(router, [b"nobody", b"header"]) is None, "a reply for an unknown peer was queued"
    client.close()
    router.close()


def test_zmq_replies_for_a_client_that_is_gone_are_dropped_and_forgotten(tight, ctx):
    # The client leaves while its request waits; its deadline answer has nobody to go to.
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(tight.zmq_url)
    sock.send_multipart(encode({"id": 1, "model": "slow", "timeout_ms": 200}, [("a", np.zeros(1, np.uint8))]))
    wait_for(lambda: tight.zmq_bridge.peers == 1, what="the request to reach the bridge")
    sock.close()
    wait_for(lambda: tight.zmq_bridge.peers == 0, what="the bridge to forget the departed client")
    reply = zmq_call(ctx, tight.zmq_url, encode({"id": 2, "model": "any"}, [("a", np.zeros(1, np.uint8))]))
    assert reply["ok"], reply


def test_grpc_stream_past_its_bound_gets_resource_exhausted_on_the_stream(tight):
    # 12 requests for "slow" on one stream, sent without reading. Before: all 12 were taken.
    def requests() -> Iterator[bytes]:
        for index in range(12):
            request = pb.ModelInferRequest(model_name="slow", id=str(index))
            request.parameters["timeout"].int64_param = 1_000_000
            request.inputs.add(name="a", datatype="UINT8", shape=[1])
            request.raw_input_contents.append(b"\0")
            yield request.SerializeToString()

    with grpc.insecure_channel(tight.grpc_url) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        answers = list(stream(requests(), timeout=WAIT_S))
    assert len(answers) == 12 and len({a.infer_response.id for a in answers}) == 12
    errors = sorted(a.error_message.split("]")[0] + "]" for a in answers)
    assert errors == ["[DEADLINE_EXCEEDED]"] * 4 + ["[RESOURCE_EXHAUSTED]"] * 8, errors


def test_grpc_stream_whose_answers_are_not_read_is_not_read_either():
    # A client that keeps sending on a stream and reads one answer only. Before: the bridge read every request
    # and queued every answer (a stream that never read grew the bridge to 499 MB). Now it stops reading the
    # stream once the unread answers fill the bound, and HTTP/2 flow control holds the client back.
    # Driven on one event loop with instant answers, so what is pulled depends on scheduling only.
    gateway = types.SimpleNamespace(settings=Settings(client_max_outstanding=4), catalog=Catalog())
    servicer = InferenceServicer(gateway)  # type: ignore[arg-type]

    async def instant(
        raw: bytes, started: float, time_left_s: float | None, credential: str | None, ids: list[str] | None = None
    ) -> bytes:
        answer = pb.ModelInferResponse(id=pb.ModelInferRequest.FromString(raw).id)
        return pb.ModelStreamInferResponse(infer_response=answer).SerializeToString()

    servicer._infer = instant  # type: ignore[method-assign]
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:  # as good as endless: far more than any bound
        nonlocal pulled
        for _ in range(10_000):
            await asyncio.sleep(0)  # a network read gives the loop a turn
            pulled += 1
            yield pb.ModelInferRequest(id=str(pulled)).SerializeToString()

    async def scenario() -> int:
        context = types.SimpleNamespace(time_remaining=lambda: None, invocation_metadata=lambda: ())
        answers = servicer.model_stream_infer(endless(), context)
        await answers.__anext__()  # the one answer the client reads
        for _ in range(500):  # every task gets many turns; nothing here waits on time
            await asyncio.sleep(0)
        held = pulled
        await answers.aclose()
        return held

    # At most the bound in flight plus the bound unread (refusals included), and the one answer that was read.
    assert asyncio.run(scenario()) <= 2 * 4 + 2


def test_grpc_connection_bytes_in_flight_are_bounded(tight):
    # Unary calls share a connection's bound: three 100 KB calls for "slow" at once, the third refused.
    request = pb.ModelInferRequest(model_name="slow")
    request.parameters["timeout"].int64_param = 1_000_000
    request.inputs.add(name="a", datatype="UINT8", shape=[1, 100_000])
    request.raw_input_contents.append(b"\0" * 100_000)
    with grpc.insecure_channel(tight.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        futures = [call.future(request.SerializeToString(), timeout=WAIT_S) for _ in range(3)]
        codes = sorted(f.exception().code().name for f in futures)  # type: ignore[union-attr]
    assert codes == ["DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"], codes


def rest_port(stack: BridgeStack) -> int:
    return int(stack.rest_url.rsplit(":", 1)[1])


def test_rest_slowloris_header_is_closed_within_the_header_timeout(tight):
    # A partial request head, one more byte every 100 ms, never finished. Before: kept open for ever.
    # The pacing below is the attack itself, not synchronisation: the close is what is waited for.
    with socket.create_connection(("127.0.0.1", rest_port(tight)), timeout=WAIT_S) as conn:
        conn.sendall(b"POST /v2/models/any/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        conn.settimeout(0.1)
        closed = False
        for _ in range(int(WAIT_S / 0.1)):
            try:
                conn.sendall(b"a")
                if conn.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:  # reset by the server
                closed = True
                break
    assert closed, "the server kept a connection that never finished its headers"


def test_rest_connection_that_sends_nothing_is_closed(tight):
    with socket.create_connection(("127.0.0.1", rest_port(tight)), timeout=WAIT_S) as conn:
        assert conn.recv(1024) == b"", "the server answered or kept an idle connection"


def test_rest_client_that_leaves_mid_body_is_one_info_line(tight, caplog):
    # Content-Length promises 1000 bytes; 10 come, then the client hangs up. Before: ERROR with a traceback.
    with caplog.at_level(logging.INFO, logger="bridges.rest"):
        with socket.create_connection(("127.0.0.1", rest_port(tight)), timeout=WAIT_S) as conn:
            conn.sendall(b"POST /v2/models/any/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"inputs\":")
        gone = wait_for(lambda: [r for r in caplog.records
                                 if r.name == "bridges.rest" and "disconnected" in r.getMessage()],
                        what="the bridge to log the departed client")
    assert [(r.levelno, r.exc_info) for r in gone] == [(logging.INFO, None)], [r.getMessage() for r in gone]
    loud = [r.getMessage() for r in caplog.records if r.name.startswith("bridges") and r.levelno >= logging.WARNING]
    assert not loud, loud


def test_rest_body_that_never_finishes_gets_504_within_the_request_timeout(tight):
    # The head is complete, the body is 10 of 1000 bytes and no more come. Before: the bridge waited for ever.
    with socket.create_connection(("127.0.0.1", rest_port(tight)), timeout=WAIT_S) as conn:
        conn.sendall(b"POST /v2/models/any/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"inputs\":")
        answer = b""
        while not answer.endswith(b"}") and (chunk := conn.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 504"), answer
    assert b"did not arrive within 1s" in answer


def test_rest_image_query_parameter_of_5000_digits_is_bad_input(http):
    # int() refuses strings of more than 4300 digits; before, that ValueError was a 500 with a traceback.
    response = http.post("/v2/models/any/infer/image", params={"timeout": "9" * 5000}, content=b"not an image")
    assert response.status_code == 400 and "timeout" in response.json()["error"], response.text
