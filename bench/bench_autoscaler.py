"""The autoscaler following a stepped load (low -> high -> low), end to end through the ZeroMQ bridge.

    python bench/bench_autoscaler.py [--quick] [--json bench/results/autoscaler.json] [--png docs/autoscaler.png]

One `inferoxy serve` (process runtime, free loopback ports, its own instance and models file)
serves one model, ``scaled``: tests.models_for_tests:CostModel costing ``--batch-ms`` per batch
(a sleep, so replicas cost no CPU), ``max_batch_size`` ``--max-batch-size``, capacity 2, with
``min_replicas`` 1, ``max_replicas`` 3, ``scale_up_delay_s`` 1 and ``scale_down_delay_s`` 5. One
replica answers at most max_batch_size / batch_ms requests a second (100 with the defaults).

The load is open-loop: each step sends at a constant rate, whatever the answers do, so a
saturated replica set shows as queueing (latency) rather than as a slower client. Steps: low
(a third of one replica), high (2.5 replicas' worth), low again, long enough for the scale
down. Every ``--sample-s`` (0.5) the benchmark reads the model's ready replica count and
target (``serving`` of GET /v2/models/scaled: bench/model_scale.py), and the p50/p99 latency of
the requests answered in that interval. Every request's outcome is counted (answered, or its error code).

Writes JSON (machine, settings, the series, totals) and a PNG: offered and answered req/s over
time above, replicas and target with p99/p50 latency below, the high step shaded.
``--quick``: short steps, for the smoke test (tests/test_bench_scaling.py); the figures mean little.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model_scale import read_scale  # noqa: E402

from inferoxy.client import AsyncClient, InferenceError  # noqa: E402
from tests.support import ProxyProcess, wait_for  # noqa: E402

MODEL = "scaled"


@dataclass
class Step:
    name: str
    rps: float
    seconds: float


@dataclass
class Outcomes:
    """What the load generator has seen; the sampler takes each interval's share with ``take``."""

    sent: int = 0
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    total_answered: int = 0
    answers: list[tuple[float, float]] = field(default_factory=list)  # (answered at, latency), perf_counter s
    total_errors: Counter[str] = field(default_factory=Counter)
    outstanding: int = 0

    def take(self) -> tuple[int, list[float], Counter[str]]:
        taken = self.sent, self.latencies_s, self.errors
        self.sent, self.latencies_s, self.errors = 0, [], Counter()
        return taken


def steps_for(args: argparse.Namespace) -> list[Step]:
    one_replica = args.max_batch_size / (args.batch_ms / 1000.0)
    low, high = round(one_replica / 3, 1), round(one_replica * 2.5, 1)
    if args.quick:
        return [Step("low", low, 3), Step("high", high, 6), Step("low", low, 4)]
    return [Step("low", low, args.low_s), Step("high", high, args.high_s), Step("low", low, args.tail_s)]


def models_yaml(args: argparse.Namespace) -> str:
    return f"""
models:
  {MODEL}:
    model_class: tests.models_for_tests:CostModel
    max_batch_size: {args.max_batch_size}
    max_batch_delay_ms: 2
    max_queue_size: 5000
    min_replicas: 1
    max_replicas: 3
    scale_up_delay_s: {args.scale_up_delay_s}
    scale_down_delay_s: {args.scale_down_delay_s}
    env: {{COST_BATCH_MS: "{args.batch_ms}", COST_ROW_MS: "0"}}
"""


def percentile_ms(latencies_s: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(latencies_s) * 1000.0, q)), 2) if latencies_s else None


async def one_request(client: AsyncClient, outcomes: Outcomes, timeout_s: float) -> None:
    payload = {"x": np.zeros((1, 16), np.float32)}
    start = time.perf_counter()
    outcomes.outstanding += 1
    try:
        await client.infer(MODEL, payload, timeout=timeout_s)
    except Exception as exc:  # counted, whatever it is: every request sent has one outcome in the JSON
        code = exc.code if isinstance(exc, InferenceError) else f"client: {type(exc).__name__}"
        outcomes.errors[code] += 1
        outcomes.total_errors[code] += 1
    else:
        now = time.perf_counter()
        outcomes.latencies_s.append(now - start)
        outcomes.answers.append((now, now - start))
        outcomes.total_answered += 1
    finally:
        outcomes.outstanding -= 1


async def open_loop(client: AsyncClient, step: Step, outcomes: Outcomes, timeout_s: float,
                    tasks: set[asyncio.Task[None]]) -> None:
    """Send at ``step.rps`` for ``step.seconds``, on schedule whatever the answers do (open loop)."""
    began = time.perf_counter()
    sent = 0
    while (now := time.perf_counter()) < began + step.seconds:
        for _ in range(int((now - began) * step.rps) - sent):
            task = asyncio.create_task(one_request(client, outcomes, timeout_s))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
            outcomes.sent += 1
        await asyncio.sleep(0.002)


