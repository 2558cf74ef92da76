"""JSON tensors (Open Inference Protocol) <-> numpy <-> wire, as the REST bridge decodes and encodes them."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from bridges import rest_reply, tensors
from bridges.errors import RequestError
from inferoxy.wire import check_tensors, pack_header, unpack_header

# datatype, JSON data, expected numpy dtype
ROUND_TRIPS = [
    ("BOOL", [True, False, True, False], np.bool_),
    ("UINT8", [0, 1, 254, 255], np.uint8),
    ("UINT16", [0, 1, 65534, 65535], np.uint16),
    ("UINT32", [0, 1, 2**32 - 2, 2**32 - 1], np.uint32),
    ("UINT64", [0, 1, 2**63, 2**64 - 1], np.uint64),
    ("INT8", [-128, -1, 0, 127], np.int8),
    ("INT16", [-32768, -1, 0, 32767], np.int16),
    ("INT32", [-(2**31), -1, 0, 2**31 - 1], np.int32),
    ("INT64", [-(2**63), -1, 0, 2**63 - 1], np.int64),
    ("FP32", [0.5, -1.25, 3.0, 1e-3], np.float32),
    ("FP64", [0.1, -1e300, 3.0, 2.5e-8], np.float64),
]


def request(*inputs: Any, **fields: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **fields})


def tensor(name="x", datatype="FP32", shape=(2, 2), data=(1, 2, 3, 4), **fields) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": data, **fields}


def bad_input(body: bytes, header_length: int | None = None) -> str:
    with pytest.raises(RequestError) as caught:
        tensors.parse_infer_request(body, header_length)
    assert caught.value.code == "bad_input"
    assert caught.value.http_status == 400
    return caught.value.message


@pytest.mark.parametrize(("datatype", "data", "dtype"), ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS])
def test_each_datatype_round_trips_exactly(datatype, data, dtype):
    parsed = tensors.parse_infer_request(request(tensor("t", datatype, (2, 2), data)))
    (name, array), = parsed.inputs
    assert name == "t"
    assert array.dtype == np.dtype(dtype)
    assert array.shape == (2, 2)
    assert array.reshape(-1).tolist() == np.array(data, dtype).tolist()

    metas, frames = tensors.to_wire(parsed.inputs)
    assert check_tensors({"tensors": metas}, frames) == metas
    (_, back), = tensors.from_wire(metas, frames)
    np.testing.assert_array_equal(back, array)

    body, json_length = rest_reply.encode_infer_response("m", "1", parsed, [("t", back)])
    assert json_length is None
    out = orjson.loads(body)["outputs"][0]
    assert out == {"name": "t", "datatype": datatype, "shape": [2, 2], "data": data}


def test_nested_and_flat_data_give_the_same_array():
    flat = tensors.parse_infer_request(request(tensor(shape=(2, 3), data=[1, 2, 3, 4, 5, 6])))
    nested = tensors.parse_infer_request(request(tensor(shape=(2, 3), data=[[1, 2, 3], [4, 5, 6]])))
    np.testing.assert_array_equal(flat.inputs[0][1], nested.inputs[0][1])
    assert flat.inputs[0][1].tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]


def test_request_fields_are_kept():
    body = request(
        tensor(),
        id="req-7",
        parameters={"timeout": 5000, "sequence_id": 3},
        outputs=[{"name": "y"}, {"name": "z", "parameters": {"binary_data": True}}],
    )
    parsed = tensors.parse_infer_request(body)
    assert parsed.id == "req-7"
    assert parsed.parameters == {"timeout": 5000, "sequence_id": 3}
    assert parsed.outputs == ["y", "z"]
    assert parsed.binary_outputs == frozenset({"z"})


def test_response_echoes_id_and_keeps_only_requested_outputs():
    parsed = tensors.parse_infer_request(request(tensor(), id="abc", outputs=[{"name": "b"}]))
    outputs = [("a", np.zeros((1, 2), np.float32)), ("b", np.array([[7]], np.int32))]
    body, _ = rest_reply.encode_infer_response("m", "3", parsed, outputs)
    assert orjson.loads(body) == {
        "model_name": "m",
        "model_version": "3",
        "id": "abc",
        "outputs": [{"name": "b", "datatype": "INT32", "shape": [1, 1], "data": [7]}],
    }


def test_requesting_an_output_the_model_did_not_produce_is_an_error():
    parsed = tensors.parse_infer_request(request(tensor(), outputs=[{"name": "nope"}]))
    with pytest.raises(RequestError, match="no output.*'nope'"):
        rest_reply.encode_infer_response("m", "1", parsed, [("a", np.zeros((1,), np.float32))])


def test_float16_outputs_are_written_as_numbers():
    parsed = tensors.parse_infer_request(request(tensor()))
    body, _ = rest_reply.encode_infer_response("m", "1", parsed, [("h", np.array([0.5, 2.0], np.float16))])
    assert orjson.loads(body)["outputs"][0] == {"name": "h", "datatype": "FP16", "shape": [2], "data": [0.5, 2.0]}


def test_binary_data_extension_in_and_out():
    raw = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = orjson.dumps({
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": raw.nbytes}},
            tensor("k", "INT8", (1,), [5]),
        ],
        "parameters": {"binary_data_output": True},
    })
    parsed = tensors.parse_infer_request(header + raw.tobytes(), len(header))
    np.testing.assert_array_equal(parsed.inputs[0][1], raw)
    assert parsed.inputs[1][1].tolist() == [5]

    body, json_length = rest_reply.encode_infer_response("m", "1", parsed, parsed.inputs)
    assert json_length is not None
    document = orjson.loads(body[:json_length])
    sizes = [out["parameters"]["binary_data_size"] for out in document["outputs"]]
    assert sizes == [24, 1]
    assert "data" not in document["outputs"][0]
    assert body[json_length:] == raw.tobytes() + b"\x05"


BAD_REQUESTS = [
    ("malformed JSON", b'{"inputs": [', "not valid JSON"),
    ("a JSON list", b"[1, 2]", "must be a JSON object"),
    ("no inputs", orjson.dumps({"inputs": []}), "'inputs' must be a non-empty list"),
    ("inputs not a list", orjson.dumps({"inputs": {"x": 1}}), "'inputs' must be a non-empty list"),
    ("an input that is a string", request("x"), "input 0 must be a JSON object"),
    ("an input without a name", request({"datatype": "FP32", "shape": [1], "data": [1]}), "'name'"),
    ("an unknown datatype", request(tensor(datatype="FLOAT")), "datatype 'FLOAT' is not one of"),
    ("BYTES as numbers", request(tensor(datatype="BYTES")), "BYTES data must be strings, got int"),
    ("BYTES with too few strings", request(tensor(datatype="BYTES", data=["a", "b"])),
     "holds 4 elements, 'data' has 2"),
    ("BYTES with null", request(tensor(datatype="BYTES", data=["a", None, "c", "d"])), "got null"),
    ("a negative dimension", request(tensor(shape=(-1, 4))), "'shape' must be a list"),
    ("a string dimension", request(tensor(shape=("2", 2))), "'shape' must be a list"),
    ("too few elements", request(tensor(shape=(2, 3))), "shape [2, 3] holds 6 elements, 'data' has 4"),
    ("too many elements", request(tensor(shape=(1, 2))), "shape [1, 2] holds 2 elements, 'data' has 4"),
    ("ragged nested data", request(tensor(shape=(2, 2), data=[[1, 2], [3]])), "nested lists of equal length"),
    ("no data", request({"name": "x", "datatype": "FP32", "shape": [1]}), "'data' is missing"),
    ("strings as FP32", request(tensor(data=["1", "2", "3", "4"])), "FP32 data must be numbers, got strings"),
    ("null in FP32", request(tensor(data=[1.0, None, 3.0, 4.0])), "FP32 data must be numbers"),
    ("booleans as FP32", request(tensor(data=[True, False, True, True])), "got booleans"),
    ("floats as INT32", request(tensor(datatype="INT32", data=[1.5, 2, 3, 4])), "INT32 data must be integers"),
    ("numbers as BOOL", request(tensor(datatype="BOOL", data=[1, 0, 1, 0])), "BOOL data must be true/false"),
    ("300 as UINT8", request(tensor(datatype="UINT8", data=[1, 2, 3, 300])), "must lie in [0, 255]"),
    ("-1 as UINT32", request(tensor(datatype="UINT32", data=[-1, 2, 3, 4])), "must lie in [0, 4294967295]"),
    ("-1 beside 2**63 as UINT64", request(tensor(datatype="UINT64", data=[-1, 2**63, 0, 0])), "must lie in [0, "),
    ("2**63 as INT64", request(tensor(datatype="INT64", data=[2**63, 0, 0, 0])), "must lie in [-9223372036854775808"),
    ("a float beside 2**63 as UINT64", request(tensor(datatype="UINT64", data=[0.5, 2**63, 0, 0])),
     "got values of type float"),
    ("null beside 2**63 as UINT64", request(tensor(datatype="UINT64", data=[None, 2**63, 0, 0])),
     "got values of type null"),
    ("an id that is a number", request(tensor(), id=5), "'id' must be a string"),
    ("parameters that are a list", request(tensor(), parameters=[1]), "'parameters' must be a JSON object"),
    ("outputs without names", request(tensor(), outputs=[{"nom": "y"}]), "output 0 must be an object"),
]


@pytest.mark.parametrize(("what", "body", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_clear_errors(what, body, message):
    assert message in bad_input(body), what


def test_binary_sizes_must_fit_the_body():
    header = orjson.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]
    })
    # 4 bytes where 8 are announced
    assert "does not fit" in bad_input(header + b"\0" * 4, len(header))
    # 8 bytes announced, but the shape needs 2 x 4 = 8 ... with FP64 it needs 16
    header64 = header.replace(b"FP32", b"FP64")
    assert "needs 16 bytes, got 8" in bad_input(header64 + b"\0" * 8, len(header64))
    # bytes nobody claims
    assert "no input claims" in bad_input(header + b"\0" * 12, len(header))
    # a header length past the end of the body
    assert "does not fit a body" in bad_input(header, len(header) + 1)


def test_wire_frames_are_the_arrays_buffers():
    array = np.arange(12, dtype=np.int16).reshape(3, 4)
    metas, frames = tensors.to_wire([("a", array)])
    assert metas == [{"name": "a", "dtype": "int16", "shape": [3, 4]}]
    assert bytes(frames[0]) == array.tobytes()
    assert np.shares_memory(np.frombuffer(frames[0], np.int16), array)
    # an empty tensor still has a (zero-length) frame, and survives the wire codec
    metas, frames = tensors.to_wire([("e", np.zeros((2, 0), np.float32))])
    header = unpack_header(pack_header({"tensors": metas}))
    assert check_tensors(header, frames)[0]["shape"] == [2, 0]


def test_bytes_tensors_from_json_and_binary_and_back():
    serialized = b"".join(len(v).to_bytes(4, "little") + v for v in (b"ab", b"", b"\xff\x00"))
    header = orjson.dumps({
        "inputs": [
            tensor("s", "BYTES", (2, 2), [["x", "yz"], ["", "é"]]),
            {"name": "b", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(serialized)}},
        ],
        "outputs": [
            {"name": "s", "parameters": {"binary_data": False}},
            {"name": "b", "parameters": {"binary_data": True}},
        ],
    })
    parsed = tensors.parse_infer_request(header + serialized, len(header))
    assert parsed.inputs[0][1].tolist() == [[b"x", b"yz"], [b"", "é".encode()]]
    assert parsed.inputs[1][1].tolist() == [b"ab", b"", b"\xff\x00"]
    metas, frames = tensors.to_wire(parsed.inputs)
    assert [m["dtype"] for m in metas] == ["bytes", "bytes"] and bytes(frames[1]) == serialized
    body, json_length = rest_reply.encode_infer_response("m", "1", parsed, tensors.from_wire(metas, frames))
    assert json_length is not None
    document = orjson.loads(body[:json_length])
    assert document["outputs"][0] == {"name": "s", "datatype": "BYTES", "shape": [2, 2], "data": ["x", "yz", "", "é"]}
    assert document["outputs"][1]["parameters"] == {"binary_data_size": len(serialized)}
    assert body[json_length:] == serialized


@pytest.mark.parametrize("raw", [b"\x05\x00\x00\x00ab", b"\x01\x00", b"\x01\x00\x00\x00a\x00\x00\x00\x00"])
def test_malformed_binary_bytes_tensors_are_refused(raw: bytes):
    header = orjson.dumps({"inputs": [{"name": "b", "datatype": "BYTES", "shape": [1],
                                       "parameters": {"binary_data_size": len(raw)}}]})
    with pytest.raises(RequestError, match="input 'b': BYTES"):
        tensors.parse_infer_request(header + raw, len(header))


def test_fp16_in_json_and_binary():
    half = np.array([0.5, -2.0, 65504.0], np.float16)
    header = orjson.dumps({"inputs": [
        tensor("j", "FP16", (3,), [0.5, -2.0, 65504.0]),
        {"name": "b", "datatype": "FP16", "shape": [3], "parameters": {"binary_data_size": half.nbytes}},
    ]})
    parsed = tensors.parse_infer_request(header + half.tobytes(), len(header))
    for _, array in parsed.inputs:
        assert array.dtype == np.float16
        np.testing.assert_array_equal(array, half)
