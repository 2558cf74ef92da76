"""The cost of metrics: the same proxy with INFEROXY_METRICS=true and false, measured in one run.

    python bench/bench_metrics.py [--rounds 3] [--duration 5] [--json bench/results/metrics.json]
    python bench/bench_metrics.py --micro      # one bridge's per-request recording, alone

Starts two `inferoxy serve` (echo model, process replicas, loopback), one with metrics on and one with
them off, and measures them in turns (on, off, on, off, ...: drift on a busy machine falls on both):
ZeroMQ with 64 clients in flight and REST with 32 (the load generators of bench/bench_bridges.py).
Prints each measurement, the medians and the on/off ratios per bridge: of throughput, and of the CPU all
the proxy's processes spent per request (bench/procs.py, from /proc), which a busy machine's noise moves
far less than req/s.

``--micro`` times what a bridge adds per request (bridges/metering.py ``Meter.record``, which tallies
and flushes every ``FLUSH_S``) against recording each request into prometheus-client directly (its
multiprocess mode, as under serve: every update a locked write to a memory-mapped file).
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
import timeit
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_bridges import ECHO_ONLY, Proxy, bench_rest, bench_zmq, free_port, summarise  # noqa: E402
from bench.procs import cpu_by_label  # noqa: E402

LOADS = (("zmq", 64), ("rest", 32))


def measure(proxy: Proxy, bridge: str, concurrency: int, duration: float) -> dict[str, Any]:
    """req/s and latency, and the CPU the proxy's processes spent per request (warm-up included in both:
    bench_bridges' loaders warm up for up to 1 s first, so the CPU is divided by every request sent)."""
    assert proxy.process is not None
    cpu_before = cpu_by_label(proxy.process.pid)
    if bridge == "zmq":
        latencies = asyncio.run(bench_zmq(f"tcp://127.0.0.1:{proxy.zmq_port}", concurrency, duration))
    else:
        latencies = asyncio.run(bench_rest(f"http://127.0.0.1:{proxy.rest_port}", concurrency, duration))
    cpu_after = cpu_by_label(proxy.process.pid)
    row = summarise(bridge, concurrency, duration, latencies)
    sent = len(latencies) * (1 + min(1.0, duration) / duration)  # the measured requests and about the warm-up's
    spent = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    row["cpu_us_per_request"] = round(sum(spent.values()) / sent * 1e6, 1)
    row["bridge_cpu_us_per_request"] = round(spent.get(f"{bridge}_bridge", 0.0) / sent * 1e6, 1)
    return row


def macro(rounds: int, duration: float, path: str, same: bool = False) -> None:
    models = Path(tempfile.mkdtemp()) / "models.yaml"
    models.write_text(ECHO_ONLY)
    on, off = Proxy(str(models)), Proxy(str(models))
    # --same: both with metrics on, so the two columns differ only by chance: the noise floor of the run.
    on.env["INFEROXY_METRICS"], off.env["INFEROXY_METRICS"] = "true", "true" if same else "false"
    off.env["INFEROXY_INSTANCE"] += "off"
    for proxy in (on, off):  # bench_bridges' Proxy leaves gRPC on its default port, which only one may take
        proxy.env["INFEROXY_GRPC_PORT"] = str(free_port())
    rows: list[dict[str, Any]] = []
    with on, off:
        for round_ in range(rounds):
            for bridge, concurrency in LOADS:
                # Which goes first alternates: whatever the machine drifts by within a round falls on both.
                pair = (("on", on), ("off", off))
                for metrics, proxy in pair if round_ % 2 == 0 else reversed(pair):
                    row = {"round": round_, "metrics": metrics, **measure(proxy, bridge, concurrency, duration)}
                    rows.append(row)
                    print(f"round {round_} metrics {metrics:3} {bridge:4} c={concurrency:<3} {row['rps']:>9.1f} req/s"
                          f"  p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  CPU µs/request: proxy "
                          f"{row['cpu_us_per_request']}, bridge {row['bridge_cpu_us_per_request']}", flush=True)
    summary = []
    print("\n| bridge | c | req/s on (median) | req/s off | on/off | proxy CPU µs/req on | off | on/off "
          "| bridge CPU µs/req on | off |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for bridge, concurrency in LOADS:
        def median(metrics: str, field: str, b: str = bridge) -> float:
            return statistics.median(r[field] for r in rows if r["bridge"] == b and r["metrics"] == metrics)

        ratio = median("on", "rps") / median("off", "rps")
        cpu_ratio = median("on", "cpu_us_per_request") / median("off", "cpu_us_per_request")
        summary.append({"bridge": bridge, "concurrency": concurrency, "rps_on": median("on", "rps"),
                        "rps_off": median("off", "rps"), "ratio": round(ratio, 4), "cpu_ratio": round(cpu_ratio, 4)})
        print(f"| {bridge} | {concurrency} | {median('on', 'rps'):.0f} | {median('off', 'rps'):.0f} | {ratio:.3f} "
              f"| {median('on', 'cpu_us_per_request'):.0f} | {median('off', 'cpu_us_per_request'):.0f} "
              f"| {cpu_ratio:.3f} | {median('on', 'bridge_cpu_us_per_request'):.0f} "
              f"| {median('off', 'bridge_cpu_us_per_request'):.0f} |")
    machine = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"machine": machine, "rounds": rounds, "duration_s": duration, "runs": rows,
                                      "summary": summary}, indent=2))
    print(f"\nwritten to {path}")


def micro(number: int = 200_000) -> None:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="inferoxy-bench-metrics-")
    from bridges.catalog import Catalog
    from bridges.metering import Meter, clock
    from inferoxy import metrics
    from model_manager.spec import ModelSpec
    from model_manager.store import Registry

    metrics.use_directory(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    spec = ModelSpec(name="echo", model_class="examples.models.echo.model:EchoModel")
    catalog = Catalog()
    catalog.apply(Registry({spec.key: spec}, {"echo": "1"}, 1))
    meter = Meter("zmq", catalog)
    started = clock()

    def cached() -> None:
        meter.record("echo", None, metrics.OK, started)

    counter = metrics.REQUESTS.labels("zmq", "echo", "1", metrics.OK)
    histogram = metrics.REQUEST_SECONDS.labels("zmq", "echo", "1", metrics.OK)

    def uncached() -> None:
        counter.inc()
        histogram.observe(clock() - started)

    def nothing() -> None:
        pass

    async def timed() -> None:  # in a running loop, as in a bridge: record() schedules its flush there
        for name, call in (("Meter.record (tallied)", cached), ("prometheus-client per request", uncached),
                           ("an empty call (the floor)", nothing)):
            best = min(timeit.repeat(call, number=number, repeat=5))
            print(f"{name:32} {best / number * 1e6:6.2f} µs per request")
        meter.flush()

    asyncio.run(timed())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each proxy per load (at least 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--json", default="bench/results/metrics.json", help="where to write the figures")
    parser.add_argument("--micro", action="store_true", help="time one bridge's per-request recording alone")
    parser.add_argument("--same", action="store_true", help="metrics on in both proxies: the run's noise floor")
    args = parser.parse_args()
    if args.micro:
        micro()
        return
    started = time.monotonic()
    macro(max(args.rounds, 1), args.duration, args.json, same=args.same)
    print(f"took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
