"""Differential check of a scheduler refactor: this tree's scheduler and the one at a git revision get the
same random calls (requests with priorities and sessions, cancels, results, failures, replicas up, down
and draining, registry changes, model statuses, time) and must return the same actions.

    python bench/compare_scheduler.py [--ref b3e29b5] [--seeds 300] [--steps 500]

Equal up to two things that carry no meaning: batch ids (a counter; compared through a map, and masked
in messages), and the order of actions of different model versions within one ``tick`` (the refactored
tick pumps only the model versions whose timers fell due, in the order they did). Only a single-file
scheduler can be loaded from the revision (``bench_scheduler.load_at``).
"""

# Each call's lambda runs at once, inside ``both``, never after the loop moved on.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch_manager import scheduler as new  # noqa: E402
from batch_manager.params import Priority, RequestParams, SessionParams  # noqa: E402
from bench.bench_scheduler import load_at  # noqa: E402
from model_manager.spec import ModelSpec  # noqa: E402
from model_manager.store import Registry  # noqa: E402

MODELS = ["a", "b", "s"]


def registry(rng: random.Random) -> Registry:
    specs = []
    for name in MODELS:
        if rng.random() < 0.85:
            extra: dict[str, Any] = dict(stateful=True, max_sessions_per_replica=2, session_idle_timeout_s=0.05) \
                if name == "s" else {}
            specs.append(ModelSpec(name=name, version="1", model_class="x:Y", max_batch_size=rng.choice([1, 2, 4]),
                                   max_batch_delay_ms=rng.choice([0.0, 1.0, 5.0]), max_queue_size=20, **extra))
    return Registry({s.key: s for s in specs}, {s.name: s.version for s in specs}, 1)


def norm(actions: list[Any]) -> list[str]:
    out = []
    for action in actions:
        fields = {name: getattr(action, name) for name in action.__dataclass_fields__ if name != "batch_id"}
        fields["kind"] = type(action).__name__
        out.append(re.sub(r"batch \d+", "batch N", repr(sorted(fields.items()))))
    return out


def run(old: ModuleType, seed: int, steps: int) -> int:
    """One random sequence; how many calls returned their actions in another order."""
    rng = random.Random(seed)
    reg = registry(rng)
    ours = new.Scheduler(reg, max_queue_size=30, priority_aging_s=0.002)
    theirs = old.Scheduler(reg, max_queue_size=30, priority_aging_s=0.002)
    now = 0.0
    next_id = 0
    live: list[tuple[bytes, int]] = []
    outstanding: list[Any] = []
    replicas: list[str] = []
    batch_ids: dict[int, int] = {}  # ours -> theirs
    reordered = 0

    def both(call: Callable[[Any, ModuleType], list[Any]]) -> None:
        nonlocal reordered
        mine, other = call(ours, new), call(theirs, old)
        if norm(mine) != norm(other):
            assert sorted(norm(mine)) == sorted(norm(other)), (seed, norm(mine), norm(other))
            reordered += 1

        def key(d: Any) -> str:
            return repr((d.replica, d.items, d.end_sessions))

        others = {key(d): d.batch_id for d in other if isinstance(d, old.Dispatch)}
        for d in mine:
            if isinstance(d, new.Dispatch):
                batch_ids[d.batch_id] = others[key(d)]
                outstanding.append(d)

    def batch_id(d: Any, module: ModuleType) -> int:
        return int(d.batch_id if module is new else batch_ids[d.batch_id])

    for _ in range(steps):
        op = rng.random()
        if op < 0.35:
            next_id += 1
            model = rng.choice(MODELS)
            session = SessionParams(rng.randrange(4), start=rng.random() < 0.4, end=rng.random() < 0.2) \
                if model == "s" else None
            params = RequestParams(priority=rng.choice(list(Priority)), session=session)
            metas = [{"name": "x", "dtype": "float32", "shape": [rng.choice([1, 1, 2]), rng.choice([3, 4])]}]
            deadline = now + rng.choice([0.003, 0.05, 1.0])
            origin = (b"br", next_id)
            both(lambda s, m: s.submit(m.Request(origin, model, None, metas, [b"ab"], deadline, params), now))
            live.append(origin)
        elif op < 0.42 and live:
            origin = live.pop(rng.randrange(len(live)))
            both(lambda s, m: s.cancel(origin, now))
        elif op < 0.6 and outstanding:
            d = outstanding.pop(rng.randrange(len(outstanding)))
            how = rng.random()
            if how < 0.75:
                counts = [item["n"] for item in d.items]
                both(lambda s, m: s.on_result(d.replica, batch_id(d, m), counts, d.metas, d.frames, now))
            else:
                code = "replica_lost" if how < 0.9 else "model_error"
                both(lambda s, m: s.on_failed(d.replica, batch_id(d, m), code, "gone", now))
        elif op < 0.67:
            replica, model, capacity = f"r{rng.randrange(6)}", rng.choice(MODELS), rng.choice([1, 2])
            both(lambda s, m: s.replica_up(replica, model, "1", capacity, now))
            replicas.append(replica)
        elif op < 0.71 and replicas:
            replica = replicas.pop(rng.randrange(len(replicas)))
            if rng.random() < 0.5:
                both(lambda s, m: s.replica_down(replica, "stopped", now))
            else:
                both(lambda s, m: s.replica_draining(replica, "scaling down", now))
        elif op < 0.74:
            reg = registry(rng)
            both(lambda s, m: s.set_registry(reg, now))
        elif op < 0.77:
            model, state = rng.choice(MODELS), rng.choice(["ready", "failed", "stopped", "starting"])
            both(lambda s, m: s.model_status(model, "1", state, "why", now))
        elif op < 0.92:
            now += rng.choice([0.0005, 0.001, 0.004, 0.02, 0.1])
            both(lambda s, m: s.tick(now))
        else:
            wake = ours.next_wakeup()
            assert wake == theirs.next_wakeup(), seed
            if wake is not None:
                now = max(now, wake)
                both(lambda s, m: s.tick(now))
        assert (ours.pending(), ours.queued(), ours.batches_in_flight()) == \
            (theirs.pending(), theirs.queued(), theirs.batches_in_flight()), seed
    return reordered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="b3e29b5", help="the revision to compare with (default: before the split)")
    parser.add_argument("--seeds", type=int, default=300)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    old = load_at(args.ref)
    reordered = sum(run(old, seed, args.steps) for seed in range(args.seeds))
    print(f"{args.seeds} sequences of {args.steps} calls: the same actions "
          f"({reordered} calls returned them in another order across model versions)")


if __name__ == "__main__":
    main()
