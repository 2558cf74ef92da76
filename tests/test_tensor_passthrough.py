"""Raw tensor bytes pass from the bridges to the bus untouched, BYTES checked once, and one error base.

- ``wire.scan_bytes`` accepts exactly what ``wire.deserialize_bytes`` accepts, without a Python object
  per element; the batch manager's ``check_tensors`` only does what is O(1) per tensor.
- gRPC ``raw_input_contents`` of a large request become frames that are views of the received bytes;
  replies are written with each frame copied once, and parse back as the same message.
- REST binary data (BYTES included) becomes frames that are slices of the body.
- ``InferoxyError`` carries the code every bridge maps, in one table each.
"""

from __future__ import annotations

import tracemalloc

import grpc
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridges import grpc_codec, tensors
from bridges.errors import RequestError
from bridges.proto import grpc_predict_v2_pb2 as pb
from inferoxy.protocol import ErrorCode, InferoxyError
from inferoxy.wire import WireError, check_tensors, deserialize_bytes, scan_bytes


def serialized(items: list[bytes]) -> bytes:
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def accepts(check, frame: bytes, count: int) -> bool:
    try:
        check(frame, count)
    except WireError:
        return False
    return True


# -- the BYTES scanner --------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(st.binary(max_size=12), max_size=12),
    cut=st.integers(min_value=-6, max_value=6),
    count_shift=st.integers(min_value=-2, max_value=2),
    same_length=st.booleans(),
)
def test_scan_accepts_exactly_what_decoding_accepts(items, cut, count_shift, same_length):
    if same_length and items:  # the scanner's fast path: every element of one length
        items = [items[0]] * len(items)
    frame = serialized(items)
    frame = frame[:cut] if cut < 0 else frame + b"\x01" * cut
    count = max(0, len(items) + count_shift)
    assert accepts(scan_bytes, frame, count) == accepts(deserialize_bytes, frame, count)


@pytest.mark.parametrize(("frame", "count"), [
    (b"\x05\x00\x00\x00ab", 1),  # an element longer than what is left
    (b"\x01\x00", 1),  # a truncated length
    (b"\x01\x00\x00\x00a\x00\x00\x00\x00", 1),  # one element too many
    (serialized([b"ab", b"cd"])[:-1], 2),  # equal lengths, one byte short
    (serialized([b"ab", b"cd"]), 3),  # too few elements
])
def test_scan_says_what_is_wrong_as_decoding_does(frame, count):
    with pytest.raises(WireError) as scanned:
        scan_bytes(frame, count)
    with pytest.raises(WireError) as decoded:
        deserialize_bytes(frame, count)
    assert str(scanned.value) == str(decoded.value)


@pytest.mark.parametrize("lengths", ["equal", "varied"])
def test_scan_builds_no_object_per_element(lengths):
    count = 100_000
    items = [b"x" * (16 if lengths == "equal" else i % 31) for i in range(count)]
    frame = serialized(items)
    tracemalloc.start()
    try:
        scan_bytes(frame, count)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Decoding makes 100k bytes objects (over 3 MB); the scan holds a few small objects at a time.
    assert peak < 64 * 1024


def test_the_batch_managers_check_is_constant_time_and_the_bridges_scan():
    header = {"tensors": [{"name": "s", "dtype": "bytes", "shape": [2]}]}
    # Lengths that do not add up, but room for two 4-byte lengths: only the full scan can tell.
    inconsistent = b"\x09\x00\x00\x00abcd"
    assert check_tensors(header, [inconsistent]) == header["tensors"]
    with pytest.raises(WireError, match="tensor 's': BYTES element 0 claims 9 bytes"):
        check_tensors(header, [inconsistent], scan_bytes=True)
    # What O(1) can see is still refused: too few bytes for the element count.
    with pytest.raises(WireError, match="tensor 's': BYTES data of 7 bytes cannot hold 2 elements"):
        check_tensors(header, [b"\x00" * 7])


# -- gRPC: raw contents in and out ----------------------------------------------------------------------


