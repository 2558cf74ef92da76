"""What API keys cost: requests per second through each bridge with no key configured and with one, in one run.

    python bench/bench_auth.py [--duration 3] [--concurrency 16] [--repeats 3] [--json bench/results/auth.json]

Starts two `inferoxy serve` side by side (bench_bridges.Proxy, all three bridges, echo model only):
one with ``INFEROXY_AUTH=off`` (requests carry nothing), one with a key created through the admin API
(auth then required; each request carries the key, which has a rate limit far above the load, so the
token bucket is paid for too). Each repeat measures every bridge of each, one proxy at a time (the
idle one costs next to nothing); the order alternates between repeats, so drift in the machine's
speed falls on both. Prints each measurement, then the median of the repeats per bridge and the slowdown.

Throughput on a shared machine swings with the neighbours' load, so each measurement also records
the CPU time the bridge's own process spent per request (utime + stime from /proc, over the
measured window only): the cost a key adds shows there even when req/s is noise.

It also times the check itself in this process (``Authorizer.check``, no sockets), which a shared
machine's noise does not drown: what a key adds to each request, in microseconds.

Clients: ZeroMQ `inferoxy.client.AsyncClient(api_key=...)`; REST aiohttp with
`Authorization: Bearer KEY`; gRPC `tritonclient.grpc.aio` with `headers={"authorization": ...}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import tritonclient.grpc.aio as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bridges import ECHO_ONLY, Proxy, closed_loop, free_port, print_row, report, summarise  # noqa: E402

from inferoxy.client import AsyncClient, InferenceError  # noqa: E402

PAYLOAD = np.arange(16, dtype=np.float32)[None]
REST_BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                    "data": list(map(float, range(16)))}]}).encode()
Bench = Callable[[str, str | None, int, float], Awaitable[list[float]]]


class CpuProbe:
    """CPU seconds one process has used, read around the measured window (warm-up excluded)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.window_s = 0.0

    def read(self) -> float:
        if self.pid is None:
            return 0.0
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


PROBE = CpuProbe()


async def measure(call: Callable[[], Awaitable[None]], concurrency: int, duration: float) -> list[float]:
    await closed_loop(call, concurrency, min(1.0, duration))  # warm-up
    before = PROBE.read()
    latencies = await closed_loop(call, concurrency, duration)
    PROBE.window_s = PROBE.read() - before
    return latencies


def bridge_pids(root: int) -> dict[str, int]:
    """The bridge processes `inferoxy serve` (pid ``root``) started, by bridge: zmq, rest, grpc."""
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        for bridge in ("zmq", "rest", "grpc"):
            if parent == root and f"{bridge}_bridge".encode() in command:
                found[bridge] = int(entry)
    return found


async def bench_zmq(url: str, key: str | None, concurrency: int, duration: float) -> list[float]:
    async with AsyncClient(url, timeout=30, api_key=key) as client:
        async def call() -> None:
            await client.infer("echo", {"x": PAYLOAD})

        return await measure(call, concurrency, duration)


async def bench_rest(url: str, key: str | None, concurrency: int, duration: float) -> list[float]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def call() -> None:
            async with session.post(f"{url}/v2/models/echo/infer", data=REST_BODY, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"REST answered {response.status}")

        return await measure(call, concurrency, duration)


async def bench_grpc(address: str, key: str | None, concurrency: int, duration: float) -> list[float]:
    client = grpcclient.InferenceServerClient(address)
    tensor = grpcclient.InferInput("x", list(PAYLOAD.shape), "FP32")
    tensor.set_data_from_numpy(PAYLOAD)
    headers = {"authorization": f"Bearer {key}"} if key is not None else None
    try:
        async def call() -> None:
            await client.infer("echo", [tensor], headers=headers)

        return await measure(call, concurrency, duration)
    finally:
        await client.close()


async def open_to_anyone(url: str) -> bool:
    """True when a ZeroMQ request without a key is served (no key exists, as every bridge sees it)."""
    async with AsyncClient(url, timeout=5) as client:
        try:
            await client.infer("echo", {"x": PAYLOAD})
        except InferenceError as exc:
            if exc.code == "unauthenticated":
                return False
            raise
    return True


def wait_until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


BRIDGES = ["zmq", "rest", "grpc"]


def bench_proxy(models_file: str, label: str, auth: str) -> Proxy:
    """An `inferoxy serve` with all three bridges, its own bus addresses and instance name, INFEROXY_AUTH=auth."""
    proxy = Proxy(models_file)
    tag = f"{os.getpid()}-{label.replace(' ', '')}"
    proxy.env.update({
        "INFEROXY_GRPC_PORT": str(free_port()), "INFEROXY_BRIDGES": "rest,zmq,grpc", "INFEROXY_AUTH": auth,
        "INFEROXY_BATCH_MANAGER_URL": f"ipc://{tempfile.gettempdir()}/inferoxy-bench-auth-bm-{tag}",
        "INFEROXY_TASK_MANAGER_URL": f"ipc://{tempfile.gettempdir()}/inferoxy-bench-auth-tm-{tag}",
        "INFEROXY_INSTANCE": f"benchauth{tag}",
    })
    return proxy


