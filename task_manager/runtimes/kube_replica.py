"""One replica's pod as the task manager holds it: ``wait()`` for its end, ``stop()`` to delete it.

The pod watch (``kube_watch``, through the runtime) tells the handle what its pod does, from the watch
thread; the handle hands the end, and any news for the task manager, to the event loop. Split from
``kubernetes.py`` (the runtime: client, creation, sweeps, the watch's dispatch) as docker_replica.py is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Protocol

from task_manager.runtimes.base import ReplicaExit, ReplicaHandle, RuntimeEvents
from task_manager.runtimes.kube_pod import PodState

log = logging.getLogger(__name__)

STOP_MARGIN_S = 10.0  # past a stop's grace: time for the kubelet to kill and the API server to say so


class PodRuntime(Protocol):
    """What a handle needs of its runtime (``KubernetesRuntime``)."""

    events: RuntimeEvents | None

    def forget(self, name: str) -> None: ...

    def delete_blocking(self, name: str, grace_s: float) -> None: ...

    def log_tail_blocking(self, name: str) -> str: ...


class KubeReplica(ReplicaHandle):
    """One replica's pod. The watch thread tells it what the pod does; ``wait()`` returns its end."""

    def __init__(self, replica_id: str, runtime: PodRuntime, loop: asyncio.AbstractEventLoop) -> None:
        self.replica_id = replica_id
        self.runtime = runtime
        self._loop = loop
        self._ended: asyncio.Future[ReplicaExit] = loop.create_future()
        self._lock = threading.Lock()
        self._exit: ReplicaExit | None = None
        self._ending = False  # an end was seen; its log tail may still be on its way
        self._stopping = False
        self._unschedulable: str | None = None

    # --- from the watch thread ---------------------------------------------------------------------

    def observe(self, state: PodState) -> None:
        with self._lock:
            if self._ending:
                return
            if state.ended or state.never_started:
                self._ending = True
            report = None
            if state.unschedulable is not None and state.unschedulable != self._unschedulable:
                self._unschedulable = report = state.unschedulable
            elif state.scheduled and self._unschedulable is not None:
                self._unschedulable, report = None, ""
        if report is not None:
            self._tell_unschedulable(report or None)
        if state.never_started:
            self._finish(ReplicaExit(None, state.never_started, never_started=True))
        elif state.ended:
            # The log read blocks; not on the watch thread, which other replicas' news waits behind.
            threading.Thread(target=self._finish_with_log, args=(state,), name=f"log-{self.replica_id}",
                             daemon=True).start()

    def gone(self) -> None:
        with self._lock:
            if self._ending:
                return
            self._ending = True
            stopping = self._stopping
        self._finish(ReplicaExit(None, "" if stopping else "its pod was deleted (not by this proxy)"))

    def _finish_with_log(self, state: PodState) -> None:
        tail = self.runtime.log_tail_blocking(self.replica_id)
        self._finish(ReplicaExit(state.exit_code, "\n".join(part for part in (state.reason, tail) if part)))

    def _finish(self, exit_: ReplicaExit) -> None:
        with self._lock:
            if self._exit is not None:
                return
            self._exit = exit_
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            self._loop.call_soon_threadsafe(_set_result, self._ended, exit_)

    def _tell_unschedulable(self, reason: str | None) -> None:
        events = self.runtime.events
        if events is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(events.replica_unschedulable, self.replica_id, reason)

    # --- the ReplicaHandle interface -------------------------------------------------------------------

    async def wait(self) -> ReplicaExit:
        return await asyncio.shield(self._ended)

    async def stop(self, grace_s: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
        await asyncio.to_thread(self.runtime.delete_blocking, self.replica_id, grace_s)
        try:
            await asyncio.wait_for(asyncio.shield(self._ended), timeout=grace_s + STOP_MARGIN_S)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            log.warning("replica %s: its pod was not seen to end within %.0fs of its deletion", self.replica_id,
                        grace_s + STOP_MARGIN_S)
            self._finish(ReplicaExit(None, ""))
        self.runtime.forget(self.replica_id)


def _set_result(future: asyncio.Future[ReplicaExit], value: ReplicaExit) -> None:
    if not future.done():
        future.set_result(value)