async def sample(http: httpx.AsyncClient, outcomes: Outcomes, began: float, sample_s: float,
                 offered: list[float], series: list[dict[str, Any]], stop: asyncio.Event) -> None:
    """Every ``sample_s``: the model's scale and what the interval's requests saw."""
    tick = 1
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, began + tick * sample_s - time.perf_counter()))
        try:
            scale = await read_scale(http, MODEL)
            replicas, target, state = scale.replicas, scale.target, scale.state
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            replicas, target, state = None, None, f"unreadable: {type(exc).__name__}"
        sent, latencies, errors = outcomes.take()
        series.append({
            "t_s": round(time.perf_counter() - began, 2), "offered_rps": offered[0], "sent": sent,
            "answered": len(latencies), "errors": dict(errors), "outstanding": outcomes.outstanding,
            "replicas": replicas, "target": target, "state": state,
            "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
        })
        if stop.is_set():
            return
        tick += 1


async def drive(proxy: ProxyProcess, steps: list[Step], sample_s: float, timeout_s: float) -> dict[str, Any]:
    outcomes = Outcomes()
    series: list[dict[str, Any]] = []
    offered = [0.0]
    tasks: set[asyncio.Task[None]] = set()
    spans = []
    async with AsyncClient(proxy.zmq_url, timeout=timeout_s) as client, \
            httpx.AsyncClient(base_url=proxy.rest_url, timeout=5.0) as http:
        stop = asyncio.Event()
        began = time.perf_counter()
        sampler = asyncio.create_task(sample(http, outcomes, began, sample_s, offered, series, stop))
        for step in steps:
            offered[0] = step.rps
            start = time.perf_counter() - began
            await open_loop(client, step, outcomes, timeout_s, tasks)
            spans.append({"name": step.name, "rps": step.rps, "start_s": round(start, 2),
                          "end_s": round(time.perf_counter() - began, 2)})
        offered[0] = 0.0
        if tasks:
            await asyncio.wait(set(tasks))  # each ends by its answer or the client's timeout
        stop.set()
        await sampler
    result = {"steps": spans, "series": series,
              "totals": {"sent": sum(s["sent"] for s in series), "answered": outcomes.total_answered,
                         "errors": dict(outcomes.total_errors)}}
    result["summary"] = summarize(result, [(at - began, latency) for at, latency in outcomes.answers])
    return result


def summarize(result: dict[str, Any], answers: list[tuple[float, float]]) -> dict[str, Any]:
    """Per step, and the scale's moves around the high step.

    ``answers``: (seconds since the start, latency) of every answered request. A step's settled latency is
    that of the requests answered in its second half, once the scale has had time to follow."""
    by_step = []
    for span in result["steps"]:
        inside = [s for s in result["series"] if span["start_s"] < s["t_s"] <= span["end_s"] + 0.01]
        counts = [s["replicas"] for s in inside if s["replicas"] is not None]
        middle = (span["start_s"] + span["end_s"]) / 2
        settled = [latency for at, latency in answers if middle <= at < span["end_s"]]
        by_step.append({"name": span["name"], "rps": span["rps"],
                        "answered": sum(1 for at, _ in answers if span["start_s"] <= at < span["end_s"]),
                        "replicas_max": max(counts, default=None), "replicas_at_end": counts[-1] if counts else None,
                        "worst_interval_p99_ms": max((s["p99_ms"] for s in inside if s["p99_ms"] is not None),
                                                     default=None),
                        "settled_p50_ms": percentile_ms(settled, 50), "settled_p99_ms": percentile_ms(settled, 99)})
    return {"by_step": by_step, "moves": moves(result)}


