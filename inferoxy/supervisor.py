"""``inferoxy serve``: every component in a process of its own, started in order and stopped together.

Each child is ``python -m inferoxy run COMPONENT``. It reports readiness by writing a JSON
line to a pipe (``INFEROXY_READY_FD``), which is how the embedded Redis's address
reaches the components started after it. Children die with the supervisor (Linux
parent-death signal), so even a SIGKILLed ``serve`` leaves nothing behind; on SIGINT or
SIGTERM the supervisor stops them bridges-first and waits for each.

A child that exits while Inferoxy serves is started again with the same settings, so with the
same endpoints (the embedded Redis comes back on the port it had, so every other component's
``INFEROXY_REDIS_URL`` stays valid). The first restart is immediate, later ones back off
(``restart_backoff_s`` doubling up to ``restart_backoff_max_s``); a component that dies
``COMPONENT_CRASH_LOOP`` times in a row, each time within ``restart_backoff_max_s`` of its start,
is a crash loop: ``serve`` says so and stops with status 1. Its siblings ride out the gap on
their own (heartbeats, ZeroMQ reconnection; docs/ARCHITECTURE.md). The components' PIDs are
printed with the endpoints, and a restarted one logs ``COMPONENT is back (pid N)``. A child that
is stopped (SIGSTOP) rather than dead is left alone: its peers notice its silence by heartbeats
and route around it, and it carries on if it is continued.

The components' own links (bridges -> batch manager -> task manager) run over ipc:// sockets in a
directory made for this run (mode 0700, removed at exit; ``private_bus``) unless the operator set
their URLs: no TCP stack between processes of one host, and no CURVE either, since only this uid
can enter the directory (docs/ARCHITECTURE.md, "Decisions"). The replica link joins them when replicas
are local processes (``INFEROXY_RUNTIME=process``) and neither replica URL was set: they run as this uid,
which could read the bus secret from the components' environment anyway, so CURVE there only cost two
encryptions of every tensor each way. Docker replicas dial from their own network namespace and mount
namespace, so their link stays tcp:// with a CURVE key per replica.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import zmq

from inferoxy import curve, metrics
from inferoxy.credentials import make_serve_secrets, mask_url
from inferoxy.procutil import die_with_parent
from inferoxy.runner import component_names
from inferoxy.settings import Settings

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
# Deaths in a row, each within restart_backoff_max_s of the start, after which serve gives up.
COMPONENT_CRASH_LOOP = 5
# The private directory of the components' ipc:// sockets: inferoxy-bus-{serve's pid}-{random}.
BUS_DIR_PREFIX = "inferoxy-bus-"
# Where the children's metrics samples meet: inferoxy-metrics-{serve's pid}-{random}.
METRICS_DIR_PREFIX = "inferoxy-metrics-"
# The links serve puts there unless the operator set their URL, and the socket file of each.
PRIVATE_LINKS = {"batch_manager_url": "batch_manager", "task_manager_url": "task_manager"}
# The replica link, only for replicas that are local processes (``private_links``).
REPLICA_LINK = {"replica_bind_url": "replicas"}
# A Unix socket path holds at most 107 bytes (sun_path, with its NUL); libzmq refuses a longer ipc:// URL.
MAX_IPC_PATH = 107


class StartupError(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    ready_pipe: int | None  # open until the child reported ready
    extra_env: dict[str, str] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    deaths: int = 0  # in a row, each soon after its start
    restart_at: float | None = None  # set while the child is dead and waits for its restart
    ready_buffer: bytes = b""


def private_bus(settings: Settings) -> tuple[str | None, dict[str, str]]:
    """A fresh 0700 directory for the components' ipc:// sockets, and the variables that point the links the
    operator left unset at it; (None, {}) when every such link was set."""
    links = private_links(settings)
    unset = [name for name in links if name not in settings.model_fields_set]
    if not unset:
        return None, {}
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()  # the run dir: per user, cleared at logout
    if not os.path.isdir(base) or len(base) + 64 > MAX_IPC_PATH:
        base = "/tmp"
    remove_stale_bus_dirs(base)
    directory = tempfile.mkdtemp(prefix=f"{BUS_DIR_PREFIX}{os.getpid()}-", dir=base)  # 0700, this uid's
    return directory, {f"INFEROXY_{name.upper()}": f"ipc://{directory}/{links[name]}" for name in unset}


def private_links(settings: Settings) -> dict[str, str]:
    """The links serve may put in its private directory, and the socket file of each. The replica link only
    when replicas are processes of this uid and the operator named no replica address (a replica_connect_url
    says they dial from elsewhere)."""
    local_replicas = settings.runtime == "process" and "replica_connect_url" not in settings.model_fields_set
    return {**PRIVATE_LINKS, **(REPLICA_LINK if local_replicas else {})}


def metrics_dir(settings: Settings) -> str | None:
    """A fresh 0700 directory where every child writes its metrics samples (prometheus-client's multiprocess
    mode), so the REST bridge's ``GET /metrics`` shows the whole proxy; None with metrics off or when the
    operator named one (PROMETHEUS_MULTIPROC_DIR, which is then used as it is)."""
    if not settings.metrics:
        metrics.disable()
        return None
    named = metrics.multiprocess_dir()
    if named is not None:
        metrics.use_directory(named)
        return None
    base = tempfile.gettempdir()
    remove_stale_bus_dirs(base, METRICS_DIR_PREFIX)
    directory = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-", dir=base)
    metrics.use_directory(directory)  # the children inherit it through the environment
    return directory


def remove_stale_bus_dirs(base: str, prefix: str = BUS_DIR_PREFIX) -> None:
    """Directories a SIGKILLed serve left behind (its children died with it): this uid's, their serve gone."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            pid = entry.name.removeprefix(prefix).split("-", 1)[0]
            if not entry.name.startswith(prefix) or not pid.isdigit() or pid_alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid == os.getuid() and entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def restart_delay(deaths: int, base_s: float, max_s: float) -> float:
    """The first restart is at once (a kill is not a crash loop); later ones back off exponentially."""
    if deaths <= 1:
        return 0.0
    return float(min(max_s, base_s * 2 ** min(deaths - 2, 30)))


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: list[Child] = []
        # The embedded Redis's password and the bus secret, made once (unless `inferoxy serve` or the operator
        # already set them) and handed to every child, restarted ones too, so they keep agreeing.
        self._secrets = make_serve_secrets(settings)
        self._bus_dir: str | None = None
        self._bus_env: dict[str, str] = {}
        self._metrics_dir: str | None = None

    def serve(self) -> int:
        """Start everything, print where to reach it, and return an exit status once told to stop."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGCHLD, self._on_signal)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        previous_wakeup = signal.set_wakeup_fd(wake_w)  # a signal makes select() below return
        try:
            try:
                self._bus_dir, self._bus_env = private_bus(self.settings)
            except OSError as exc:
                raise StartupError(f"cannot make the private directory of the bus's ipc:// sockets: {exc}") from None
            try:
                self._metrics_dir = metrics_dir(self.settings)
            except OSError as exc:
                raise StartupError(f"cannot make the directory of the metrics samples: {exc}") from None
            settings = self._start_all()
            print_endpoints(settings, embedded_redis=not self.settings.redis_url, children=self.children)
            return self._watch(wake_r)
        except StartupError as exc:
            log.error("%s", exc)
            return 1
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            os.close(wake_r)
            os.close(wake_w)
            self._stop_all()
            for directory in (self._bus_dir, self._metrics_dir):
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)

    def _watch(self, wake_fd: int) -> int:
        """Restart children that die until told to stop (0) or a child crash-loops (1)."""
        while not self._stop_requested:
            for child in self.children:
                if child.restart_at is None and child.process.poll() is not None and not self._schedule_restart(child):
                    return 1
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is not None and child.restart_at <= now:
                    self._restart(child)
            due = [c.restart_at for c in self.children if c.restart_at is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            pipes = [c.ready_pipe for c in self.children if c.ready_pipe is not None]
            readable, _, _ = select.select([wake_fd, *pipes], [], [], timeout)
            if wake_fd in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_fd, 4096)
            for child in self.children:
                if child.ready_pipe is not None and child.ready_pipe in readable:
                    self._read_restarted(child)
        return 0

    def _schedule_restart(self, child: Child) -> bool:
        """A child died: plan its restart, or False when it is crash-looping."""
        self._close_ready_pipe(child)
        metrics.COMPONENT_UP.labels(child.name).set(0)
        metrics.process_dead(child.process.pid)  # its live gauges (queue depth, replicas) leave the sums
        now = time.monotonic()
        served_s = now - child.started_at
        child.deaths = child.deaths + 1 if served_s < self.settings.restart_backoff_max_s else 1
        status = child.process.returncode
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        if child.deaths >= COMPONENT_CRASH_LOOP:
            log.error("%s (pid %d) %s: it died %d times in a row, each within %.0fs of its start, a crash loop; "
                      "stopping Inferoxy (its log above says why)", child.name, child.process.pid, how, child.deaths,
                      self.settings.restart_backoff_max_s)
            return False
        delay = restart_delay(child.deaths, self.settings.restart_backoff_s, self.settings.restart_backoff_max_s)
        log.warning("%s (pid %d) %s after %.1fs; restarting it%s", child.name, child.process.pid, how, served_s,
                    f" in {delay:.1f}s" if delay else "")
        child.restart_at = now + delay
        return True

    def _restart(self, child: Child) -> None:
        fresh = self._spawn(child.name, child.extra_env)
        metrics.COMPONENT_RESTARTS.labels(child.name).inc()
        child.process, child.ready_pipe, child.started_at = fresh.process, fresh.ready_pipe, fresh.started_at
        child.restart_at, child.ready_buffer = None, b""

    def _read_restarted(self, child: Child) -> None:
        assert child.ready_pipe is not None
        chunk = os.read(child.ready_pipe, 4096)
        child.ready_buffer += chunk
        if not chunk:  # closed without a word: it failed to start, and its exit is handled as a death
            self._close_ready_pipe(child)
        elif b"\n" in child.ready_buffer:
            self._close_ready_pipe(child)
            metrics.COMPONENT_UP.labels(child.name).set(1)
            log.warning("%s is back (pid %d)", child.name, child.process.pid)

    @staticmethod
    def _close_ready_pipe(child: Child) -> None:
        if child.ready_pipe is not None:
            os.close(child.ready_pipe)
            child.ready_pipe = None

    _stop_requested = False

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum != signal.SIGCHLD:
            self._stop_requested = True

    def _start_all(self) -> Settings:
        names = component_names(self.settings)
        model_manager = self._start(names[0], {})
        redis_url = self._wait_ready(model_manager).get("redis_url") or self.settings.redis_url
        if redis_url and not self.settings.redis_url:
            # Restarted, the embedded Redis must come back where the other components look for it.
            model_manager.extra_env["INFEROXY_EMBEDDED_REDIS_PORT"] = str(urlsplit(redis_url).port)
        env = {"INFEROXY_REDIS_URL": redis_url} if redis_url else {}
        started = [self._start(name, env) for name in names[1:]]
        for child in started:
            self._wait_ready(child)
        bus = {name: self._bus_env[f"INFEROXY_{name.upper()}"] for name in (*PRIVATE_LINKS, *REPLICA_LINK)
               if f"INFEROXY_{name.upper()}" in self._bus_env}
        return self.settings.model_copy(update={"redis_url": redis_url, **bus})

    def _start(self, name: str, extra_env: dict[str, str]) -> Child:
        child = self._spawn(name, extra_env)
        self.children.append(child)
        return child

    def _spawn(self, name: str, extra_env: dict[str, str]) -> Child:
        read_fd, write_fd = os.pipe()
        env = {**os.environ, **self._secrets, **self._bus_env, **extra_env, "INFEROXY_READY_FD": str(write_fd)}
        process = subprocess.Popen(
            [sys.executable, "-m", "inferoxy", "run", name],
            env=env,
            pass_fds=(write_fd,),
            preexec_fn=die_with_parent,
        )
        os.close(write_fd)
        return Child(name, process, read_fd, dict(extra_env))

    def _wait_ready(self, child: Child) -> dict[str, str]:
        assert child.ready_pipe is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        buffer = b""
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StartupError(f"{child.name} did not become ready within {READY_TIMEOUT_S:.0f}s")
            readable, _, _ = select.select([child.ready_pipe], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(child.ready_pipe, 4096)
            if not chunk:  # the child closed the pipe without a word: it failed to start
                child.process.wait(timeout=STOP_GRACE_S)
                raise StartupError(f"{child.name} failed to start (exit status {child.process.returncode})")
            buffer += chunk
        self._close_ready_pipe(child)
        metrics.COMPONENT_UP.labels(child.name).set(1)
        return json.loads(buffer.split(b"\n", 1)[0])

    def _stop_all(self) -> None:
        # The reverse of the start order, so each part still has what it needs to finish; the bridges all stop
        # together, since their graceful waits are independent and in sequence they would add up.
        bridges = [child for child in self.children if child.name.endswith("_bridge")]
        others = [child for child in reversed(self.children) if child not in bridges]
        for group in (bridges, *([child] for child in others)):
            for child in group:
                self._close_ready_pipe(child)
                if child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            for child in group:
                try:
                    child.process.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0fs; killing it", child.name, STOP_GRACE_S)
                    child.process.kill()
                    child.process.wait()
        log.info("Inferoxy stopped")


def print_endpoints(settings: Settings, *, embedded_redis: bool, children: Sequence[Child] = ()) -> None:
    host = settings.bind_host
    lines = ["Inferoxy is serving:"]
    if "rest" in settings.bridge_names:
        scheme = "https" if settings.tls else "http"
        lines.append(f"  REST (Open Inference Protocol)  {scheme}://{host}:{settings.rest_port}/v2")
    if "grpc" in settings.bridge_names:
        lines.append(f"  gRPC (Open Inference Protocol)  {host}:{settings.grpc_port}{' (TLS)' if settings.tls else ''}")
    if "zmq" in settings.bridge_names:
        lines.append(f"  ZeroMQ clients                  tcp://{host}:{settings.zmq_port}{curve_note(settings)}")
    embedded = " (embedded)" if embedded_redis else ""
    lines.append(f"  model registry                  {mask_url(settings.redis_url)}{embedded}")
    lines.append(f"  bridges -> batch manager        {bus_link(settings, 'batch_manager_url')}")
    lines.append(f"  batch manager -> task manager   {bus_link(settings, 'task_manager_url')}")
    lines.append(f"  replicas -> task manager        {bus_link(settings, 'replica_bind_url')}")
    lines.append(f"  replicas run as                 {settings.runtime}")
    if children:
        pids = ", ".join(f"{child.name} {child.process.pid}" for child in children)
        lines.append(f"  components (pid)                {pids}")
    print("\n".join(lines), flush=True)


def bus_link(settings: Settings, link: str) -> str:
    """A link of the components and how it is guarded: CURVE, a directory only this uid can enter, or nothing."""
    url: str = getattr(settings, link)
    if url.startswith("ipc://") and curve.private_ipc(url.removeprefix("ipc://")):
        return f"{url} (private directory)"
    if settings.bus_key_secret and curve.needs_curve(url):
        return f"{url} (CURVE)"
    return url


def curve_note(settings: Settings) -> str:
    """The public key clients of an encrypted ZeroMQ port need (the secret one is never shown)."""
    if settings.zmq_curve_secret_key is None:
        return ""
    public = zmq.curve_public(settings.zmq_curve_secret_key.get_secret_value().encode()).decode()
    return f" (CURVE; server public key {public})"
