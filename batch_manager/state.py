"""The scheduler's records: requests it holds, their groups, sessions, replicas, batches, model versions.

Plain slotted classes with no policy: the scheduler's parts (``batching``, ``sessions``, ``admission``,
``lifecycle``) all read and change them, and ``Book`` is the one place every part reaches the others' data.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any

from batch_manager.actions import Request
from batch_manager.messages import Origin, ReplicaId, TensorMeta
from batch_manager.params import SessionId
from model_manager.spec import ModelSpec, ServingState
from model_manager.store import Registry

# (name, dtype, non-batch dims) of every tensor, sorted by name.
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]


class State(enum.Enum):
    QUEUED = 1
    IN_FLIGHT = 2
    DONE = 3


class Pending:
    """A request the scheduler holds until it is answered."""

    __slots__ = ("seq", "origin", "spec", "signature", "group", "metas", "frames", "rows", "arrival", "rank",
                 "deadline", "state", "priority", "session", "start", "end", "retried", "header_bytes", "nbytes", "rid",
                 "params")

    def __init__(self, seq: int, request: Request, spec: ModelSpec, signature: Signature, rows: int, now: float,
                 aging_s: float, header_bytes: int) -> None:
        self.seq = seq  # also the item id replicas see: bridges' ids never leave the batch manager
        self.origin = request.origin
        self.spec = spec
        self.signature = signature
        self.group: Group | None = None  # None while it waits in its session's queue
        self.metas = request.metas
        self.frames = request.frames
        self.rows = rows
        self.arrival = now
        self.priority = request.params.priority
        self.rank = now + int(self.priority) * aging_s
        self.deadline = request.deadline
        self.state = State.QUEUED
        self.session: Session | None = None
        session = request.params.session
        self.start = session.start if session else False
        self.end = session.end if session else False
        self.retried = False
        self.header_bytes = header_bytes  # its share of a batch header, at most
        self.nbytes = sum(map(len, request.frames))  # frames are 1-D byte buffers (zmq.Frame, bytes)
        self.rid = request.rid
        self.params = request.params.passed  # what reaches the model (the batch item's ``params``)


class Group:
    """Requests of one model version and signature (and, for sessions, one replica), one FIFO per priority."""

    __slots__ = ("spec", "model", "replica", "levels", "rows", "due", "parked")

    def __init__(self, spec: ModelSpec, model: Model, replica: Replica | None) -> None:
        self.spec = spec
        self.model = model
        self.replica = replica
        # Answered requests (deadline, cancel) stay until they reach a head; ``rows`` counts live ones.
        # One per Priority value (high, normal, low); built by hand: this runs on the request path.
        self.levels: tuple[deque[Pending], ...] = (deque(), deque(), deque())
        self.rows = 0
        # The wake-up heap's bookkeeping (``batching.Wakeups``): the time of this group's one valid entry
        # there (None: none), and whether it waits off the heap for its replicas' credit.
        self.due: float | None = None
        self.parked = False

    def push(self, pending: Pending, *, front: bool = False) -> None:
        pending.group = self
        level = self.levels[pending.priority]
        if front:
            level.appendleft(pending)
        else:
            level.append(pending)
        self.rows += pending.rows

    def head(self) -> Pending | None:
        """The next request to go: the lowest rank (arrival + priority aging) among the levels' heads.

        Drops answered entries from the heads on the way, so ``ready_at`` may read the heads as they are.
        """
        best: Pending | None = None
        for level in self.levels:
            while level and level[0].state is not State.QUEUED:
                level.popleft()
            if level:
                pending = level[0]
                if best is None or pending.rank < best.rank or (pending.rank == best.rank and pending.seq < best.seq):
                    best = pending
        return best

    def ready_at(self) -> float | None:
        """When the group's delay runs out. The delay counts from the oldest request's arrival (a per-group
        deadline, not a global tick); call after ``head`` so the levels' heads are live requests."""
        oldest: float | None = None
        for level in self.levels:
            if level and (oldest is None or level[0].arrival < oldest):
                oldest = level[0].arrival
        # Wakeups.push computes it the same way: the wake-up heap compares these floats for equality.
        return None if oldest is None else oldest + self.spec.max_batch_delay_ms / 1000.0

    def take(self, pending: Pending) -> None:
        level = self.levels[pending.priority]
        assert level[0] is pending
        level.popleft()
        self.rows -= pending.rows


class Session:
    __slots__ = ("id", "model_key", "replica", "queue", "active", "started", "closing", "lost", "last_active",
                 "idle_due")

    def __init__(self, session_id: SessionId, model_key: str, now: float) -> None:
        self.id = session_id
        self.model_key = model_key
        self.replica: Replica | None = None  # None while it waits for a slot
        self.queue: deque[Pending] = deque()  # behind ``active``, in arrival order
        self.active: Pending | None = None  # in a group or at the replica: at most one at a time keeps order
        self.started = False  # the replica has been told to start it
        self.closing = False  # its last request carries sequence_end
        self.lost = False
        self.last_active = now
        self.idle_due = 0.0  # when its latest entry in the idle watch list falls due

    def idle(self) -> bool:
        return self.active is None and not any(p.state is State.QUEUED for p in self.queue)


