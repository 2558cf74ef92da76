"""One thread that follows this instance's pods: a label-selected list, then a watch from its resourceVersion.

The API server streams every change of the selected pods as one JSON line each (``ADDED``, ``MODIFIED``,
``DELETED``, ``BOOKMARK``, ``ERROR``). The thread resumes from the last resourceVersion it saw when a stream
ends (the server closes it after ``timeoutSeconds``) or breaks; when the server no longer has that version
(``410 Gone``, as a status or as an ``ERROR`` event) it lists again, and the list says which pods are gone.
Nothing here polls: between changes the thread blocks on the stream.

The thread calls back into the runtime (``on_event``, ``on_list``) from its own thread; the runtime hands what
the task manager must hear to the event loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 240  # the server ends each watch after this (randomised by real servers); we resume
RETRY_S = 1.0  # pause before reconnecting after an error, doubling while errors go on
MAX_RETRY_S = 30.0
MAX_LINE_BYTES = 8 * 1024 * 1024  # one pod as JSON is far below this (etcd stores at most 1.5 MB per object)

OnEvent = Callable[[str, dict[str, Any]], None]  # (ADDED | MODIFIED | DELETED, pod)
OnList = Callable[[list[dict[str, Any]], frozenset[str]], None]  # (every pod, names known before the list began)


class Expired(Exception):
    """The resourceVersion to resume from is too old (410 Gone): list again."""


class PodWatcher:
    def __init__(self, core: CoreV1Api, namespace: str, selector: str, *, on_event: OnEvent, on_list: OnList,
                 known: Callable[[], frozenset[str]]) -> None:
        self.core = core
        self.namespace = namespace
        self.selector = selector
        self.on_event = on_event
        self.on_list = on_list
        self.known = known
        self.lists = 0  # how many times it listed (a test reads it: a 410 must lead to a new list)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._response: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="kube-pod-watch", daemon=True)
                self._thread.start()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            response, self._response = self._response, None
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()  # unblocks the read in the watch thread
            with contextlib.suppress(Exception):
                response.release_conn()

    # --- the thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        version: str | None = None
        pause = RETRY_S
        while not self._closed.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._watch(version)
                pause = RETRY_S  # a stream that ended in order: the server is fine
            except Expired:
                log.info("pod watch: resourceVersion %s expired (410 Gone); listing again", version)
                version = None
            except Exception as exc:  # a broken stream or an API server away: resume from where we were
                if self._closed.is_set():
                    return
                log.warning("pod watch broke (%s); resuming from resourceVersion %s in %.0fs", _explain(exc),
                            version, pause)
                self._closed.wait(pause)
                pause = min(pause * 2, MAX_RETRY_S)  # an API server that keeps refusing is not hammered

    def _list(self) -> str:
        known = self.known()  # before the request: only these can be missing from its answer
        listing = call_json(self.core.list_namespaced_pod, self.namespace, label_selector=self.selector)
        self.lists += 1
        self.on_list(list(listing.get("items") or []), known)
        return str(listing["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> str:
        list_pods: Callable[..., Any] = self.core.list_namespaced_pod  # raw: the response, not a V1PodList
        try:
            response = list_pods(
                self.namespace, label_selector=self.selector, watch=True, resource_version=version,
                allow_watch_bookmarks=True, timeout_seconds=WATCH_TIMEOUT_S, _preload_content=False,
                _request_timeout=(10, WATCH_TIMEOUT_S + 30))
        except ApiException as exc:
            if exc.status == 410:
                raise Expired from exc
            raise
        with self._lock:
            if self._closed.is_set():
                response.close()
                return version
            self._response = response
        try:
            for line in _lines(response):
                event = json.loads(line)
                kind, pod = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if pod.get("code") == 410:
                        raise Expired
                    raise RuntimeError(f"watch error from the API server: {pod.get('message') or pod}")
                version = str((pod.get("metadata") or {}).get("resourceVersion") or version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.on_event(kind, pod)
        finally:
            with self._lock:
                self._response = None
            # Closed, not reused: a stream that broke off may hold half an answer.
            with contextlib.suppress(Exception):
                response.close()
            with contextlib.suppress(Exception):
                response.release_conn()
        return version


def call_json(method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A client call's answer as the API's own JSON (plain dicts), skipping the client's model classes."""
    response = method(*args, _preload_content=False, _request_timeout=kwargs.pop("_request_timeout", 30), **kwargs)
    try:
        answer: dict[str, Any] = json.loads(response.data)
    finally:
        response.release_conn()
    return answer


def call_quietly(method: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """A client call whose answer is not needed (a delete): it is not read into the client's model classes."""
    response = method(*args, _preload_content=False, _request_timeout=30, **kwargs)
    try:
        response.drain_conn()  # a connection goes back to the pool only once its answer is read
    finally:
        response.release_conn()


def _lines(response: Any) -> Iterator[str]:
    """The stream's lines, each bounded."""
    buffer = bytearray()
    for chunk in response.stream(amt=None, decode_content=False):
        buffer.extend(chunk)
        while (end := buffer.find(b"\n")) != -1:
            line = bytes(buffer[:end]).strip()
            del buffer[:end + 1]
            if line:
                yield line.decode("utf-8", errors="replace")
        if len(buffer) > MAX_LINE_BYTES:
            raise RuntimeError(f"a watch event longer than {MAX_LINE_BYTES} bytes")


def _explain(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return str(exc) or type(exc).__name__
