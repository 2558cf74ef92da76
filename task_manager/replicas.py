"""What the task manager knows about each replica and each model it runs replicas for."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from model_manager.spec import ModelSpec, ServingState
from task_manager.autoscaler import Autoscaler
from task_manager.runtimes.base import ReplicaHandle

# Docker container names and Kubernetes labels both allow 63 characters.
MAX_REPLICA_ID = 63

# Spec fields that change what a replica runs; other fields (batching, sessions) are the batch manager's.
REPLICA_FIELDS = {"image", "model_class", "command", "env", "run_on_gpu", "resources", "format", "model_uri",
                  "execution_providers", "warmup", "inputs", "outputs"}


class ReplicaState(str, enum.Enum):
    STARTING = "starting"  # started, has not said `ready`
    READY = "ready"  # serving; the batch managers were told `replica_up`
    STOPPING = "stopping"  # being ended: draining (on purpose) or because it stopped answering


@dataclass(eq=False)
class Replica:
    id: str
    spec: ModelSpec
    group: ModelGroup
    started_at: float
    state: ReplicaState = ReplicaState.STARTING
    handle: ReplicaHandle | None = None
    task: asyncio.Task[None] | None = None
    pid: int | None = None
    capacity: int = 0
    ready_at: float | None = None
    last_seen: float = 0.0
    progress_at: float = 0.0
    """When it last answered a batch, or took one while holding none: a stuck replica is one that holds
    batches and made no progress for longer than any request may wait."""
    announced: bool = False
    """A `replica_up` went out, so a `replica_down` is owed."""
    in_flight: dict[Any, bytes] = field(default_factory=dict)
    """Batches forwarded and not answered: batch id -> identity of the batch manager that sent it."""
    credit_waiting: bool = False
    """A batch manager's share here waits for room (``task_manager.credit``): each answer may free it."""
    end_reason: str | None = None
    """Why the task manager is ending it, once it is."""
    wanted_gone: bool = False
    """Ended on purpose (model removed or changed, scaled down), so not a failure to back off from."""
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    stop_grace_s: float = 5.0
    generation: int = 0
    """The group's generation (spec revision that changes replicas) it was started for."""
    gpu: str | None = None
    """The GPU it was placed on; None: it holds one of the CPU slots."""
    unplaced: bool = False
    """A cluster runtime's scheduler cannot place it yet (``RuntimeEvents``): its start timeout waits."""
    placed_at: float | None = None
    """When a replica that waited for placement was placed: its start timeout runs from then."""
    counted_as: str | None = None
    """The state the ``inferoxy_replicas`` gauge counts it under (``replica_metrics``); None: not counted."""
    sessions_timer: asyncio.TimerHandle | None = None
    """While a stateful replica scaled down keeps its sessions: stops it when their grace is over."""

    @property
    def identity(self) -> bytes:
        return self.id.encode()

    @property
    def live(self) -> bool:
        return self.state is not ReplicaState.STOPPING

    @property
    def retiring(self) -> bool:
        """Scaled down but still serving its sessions' batches until their grace is over (``sessions_timer``)."""
        return self.sessions_timer is not None