class Replica:
    __slots__ = ("id", "model_key", "capacity", "batches", "last_used", "draining", "sessions", "groups",
                 "pending_ends", "parked", "retiring")

    def __init__(self, replica_id: ReplicaId, model_key: str, capacity: int) -> None:
        self.id = replica_id
        self.model_key = model_key
        self.capacity = capacity
        self.batches: dict[int, Batch] = {}
        self.last_used = 0
        self.draining = False
        self.sessions: dict[SessionId, Session] = {}
        self.groups: dict[Signature, Group] = {}  # groups of its sessions' requests
        self.pending_ends: list[SessionId] = []  # sessions whose end hook it has yet to run
        self.parked: list[Group] = []  # its groups off the wake-up heap until it has credit
        # Draining with its sessions kept (a scale-down): their batches still go to it, nothing else does.
        self.retiring = False

    @property
    def free(self) -> int:
        return self.capacity - len(self.batches)

    @property
    def usable(self) -> bool:
        return not self.draining and self.free > 0


class Batch:
    __slots__ = ("id", "replica", "requests")

    def __init__(self, batch_id: int, replica: Replica, requests: list[Pending]) -> None:
        self.id = batch_id
        self.replica = replica
        self.requests = requests


class Model:
    """One model version: its groups, its replicas, its sessions and how many of its requests wait."""

    __slots__ = ("key", "groups", "replicas", "queued", "sessions", "waiting", "ended", "stateful", "parked")

    def __init__(self, key: str) -> None:
        self.key = key
        self.stateful = False  # it has had sessions: replicas' own groups and end notices need pumping
        self.groups: dict[Signature, Group] = {}  # stateless requests
        self.replicas: dict[ReplicaId, Replica] = {}
        self.queued = 0
        self.sessions: dict[SessionId, Session] = {}
        self.waiting: deque[Session] = deque()  # sessions waiting for a slot
        self.ended: dict[SessionId, str] = {}
        self.parked: list[Group] = []  # stateless groups off the wake-up heap until a replica has credit

    def has_usable_replica(self) -> bool:
        # ``Replica.usable``, inlined: the wake-up heap asks this of the group it is about to return.
        for replica in self.replicas.values():
            if not replica.draining and not replica.retiring and replica.capacity > len(replica.batches):
                return True
        return False

    def has_credit(self) -> bool:
        """Whether any replica that takes batches gives this batch manager a share (busy or not)."""
        return any(replica.capacity and not replica.draining and not replica.retiring
                   for replica in self.replicas.values())

    def all_groups(self) -> list[Group]:
        return list(self.groups.values()) + [g for r in self.replicas.values() for g in r.groups.values()]


# What a model version's gauges show: (requests queued, batches sent and unanswered, sessions pinned to a
# replica). A plain tuple: it is built for every changed model version after every socket drain.
ModelCounts = tuple[int, int, int]


class Book:
    """What every part of the scheduler reads: the registry view, model versions, replicas, batches, requests."""

    def __init__(self, registry: Registry | None) -> None:
        self.registry = registry
        self.models: dict[str, Model] = {}
        self.replicas: dict[ReplicaId, Replica] = {}
        self.batches: dict[int, Batch] = {}
        self.live: dict[Origin, Pending] = {}
        # The task manager's last word on each model version (key: name/version): (state, reason).
        # Kept apart from ``models``, which forgets idle model versions.
        self.status: dict[str, tuple[ServingState, str | None]] = {}
        # Model versions removed from the registry that still hold requests, with their last spec.
        self.deleting: dict[str, ModelSpec] = {}
        # Model versions reached since the last ``forget_idle``: only these can have become idle.
        self.touched: set[str] = set()
        # Model versions whose queued requests, batches at replicas or pinned sessions may have changed since the
        # caller last asked (``Scheduler.take_changed``): its gauges are set from these, not from a scan.
        self.changed: set[str] = set()

    def model(self, key: str) -> Model:
        """The model version's record, made if it has none; the caller is about to change it."""
        self.touched.add(key)
        model = self.models.get(key)
        if model is None:
            model = self.models[key] = Model(key)
        return model

    def spec(self, key: str) -> ModelSpec | None:
        """The registry's spec of a model version, or the last one of a removed model version still draining."""
        spec = self.registry.specs.get(key) if self.registry else None
        return spec if spec is not None else self.deleting.get(key)

    def counts(self, key: str) -> ModelCounts:
        """A model version's requests queued, batches at its replicas and sessions pinned to a replica."""
        model = self.models.get(key)
        if model is None:
            return 0, 0, 0
        in_flight = sessions = 0
        for replica in model.replicas.values():
            in_flight += len(replica.batches)
            sessions += len(replica.sessions)
        return model.queued, in_flight, sessions

    def touch_all(self) -> None:
        self.touched.update(self.models)

    def forget_idle(self) -> None:
        """Drop the records of model versions with nothing left (no group, replica, session or queued request),
        so they stay bounded; checks only those reached since the last call, not every model version."""
        for key in self.touched:
            model = self.models.get(key)
            if model is not None and not model.groups and not model.replicas and not model.sessions \
                    and not model.queued:
                del self.models[key]
        self.touched.clear()


def batch_tensors(pendings: list[Pending]) -> tuple[list[TensorMeta], list[Any]]:
    """The tensor descriptions and frames of ``pendings``, in order, as one batch carries them."""
    if len(pendings) == 1:
        return list(pendings[0].metas), list(pendings[0].frames)
    metas: list[TensorMeta] = []
    frames: list[Any] = []
    for pending in pendings:
        metas += pending.metas
        frames += pending.frames
    return metas, frames
