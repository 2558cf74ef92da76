"""One batch manager against two sharing one task manager: throughput at saturation, and the refusals.

    python bench/bench_scale_out.py [--rounds 5] [--window 3] [--predict-ms 40] [--json out.json]

Two batch managers, each with its own ZeroMQ bridge (``inferoxy run`` subprocesses), share one task manager
(in this process) and its two replicas, whose ``predict`` sleeps ``--predict-ms`` per batch of 4
(tests/scale_out_harness.py, the same set-up as tests/test_scale_out.py). Each round measures the same 48
closed-loop clients through one bridge (the other batch manager connected and idle), then 24 through each,
after a warm-up of 1 s; the rounds alternate which comes first, so a change in the machine's load hits both.
Prints results per second for each, the same-round ratio two / one, the medians, and every reply that was
not a result (an ``overloaded`` there is what credit splitting exists to prevent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.scale_out_harness import ScaleOut  # noqa: E402

WORKERS = 48
WARM_S = 1.0


async def bench(rounds: int, window_s: float, predict_s: float) -> dict[str, Any]:
    one: list[float] = []
    two: list[float] = []
    async with ScaleOut(batch_managers=2, predict_s=predict_s) as proxy:
        for index in range(rounds):
            order = ("one", "two") if index % 2 == 0 else ("two", "one")
            for how in order:
                loads = {0: WORKERS} if how == "one" else {0: WORKERS // 2, 1: WORKERS // 2}
                for bridge, workers in loads.items():
                    proxy.start_load(bridge, workers)
                rate = await proxy.measure(list(loads), WARM_S, window_s)
                for bridge in loads:
                    await proxy.stop_load(bridge)
                (one if how == "one" else two).append(rate)
            print(f"round {index + 1}: one batch manager {one[-1]:.1f}/s, two {two[-1]:.1f}/s, "
                  f"ratio {two[-1] / one[-1]:.3f}", flush=True)
        codes = sum((tally.codes for tally in proxy.tallies), Counter())
    ideal = 2 * 4 / predict_s
    ratios = [b / a for a, b in zip(one, two, strict=True)]
    result = {"predict_s": predict_s, "window_s": window_s, "workers": WORKERS, "ideal_per_s": ideal,
              "one_per_s": one, "two_per_s": two, "ratios": ratios,
              "median_one_per_s": statistics.median(one), "median_two_per_s": statistics.median(two),
              "median_ratio": statistics.median(ratios), "replies": dict(codes), "load_average": os.getloadavg()}
    print(f"median: one {result['median_one_per_s']:.1f}/s, two {result['median_two_per_s']:.1f}/s "
          f"(ideal {ideal:.0f}/s), same-round ratio {min(ratios):.3f}-{max(ratios):.3f}, median "
          f"{result['median_ratio']:.3f}; replies {dict(codes)}; load average {os.getloadavg()[0]:.1f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=float, default=3.0, help="seconds measured per configuration and round")
    parser.add_argument("--predict-ms", type=float, default=40.0, help="how long each batch sleeps in predict")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    result = asyncio.run(bench(args.rounds, args.window, args.predict_ms / 1000.0))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
