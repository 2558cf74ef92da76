"""One replica's life as an asyncio task: start it through the runtime, wait for its end, clean up.

The task is the only place that stops a replica: the rest of the task manager asks by setting
``replica.stop_requested`` (with ``replica.stop_grace_s``) and learns of the end through ``ended``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from task_manager.replicas import Replica
from task_manager.runtimes.base import ReplicaHandle, ReplicaPlan, Runtime

log = logging.getLogger(__name__)

KILL_GRACE_S = 1.0  # a replica that stopped answering gets little patience

# ended(replica, how it ended, whether it never started)
Ended = Callable[[Replica, str, bool], None]


async def run_replica(runtime: Runtime, plan: ReplicaPlan, replica: Replica, ended: Ended) -> None:
    """Own one replica's handle from start to end."""
    try:
        handle = await _start_uncancelled(runtime, plan)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        ended(replica, f"could not start: {exc}", True)
        return
    replica.handle = handle
    waiting = asyncio.create_task(handle.wait())
    stopping = asyncio.create_task(replica.stop_requested.wait())
    try:
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            await handle.stop(replica.stop_grace_s)
        exit_ = await waiting
        how, never_started = exit_.describe(), exit_.never_started
    except asyncio.CancelledError:  # the task manager is shutting down, past its drain budget
        await stop_quietly(handle, 0)
        raise
    except Exception as exc:  # the runtime failed us; the replica is as good as gone
        log.exception("lost track of replica %s", replica.id)
        how, never_started = f"the {runtime.name} runtime lost track of it: {exc}", False
    finally:
        stopping.cancel()
        waiting.cancel()
    ended(replica, how, never_started)
    await stop_quietly(handle, 0)  # removes what the replica left behind (process group, container)


async def _start_uncancelled(runtime: Runtime, plan: ReplicaPlan) -> ReplicaHandle:
    """``runtime.start`` that, when cancelled, still stops whatever it started instead of orphaning it."""
    starting = asyncio.ensure_future(runtime.start(plan))
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await stop_quietly(await starting, KILL_GRACE_S)  # cancelled: the task manager is stopping
        raise


async def stop_quietly(handle: ReplicaHandle, grace_s: float) -> None:
    try:
        await handle.stop(grace_s)
    except Exception:
        log.exception("could not stop replica %s", handle.replica_id)
