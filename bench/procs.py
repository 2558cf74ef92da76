"""The processes a benchmark started: their tree, names, CPU time, and stopping them by PID.

Read from /proc (Linux), so a benchmark can say which process a request's CPU went to without
asking the servers anything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support import descendants, wait_for  # noqa: E402

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def tree(root: int) -> list[int]:
    """``root`` and every live process below it."""
    return [root, *sorted(descendants(root))]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime (fields 14 and 15 of stat)


def label(pid: int) -> str:
    """A short name for a benchmark's process: the component, replica or server it is."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"pid {pid}"
    joined = " ".join(argv)
    if "inferoxy" in argv and "run" in argv:
        return argv[argv.index("run") + 1]  # python -m inferoxy run NAME
    for key, name in (("inferoxy.runtime", "replica"), ("inferoxy serve", "supervisor"),
                      ("redis-server", "redis"), ("triton_python_backend_stub", "triton python stub"),
                      ("tritonserver", "tritonserver"), ("triton_identity.py", "pytriton (python)"),
                      ("grpc_echo_server.py", "grpc.aio echo"),
                      ("multiprocessing", "python (multiprocessing child)")):
        if key in joined:
            return name
    return Path(argv[0]).name or f"pid {pid}"


def cpu_by_label(root: int) -> dict[str, float]:
    """CPU seconds used so far by each kind of process under ``root`` (same labels added up)."""
    totals: dict[str, float] = {}
    for pid in tree(root):
        name = label(pid)
        totals[name] = totals.get(name, 0.0) + cpu_s(pid)
    return totals


def start_group(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own (so its children can be stopped with it), output to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_for_line(process: subprocess.Popen[bytes], log: Path, text: str, timeout_s: float) -> None:
    """Poll ``log`` until a line reads ``text``; fail if the process exits first or time runs out."""
    def ready() -> bool:
        if any(line.strip() == text for line in log.read_text(errors="replace").splitlines()):
            return True
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited ({process.returncode}) before it was ready; see {log}")
        return False

    wait_for(ready, timeout_s, 0.2, f"{process.args!r} to print {text!r} (see {log})")


def stop_group(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM the process's group (it leads it: start_group), then SIGKILL what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; children in its group (tritonserver's stubs) may still be exiting.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        break
