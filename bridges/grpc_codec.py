"""gRPC messages <-> the wire: the Open Inference Protocol's protobuf messages as tensor descriptions and frames.

Raw tensor bytes are never copied or decoded on their way through. A large ``ModelInferRequest`` is
split before protobuf parses it: its ``raw_input_contents`` (field 7) are cut out of the received
bytes as memoryviews, which become the ZeroMQ frames as they are, and only the rest (names, shapes,
parameters: a few hundred bytes) goes through protobuf. Parsing it all would copy each tensor twice
(into protobuf's arena, then out into a ``bytes`` on access). Replies are written the same way in
reverse: protobuf serializes the small part, and each output's frame is appended as a
``raw_output_contents`` field (protobuf merges concatenated messages), so a tensor is copied once,
into the answer (a stream's answer too: its wrapper is written in front in the same copy). BYTES
tensors are in Triton's serialization on both sides, the wire form too, so they are checked
(``wire.scan_bytes``) and passed on, never turned into Python objects.

Also here: the one table from error codes to gRPC status codes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from bridges import tensors
from bridges.errors import RequestError
from bridges.proto import grpc_predict_v2_pb2 as pb
from bridges.validation import check_name
from inferoxy.protocol import ErrorCode
from inferoxy.wire import Frame, frame_buffer
from model_manager.spec import ModelSpec, TensorSpec

STATUS_OF_CODE: dict[str, grpc.StatusCode] = {
    ErrorCode.BAD_INPUT.value: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNKNOWN_MODEL.value: grpc.StatusCode.NOT_FOUND,
    ErrorCode.NOT_READY.value: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.OVERLOADED.value: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE.value: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.REPLICA_LOST.value: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.SESSION_LOST.value: grpc.StatusCode.ABORTED,
    ErrorCode.UNAVAILABLE.value: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.MODEL_ERROR.value: grpc.StatusCode.INTERNAL,
    ErrorCode.INTERNAL.value: grpc.StatusCode.INTERNAL,
    ErrorCode.UNAUTHENTICATED.value: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.FORBIDDEN.value: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.RATE_LIMITED.value: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# Which typed ``InferTensorContents`` field carries each datatype; FP16 has none (raw contents only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# Requests smaller than this are parsed by protobuf alone: copying their tensors costs less than splitting.
SPLIT_FROM_BYTES = 64 * 1024
# A request with more top-level fields than this is parsed by protobuf alone, so the split (a Python loop)
# stays bounded whatever a client sends. Real requests have a few per input.
MAX_SPLIT_FIELDS = 1024
_RAW_INPUT_CONTENTS = 7  # ModelInferRequest
_RAW_OUTPUT_TAG = bytes([6 << 3 | 2])  # ModelInferResponse.raw_output_contents, length-delimited
_INFER_RESPONSE_TAG = bytes([2 << 3 | 2])  # ModelStreamInferResponse.infer_response


def status_of(error: RequestError) -> grpc.StatusCode:
    return STATUS_OF_CODE.get(error.code, grpc.StatusCode.INTERNAL)


def _bad(message: str) -> RequestError:
    return RequestError(ErrorCode.BAD_INPUT, message)


# -- requests ----------------------------------------------------------------------------------------


def parse_infer_request(data: bytes) -> tuple[pb.ModelInferRequest, list[Frame]]:
    """The request and its raw input contents, as views of ``data`` for a large request (no copy)."""
    if len(data) >= SPLIT_FROM_BYTES:
        split = _split_raw_inputs(data)
        if split is not None:
            rest, raws = split
            return _parse(rest), raws
    request = _parse(data)
    return request, list(request.raw_input_contents)


def _parse(data: bytes | memoryview) -> pb.ModelInferRequest:
    try:
        return pb.ModelInferRequest.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise _bad(f"the request is not a valid ModelInferRequest message: {exc}") from None


def _split_raw_inputs(data: bytes) -> tuple[bytes, list[Frame]] | None:
    """``data`` without its field 7 entries, and those entries' bytes as views; None when ``data`` is not a
    well-formed message or has too many fields (protobuf then parses it, and says what is wrong)."""
    view = memoryview(data)
    size = len(data)
    raws: list[Frame] = []
    kept: list[memoryview] = []
    keep_from = position = 0
    for _ in range(MAX_SPLIT_FIELDS):
        if position >= size:
            break
        field_start = position
        tag, position = _varint(data, position)
        kind = tag & 7
        if kind == 2:
            length, position = _varint(data, position)
            end = position + length
            if end > size:
                return None
            if tag >> 3 == _RAW_INPUT_CONTENTS:
                kept.append(view[keep_from:field_start])
                raws.append(view[position:end])
                keep_from = end
            position = end
        elif kind == 0:
            _, position = _varint(data, position)
        elif kind == 1:
            position += 8
        elif kind == 5:
            position += 4
        else:  # groups (3, 4) appear nowhere in this protocol
            return None
        if position > size:
            return None
    else:
        if position < size:
            return None
    if not raws:
        return data, raws
    kept.append(view[keep_from:])
    return b"".join(kept), raws


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            return -1, len(data) + 1  # past the end: the caller sees a malformed message
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def decode_inputs(
    request: pb.ModelInferRequest, raw: Sequence[Frame], max_bytes: int | None = None
) -> tuple[list[dict[str, Any]], list[Frame]]:
    """The request's inputs as wire descriptions and frames: ``raw`` (its raw contents) untouched, or each
    input's typed ``contents`` decoded.

    ``max_bytes`` (the bus's message limit) bounds what typed contents may take once decoded (packed
    varints expand up to 8x); it is checked from the shape and datatype before decoding."""
    if not request.inputs:
        raise _bad("the request has no inputs")
    if raw and len(raw) != len(request.inputs):
        raise _bad(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents; give one per input, in order")
    metas: list[dict[str, Any]] = []
    frames: list[Frame] = []
    budget = tensors.Budget(max_bytes)
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise _bad(f"input {index}: 'name' must be a non-empty string")
        check_name(name, f"input {index}'s name")
        shape = list(tensor.shape)
        if raw:
            meta, frame = tensors.wire_from_bytes(name, tensor.datatype, shape, raw[index])
        else:
            array = _from_contents(name, tensor.datatype, shape, tensor.contents, budget)
            (meta,), (frame,) = tensors.to_wire([(name, array)])
        metas.append(meta)
        frames.append(frame)
    return metas, frames


def _from_contents(
    name: str, datatype: str, shape: list[int], contents: pb.InferTensorContents, budget: tensors.Budget
) -> np.ndarray:
    dtype = tensors.DATATYPES.get(datatype)
    if dtype is None:
        raise _bad(f"input {name!r}: datatype {datatype!r} is not one of {', '.join(tensors.DATATYPES)}")
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise _bad(f"input {name!r}: {datatype} has no typed contents; send it in raw_input_contents")
    shape = tensors.check_shape(name, shape)
    count = math.prod(shape)
    budget.take(name, datatype, shape, count, 4 if dtype.kind == "O" else dtype.itemsize)
    values = getattr(contents, field)
    if len(values) != count:
        raise _bad(f"input {name!r}: shape {shape} holds {count} elements, contents.{field} has {len(values)}")
    if dtype.kind == "O":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    wide = np.array(values, dtype=np.uint64 if field == "uint64_contents" else None)
    if dtype.kind in "iu" and count and wide.dtype != dtype:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise _bad(f"input {name!r}: {datatype} values must lie in [{info.min}, {info.max}]")
    return wide.astype(dtype, copy=False).reshape(shape)


def decode_parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A parameter map as plain values, which is how they travel on the bus."""
    found: dict[str, Any] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            found[key] = getattr(parameter, choice)
    return found


