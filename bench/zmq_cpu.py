"""Where a ZeroMQ request's CPU goes: each process of `inferoxy serve`, and the client itself.

    python bench/zmq_cpu.py [--concurrency 64] [--duration 5] [--rounds 3] [--pyspy DIR]

Starts `inferoxy serve` with the echo model (bench_bridges.Proxy), drives the ZeroMQ bridge with the
closed-loop AsyncClient of bench_bridges, and prints per round: req/s, p50, and CPU µs per request of
the client, the bridge, the batch manager, the task manager and the replica (read from /proc). On a
machine with fewer cores than processes, the sum of those is what caps req/s. ``--pyspy DIR`` records
every process (client included) with py-spy during one extra round and writes a summary per process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402
import pyspy_summary  # noqa: E402
from bench_bridges import ECHO_ONLY, Proxy, bench_zmq, summarise  # noqa: E402


def one_round(proxy: Proxy, concurrency: int, duration: float) -> dict[str, object]:
    assert proxy.process is not None
    before = procs.cpu_by_label(proxy.process.pid)
    own = time.process_time()
    latencies = asyncio.run(bench_zmq(f"tcp://127.0.0.1:{proxy.zmq_port}", concurrency, duration))
    own = time.process_time() - own
    after = procs.cpu_by_label(proxy.process.pid)
    row = summarise("zmq", concurrency, duration, latencies)
    # The warm-up pass (up to 1 s) is in the CPU times too: divide by every request sent.
    sent = len(latencies) * (duration + min(1.0, duration)) / duration
    cpu = {name: (after[name] - before.get(name, 0.0)) * 1e6 / sent for name in after if name != "redis"}
    cpu["client"] = own * 1e6 / sent
    row["cpu_us_per_request"] = {name: round(us, 1) for name, us in sorted(cpu.items())}
    row["cpu_us_total"] = round(sum(cpu.values()), 1)
    return row


def show(row: dict[str, object]) -> str:
    cpu = row["cpu_us_per_request"]
    assert isinstance(cpu, dict)
    parts = "  ".join(f"{name} {us:.0f}" for name, us in cpu.items())
    return (f"c={row['concurrency']} {row['rps']:>8.0f} req/s  p50 {row['p50_ms']:.3f} ms  "
            f"CPU µs/request: {parts}  (total {row['cpu_us_total']:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pyspy", type=Path, metavar="DIR", help="py-spy every process during an extra round")
    args = parser.parse_args()

    models = Path(tempfile.mkdtemp()) / "models.yaml"
    models.write_text(ECHO_ONLY)
    with Proxy(str(models)) as proxy:
        assert proxy.process is not None
        for concurrency in args.concurrency:
            rows = [one_round(proxy, concurrency, args.duration) for _ in range(args.rounds)]
            for row in rows:
                print(show(row), flush=True)
            rows.sort(key=lambda row: float(row["rps"]))  # type: ignore[arg-type]
            print("median:", show(rows[len(rows) // 2]), flush=True)
        if args.pyspy is not None:
            profile(proxy, args.concurrency[-1], args.duration, args.pyspy)


def profile(proxy: Proxy, concurrency: int, duration: float, directory: Path) -> None:
    assert proxy.process is not None
    directory.mkdir(parents=True, exist_ok=True)
    rate, seconds = 200, int(duration) + 3
    pids = {pid: procs.label(pid) for pid in procs.tree(proxy.process.pid) if procs.label(pid) != "redis"}
    pids[os.getpid()] = "client"
    spies = [subprocess.Popen(
        ["py-spy", "record", "--nonblocking", "--format", "raw", "--rate", str(rate), "--duration", str(seconds),
         "--pid", str(pid), "--output", str(directory / f"{name}-{pid}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid, name in pids.items()]
    time.sleep(1.0)  # let py-spy attach
    row = one_round(proxy, concurrency, duration)
    for spy in spies:
        spy.wait(timeout=seconds + 30)
    lines = [f"# ZeroMQ c={concurrency} under py-spy: {show(row)}\n"]
    for pid, name in pids.items():
        lines.append(pyspy_summary.summarise_file(directory / f"{name}-{pid}.txt", name, rate, seconds))
    (directory / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
