"""Open Inference Protocol (KServe v2) tensors -> Inferoxy's wire format, for the REST and gRPC bridges.

A JSON document with ``inputs: [{name, shape, datatype, data}]`` becomes numpy arrays of an
explicit dtype, then wire tensor descriptions plus raw frames for the bus. The binary tensor data
extension (raw bytes after the JSON, sized by ``Inference-Header-Content-Length`` and
``binary_data_size``) is supported too, because Triton's clients use it by default; binary inputs
and gRPC raw contents go through ``wire_from_bytes``, which checks them and passes the bytes on
untouched (a view of the body, never a copy or a re-encoding). Replies: bridges/rest_reply.py,
bridges/grpc_codec.py.

BYTES tensors from JSON are (nested lists of) strings, sent as UTF-8; binary BYTES data is Triton's
serialization (a 4-byte little-endian length before each element), which is also their wire form
(``inferoxy.wire``), checked once here by ``wire.scan_bytes``. FP16 travels as binary data;
JSON FP16 numbers are accepted too and rounded to half precision.

JSON data is never trusted to have the right types: numpy would quietly turn ``"1.5"``
or ``null`` into floats and truncate ``1.7`` to an int, so the values' kind is checked
before the cast: booleans are not numbers (``[true, 1]`` is refused for FP32 as ``[true, true]`` is),
and a float beyond FP32's or FP16's range is refused rather than cast to infinity. A tensor's
decoded size is worked out from its shape and datatype before its data is decoded, so JSON that
would grow past the message limit is refused first. Every error is a ``bad_input`` RequestError
that names the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import orjson

from bridges.errors import RequestError
from bridges.validation import check_name
from inferoxy.protocol import ErrorCode
from inferoxy.wire import (
    BYTES,
    DTYPES,
    MAX_RANK,
    Frame,
    WireError,
    as_array,
    dtype_name,
    scan_bytes,
    tensor_frame,
)
from inferoxy.wire import tensor_meta as wire_tensor_meta
from model_manager.spec import DATATYPE_TO_DTYPE, DTYPE_TO_DATATYPE

# Open Inference Protocol datatype -> the numpy dtype its data is built with (BYTES: objects).
DATATYPES: dict[str, np.dtype[Any]] = {
    **{datatype: DTYPES[dtype] for datatype, dtype in DATATYPE_TO_DTYPE.items()},
    "BYTES": np.dtype(object),
}
# Wire dtype name -> Open Inference Protocol datatype.
WIRE_TO_DATATYPE: dict[str, str] = {**DTYPE_TO_DATATYPE, BYTES: "BYTES"}
# Which kinds of inferred JSON values each numpy kind accepts: ints for floats, never floats for ints.
_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_KIND_WORDS = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers"}

HEADER_LENGTH = "inference-header-content-length"


class InferRequest(NamedTuple):
    """A decoded inference request: its inputs as wire tensor descriptions and frames, ready for the bus.

    Binary inputs are slices of the body (no copy, BYTES not re-encoded); JSON inputs are the buffers
    of the arrays built from their data."""

    id: str | None
    metas: list[dict[str, Any]]
    frames: list[Frame]
    parameters: dict[str, Any]
    outputs: list[str] | None  # names asked for; None: every output
    binary_outputs: frozenset[str]  # outputs to send as raw bytes (binary data extension)
    binary_all: bool  # every output as raw bytes (``binary_data_output`` request parameter)

    @property
    def inputs(self) -> list[tuple[str, np.ndarray]]:
        """The inputs as named arrays (views of the frames; BYTES decoded): for readers that want numpy."""
        return from_wire(self.metas, self.frames)


def _bad(message: str) -> RequestError:
    return RequestError(ErrorCode.BAD_INPUT, message)


# -- requests ------------------------------------------------------------------------------------


def parse_infer_request(body: bytes, header_length: int | None = None, max_bytes: int | None = None) -> InferRequest:
    """Decode a request body; ``header_length`` is the ``Inference-Header-Content-Length`` header.

    ``max_bytes`` (the bus's message limit) bounds what the inputs may take once decoded; it is
    checked from each input's shape and datatype before its data is decoded."""
    binary: bytes | memoryview = b""
    if header_length is not None:
        if not 0 <= header_length <= len(body):
            raise _bad(f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes")
        # Views, not slices: binary inputs become frames that point into the body.
        whole = memoryview(body)
        body, binary = bytes(whole[:header_length]), whole[header_length:]  # the JSON part is small
    document = parse_json(body)
    if not isinstance(document, dict):
        raise _bad("the request body must be a JSON object")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("'id' must be a string")
    parameters = _optional_map(document.get("parameters"), "'parameters'")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad("'inputs' must be a non-empty list of tensors")
    # Booleans mixed into numbers are only looked for when the JSON holds any at all (a byte search).
    bools_possible = b"true" in body or b"false" in body
    budget = Budget(max_bytes)
    metas: list[dict[str, Any]] = []
    frames: list[Frame] = []
    view = memoryview(binary)
    offset = 0
    for index, tensor in enumerate(raw_inputs):
        meta, frame, used = _input_tensor(tensor, index, view[offset:], budget, bools_possible)
        offset += used
        metas.append(meta)
        frames.append(frame)
    if offset != len(binary):
        raise _bad(f"{len(binary) - offset} bytes of binary data follow the inputs that no input claims")
    binary_all = parameters.get("binary_data_output") is True
    outputs, binary_outputs = _requested_outputs(document.get("outputs"), binary_all)
    return InferRequest(
        request_id, metas, frames, parameters, outputs, binary_outputs, binary_all and outputs is None
    )


class Budget:
    """What the inputs of one request may still take once decoded (None: no limit)."""

    __slots__ = ("left", "limit")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.left = limit

    def take(self, name: str, datatype: str, dims: list[int], count: int, itemsize: int) -> None:
        """Refuse a tensor whose decoded size (``count`` x ``itemsize``) passes what is left."""
        if self.limit is None or self.left is None:
            return
        size = count * itemsize
        if size > self.left:
            already = self.limit - self.left
            more = f" after {already} bytes of other inputs" if already else ""
            raise _bad(
                f"input {name!r}: {datatype} {dims} takes {size} bytes once decoded{more}, more than the "
                f"message limit of {self.limit} bytes (INFEROXY_MAX_MESSAGE_BYTES)"
            )
        self.left -= size


def parse_json(body: bytes | memoryview) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"the request body is not valid JSON: {exc}") from None


def _input_tensor(
    tensor: Any, index: int, binary: memoryview, budget: Budget, bools_possible: bool
) -> tuple[dict[str, Any], Frame, int]:
    if not isinstance(tensor, dict):
        raise _bad(f"input {index} must be a JSON object with name, shape, datatype and data")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"input {index}: 'name' must be a non-empty string")
    check_name(name, f"input {index}'s name")
    datatype = tensor.get("datatype")
    shape = tensor.get("shape")
    parameters = _optional_map(tensor.get("parameters"), f"input {name!r}: 'parameters'")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise _bad(f"input {name!r}: 'data' is missing")
        array = array_from_data(name, datatype, shape, tensor["data"], budget=budget, bools_possible=bools_possible)
        return wire_tensor_meta(name, array), tensor_frame(array), 0
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
        raise _bad(
            f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary)} bytes of binary data left"
        )
    meta, frame = wire_from_bytes(name, datatype, shape, binary[:size])
    return meta, frame, size


