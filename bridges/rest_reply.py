"""An inference reply as the Open Inference Protocol's HTTP response: JSON outputs, or binary data after the JSON.

Outputs asked for as binary data (the binary tensor data extension: ``binary_data`` per output or
``binary_data_output`` for all) are the reply's frames as they came from the bus, copied once, into
the body; BYTES included, whose wire form is Triton's serialization. Only outputs written as JSON
``data`` are decoded (``inferoxy.wire.as_array``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from starlette.responses import Response

from bridges.errors import RequestError
from bridges.tensors import WIRE_TO_DATATYPE, InferRequest, to_wire
from inferoxy.protocol import ErrorCode
from inferoxy.wire import Frame, as_array, frame_buffer


def encode_infer_response(
    model: str,
    version: str | None,
    request: InferRequest,
    outputs: Sequence[tuple[str, np.ndarray]],
) -> tuple[bytes, int | None]:
    """``encode_infer_reply`` for outputs given as arrays."""
    metas, frames = to_wire(outputs)
    return encode_infer_reply(model, version, request, metas, frames)


def encode_infer_reply(
    model: str,
    version: str | None,
    request: InferRequest,
    metas: Sequence[Mapping[str, Any]],
    frames: Sequence[Frame],
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """The response body for a reply's checked tensors and, when some outputs travel as raw bytes, the JSON
    part's length. Binary outputs are the reply's frames as they came (one copy, into the body); only
    outputs written as JSON are decoded. ``id`` echoes the request's own, else ``request_id``: the id the client
    gave in a header (absent when it gave none, as before request ids)."""
    by_name = {meta["name"]: (meta, frame) for meta, frame in zip(metas, frames, strict=True)}
    names = list(by_name) if request.outputs is None else request.outputs
    missing = [name for name in names if name not in by_name]
    if missing:
        raise RequestError(
            ErrorCode.BAD_INPUT,
            f"the model has no output(s) {', '.join(map(repr, missing))}; it produced "
            f"{', '.join(repr(name) for name in by_name)}",
        )
    blobs: list[Any] = []
    out_tensors = []
    for name in names:
        meta, frame = by_name[name]
        entry: dict[str, Any] = {"name": name, "datatype": WIRE_TO_DATATYPE[meta["dtype"]], "shape": meta["shape"]}
        if request.binary_all or name in request.binary_outputs:
            blob = frame_buffer(frame)
            entry["parameters"] = {"binary_data_size": memoryview(blob).nbytes}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(as_array(meta, frame))
        out_tensors.append(entry)
    document: dict[str, Any] = {"model_name": model, "model_version": version}
    if request.id is not None or request_id is not None:
        document["id"] = request.id if request.id is not None else request_id
    document["outputs"] = out_tensors
    body = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return body, None
    return b"".join([body, *blobs]), len(body)


def _json_data(array: np.ndarray) -> Any:
    flat = array.reshape(-1)
    if flat.dtype.kind == "O":  # BYTES: JSON has only strings; bytes that are not UTF-8 need binary_data
        return [bytes(item).decode("utf-8", errors="replace") for item in flat]
    if flat.dtype == np.float16:  # orjson cannot write float16; float32 holds every value exactly
        return flat.astype(np.float32)
    return flat


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON body as every REST route but inference answers it (an error: ``{"error": message}``)."""
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)
