"""CPU time each component spends per request on the data path, under ZeroMQ closed-loop load.

    python bench/bench_relay.py [--duration 10] [--concurrency 64]

Starts `inferoxy serve` as bench/bench_bridges.py does (echo model, FP32 [1, 16]), drives the
ZeroMQ bridge, and reads each component's CPU time (user + system, from /proc) before and after
the measured window: CPU µs per request for the task manager, the batch manager, the ZeroMQ
bridge and the replica. Wall-clock figures on a shared 2-core machine are noisy; CPU per request
moves far less with the neighbours, so it is the figure to compare between two versions of a
component (run both in the same session).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from bench_bridges import ECHO_ONLY, Proxy, closed_loop  # noqa: E402

from inferoxy.client import AsyncClient  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            child = int(entry.name)
            found += [child, *descendants(child)]
    return found


def role(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"inferoxy.runtime" in argv:
        return "replica"
    if b"run" in argv:
        return argv[argv.index(b"run") + 1].decode()
    return None


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def snapshot(root: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    for pid in descendants(root):
        name = role(pid)
        if name is not None:
            with contextlib.suppress(OSError):  # it ended meanwhile
                totals[name] = totals.get(name, 0.0) + cpu_s(pid)
    return totals


async def measure(url: str, root: int, concurrency: int, duration: float) -> tuple[int, dict[str, float],
                                                                                 dict[str, float]]:
    payload = {"x": np.arange(16, dtype=np.float32)[None]}
    async with AsyncClient(url, timeout=30) as client:
        async def call() -> None:
            await client.infer("echo", payload)

        await closed_loop(call, concurrency, 2.0)  # warm-up, outside the window
        before = snapshot(root)
        requests = len(await closed_loop(call, concurrency, duration))
        after = snapshot(root)
    return requests, before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    models = Path(tempfile.mkdtemp()) / "models.yaml"
    models.write_text(ECHO_ONLY)
    with Proxy(str(models)) as proxy:
        assert proxy.process is not None
        requests, before, after = asyncio.run(measure(f"tcp://127.0.0.1:{proxy.zmq_port}", proxy.process.pid,
                                                      args.concurrency, args.duration))
    print(f"ZeroMQ c={args.concurrency}: {requests / args.duration:.0f} req/s over {args.duration:g}s")
    print("| component | CPU s | CPU µs per request |\n|---|---|---|")
    for name in sorted(after):
        used = after[name] - before.get(name, 0.0)
        print(f"| {name} | {used:.2f} | {used / max(requests, 1) * 1e6:.1f} |")


if __name__ == "__main__":
    main()
