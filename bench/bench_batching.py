"""Dynamic batching and overload, measured end to end through the ZeroMQ bridge.

    python bench/bench_batching.py [--duration 10] [--max-batch-size 32] [--json bench/results/batching.json]

The model (tests.models_for_tests:CostModel) costs 5 ms per batch plus 0.1 ms per row, so its
ideal throughput at max batch size B is B / (5 + 0.1 B) ms. Three measurements, each against
its own `inferoxy serve` on free loopback ports:

1. Saturation, batching on: closed-loop clients (4 x B in flight) against max_batch_size B.
   Reports req/s against the ideal, the batch-size distribution (the model returns the rows of
   the batch each request ran in), p50/p99.
2. The same with batching off (max_batch_size 1).
3. Overload: an open-loop stream at twice the throughput measured in 1, every request with a
   deadline. Accepted requests must keep p99 within the deadline and the rest must be refused
   fast (`overloaded`, from the bounded queue); the proxy's resident memory (all its processes)
   is sampled throughout and must stay flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inferoxy.client import AsyncClient, InferenceError  # noqa: E402
from tests.support import ProxyProcess, descendants, wait_for  # noqa: E402

BATCH_MS, ROW_MS = 5.0, 0.1


def models_yaml(max_batch_size: int, max_queue_size: int) -> str:
    return f"""
models:
  cost:
    model_class: tests.models_for_tests:CostModel
    max_batch_size: {max_batch_size}
    max_batch_delay_ms: 2
    max_queue_size: {max_queue_size}
    env: {{COST_BATCH_MS: "{BATCH_MS}", COST_ROW_MS: "{ROW_MS}"}}
