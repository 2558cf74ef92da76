"""Who owns an instance name on a shared engine, and whether that owner is still alive.

Two proxies with one ``INFEROXY_INSTANCE`` on one Docker engine would remove each other's replicas
(every container labelled with the instance counts as a leftover of a crash). So the instance is
claimed: the owner is recorded where every proxy on that engine can read it (labels, see
``DockerRuntime.claim_instance``), and a proxy that finds a live owner other than itself refuses
to start. A dead owner's claim (a crashed proxy) is taken over, and its leftovers removed.

Liveness needs no lease to refresh: the owner is identified by what outlives a crash only as a
corpse. A proxy in a container is its container (alive while the engine says it runs); a proxy
on a host is its process (PID plus start time, in the PID namespace and boot that recorded it).
When neither can be checked from here (another machine, another PID namespace) the answer is
"unknown", and the caller treats the owner as alive and says how to take over by hand.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

LABEL_PREFIX = "inferoxy.owner."
# A container's own files (/etc/hostname, /etc/hosts) are mounted from the engine's folder named by its id.
_CONTAINER_ID_IN_MOUNTS = re.compile(r"/containers/([0-9a-f]{64})/")


@dataclass(frozen=True)
class Owner:
    """One running proxy, as another proxy can recognise it later."""

    host: str
    boot_id: str
    pid_namespace: str
    pid: int
    started: str  # the process's start time in clock ticks since boot (/proc/PID/stat field 22)
    container: str = ""  # the engine's id of the container the proxy runs in, if any

    @classmethod
    def this_process(cls, container: str = "") -> Owner:
        pid = os.getpid()
        return cls(host=socket.gethostname(), boot_id=_read("/proc/sys/kernel/random/boot_id"),
                   pid_namespace=_pid_namespace(), pid=pid, started=process_start(pid) or "", container=container)

    def labels(self) -> dict[str, str]:
        return {f"{LABEL_PREFIX}{f.name}": str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> Owner | None:
        """The owner recorded in ``labels``; None when they record none (or not readably)."""
        try:
            values = {f.name: labels[f"{LABEL_PREFIX}{f.name}"] for f in fields(cls)}
            return cls(**{**values, "pid": int(values["pid"])})  # type: ignore[arg-type]
        except (KeyError, ValueError):
            return None

    def describe(self) -> str:
        where = f"in container {self.container[:12]}" if self.container else f"on host {self.host}"
        return f"task manager pid {self.pid} {where}"


def owner_alive(owner: Owner, me: Owner, container_running: Callable[[str], bool]) -> bool | None:
    """Whether ``owner`` still runs, as far as ``me`` can tell: True, False, or None for "cannot tell".

    ``container_running(id)`` asks the engine about a container (False when it is gone).
    """
    if owner.container:
        if owner.container != me.container:
            return container_running(owner.container)
        if owner.pid_namespace != me.pid_namespace or owner.boot_id != me.boot_id:
            return False  # this very container has restarted since: every process it ran then is gone
    elif owner.boot_id != me.boot_id:
        # Recorded under another kernel: this machine rebooted since (so it is gone), or another machine.
        return False if owner.host == me.host else None
    elif owner.pid_namespace != me.pid_namespace:
        return None  # its PIDs mean nothing here
    return process_start(owner.pid) == owner.started


def process_start(pid: int) -> str | None:
    """The start time of a live process (clock ticks since boot), None when there is none by that PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields after the last ')' do not.
    after_name = stat.rsplit(")", 1)[1].split()
    if after_name[0] == "Z":  # a zombie has ended
        return None
    return after_name[19]  # field 22 of the whole line


def own_container_id() -> str:
    """The id of the container this process runs in, read from its mounts; empty outside a container."""
    match = _CONTAINER_ID_IN_MOUNTS.search(_read("/proc/self/mountinfo"))
    return match.group(1) if match else ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""
