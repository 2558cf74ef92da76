"""Inferoxy beside NVIDIA Triton and a bare grpc.aio server, through the same clients: issue 13's targets.

    bash bench/triton_env.sh                       # once: Triton's own venv, bench/.triton-venv
    python bench/bench_vs_triton.py [--duration 3] [--repeats 3] [--json bench/results/vs_triton.json]
        [--triton-python bench/.triton-venv/bin/python] [--large-concurrency 4] [--profile DIR]

Starts, each in a process group of its own and stopped by PID at the end (Ctrl-C included):
  - Triton: PyTriton serving one identity model per shape (bench/triton_identity.py, dynamic batching
    max 64 / 0.5 ms queue delay), from the Triton venv; skipped, saying so, when that venv is absent;
  - a bare grpc.aio echo server with no batching (bench/grpc_echo_server.py): the Python gRPC ceiling;
  - Inferoxy: `inferoxy serve` with the echo model (bench_bridges.Proxy), REST, gRPC and ZeroMQ bridges.
Every cell is driven by the same closed-loop clients: tritonclient's asyncio gRPC and HTTP (binary)
clients (bench_triton.py) for every server, and Inferoxy's AsyncClient for its ZeroMQ bridge
(bench_bridges.py). Each cell runs --repeats times, in rounds (every cell once per round, so a noisy
moment spreads over all of them), and the median is reported. Besides req/s and latency, each cell
records the CPU time every process of the server spent per request (from /proc). --profile DIR also
samples each Inferoxy process with py-spy during an extra gRPC c=32 and ZeroMQ c=64 pass (not counted).
--bus-curve off runs Inferoxy without CURVE on its internal bus, to tell encryption's share of large tensors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402
import pyspy_summary  # noqa: E402
from bench_bridges import ECHO_ONLY, Call, Proxy, closed_loop, free_port, summarise, zmq_caller  # noqa: E402
from bench_triton import grpc_caller, http_caller  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_TRITON_PYTHON = HERE / ".triton-venv" / "bin" / "python"
TRITON, INFEROXY, BARE = "Triton", "Inferoxy", "grpc.aio"


@dataclass(frozen=True)
class Case:
    title: str
    triton_model: str  # bench/triton_identity.py's MODELS
    payload: np.ndarray = field(compare=False)


def _cases() -> dict[str, Case]:
    rng = np.random.default_rng(13)
    return {
        "small": Case("FP32 [1,16]", "echo_fp32_16", np.arange(16, dtype=np.float32)[None]),
        "frame": Case("UINT8 [1,1080,1920,3]", "echo_uint8_frame",
                      rng.integers(0, 256, (1, 1080, 1920, 3), dtype=np.uint8)),
        "image": Case("FP32 [1,3,224,224]", "echo_fp32_image", rng.random((1, 3, 224, 224), dtype=np.float32)),
    }


@dataclass(frozen=True)
class Cell:
    case: str
    protocol: str  # grpc | http | zmq
    concurrency: int
    systems: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.case} {self.protocol} c={self.concurrency}"


def plan(large_concurrency: int) -> list[Cell]:
    everyone = (TRITON, INFEROXY, BARE)
    cells = [Cell("small", "grpc", 32, everyone), Cell("small", "grpc", 1, everyone),
             Cell("small", "http", 32, (TRITON, INFEROXY)),
             Cell("small", "zmq", 64, (INFEROXY,)), Cell("small", "zmq", 1, (INFEROXY,))]
    for large in ("frame", "image"):
        cells += [Cell(large, "grpc", large_concurrency, everyone), Cell(large, "zmq", large_concurrency, (INFEROXY,))]
    return cells


# -- the servers -----------------------------------------------------------------------------------


@dataclass
class Server:
    """Where one system listens, and the PID whose process tree is all of it."""

    root: int
    grpc: str | None = None
    http: str | None = None
    zmq: str | None = None
    models_by_case: bool = False  # Triton: one model per case; the others answer any shape as "echo"


@contextmanager
def triton(python: Path, logs: Path) -> Iterator[tuple[Server, Callable[[], None]]]:
    """Start PyTriton; yields its Server and a function that waits until it serves (it loads for ~15 s)."""
    grpc_port, http_port = free_port(), free_port()
    # tritonserver's Python backend stub links libpython3.11.so: the venv's own interpreter's must be found.
    prefix = subprocess.run([str(python), "-c", "import sys; print(sys.base_prefix)"], check=True,
                            capture_output=True, text=True).stdout.strip()
    libs = ":".join(filter(None, [f"{prefix}/lib", os.environ.get("LD_LIBRARY_PATH")]))
    env = {**os.environ, "LD_LIBRARY_PATH": libs}
    env.pop("PYTHONPATH", None)  # Inferoxy's path has nothing for this venv
    log = logs / "triton.log"
    process = procs.start_group([str(python), str(HERE / "triton_identity.py"), "--grpc-port", str(grpc_port),
                                 "--http-port", str(http_port), "--metrics-port", str(free_port())], log, env)
    try:
        server = Server(process.pid, grpc=f"127.0.0.1:{grpc_port}", http=f"127.0.0.1:{http_port}",
                        models_by_case=True)
        yield server, lambda: procs.wait_for_line(process, log, "ready", 180)
    finally:
        procs.stop_group(process)


@contextmanager
def bare_grpc(logs: Path) -> Iterator[Server]:
    port = free_port()
    log = logs / "grpc_echo.log"
    process = procs.start_group([sys.executable, str(HERE / "grpc_echo_server.py"), "--port", str(port)], log)
    try:
        procs.wait_for_line(process, log, "ready", 60)
        yield Server(process.pid, grpc=f"127.0.0.1:{port}")
    finally:
        procs.stop_group(process)


@contextmanager
def inferoxy(logs: Path, bus_curve: bool, batch_delay_ms: float) -> Iterator[Server]:
    models = logs / "models.yaml"
    models.write_text(ECHO_ONLY.replace("max_batch_delay_ms: 0", f"max_batch_delay_ms: {batch_delay_ms}"))
    proxy = Proxy(str(models))
    grpc_port = free_port()
    proxy.env.update({"INFEROXY_GRPC_PORT": str(grpc_port), "INFEROXY_BRIDGES": "rest,grpc,zmq",
                      "INFEROXY_BUS_CURVE": "true" if bus_curve else "false"})
    with proxy:
        assert proxy.process is not None
        yield Server(proxy.process.pid, grpc=f"127.0.0.1:{grpc_port}", http=f"127.0.0.1:{proxy.rest_port}",
                     zmq=f"tcp://127.0.0.1:{proxy.zmq_port}")


@contextmanager
def servers(triton_python: Path | None, logs: Path, bus_curve: bool,
            batch_delay_ms: float) -> Iterator[dict[str, Server]]:
    """Every system, ready when this yields; Triton loads its models while the others start."""
    with ExitStack() as stack:
        started: dict[str, Server] = {}
        triton_ready: Callable[[], None] = lambda: None  # noqa: E731
        if triton_python is not None:
            started[TRITON], triton_ready = stack.enter_context(triton(triton_python, logs))
        started[BARE] = stack.enter_context(bare_grpc(logs))
        started[INFEROXY] = stack.enter_context(inferoxy(logs, bus_curve, batch_delay_ms))
        try:
            triton_ready()
        except (RuntimeError, AssertionError) as exc:  # the others are still worth measuring
            print(f"Triton skipped: it did not start ({exc})", flush=True)
            del started[TRITON]
        yield started


# -- measuring -------------------------------------------------------------------------------------


def caller(server: Server, cell: Cell, case: Case) -> AbstractAsyncContextManager[Call]:
    model = case.triton_model if server.models_by_case else "echo"
    if cell.protocol == "grpc":
        assert server.grpc is not None
        return grpc_caller(server.grpc, model=model, payload=case.payload)
    if cell.protocol == "http":
        assert server.http is not None
        return http_caller(server.http, model=model, payload=case.payload, connections=cell.concurrency)
    assert server.zmq is not None
    return zmq_caller(server.zmq, case.payload)


async def measure(server: Server, cell: Cell, case: Case, duration: float) -> dict[str, Any]:
    """One closed-loop pass after a discarded warm-up, with the CPU each of the server's processes spent."""
    async with caller(server, cell, case) as call:
        await closed_loop(call, cell.concurrency, min(1.0, duration))
        before, client_before, start = procs.cpu_by_label(server.root), time.process_time(), time.perf_counter()
        latencies = await closed_loop(call, cell.concurrency, duration)
        elapsed = time.perf_counter() - start
        after, client_s = procs.cpu_by_label(server.root), time.process_time() - client_before
    row = summarise(cell.protocol, cell.concurrency, elapsed, latencies)
    count = max(1, len(latencies))
    row["cpu_us_per_request"] = {name: round((after[name] - before.get(name, 0.0)) / count * 1e6, 1)
                                 for name in sorted(after)}
    row["server_cpu_us_per_request"] = round(sum(row["cpu_us_per_request"].values()), 1)
    row["client_cpu_percent"] = round(client_s / elapsed * 100, 1)
    return row