"""


def ideal_rps(max_batch_size: int) -> float:
    return max_batch_size / ((BATCH_MS + ROW_MS * max_batch_size) / 1000.0)


def start_proxy(max_batch_size: int, max_queue_size: int) -> ProxyProcess:
    path = Path(tempfile.mkdtemp()) / "models.yaml"
    path.write_text(models_yaml(max_batch_size, max_queue_size))
    proxy = ProxyProcess(env={"INFEROXY_MODELS_FILE": str(path), "INFEROXY_LOG_LEVEL": "WARNING",
                              "INFEROXY_BRIDGES": "zmq"}).start(timeout=120)
    payload = {"x": np.zeros((1, 16), np.float32)}

    async def ready() -> None:
        async with AsyncClient(proxy.zmq_url, timeout=30) as client:
            await client.infer("cost", payload)

    wait_for(lambda: asyncio.run(ready()) is None, timeout=60, what="the cost model")
    return proxy


def rss_mib(pid: int) -> float:
    total = 0
    for each in {pid, *descendants(pid)}:
        try:
            with open(f"/proc/{each}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024.0


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    if not latencies_s:
        return {"p50_ms": 0.0, "p99_ms": 0.0}
    ms = np.array(latencies_s) * 1000.0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


async def saturate(url: str, concurrency: int, duration: float) -> dict[str, Any]:
    payload = {"x": np.zeros((1, 16), np.float32)}
    latencies: list[float] = []
    sizes: Counter[int] = Counter()

    async with AsyncClient(url, timeout=30) as client:
        async def worker(stop_at: float, record: bool) -> None:
            while (start := time.perf_counter()) < stop_at:
                out = await client.infer("cost", payload)
                if record:
                    latencies.append(time.perf_counter() - start)
                    sizes[int(out["batch_rows"][0])] += 1

        warm = time.perf_counter() + 1.0
        await asyncio.gather(*(worker(warm, False) for _ in range(concurrency)))
        began = time.perf_counter()
        await asyncio.gather(*(worker(began + duration, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    # A batch of b rows is seen by b requests: count batches, not requests, for the distribution.
    batches = {size: count // size for size, count in sorted(sizes.items())}
    return {"rps": round(len(latencies) / elapsed, 1), "requests": len(latencies), **percentiles(latencies),
            "batch_sizes": batches, "mean_batch_rows": round(sum(s * n for s, n in batches.items())
                                                             / max(1, sum(batches.values())), 2)}


async def overload(proxy: ProxyProcess, rate: float, duration: float, deadline_s: float) -> dict[str, Any]:
    payload = {"x": np.zeros((1, 16), np.float32)}
    accepted: list[float] = []
    refused: list[float] = []
    other: Counter[str] = Counter()
    rss: list[float] = []
    assert proxy.process is not None
    pid = proxy.process.pid

    async with AsyncClient(proxy.zmq_url, timeout=deadline_s + 5) as client:
        async def one() -> None:
            start = time.perf_counter()
            try:
                await client.infer("cost", payload, parameters={"timeout": int(deadline_s * 1e6)})
                accepted.append(time.perf_counter() - start)
            except InferenceError as exc:
                if exc.code == "overloaded":
                    refused.append(time.perf_counter() - start)
                else:
                    other[exc.code] += 1

        tasks: set[asyncio.Task[None]] = set()
        began = time.perf_counter()
        sent = 0
        next_sample = began
        while (now := time.perf_counter()) < began + duration:
            due = int((now - began) * rate)
            for _ in range(due - sent):
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            sent = max(sent, due)
            if now >= next_sample:
                rss.append(round(rss_mib(pid), 1))
                next_sample = now + 1.0
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
        rss.append(round(rss_mib(pid), 1))
    return {
        "offered_rps": round(sent / duration, 1),
        "accepted": len(accepted), "accepted_rps": round(len(accepted) / duration, 1),
        "accepted_latency": percentiles(accepted),
        "refused": len(refused), "refused_latency": percentiles(refused),
        "other_errors": dict(other), "deadline_ms": deadline_s * 1000,
        "rss_mib_every_second": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--deadline-ms", type=float, default=1000.0, help="the overload run's request timeout")
    parser.add_argument("--json", default="bench/results/batching.json")
    args = parser.parse_args()
    size = args.max_batch_size
    # Queue bound for the overload run: what the model drains in a quarter of the deadline.
    queue_bound = max(size, int(ideal_rps(size) * args.deadline_ms / 1000.0 / 4))
    results: dict[str, Any] = {"model": f"{BATCH_MS} ms per batch + {ROW_MS} ms per row",
                               "cpus": os.cpu_count(), "max_batch_size": size}

    proxy = start_proxy(size, queue_bound)
    try:
        on = asyncio.run(saturate(proxy.zmq_url, 4 * size, args.duration))
        on["ideal_rps"] = round(ideal_rps(size), 1)
        on["fraction_of_ideal"] = round(on["rps"] / on["ideal_rps"], 3)
        results["batching_on"] = on
        print(f"batching on : {on['rps']} req/s = {on['fraction_of_ideal']:.1%} of ideal {on['ideal_rps']}; "
              f"p50 {on['p50_ms']} ms p99 {on['p99_ms']} ms; batches {on['batch_sizes']}", flush=True)
        over = asyncio.run(overload(proxy, 2 * on["rps"], args.duration, args.deadline_ms / 1000.0))
        over["queue_bound"] = queue_bound
        results["overload"] = over
        print(f"overload    : offered {over['offered_rps']} req/s, accepted {over['accepted_rps']} req/s "
              f"(p99 {over['accepted_latency']['p99_ms']} ms, deadline {args.deadline_ms} ms), refused "
              f"{over['refused']} (p99 {over['refused_latency']['p99_ms']} ms), other {over['other_errors']}; "
              f"RSS MiB {over['rss_mib_every_second']}", flush=True)
    finally:
        proxy.stop()

    proxy = start_proxy(1, queue_bound)
    try:
        off = asyncio.run(saturate(proxy.zmq_url, 4 * size, args.duration))
        off["ideal_rps"] = round(ideal_rps(1), 1)
        off["fraction_of_ideal"] = round(off["rps"] / off["ideal_rps"], 3)
        results["batching_off"] = off
        print(f"batching off: {off['rps']} req/s = {off['fraction_of_ideal']:.1%} of ideal {off['ideal_rps']}; "
              f"p50 {off['p50_ms']} ms p99 {off['p99_ms']} ms", flush=True)
    finally:
        proxy.stop()

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