def bench_targets(proxy: Proxy) -> dict[str, tuple[Bench, str]]:
    grpc_port = proxy.env["INFEROXY_GRPC_PORT"]
    return {"zmq": (bench_zmq, f"tcp://127.0.0.1:{proxy.zmq_port}"),
            "rest": (bench_rest, f"http://127.0.0.1:{proxy.rest_port}"),
            "grpc": (bench_grpc, f"127.0.0.1:{grpc_port}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench/results/auth.json", help="where to write the figures")
    args = parser.parse_args()

    models = Path(tempfile.mkdtemp()) / "models.yaml"
    models.write_text(ECHO_ONLY)
    # Two proxies side by side, measured in turn (the idle one costs next to nothing): one with auth off,
    # one with a key. Revoking the key would not reopen the second: in `auto`, keys once created stay required.
    proxies = {phase: bench_proxy(str(models), phase, auth) for phase, auth in (("no key", "off"), ("key", "auto"))}
    rows: list[dict[str, Any]] = []
    with proxies["no key"] as plain, proxies["key"] as keyed:
        # A rate far above the load: the bucket is checked on every request, and never refuses.
        created = httpx.post(f"http://127.0.0.1:{keyed.rest_port}/v2/admin/keys", timeout=10, json={
            "name": "bench", "scopes": ["infer"], "rate": 1e9, "burst": 1_000_000_000})
        created.raise_for_status()
        keys = {"no key": None, "key": created.json()["key"]}
        zmq_of_keyed = f"tcp://127.0.0.1:{keyed.zmq_port}"
        wait_until(lambda: not asyncio.run(open_to_anyone(zmq_of_keyed)), "the key to reach the bridges")
        targets = {phase: bench_targets(proxy) for phase, proxy in (("no key", plain), ("key", keyed))}
        pids = {phase: bridge_pids(proxy.process.pid) for phase, proxy in (("no key", plain), ("key", keyed))
                if proxy.process is not None}
        # One discarded pass over each first: a fresh proxy's first measurement is not like the others.
        for phase in targets:
            for bench, address in targets[phase].values():
                asyncio.run(bench(address, keys[phase], args.concurrency, min(1.0, args.duration)))
        for repeat in range(args.repeats):
            for phase in (["no key", "key"] if repeat % 2 == 0 else ["key", "no key"]):
                for bridge, (bench, address) in targets[phase].items():
                    PROBE.pid = pids[phase].get(bridge)
                    latencies = asyncio.run(bench(address, keys[phase], args.concurrency, args.duration))
                    row = summarise(f"{bridge} ({phase})", args.concurrency, args.duration, latencies)
                    cpu_us = round(PROBE.window_s / len(latencies) * 1e6, 1) if PROBE.pid else None
                    rows.append({**row, "repeat": repeat, "bridge_cpu_us_per_request": cpu_us})
                    print_row(rows[-1])
                    print(f"      bridge process CPU: {cpu_us} µs/request", flush=True)

    report(rows, args.duration, args.json)
    print_summary(rows, BRIDGES)
    costs = check_costs()
    print("\nAuthorizer.check per request: " + ", ".join(f"{name} {us:.2f} µs" for name, us in costs.items()))
    written = json.loads(Path(args.json).read_text())
    Path(args.json).write_text(json.dumps({**written, "check_us": costs}, indent=2))


def check_costs(calls: int = 200_000) -> dict[str, float]:
    """Microseconds per ``Authorizer.check``: open (no key exists), and with a key and its token bucket."""
    from bridges.auth import Authorizer
    from inferoxy.settings import Settings
    from model_manager.keys import ApiKey, digest

    open_auth, keyed_auth = Authorizer(Settings()), Authorizer(Settings())
    open_auth.apply([])
    keyed_auth.apply([ApiKey(name="bench", digest=digest("k" * 47), scopes=["infer"], rate=1e9, burst=10**9)])
    costs = {}
    for name, auth, credential in (("open", open_auth, None), ("key", keyed_auth, "k" * 47)):
        started = time.perf_counter()
        for _ in range(calls):
            auth.check(credential, "echo")
        costs[name] = round((time.perf_counter() - started) / calls * 1e6, 3)
    return costs


def print_summary(rows: list[dict[str, Any]], bridges: list[str]) -> None:
    print("\n| bridge | req/s, no key | req/s, key | slower by | bridge CPU µs/req, no key | key | more by |\n"
          "|---|---|---|---|---|---|---|")

    def median(bridge: str, phase: str, field: str) -> float:
        values = [r[field] for r in rows if r["bridge"] == f"{bridge} ({phase})" and r[field] is not None]
        return statistics.median(values) if values else float("nan")

    for bridge in bridges:
        plain, keyed = median(bridge, "no key", "rps"), median(bridge, "key", "rps")
        cpu_plain, cpu_keyed = (median(bridge, phase, "bridge_cpu_us_per_request") for phase in ("no key", "key"))
        print(f"| {bridge} | {plain:.0f} | {keyed:.0f} | {100 * (plain - keyed) / plain:+.1f}% "
              f"| {cpu_plain:.0f} | {cpu_keyed:.0f} | {100 * (cpu_keyed - cpu_plain) / cpu_plain:+.1f}% |")


if __name__ == "__main__":
    main()
