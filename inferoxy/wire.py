"""The wire format shared by every ZeroMQ socket in Inferoxy.

A message is a multipart ZeroMQ message: one msgpack *header* frame, then one raw
frame per tensor. The header's ``tensors`` list describes those frames in order,
each as ``{"name": str, "dtype": str, "shape": [int, ...]}``. Raw frames carry the
array bytes in C order, little-endian, so a large array crosses a socket without
being copied or serialised.

Variable-length byte strings (the Open Inference Protocol's BYTES) travel with dtype
``"bytes"``: the frame holds every element in C order as a 4-byte little-endian length
followed by that many bytes, which is exactly Triton's serialization of BYTES tensors, so
the bridges pass a client's raw BYTES data through untouched. Such a tensor decodes to a
numpy object array of ``bytes``; a model may return an object array of ``bytes`` or
``str`` (or a fixed-width ``S``/``U`` array) and it is encoded the same way.

This module is imported by the model runtime inside replica images, so it depends
on numpy and msgpack only. Nothing here ever unpickles: dtypes are looked up in a
fixed table, never built from strings a peer sent, and object arrays do not exist
on the wire.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Union

import msgpack
import numpy as np

from inferoxy.protocol import ErrorCode, InferoxyError

# The dtypes a tensor may have on the wire, by the name used in headers.
DTYPES: dict[str, np.dtype[Any]] = {
    "bool": np.dtype("?"),
    "uint8": np.dtype("<u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "int8": np.dtype("<i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}
_NAME_OF_DTYPE = {dtype: name for name, dtype in DTYPES.items()}
# Variable-length byte strings (BYTES): not a numpy dtype, so not in DTYPES.
BYTES = "bytes"
# numpy kinds that travel as BYTES: objects (bytes or str), fixed-width bytes and unicode.
_BYTES_KINDS = "OSU"
_LENGTH = np.dtype("<u4")

MAX_RANK = 32
MAX_HEADER_BYTES = 1 << 20

# A frame as pyzmq hands it over (bytes, or a zmq.Frame exposing .buffer) or as we send it.
Frame = Union[bytes, bytearray, memoryview, Any]  # noqa: UP007 (a runtime alias; `|` cannot take Any on 3.10)


class WireError(InferoxyError, ValueError):
    """A message that does not follow the wire format. Its text is safe to send to the peer."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_INPUT, message)


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The wire name of a numpy dtype, or WireError if it cannot travel."""
    normal = np.dtype(dtype)
    if normal.kind in _BYTES_KINDS:
        return BYTES
    if normal.byteorder == ">":
        normal = normal.newbyteorder("<")
    found = _NAME_OF_DTYPE.get(normal)
    if found is None:
        raise WireError(f"dtype {np.dtype(dtype)} cannot be sent; use one of {', '.join(DTYPES)} or bytes")
    return found


def pack_header(header: Mapping[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def unpack_header(frame: Frame) -> dict[str, Any]:
    """Decode a header frame; WireError unless it is a msgpack map of bounded size."""
    data = _buffer(frame)
    if len(data) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(data)} bytes is larger than {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise WireError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header must be a msgpack map")
    return header


def tensor_meta(name: str, array: np.ndarray) -> dict[str, Any]:
    return {"name": name, "dtype": dtype_name(array.dtype), "shape": list(array.shape)}


def encode(header: Mapping[str, Any], tensors: Sequence[tuple[str, np.ndarray]] = ()) -> list[Frame]:
    """Frames for ``header`` plus ``tensors``; the header's ``tensors`` key is filled in here."""
    arrays = [_little_endian(np.asarray(array, order="C")) for _, array in tensors]
    out = dict(header)
    out["tensors"] = [tensor_meta(name, array) for (name, _), array in zip(tensors, arrays, strict=True)]
    return [pack_header(out), *(tensor_frame(array) for array in arrays)]


def tensor_frame(array: np.ndarray) -> Frame:
    """The raw frame of one array: its buffer (no copy when C-contiguous), or BYTES serialized."""
    if array.dtype.kind in _BYTES_KINDS:
        return serialize_bytes(array)
    array = _little_endian(np.ascontiguousarray(array))
    return array.data.cast("B") if array.nbytes else b""


def serialize_bytes(array: np.ndarray) -> bytes:
    """Every element as a 4-byte little-endian length and its bytes (``str`` as UTF-8), in C order."""
    parts: list[bytes] = []
    for item in np.asarray(array).reshape(-1):
        value = item.encode() if isinstance(item, str) else item
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise WireError(f"a BYTES tensor holds a {type(item).__name__}; only bytes and str can be sent")
        parts.append(len(value).to_bytes(4, "little"))
        parts.append(bytes(value))
    return b"".join(parts)


def deserialize_bytes(frame: Frame, count: int) -> list[bytes]:
    """The ``count`` elements of a BYTES frame; WireError unless the frame holds exactly that many."""
    data = memoryview(_buffer(frame)).cast("B")
    size = len(data)
    items: list[bytes] = []
    offset = 0
    while offset < size:
        if offset + 4 > size:
            raise WireError(f"BYTES data is truncated: {size - offset} bytes left where a 4-byte length belongs")
        length = int.from_bytes(data[offset : offset + 4], "little")
        offset += 4
        if offset + length > size:
            raise WireError(f"BYTES element {len(items)} claims {length} bytes; only {size - offset} are left")
        items.append(bytes(data[offset : offset + length]))
        offset += length
        if len(items) > count:
            break
    if len(items) != count:
        more = "+" if offset < size else ""
        raise WireError(f"BYTES data holds {len(items)}{more} elements, the shape needs {count}")
    return items