def moves(result: dict[str, Any]) -> dict[str, float | None]:
    """When the target and the ready count moved: seconds from the high step's start (up) or end (down)."""
    high = next((span for span in result["steps"] if span["name"] == "high"), None)
    if high is None:
        return {}
    series = result["series"]

    def first(after: float, test: Any) -> float | None:
        return next((round(s["t_s"] - after, 2) for s in series if s["t_s"] > after and test(s)), None)

    peak = max((s["target"] or 0 for s in series if high["start_s"] < s["t_s"] <= high["end_s"]), default=0)
    found: dict[str, float | None] = {
        "target_peak": peak, "target_up_s": first(high["start_s"], lambda s: (s["target"] or 0) >= 2),
        "ready_2_s": first(high["start_s"], lambda s: (s["replicas"] or 0) >= 2),
        "ready_peak_s": first(high["start_s"], lambda s: (s["replicas"] or 0) >= peak) if peak >= 2 else None}
    if found["ready_2_s"] is not None:  # only a scale down that followed a scale up counts
        for count in range(peak - 1, 0, -1):
            found[f"down_to_{count}_s"] = first(high["end_s"], lambda s, c=count: s["replicas"] == c)
    return found


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib  # the `dev` extra (pyproject.toml); only this benchmark and its smoke test need it
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result["series"]
    t = [s["t_s"] for s in series]
    figure, (rates, scale) = plt.subplots(2, 1, sharex=True, figsize=(9, 6), height_ratios=[1, 2])
    for axis in (rates, scale):
        for span in result["steps"]:
            if span["name"] == "high":
                axis.axvspan(span["start_s"], span["end_s"], color="tab:orange", alpha=0.12, lw=0)
    spans = result["steps"]
    edges = [0.0, *(x for span in spans for x in (span["start_s"], span["end_s"])), spans[-1]["end_s"], t[-1]]
    levels = [0.0, *(x for span in spans for x in (span["rps"], span["rps"])), 0.0, 0.0]
    rates.plot(edges, levels, color="tab:orange", label="offered req/s")
    interval = result["settings"]["sample_s"]
    rates.plot(t, [s["answered"] / interval for s in series], color="tab:green", lw=1, label="answered req/s")
    rates.set_ylabel("req/s")
    rates.legend(loc="upper right", fontsize=8)
    scale.step(t, [s["replicas"] for s in series], where="post", color="tab:blue", lw=2, label="ready replicas")
    scale.step(t, [s["target"] for s in series], where="post", color="black", ls="--", lw=1, label="target")
    scale.set_ylabel("replicas")
    scale.set_ylim(0, 4)
    scale.set_yticks(range(5))
    scale.set_xlabel("seconds")
    latency = scale.twinx()
    latency.plot(t, [s["p99_ms"] for s in series], color="tab:red", lw=1, label="p99 latency")
    latency.plot(t, [s["p50_ms"] for s in series], color="tab:red", lw=0.8, ls=":", label="p50 latency")
    latency.set_ylabel("ms (requests answered in each interval)")
    latency.set_yscale("log")
    latency.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    latency.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    latency.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    handles = scale.get_legend_handles_labels()[0] + latency.get_legend_handles_labels()[0]
    scale.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8)
    settings = result["settings"]
    rates.set_title(f"Autoscaler, stepped open-loop load: min {settings['min_replicas']} / max "
                    f"{settings['max_replicas']}, up after {settings['scale_up_delay_s']} s, down after "
                    f"{settings['scale_down_delay_s']} s", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short steps (the smoke test)")
    parser.add_argument("--batch-ms", type=float, default=20.0, help="the model's cost per batch")
    parser.add_argument("--max-batch-size", type=int, default=2)
    parser.add_argument("--scale-up-delay-s", type=float, default=1.0)
    parser.add_argument("--scale-down-delay-s", type=float, default=5.0)
    parser.add_argument("--low-s", type=float, default=15.0, help="the first low step's length")
    parser.add_argument("--high-s", type=float, default=30.0)
    parser.add_argument("--tail-s", type=float, default=35.0, help="the last low step's length (the scale down)")
    parser.add_argument("--sample-s", type=float, default=0.5)
    parser.add_argument("--timeout-s", type=float, default=30.0, help="each request's deadline")
    parser.add_argument("--json", default="bench/results/autoscaler.json")
    parser.add_argument("--png", default="docs/autoscaler.png")
    parser.add_argument("--plot-only", action="store_true", help="redraw --png from an existing --json, run nothing")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.json).read_text()), Path(args.png))
        return
    steps = steps_for(args)
    folder = Path(tempfile.mkdtemp(prefix="bench-autoscaler-"))
    (folder / "models.yaml").write_text(models_yaml(args))
    load_before = os.getloadavg()
    proxy = ProxyProcess(env={"INFEROXY_MODELS_FILE": str(folder / "models.yaml"), "INFEROXY_LOG_LEVEL": "WARNING",
                              "INFEROXY_BRIDGES": "rest,zmq", "INFEROXY_REQUEST_TIMEOUT_S": str(args.timeout_s)})
    proxy.start(timeout=120)
    try:
        def one_ready() -> bool:
            scale = asyncio.run(_scale(proxy))
            return bool(scale.replicas)

        wait_for(one_ready, timeout=60, interval=0.2, what=f"a ready replica of {MODEL}")
        result = asyncio.run(drive(proxy, steps, args.sample_s, args.timeout_s))
    finally:
        proxy.stop()
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"model": f"CostModel: {args.batch_ms} ms per batch (a sleep), capacity 2",
                     "max_batch_size": args.max_batch_size, "min_replicas": 1, "max_replicas": 3,
                     "scale_up_delay_s": args.scale_up_delay_s, "scale_down_delay_s": args.scale_down_delay_s,
                     "one_replica_rps": args.max_batch_size / (args.batch_ms / 1000.0),
                     "load": "open loop, constant rate per step", "sample_s": args.sample_s,
                     "timeout_s": args.timeout_s, "quick": args.quick,
                     "steps": [vars(step) for step in steps]},
        **result,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    plot(result, Path(args.png))
    print(json.dumps({"totals": result["totals"], **result["summary"]}, indent=1))
    print(f"written to {args.json} and {args.png}")


async def _scale(proxy: ProxyProcess) -> Any:
    async with httpx.AsyncClient(base_url=proxy.rest_url, timeout=5.0) as http:
        return await read_scale(http, MODEL)


if __name__ == "__main__":
    main()