def infer_request(image: np.ndarray, strings: list[bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="any", id="r1")
    request.parameters["priority"].int64_param = 1
    request.inputs.add(name="image", datatype="UINT8", shape=list(image.shape))
    request.raw_input_contents.append(image.tobytes())
    request.inputs.add(name="s", datatype="BYTES", shape=[1, len(strings)])
    request.raw_input_contents.append(serialized(strings))
    request.outputs.add(name="image")
    return request


def test_large_grpc_raw_contents_become_frames_without_a_copy():
    image = np.random.default_rng(0).integers(0, 255, (1, 160, 160, 3), dtype=np.uint8)
    strings = [b"a", b"", b"\xff" * 7]
    data = infer_request(image, strings).SerializeToString()
    assert len(data) >= grpc_codec.SPLIT_FROM_BYTES

    request, raws = grpc_codec.parse_infer_request(data)
    metas, frames = grpc_codec.decode_inputs(request, raws, 1 << 30)

    assert metas == [{"name": "image", "dtype": "uint8", "shape": [1, 160, 160, 3]},
                     {"name": "s", "dtype": "bytes", "shape": [1, 3]}]
    received = np.frombuffer(data, np.uint8)
    assert np.shares_memory(np.frombuffer(frames[0], np.uint8), received)  # a view of the received message
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), received)  # BYTES too: not re-encoded
    assert bytes(frames[0]) == image.tobytes() and bytes(frames[1]) == serialized(strings)
    # Everything else parsed as protobuf would have.
    whole = pb.ModelInferRequest.FromString(data)
    assert (request.model_name, request.id, request.parameters["priority"].int64_param) == ("any", "r1", 1)
    assert list(request.inputs) == list(whole.inputs) and list(request.outputs) == list(whole.outputs)


def test_small_grpc_requests_and_typed_contents_still_decode():
    small = infer_request(np.zeros((1, 2, 2, 3), np.uint8), [b"x"])
    request, raws = grpc_codec.parse_infer_request(small.SerializeToString())
    metas, frames = grpc_codec.decode_inputs(request, raws, 1 << 30)
    assert [bytes(f) for f in frames] == list(small.raw_input_contents)

    typed = pb.ModelInferRequest(model_name="any")
    tensor = typed.inputs.add(name="x", datatype="INT32", shape=[1, 3])
    tensor.contents.int_contents.extend([1, -2, 3])
    metas, frames = grpc_codec.decode_inputs(typed, [], 1 << 30)
    assert metas == [{"name": "x", "dtype": "int32", "shape": [1, 3]}]
    assert np.frombuffer(frames[0], np.int32).tolist() == [1, -2, 3]


@pytest.mark.parametrize("strings", [[b"ab", b"cdef"], [b"ab"]])
def test_malformed_grpc_bytes_contents_are_refused_at_the_bridge(strings):
    request = pb.ModelInferRequest(model_name="any")
    request.inputs.add(name="s", datatype="BYTES", shape=[1, 2])
    request.raw_input_contents.append(serialized(strings)[:-1])
    with pytest.raises(RequestError, match="input 's': BYTES") as refused:
        grpc_codec.decode_inputs(request, list(request.raw_input_contents), 1 << 30)
    assert refused.value.code == "bad_input"


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=300), st.integers(min_value=0, max_value=3))
def test_splitting_any_bytes_agrees_with_protobuf(prefix, copies):
    # A real request with a large raw input, with garbage in front: the split must give what protobuf gives,
    # or refuse it bad_input as protobuf does; it never raises anything else.
    body = infer_request(np.ones((1, 160, 160, 3), np.uint8), [b"s"] * copies).SerializeToString()
    data = prefix + body
    try:
        whole = pb.ModelInferRequest.FromString(data)
    except Exception:
        whole = None
    try:
        request, raws = grpc_codec.parse_infer_request(data)
    except RequestError as exc:
        assert whole is None and exc.code == "bad_input"
        return
    assert whole is not None
    assert [bytes(raw) for raw in raws] == list(whole.raw_input_contents)
    del whole.raw_input_contents[:]
    assert request == whole