@dataclass(eq=False)
class ModelGroup:
    """The replicas of one model version, and how its restarts are going."""

    spec: ModelSpec
    replicas: dict[str, Replica] = field(default_factory=dict)
    next_index: int = 0
    failures: int = 0
    """Unexpected ends in a row; sets the restart backoff."""
    not_before: float = 0.0
    """No replica is started before this monotonic time (restart backoff)."""
    retry: asyncio.TimerHandle | None = None
    restarts: int = 0
    last_error: str | None = None
    removed: bool = False
    generation: int = 0
    """Bumped when a spec change replaces the replicas (rolling update); older replicas are outdated."""
    failed_reason: str | None = None
    """Set once replicas crash-loop or cannot start; cleared when one serves long enough or the spec changes."""
    unschedulable: str | None = None
    """Why the last replica it wanted could not be placed (no GPU or CPU slot free); None once one is."""
    retire_timer: asyncio.TimerHandle | None = None
    """While removed but not yet drained: retires it when the grace for batch managers' ``model_drained`` ends."""
    awaiting: set[bytes] = field(default_factory=set)
    """While removed but not yet drained: the batch managers whose ``model_drained`` it still waits for."""
    replacing: dict[str, str] = field(default_factory=dict)
    """Replicas lost (dead, silent, stuck) and not yet gone, by id: why. Readiness names them meanwhile."""
    dead_unreplaced: int = 0
    """Replicas that died and were not started again yet: the next starts count as restarts (metrics)."""
    autoscaler: Autoscaler = field(init=False)
    """Keeps the target replica count between the spec's min and max (``task_manager.autoscaler``)."""

    def __post_init__(self) -> None:
        self.autoscaler = Autoscaler(target=self.spec.min_replicas)

    @property
    def desired(self) -> int:
        """The replicas the group runs: the autoscaler's target."""
        return self.autoscaler.target

    def live(self) -> list[Replica]:
        return [replica for replica in self.replicas.values() if replica.live]

    def ready_count(self) -> int:
        return sum(replica.state is ReplicaState.READY for replica in self.replicas.values())

    def serving_state(self) -> tuple[ServingState, str | None]:
        """The model's state as ``ModelStatus`` spells it, and the reason behind it (see its docstring)."""
        ready = self.ready_count()
        starting = any(replica.state is ReplicaState.STARTING for replica in self.replicas.values())
        if self.desired == 0 and ready == 0 and not starting:
            # Batch managers refuse a `stopped` model's requests at once, and keep an `idle` one's: its first
            # request makes the autoscaler start a replica. (A replica starting makes either `starting`.)
            if self.spec.max_replicas == 0:
                return "stopped", "max_replicas is 0 (the model is unloaded): no replica may run"
            return "idle", ("scaled to zero (min_replicas is 0 and no request came for scale_down_delay_s): the "
                            "next request starts a replica")
        if self.failed_reason is not None:
            return ("degraded" if ready else "failed"), self.failed_reason
        if self.unschedulable is not None:
            return ("degraded" if ready else "unschedulable"), self.unschedulable
        if self.replacing:
            lost = "; ".join(f"replica {rid} is being replaced: {why}" for rid, why in self.replacing.items())
            return ("degraded" if ready else "starting"), lost
        if ready == 0:
            return "starting", self.last_error if self.failures else None
        if self.failures:
            return "degraded", self.last_error
        return "ready", None


def sanitize(text: str) -> str:
    """``text`` as lowercase letters, digits and dashes; a short hash keeps names that differ only in
    case or punctuation (``My_Model`` and ``my.model``) apart."""
    clean = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")
    if clean != text:
        clean = f"{clean}-{hashlib.sha1(text.encode()).hexdigest()[:6]}".lstrip("-")
    return clean


def replica_id(instance: str, model: str, version: str, n: int, nonce: str) -> str:
    """``{instance}-{model}-{version}-{n}-{nonce}``, sanitized and at most 63 characters.

    The nonce (``new_nonce``) makes the id unguessable: it is the replica's bus identity, and a
    peer that guessed the next one could otherwise race the real replica to the task manager.
    """
    suffix = f"-{n}-{nonce}"
    base = sanitize(f"{instance}-{model}-{version}")
    if len(base) + len(suffix) > MAX_REPLICA_ID:
        digest = hashlib.sha1(base.encode()).hexdigest()[:8]
        base = f"{base[: MAX_REPLICA_ID - len(suffix) - len(digest) - 1].rstrip('-')}-{digest}"
    return base + suffix


def new_nonce() -> str:
    """48 random bits, in lowercase hex (a valid container name part)."""
    return secrets.token_hex(6)


def replica_fields_differ(old: ModelSpec, new: ModelSpec) -> bool:
    return old.model_dump(include=REPLICA_FIELDS) != new.model_dump(include=REPLICA_FIELDS)


def backoff_delay(failures: int, base_s: float, max_s: float) -> float:
    """Seconds to wait before the next start after ``failures`` unexpected ends in a row."""
    if failures <= 0:
        return 0.0
    return float(min(max_s, base_s * 2 ** min(failures - 1, 30)))