def _requested_outputs(raw: Any, binary_default: bool) -> tuple[list[str] | None, frozenset[str]]:
    if raw is None:
        return None, frozenset()
    if not isinstance(raw, list):
        raise _bad("'outputs' must be a list of {\"name\": ...} objects")
    names: list[str] = []
    binary: set[str] = set()
    for index, output in enumerate(raw):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise _bad(f"output {index} must be an object with a string 'name'")
        check_name(output["name"], f"output {index}'s name")
        names.append(output["name"])
        params = _optional_map(output.get("parameters"), f"output {output['name']!r}: 'parameters'")
        if params.get("binary_data", binary_default) is True:
            binary.add(output["name"])
    return names, frozenset(binary)


def _optional_map(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object")
    return value


def datatype_of(array: np.ndarray) -> str:
    """The Open Inference Protocol datatype of an array that can travel on the wire."""
    return WIRE_TO_DATATYPE[dtype_name(array.dtype)]


def _dtype(name: str, datatype: Any) -> np.dtype[Any]:
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise _bad(f"input {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    return dtype


def check_shape(name: str, shape: Any) -> list[int]:
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _bad(f"input {name!r}: 'shape' must be a list of at most {MAX_RANK} non-negative integers")
    return shape


def array_from_data(
    name: str,
    datatype: Any,
    shape: Any,
    data: Any,
    *,
    budget: Budget | None = None,
    bools_possible: bool = True,
) -> np.ndarray:
    """The array a JSON tensor stands for. ``data`` is flat or nested, row-major.

    Booleans are not numbers: a numeric tensor holding ``true`` is refused, as a BOOL tensor holding
    ``1`` is. ``bools_possible=False`` skips looking for them (the caller knows the JSON has none)."""
    dtype = _dtype(name, datatype)
    dims = check_shape(name, shape)
    count = math.prod(dims)
    if budget is not None:
        # BYTES: each element takes at least its 4-byte length; the gateway checks the exact size later.
        budget.take(name, datatype, dims, count, 4 if dtype.kind == "O" else dtype.itemsize)
    if not isinstance(data, list):
        data = [data]  # a lone scalar, as some clients send for a single element
    if dtype.kind == "O":
        return _bytes_from_data(name, dims, count, data)
    try:
        values = np.array(data)
    except (ValueError, TypeError):
        raise _bad(f"input {name!r}: 'data' must be a flat list or nested lists of equal length") from None
    if values.size != count:
        raise _bad(f"input {name!r}: shape {dims} holds {count} elements, 'data' has {values.size}")
    if count and values.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]:
        if not (dtype.kind in "iu" and values.dtype.kind in "fO"):
            raise _bad(f"input {name!r}: {datatype} data must be {_KIND_WORDS[dtype.kind]}, got {_describe(values)}")
        # Integers beyond int64 (uint64's upper half) mixed with others make numpy infer float64 or
        # object; look at the values themselves, on this rare path only.
        values = np.array(data, dtype=object)
        if not all(type(v) is int for v in values.flat):
            raise _bad(f"input {name!r}: {datatype} data must be integers, got {_describe(values, (int,))}")
    if count and dtype.kind != "b" and bools_possible and _holds_bool(data):
        # numpy reads [true, 1] as integers: booleans mixed with numbers are refused like booleans alone.
        raise _bad(f"input {name!r}: {datatype} data must be {_KIND_WORDS[dtype.kind]}, got booleans")
    if count and dtype.kind in "iu" and values.dtype != dtype:
        info = np.iinfo(dtype)
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            raise _bad(f"input {name!r}: {datatype} values must lie in [{info.min}, {info.max}], got {low}..{high}")
    if count and dtype.kind == "f" and values.dtype.itemsize > dtype.itemsize:
        # A float64 beyond the narrower type's range would silently become inf (and null in the reply).
        biggest = float(np.abs(values).max())
        largest = float(np.finfo(dtype).max)
        if biggest > largest:
            raise _bad(f"input {name!r}: {datatype} values must lie within ±{largest:g}, got {biggest:g}")
    return values.astype(dtype, copy=False).reshape(dims)


def _holds_bool(data: list[Any]) -> bool:
    # map(type) runs in C; nested rows are looked into only when there are any.
    kinds = set(map(type, data))
    if bool in kinds:
        return True
    return list in kinds and any(_holds_bool(item) for item in data if type(item) is list)


def _bytes_from_data(name: str, dims: list[int], count: int, data: list[Any]) -> np.ndarray:
    """A BYTES tensor from JSON: (nested lists of) strings, each sent as its UTF-8 bytes."""
    flat: list[bytes] = []
    stack: list[Any] = [iter(data)]
    depth_limit = MAX_RANK + 1
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) >= depth_limit:
                raise _bad(f"input {name!r}: 'data' is nested deeper than the shape allows")
            stack.append(iter(item))
        elif isinstance(item, str):
            flat.append(item.encode())
            if len(flat) > count:
                break
        else:
            kind = type(item).__name__.replace("NoneType", "null")
            raise _bad(f"input {name!r}: BYTES data must be strings, got {kind}")
    if len(flat) != count:
        raise _bad(f"input {name!r}: shape {dims} holds {count} elements, 'data' has {len(flat)}{'+' if stack else ''}")
    return _object_array(flat, dims)