_read_length = struct.Struct("<I").unpack_from


def scan_bytes(frame: Frame, count: int) -> None:
    """Check that a BYTES frame holds exactly ``count`` length-prefixed elements, without building them.

    This is the one full check of BYTES data, made where it enters (the bridges); the batch manager's
    ``check_tensors`` then only checks what it can in O(1). It walks the 4-byte lengths, never making a
    Python object per element: equal lengths (the common case: fixed-size records, ids, hashes) are
    checked by numpy over a strided view of the lengths; otherwise a tight loop hops from length to
    length (bench/bench_tensors.py has the figures). Raises WireError as ``deserialize_bytes`` would.
    """
    data = memoryview(_buffer(frame)).cast("B")
    size = len(data)
    width = _read_length(data, 0)[0] if count and size >= 4 else -1
    if width >= 0 and size == count * (4 + width):
        lengths = np.ndarray((count,), dtype=_LENGTH, buffer=data, strides=(4 + width,))
        # In chunks: a comparison's temporary stays small however many elements there are.
        if all(bool((lengths[start : start + _CHUNK] == width).all()) for start in range(0, count, _CHUNK)):
            return
    offset = found = 0
    read = _read_length
    while offset < size:
        if offset + 4 > size:
            raise WireError(f"BYTES data is truncated: {size - offset} bytes left where a 4-byte length belongs")
        length = read(data, offset)[0]
        offset += 4
        if offset + length > size:
            raise WireError(f"BYTES element {found} claims {length} bytes; only {size - offset} are left")
        offset += length
        found += 1
        if found > count:
            break
    if found != count:
        more = "+" if offset < size else ""
        raise WireError(f"BYTES data holds {found}{more} elements, the shape needs {count}")


_CHUNK = 16384


def _little_endian(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">":
        return array.astype(array.dtype.newbyteorder("<"))
    return array


def check_tensors(
    header: Mapping[str, Any], frames: Sequence[Frame], *, scan_bytes: bool = False
) -> list[dict[str, Any]]:
    """Validate the header's tensor list against the raw frames that follow the header.

    ``frames`` are the frames after the header. Returns the tensor metadata list.
    Checks frame count, names, dtypes, shapes and that every buffer holds exactly
    dtype × shape bytes, without touching the array data: O(1) per tensor. A BYTES frame is only
    checked to hold at least a 4-byte length per element; ``scan_bytes=True`` (the bridges, where
    data enters from clients) walks its lengths too. Every reader that builds the elements
    (``as_array``) checks them fully anyway, so the batch manager, which only forwards frames, need not.
    """
    metas = header.get("tensors", [])
    if not isinstance(metas, list):
        raise WireError("'tensors' must be a list")
    if len(metas) != len(frames):
        raise WireError(f"header describes {len(metas)} tensors but {len(frames)} data frames followed")
    for index, (meta, frame) in enumerate(zip(metas, frames, strict=True)):
        if not isinstance(meta, dict):
            raise WireError(f"tensor {index}: description must be a map")
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise WireError(f"tensor {index}: 'name' must be a non-empty string")
        is_bytes = meta.get("dtype") == BYTES
        dtype = DTYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
        if dtype is None and not is_bytes:
            raise WireError(f"tensor {name!r}: dtype {meta.get('dtype')!r} is not one of {', '.join(DTYPES)}, bytes")
        shape = meta.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise WireError(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} non-negative ints")
        if dtype is None:  # BYTES: prod(shape) length-prefixed elements
            count = math.prod(shape)
            try:
                if scan_bytes:
                    _scan(frame, count)
                elif memoryview(_buffer(frame)).nbytes < 4 * count:
                    raise WireError(f"BYTES data of {memoryview(_buffer(frame)).nbytes} bytes cannot hold {count} "
                                    "elements (4 bytes of length each at least)")
            except WireError as exc:
                raise WireError(f"tensor {name!r}: {exc}") from None
            continue
        expected = dtype.itemsize * math.prod(shape)
        got = memoryview(_buffer(frame)).nbytes
        if expected != got:
            raise WireError(f"tensor {name!r}: {meta['dtype']} {shape} needs {expected} bytes, frame has {got}")
    return metas


_scan = scan_bytes  # check_tensors' keyword hides the function's name


def decode(frames: Sequence[Frame]) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """Header and named arrays of a message. Arrays are read-only views of the frames."""
    if not frames:
        raise WireError("empty message")
    header = unpack_header(frames[0])
    metas = check_tensors(header, frames[1:])
    tensors = [(meta["name"], as_array(meta, frame)) for meta, frame in zip(metas, frames[1:], strict=True)]
    return header, tensors


def as_array(meta: Mapping[str, Any], frame: Frame) -> np.ndarray:
    """The array a checked tensor description and its frame stand for (a view, no copy; BYTES: an object array)."""
    if meta["dtype"] == BYTES:
        shape = meta["shape"]
        items = deserialize_bytes(frame, math.prod(shape))
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array.reshape(shape)
    return np.frombuffer(_buffer(frame), dtype=DTYPES[meta["dtype"]]).reshape(meta["shape"])


def frame_buffer(frame: Frame) -> bytes | bytearray | memoryview:
    """The bytes of a frame as a buffer (a zmq.Frame's without a copy)."""
    return _buffer(frame)


def _buffer(frame: Frame) -> bytes | bytearray | memoryview:
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return frame
    buffer = getattr(frame, "buffer", None)  # zmq.Frame
    if buffer is None:
        raise WireError(f"frame of type {type(frame).__name__} has no buffer")
    return buffer
