"""What the gRPC steps of a request cost in copies of the tensor: protobuf and numpy, in this process.

    python bench/bench_copies.py [--shape 1 1080 1920 3] [--dtype uint8] [--tries 10]

For each step a gRPC bridge takes with a ModelInferRequest carrying one tensor in raw_input_contents
(parse, read the raw contents, view them as an array, build and serialize the answer), prints the
bytes tracemalloc saw allocated at the step's peak, as a multiple of the tensor's size, and its time
(best of --tries) as a multiple of one memcpy of the tensor on this machine. Together they say how
many times each step copies the tensor: tracemalloc sees Python and numpy allocations, not those of
protobuf's own arena (upb), which the time still shows. Uses only the generated stubs
(bridges/proto), so it measures the steps, whichever bridge code calls them. docs/PERFORMANCE.md
("Bytes copied per request") puts these beside the ZeroMQ and kernel copies.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bridges.proto import grpc_predict_v2_pb2 as pb  # noqa: E402


def best_time(step: Callable[[], Any], tries: int) -> float:
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_bytes(step: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def steps(tensor: np.ndarray) -> dict[str, Callable[[], Any]]:
    request = pb.ModelInferRequest(model_name="echo", id="1")
    request.inputs.add(name="x", datatype="UINT8", shape=tensor.shape)
    request.raw_input_contents.append(tensor.tobytes())
    raw = request.SerializeToString()
    parsed = pb.ModelInferRequest.FromString(raw)
    contents = parsed.raw_input_contents[0]
    view = np.frombuffer(contents, dtype=tensor.dtype)

    data = bytes(view.data.cast("B"))  # protobuf takes bytes only: no memoryview, no array

    def response() -> pb.ModelInferResponse:
        answer = pb.ModelInferResponse(model_name="echo", id="1")
        answer.outputs.add(name="x", datatype="UINT8", shape=tensor.shape)
        answer.raw_output_contents.append(data)
        return answer

    built = response()
    return {
        "memcpy of the tensor (np.copyto), the unit": lambda: np.copyto(np.empty_like(tensor), tensor),
        "request: ModelInferRequest.FromString(wire bytes)": lambda: pb.ModelInferRequest.FromString(raw),
        "request: .raw_input_contents[0] (bytes out of the message)": lambda: parsed.raw_input_contents[0],
        "request: np.frombuffer(raw contents)": lambda: np.frombuffer(contents, dtype=tensor.dtype),
        "answer: bytes(array's buffer)": lambda: bytes(view.data.cast("B")),
        "answer: ModelInferResponse + raw_output_contents.append(bytes)": response,
        "answer: ModelInferResponse.SerializeToString()": built.SerializeToString,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 1080, 1920, 3])
    parser.add_argument("--dtype", default="uint8")
    parser.add_argument("--tries", type=int, default=10)
    args = parser.parse_args()
    tensor = np.random.default_rng(13).integers(0, 255, args.shape).astype(args.dtype)
    measured = steps(tensor)
    unit = best_time(next(iter(measured.values())), args.tries)
    print(f"tensor {args.dtype} {args.shape}: {tensor.nbytes:,} B; one memcpy {unit * 1e6:,.0f} µs (best of "
          f"{args.tries})\n")
    print("| step | allocated at peak, × tensor | time, × memcpy |\n|---|---|---|")
    for name, step in measured.items():
        print(f"| {name} | {peak_bytes(step) / tensor.nbytes:.2f} | {best_time(step, args.tries) / unit:.1f} |")


if __name__ == "__main__":
    main()