_END = object()


def _object_array(items: Sequence[bytes], dims: list[int]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(dims)


def wire_from_bytes(name: str, datatype: Any, shape: Any, raw: Frame) -> tuple[dict[str, Any], Frame]:
    """The wire description of raw little-endian bytes (binary data extension, gRPC raw contents), and the
    bytes themselves as its frame: untouched, never copied or re-encoded. BYTES data is already in its wire
    form (Triton's serialization); this is where it is checked, once (``wire.scan_bytes``)."""
    dtype = _dtype(name, datatype)
    dims = check_shape(name, shape)
    count = math.prod(dims)
    if dtype.kind == "O":
        try:
            scan_bytes(raw, count)
        except WireError as exc:
            raise _bad(f"input {name!r}: {exc}") from None
        return {"name": name, "dtype": BYTES, "shape": dims}, raw
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise _bad(f"input {name!r}: {datatype} {dims} needs {expected} bytes, got {len(raw)}")
    return {"name": name, "dtype": dtype_name(dtype), "shape": dims}, raw


def _describe(values: np.ndarray, fine: tuple[type, ...] = (int, float)) -> str:
    if values.dtype.kind == "O":
        kinds = sorted({type(v).__name__ for v in values.flat if type(v) not in fine})
        return f"values of type {', '.join(kinds).replace('NoneType', 'null')}" if kinds else "numbers"
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "non-integers", "U": "strings"}.get(
        values.dtype.kind, str(values.dtype)
    )


# -- to and from the wire -----------------------------------------------------------------------


def to_wire(tensors: Sequence[tuple[str, np.ndarray]]) -> tuple[list[dict[str, Any]], list[Frame]]:
    """Wire tensor descriptions and frames for C-contiguous arrays (their buffers, not copies)."""
    metas = [wire_tensor_meta(name, array) for name, array in tensors]
    frames: list[Frame] = [tensor_frame(array) for _, array in tensors]
    return metas, frames


def from_wire(metas: Sequence[Mapping[str, Any]], frames: Sequence[Frame]) -> list[tuple[str, np.ndarray]]:
    """Named arrays (read-only views) of a checked reply."""
    return [(meta["name"], as_array(meta, frame)) for meta, frame in zip(metas, frames, strict=True)]