# -- responses ---------------------------------------------------------------------------------------


def encode_response(
    model: str,
    version: str | None,
    request_id: str,
    requested: list[str] | None,
    metas: Sequence[Mapping[str, Any]],
    frames: Sequence[Frame],
    *,
    stream: bool = False,
) -> bytes:
    """A serialized ModelInferResponse for a reply's checked tensors, each frame copied once, into it.

    ``stream``: wrapped as a ModelStreamInferResponse's ``infer_response`` in the same single copy."""
    by_name = {meta["name"]: (meta, frame) for meta, frame in zip(metas, frames, strict=True)}
    names = list(by_name) if requested is None else requested
    missing = [name for name in names if name not in by_name]
    if missing:
        raise _bad(
            f"the model has no output(s) {', '.join(map(repr, missing))}; it produced "
            f"{', '.join(repr(name) for name in by_name)}"
        )
    response = pb.ModelInferResponse(model_name=model, model_version=version or "", id=request_id)
    raw: list[Any] = []
    size = 0
    for name in names:
        meta, frame = by_name[name]
        response.outputs.add(name=name, datatype=tensors.WIRE_TO_DATATYPE[meta["dtype"]], shape=meta["shape"])
        data = frame_buffer(frame)
        length = _encode_varint(memoryview(data).nbytes)
        raw += (_RAW_OUTPUT_TAG, length, data)
        size += len(_RAW_OUTPUT_TAG) + len(length) + memoryview(data).nbytes
    head = response.SerializeToString()
    if not stream:
        return b"".join([head, *raw])
    return b"".join([_INFER_RESPONSE_TAG, _encode_varint(len(head) + size), head, *raw])


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def model_metadata(spec: ModelSpec, versions: list[str]) -> pb.ModelMetadataResponse:
    """As REST's: -1 leads each shape for the batch dimension."""

    def tensor(t: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=[-1, *t.shape])

    return pb.ModelMetadataResponse(
        name=spec.name,
        versions=versions,
        platform="inferoxy",
        inputs=[tensor(t) for t in spec.inputs],
        outputs=[tensor(t) for t in spec.outputs],
    )

