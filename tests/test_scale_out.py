"""Two batch managers, each with its own bridge, driving one task manager's replicas to saturation (issue 12).

Each replica's credit is split between the batch managers (task_manager/credit.py): no `overloaded` anywhere,
the same throughput as through one batch manager, and a batch manager killed mid-load has its share reclaimed.
The replicas sleep 40 ms per batch of 4, so they are the bottleneck and the throughput ratio holds on a loaded
machine; bench/bench_scale_out.py repeats the measurement (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import asyncio

from tests.scale_out_harness import ScaleOut

WORKERS = 48  # clients in all: far more than the replicas' 4 batches of 4 at once, so requests always wait
WARM_S = 1.0
WINDOW_S = 3.0


def test_two_batch_managers_share_the_replicas_without_overloaded_and_reclaim_a_dead_ones_share() -> None:
    async def scenario() -> None:
        async with ScaleOut(batch_managers=2) as proxy:
            # The same load through one batch manager (the other connected and idle: it gets no share).
            proxy.start_load(0, WORKERS)
            one = await proxy.measure([0], WARM_S, WINDOW_S)
            assert proxy.shares() == [proxy.capacity(), 0], "demand at one batch manager: all of it"
            await proxy.stop_load(0)

            # Both sides, the same clients in all: the replicas are split, and nothing is refused.
            proxy.start_load(0, WORKERS // 2)
            proxy.start_load(1, WORKERS // 2)
            two = await proxy.measure([0, 1], WARM_S, WINDOW_S)
            half = proxy.capacity() // 2
            assert proxy.shares() == [half, half], "equal demand: half each"
            assert proxy.tallies[1].codes["ok"] > 0
            for index in (0, 1):
                assert set(proxy.tallies[index].codes) == {"ok"}, f"bridge {index}: {proxy.tallies[index].codes}"
            assert two >= 0.9 * one, f"two batch managers: {two:.0f}/s, one: {one:.0f}/s"

            # Kill the second mid-load: the task manager forgets it and its share comes back to the first.
            await asyncio.sleep(0.5)
            proxy.kill_batch_manager(1)
            await proxy.stop_load(1)  # its clients hear `unavailable` from their bridge
            await proxy.wait_for(lambda: proxy.shares() == [proxy.capacity()], "the dead one's share reclaimed",
                                 timeout=20)
            alone = await proxy.measure([0], WARM_S, WINDOW_S)
            await proxy.stop_load(0)
            print(f"results/s: one batch manager {one:.0f}, two {two:.0f}, the survivor alone {alone:.0f}")
            assert set(proxy.tallies[0].codes) == {"ok"}, f"the survivor's clients: {proxy.tallies[0].codes}"
            assert "overloaded" not in proxy.tallies[1].codes, proxy.tallies[1].codes
            assert alone >= 0.9 * one, f"after the kill: {alone:.0f}/s, before: {one:.0f}/s"

    asyncio.run(asyncio.wait_for(scenario(), 240))
