"""The ``process`` runtime: every replica is a child process of the task manager.

The child runs ``spec.command``, or else the model runtime (``python -m inferoxy.runtime``)
with this interpreter, in its own process group so that stopping it also ends anything it
started. It gets ``PR_SET_PDEATHSIG`` = SIGTERM (``inferoxy.procutil``), so it is told to stop even when the task
manager dies without a chance to clean up (Linux only; elsewhere replicas still exit on
their own once the task manager's heartbeats stop). Its stdout and stderr go to the log and
the last lines are kept for error reports.

PDEATHSIG fires when the *thread* that forked the child ends; asyncio forks from the thread
running the event loop, so the task manager's loop must live as long as its replicas do
(it does: the replicas are stopped before ``run`` returns).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections import deque

from inferoxy.logs import forwarded_fields
from inferoxy.procutil import die_with_parent
from inferoxy.settings import Settings
from task_manager.runtimes.base import (
    ReplicaExit,
    ReplicaHandle,
    ReplicaPlan,
    Runtime,
    RuntimeStartError,
    replica_environment,
)

log = logging.getLogger(__name__)
replica_log = logging.getLogger("task_manager.replica")

LOG_TAIL_LINES = 50
MAX_LINE_CHARS = 4096
READ_CHUNK = 64 * 1024
# How long to wait for the output pipes to close after the child exited (a grandchild may hold them).
PIPE_DRAIN_S = 1.0


class LogTail:
    """The last lines a replica printed; each line is also logged as it arrives."""

    def __init__(self, replica_id: str, max_lines: int = LOG_TAIL_LINES) -> None:
        self.replica_id = replica_id
        self.lines: deque[str] = deque(maxlen=max_lines)

    def add(self, line: str) -> None:
        line = line.rstrip("\r\n")
        self.lines.append(line)
        # With INFEROXY_LOG_FORMAT=json the replica's own JSON line is passed on as one JSON line (its fields,
        # with component and replica set here); text lines print as they always did.
        fields = forwarded_fields(line) or {"message": line}
        replica_log.info("[%s] %s", self.replica_id, line, extra={"forwarded": fields, "replica": self.replica_id})

    async def follow(self, stream: asyncio.StreamReader) -> None:
        """Read ``stream`` to its end in chunks, so one endless line cannot exhaust memory."""
        partial = ""
        while chunk := await stream.read(READ_CHUNK):
            partial += chunk.decode("utf-8", errors="replace")
            *complete, partial = partial.split("\n")
            for line in complete:
                self.add(line[:MAX_LINE_CHARS])
            if len(partial) > MAX_LINE_CHARS:
                self.add(partial[:MAX_LINE_CHARS] + " [line cut]")
                partial = ""
        if partial:
            self.add(partial[:MAX_LINE_CHARS])

    def text(self) -> str:
        return "\n".join(self.lines)


class ProcessReplica(ReplicaHandle):
    def __init__(self, replica_id: str, process: asyncio.subprocess.Process) -> None:
        self.replica_id = replica_id
        self.process = process
        self.tail = LogTail(replica_id)
        assert process.stdout is not None and process.stderr is not None
        self._readers = [asyncio.create_task(self.tail.follow(stream), name=f"{replica_id} output")
                         for stream in (process.stdout, process.stderr)]

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait(self) -> ReplicaExit:
        code = await self.process.wait()
        # Keep the lines written just before the exit; don't hang on a pipe a grandchild inherited.
        _done, pending = await asyncio.wait(self._readers, timeout=PIPE_DRAIN_S)
        for reader in pending:
            reader.cancel()
        return ReplicaExit(code=code, log_tail=self.tail.text())

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.process.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.process.wait()), timeout=grace_s)
            except asyncio.TimeoutError:
                log.warning("replica %s ignored SIGTERM for %.1fs; killing it", self.replica_id, grace_s)
        # Also reaches what the replica started, whether or not the replica itself is still there.
        self._signal_group(signal.SIGKILL)
        await self.process.wait()

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)


class ProcessRuntime(Runtime):
    name = "process"

    def __init__(self, cwd: str | None = None) -> None:
        self.cwd = cwd

    def command(self, plan: ReplicaPlan) -> list[str]:
        if plan.spec.command:
            return list(plan.spec.command)
        if plan.spec.model_class or plan.spec.format == "onnx":  # onnx: the plan names ONNX_MODEL_CLASS
            return [sys.executable, "-m", "inferoxy.runtime"]
        raise RuntimeStartError(
            f"model {plan.spec.key} names only an image; the process runtime needs a model_class or a command "
            "(or run the proxy with INFEROXY_RUNTIME=docker)"
        )

    async def start(self, plan: ReplicaPlan) -> ProcessReplica:
        argv = self.command(plan)
        # Unbuffered, so a replica's last words reach the log tail before it dies.
        env = {"PYTHONUNBUFFERED": "1", **replica_environment(plan, os.environ)}
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                cwd=self.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                preexec_fn=die_with_parent,
                start_new_session=True,
            )
        except OSError as exc:
            raise RuntimeStartError(f"cannot run {argv[0]!r} for {plan.spec.key}: {exc}") from exc
        log.info("started replica %s as pid %d: %s", plan.replica_id, process.pid, " ".join(argv))
        return ProcessReplica(plan.replica_id, process)


def create_runtime(settings: Settings) -> ProcessRuntime:
    """The runtime for ``INFEROXY_RUNTIME=process`` (see task_manager.runtimes.factory)."""
    return ProcessRuntime()
