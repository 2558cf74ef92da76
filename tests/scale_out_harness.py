"""Several batch managers, each with its own ZeroMQ bridge, sharing one task manager and its replicas.

The task manager runs in this process (its credit ledger can be read); batch managers and bridges are
``inferoxy run`` subprocesses, as on separate hosts; replicas are the task manager's own processes, a model
whose ``predict`` sleeps (``SlowModel``), so the replicas are the bottleneck even on a loaded 2-core machine.
Used by tests/test_scale_out.py and bench/bench_scale_out.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import numpy as np
import zmq.asyncio

from inferoxy.client import AsyncClient, InferenceError
from inferoxy.settings import Settings
from model_manager.spec import ModelSpec
from model_manager.store import SpecStore
from task_manager.replicas import ReplicaState
from task_manager.service import TaskManager
from tests.support import REPO, free_port

MODEL = "slow"
_prefixes = itertools.count()


@dataclass
class Tally:
    """What one bridge's clients got: every reply's code (``ok`` for a result), and when each result came."""

    codes: Counter[str] = field(default_factory=Counter)
    done_at: list[float] = field(default_factory=list)

    def in_window(self, start: float, end: float) -> int:
        return sum(start <= t < end for t in self.done_at)


class ScaleOut:
    def __init__(self, *, batch_managers: int = 2, replicas: int = 2, predict_s: float = 0.04,
                 max_batch_size: int = 4, heartbeat_interval_s: float = 0.25, heartbeat_liveness: int = 4) -> None:
        self.count = batch_managers
        self.spec = ModelSpec(name=MODEL, model_class="tests.models_for_tests:SlowModel", min_replicas=replicas,
                              max_replicas=replicas, max_batch_size=max_batch_size, max_batch_delay_ms=5,
                              env={"PYTHONPATH": str(REPO), "SLOW_MODEL_SECONDS": str(predict_s)})
        self._redis = fakeredis.TcpFakeServer(("127.0.0.1", free_port()), server_type="redis")
        self._redis.daemon_threads = True
        self.redis_url = f"redis://127.0.0.1:{self._redis.server_address[1]}/0"
        self.prefix = f"scale-out-{os.getpid()}-{next(_prefixes)}"
        self.settings = Settings(
            task_manager_url=f"tcp://127.0.0.1:{free_port()}", replica_bind_url=f"tcp://127.0.0.1:{free_port()}",
            redis_url=self.redis_url, redis_prefix=self.prefix, instance=f"scaleout{os.getpid()}",
            heartbeat_interval_s=heartbeat_interval_s, heartbeat_liveness=heartbeat_liveness, models_file="",
        )
        self.ctx = zmq.asyncio.Context()
        self.tm = TaskManager(self.settings, self.ctx)
        self._tm_task: asyncio.Task[None] | None = None
        self.processes: list[subprocess.Popen[bytes]] = []
        self.batch_manager_pids: list[int] = []
        self.bridge_urls: list[str] = []
        self.clients: list[AsyncClient] = []
        self.tallies: list[Tally] = []
        self._workers: dict[int, list[asyncio.Task[None]]] = {}
        self._stop: dict[int, asyncio.Event] = {}

    # --- starting and stopping ---------------------------------------------------------------------------------

    async def __aenter__(self) -> ScaleOut:
        threading.Thread(target=self._redis.serve_forever, daemon=True).start()
        store = SpecStore.from_url(self.redis_url, self.prefix)
        try:
            await store.put(self.spec)
        finally:
            await store.close()
        ready = asyncio.Event()
        self._tm_task = asyncio.create_task(self.tm.run(ready))
        await asyncio.wait_for(ready.wait(), 30)
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "INFEROXY_BIND_HOST": "127.0.0.1",
               "INFEROXY_BUS_CURVE": "false", "INFEROXY_REDIS_URL": self.redis_url,
               "INFEROXY_REDIS_PREFIX": self.prefix, "INFEROXY_MODELS_FILE": "", "INFEROXY_METRICS": "false",
               "INFEROXY_TASK_MANAGER_URL": self.settings.task_manager_url,
               "INFEROXY_HEARTBEAT_INTERVAL_S": str(self.settings.heartbeat_interval_s),
               "INFEROXY_HEARTBEAT_LIVENESS": str(self.settings.heartbeat_liveness)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        for _ in range(self.count):
            bm_url = f"tcp://127.0.0.1:{free_port()}"
            zmq_port = free_port()
            own = {**env, "INFEROXY_BATCH_MANAGER_URL": bm_url, "INFEROXY_ZMQ_PORT": str(zmq_port)}
            self.batch_manager_pids.append(await self._start("batch_manager", own))
            await self._start("zmq_bridge", own)
            self.bridge_urls.append(f"tcp://127.0.0.1:{zmq_port}")
            self.clients.append(AsyncClient(self.bridge_urls[-1], timeout=30.0))
            self.tallies.append(Tally())
        await self.wait_for(lambda: len(self.tm.relay.batch_managers) == self.count, "every batch manager heard")
        await self.wait_for(lambda: len(self.ready_replicas()) == self.spec.min_replicas, "the replicas ready",
                            timeout=60)
        return self

    async def _start(self, component: str, env: dict[str, str]) -> int:
        process = await asyncio.to_thread(start_component, component, env)
        self.processes.append(process)
        return process.pid

    async def __aexit__(self, *exc: object) -> None:
        for index in list(self._workers):
            await self.stop_load(index)
        for client in self.clients:
            client.close()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._tm_task is not None:
            self._tm_task.cancel()  # one cancel: its shutdown stops the replicas
            with contextlib.suppress(asyncio.CancelledError):
                await self._tm_task
        self.ctx.destroy(linger=0)
        self._redis.shutdown()
        self._redis.server_close()

    def kill_batch_manager(self, index: int) -> None:
        os.kill(self.batch_manager_pids[index], signal.SIGKILL)

    # --- load --------------------------------------------------------------------------------------------------

    def start_load(self, index: int, workers: int) -> None:
        """``workers`` clients of bridge ``index``, each sending its next request as soon as one is answered."""
        stop = self._stop[index] = asyncio.Event()
        tally, client = self.tallies[index], self.clients[index]
        x = np.zeros((1, 4), np.float32)

        async def worker() -> None:
            while not stop.is_set():
                try:
                    await client.infer(MODEL, {"x": x})
                except InferenceError as exc:
                    tally.codes[exc.code] += 1
                    if exc.code != "overloaded":
                        await asyncio.sleep(0.05)  # the bridge refuses at once while its batch manager is gone
                else:
                    tally.codes["ok"] += 1
                    tally.done_at.append(time.monotonic())

        self._workers.setdefault(index, []).extend(asyncio.create_task(worker()) for _ in range(workers))

    async def stop_load(self, index: int) -> None:
        """Let the clients of bridge ``index`` finish what they sent (every request gets its reply), then stop."""
        self._stop[index].set()
        tasks = self._workers.pop(index, [])
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    # --- what the task manager knows ---------------------------------------------------------------------------

    def ready_replicas(self) -> list[str]:
        return [r.id for r in self.tm._replicas.values() if r.state is ReplicaState.READY and r.announced]

    def shares(self) -> list[int]:
        """What each connected batch manager (in the order they connected) was told it may hold, over the replicas."""
        credit = self.tm.announce.credit
        return [sum(credit.share(rid, bm) for rid in self.ready_replicas()) for bm in self.tm.relay.batch_managers]

    def capacity(self) -> int:
        return sum(r.capacity for r in self.tm._replicas.values() if r.state is ReplicaState.READY)

    @staticmethod
    async def wait_for(check: Any, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    async def measure(self, indexes: list[int], warm_s: float, window_s: float) -> float:
        """Results per second through bridges ``indexes`` over ``window_s``, after ``warm_s`` under load."""
        await asyncio.sleep(warm_s)
        start = time.monotonic()
        await asyncio.sleep(window_s)
        end = time.monotonic()
        return sum(self.tallies[i].in_window(start, end) for i in indexes) / (end - start)


def start_component(component: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``inferoxy run COMPONENT``, returned once it says it is ready (its line on the pipe it is handed)."""
    read_fd, write_fd = os.pipe()
    process = subprocess.Popen([sys.executable, "-m", "inferoxy", "run", component],
                               env={**env, "INFEROXY_READY_FD": str(write_fd)}, pass_fds=[write_fd], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    try:
        readable, _, _ = select.select([read_fd], [], [], 30.0)
        line = os.read(read_fd, 4096) if readable else b""
    finally:
        os.close(read_fd)
    if not line:
        process.kill()
        process.wait()
        raise AssertionError(f"{component} did not get ready (exit status {process.returncode})")
    return process