def idle_cpu(started: dict[str, Server], seconds: float = 3.0) -> dict[str, dict[str, float]]:
    """Each system's CPU use with no load, in % of one core per process kind: what its c=1 figures carry."""
    time.sleep(2.0)  # a replica may still be starting when `serve` says it serves
    before = {system: procs.cpu_by_label(server.root) for system, server in started.items()}
    time.sleep(seconds)
    after = {system: procs.cpu_by_label(server.root) for system, server in started.items()}
    return {system: {name: round((used - before[system].get(name, 0.0)) / seconds * 100, 1)
                     for name, used in sorted(after[system].items())} for system in started}


def run_rounds(started: dict[str, Server], cells: list[Cell], cases: dict[str, Case], duration: float,
               repeats: int) -> dict[tuple[str, str], list[dict[str, Any]]]:
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for round_ in range(1, repeats + 1):
        for cell in cells:
            for system in cell.systems:
                if system not in started:
                    continue
                try:
                    row = asyncio.run(measure(started[system], cell, cases[cell.case], duration))
                except Exception as exc:  # noqa: BLE001 - one failed cell must not lose the others
                    row = {"error": f"{type(exc).__name__}: {exc}"}
                runs.setdefault((cell.key, system), []).append(row)
                print(f"round {round_}/{repeats}  {cell.key:18} {system:9} {describe(row)}", flush=True)
    return runs


