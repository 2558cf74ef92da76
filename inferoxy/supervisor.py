"""``inferoxy serve``: every component in a process of its own, started in order and stopped together.

Each child is ``python -m inferoxy run COMPONENT``. It reports readiness by writing a JSON
line to a pipe (``INFEROXY_READY_FD``), which is how the embedded Redis's address
reaches the components started after it. Children die with the supervisor (Linux
parent-death signal), so even a SIGKILLed ``serve`` leaves nothing behind; on SIGINT or
SIGTERM the supervisor stops them bridges-first and waits for each.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from inferoxy.procutil import die_with_parent
from inferoxy.runner import component_names
from inferoxy.settings import Settings

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0


class StartupError(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    ready_pipe: int


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: list[Child] = []
        self._wake = threading.Event()

    def serve(self) -> int:
        """Start everything, print where to reach it, and return an exit status once told to stop."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGCHLD, self._on_signal)
        try:
            settings = self._start_all()
            print_endpoints(settings, embedded_redis=not self.settings.redis_url)
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stop_requested:
                    return 0
                dead = [c for c in self.children if c.process.poll() is not None]
                if dead:
                    for child in dead:
                        log.error("%s exited with status %s; stopping Inferoxy", child.name, child.process.returncode)
                    return 1
        except StartupError as exc:
            log.error("%s", exc)
            return 1
        finally:
            self._stop_all()

    _stop_requested = False

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum != signal.SIGCHLD:
            self._stop_requested = True
        self._wake.set()

    def _start_all(self) -> Settings:
        names = component_names(self.settings)
        model_manager = self._start(names[0], {})
        redis_url = self._wait_ready(model_manager).get("redis_url") or self.settings.redis_url
        env = {"INFEROXY_REDIS_URL": redis_url} if redis_url else {}
        started = [self._start(name, env) for name in names[1:]]
        for child in started:
            self._wait_ready(child)
        return self.settings.model_copy(update={"redis_url": redis_url})

    def _start(self, name: str, extra_env: dict[str, str]) -> Child:
        read_fd, write_fd = os.pipe()
        env = {**os.environ, **extra_env, "INFEROXY_READY_FD": str(write_fd)}
        process = subprocess.Popen(
            [sys.executable, "-m", "inferoxy", "run", name],
            env=env,
            pass_fds=(write_fd,),
            preexec_fn=die_with_parent,
        )
        os.close(write_fd)
        child = Child(name, process, read_fd)
        self.children.append(child)
        return child

    def _wait_ready(self, child: Child) -> dict[str, str]:
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
        os.close(child.ready_pipe)
        return json.loads(buffer.split(b"\n", 1)[0])

    def _stop_all(self) -> None:
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    child.process.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0fs; killing it", child.name, STOP_GRACE_S)
                    child.process.kill()
                    child.process.wait()
        log.info("Inferoxy stopped")


def print_endpoints(settings: Settings, *, embedded_redis: bool) -> None:
    host = settings.bind_host
    lines = ["Inferoxy is serving:"]
    if "rest" in settings.bridge_names:
        lines.append(f"  REST (Open Inference Protocol)  http://{host}:{settings.rest_port}/v2")
    if "grpc" in settings.bridge_names:
        lines.append(f"  gRPC (Open Inference Protocol)  {host}:{settings.grpc_port}")
    if "zmq" in settings.bridge_names:
        lines.append(f"  ZeroMQ clients                  tcp://{host}:{settings.zmq_port}")
    embedded = " (embedded)" if embedded_redis else ""
    lines.append(f"  model registry                  {settings.redis_url}{embedded}")
    lines.append(f"  replicas run as                 {settings.runtime}")
    print("\n".join(lines), flush=True)
