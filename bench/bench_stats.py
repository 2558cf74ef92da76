"""What Triton's statistics cost: the one record they add to each request, and one statistics call.

    python bench/bench_stats.py [--models 50] [--repeats 5]

1. ``last_inference``: the gauge the pipeline sets for every request it sends (bridges/pipeline.py), in
   microseconds per request, with prometheus-client keeping values in memory (one process) and in the
   multiprocess directory ``inferoxy serve`` uses (an mmap write).
2. A statistics call (``bridges.statistics.statistics``) over ``--models`` model versions with every metric
   it reads recorded, from the merged multiprocess directory as ``GET /v2/models/stats`` reads it.
3. Building the OpenAPI document (done once, at the first ``GET /openapi.json``).

Runs in fresh subprocesses, since prometheus-client picks its value store at import. Figures on a shared
machine are noisy: compare the two modes of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RECORD = """
import time, timeit
from inferoxy import metrics
from bridges import pipeline
from model_manager.spec import ModelSpec
spec = ModelSpec(name="echo", model_class="x:Y")
gauge = metrics.LAST_INFERENCE
n = 200_000
naive = min(timeit.repeat(lambda: gauge.labels("echo", "1").set(time.time()), number=n, repeat={repeats}))
kept = min(timeit.repeat(lambda: pipeline._sent(spec), number=n, repeat={repeats}))
print(f"{{naive / n * 1e6:.2f}} µs/request written every time, {{kept / n * 1e6:.2f}} µs as the pipeline does")
"""

CALL = """
import time
from inferoxy import metrics
from bridges.statistics import statistics
from model_manager.spec import ModelSpec
specs = [ModelSpec(name=f"m{{i}}", model_class="x:Y") for i in range({models})]
for spec in specs:
    for bridge in metrics.BRIDGES:
        metrics.REQUESTS.labels(bridge, spec.name, "1", "ok").inc()
        metrics.REQUESTS.labels(bridge, spec.name, "1", "deadline").inc()
        metrics.REQUEST_SECONDS.labels(bridge, spec.name, "1", "ok").observe(0.01)
    metrics.QUEUE_SECONDS.labels(spec.name, "1").observe(0.001)
    metrics.BATCH_SIZE.labels(spec.name, "1").observe(3)
    metrics.BATCH_COMPUTE_SECONDS.labels(spec.name, "1").observe(0.01)
    metrics.LAST_INFERENCE.labels(spec.name, "1").set(time.time())
best = float("inf")
for _ in range({repeats}):
    start = time.perf_counter()
    statistics(specs)
    best = min(best, time.perf_counter() - start)
print(f"{{best * 1e3:.2f}}")
"""

OPENAPI = """
import time
from bridges.openapi import openapi_document
start = time.perf_counter()
openapi_document()
print(f"{(time.perf_counter() - start) * 1e3:.0f}")
"""


def run(code: str, multiprocess: bool) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with tempfile.TemporaryDirectory() as directory:
        if multiprocess:
            env["PROMETHEUS_MULTIPROC_DIR"] = directory
        return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                              text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for multiprocess in (False, True):
        mode = "multiprocess directory" if multiprocess else "one process"
        record = run(RECORD.format(repeats=args.repeats), multiprocess)
        call = run(CALL.format(models=args.models, repeats=args.repeats), multiprocess)
        print(f"{mode:>22}: last_inference record {record}; statistics of {args.models} models {call} ms")
    print(f"OpenAPI document built in {run(OPENAPI, False)} ms (once per bridge process)")


if __name__ == "__main__":
    main()
