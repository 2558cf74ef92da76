"""One replica's container: waiting for its exit, stopping it, its last log lines; and the thread that
follows the engine's ``die`` events for every container of this instance.

Split from ``docker.py`` (the runtime: images, claims, orphans, container options) so each file has one
job; every engine call here blocks, and runs in a thread of its own or the default executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import requests
from docker.client import DockerClient
from docker.errors import APIError, DockerException, NotFound
from urllib3.exceptions import ReadTimeoutError

from task_manager.runtimes.base import LABEL_INSTANCE, ReplicaExit, ReplicaHandle

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 50
LOG_TAIL_MAX_CHARS = 8000  # 50 lines can still be megabytes; error replies and logs want a screenful
WAIT_SLICE_S = 5  # how long one engine wait call blocks before the watcher looks around again
ENGINE_RETRY_S = 1.0  # pause between wait calls while the engine does not answer
# What an engine call can raise: the engine's answers, and requests' own when it does not answer.
_ENGINE_ERRORS = (DockerException, requests.exceptions.RequestException)

T = TypeVar("T")


class _EventFollower:
    """One thread following the engine's ``die`` events for this instance's containers.

    Started with the first replica; reconnects when the stream breaks (the replicas' wait threads
    cover the gap). ``close`` ends it by closing the stream it is blocked on.
    """

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self._lock = threading.Lock()
        self._replicas: dict[str, DockerReplica] = {}  # container id -> replica
        self._thread: threading.Thread | None = None
        self._stream: Any = None
        self._closed = False

    def follow(self, client: DockerClient, replica: DockerReplica) -> None:
        with self._lock:
            self._replicas[replica.container.id] = replica
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, args=(client,), name="docker-events", daemon=True)
                self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
            self._replicas.clear()
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()

    def _run(self, client: DockerClient) -> None:
        filters = {"label": f"{LABEL_INSTANCE}={self.instance}", "type": "container", "event": "die"}
        while not self._closed:
            try:
                stream = client.events(filters=filters, decode=True)
                with self._lock:
                    if self._closed:
                        stream.close()
                        return
                    self._stream = stream
                for event in stream:
                    self._on_die(event)
            except Exception as exc:  # a broken stream: the wait threads still notice exits
                if self._closed:
                    return
                log.warning("following Docker events failed (%s); reconnecting", exc)
            if not self._closed:
                time.sleep(ENGINE_RETRY_S)

    def _on_die(self, event: dict[str, Any]) -> None:
        with self._lock:
            replica = self._replicas.pop(str(event.get("id", "")), None)
        if replica is None:
            return
        code = event.get("Actor", {}).get("Attributes", {}).get("exitCode")
        replica.died(int(code) if isinstance(code, str) and code.lstrip("-").isdigit() else None)


class DockerReplica(ReplicaHandle):
    """One replica's container. ``wait()`` and ``stop()`` may run at once, from any number of callers."""

    def __init__(self, replica_id: str, container: Any) -> None:
        self.replica_id = replica_id
        self.container = container
        self._exit: ReplicaExit | None = None  # set once, by whichever of wait/stop learns it first
        self._exit_lock = threading.Lock()
        # wait() and stop() both remove the container; this makes the second wait for the first.
        self._remove_lock = threading.Lock()
        self._removed = False
        self._watch: asyncio.Future[ReplicaExit] | None = None
        # Resolved from the event thread when the engine reports the container's death.
        self._died: asyncio.Future[ReplicaExit] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def wait(self) -> ReplicaExit:
        with self._exit_lock:
            if self._watch is None:
                self._loop = asyncio.get_running_loop()
                self._died = self._loop.create_future()
                self._watch = _in_daemon_thread(self._wait_blocking, f"wait-{self.replica_id}")
            if self._exit is not None:
                return self._exit
            watch, died = self._watch, self._died
        assert died is not None
        # asyncio.wait, not gather: one cancelled waiter must not end the watch the others share.
        done, _ = await asyncio.wait({watch, died}, return_when=asyncio.FIRST_COMPLETED)
        return self._exit or next(iter(done)).result()

    def died(self, code: int | None) -> None:
        """The engine reported the container's death (called from the event thread)."""
        exit_ = self._record(ReplicaExit(code, self._log_tail()))
        self._remove()  # as the wait thread does: once wait() returns, the container is gone
        with self._exit_lock:
            loop, died = self._loop, self._died
        if loop is not None and died is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(_set_result, died, exit_)

    async def stop(self, grace_s: float = 5.0) -> None:
        await asyncio.to_thread(self._stop_blocking, grace_s)

    # --- blocking ----------------------------------------------------------------------------------

    def _wait_blocking(self) -> ReplicaExit:
        while self._exit is None:
            try:
                status = self.container.wait(timeout=WAIT_SLICE_S)
            except NotFound:
                # Removed underneath us (stop() in another thread, or someone with the docker CLI).
                return self._record(ReplicaExit(None, ""))
            except requests.exceptions.ConnectionError as exc:
                if not (exc.args and isinstance(exc.args[0], ReadTimeoutError)):
                    log.warning("replica %s: the Docker engine does not answer (%s); still waiting",
                                self.replica_id, exc)
                    time.sleep(ENGINE_RETRY_S)
                continue  # a read timeout: still running
            except APIError as exc:
                log.warning("replica %s: waiting for the container failed (%s); retrying",
                            self.replica_id, _explain(exc))
                time.sleep(ENGINE_RETRY_S)
                continue
            ended = self._record(ReplicaExit(status.get("StatusCode"), self._log_tail()))
            # The replica has ended: its container goes now, its exit and log tail are kept here.
            self._remove()
            return ended
        return self._exit

    def _stop_blocking(self, grace_s: float) -> None:
        try:
            self.container.stop(timeout=max(0, math.ceil(grace_s)))
        except NotFound:
            self._record(ReplicaExit(None, ""))
            return
        except _ENGINE_ERRORS as exc:
            log.warning("replica %s: stopping the container failed (%s); removing it by force",
                        self.replica_id, _explain(exc))
        self._record(ReplicaExit(self._exit_code(), self._log_tail()))
        self._remove()

    def _remove(self) -> None:
        with self._remove_lock:
            if not self._removed:
                _remove_quietly(self.container)
                self._removed = True

    def _record(self, exit_: ReplicaExit) -> ReplicaExit:
        """Keep the first exit learned; a later, poorer one (the container already gone) loses."""
        with self._exit_lock:
            if self._exit is None:
                self._exit = exit_
            return self._exit

    def _exit_code(self) -> int | None:
        try:
            self.container.reload()
        except _ENGINE_ERRORS:
            return None
        state = self.container.attrs.get("State", {})
        return None if state.get("Running") else state.get("ExitCode")

    def _log_tail(self) -> str:
        try:
            raw = self.container.logs(stdout=True, stderr=True, tail=LOG_TAIL_LINES)
        except _ENGINE_ERRORS:
            return ""  # removed meanwhile, or a log driver that cannot be read back
        text = raw.decode("utf-8", errors="replace").rstrip()
        return text[-LOG_TAIL_MAX_CHARS:]


def _explain(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)


def _remove_quietly(container: Any) -> None:
    try:
        container.remove(force=True, v=True)
    except NotFound:
        pass
    except _ENGINE_ERRORS as exc:
        if isinstance(exc, APIError) and exc.status_code == 409 and "in progress" in _explain(exc):
            return  # someone else is removing it already
        # Left for remove_orphans at the next start; nothing better to do from here.
        log.warning("could not remove container %s: %s", getattr(container, "short_id", "?"), _explain(exc))


def _in_daemon_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run ``fn`` in a daemon thread; its outcome resolves the returned future on this loop.

    A daemon thread, so that a wait still blocked in the engine never holds up the interpreter's exit.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        deliver: Callable[[], None]
        try:
            deliver = partial(_set_result, future, fn())
        except BaseException as exc:  # handed to whoever awaits the future
            deliver = partial(_set_exception, future, exc)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            loop.call_soon_threadsafe(deliver)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _set_result(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
