"""What one dashboard sample costs the REST bridge: reading every process's metric samples and building the
JSON of ``GET /dashboard/state`` (bridges/overview.py), at several sizes, in this process (no sockets).

    python bench/bench_dashboard.py [--processes 6 30] [--models 3 50 500] [--repeats 20]
    python bench/bench_dashboard.py --live [--viewers 8] [--duration 5] [--repeats 3]

For each size it fills a fresh multiprocess samples directory the way ``inferoxy serve`` does: ``--processes``
child processes (the components) each record requests from three bridges, latency, batch sizes and queue
depth for every model (``--models``), then it times ``metric_samples.read()`` (what the
bridge runs in a worker thread) and ``build`` (the document, on the event loop) and the orjson encoding.

``--live`` measures the whole effect instead, on one ``inferoxy serve`` (bench_bridges.Proxy): first the REST
bridge's CPU time while idle, with no dashboard open and with ``--viewers`` pages polling the state every 1.5 s
as the page does (CPU time is what a shared machine's neighbours blur least); then REST echo requests from 16
closed-loop clients in rounds alternating between none open and ``--viewers`` open, printing req/s of each
round and the median ratio.

The overview takes a sample at most every second however many pages poll (it caches the document), so the
bridge's share of CPU is at most this figure once a second (or a tenth, when a read takes longer). Times are
medians of ``--repeats``; on a shared machine compare sizes within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RECORD = """
import sys
from inferoxy import metrics
models = int(sys.argv[1])
for n in range(models):
    name = f"model{n}"
    for bridge in metrics.BRIDGES:
        metrics.REQUESTS.labels(bridge, name, "1", metrics.OK).inc(100)
        metrics.REQUESTS.labels(bridge, name, "1", "overloaded").inc(3)
        metrics.REQUEST_SECONDS.labels(bridge, name, "1", metrics.OK).observe(0.002)
    metrics.BATCH_SIZE.labels(name, "1").observe(8)
    metrics.QUEUE_DEPTH.labels(name, "1").set(2)
"""


def fill(directory: str, processes: int, models: int) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory, "PYTHONPATH": str(REPO)}
    children = [subprocess.Popen([sys.executable, "-c", RECORD, str(models)], env=env) for _ in range(processes)]
    for child in children:
        if child.wait() != 0:
            raise SystemExit("a recording process failed")


def measure(processes: int, models: int, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as directory:
        fill(directory, processes, models)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        from bridges.overview import Sample, Window, build
        from inferoxy import metric_samples
        from model_manager.spec import ModelSpec
        from model_manager.store import Registry

        specs = [ModelSpec(name=f"model{n}", model_class="x:Y") for n in range(models)]
        registry = Registry({s.key: s for s in specs}, {s.name: "1" for s in specs}, 1)
        window = Window()
        reads, builds, encodes = [], [], []
        size = 0
        for i in range(repeats):
            started = time.perf_counter()
            read = metric_samples.read()
            reads.append(time.perf_counter() - started)
            sample = Sample(float(i), read.models, read.components)
            base = window.add(sample)
            started = time.perf_counter()
            document = build(registry, {}, sample, base, wall_time=time.time())
            builds.append(time.perf_counter() - started)
            started = time.perf_counter()
            size = len(orjson.dumps(document))
            encodes.append(time.perf_counter() - started)
        files = len(os.listdir(directory))
    return {"read_ms": statistics.median(reads) * 1e3, "build_ms": statistics.median(builds) * 1e3,
            "encode_ms": statistics.median(encodes) * 1e3, "bytes": size, "files": files}


def rest_bridge_pid(serve_pid: int) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == serve_pid and b"rest_bridge" in cmdline:
                return int(entry)
    raise SystemExit("no rest_bridge process under serve")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def live(viewers: int, duration: float, repeats: int) -> None:
    import asyncio

    import httpx

    sys.path.insert(0, str(REPO / "bench"))
    from bench_bridges import Proxy, bench_rest

    async def poll(url: str, stop: asyncio.Event) -> int:
        polls = 0
        async with httpx.AsyncClient(timeout=30) as client:
            while not stop.is_set():
                (await client.get(f"{url}/dashboard/state")).raise_for_status()
                polls += 1
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.5)
        return polls

    ratios = []
    with Proxy(str(REPO / "models.yaml")) as proxy:
        url = f"http://127.0.0.1:{proxy.rest_port}"
        assert proxy.process is not None
        bridge = rest_bridge_pid(proxy.process.pid)
        # CPU time is what the machine's neighbours do not blur: the REST bridge's, idle but for the viewers.
        for watched in (False, True, False, True):
            stop = asyncio.Event()
            pollers = [asyncio.create_task(poll(url, stop)) for _ in range(viewers if watched else 0)]
            before = cpu_seconds(bridge)
            await asyncio.sleep(duration * 2)
            used = cpu_seconds(bridge) - before
            stop.set()
            polls = sum(await asyncio.gather(*pollers))
            print(f"idle proxy, {viewers if watched else 0} dashboards: the REST bridge used "
                  f"{used / (duration * 2) * 1e3:.1f} ms of CPU a second ({polls} polls)")
        for repeat in range(repeats):
            rates = {}
            for watched in ((False, True) if repeat % 2 == 0 else (True, False)):
                stop = asyncio.Event()
                pollers = [asyncio.create_task(poll(url, stop)) for _ in range(viewers if watched else 0)]
                latencies = await bench_rest(url, 16, duration)
                stop.set()
                polls = sum(await asyncio.gather(*pollers))
                rates[watched] = len(latencies) / duration
                print(f"round {repeat + 1} {'with' if watched else 'without'} {viewers} dashboards: "
                      f"{rates[watched]:.0f} req/s ({polls} polls)")
            ratios.append(rates[True] / rates[False])
    if ratios:
        print(f"with/without: {', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[6, 30])
    parser.add_argument("--models", type=int, nargs="+", default=[3, 50, 500])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--live", action="store_true", help="REST throughput with and without dashboards open")
    parser.add_argument("--viewers", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    if args.live:
        import asyncio

        asyncio.run(live(args.viewers, args.duration, args.repeats))
        return
    if os.environ.get("BENCH_DASHBOARD_ONE"):  # one size, in this fresh interpreter
        print(orjson.dumps(measure(args.processes[0], args.models[0], args.repeats)).decode())
        return
    from bridges.overview import COST_FACTOR, MIN_INTERVAL_S

    print(f"{'processes':>9} {'models':>6} {'files':>5} {'read ms':>8} {'build ms':>8} {'encode ms':>9} "
          f"{'JSON KiB':>8} {'sample every s':>14}")
    for processes in args.processes:
        for models in args.models:
            # Each size in a fresh interpreter: prometheus-client reads PROMETHEUS_MULTIPROC_DIR once.
            out = subprocess.run([sys.executable, __file__, "--processes", str(processes), "--models", str(models),
                                  "--repeats", str(args.repeats)],
                                 env={**os.environ, "BENCH_DASHBOARD_ONE": "1", "PYTHONPATH": str(REPO)},
                                 capture_output=True, text=True, check=True)
            r = orjson.loads(out.stdout.strip().splitlines()[-1])
            every = max(MIN_INTERVAL_S, COST_FACTOR * r["read_ms"] / 1e3)
            print(f"{processes:>9} {models:>6} {r['files']:>5} {r['read_ms']:>8.2f} {r['build_ms']:>8.2f} "
                  f"{r['encode_ms']:>9.3f} {r['bytes'] / 1024:>8.1f} {every:>14.2f}")


if __name__ == "__main__":
    main()
