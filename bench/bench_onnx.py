"""ONNX digits against numpy digits: the same classifier, the same weights, served side by side in one proxy.

    python bench/bench_onnx.py [--duration 5] [--concurrency 1 32] [--rows 1 32] [--repeats 3] \
        [--json bench/results/onnx.json]

One `inferoxy serve` (process runtime, bench_bridges.Proxy) serves ``digits`` (examples/models/digits, numpy)
and ``digits-onnx`` (examples/models/digits/digits.onnx under ONNX Runtime, no model code), one replica each
with the same batching (max_batch_size 32, max_batch_delay_ms 2). For each client load (concurrency, rows per
request) the two models are measured one after the other with the same ZeroMQ client load, the order
alternating between repeats so drift in the machine's speed falls on both; the median of the repeats is
reported. Requests carry held-out images (examples.train_digits.held_out_split).

End-to-end figures are dominated by the proxy's own path on a small machine, so the script also times
``predict`` alone in this process for both models (batches of 1 and 32 rows): the models' own cost.
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
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bridges import Proxy, closed_loop  # noqa: E402

from examples.models.digits.model import DigitsModel  # noqa: E402
from examples.train_digits import ONNX_FILE, held_out_split  # noqa: E402
from inferoxy.client import AsyncClient  # noqa: E402
from inferoxy.onnx_model import OnnxModel  # noqa: E402

MODELS = f"""
models:
  digits:
    model_class: examples.models.digits.model:DigitsModel
    max_batch_size: 32
    max_batch_delay_ms: 2
  digits-onnx:
    format: onnx
    model_uri: {ONNX_FILE}
    max_batch_size: 32
    max_batch_delay_ms: 2
"""
NAMES = ("digits", "digits-onnx")


async def measure(url: str, model: str, images: np.ndarray, rows: int, concurrency: int,
                  duration: float) -> dict[str, Any]:
    batches = [images[i:i + rows] for i in range(0, len(images) - rows + 1, rows)]
    async with AsyncClient(url, timeout=60) as client:
        sent = 0

        async def call() -> None:
            nonlocal sent
            sent += 1
            await client.infer(model, {"image": batches[sent % len(batches)]})

        await closed_loop(call, concurrency, min(1.0, duration))  # warm-up, discarded
        started = time.perf_counter()
        latencies = await closed_loop(call, concurrency, duration)
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"model": model, "rows": rows, "concurrency": concurrency, "rps": len(latencies) / elapsed,
            "rows_per_s": len(latencies) * rows / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


def predict_alone(images: np.ndarray, rows: int, calls: int = 2000) -> dict[str, float]:
    """Microseconds per predict call of each model in this process."""
    numpy_model = DigitsModel()
    numpy_model.load()
    onnx_model = OnnxModel()
    onnx_model.spec = {"format": "onnx", "model_uri": str(ONNX_FILE), "resources": {"cpus": 1}}
    onnx_model.load()
    batch = {"image": np.ascontiguousarray(images[:rows])}
    timings = {}
    for name, model in (("digits", numpy_model), ("digits-onnx", onnx_model)):
        for _ in range(100):
            model.predict(batch)
        started = time.perf_counter()
        for _ in range(calls):
            model.predict(batch)
        timings[name] = (time.perf_counter() - started) / calls * 1e6
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32], help="images per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench/results/onnx.json")
    args = parser.parse_args()

    images = held_out_split()[0].astype(np.float32)
    alone = {rows: predict_alone(images, rows) for rows in (1, 32)}
    for rows, timings in alone.items():
        print(f"predict alone, {rows:>2} rows: digits {timings['digits']:.1f} µs, "
              f"digits-onnx {timings['digits-onnx']:.1f} µs", flush=True)

    runs: list[dict[str, Any]] = []
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as models, Proxy(_write(models, MODELS)) as proxy:
        url = f"tcp://127.0.0.1:{proxy.zmq_port}"
        for repeat in range(args.repeats):
            for rows in args.rows:
                for concurrency in args.concurrency:
                    order = NAMES if repeat % 2 == 0 else NAMES[::-1]
                    for model in order:
                        row = asyncio.run(measure(url, model, images, rows, concurrency, args.duration))
                        row["repeat"] = repeat
                        runs.append(row)
                        print(f"{model:11} rows={rows:<2} c={concurrency:<3} {row['rps']:>8.1f} req/s "
                              f"{row['rows_per_s']:>9.1f} rows/s  p50 {row['p50_ms']:.2f} ms  "
                              f"p99 {row['p99_ms']:.2f} ms", flush=True)

    table = []
    print("\n| rows/request | concurrency | model | req/s | rows/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|")
    for rows in args.rows:
        for concurrency in args.concurrency:
            for model in NAMES:
                mine = [r for r in runs if (r["model"], r["rows"], r["concurrency"]) == (model, rows, concurrency)]
                median = {key: statistics.median(r[key] for r in mine) for key in ("rps", "rows_per_s", "p50_ms",
                                                                                    "p99_ms")}
                table.append({"model": model, "rows": rows, "concurrency": concurrency, **median})
                print(f"| {rows} | {concurrency} | {model} | {median['rps']:,.0f} | {median['rows_per_s']:,.0f} | "
                      f"{median['p50_ms']:.2f} | {median['p99_ms']:.2f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "load": os.getloadavg()},
                                           "predict_alone_us": alone, "runs": runs, "medians": table}, indent=2))


def _write(handle: Any, text: str) -> str:
    handle.write(text)
    handle.flush()
    return str(handle.name)


if __name__ == "__main__":
    main()
