"""What uvloop gives the bridges: REST, gRPC and ZeroMQ on asyncio's event loop and on uvloop, in one run.

    python bench/bench_bridge_loop.py [--duration 5] [--concurrency 32] [--repeats 3] [--json FILE]

Starts `inferoxy serve` (bench_bridges.Proxy, echo model, all three bridges) once per loop per
repeat with ``INFEROXY_BRIDGE_EVENT_LOOP`` set, alternating the order between repeats so drift in the
machine's speed falls on both. Each measurement is a closed loop at ``--concurrency`` with
bench_auth's clients and FP32 [1, 16] (aiohttp JSON for REST, ``tritonclient.grpc.aio`` for gRPC,
``inferoxy.client.AsyncClient`` for ZeroMQ). Besides req/s it records the
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_auth import PROBE, bench_grpc, bench_rest, bench_zmq, bridge_pids  # noqa: E402
from bench_bridges import ECHO_ONLY, Proxy, free_port  # noqa: E402

BENCHES = {"rest": bench_rest, "grpc": bench_grpc, "zmq": bench_zmq}


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
                os.environ.update({"INFEROXY_BRIDGE_EVENT_LOOP": loop, "INFEROXY_BRIDGES": "rest,grpc,zmq",
                                   "INFEROXY_GRPC_PORT": str(free_port())})
                with Proxy(str(models)) as proxy:
                    assert proxy.process is not None
                    pids = bridge_pids(proxy.process.pid)
                    targets = {"rest": f"http://127.0.0.1:{proxy.rest_port}",
                               "grpc": f"127.0.0.1:{os.environ['INFEROXY_GRPC_PORT']}",
                               "zmq": f"tcp://127.0.0.1:{proxy.zmq_port}"}
                    for bridge, bench in BENCHES.items():
                        PROBE.pid = pids.get(bridge)
                        latencies = asyncio.run(bench(targets[bridge], None, args.concurrency, args.duration))
                        row = {"loop": loop, "bridge": bridge, "repeat": repeat,
                               "req_s": round(len(latencies) / args.duration, 1),
                               "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
                               "cpu_us_per_request": round(PROBE.window_s / len(latencies) * 1e6, 1)}
                        rows.append(row)
                        print(f"{loop:<8} {bridge:<5} c={args.concurrency}  {row['req_s']:>8} req/s  "
                              f"p50 {row['p50_ms']:>7} ms  bridge CPU {row['cpu_us_per_request']:>7} µs/request",
                              flush=True)
    print("\n| bridge | loop | req/s (median) | bridge CPU µs/request (median) |\n|---|---|---|---|")
    for bridge in BENCHES:
        for loop in ("asyncio", "uvloop"):
            mine = [r for r in rows if r["bridge"] == bridge and r["loop"] == loop]
            print(f"| {bridge} | {loop} | {statistics.median(r['req_s'] for r in mine):.0f} | "
                  f"{statistics.median(r['cpu_us_per_request'] for r in mine):.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
