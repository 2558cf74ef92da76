"""What the task manager asks of a runtime: start a replica, wait for it to end, stop it.

A runtime knows how to run a process somewhere (a local subprocess, a Docker container,
a Kubernetes pod) and nothing about batches: the replica dials the task manager itself,
using the environment the plan hands it.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from model_manager.spec import ModelSpec

# The labels on everything a runtime starts for a replica (container, pod), so that a later run of this instance
# finds, and sweeps, what an earlier one left.
LABEL_INSTANCE = "inferoxy.instance"
LABEL_MODEL = "inferoxy.model"
LABEL_VERSION = "inferoxy.version"
LABEL_REPLICA = "inferoxy.replica"


def replica_labels(instance: str, spec: ModelSpec, replica_id: str) -> dict[str, str]:
    return {LABEL_INSTANCE: instance, LABEL_MODEL: spec.name, LABEL_VERSION: spec.version, LABEL_REPLICA: replica_id}


@dataclass(frozen=True)
class ReplicaPlan:
    """One replica to start."""

    replica_id: str
    spec: ModelSpec
    env: dict[str, str]
    """Variables the model runtime reads (INFEROXY_REPLICA_URL, INFEROXY_REPLICA_ID, ...), merged over spec.env."""
    gpu: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


# What a replica run as a local process may inherit from the proxy's environment: what finds and runs
# the interpreter and its libraries, the locale, and the GPUs. Nothing else: the proxy's environment
# holds its admin key, registry password, Redis URL and bus secret, and a model is not to see them.
INHERITED_VARIABLES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR", "TZ", "LANG", "LANGUAGE",
    "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",
})


def inherited(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of the proxy's environment a local replica may see (``INHERITED_VARIABLES``, ``LC_*``)."""
    return {name: value for name, value in environ.items()
            if name in INHERITED_VARIABLES or name.startswith("LC_")}


def replica_environment(plan: ReplicaPlan, environ: Mapping[str, str] = {}) -> dict[str, str]:  # noqa: B006
    """A replica's whole environment: what it may inherit from ``environ`` (a local process's parent), then
    the spec's own ``env``, then the plan's (bus address, credentials, replica id), then its GPU."""
    env = {**inherited(environ), **plan.spec.env, **plan.env}
    if plan.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = plan.gpu
    return env


@dataclass(frozen=True)
class ReplicaExit:
    """How a replica ended."""

    code: int | None
    """Exit status, or None when it is unknown (the replica vanished)."""
    log_tail: str = ""
    """Its last log lines, for error replies and the proxy's log."""
    never_started: bool = False
    """It could not run at all (a cluster cannot pull its image, say): the model fails at once, as when
    ``Runtime.start`` raises, instead of after ``crash_loop_failures`` tries."""

    def describe(self) -> str:
        if self.never_started:  # the log tail is the reason it could not run, in the runtime's words
            return f"could not start: {self.log_tail}" if self.log_tail else "could not start"
        status = "ended" if self.code is None else f"exited with status {self.code}"
        return f"{status}; last output:\n{self.log_tail}" if self.log_tail else status


class ReplicaHandle(abc.ABC):
    replica_id: str

    @abc.abstractmethod
    async def wait(self) -> ReplicaExit:
        """Return once the replica has ended, however it ended."""

    @abc.abstractmethod
    async def stop(self, grace_s: float = 5.0) -> None:
        """End the replica: ask it to stop, kill it after ``grace_s``, and remove what it left behind."""


class RuntimeEvents(Protocol):
    """What a runtime may tell the task manager about a replica that has not ended (``Runtime.events``)."""

    def replica_unschedulable(self, replica_id: str, reason: str | None) -> None:
        """The runtime's own scheduler cannot place the replica yet (``reason``, in the cluster's words), or
        now has placed it (None). The model's status says so meanwhile; the replica is not ended for it."""


class Runtime(abc.ABC):
    name: str
    places_replicas: bool = False
    """True: the runtime's scheduler (a cluster's) decides where replicas run, so the task manager's GPU
    allocator and CPU slots are skipped and a ``run_on_gpu`` plan names no GPU (the runtime asks its
    scheduler for one). False: the task manager places each replica (``task_manager.placement``)."""
    events: RuntimeEvents | None = None
    """Set by the task manager before the first ``start``."""

    @abc.abstractmethod
    async def start(self, plan: ReplicaPlan) -> ReplicaHandle:
        """Start a replica. Raises RuntimeStartError with a reason users can act on."""

    async def claim_instance(self) -> None:  # noqa: B027 (optional hook: local runtimes share nothing)
        """Make sure no other live proxy runs replicas under this instance name, and mark it ours.

        Raises InstanceTaken (naming INFEROXY_INSTANCE) when one does. Call it before ``remove_orphans``:
        only the instance's owner may remove what is labelled with it. ``close`` gives the name back.
        """

    async def remove_orphans(self) -> int:
        """Remove replicas an earlier run of this proxy instance left behind; returns how many."""
        return 0

    async def close(self) -> None:  # noqa: B027 (optional hook: most runtimes hold nothing)
        """Release the runtime's own resources (clients, sockets). Replicas are stopped before this."""


class RuntimeStartError(RuntimeError):
    """A replica could not be started (image missing, no engine, bad command)."""


class InstanceTaken(RuntimeStartError):
    """Another live proxy owns this instance name on the same engine."""
