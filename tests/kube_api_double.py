"""An in-process test double of the Kubernetes API server, for the kubernetes runtime's tests.

No API server can run on these machines (none is packaged, no image can be pulled for kind or k3s), so the
runtime is tested with the real ``kubernetes`` client against this: a threaded HTTP server on 127.0.0.1 that
speaks the part of the core/v1 API the runtime uses, reached through an ordinary kubeconfig (bearer token,
http://127.0.0.1:PORT), so the runtime does not know it talks to a double.

What it implements:
- pods and secrets: create (201; 409 AlreadyExists; 422 for a bad name or label value), get, list, delete
  (404 when missing; 409 when a ``preconditions.uid`` does not match), with label selectors (``k=v``,
  ``k!=v``, ``k``), uids and a resourceVersion per change;
- watches of pods and secrets: chunked JSON lines from a resourceVersion (or every object first, without one),
  until ``timeoutSeconds``; a version older than the last compaction gets an ``ERROR`` event with code 410;
- garbage collection by owner reference (deleting a pod deletes what it owns, as the cluster's collector does);
- ``pods/log`` (``tailLines``) from the fake kubelet's capture of the container's output;
- a fake kubelet (``FakeKubelet``) that schedules a pod (or reports it Unschedulable while ``unschedulable`` is
  set), pulls only images it knows (else ``ErrImagePull``), resolves ``secretKeyRef`` variables from stored
  Secrets (``CreateContainerConfigError`` while one is missing), runs the container's command (or the image's
  entrypoint) as a local process with the pod's env, reports Running, then the exit as phase Succeeded/Failed,
  and on delete sends SIGTERM, then SIGKILL after the grace period;
- controls for a test: ``set_pod_status``, ``delete_behind_the_back``, ``drop_watches`` (the streams break
  mid-way, as a dropped connection does), ``expire`` (compaction: older resourceVersions get 410 Gone), and the
  request log (``requests``).

It is one file of about 560 lines: the store, the HTTP routes, the watches and the fake kubelet share one
lock and one store, and a test imports one thing.

What it does not: any other resource or verb (patch, update, deletecollection, exec), field selectors,
admission or RBAC (it checks the bearer token only), quota, real scheduling or nodes, TLS, protobuf, HTTP/2.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

TOKEN = "double-token"
HISTORY = 10_000  # changes kept for watches to resume from; older ones are compacted (410 Gone)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<kind>pods|secrets)(?:/(?P<name>[^/]+)(?P<log>/log)?)?$")
KINDS = {"pods": "Pod", "secrets": "Secret"}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term not in labels:
            return False
    return True


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "code": self.code}


class KubeApiDouble:
    def __init__(self, kubelet: FakeKubelet | None = None) -> None:
        self.lock = threading.Condition()
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind, namespace, name) -> object
        self.version = 0
        self.history: deque[tuple[int, str, str, str, dict[str, Any]]] = deque()  # (rv, kind, ns, type, object)
        self.compacted = 0  # resourceVersions at or below this are gone (410)
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.watch_generation = 0  # drop_watches bumps it: streams of an older generation break
        self.watches_open = 0
        self.closing = False
        self.kubelet = kubelet or FakeKubelet()
        self.kubelet.api = self
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="kube-api-double", daemon=True)

    # --- life ---------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> KubeApiDouble:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify_all()
        self.kubelet.stop()
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": TOKEN}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "tester"}}],
        }
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    # --- the store ------------------------------------------------------------------------------------------

    def _record(self, kind: str, namespace: str, kind_of_change: str, obj: dict[str, Any]) -> None:
        """Called with the lock held: a new resourceVersion for ``obj`` and an entry for watches."""
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.history.append((self.version, kind, namespace, kind_of_change, json.loads(json.dumps(obj))))
        while len(self.history) > HISTORY:
            self.compacted = self.history.popleft()[0]
        self.lock.notify_all()

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        metadata = body.setdefault("metadata", {})
        name = metadata.get("name", "")
        if not _DNS_LABEL.match(name) or len(name) > 253:
            raise ApiError(422, "Invalid", f'{KINDS[kind]} "{name}" is invalid: metadata.name')
        for key, value in (metadata.get("labels") or {}).items():
            if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
                raise ApiError(422, "Invalid", f"metadata.labels: Invalid value: {value!r} (label {key})")
        with self.lock:
            if (kind, namespace, name) in self.objects:
                raise ApiError(409, "AlreadyExists", f'{kind} "{name}" already exists')
            metadata.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=now())
            if kind == "pods":
                body["status"] = {"phase": "Pending"}
            self.objects[(kind, namespace, name)] = body
            self._record(kind, namespace, "ADDED", body)
            created = json.loads(json.dumps(body))
        if kind == "pods":
            self.kubelet.pod_created(namespace, name)
        return created

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        with self.lock:
            obj = self.objects.get((kind, namespace, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{kind} "{name}" not found')
            return json.loads(json.dumps(obj))

    def list(self, kind: str, namespace: str, selector: str) -> dict[str, Any]:
        with self.lock:
            items = [json.loads(json.dumps(obj)) for (k, ns, _), obj in self.objects.items()
                     if k == kind and ns == namespace and matches(selector, obj["metadata"].get("labels") or {})]
            return {"kind": f"{KINDS[kind]}List", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self.version)}, "items": items}

    def delete(self, kind: str, namespace: str, name: str, grace_s: int | None) -> dict[str, Any]:
        with self.lock:
            obj = self.objects.get((kind, namespace, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{kind} "{name}" not found')
            if kind != "pods" or not self.kubelet.running(namespace, name):
                self._remove(kind, namespace, name)
                return json.loads(json.dumps(obj))
            if not obj["metadata"].get("deletionTimestamp"):
                grace = 30 if grace_s is None else grace_s
                obj["metadata"].update(deletionTimestamp=now(), deletionGracePeriodSeconds=grace)
                self._record(kind, namespace, "MODIFIED", obj)
            else:
                grace = int(obj["metadata"]["deletionGracePeriodSeconds"])
                if grace_s is not None:  # a shorter grace wins, as on a real server
                    grace = min(grace, grace_s)
            answer = json.loads(json.dumps(obj))
        self.kubelet.terminate(namespace, name, grace)
        return answer

    def _remove(self, kind: str, namespace: str, name: str) -> None:
        """With the lock held: the object goes, and (as the garbage collector does) whatever it owned."""
        obj = self.objects.pop((kind, namespace, name), None)
        if obj is None:
            return
        self._record(kind, namespace, "DELETED", obj)
        uid = obj["metadata"]["uid"]
        for key, other in list(self.objects.items()):
            if any(ref.get("uid") == uid for ref in other["metadata"].get("ownerReferences") or []):
                self._remove(*key)

    def update_pod(self, namespace: str, name: str, change: Callable[[dict[str, Any]], None]) -> bool:
        with self.lock:
            pod = self.objects.get(("pods", namespace, name))
            if pod is None:
                return False
            change(pod)
            self._record("pods", namespace, "MODIFIED", pod)
            return True

    def pod_gone(self, namespace: str, name: str) -> None:
        """The kubelet finished a deleted pod: it leaves the store."""
        with self.lock:
            self._remove("pods", namespace, name)

    # --- controls for tests ---------------------------------------------------------------------------------

    def pods(self, namespace: str = "default") -> dict[str, dict[str, Any]]:
        with self.lock:
            return {name: json.loads(json.dumps(obj)) for (kind, ns, name), obj in self.objects.items()
                    if kind == "pods" and ns == namespace}

    def secrets(self, namespace: str = "default") -> dict[str, dict[str, Any]]:
        with self.lock:
            return {name: json.loads(json.dumps(obj)) for (kind, ns, name), obj in self.objects.items()
                    if kind == "secrets" and ns == namespace}

    def set_pod_status(self, name: str, namespace: str = "default", **status: Any) -> None:
        """Replace fields of a pod's status (phase, conditions, containerStatuses), as a kubelet would."""
        assert self.update_pod(namespace, name, lambda pod: pod["status"].update(status)), name

    def delete_behind_the_back(self, name: str, namespace: str = "default") -> None:
        """What `kubectl delete pod --grace-period=0 --force` does: the pod is gone at once."""
        self.kubelet.kill(namespace, name)
        with self.lock:
            self._remove("pods", namespace, name)

    def drop_watches(self) -> None:
        """Every open watch stream breaks (the connection ends mid-stream)."""
        with self.lock:
            self.watch_generation += 1
            self.lock.notify_all()

    def expire(self) -> None:
        """Compact the history: a watch that resumes from any version seen so far gets 410 Gone."""
        with self.lock:
            self.version += 1
            self.compacted = self.version
            self.history.clear()

    def put_object(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """An object someone else created (a leftover of an earlier run, say)."""
        return self.create(kind, namespace, body)

    def wait_watching(self, at_least: int = 1, timeout: float = 20.0) -> None:
        with self.lock:
            if not self.lock.wait_for(lambda: self.watches_open >= at_least, timeout):
                raise AssertionError(f"no watch stream open after {timeout}s")

    # --- watches --------------------------------------------------------------------------------------------

    def watch(self, kind: str, namespace: str, selector: str, since: str | None, timeout_s: float,
              ) -> Iterator[dict[str, Any] | None]:
        """Events for a watch, as dicts; None when the stream is to break."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            generation = self.watch_generation
            self.watches_open += 1
            self.lock.notify_all()
        try:
            with self.lock:
                if not since or since == "0":
                    pending: list[dict[str, Any]] = [
                        {"type": "ADDED", "object": json.loads(json.dumps(obj))}
                        for (k, ns, _), obj in self.objects.items()
                        if k == kind and ns == namespace and matches(selector, obj["metadata"].get("labels") or {})]
                    seen = self.version
                elif int(since) < self.compacted:
                    pending = [{"type": "ERROR", "object": ApiError(
                        410, "Expired", f"too old resource version: {since} ({self.compacted})").status()}]
                    seen = self.version
                else:
                    pending, seen = [], int(since)
            yield from pending
            if pending and pending[0]["type"] == "ERROR":
                return
            while True:
                with self.lock:
                    while True:
                        if self.closing or self.watch_generation != generation:
                            break
                        fresh = [(rv, t, obj) for rv, k, ns, t, obj in self.history
                                 if rv > seen and k == kind and ns == namespace
                                 and matches(selector, obj["metadata"].get("labels") or {})]
                        newest = self.version
                        if fresh or time.monotonic() >= deadline:
                            break
                        self.lock.wait(deadline - time.monotonic())
                    if self.closing or self.watch_generation != generation:
                        yield None  # the stream breaks
                        return
                seen = newest
                if not fresh:
                    return  # timeoutSeconds: the server ends the stream cleanly
                for _, change, obj in fresh:
                    yield {"type": change, "object": obj}
        finally:
            with self.lock:
                self.watches_open -= 1


def _handler(api: KubeApiDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: with Nagle on, each answer would wait for a delayed ACK (40 ms).
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            pass

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def _serve(self, method: str) -> None:
            url = urlparse(self.path)
            query = parse_qs(url.query)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            api.requests.append((method, url.path, query))
            try:
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    raise ApiError(401, "Unauthorized", "Unauthorized")
                route = _PATH.match(url.path)
                if route is None:
                    raise ApiError(404, "NotFound", f"the server could not find the requested resource {url.path}")
                kind, namespace, name = route["kind"], route["ns"], route["name"]
                one = query.get
                if route["log"]:
                    if method != "GET" or kind != "pods":
                        raise ApiError(405, "MethodNotAllowed", "log is get only")
                    api.get("pods", namespace, name)
                    tail = int(one("tailLines", ["0"])[0]) or None
                    self._send(200, api.kubelet.log(namespace, name, tail).encode(), "text/plain")
                    return
                if name is None and method == "GET" and one("watch", ["false"])[0] in ("true", "1"):
                    self._watch(kind, namespace, one("labelSelector", [""])[0], one("resourceVersion", [None])[0],
                                float(one("timeoutSeconds", ["1800"])[0]))
                    return
                if name is None and method == "GET":
                    answer, code = api.list(kind, namespace, one("labelSelector", [""])[0]), 200
                elif name is None and method == "POST":
                    answer, code = api.create(kind, namespace, json.loads(raw)), 201
                elif name is not None and method == "GET":
                    answer, code = api.get(kind, namespace, name), 200
                elif name is not None and method == "DELETE":
                    grace = one("gracePeriodSeconds", [None])[0]
                    body = json.loads(raw) if raw else {}
                    if grace is None and body.get("gracePeriodSeconds") is not None:
                        grace = str(body["gracePeriodSeconds"])
                    precondition = (body.get("preconditions") or {}).get("uid")
                    if precondition is not None and api.get(kind, namespace, name)["metadata"]["uid"] != precondition:
                        raise ApiError(409, "Conflict", f"Precondition failed: UID in precondition: {precondition}")
                    answer, code = api.delete(kind, namespace, name, None if grace is None else int(grace)), 200
                else:
                    raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
            except ApiError as exc:
                answer, code = exc.status(), exc.code
            self._send(code, json.dumps(answer).encode(), "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _watch(self, kind: str, namespace: str, selector: str, since: str | None, timeout_s: float) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for event in api.watch(kind, namespace, selector, since, timeout_s):
                    if event is None:
                        # Broken mid-way: no last chunk, and the connection closes.
                        self.close_connection = True
                        with contextlib.suppress(OSError):
                            self.connection.shutdown(2)
                        return
                    line = json.dumps(event).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    return Handler


class FakeKubelet:
    """Runs pods as local processes (see the module's docstring). ``images``: image -> entrypoint argv."""

    def __init__(self, images: dict[str, list[str]] | None = None, image_env: dict[str, str] | None = None,
                 autostart: bool = True) -> None:
        self.api: KubeApiDouble | None = None
        self.images = dict(images or {})
        self.image_env = dict(image_env or {})
        self.autostart = autostart
        self.unschedulable: str | None = None  # set: new pods stay Pending with this message
        self.lock = threading.Lock()
        self.processes: dict[tuple[str, str], subprocess.Popen[bytes]] = {}
        self.output: dict[tuple[str, str], deque[str]] = {}
        self.stopping = False

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            processes = list(self.processes.values())
        for process in processes:
            _kill_group(process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)

    def running(self, namespace: str, name: str) -> bool:
        # No lock: the API calls this holding its own, and the kubelet takes its lock before the API's.
        process = self.processes.get((namespace, name))
        return process is not None and process.poll() is None

    def log(self, namespace: str, name: str, tail: int | None) -> str:
        with self.lock:
            lines = list(self.output.get((namespace, name), ()))
        return "".join(lines[-tail:] if tail else lines)

    def pod_created(self, namespace: str, name: str) -> None:
        if self.autostart:
            threading.Thread(target=self.run_pod, args=(namespace, name), daemon=True).start()

    def schedule(self, name: str, namespace: str = "default") -> None:
        """Place a pod that was Unschedulable, and start it."""
        threading.Thread(target=self.run_pod, args=(namespace, name, True), daemon=True).start()

    def run_pod(self, namespace: str, name: str, force: bool = False) -> None:
        api = self.api
        assert api is not None
        if self.unschedulable is not None and not force:
            message = self.unschedulable
            api.update_pod(namespace, name, lambda pod: pod["status"].update(conditions=[
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]))
            return
        api.update_pod(namespace, name, lambda pod: (pod["spec"].update(nodeName="double-node"), pod["status"].update(
            conditions=[{"type": "PodScheduled", "status": "True"}])))
        try:
            pod = api.get("pods", namespace, name)
        except ApiError:
            return
        container = pod["spec"]["containers"][0]
        image = container["image"]
        if image not in self.images:
            self._waiting(namespace, name, "ErrImagePull", f'failed to pull and unpack image "{image}": not found')
            return
        env = self._environment(namespace, name, container)
        if env is None:
            return
        argv = list(container.get("command") or self.images[image]) + list(container.get("args") or [])
        with self.lock:
            if self.stopping or not api.update_pod(namespace, name, lambda p: None):
                return
            process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            self.processes[(namespace, name)] = process
            output = self.output[(namespace, name)] = deque(maxlen=1000)
        api.update_pod(namespace, name, lambda pod: pod["status"].update(
            phase="Running", podIP="127.0.0.1",
            containerStatuses=[{"name": container["name"], "ready": True, "restartCount": 0, "image": image,
                                "imageID": f"double://{image}", "state": {"running": {"startedAt": now()}}}]))
        assert process.stdout is not None
        for line in iter(process.stdout.readline, b""):
            output.append(line.decode("utf-8", errors="replace"))
        code = process.wait()
        terminated = {"exitCode": code if code >= 0 else 128 - code, "reason": "Completed" if code == 0 else "Error"}
        api.update_pod(namespace, name, lambda pod: pod["status"].update(
            phase="Succeeded" if code == 0 else "Failed",
            containerStatuses=[{"name": container["name"], "ready": False, "restartCount": 0, "image": image,
                                "imageID": f"double://{image}", "state": {"terminated": terminated}}]))
        with api.lock:
            deleting = bool((api.objects.get(("pods", namespace, name)) or {}).get("metadata", {})
                            .get("deletionTimestamp"))
        if deleting:
            api.pod_gone(namespace, name)

    def _environment(self, namespace: str, name: str, container: dict[str, Any]) -> dict[str, str] | None:
        """The container's variables; a Secret not there yet: CreateContainerConfigError, then a retry once it
        appears (as the kubelet's sync loop does)."""
        api = self.api
        assert api is not None
        for attempt in range(2):
            env, missing = dict(self.image_env), None
            for variable in container.get("env") or []:
                if "value" in variable:
                    env[variable["name"]] = variable["value"]
                    continue
                ref = variable["valueFrom"]["secretKeyRef"]
                with api.lock:
                    secret = api.objects.get(("secrets", namespace, ref["name"]))
                data = (secret or {}).get("stringData") or {}
                if ref["key"] not in data:
                    missing = ref["name"]
                    break
                env[variable["name"]] = data[ref["key"]]
            if missing is None:
                return env
            self._waiting(namespace, name, "CreateContainerConfigError", f'secret "{missing}" not found')
            if attempt == 0:
                key = ("secrets", namespace, missing)
                with api.lock:
                    api.lock.wait_for(lambda key=key: key in api.objects or api.closing, 10)  # type: ignore[misc]
        return None

    def _waiting(self, namespace: str, name: str, reason: str, message: str) -> None:
        assert self.api is not None
        self.api.update_pod(namespace, name, lambda pod: pod["status"].update(containerStatuses=[
            {"name": "replica", "ready": False, "restartCount": 0, "image": pod["spec"]["containers"][0]["image"],
             "imageID": "", "state": {"waiting": {"reason": reason, "message": message}}}]))

    def terminate(self, namespace: str, name: str, grace_s: int) -> None:
        with self.lock:
            process = self.processes.get((namespace, name))
        if process is None:
            return
        _kill_group(process, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)

        def kill_after_grace() -> None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace_s)
                return
            _kill_group(process, signal.SIGKILL)

        threading.Thread(target=kill_after_grace, daemon=True).start()

    def kill(self, namespace: str, name: str) -> None:
        with self.lock:
            process = self.processes.get((namespace, name))
        if process is not None:
            _kill_group(process, signal.SIGKILL)

    def pids(self) -> list[int]:
        with self.lock:
            return [p.pid for p in self.processes.values() if p.poll() is None]


def _kill_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)
