"""What CURVE on the internal bus costs: the ZeroMQ bridge with the echo model, bus CURVE off and on.

    python bench/bench_bus_curve.py [--duration 5] [--rounds 2] [--sizes 64 1048576] [--concurrency 4]

Starts `inferoxy serve` (as bench_bridges.py does: bus over ipc://, replica over tcp://) once per
setting and round, alternating off/on so a busy machine's drift hits both, and drives it with
closed-loop AsyncClient workers sending one FP32 tensor of each size. Prints one row per run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bridges import ECHO_ONLY, Proxy, closed_loop, summarise  # noqa: E402

from inferoxy.client import AsyncClient  # noqa: E402


async def bench(url: str, size: int, concurrency: int, duration: float) -> list[float]:
    payload = {"x": np.zeros((1, max(1, size // 4)), dtype=np.float32)}
    async with AsyncClient(url, timeout=60) as client:
        async def call() -> None:
            await client.infer("echo", payload)

        await closed_loop(call, concurrency, min(1.0, duration))  # warm-up
        return await closed_loop(call, concurrency, duration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 1024 * 1024], help="tensor bytes")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as models:
        models.write(ECHO_ONLY)
    print("| bus CURVE | tensor bytes | req/s | p50 ms | p99 ms |\n|---|---|---|---|---|", flush=True)
    try:
        for _ in range(args.rounds):
            for curve in ("false", "true"):
                os.environ["INFEROXY_BUS_CURVE"] = curve
                # ipc:// in the shared temporary directory: CURVE on or off on every hop, as measured before.
                with Proxy(models.name, "ipc-curve") as proxy:
                    for size in args.sizes:
                        latencies = asyncio.run(bench(f"tcp://127.0.0.1:{proxy.zmq_port}", size, args.concurrency,
                                                      args.duration))
                        row = summarise("zmq", args.concurrency, args.duration, latencies)
                        print(f"| {curve} | {size} | {row['rps']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |",
                              flush=True)
    finally:
        os.unlink(models.name)


if __name__ == "__main__":
    main()
