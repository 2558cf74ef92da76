"""What uvloop gives the bridges: REST and gRPC on asyncio's event loop and on uvloop, in one run.

    python bench/bench_bridge_loop.py [--duration 5] [--concurrency 32] [--repeats 3] [--json FILE]

Starts `inferoxy serve` (bench_bridges.Proxy, echo model, REST and gRPC bridges) once per loop per
repeat with ``INFEROXY_BRIDGE_EVENT_LOOP`` set, alternating the order between repeats so drift in the
machine's speed falls on both. Each measurement is a closed loop at ``--concurrency``: aiohttp with a
JSON FP32 [1, 16] request for REST, ``tritonclient.grpc.aio`` for gRPC. Besides req/s it records the
CPU time the bridge's own process spent per request (utime + stime from /proc over the measured
window, bench_auth.CpuProbe): on a shared machine req/s swings with the neighbours' load, while the
CPU a bridge spends per request is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import tritonclient.grpc.aio as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_auth import PROBE, bridge_pids, measure  # noqa: E402
from bench_bridges import ECHO_ONLY, Proxy, free_port  # noqa: E402


async def rest(url: str, concurrency: int, duration: float) -> list[float]:
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                   "data": list(map(float, range(16)))}]}).encode()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def call() -> None:
            async with session.post(f"{url}/v2/models/echo/infer", data=body,
                                    headers={"content-type": "application/json"}) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"REST answered {response.status}")

        return await measure(call, concurrency, duration)


async def grpc(address: str, concurrency: int, duration: float) -> list[float]:
    client = grpcclient.InferenceServerClient(address)
    tensor = grpcclient.InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.arange(16, dtype=np.float32).reshape(1, 16))
    try:
        async def call() -> None:
            await client.infer("echo", [tensor])

        return await measure(call, concurrency, duration)
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models.yaml"
        models.write_text(ECHO_ONLY)
        for repeat in range(args.repeats):
            loops = ["asyncio", "uvloop"] if repeat % 2 == 0 else ["uvloop", "asyncio"]
            for loop in loops:
                os.environ.update({"INFEROXY_BRIDGE_EVENT_LOOP": loop, "INFEROXY_BRIDGES": "rest,grpc",
                                   "INFEROXY_GRPC_PORT": str(free_port())})
                with Proxy(str(models)) as proxy:
                    assert proxy.process is not None
                    pids = bridge_pids(proxy.process.pid)
                    for bridge in ("rest", "grpc"):
                        PROBE.pid = pids.get(bridge)
                        if bridge == "rest":
                            latencies = asyncio.run(rest(f"http://127.0.0.1:{proxy.rest_port}", args.concurrency,
                                                         args.duration))
                        else:
                            latencies = asyncio.run(grpc(f"127.0.0.1:{os.environ['INFEROXY_GRPC_PORT']}",
                                                         args.concurrency, args.duration))
                        row = {"loop": loop, "bridge": bridge, "repeat": repeat,
                               "req_s": round(len(latencies) / args.duration, 1),
                               "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
                               "cpu_us_per_request": round(PROBE.window_s / len(latencies) * 1e6, 1)}
                        rows.append(row)
                        print(f"{loop:<8} {bridge:<5} c={args.concurrency}  {row['req_s']:>8} req/s  "
                              f"p50 {row['p50_ms']:>7} ms  bridge CPU {row['cpu_us_per_request']:>7} µs/request",
                              flush=True)
    print("\n| bridge | loop | req/s (median) | bridge CPU µs/request (median) |\n|---|---|---|---|")
    for bridge in ("rest", "grpc"):
        for loop in ("asyncio", "uvloop"):
            mine = [r for r in rows if r["bridge"] == bridge and r["loop"] == loop]
            print(f"| {bridge} | {loop} | {statistics.median(r['req_s'] for r in mine):.0f} | "
                  f"{statistics.median(r['cpu_us_per_request'] for r in mine):.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
