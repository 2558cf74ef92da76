"""What tensors cost in a bridge and in the batch manager, before and after raw pass-through, in one run.

    python bench/bench_tensors.py [--repeats 7] [--json bench/results/tensors.json]

No sockets: each step is timed in this process (median of ``--repeats``), so the figures hold on a
shared machine better than throughput does. "before" replays the steps the bridges took until raw
tensor bytes were passed through (the same library calls, written out here); "after" calls the
bridges' code as it is now.

- BYTES, 100k elements of 16 bytes (and of varied lengths): the batch manager's ``check_tensors``
  (before: it decoded every element; now O(1)); the bridge's input path for gRPC raw contents
  (before: decode to an object array, then serialize again; now ``wire.scan_bytes``).
- UINT8 [1, 1080, 1920, 3] (6 MB) through the gRPC bridge: request bytes -> ZeroMQ frames, and
  reply frames -> response bytes, with the copies each makes (``np.shares_memory`` says whether a
  frame is a view of the received bytes; the reply copies are counted from the steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bridges import grpc_codec, tensors
from bridges.proto import grpc_predict_v2_pb2 as pb
from inferoxy import wire


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of ``fn``."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def serialized(items: list[bytes]) -> bytes:
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


# -- before: the steps as the bridges and batch manager took them -----------------------------------------


def check_before(header: dict[str, Any], frames: list[Any]) -> None:
    # check_tensors decoded every BYTES element to check the count.
    for meta, frame in zip(header["tensors"], frames, strict=True):
        if meta["dtype"] == wire.BYTES:
            wire.deserialize_bytes(frame, int(np.prod(meta["shape"])))


def grpc_in_before(data: bytes) -> list[Any]:
    request = pb.ModelInferRequest.FromString(data)  # copy 1: into protobuf's arena
    frames = []
    for index, tensor in enumerate(request.inputs):
        raw = request.raw_input_contents[index]  # copy 2: out into a bytes object
        if tensor.datatype == "BYTES":  # decoded to objects, then serialized again
            items = wire.deserialize_bytes(raw, int(np.prod(tensor.shape)))
            array = np.empty(len(items), dtype=object)
            array[:] = items
            frames.append(wire.tensor_frame(array))
        else:
            array = np.frombuffer(raw, dtype=tensors.DATATYPES[tensor.datatype]).reshape(list(tensor.shape))
            frames.append(wire.tensor_frame(array))
    return frames


def grpc_out_before(metas: list[dict[str, Any]], frames: list[Any]) -> bytes:
    outputs = tensors.from_wire(metas, frames)
    response = pb.ModelInferResponse(model_name="m", model_version="1", id="r")
    for name, array in outputs:
        response.outputs.add(name=name, datatype=tensors.datatype_of(array), shape=array.shape)
        # copy 1: bytes(); copy 2: into protobuf's arena (BYTES: decoded and serialized again first)
        response.raw_output_contents.append(bytes(wire.tensor_frame(array)))
    return response.SerializeToString()  # copy 3


# -- after: the code as it is ---------------------------------------------------------------------------


def grpc_in_after(data: bytes) -> list[Any]:
    request, raws = grpc_codec.parse_infer_request(data)
    return grpc_codec.decode_inputs(request, raws, 1 << 31)[1]


def grpc_out_after(metas: list[dict[str, Any]], frames: list[Any]) -> bytes:
    return grpc_codec.encode_response("m", "1", "r", None, metas, frames)


def grpc_request(name: str, datatype: str, shape: list[int], raw: bytes) -> bytes:
    request = pb.ModelInferRequest(model_name="m", id="r")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request.SerializeToString()


def bytes_rows(label: str, frame: bytes, count: int, repeats: int, row: Callable[[str, float, float], None]) -> None:
    header = {"tensors": [{"name": "s", "dtype": "bytes", "shape": [1, count]}]}
    row(f"batch manager check_tensors, {label}",
        timed(lambda: check_before(header, [frame]), repeats),
        timed(lambda: wire.check_tensors(header, [frame]), repeats))
    data = grpc_request("s", "BYTES", [1, count], frame)
    row(f"gRPC bridge request -> frames, {label}",
        timed(lambda: grpc_in_before(data), repeats), timed(lambda: grpc_in_after(data), repeats))
    metas = header["tensors"]
    row(f"gRPC bridge frames -> response, {label}",
        timed(lambda: grpc_out_before(metas, [frame]), repeats),
        timed(lambda: grpc_out_after(metas, [frame]), repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    repeats = args.repeats
    results: dict[str, dict[str, float]] = {}

    def row(what: str, before: float, after: float) -> None:
        results[what] = {"before_ms": round(before, 3), "after_ms": round(after, 3)}
        print(f"{what:<58} {before:>9.3f} ms {after:>9.3f} ms {before / max(after, 1e-6):>8.1f}x")

    print(f"{'':<58} {'before':>12} {'after':>12} {'gain':>9}")
    count = 100_000
    for label, items in (("16 B", [b"x" * 16] * count), ("0-30 B", [b"x" * (i % 31) for i in range(count)])):
        bytes_rows(f"BYTES 100k x {label}", serialized(items), count, repeats, row)

    image = np.random.default_rng(0).integers(0, 255, (1, 1080, 1920, 3), dtype=np.uint8)
    shape = list(image.shape)
    data = grpc_request("image", "UINT8", shape, image.tobytes())
    row("gRPC bridge request -> frames, UINT8 [1,1080,1920,3] 6 MB",
        timed(lambda: grpc_in_before(data), repeats), timed(lambda: grpc_in_after(data), repeats))
    metas = [{"name": "image", "dtype": "uint8", "shape": shape}]
    frame = memoryview(image).cast("B")
    row("gRPC bridge frames -> response, UINT8 6 MB",
        timed(lambda: grpc_out_before(metas, [frame]), repeats),
        timed(lambda: grpc_out_after(metas, [frame]), repeats))
    small = np.arange(16, dtype=np.float32).reshape(1, 16)
    data_small = grpc_request("x", "FP32", [1, 16], small.tobytes())
    row("gRPC bridge request -> frames, FP32 [1, 16]",
        timed(lambda: grpc_in_before(data_small), repeats * 200),
        timed(lambda: grpc_in_after(data_small), repeats * 200))
    metas_small = [{"name": "x", "dtype": "float32", "shape": [1, 16]}]
    row("gRPC bridge frames -> response, FP32 [1, 16]",
        timed(lambda: grpc_out_before(metas_small, [small.tobytes()]), repeats * 200),
        timed(lambda: grpc_out_after(metas_small, [small.tobytes()]), repeats * 200))
    received = np.frombuffer(data, np.uint8)
    views = {
        "before": np.shares_memory(np.frombuffer(grpc_in_before(data)[0], np.uint8), received),
        "after": np.shares_memory(np.frombuffer(grpc_in_after(data)[0], np.uint8), received),
    }
    copies = {"request_before": 0 if views["before"] else 2, "request_after": 0 if views["after"] else 2,
              "reply_before": 3, "reply_after": 1}
    print(f"6 MB request frame is a view of the received bytes: before {views['before']}, after {views['after']}")
    print(f"copies of a 6 MB tensor in the gRPC bridge (request + reply): before {copies['request_before']} + "
          f"{copies['reply_before']}, after {copies['request_after']} + {copies['reply_after']} "
          "(grpcio's own receive and send buffers not counted)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": results, "copies_6mb": copies}, indent=2) + "\n")


if __name__ == "__main__":
    main()