def test_grpc_replies_copy_each_frame_once_and_parse_back():
    image = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    metas = [{"name": "image", "dtype": "float32", "shape": [2, 3, 4]},
             {"name": "s", "dtype": "bytes", "shape": [2]}]
    frames = [memoryview(image).cast("B"), serialized([b"x", b"yz"])]
    data = grpc_codec.encode_response("m", "1", "r1", None, metas, frames)
    response = pb.ModelInferResponse.FromString(data)
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "r1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("image", "FP32", [2, 3, 4]), ("s", "BYTES", [2])]
    assert list(response.raw_output_contents) == [image.tobytes(), serialized([b"x", b"yz"])]
    # Only the outputs asked for, in the order asked.
    picked = pb.ModelInferResponse.FromString(grpc_codec.encode_response("m", "1", "", ["s"], metas, frames))
    assert [o.name for o in picked.outputs] == ["s"] and list(picked.raw_output_contents) == [frames[1]]
    # A stream's answer wraps the same response, written in the same one copy.
    streamed = grpc_codec.encode_response("m", "1", "r1", None, metas, frames, stream=True)
    assert pb.ModelStreamInferResponse.FromString(streamed).infer_response == response


def test_a_large_tensor_round_trips_through_the_grpc_bridge_untouched(stack):
    image = np.random.default_rng(1).integers(0, 255, (1, 120, 160, 3), dtype=np.uint8)
    strings = [b"first", b"", b"\x00\xff"]
    request = infer_request(image, strings)
    del request.outputs[:]
    with grpc.insecure_channel(stack.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        response = pb.ModelInferResponse.FromString(call(request.SerializeToString(), timeout=10))
    assert list(response.raw_output_contents) == [image.tobytes(), serialized(strings)]
    assert [o.datatype for o in response.outputs] == ["UINT8", "BYTES"]


# -- REST binary data -------------------------------------------------------------------------------------


def test_rest_binary_inputs_are_slices_of_the_body_and_bytes_are_not_re_encoded():
    image = np.arange(24, dtype=np.uint8)
    strings = serialized([b"ab", b"c"])
    header = orjson.dumps({"inputs": [
        {"name": "i", "datatype": "UINT8", "shape": [24], "parameters": {"binary_data_size": 24}},
        {"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(strings)}},
    ]})
    body = header + image.tobytes() + strings
    parsed = tensors.parse_infer_request(body, len(header))
    received = np.frombuffer(body, np.uint8)
    assert all(np.shares_memory(np.frombuffer(frame, np.uint8), received) for frame in parsed.frames)
    assert [m["dtype"] for m in parsed.metas] == ["uint8", "bytes"]
    assert bytes(parsed.frames[1]) == strings


# -- one error base ---------------------------------------------------------------------------------------


def test_every_bridge_and_validator_error_is_an_inferoxy_error_with_its_code():
    for error in (RequestError(ErrorCode.OVERLOADED, "full"), WireError("bad header")):
        assert isinstance(error, InferoxyError)
    assert WireError("x").code == "bad_input" and WireError("x").http_status == 400
    assert RequestError(ErrorCode.RATE_LIMITED, "slow down").http_status == 429
    assert InferoxyError("a_code_from_a_newer_peer", "?").http_status == 500
    assert RequestError.of(WireError("bad")).code == "bad_input"


def test_the_grpc_table_maps_every_code():
    assert set(grpc_codec.STATUS_OF_CODE) == {code.value for code in ErrorCode}
    assert grpc_codec.status_of(RequestError("a_code_from_a_newer_peer", "?")) == grpc.StatusCode.INTERNAL


# -- the bridges' event loop --------------------------------------------------------------------------------


def test_the_rest_bridge_runs_on_uvloop_and_any_bridge_can():
    import uvloop

    from inferoxy.runner import BRIDGE_COMPONENTS, loop_factory
    from inferoxy.settings import Settings

    def gets_uvloop(name: str, settings: Settings) -> bool:
        factory = loop_factory(name, settings)
        if factory is None:
            return False
        loop = factory()
        try:
            return isinstance(loop, uvloop.Loop)
        finally:
            loop.close()

    default = Settings()
    assert gets_uvloop("rest_bridge", default)
    assert not gets_uvloop("grpc_bridge", default) and not gets_uvloop("zmq_bridge", default)
    assert all(gets_uvloop(name, Settings(bridge_event_loop="uvloop")) for name in BRIDGE_COMPONENTS.values())
    assert not gets_uvloop("rest_bridge", Settings(bridge_event_loop="asyncio"))
    # Never a component whose hot path is read from asyncio's selector.
    assert not gets_uvloop("batch_manager", Settings(bridge_event_loop="uvloop"))


def test_the_bridge_harness_runs_the_bridges_on_uvloop(stack):
    import uvloop

    assert isinstance(stack.loop, uvloop.Loop)
