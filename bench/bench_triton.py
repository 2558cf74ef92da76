"""Requests per second and latency through the REST and gRPC bridges, driven by tritonclient's asyncio clients.

    python bench/bench_triton.py [--duration 10] [--concurrency 1 32] [--json bench/results/triton.json]

Starts its own `inferoxy serve` (bench_bridges.Proxy, with the gRPC bridge added) serving only
the echo model, drives each bridge with closed-loop tritonclient callers (each sends its next
request when the last is answered; FP32 [1, 16], binary tensors), prints a table and writes
the figures as JSON, in the same form as bench_bridges.py.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
import tritonclient.http.aio as httpclient
from tritonclient.utils import np_to_triton_dtype

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bridges import (  # noqa: E402
    ECHO_ONLY,
    Call,
    Proxy,
    free_port,
    print_row,
    report,
    summarise,
    warm_then_measure,
)

PAYLOAD = np.arange(16, dtype=np.float32)[None]


@asynccontextmanager
async def http_caller(address: str, *, model: str = "echo", payload: np.ndarray = PAYLOAD,
                      connections: int = 64) -> AsyncIterator[Call]:
    """One HTTP client; each call sends ``payload`` as input ``x``, binary tensors both ways."""
    client = httpclient.InferenceServerClient(address, conn_limit=connections)
    tensor = httpclient.InferInput("x", list(payload.shape), np_to_triton_dtype(payload.dtype))
    tensor.set_data_from_numpy(payload, binary_data=True)
    try:
        async def call() -> None:
            await client.infer(model, [tensor])

        yield call
    finally:
        await client.close()


@asynccontextmanager
async def grpc_caller(address: str, *, model: str = "echo", payload: np.ndarray = PAYLOAD) -> AsyncIterator[Call]:
    """One gRPC channel; each call sends ``payload`` as input ``x`` in ``raw_input_contents``."""
    client = grpcclient.InferenceServerClient(address)
    tensor = grpcclient.InferInput("x", list(payload.shape), np_to_triton_dtype(payload.dtype))
    tensor.set_data_from_numpy(payload)
    try:
        async def call() -> None:
            await client.infer(model, [tensor])

        yield call
    finally:
        await client.close()


async def bench_http(address: str, concurrency: int, duration: float) -> list[float]:
    return await warm_then_measure(http_caller(address, connections=concurrency), concurrency, duration)


async def bench_grpc(address: str, concurrency: int, duration: float) -> list[float]:
    return await warm_then_measure(grpc_caller(address), concurrency, duration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--bridges", nargs="+", default=["rest", "grpc"], choices=["rest", "grpc"])
    parser.add_argument("--json", default="bench/results/triton.json", help="where to write the figures")
    args = parser.parse_args()

    models = Path(tempfile.mkdtemp()) / "models.yaml"
    models.write_text(ECHO_ONLY)
    proxy = Proxy(str(models))
    grpc_port = free_port()
    proxy.env.update({"INFEROXY_GRPC_PORT": str(grpc_port), "INFEROXY_BRIDGES": "rest,grpc"})
    rows: list[dict[str, Any]] = []
    with proxy:
        for bridge in args.bridges:
            for concurrency in args.concurrency:
                if bridge == "rest":
                    latencies = asyncio.run(bench_http(f"127.0.0.1:{proxy.rest_port}", concurrency, args.duration))
                else:
                    latencies = asyncio.run(bench_grpc(f"127.0.0.1:{grpc_port}", concurrency, args.duration))
                rows.append(summarise(f"{bridge} (tritonclient)", concurrency, args.duration, latencies))
                print_row(rows[-1])

    report(rows, args.duration, args.json)


if __name__ == "__main__":
    main()
