"""Garbage collection settled once a component is up: what it built at startup frozen, young collections rarer.

A component's hot path frees nearly everything by reference counting, but CPython's default
gen-0 threshold (700 net container allocations) still runs ~15-30 collections a second per
process at a few thousand requests a second, and each full one walks every object imported
at startup (msgspec, numpy, redis, starlette...): 50-60 ms pauses in the bridge and the batch
manager under ZeroMQ c=64 (measured with gc.callbacks, docs/PERFORMANCE.md "ZeroMQ path").
Freezing the startup heap (gc.freeze) takes it out of every later collection; a gen-0 threshold of 10,000
leaves reference cycles (rare here) to be found a little later. No collection is turned off.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 10_000


def settle() -> None:
    """Call once, when the component is ready: its startup heap leaves every later collection.

    No gc.collect() first: under load at startup one took 0.5-1 s per process (the whole heap, with
    every component starting at once on 2 cores); what startup garbage it would free is a one-off.
    """
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
