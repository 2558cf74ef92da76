"""Cold start: a model scaled to zero, its first request, and the replica start behind it (process and Docker).

    python bench/bench_cold_start.py [--runtime process|docker|both] [--runs 5] [--build]
                                     [--json bench/results/cold_start.json]

Each runtime gets its own `inferoxy serve` (free loopback ports, its own instance and models
file, embedded Redis) serving one model, ``cold``: the echo example (examples/models/echo; as
the image ``inferoxy/echo`` under Docker, host networking, never pulled) with ``min_replicas`` 0,
``max_replicas`` 1 and a short ``scale_down_delay_s``. Each run waits until the model has no
replica (``idle``), then times:

- **cold start**: one request sent to the idle model, until its answer (the client's view);
- **replica start**: the replica's own start to ready, from the status record (the task manager's
  clock: from just before it asks the runtime for the process or container, until the replica says
  ``ready`` over the bus: runtime start, interpreter and imports, ``load()``, the bus handshake);
- **warm**: the next request, answered by the now running replica.

Docker: the images come from docker/build-images.sh (run with ``--build``, or when ``inferoxy/echo``
is missing), and every container of the benchmark's instance is removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model_scale import read_scale  # noqa: E402

from inferoxy.client import AsyncClient  # noqa: E402
from tests.support import ProxyProcess  # noqa: E402

MODEL = "cold"
IMAGE = "inferoxy/echo"
PAYLOAD = {"x": np.zeros((1, 16), np.float32)}


def models_yaml(runtime: str, scale_down_delay_s: float) -> str:
    where = f"image: {IMAGE}" if runtime == "docker" else "model_class: examples.models.echo.model:EchoModel"
    return f"""
models:
  {MODEL}:
    {where}
    max_batch_size: 8
    max_batch_delay_ms: 0
    min_replicas: 0
    max_replicas: 1
    scale_down_delay_s: {scale_down_delay_s}
"""


def start_proxy(runtime: str, instance: str, folder: Path, scale_down_delay_s: float) -> ProxyProcess:
    (folder / "models.yaml").write_text(models_yaml(runtime, scale_down_delay_s))
    env = {"INFEROXY_MODELS_FILE": str(folder / "models.yaml"), "INFEROXY_LOG_LEVEL": "WARNING",
           "INFEROXY_BRIDGES": "rest,zmq", "INFEROXY_INSTANCE": instance, "INFEROXY_REQUEST_TIMEOUT_S": "120"}
    if runtime == "docker":
        env.update({"INFEROXY_RUNTIME": "docker", "INFEROXY_DOCKER_NETWORK": "host",
                    "INFEROXY_DOCKER_PULL_POLICY": "never"})
    return ProxyProcess(env=env).start(timeout=120)


async def poll(check: Any, timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := await check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s}s")
        await asyncio.sleep(interval_s)
    return found


async def measure(proxy: ProxyProcess, runs: int, timeout_s: float) -> dict[str, Any]:
    cold: list[float] = []
    starts: list[float] = []
    warm: list[float] = []
    async with httpx.AsyncClient(base_url=proxy.rest_url, timeout=10.0) as http, \
            AsyncClient(proxy.zmq_url, timeout=timeout_s) as client:
        async def idle() -> bool:
            scale = await read_scale(http, MODEL, with_replicas=True)
            return scale.state == "idle" and scale.replicas == 0 and not scale.replica_times

        async def one_ready() -> Any:
            scale = await read_scale(http, MODEL, with_replicas=True)
            return scale if scale.replicas and scale.replica_times and scale.replica_times[0][1] else None

        for run in range(runs):
            await poll(idle, timeout_s, f"scale to zero of {MODEL}", 0.1)
            began = time.perf_counter()
            await client.infer(MODEL, PAYLOAD)
            cold.append(time.perf_counter() - began)
            began = time.perf_counter()
            await client.infer(MODEL, PAYLOAD)
            warm.append(time.perf_counter() - began)
            scale = await poll(one_ready, timeout_s, f"the status record of {MODEL}'s replica")
            started_at, ready_at = scale.replica_times[0]
            starts.append(ready_at - started_at)
            print(f"  run {run + 1}: cold start {cold[-1] * 1000:.0f} ms, replica start {starts[-1] * 1000:.0f} ms, "
                  f"warm {warm[-1] * 1000:.1f} ms", flush=True)
    return {"cold_start_ms": summary(cold), "replica_start_ms": summary(starts), "warm_request_ms": summary(warm)}


def summary(seconds: list[float]) -> dict[str, Any]:
    ms = [round(s * 1000.0, 1) for s in seconds]
    return {"median": round(statistics.median(ms), 1), "min": min(ms), "max": max(ms), "runs": ms}


def docker_images(build: bool) -> None:
    missing = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode != 0
    if build or missing:
        print(f"building the images (docker/build-images.sh){' since ' + IMAGE + ' is missing' if missing else ''}",
              flush=True)
        subprocess.run(["bash", str(REPO / "docker/build-images.sh")], cwd=REPO, check=True)


def remove_containers(instance: str) -> None:
    """Whatever the proxy left of this instance (nothing, when it stopped cleanly)."""
    listed = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=inferoxy.instance={instance}"],
                            capture_output=True, text=True)
    if listed.stdout.split():
        subprocess.run(["docker", "rm", "-f", *listed.stdout.split()], capture_output=True)


def run(runtime: str, runs: int, scale_down_delay_s: float, timeout_s: float) -> dict[str, Any]:
    instance = f"benchcold{uuid.uuid4().hex[:8]}"
    proxy = start_proxy(runtime, instance, Path(tempfile.mkdtemp(prefix="bench-cold-")), scale_down_delay_s)
    try:
        print(f"{runtime}:", flush=True)
        return asyncio.run(measure(proxy, runs, timeout_s))
    finally:
        proxy.stop(timeout=60)
        if runtime == "docker":
            remove_containers(instance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", choices=("process", "docker", "both"), default="both")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scale-down-delay-s", type=float, default=2.0)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="the longest wait for any one step")
    parser.add_argument("--build", action="store_true", help="rebuild the images first (docker/build-images.sh)")
    parser.add_argument("--json", default="bench/results/cold_start.json")
    args = parser.parse_args()
    runtimes = ("process", "docker") if args.runtime == "both" else (args.runtime,)
    if "docker" in runtimes:
        docker_images(args.build)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"model": "examples/models/echo (image inferoxy/echo under Docker, host network)",
                     "min_replicas": 0, "max_replicas": 1, "scale_down_delay_s": args.scale_down_delay_s,
                     "runs": args.runs},
    }
    for runtime in runtimes:
        results[runtime] = run(runtime, args.runs, args.scale_down_delay_s, args.timeout_s)
        print(f"{runtime}: cold start median {results[runtime]['cold_start_ms']['median']} ms, replica start "
              f"median {results[runtime]['replica_start_ms']['median']} ms", flush=True)
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
