"""Requests per second and latency through the ZeroMQ and REST bridges, with the echo model.

    python bench/bench_bridges.py [--duration 10] [--concurrency 1 16 64] [--json results.json]
                                  [--bus serve|tcp|ipc-curve]

Starts its own `inferoxy serve` on free loopback ports (embedded Redis, process replicas),
drives each bridge with closed-loop clients (each sends its next request when the last
one is answered), prints a table and writes the figures as JSON.

``--bus`` picks the components' links (bridges -> batch manager -> task manager): ``serve``'s default
(ipc:// in a private directory, no CURVE), ``tcp`` (tcp://127.0.0.1 with CURVE, the default before), or
``ipc-curve`` (ipc:// in the shared temporary directory, so CURVE stays on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from inferoxy.client import AsyncClient

REPO = Path(__file__).resolve().parent.parent
ECHO_ONLY = """
models:
  echo:
    model_class: examples.models.echo.model:EchoModel
    max_batch_size: 64
    max_batch_delay_ms: 0
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bus_env(bus: str) -> dict[str, str]:
    """The bus URLs of a run: "serve" leaves them (replica link included) to `inferoxy serve`'s private ipc://
    directory, unless INFEROXY_REPLICA_BIND_URL is in the environment (the replica link as it was: tcp+CURVE)."""
    replicas = {"INFEROXY_REPLICA_BIND_URL": f"tcp://127.0.0.1:{free_port()}"}
    if bus == "tcp":
        return {"INFEROXY_BATCH_MANAGER_URL": f"tcp://127.0.0.1:{free_port()}",
                "INFEROXY_TASK_MANAGER_URL": f"tcp://127.0.0.1:{free_port()}", **replicas}
    if bus == "ipc-curve":
        return {"INFEROXY_BATCH_MANAGER_URL": f"ipc://{tempfile.gettempdir()}/inferoxy-bench-bm-{os.getpid()}",
                "INFEROXY_TASK_MANAGER_URL": f"ipc://{tempfile.gettempdir()}/inferoxy-bench-tm-{os.getpid()}",
                **replicas}
    return {}


class Proxy:
    def __init__(self, models_file: str, bus: str = "serve") -> None:
        self.rest_port, self.zmq_port = free_port(), free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("INFEROXY_BATCH_MANAGER_URL",
                                                                 "INFEROXY_TASK_MANAGER_URL")},
            **bus_env(bus),
            "INFEROXY_BIND_HOST": "127.0.0.1",
            "INFEROXY_REST_PORT": str(self.rest_port),
            "INFEROXY_ZMQ_PORT": str(self.zmq_port),
            "INFEROXY_EMBEDDED_REDIS_PORT": str(free_port()),
            "INFEROXY_MODELS_FILE": models_file,
            "INFEROXY_LOG_LEVEL": "WARNING",
            "INFEROXY_INSTANCE": f"bench{os.getpid()}",
        }
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Proxy:
        self.process = subprocess.Popen([sys.executable, "-m", "inferoxy", "serve"], env=self.env, cwd=REPO,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if "Inferoxy is serving" in line:
                return self
        raise RuntimeError("inferoxy serve exited before it was ready")

    def __exit__(self, *exc: Any) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


async def closed_loop(call: Any, concurrency: int, duration: float) -> list[float]:
    """Run ``concurrency`` workers that call ``call()`` back to back; return every latency in seconds."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration

    async def worker() -> None:
        while (start := time.perf_counter()) < stop_at:
            await call()
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


Call = Callable[[], Awaitable[None]]


async def warm_then_measure(caller: AbstractAsyncContextManager[Call], concurrency: int,
                            duration: float) -> list[float]:
    """A discarded warm-up pass (up to 1 s), then the measured closed loop, over one client."""
    async with caller as call:
        await closed_loop(call, concurrency, min(1.0, duration))
        return await closed_loop(call, concurrency, duration)


@asynccontextmanager
async def zmq_caller(url: str, payload: np.ndarray | None = None) -> AsyncIterator[Call]:
    """One AsyncClient; each call sends ``payload`` (default FP32 [1, 16]) as echo's input ``x``."""
    inputs = {"x": np.arange(16, dtype=np.float32)[None] if payload is None else payload}
    async with AsyncClient(url, timeout=30) as client:
        async def call() -> None:
            await client.infer("echo", inputs)

        yield call


async def bench_zmq(url: str, concurrency: int, duration: float) -> list[float]:
    return await warm_then_measure(zmq_caller(url), concurrency, duration)


async def bench_rest(url: str, concurrency: int, duration: float) -> list[float]:
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                   "data": list(map(float, range(16)))}]}).encode()
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def call() -> None:
            async with session.post(f"{url}/v2/models/echo/infer", data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"REST answered {response.status}")

        await closed_loop(call, concurrency, min(1.0, duration))
        return await closed_loop(call, concurrency, duration)


def summarise(bridge: str, concurrency: int, duration: float, latencies: list[float]) -> dict[str, Any]:
    ms = np.array(latencies) * 1000
    return {
        "bridge": bridge,
        "concurrency": concurrency,
        "requests": len(latencies),
        "rps": round(len(latencies) / duration, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def print_row(row: dict[str, Any]) -> None:
    print(f"{row['bridge']:5} c={row['concurrency']:<3} {row['rps']:>9.1f} req/s  p50 {row['p50_ms']:.3f} ms"
          f"  p99 {row['p99_ms']:.3f} ms", flush=True)


def report(rows: list[dict[str, Any]], duration: float, path: str) -> None:
    """Write the figures and the machine as JSON, and print them as a Markdown table."""
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"machine": machine, "duration_s": duration, "results": rows}, indent=2))
    print("\n| bridge | concurrency | req/s | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['bridge']} | {row['concurrency']} | {row['rps']:.0f} | {row['p50_ms']:.2f} "
              f"| {row['p99_ms']:.2f} |")
    print(f"\nwritten to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--bridges", nargs="+", default=["zmq", "rest"], choices=["zmq", "rest"])
    parser.add_argument("--json", default="bench/results/bridges.json", help="where to write the figures")
    parser.add_argument("--bus", default="serve", choices=["serve", "tcp", "ipc-curve"],
                        help="the components' links: serve's default, tcp:// with CURVE, or ipc:// with CURVE")
    args = parser.parse_args()

    models = Path(tempfile.mkdtemp()) / "models.yaml"
    models.write_text(ECHO_ONLY)
    with Proxy(str(models), args.bus) as proxy:
        rows = []
        for bridge in args.bridges:
            for concurrency in args.concurrency:
                if bridge == "zmq":
                    latencies = asyncio.run(bench_zmq(f"tcp://127.0.0.1:{proxy.zmq_port}", concurrency, args.duration))
                else:
                    latencies = asyncio.run(bench_rest(f"http://127.0.0.1:{proxy.rest_port}", concurrency,
                                                       args.duration))
                rows.append(summarise(bridge, concurrency, args.duration, latencies))
                print_row(rows[-1])

    report(rows, args.duration, args.json)


if __name__ == "__main__":
    main()