def describe(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"FAILED {row['error']}"
    return (f"{row['rps']:>8.1f} req/s  p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  "
            f"server CPU {row['server_cpu_us_per_request']:.0f} µs/req  client CPU {row['client_cpu_percent']:.0f}%")


def median_of(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    good = [row for row in rows if "error" not in row]
    if not good:
        return None
    labels = {name for row in good for name in row["cpu_us_per_request"]}
    return {
        "rps": statistics.median(row["rps"] for row in good),
        "rps_min": min(row["rps"] for row in good), "rps_max": max(row["rps"] for row in good),
        "p50_ms": statistics.median(row["p50_ms"] for row in good),
        "p99_ms": statistics.median(row["p99_ms"] for row in good),
        "server_cpu_us_per_request": statistics.median(row["server_cpu_us_per_request"] for row in good),
        "cpu_us_per_request": {name: statistics.median(row["cpu_us_per_request"].get(name, 0.0) for row in good)
                               for name in sorted(labels)},
        "runs_ok": len(good), "runs": len(rows),
    }


def copy_cost_us(payload: np.ndarray, tries: int = 20) -> float:
    """What one memcpy of the tensor's bytes costs on this machine (median), to read CPU figures as copies."""
    target = np.empty_like(payload)
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        np.copyto(target, payload)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1)


# -- the report ------------------------------------------------------------------------------------


def targets(cells: list[Cell], medians: dict[tuple[str, str], dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Issue 13's targets: each with whether it holds (None: not measured) and the figures behind it."""
    def compare(name: str, ours: dict[str, Any] | None, theirs: dict[str, Any] | None, needed: float,
                anchor: str = "Triton's req/s in the same cell") -> None:
        if ours is None or theirs is None:
            found.append({"target": name, "holds": None, "detail": "not measured (no Triton, or the cell failed)"})
            return
        ratio = ours["rps"] / theirs["rps"]
        found.append({"target": name, "holds": ratio >= needed,
                      "detail": f"{ratio:.2f}× {anchor} (needs ≥ {needed}×: {(1 - ratio / needed) * 100:.0f}% short)"
                      if ratio < needed else f"{ratio:.2f}× {anchor} (needs ≥ {needed}×)"})

    def absolute(name: str, ours: dict[str, Any] | None, metric: str, holds: Callable[[float], bool]) -> None:
        if ours is None:
            found.append({"target": name, "holds": None, "detail": "not measured"})
            return
        found.append({"target": name, "holds": holds(ours[metric]),
                      "detail": f"{ours[metric]:,.0f} req/s" if metric == "rps" else f"p50 {ours[metric]:.2f} ms"})

    found: list[dict[str, Any]] = []
    get = medians.get
    compare("gRPC c=32 ≥ 1.3× Triton", get(("small grpc c=32", INFEROXY)), get(("small grpc c=32", TRITON)), 1.3)
    ours, theirs = get(("small grpc c=1", INFEROXY)), get(("small grpc c=1", TRITON))
    if ours is None or theirs is None:
        found.append({"target": "gRPC c=1 p50 below Triton's", "holds": None, "detail": "not measured"})
    else:
        found.append({"target": "gRPC c=1 p50 below Triton's", "holds": ours["p50_ms"] < theirs["p50_ms"],
                      "detail": f"{ours['p50_ms']:.2f} ms against Triton's {theirs['p50_ms']:.2f} ms"})
    compare("HTTP binary c=32 ≥ 1.3× Triton", get(("small http c=32", INFEROXY)), get(("small http c=32", TRITON)),
            1.3)
    absolute("ZeroMQ c=64 ≥ 10,000 req/s", get(("small zmq c=64", INFEROXY)), "rps", lambda rps: rps >= 10_000)
    absolute("ZeroMQ c=1 p50 ≤ 1 ms", get(("small zmq c=1", INFEROXY)), "p50_ms", lambda ms: ms <= 1.0)
    for cell in cells:
        if cell.case != "small":
            anchor = f"{cell.case} grpc c={cell.concurrency}"
            compare(f"{cell.key} ≥ Triton gRPC", get((cell.key, INFEROXY)), get((anchor, TRITON)), 1.0,
                    "Triton's gRPC req/s on the same shape")
    return found


def print_table(cells: list[Cell], cases: dict[str, Case], medians: dict[tuple[str, str], dict[str, Any] | None],
                found: list[dict[str, Any]]) -> None:
    print("\n| case | protocol | c | Triton req/s (min–max), p50 ms | Inferoxy | Inferoxy/Triton "
          "| grpc.aio | CPU µs/req Triton | Inferoxy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell in cells:
        got = {system: medians.get((cell.key, system)) for system in (TRITON, INFEROXY, BARE)}
        ours, theirs = got[INFEROXY], got[TRITON]
        ratio = f"{ours['rps'] / theirs['rps']:.2f}×" if ours and theirs else "—"
        print(f"| {cases[cell.case].title} | {cell.protocol} | {cell.concurrency} | {_cell(theirs)} | {_cell(ours)} "
              f"| {ratio} | {_cell(got[BARE])} | {_cpu(theirs)} | {_cpu(ours)} |")
    print("\n| target (issue 13) | holds | figures |\n|---|---|---|")
    for target in found:
        holds = {True: "yes", False: "**no**", None: "—"}[target["holds"]]
        print(f"| {target['target']} | {holds} | {target['detail']} |")


def _cell(median: dict[str, Any] | None) -> str:
    if median is None:
        return "—"
    return f"{median['rps']:,.0f} ({median['rps_min']:,.0f}–{median['rps_max']:,.0f}), p50 {median['p50_ms']:.2f}"


def _cpu(median: dict[str, Any] | None) -> str:
    return "—" if median is None else f"{median['server_cpu_us_per_request']:,.0f}"


def print_cpu_breakdown(cells: list[Cell], cases: dict[str, Case],
                        medians: dict[tuple[str, str], dict[str, Any] | None], copies: dict[str, float]) -> None:
    print("\nCPU µs per request by process (median):")
    for cell in cells:
        for system in cell.systems:
            median = medians.get((cell.key, system))
            if median is None:
                continue
            parts = ", ".join(f"{name} {us:,.0f}" for name, us in median["cpu_us_per_request"].items() if us >= 0.5)
            print(f"  {cell.key:18} {system:9} {parts}")
    for name, cost in copies.items():
        print(f"one copy of {cases[name].title} ({cases[name].payload.nbytes:,} B) costs {cost:,.0f} µs here")


# -- profiles --------------------------------------------------------------------------------------


def profile(server: Server, cells: list[Cell], cases: dict[str, Case], duration: float, directory: Path) -> None:
    """py-spy on every Inferoxy process during an extra pass of each cell; a summary per process."""
    directory.mkdir(parents=True, exist_ok=True)
    rate = 100
    lines = []
    for cell in cells:
        pids = [pid for pid in procs.tree(server.root) if procs.label(pid) != "redis"]  # py-spy reads Python
        spies = {pid: subprocess.Popen(
            ["py-spy", "record", "--nonblocking", "--format", "raw", "--rate", str(rate), "--duration",
             str(int(duration) + 3), "--pid", str(pid), "--output",
             str(directory / f"{cell.case}-{cell.protocol}-c{cell.concurrency}-{procs.label(pid)}-{pid}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids}
        time.sleep(1.0)  # let py-spy attach before the measured pass
        row = asyncio.run(measure(server, cell, cases[cell.case], duration))
        for spy in spies.values():
            spy.wait(timeout=duration + 30)
        lines.append(f"## {cell.key} (under py-spy: {describe(row)})\n")
        for pid in pids:
            name = procs.label(pid)
            path = directory / f"{cell.case}-{cell.protocol}-c{cell.concurrency}-{name}-{pid}.txt"
            cpu_percent = row["cpu_us_per_request"].get(name, 0.0) * row["rps"] / 1e4
            lines.append(pyspy_summary.summarise_file(path, name, rate, int(duration) + 3, cpu_percent=cpu_percent))
    (directory / "summary.md").write_text("\n".join(lines))
    print("\n" + "\n".join(lines))


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement (after a 1 s warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per cell; the median is reported")
    parser.add_argument("--large-concurrency", type=int, default=4, help="closed-loop callers for the large tensors")
    parser.add_argument("--triton-python", type=Path, default=DEFAULT_TRITON_PYTHON,
                        help="the Triton venv's python (bench/triton_env.sh makes it)")
    parser.add_argument("--bus-curve", choices=["on", "off"], default="on",
                        help="CURVE on Inferoxy's internal bus (on: the shipped default; off: every process trusted)")
    parser.add_argument("--batch-delay-ms", type=float, default=0.0,
                        help="the echo model's max_batch_delay_ms in Inferoxy (0.5, like Triton here, "
                        "measured: c=1 p50 4.8 ms against 2.8, no gain at c=32)")
    parser.add_argument("--only", nargs="+", choices=["small", "frame", "image"], help="only these cases")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy every Inferoxy process; write to DIR")
    parser.add_argument("--json", default="bench/results/vs_triton.json", help="where to write the figures")
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C, through every server's clean-up.
    signal.signal(signal.SIGTERM, _interrupt)

    triton_python: Path | None = args.triton_python
    if triton_python is not None and not triton_python.exists():
        print(f"Triton skipped: {triton_python} does not exist (run `bash bench/triton_env.sh`, or give "
              "--triton-python); Inferoxy and grpc.aio are still measured", flush=True)
        triton_python = None
    cases = _cases()
    cells = [cell for cell in plan(args.large_concurrency) if args.only is None or cell.case in args.only]
    logs = Path(tempfile.mkdtemp(prefix="bench-vs-triton-"))
    with servers(triton_python, logs, args.bus_curve == "on", args.batch_delay_ms) as started:
        print(f"serving: {', '.join(f'{name} (pid {server.root})' for name, server in started.items())}; "
              f"logs in {logs}", flush=True)
        idle = idle_cpu(started)
        for system, shares in idle.items():
            print(f"idle CPU, {system}: {sum(shares.values()):.1f}% of a core "
                  f"({', '.join(f'{name} {share:.1f}%' for name, share in shares.items() if share)})", flush=True)
        runs = run_rounds(started, cells, cases, args.duration, args.repeats)
        if args.profile is not None and shutil.which("py-spy") is None:
            print("--profile skipped: py-spy is not on PATH (pip install py-spy; it is in the dev extras)")
        elif args.profile is not None:
            profiled = [cell for cell in cells if cell.key in ("small grpc c=32", "small zmq c=64")]
            profile(started[INFEROXY], profiled, cases, args.duration, args.profile)

    medians = {key: median_of(rows) for key, rows in runs.items()}
    copies = {name: copy_cost_us(case.payload) for name, case in cases.items()
              if name != "small" and any(cell.case == name for cell in cells)}
    found = targets(cells, medians)
    print_table(cells, cases, medians, found)
    print_cpu_breakdown(cells, cases, medians, copies)
    write_json(args, runs, medians, found, copies, idle)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def write_json(args: argparse.Namespace, runs: dict[tuple[str, str], list[dict[str, Any]]],
               medians: dict[tuple[str, str], dict[str, Any] | None], found: list[dict[str, Any]],
               copies: dict[str, float], idle: dict[str, dict[str, float]]) -> None:
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
               "load_average": os.getloadavg()}
    cells = [{"cell": cell, "system": system, "runs": rows, "median": medians[(cell, system)]}
             for (cell, system), rows in runs.items()]
    settings = {"duration_s": args.duration, "repeats": args.repeats, "large_concurrency": args.large_concurrency,
                "bus_curve": args.bus_curve, "batch_delay_ms": args.batch_delay_ms}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine, "settings": settings, "cells": cells, "targets": found,
                               "copy_cost_us": copies, "idle_cpu_percent": idle}, indent=2))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
