"""What the batch manager's metrics cost per request, with no sockets: the scheduler plus ``batch_manager.recorder``.

    python bench/bench_core_metrics.py [--batch-sizes 1 8 32] [--rounds 3000] [--compare-ref main]
                                       [--json bench/results/core_metrics.json]

One round is what the batch manager does for one batch of B requests: B ``submit`` calls (the group has
``max_batch_size`` B and a long delay, so the B-th sends the batch), the batch's answer (``on_result``, with the
replica's ``compute_ns``), and, as after every socket drain, the gauges of the model versions that changed.
Figures are the median per-request time of a round, in microseconds, each mode in a process of its own:

* ``this tree, no recorder``: the scheduler of this tree alone (its changed-set bookkeeping included).
* ``off``: ``INFEROXY_METRICS=false`` (every metric a no-op, as ``metrics.disable()`` makes them).
* ``on``: metrics in this process's registry (``inferoxy run COMPONENT --metrics-port N``).
* ``on, shared dir``: prometheus-client's multiprocess mode, as every component under ``inferoxy serve``.
* ``REF (no metrics)`` with ``--compare-ref REF``: the scheduler as it is at git revision REF (its
  ``batch_manager`` package extracted with ``git archive``), without the recorder: what the changed-set
  bookkeeping and the queue waits on each ``Dispatch`` cost the scheduler itself.

``--proxy N``: instead, the CPU each process of a real ``inferoxy serve`` (ZeroMQ bridge only, process
replicas, the echo model) spends per request over N requests at ``--concurrency`` C, with
``INFEROXY_METRICS`` true and false in alternating rounds (``--rounds-proxy``): CPU per request is steadier
than requests per second on a shared machine, and it names the process that pays.

A shared 2-core machine is noisy: compare the modes of one run, not figures of different runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def child(mode: str, batch_sizes: list[int], rounds: int) -> dict[str, float]:
    """Runs in its own process, so ``metrics.disable()`` and the multiprocess value store stay in it."""
    from inferoxy import metrics

    if mode == "off":
        metrics.disable()
    from batch_manager.scheduler import Dispatch, Request, Scheduler
    from model_manager.spec import ModelSpec
    from model_manager.store import Registry

    recorder_type: Any = None
    if mode not in ("ref", "bare"):
        from batch_manager.recorder import Recorder

        recorder_type = Recorder
    figures = {}
    metas = [{"name": "x", "dtype": "float32", "shape": [1, 3]}]
    frames = [b"\0" * 12]
    for size in batch_sizes:
        spec = ModelSpec(name=f"b{size}", model_class="x:Y", max_batch_size=size, max_batch_delay_ms=60_000.0)
        scheduler = Scheduler(Registry({spec.key: spec}, {spec.name: "1"}, 1))
        recorder = recorder_type(scheduler) if recorder_type else None
        scheduler.replica_up("r1", spec.name, "1", 2, 0.0)
        seq = 0
        per_request: list[float] = []
        for _ in range(rounds):
            start = time.perf_counter()
            dispatch = None
            for _ in range(size):
                seq += 1
                for action in scheduler.submit(Request((b"b", seq), spec.name, None, metas, frames, 1e9), 1.0):
                    if isinstance(action, Dispatch):
                        dispatch = action
                        if recorder:
                            recorder.dispatched(action)
            assert dispatch is not None
            if recorder:
                recorder.computed("r1", 1_000_000)
            scheduler.on_result("r1", dispatch.batch_id, [1] * size, metas * size, frames * size, 1.001)
            if recorder:
                recorder.flush()
            per_request.append((time.perf_counter() - start) / size * 1e6)
        figures[str(size)] = statistics.median(per_request)
    return figures


def run_child(mode: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--rounds", str(args.rounds),
                          "--batch-sizes", *map(str, args.batch_sizes)], env=env, capture_output=True, text=True,
                         cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"mode {mode} failed:\n{out.stderr}")
    figures: dict[str, float] = json.loads(out.stdout)
    return figures


def proxy_round(metrics_on: bool, requests: int, concurrency: int) -> dict[str, float]:
    """CPU µs per request of each process of one ``inferoxy serve``."""
    import asyncio

    import numpy as np

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    import procs

    from inferoxy.client import AsyncClient
    from tests.support import ProxyProcess

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models.yaml"
        models.write_text("models:\n  echo:\n    model_class: examples.models.echo.model:EchoModel\n"
                          "    max_batch_size: 64\n    max_batch_delay_ms: 0\n")
        env = {"INFEROXY_MODELS_FILE": str(models), "INFEROXY_BRIDGES": "zmq", "INFEROXY_LOG_LEVEL": "WARNING",
               "INFEROXY_METRICS": "true" if metrics_on else "false", "PYTHONPATH": str(REPO)}
        with ProxyProcess(env=env) as proxy:
            assert proxy.process is not None
            x = {"x": np.ones((1, 16), np.float32)}

            async def load(count: int) -> None:
                async with AsyncClient(proxy.zmq_url, timeout=60) as client:
                    await client.infer("echo", x)  # the replica is up
                    left = count

                    async def worker() -> None:
                        nonlocal left
                        while left > 0:
                            left -= 1
                            await client.infer("echo", x)

                    await asyncio.gather(*(worker() for _ in range(concurrency)))

            asyncio.run(load(500))  # warm
            before = procs.cpu_by_label(proxy.process.pid)
            asyncio.run(load(requests))
            after = procs.cpu_by_label(proxy.process.pid)
    return {name: (after[name] - before.get(name, 0.0)) / requests * 1e6 for name in after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--compare-ref", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--proxy", type=int, default=0, help="requests per round through a real serve")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds-proxy", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.proxy:
        rows: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
        for _ in range(args.rounds_proxy):
            for label, on in (("on", True), ("off", False)):
                rows[label].append(proxy_round(on, args.proxy, args.concurrency))
        names = sorted({name for runs in rows.values() for run in runs for name in run})
        print(f"CPU µs per request, {args.proxy} requests at concurrency {args.concurrency}, rounds alternating")
        for name in names:
            figures = "  ".join(f"{label} " + " / ".join(f"{run.get(name, 0.0):.1f}" for run in runs)
                                for label, runs in rows.items())
            print(f"{name:14} {figures}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return
    if args.child:
        print(json.dumps(child(args.child, args.batch_sizes, args.rounds)))
        return
    base = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    base["PYTHONPATH"] = str(REPO)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as samples, tempfile.TemporaryDirectory() as ref_tree:
        modes = [("this tree, no recorder", "bare", base), ("off", "off", base), ("on", "on", base),
                 ("on, shared dir", "on", {**base, "PROMETHEUS_MULTIPROC_DIR": samples})]
        if args.compare_ref:
            archive = subprocess.run(["git", "archive", args.compare_ref, "batch_manager"], cwd=REPO, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", ref_tree], input=archive, check=True)
            # The old batch_manager package first on the path; everything else from this tree.
            modes.insert(0, (f"{args.compare_ref} (no metrics)", "ref", {**base, "PYTHONPATH": f"{ref_tree}:{REPO}"}))
        for label, mode, env in modes:
            results[label] = run_child(mode, args, env)
    width = max(map(len, results))
    print(f"{'µs per request':{width}}  " + "  ".join(f"B={size:<6}" for size in args.batch_sizes))
    for label, figures in results.items():
        print(f"{label:{width}}  " + "  ".join(f"{figures[str(size)]:<8.2f}" for size in args.batch_sizes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
