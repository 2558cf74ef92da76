"""Helpers the tests share: free ports, polling with a deadline, and a whole proxy in a subprocess."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import fakeredis
import pytest

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def delete_redis_prefix(url: str, prefix: str) -> None:
    """Delete every key a test wrote under ``prefix:`` in the real Redis at ``url``."""
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def tcp_fakeredis() -> Iterator[str]:
    """An embedded Redis-protocol server (fakeredis) on a free loopback port, for harnesses that start components
    in-process and need a registry of their own, not a shared server's state; its redis:// URL."""
    server = fakeredis.TcpFakeServer(("127.0.0.1", free_port()), server_type="redis")
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="test-fakeredis", daemon=True).start()
    try:
        yield f"redis://127.0.0.1:{server.server_address[1]}/0"
    finally:
        server.shutdown()
        server.server_close()


def wait_for(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after the last ')' do not.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def require_service(name: str, variable: str, problem: str = "is not reachable") -> None:
    """Fail (in CI, or when ``variable`` is set) or skip (on a developer's machine) for a missing service."""
    message = f"{name} {problem}"
    if os.environ.get("CI") or os.environ.get(variable):
        pytest.fail(f"{message}, and this run requires it ({variable} or CI is set)")
    pytest.skip(message)


def require_program(program: str, variable: str) -> str:
    """The path of ``program``; when it is not on PATH, a skip or a failure as ``require_service`` decides."""
    path = shutil.which(program)
    if path is None:
        require_service(program, variable, "is not installed (not on PATH)")
    assert path is not None
    return path


class ProxyProcess:
    """``inferoxy serve`` in a subprocess, on free loopback ports, stopped (with all it started) by ``stop``."""

    def __init__(self, env: dict[str, str] | None = None, args: list[str] | None = None, cwd: Path = REPO) -> None:
        self.rest_port = free_port()
        self.zmq_port = free_port()
        self.grpc_port = free_port()
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "INFEROXY_BIND_HOST": "127.0.0.1",
            "INFEROXY_REST_PORT": str(self.rest_port),
            "INFEROXY_ZMQ_PORT": str(self.zmq_port),
            "INFEROXY_GRPC_PORT": str(self.grpc_port),
            "INFEROXY_BATCH_MANAGER_URL": f"tcp://127.0.0.1:{free_port()}",
            "INFEROXY_TASK_MANAGER_URL": f"tcp://127.0.0.1:{free_port()}",
            "INFEROXY_REPLICA_BIND_URL": f"tcp://127.0.0.1:{free_port()}",
            "INFEROXY_EMBEDDED_REDIS_PORT": str(free_port()),
            "INFEROXY_MODELS_FILE": str(REPO / "models.yaml"),
            "INFEROXY_INSTANCE": f"test{os.getpid()}",
            **(env or {}),
        }
        self.args = args or []
        self.cwd = cwd
        self.process: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def zmq_url(self) -> str:
        return f"tcp://127.0.0.1:{self.zmq_port}"

    def start(self, timeout: float = 60.0) -> ProxyProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "inferoxy", "serve", *self.args],
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        self.wait_for_line("Inferoxy is serving", timeout)
        return self

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_for_line(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout}s; output:\n{self.log()}") from None
            if line is None:
                raise AssertionError(f"inferoxy exited before printing {text!r}; output:\n{self.log()}")
            if text in line:
                return line

    def log(self) -> str:
        return "".join(self.output[-200:])

    def component_pids(self) -> dict[str, int]:
        """Each component's PID, as ``serve`` printed them (updated by each ``X is back (pid N)`` line)."""
        found: dict[str, int] = {}
        for line in self.output:
            if "components (pid)" in line:
                for name, pid in re.findall(r"(\w+) (\d+)", line.split("components (pid)", 1)[1]):
                    found[name] = int(pid)
            elif " is back (pid " in line:
                name = line.split(" is back (pid ", 1)[0].rsplit(None, 1)[-1]
                found[name] = int(line.split(" is back (pid ", 1)[1].split(")", 1)[0])
        return found

    def pids(self) -> set[int]:
        assert self.process is not None
        return descendants(self.process.pid)

    def replica_pids(self, model: str | None = None) -> list[int]:
        """The replica processes below the proxy (of ``model`` only, when given), read from their environment."""
        wanted = b"INFEROXY_MODEL_NAME=" + (model.encode() if model is not None else b"")
        found = []
        for pid in self.pids():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(entry.startswith(wanted) and (model is None or entry == wanted) for entry in environ):
                found.append(pid)
        return found

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then check that nothing it started survives it."""
        assert self.process is not None
        started = self.pids()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            for pid in started:
                _kill(pid)
            raise AssertionError(f"inferoxy did not stop within {timeout}s; output:\n{self.log()}") from None
        wait_for(lambda: not any(alive(pid) for pid in started), timeout=10, what="every child process to exit")
        return code

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
