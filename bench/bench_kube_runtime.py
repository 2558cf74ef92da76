"""What the kubernetes runtime's blocking client costs the task manager's event loop.

    PYTHONPATH=. python bench/bench_kube_runtime.py [--replicas 100]

Starts and stops ``--replicas`` replicas one after another through ``KubernetesRuntime`` against the API
server double of the tests (tests/kube_api_double.py, on loopback, its kubelet idle: no process runs), and
prints the time of one start (the pod, then its Secret: two API calls, each in a worker thread), of one stop
(both deleted, the pod's DELETED seen on the watch), the event loop's lag meanwhile (a 1 ms sleep's overshoot),
and the threads in use. The double answers in microseconds, so this is the client's and the threads' own cost,
not a cluster's: the figure behind docs/ARCHITECTURE.md's choice of the blocking client in threads.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inferoxy.settings import Settings  # noqa: E402
from model_manager.spec import ModelSpec  # noqa: E402
from task_manager.runtimes.base import ReplicaPlan  # noqa: E402
from task_manager.runtimes.kubernetes import create_runtime  # noqa: E402
from tests.kube_api_double import FakeKubelet, KubeApiDouble  # noqa: E402


async def measure(replicas: int, kubeconfig: Path) -> None:
    runtime = create_runtime(Settings(runtime="kubernetes", kube_kubeconfig=str(kubeconfig), instance="bench",
                                      kube_namespace="bench", replica_connect_url="tcp://bench:7792"))
    spec = ModelSpec(name="m", image="bench:1")
    starts, stops, lags = [], [], []

    async def lag() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - before - 0.001)

    probe = asyncio.create_task(lag())
    for n in range(replicas):
        before = time.perf_counter()
        handle = await runtime.start(ReplicaPlan(f"bench-m-1-{n}-0123456789ab", spec,
                                                 {"INFEROXY_BUS_SECRET_KEY": "k" * 40}))
        starts.append(time.perf_counter() - before)
        before = time.perf_counter()
        await handle.stop(0)
        stops.append(time.perf_counter() - before)
    probe.cancel()
    threads = threading.active_count()
    await runtime.close()

    def ms(values: list[float], q: float) -> str:
        return f"{sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000:.1f} ms"

    print(f"{replicas} replicas started and stopped one after another")
    print(f"start (pod + Secret):                   median {ms(starts, 0.5)}, p95 {ms(starts, 0.95)}")
    print(f"stop (both deleted, DELETED watched):   median {ms(stops, 0.5)}, p95 {ms(stops, 0.95)}")
    print(f"event loop lag meanwhile:               median {statistics.median(lags) * 1000:.2f} ms, "
          f"max {max(lags) * 1000:.1f} ms")
    print(f"threads in the process:                 {threads}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=100)
    args = parser.parse_args()
    api = KubeApiDouble(FakeKubelet(autostart=False)).start()
    try:
        with tempfile.TemporaryDirectory() as folder:
            asyncio.run(measure(args.replicas, api.kubeconfig(Path(folder) / "kubeconfig")))
    finally:
        api.stop()


if __name__ == "__main__":
    main()
