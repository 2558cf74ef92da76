"""The scheduler's own cost per call, with no sockets: next_wakeup, submit + dispatch + answer, tick.

    python bench/bench_scheduler.py [--models 50 500] [--rounds 2000] [--json bench/results/scheduler.json]
                                    [--compare-ref main]

Each model version has one replica (capacity 2) and one request waiting for its group's delay (60 s,
so no group comes due while measuring): the state the batch manager is in after a socket drain under
load spread over many models. Figures are the median of per-call times, in microseconds.

* ``next_wakeup``: what the service asks after every drain.
* ``next_wakeup (scan)``: the same answer found by scanning every group (the code before the heap,
  kept as the scheduler's reference oracle), so both are measured in one run.
* ``submit+answer``: one request to a model with ``max_batch_size`` 1 (it leaves at once), then its
  answer: the request path's scheduler work.
* ``drain``: submit+answer, then ``next_wakeup`` as the service asks after every socket drain (at low load
  each message is a drain of its own; under load one drain carries many).
* ``tick``: the timer firing when one model's group (1 ms delay) comes due among all the waiting ones.

``--compare-ref REF`` also measures ``batch_manager/scheduler.py`` as it is at git revision REF (loaded
from ``git show`` as a module of its own, so only a single-file scheduler can be compared), in the same
run: before/after figures under the same load on the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batch_manager import scheduler as current  # noqa: E402
from model_manager.spec import ModelSpec  # noqa: E402
from model_manager.store import Registry  # noqa: E402

DELAY_MS = 60_000.0


def build(module: ModuleType, models: int) -> Any:
    specs = [ModelSpec(name=f"m{i}", version="1", model_class="examples.models.echo:Echo", max_batch_size=8,
                       max_batch_delay_ms=DELAY_MS) for i in range(models)]
    specs.append(ModelSpec(name="fast", version="1", model_class="examples.models.echo:Echo", max_batch_size=1,
                           max_batch_delay_ms=0.0))
    specs.append(ModelSpec(name="due", version="1", model_class="examples.models.echo:Echo", max_batch_size=8,
                           max_batch_delay_ms=1.0))
    registry = Registry({spec.key: spec for spec in specs}, {spec.name: spec.version for spec in specs}, 1)
    scheduler = module.Scheduler(registry)
    for spec in specs:
        scheduler.replica_up(f"r-{spec.name}", spec.name, "1", 2, now=0.0)
    for i in range(models):
        scheduler.submit(request(module, i, f"m{i}"), now=0.0)
    return scheduler


def request(module: ModuleType, request_id: int, model: str) -> Any:
    return module.Request((b"bench", request_id), model, None, [{"name": "x", "dtype": "float32", "shape": [1, 16]}],
                   [b"\0" * 64], 1e9)


def per_call_us(call: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000.0


def measure(module: ModuleType, models: int, rounds: int) -> dict[str, float]:
    scheduler = build(module, models)
    Dispatch = module.Dispatch  # noqa: N806
    figures = {"next_wakeup": per_call_us(scheduler.next_wakeup, rounds)}
    scan = getattr(scheduler, "next_wakeup_by_scan", None)
    if scan is not None:
        assert scan() == scheduler.next_wakeup()
        figures["next_wakeup (scan)"] = per_call_us(scan, rounds)

    ids = iter(range(10**6, 10**7))

    def submit_and_answer() -> None:
        [batch] = [a for a in scheduler.submit(request(module, next(ids), "fast"), now=0.5) if isinstance(a, Dispatch)]
        scheduler.on_result(batch.replica, batch.batch_id, [1], batch.metas, batch.frames, now=0.5)

    figures["submit+answer"] = per_call_us(submit_and_answer, rounds)

    def drain() -> None:  # what the service does for a request at low load: each message its own drain
        submit_and_answer()
        scheduler.next_wakeup()

    figures["drain"] = per_call_us(drain, rounds)

    # One group comes due per tick (model "due", 1 ms delay) while every other model's group keeps waiting.
    ticks = []
    for round_ in range(rounds):
        now = 1.0 + 0.01 * round_
        scheduler.submit(request(module, next(ids), "due"), now=now - 0.002)
        start = time.perf_counter_ns()
        actions = scheduler.tick(now)
        ticks.append(time.perf_counter_ns() - start)
        [batch] = [a for a in actions if isinstance(a, Dispatch)]
        scheduler.on_result(batch.replica, batch.batch_id, [1], batch.metas, batch.frames, now=now)
    figures["tick"] = statistics.median(ticks) / 1000.0
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--compare-ref", default=None, help="also measure the scheduler at this git revision")
    args = parser.parse_args()
    modules = {"this tree": current}
    if args.compare_ref:
        modules[args.compare_ref] = load_at(args.compare_ref)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for label, module in modules.items():
        results[label] = {str(models): measure(module, models, args.rounds) for models in args.models}
    for label, by_models in results.items():
        print(f"{label + ': µs per call (median)':<34}" + "".join(f"{m + ' models':>14}" for m in by_models))
        for name in next(iter(by_models.values())):
            print(f"  {name:<32}" + "".join(f"{figures[name]:>14.1f}" for figures in by_models.values()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def load_at(ref: str) -> ModuleType:
    source = subprocess.run(["git", "show", f"{ref}:batch_manager/scheduler.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "scheduler_at_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("scheduler_at_ref", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
