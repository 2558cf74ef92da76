"""Dynamic and sequence batching: which requests travel together, to which replica, and when.

The scheduler is pure logic. The caller passes the clock into every call and performs the
actions it returns (``Dispatch`` a batch to a replica, send a ``Reply`` to a bridge), so the
service owns every socket and tests drive the scheduler deterministically. docs/BATCHING.md
explains every rule below; in short it follows Triton's dynamic and sequence batchers:

* Requests are grouped per model version and *signature* (tensor names, dtypes and non-batch
  dimensions; dtypes and ranks only for a model that takes ragged batches). A group is ready
  when it holds ``max_batch_size`` rows or its oldest request waited ``max_batch_delay_ms``.
* A ready group is dispatched when a replica of its model version has credit (``capacity``
  unanswered batches at most) and is not draining. Without credit requests keep queueing, so
  the next batch is bigger: batching adapts to load by itself.
* Within a group, a request's rank is its arrival time plus ``priority × aging``: higher
  priorities go first, and a lower one waits at most ``2 × aging`` behind later arrivals.
* Each model version queues at most ``max_queue_size`` requests; beyond that ``overloaded``.
* Stateful models: a session (sequence id) is pinned to one replica, which holds at most
  ``max_sessions_per_replica``; a session has at most one request in the replica's hands at a
  time, which keeps its order. Its groups are per replica, so one batch mixes sessions of one
  replica only. A session ends on ``sequence_end``, after ``session_idle_timeout_s`` idle (the
  replica is told with an ``end_sessions`` batch), or when its replica goes: then its requests
  get ``session_lost``, and so does any later one that does not start a new session.
* A batch also closes early when its header would pass ``max_header_bytes`` (the bus's header limit)
  or its tensors ``max_batch_bytes``: a batch the bus cannot carry would never be answered.
* A stateless batch whose replica died before answering is retried once on another replica. A
  replica known dead (``replica_down``, or any batch of it failed ``replica_lost``) never gets
  credit back, so neither the retry nor a queued request is sent to it.
* The task manager reports each model version's serving state (``model_status``). While it is
  ``failed``, ``unschedulable`` or ``stopped`` and no replica of it takes batches, waiting is
  pointless: its queued requests, and new ones, are answered ``not_ready`` with the reason at once.
  A replica coming up, or a hopeful state (starting, ready, degraded), lets requests queue again;
  a replica being started for a stopped model (an autoscaler's) makes the state ``starting``.
* A model version removed from the registry takes no new request (``unknown_model``), but the
  requests it already holds are still served by its replicas; once none is queued or in flight the
  scheduler says so (``ModelDrained``), and the task manager may stop its replicas. If it has no
  replica left that takes batches, its queued requests fail at once.

Every submitted request gets exactly one reply (its result or an error), unless its bridge
cancels it.
"""

from __future__ import annotations

import enum
import heapq
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from batch_manager.messages import Origin, ReplicaId, TensorMeta, error_header, reply_header
from batch_manager.params import DEFAULT_PARAMS, RequestParams, SessionId
from inferoxy import protocol
from inferoxy.protocol import ErrorCode
from inferoxy.wire import MAX_HEADER_BYTES, pack_header
from model_manager.spec import DATATYPE_TO_DTYPE, ModelSpec, ServingState
from model_manager.store import Registry

DEFAULT_MAX_QUEUE_SIZE = 10_000
DEFAULT_PRIORITY_AGING_S = 0.1
# Why a session ended, kept for the message of a later request to it; bounded per model version.
ENDED_SESSIONS_REMEMBERED = 4096
# Serving states in which no replica is on its way, so a request with no replica to go to is refused.
# ``stopped``: min_replicas is 0 (unloaded, or scaled to zero) and no replica is starting.
REFUSING_STATES: frozenset[str] = frozenset({"failed", "unschedulable", "stopped"})
# The bus's message limit (Settings.max_message_bytes): a batch's tensors stay within it.
DEFAULT_MAX_BATCH_BYTES = 64 * 1024 * 1024
# Upper bounds of what a batch header spends besides its items' tensor descriptions: its fixed keys and
# values (``t``, ``batch``, ``ragged``, map and list headers), and each item's entry (``id``, ``n``; a
# session's ``session``, ``start``, ``end`` plus its id).
BATCH_HEADER_FIXED_BYTES = 160
ITEM_HEADER_BYTES = 32
SESSION_ITEM_HEADER_BYTES = 48
# Replica ids are the task manager's (at most 63 characters); a longer one only makes its batches smaller.
MAX_REPLICA_ID_BYTES = 64
# Batches dropped with their replica, remembered so a late answer for one is known as late, not as unknown.
SETTLED_BATCHES_REMEMBERED = 65_536

# (name, dtype, non-batch dims) of every tensor, sorted by name.
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]
# A per-item error in a ``result``: (code, message).
ItemError = tuple[str, str]


@dataclass(slots=True)
class Request:
    """An ``infer`` as the scheduler needs it. ``frames`` are opaque: the scheduler never reads array bytes."""

    origin: Origin
    model: str
    version: str | None
    metas: list[TensorMeta]
    frames: list[Any]
    deadline: float
    params: RequestParams = DEFAULT_PARAMS
    # Bytes of the ``infer`` header it came in: an upper bound of what its tensor descriptions add to a batch
    # header, known without encoding anything. 0: the scheduler measures its tensor descriptions itself.
    header_bytes: int = 0


@dataclass(slots=True)
class Reply:
    """Send ``header`` (a ``reply`` or an ``error``) and ``frames`` to the bridge ``origin[0]``."""

    origin: Origin
    header: dict[str, Any]
    frames: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.header["t"] == protocol.REPLY)

    @property
    def code(self) -> str | None:
        return self.header.get("code")


@dataclass(slots=True)
class Dispatch:
    """Send batch ``batch_id`` to ``replica``: ``items`` as in a ``batch`` header, then every item's tensors."""

    replica: ReplicaId
    batch_id: int
    model: str
    version: str
    items: list[dict[str, Any]]
    metas: list[TensorMeta]
    frames: list[Any]
    ragged: bool = False
    end_sessions: list[SessionId] | None = None

    def header(self) -> dict[str, Any]:
        header: dict[str, Any] = {
            "t": protocol.BATCH,
            "replica": self.replica,
            "batch": self.batch_id,
            "model": self.model,
            "version": self.version,
            "items": self.items,
            "tensors": self.metas,
        }
        if self.ragged:
            header["ragged"] = True
        if self.end_sessions:
            header["end_sessions"] = self.end_sessions
        return header


@dataclass(slots=True)
class ModelDrained:
    """Tell the task manager that a model version removed from the registry holds no request here any more."""

    model: str
    version: str

    def header(self) -> dict[str, Any]:
        return {"t": protocol.MODEL_DRAINED, "model": self.model, "version": self.version}


Action = Reply | Dispatch | ModelDrained


class _State(enum.Enum):
    QUEUED = 1
    IN_FLIGHT = 2
    DONE = 3


class _Pending:
    """A request the scheduler holds until it is answered."""

    __slots__ = ("seq", "origin", "spec", "signature", "group", "metas", "frames", "rows", "arrival", "rank",
                 "deadline", "state", "priority", "session", "start", "end", "retried", "header_bytes", "nbytes")

    def __init__(self, seq: int, request: Request, spec: ModelSpec, signature: Signature, rows: int, now: float,
                 aging_s: float, header_bytes: int) -> None:
        self.seq = seq  # also the item id replicas see: bridges' ids never leave the batch manager
        self.origin = request.origin
        self.spec = spec
        self.signature = signature
        self.group: _Group | None = None  # None while it waits in its session's queue
        self.metas = request.metas
        self.frames = request.frames
        self.rows = rows
        self.arrival = now
        self.priority = request.params.priority
        self.rank = now + int(self.priority) * aging_s
        self.deadline = request.deadline
        self.state = _State.QUEUED
        self.session: _Session | None = None
        session = request.params.session
        self.start = session.start if session else False
        self.end = session.end if session else False
        self.retried = False
        self.header_bytes = header_bytes  # its share of a batch header, at most
        self.nbytes = sum(map(len, request.frames))  # frames are 1-D byte buffers (zmq.Frame, bytes)


class _Group:
    """Requests of one model version and signature (and, for sessions, one replica), one FIFO per priority."""

    __slots__ = ("spec", "replica", "levels", "rows")

    def __init__(self, spec: ModelSpec, replica: _Replica | None) -> None:
        self.spec = spec
        self.replica = replica
        # Answered requests (deadline, cancel) stay until they reach a head; ``rows`` counts live ones.
        # One per Priority value (high, normal, low); built by hand: this runs on the request path.
        self.levels: tuple[deque[_Pending], ...] = (deque(), deque(), deque())
        self.rows = 0

    def push(self, pending: _Pending, *, front: bool = False) -> None:
        pending.group = self
        level = self.levels[pending.priority]
        if front:
            level.appendleft(pending)
        else:
            level.append(pending)
        self.rows += pending.rows

    def head(self) -> _Pending | None:
        """The next request to go: the lowest rank (arrival + priority aging) among the levels' heads.

        Drops answered entries from the heads on the way, so ``ready_at`` may read the heads as they are.
        """
        best: _Pending | None = None
        for level in self.levels:
            while level and level[0].state is not _State.QUEUED:
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
        return None if oldest is None else oldest + self.spec.max_batch_delay_ms / 1000.0

    def take(self, pending: _Pending) -> None:
        level = self.levels[pending.priority]
        assert level[0] is pending
        level.popleft()
        self.rows -= pending.rows


class _Session:
    __slots__ = ("id", "model_key", "replica", "queue", "active", "started", "closing", "lost", "last_active",
                 "idle_due")

    def __init__(self, session_id: SessionId, model_key: str, now: float) -> None:
        self.id = session_id
        self.model_key = model_key
        self.replica: _Replica | None = None  # None while it waits for a slot
        self.queue: deque[_Pending] = deque()  # behind ``active``, in arrival order
        self.active: _Pending | None = None  # in a group or at the replica: at most one at a time keeps order
        self.started = False  # the replica has been told to start it
        self.closing = False  # its last request carries sequence_end
        self.lost = False
        self.last_active = now
        self.idle_due = 0.0  # when its latest entry in the idle watch list falls due

    def idle(self) -> bool:
        return self.active is None and not any(p.state is _State.QUEUED for p in self.queue)


class _Replica:
    __slots__ = ("id", "model_key", "capacity", "batches", "last_used", "draining", "sessions", "groups",
                 "pending_ends")

    def __init__(self, replica_id: ReplicaId, model_key: str, capacity: int) -> None:
        self.id = replica_id
        self.model_key = model_key
        self.capacity = capacity
        self.batches: dict[int, _Batch] = {}
        self.last_used = 0
        self.draining = False
        self.sessions: dict[SessionId, _Session] = {}
        self.groups: dict[Signature, _Group] = {}  # groups of its sessions' requests
        self.pending_ends: list[SessionId] = []  # sessions whose end hook it has yet to run

    @property
    def free(self) -> int:
        return self.capacity - len(self.batches)

    @property
    def usable(self) -> bool:
        return not self.draining and self.free > 0


class _Batch:
    __slots__ = ("id", "replica", "requests")

    def __init__(self, batch_id: int, replica: _Replica, requests: list[_Pending]) -> None:
        self.id = batch_id
        self.replica = replica
        self.requests = requests


class _Model:
    """One model version: its groups, its replicas, its sessions and how many of its requests wait."""

    __slots__ = ("groups", "replicas", "queued", "sessions", "waiting", "ended", "stateful")

    def __init__(self) -> None:
        self.stateful = False  # it has had sessions: replicas' own groups and end notices need pumping
        self.groups: dict[Signature, _Group] = {}  # stateless requests
        self.replicas: dict[ReplicaId, _Replica] = {}
        self.queued = 0
        self.sessions: dict[SessionId, _Session] = {}
        self.waiting: deque[_Session] = deque()  # sessions waiting for a slot
        self.ended: dict[SessionId, str] = {}


class Scheduler:
    """Batches requests per model version and hands batches to replicas with credit.

    ``registry`` is the view of the model registry requests are checked against; until one
    is set every request is answered ``not_ready``. ``max_queue_size`` bounds the requests
    queued per model version unless its spec sets its own; beyond it a request is answered
    ``overloaded`` at once. ``priority_aging_s`` is how much earlier arrival one priority level
    is worth.
    """

    def __init__(self, registry: Registry | None = None, *, max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
                 priority_aging_s: float = DEFAULT_PRIORITY_AGING_S, max_header_bytes: int = MAX_HEADER_BYTES,
                 max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES) -> None:
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        self._registry = registry
        self._max_queue_size = max_queue_size
        self._aging_s = priority_aging_s
        self._max_header_bytes = max_header_bytes
        self._max_batch_bytes = max_batch_bytes
        # Batch ids dropped with their replica (replica_down, a new incarnation), oldest first; bounded.
        self._settled: dict[int, None] = {}
        self._models: dict[str, _Model] = {}
        self._replicas: dict[ReplicaId, _Replica] = {}
        self._batches: dict[int, _Batch] = {}
        self._live: dict[Origin, _Pending] = {}
        self._deadlines: list[tuple[float, int, _Pending]] = []
        self._idle: list[tuple[float, int, _Session]] = []  # (when it may be reaped, tie-break, session)
        # The task manager's last word on each model version (key: name/version): (state, reason).
        # Kept apart from ``_models``, which forgets idle model versions.
        self._status: dict[str, tuple[ServingState, str | None]] = {}
        # Model versions removed from the registry that still hold requests, with their last spec.
        self._deleting: dict[str, ModelSpec] = {}
        self._seq = 0
        self._batch_seq = 0
        self._use_seq = 0
        self._idle_seq = 0

    # --- inputs --------------------------------------------------------------------------------------

    def set_registry(self, registry: Registry, now: float) -> list[Action]:
        """Take a new registry view.

        A model version that was removed takes no new request, but its queued requests are still served
        (they fail ``unknown_model`` at once only if no replica of it takes batches); ``ModelDrained`` says
        when it holds nothing more. A model version added again is served as before.
        """
        previous = self._registry
        self._registry = registry
        out: list[Action] = []
        for key in [key for key in self._deleting if key in registry.specs]:
            del self._deleting[key]  # added again before it drained
        if previous is not None:
            for key, old_spec in previous.specs.items():
                if key not in registry.specs and key not in self._deleting:
                    self._deleting[key] = old_spec
        for key, model in self._models.items():
            spec = registry.specs.get(key)
            if spec is None:
                if key in self._deleting and not any(not r.draining for r in model.replicas.values()):
                    self._fail_queued(model, ErrorCode.UNKNOWN_MODEL, f"model {key} was removed from the registry",
                                      out)
                continue
            groups = list(model.groups.values()) + [g for r in model.replicas.values() for g in r.groups.values()]
            for group in groups:
                group.spec = spec
        self._pump_all(now, out)
        self._check_drained(out)
        return out

    def submit(self, request: Request, now: float) -> list[Action]:
        """Validate and queue ``request``; a batch leaves at once if this made its group ready."""
        out: list[Action] = []
        if request.origin in self._live:
            # Its own id is the only address we have; the request already holding it keeps going.
            message = f"request id {request.origin[1]} is already in flight"
            out.append(_error(request.origin, ErrorCode.BAD_INPUT, message))
            return out
        if self._registry is None:
            out.append(_error(request.origin, ErrorCode.NOT_READY, "the model registry has not been loaded yet"))
            return out
        spec = self._registry.get(request.model, request.version)
        if spec is None:
            what = request.model if request.version is None else f"{request.model} version {request.version}"
            out.append(_error(request.origin, ErrorCode.UNKNOWN_MODEL, f"no model {what} is registered"))
            return out
        checked = _check_inputs(spec, request)
        if isinstance(checked, str):
            out.append(_error(request.origin, ErrorCode.BAD_INPUT, f"model {spec.key}: {checked}"))
            return out
        rows, signature = checked
        if rows > spec.max_batch_size:
            out.append(_error(request.origin, ErrorCode.BAD_INPUT,
                              f"model {spec.key}: {rows} rows exceed max_batch_size {spec.max_batch_size}"))
            return out
        session_params = request.params.session if spec.stateful else None
        if spec.stateful and session_params is None:
            out.append(_error(request.origin, ErrorCode.BAD_INPUT,
                              f"model {spec.key} is stateful: every request needs the parameter 'sequence_id'"))
            return out
        header_bytes = _item_header_bytes(request)
        if header_bytes > self._header_room(spec.name, spec.version, MAX_REPLICA_ID_BYTES):
            out.append(_error(request.origin, ErrorCode.BAD_INPUT,
                              f"model {spec.key}: the request's header ({header_bytes} bytes with its entry in a "
                              f"batch) does not fit in a batch header (the bus's limit is {self._max_header_bytes} "
                              "bytes); send shorter tensor names or fewer parameters"))
            return out
        refusal = self._refusal(spec.key)
        if refusal is not None:
            out.append(_error(request.origin, ErrorCode.NOT_READY, refusal))
            return out
        model = self._model(spec.key)
        limit = spec.max_queue_size or self._max_queue_size
        if model.queued >= limit:
            out.append(_error(request.origin, ErrorCode.OVERLOADED,
                              f"model {spec.key} has {model.queued} requests queued, the limit"))
            return out
        if not request.params.timeout_given and spec.default_timeout_s is not None:
            # The client named no timeout: the model's own default may be shorter than the server's.
            request.deadline = min(request.deadline, now + spec.default_timeout_s)
        if request.deadline <= now:
            out.append(_error(request.origin, ErrorCode.DEADLINE, "the request's timeout passed before it was queued"))
            return out

        session: _Session | None = None
        if session_params is not None:
            session = model.sessions.get(session_params.id)
            if session is not None and session.closing and not session_params.start:
                out.append(_error(request.origin, ErrorCode.SESSION_LOST,
                                  f"session {session_params.id!r} of model {spec.key} is ending (sequence_end); "
                                  "start a new one with sequence_start"))
                return out
            if session is None:
                if not session_params.start:
                    why = model.ended.get(session_params.id, "it was never started or has ended")
                    out.append(_error(request.origin, ErrorCode.SESSION_LOST,
                                      f"model {spec.key} has no open session {session_params.id!r}: {why}; "
                                      "start a new one with sequence_start"))
                    return out
                session = model.sessions[session_params.id] = _Session(session_params.id, spec.key, now)
                model.stateful = True
                model.ended.pop(session_params.id, None)
                self._place(model, session)

        self._seq += 1
        pending = _Pending(self._seq, request, spec, signature, rows, now, self._aging_s, header_bytes)
        model.queued += 1
        self._live[request.origin] = pending
        heapq.heappush(self._deadlines, (pending.deadline, pending.seq, pending))
        if session is None:
            group = model.groups.get(signature)
            if group is None:
                group = model.groups[signature] = _Group(spec, None)
            group.push(pending)
            self._pump(model, now, out)
            return out
        pending.session = session
        session.queue.append(pending)
        session.closing = pending.end
        session.last_active = now
        self._advance(session, now, out)
        self._pump(model, now, out)
        return out

    def cancel(self, origin: Origin, now: float = 0.0) -> list[Action]:
        """Forget a request without replying (its bridge gave up); a result that still comes is dropped."""
        out: list[Action] = []
        pending = self._live.get(origin)
        if pending is None:
            return out
        queued = pending.state is _State.QUEUED
        if queued:
            self._unqueue(pending)
        self._finish(pending)
        if queued and pending.session is not None:
            self._session_item_gone(pending, now, out)
            self._pump(self._model(pending.spec.key), now, out)
        self._check_drained(out)
        return out

    def replica_up(self, replica_id: ReplicaId, model: str, version: str, capacity: int, now: float) -> list[Action]:
        """A replica can take batches.

        An announcement of a replica already known means a new incarnation: replica ids are reused
        (``instance-model-version-n``) and a restarted task manager announces its fresh replicas under
        the old ids. The batches the old one held will never be answered, so they fail ``replica_lost``
        now instead of holding its credit for ever (its sessions are lost).
        """
        out: list[Action] = []
        key = f"{model}/{version}"
        known = self._replicas.get(replica_id)
        if known is not None:
            self._drop_replica(known, f"replica {replica_id!r} was started again; the batches it held are lost",
                               now, out, retry=False)
            if known.model_key != key:  # the id now serves another model version: the old one may be left bare
                self._refuse_if_bare(known.model_key, out)
        replica = self._replicas[replica_id] = _Replica(replica_id, key, max(capacity, 0))
        model_entry = self._model(key)
        model_entry.replicas[replica_id] = replica
        self._place_waiting(model_entry, now, out)
        self._pump(model_entry, now, out)
        self._check_drained(out)
        return out

    def replica_draining(self, replica_id: ReplicaId, reason: str, now: float) -> list[Action]:
        """A planned stop: no new batch goes to the replica, results of those it holds are still taken.

        Its sessions cannot go on anywhere else, so they end now: queued requests of theirs get
        ``session_lost``; a request of theirs the replica already holds is still answered by it.
        """
        out: list[Action] = []
        replica = self._replicas.get(replica_id)
        if replica is None or replica.draining:
            return out
        self._stop_dispatching(replica, reason, out)
        self._refuse_if_bare(replica.model_key, out)
        self._pump(self._model(replica.model_key), now, out)
        self._check_drained(out)
        return out

    def _stop_dispatching(self, replica: _Replica, reason: str, out: list[Action]) -> None:
        """No batch goes to ``replica`` any more (results of those it holds are still taken); its sessions
        cannot go on elsewhere, so they end: their queued requests get ``session_lost``."""
        if replica.draining:
            return
        replica.draining = True
        model = self._model(replica.model_key)
        message = f"the session's replica {replica.id!r} is stopping ({reason}); its state is gone"
        for session in list(replica.sessions.values()):
            self._lose_session(model, session, ErrorCode.SESSION_LOST, message, out, answer_in_flight=False)

    def replica_down(self, replica_id: ReplicaId, reason: str, now: float) -> list[Action]:
        """A replica is gone: stateless batches it held are retried once elsewhere, the rest fail."""
        out: list[Action] = []
        replica = self._replicas.get(replica_id)
        if replica is not None:
            self._drop_replica(replica, reason, now, out, retry=True)
            self._refuse_if_bare(replica.model_key, out)
            self._pump(self._model(replica.model_key), now, out)
        self._check_drained(out)
        return out

    def model_status(self, model: str, version: str, state: ServingState, reason: str | None,
                     now: float) -> list[Action]:
        """The task manager's view of a model version changed. In a refusing state with no replica to take
        batches, its queued requests are answered ``not_ready`` now rather than at their deadline."""
        out: list[Action] = []
        key = f"{model}/{version}"
        self._status[key] = (state, reason)
        self._refuse_if_bare(key, out)
        model_entry = self._models.get(key)
        if model_entry is not None:
            self._pump(model_entry, now, out)
        self._check_drained(out)
        return out

    def on_result(
        self,
        replica_id: ReplicaId,
        batch_id: int,
        item_counts: Sequence[int],
        metas: Sequence[TensorMeta],
        frames: Sequence[Any],
        now: float,
        item_errors: Sequence[ItemError | None] | None = None,
    ) -> list[Action]:
        """A batch's outputs. Item ``i`` owns the next ``item_counts[i]`` tensors and answers the ``i``-th request;
        ``item_errors[i]``, when set, answers it with that error instead."""
        out: list[Action] = []
        batch = self._take_batch(replica_id, batch_id)
        if batch is None:
            return out
        if len(item_counts) != len(batch.requests) or sum(item_counts) != len(metas) or len(metas) != len(frames) \
                or (item_errors is not None and len(item_errors) != len(item_counts)):
            message = (f"replica {replica_id!r} answered batch {batch_id} of {len(batch.requests)} items "
                       f"with {len(item_counts)} items and {len(frames)} tensors")
            for pending in batch.requests:
                self._fail(pending, ErrorCode.INTERNAL, message, out)
                self._session_item_done(pending, now, out)
        else:
            start = 0
            for index, (pending, count) in enumerate(zip(batch.requests, item_counts, strict=True)):
                end = start + count
                problem = item_errors[index] if item_errors is not None else None
                if pending.state is _State.IN_FLIGHT:
                    if problem is not None:
                        self._fail(pending, _code(problem[0]), problem[1], out)
                    else:
                        spec = pending.spec
                        header = reply_header(pending.origin[1], spec.name, spec.version, list(metas[start:end]))
                        out.append(Reply(pending.origin, header, list(frames[start:end])))
                        self._finish(pending)
                if pending.session is not None:
                    self._session_item_done(pending, now, out, lost=problem is not None
                                            and problem[0] == ErrorCode.SESSION_LOST.value)
                start = end
        self._pump(self._model(batch.replica.model_key), now, out)
        self._check_drained(out)
        return out

    def on_failed(self, replica_id: ReplicaId, batch_id: int, code: str, message: str, now: float) -> list[Action]:
        """A batch failed as a whole: each of its requests gets the error (``replica_lost``: retried once)."""
        out: list[Action] = []
        batch = self._take_batch(replica_id, batch_id)
        if batch is None:
            return out
        error_code = _code(code)
        model = self._model(batch.replica.model_key)
        if error_code is ErrorCode.REPLICA_LOST:
            # The replica is dead or going: its credit must never come back, or the retry and the queue
            # would be sent to it. ``replica_down`` (before or after this) forgets it.
            self._stop_dispatching(batch.replica, f"it lost batch {batch_id}: {message}", out)
            self._fail_lost_batch(model, batch, message, now, out, retry=True)
            self._refuse_if_bare(batch.replica.model_key, out)
        else:
            for pending in batch.requests:
                self._fail(pending, error_code, message, out)
                self._session_item_done(pending, now, out)
        self._pump(model, now, out)
        self._check_drained(out)
        return out

    def tick(self, now: float) -> list[Action]:
        """Let time pass: fail requests whose deadline passed, reap idle sessions, send batches whose delay ran out."""
        out: list[Action] = []
        # Not a local alias: answering a request may compact (replace) the heap.
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, pending = heapq.heappop(self._deadlines)
            if pending.state is _State.QUEUED:
                self._unqueue(pending)
                self._fail(pending, ErrorCode.DEADLINE, _waited(pending, now, self._has_replica(pending)), out)
                self._session_item_gone(pending, now, out)
            elif pending.state is _State.IN_FLIGHT:
                # Its batch keeps the replica's credit until the replica answers or is declared down.
                self._fail(pending, ErrorCode.DEADLINE, _waited(pending, now, True), out)
        while self._idle and self._idle[0][0] <= now:
            _, _, session = heapq.heappop(self._idle)
            model = self._models.get(session.model_key)
            if model is None or model.sessions.get(session.id) is not session or not session.idle():
                continue
            spec = self._spec(session.model_key)
            timeout = spec.session_idle_timeout_s if spec else 0.0
            if session.last_active + timeout > now:
                continue  # it was busy since; going idle again pushed a later entry
            self._end_session(model, session, f"it was idle for more than {timeout:g}s", now, out, notify=True)
        self._pump_all(now, out)
        self._check_drained(out)
        self._forget_idle_models()
        return out

    def fail_all(self, code: ErrorCode, message: str) -> list[Action]:
        """Answer every request still held (the batch manager is stopping); replicas' credit is returned."""
        out: list[Action] = []
        for pending in list(self._live.values()):
            self._fail(pending, code, message, out)
        for model in self._models.values():
            model.groups.clear()
            model.queued = 0
            model.sessions.clear()
            model.waiting.clear()
        for replica in self._replicas.values():
            replica.batches.clear()
            replica.groups.clear()
            replica.sessions.clear()
        self._batches.clear()
        self._deadlines.clear()
        self._idle.clear()
        return out

    # --- what the caller asks --------------------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        """When ``tick`` next has something to do: a group's delay runs out, a deadline passes, a session idles out."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].state is _State.DONE:
            heapq.heappop(deadlines)
        earliest = deadlines[0][0] if deadlines else None
        idle = self._idle
        while idle and (idle[0][2].lost or idle[0][0] != idle[0][2].idle_due or not idle[0][2].idle()):
            heapq.heappop(idle)  # superseded: the session was busy since, or it ended
        if self._idle and (earliest is None or self._idle[0][0] < earliest):
            earliest = self._idle[0][0]
        for model in self._models.values():
            # A group that waits for credit needs no timer: returning credit dispatches it.
            for group in self._dispatchable_groups(model):
                group.head()
                ready_at = group.ready_at()
                if ready_at is not None and (earliest is None or ready_at < earliest):
                    earliest = ready_at
        return earliest

    def queued(self, model_key: str | None = None) -> int:
        """Requests waiting for a batch, for one model version (``name/version``) or all."""
        if model_key is not None:
            model = self._models.get(model_key)
            return model.queued if model else 0
        return sum(model.queued for model in self._models.values())

    def pending(self) -> int:
        """Requests not answered yet, queued or in flight."""
        return len(self._live)

    def batches_in_flight(self, replica_id: ReplicaId | None = None) -> int:
        if replica_id is None:
            return len(self._batches)
        replica = self._replicas.get(replica_id)
        return len(replica.batches) if replica else 0

    def sessions(self, model_key: str) -> dict[SessionId, ReplicaId | None]:
        """Open sessions of a model version and the replica each is pinned to (None: waiting for a slot)."""
        model = self._models.get(model_key)
        if model is None:
            return {}
        return {sid: (s.replica.id if s.replica else None) for sid, s in model.sessions.items()}

    def refusing(self, model_key: str) -> bool:
        """Whether requests for a model version (``name/version``) are refused ``not_ready`` rather than queued."""
        return self._refusal(model_key) is not None

    def knows_batch(self, replica_id: ReplicaId, batch_id: int) -> bool:
        """Whether an answer for the batch is expected: it is at ``replica_id``, or was settled when that
        replica went (the task manager answers such a batch too, after ``replica_down``). False: nothing
        sent it, so the answer is a peer's bug or a mix-up worth a loud log line."""
        batch = self._batches.get(batch_id)
        if batch is not None:
            return batch.replica.id == replica_id
        return batch_id in self._settled

    def is_draining(self, replica_id: ReplicaId) -> bool:
        replica = self._replicas.get(replica_id)
        return replica is not None and replica.draining

    def sessions_on(self, replica_id: ReplicaId) -> int:
        """Session slots taken on a replica."""
        replica = self._replicas.get(replica_id)
        return len(replica.sessions) if replica else 0

    # --- internals: dispatch ---------------------------------------------------------------------------

    def _model(self, key: str) -> _Model:
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = _Model()
        return model

    def _pump_all(self, now: float, out: list[Action]) -> None:
        for model in self._models.values():
            self._pump(model, now, out)

    def _dispatchable_groups(self, model: _Model) -> Iterator[_Group]:
        if model.groups and any(replica.usable for replica in model.replicas.values()):
            yield from model.groups.values()
        for replica in model.replicas.values():
            if replica.groups and replica.usable:
                yield from replica.groups.values()

    def _pump(self, model: _Model, now: float, out: list[Action]) -> None:
        """Dispatch ready groups, oldest first, while a replica of this model version has credit."""
        if not model.replicas:
            return
        for replica in model.replicas.values() if model.stateful else ():
            if replica.pending_ends and replica.usable:
                self._send_ends(replica, out)
            # Sessions' groups go only to their own replica.
            while replica.groups and replica.usable:
                group = _oldest_ready(replica.groups, now)
                if group is None:
                    break
                self._dispatch(model, group, replica, now, out)
        while model.groups:
            free = _most_free(model)
            if free is None:
                return
            group = _oldest_ready(model.groups, now)
            if group is None:
                return
            self._dispatch(model, group, free, now, out)

    def _dispatch(self, model: _Model, group: _Group, replica: _Replica, now: float, out: list[Action]) -> None:
        """Send the group's first requests by rank, up to max_batch_size rows, as one batch to ``replica``."""
        spec = group.spec
        limit = spec.max_batch_size
        header_room = self._header_room(spec.name, spec.version, len(str(replica.id)))
        taken: list[_Pending] = []
        rows = header_bytes = nbytes = 0
        while True:
            pending = group.head()
            if pending is None:
                break
            if pending.deadline <= now:
                group.take(pending)
                model.queued -= 1
                self._fail(pending, ErrorCode.DEADLINE, _waited(pending, now, True), out)
                self._session_item_gone(pending, now, out)
                continue
            # Rank order is kept: a request that does not fit waits for the next batch. The first one
            # always goes, even if max_batch_size shrank below its rows since it was queued (submit made sure
            # its header fits). A batch the bus could not carry would never be answered, so the header and
            # tensor bytes close it early too.
            if taken and (rows + pending.rows > limit or header_bytes + pending.header_bytes > header_room
                          or nbytes + pending.nbytes > self._max_batch_bytes):
                break
            group.take(pending)
            model.queued -= 1
            pending.state = _State.IN_FLIGHT
            taken.append(pending)
            rows += pending.rows
            header_bytes += pending.header_bytes
            nbytes += pending.nbytes
        if not taken:
            return
        batch = self._new_batch(replica, taken)
        if spec.stateful:
            items: list[dict[str, Any]] = []
            for pending in taken:
                session = pending.session
                assert session is not None
                items.append({"id": pending.seq, "n": len(pending.metas), "session": session.id,
                              "start": pending.start or not session.started, "end": pending.end})
                # After an end the replica holds no state: whatever of the session comes next starts afresh.
                session.started = not pending.end
        else:
            items = [{"id": pending.seq, "n": len(pending.metas)} for pending in taken]
        if len(taken) == 1:
            metas, frames = list(taken[0].metas), list(taken[0].frames)
        else:
            metas, frames = [], []
            for pending in taken:
                metas += pending.metas
                frames += pending.frames
        out.append(Dispatch(replica.id, batch.id, spec.name, spec.version, items, metas, frames,
                            ragged=spec.ragged_batches))

    def _header_room(self, model: str, version: str, replica_id_bytes: int) -> int:
        """How many bytes of a batch header its items may take: the bus's limit less the fixed part."""
        fixed = BATCH_HEADER_FIXED_BYTES + len(model.encode()) + len(version.encode()) + replica_id_bytes
        return self._max_header_bytes - fixed

    def _send_ends(self, replica: _Replica, out: list[Action]) -> None:
        """A batch with no items that tells the replica to run the end hook of sessions that idled out."""
        model_name, _, version = replica.model_key.partition("/")
        batch = self._new_batch(replica, [])
        out.append(Dispatch(replica.id, batch.id, model_name, version, [], [], [], end_sessions=replica.pending_ends))
        replica.pending_ends = []

    def _new_batch(self, replica: _Replica, requests: list[_Pending]) -> _Batch:
        self._batch_seq += 1
        self._use_seq += 1
        batch = _Batch(self._batch_seq, replica, requests)
        replica.batches[batch.id] = batch
        replica.last_used = self._use_seq
        self._batches[batch.id] = batch
        return batch

    def _unqueue(self, pending: _Pending) -> None:
        """Take a queued request out of the counts; its group or session drops the entry lazily."""
        self._models[pending.spec.key].queued -= 1
        if pending.group is not None:
            pending.group.rows -= pending.rows

    def _take_batch(self, replica_id: ReplicaId, batch_id: int) -> _Batch | None:
        batch = self._batches.get(batch_id)
        # Batch ids are never reused, so an unknown one is a late answer for a replica declared down
        # (or a mix-up the service has logged: ``knows_batch``). Either way no credit comes back with it.
        if batch is None or batch.replica.id != replica_id:
            if batch is None:
                self._settled.pop(batch_id, None)  # its one answer came
            return None
        del self._batches[batch_id]
        del batch.replica.batches[batch_id]
        return batch

    # --- internals: replicas going away, retries -------------------------------------------------------

    def _drop_replica(self, replica: _Replica, reason: str, now: float, out: list[Action], *, retry: bool) -> None:
        del self._replicas[replica.id]
        model = self._model(replica.model_key)
        model.replicas.pop(replica.id, None)
        message = f"the session's replica {replica.id!r} is gone ({reason}); its state is gone"
        for session in list(replica.sessions.values()):
            self._lose_session(model, session, ErrorCode.SESSION_LOST, message, out, answer_in_flight=True)
        for batch in list(replica.batches.values()):
            del self._batches[batch.id]
            self._remember_settled(batch.id)
            self._fail_lost_batch(model, batch, reason, now, out, retry=retry)
        replica.batches.clear()
        replica.groups.clear()

    def _remember_settled(self, batch_id: int) -> None:
        self._settled[batch_id] = None
        if len(self._settled) > SETTLED_BATCHES_REMEMBERED:
            del self._settled[next(iter(self._settled))]

    def _fail_lost_batch(self, model: _Model, batch: _Batch, reason: str, now: float, out: list[Action], *,
                         retry: bool) -> None:
        """The replica died holding ``batch``: stateless requests go round once more if another replica can
        take them (and the queue has room), everything else fails."""
        can_retry = retry and any(r is not batch.replica and not r.draining for r in model.replicas.values())
        for pending in batch.requests:
            if pending.session is not None:
                # Answered or not (its deadline may have passed), the session's state went with the replica.
                session = pending.session
                self._fail(pending, ErrorCode.SESSION_LOST, f"the session's replica died: {reason}", out)
                if not session.lost:
                    self._lose_session(model, session, ErrorCode.SESSION_LOST,
                                       f"the session's replica died: {reason}", out, answer_in_flight=True)
                continue
            if pending.state is not _State.IN_FLIGHT:
                continue
            limit = pending.spec.max_queue_size or self._max_queue_size
            if can_retry and not pending.retried and pending.deadline > now and model.queued < limit:
                pending.retried = True
                pending.state = _State.QUEUED
                group = model.groups.get(pending.signature)
                if group is None:
                    group = model.groups[pending.signature] = _Group(pending.spec, None)
                group.push(pending, front=True)
                model.queued += 1
            else:
                self._fail(pending, ErrorCode.REPLICA_LOST, reason, out)

    # --- internals: sessions ---------------------------------------------------------------------------

    def _place(self, model: _Model, session: _Session) -> bool:
        """Pin ``session`` to the usable replica with the fewest sessions and a free slot, else let it wait."""
        spec = self._spec(session.model_key)
        slots = spec.max_sessions_per_replica if spec else 1
        best: _Replica | None = None
        for replica in model.replicas.values():
            if not replica.draining and len(replica.sessions) < slots and (
                    best is None or len(replica.sessions) < len(best.sessions)):
                best = replica
        if best is None:
            model.waiting.append(session)
            return False
        session.replica = best
        best.sessions[session.id] = session
        return True

    def _place_waiting(self, model: _Model, now: float, out: list[Action]) -> None:
        while model.waiting:
            session = model.waiting[0]
            if model.sessions.get(session.id) is not session or session.replica is not None:
                model.waiting.popleft()
                continue
            model.waiting.popleft()
            if not self._place(model, session):
                # ``_place`` put it back at the end; it belongs at the front.
                model.waiting.pop()
                model.waiting.appendleft(session)
                return
            self._advance(session, now, out)

    def _advance(self, session: _Session, now: float, out: list[Action]) -> None:
        """Hand the session's next request to its replica's group, once the one before it is answered."""
        replica = session.replica
        if session.active is not None or replica is None:
            return
        queue = session.queue
        while queue and queue[0].state is not _State.QUEUED:
            queue.popleft()
        if not queue:
            self._watch_idle(session)
            return
        pending = queue.popleft()
        session.active = pending
        group = replica.groups.get(pending.signature)
        if group is None:
            group = replica.groups[pending.signature] = _Group(pending.spec, replica)
        group.push(pending)  # the caller pumps: this may run in the middle of a dispatch

    def _session_item_gone(self, pending: _Pending, now: float, out: list[Action]) -> None:
        """A session's request left before reaching its replica (deadline, cancel)."""
        session = pending.session
        if session is None or session.lost:
            return
        if session.active is pending:
            session.active = None
        model = self._model(session.model_key)
        if session.replica is None and session.idle():
            # It never got a slot and nothing of it is left to run: it was never started anywhere.
            self._end_session(model, session, "it ended before it got a session slot", now, out, notify=False)
            return
        if pending.end and not any(p.state is _State.QUEUED for p in session.queue) and session.active is None:
            # Its sequence_end never reached the replica: end the session anyway, and tell the replica.
            self._end_session(model, session, "its sequence_end request was not run", now, out, notify=True)
            return
        self._advance(session, now, out)

    def _session_item_done(self, pending: _Pending, now: float, out: list[Action], *, lost: bool = False) -> None:
        """The replica answered (or failed) a session's request: its next one may go."""
        session = pending.session
        if session is None or session.lost or session.active is not pending:
            return
        session.active = None
        session.last_active = now
        model = self._model(session.model_key)
        if lost:
            self._lose_session(model, session, ErrorCode.SESSION_LOST, "the replica no longer holds the session",
                               out, answer_in_flight=False)
        elif pending.end and not any(p.state is _State.QUEUED for p in session.queue):
            # The replica ran the end hook after this request.
            self._end_session(model, session, "it ended with sequence_end", now, out, notify=False)
        else:
            self._advance(session, now, out)

    def _watch_idle(self, session: _Session) -> None:
        spec = self._spec(session.model_key)
        if spec is not None:
            self._idle_seq += 1
            session.idle_due = session.last_active + spec.session_idle_timeout_s
            heapq.heappush(self._idle, (session.idle_due, self._idle_seq, session))
            if len(self._idle) > 4 * self._open_sessions() + 1024:
                # A busy session goes idle after every answer; keep only each open session's latest entry.
                latest: dict[int, tuple[float, int, _Session]] = {}
                for entry in self._idle:
                    if not entry[2].lost and (id(entry[2]) not in latest or entry[1] > latest[id(entry[2])][1]):
                        latest[id(entry[2])] = entry
                self._idle = list(latest.values())
                heapq.heapify(self._idle)

    def _open_sessions(self) -> int:
        return sum(len(model.sessions) for model in self._models.values())

    def _end_session(self, model: _Model, session: _Session, why: str, now: float, out: list[Action], *,
                     notify: bool) -> None:
        """Free the session's slot; ``notify``: the replica has not ended it itself, so tell it."""
        session.lost = True  # nothing more of it is dispatched
        if model.sessions.get(session.id) is session:
            del model.sessions[session.id]
        self._remember_end(model, session.id, why)
        replica = session.replica
        if replica is not None:
            replica.sessions.pop(session.id, None)
            if notify and session.started and self._replicas.get(replica.id) is replica:
                replica.pending_ends.append(session.id)
            self._place_waiting(model, now, out)  # the caller pumps

    def _lose_session(self, model: _Model, session: _Session, code: ErrorCode, message: str, out: list[Action], *,
                      answer_in_flight: bool) -> None:
        """The session's state is gone: its queued requests (and, if asked, the one at the replica) fail."""
        session.lost = True
        if model.sessions.get(session.id) is session:
            del model.sessions[session.id]
        self._remember_end(model, session.id, message)
        if session.replica is not None:
            session.replica.sessions.pop(session.id, None)
        doomed = list(session.queue)
        if session.active is not None:
            doomed.append(session.active)
        for pending in doomed:
            if pending.state is _State.QUEUED:
                self._unqueue(pending)
                self._fail(pending, code, message, out)
            elif pending.state is _State.IN_FLIGHT and answer_in_flight:
                self._fail(pending, code, message, out)
        session.queue.clear()

    def _remember_end(self, model: _Model, session_id: SessionId, why: str) -> None:
        ended = model.ended
        ended.pop(session_id, None)
        ended[session_id] = why
        if len(ended) > ENDED_SESSIONS_REMEMBERED:
            del ended[next(iter(ended))]

    # --- internals: models that cannot run -------------------------------------------------------------

    def _refusal(self, key: str) -> str | None:
        """Why requests for ``key`` are refused now, or None while they may queue (on the request path: one
        dict look-up for a model in a hopeful state)."""
        status = self._status.get(key)
        deleted = key in self._deleting
        if not deleted and (status is None or status[0] not in REFUSING_STATES):
            return None
        model = self._models.get(key)
        if model is not None and any(not replica.draining for replica in model.replicas.values()):
            return None  # a replica still takes batches: the state will say degraded soon enough
        if deleted:
            return f"model {key} was removed from the registry and has no replica left to serve its queued requests"
        assert status is not None
        state, reason = status
        return f"model {key} is {state} and has no ready replica: {reason or 'no reason given'}"

    def _refuse_if_bare(self, key: str, out: list[Action]) -> None:
        """Answer every queued request of ``key`` ``not_ready`` if it is refusing: none would ever be served."""
        refusal = self._refusal(key)
        model = self._models.get(key)
        if refusal is not None and model is not None:
            self._fail_queued(model, ErrorCode.NOT_READY, refusal, out)

    def _check_drained(self, out: list[Action]) -> None:
        """``ModelDrained`` for each removed model version with nothing queued and no batch at a replica."""
        if not self._deleting:
            return
        for key, spec in list(self._deleting.items()):
            model = self._models.get(key)
            if model is None or (model.queued == 0 and not any(r.batches for r in model.replicas.values())):
                del self._deleting[key]
                out.append(ModelDrained(spec.name, spec.version))

    def _spec(self, key: str) -> ModelSpec | None:
        """The registry's spec of a model version, or the last one of a removed model version still draining."""
        spec = self._registry.specs.get(key) if self._registry else None
        return spec if spec is not None else self._deleting.get(key)

    def _fail_queued(self, model: _Model, code: ErrorCode, message: str, out: list[Action]) -> None:
        """Fail every request of ``model`` not yet at a replica and end its sessions; in-flight batches go on."""
        for session in list(model.sessions.values()):
            self._lose_session(model, session, code, message, out, answer_in_flight=False)
        groups = list(model.groups.values()) + [g for r in model.replicas.values() for g in r.groups.values()]
        for group in groups:
            for level in group.levels:
                for pending in level:
                    if pending.state is _State.QUEUED:
                        model.queued -= 1
                        self._fail(pending, code, message, out)
                level.clear()
            group.rows = 0
        model.groups.clear()
        for replica in model.replicas.values():
            replica.groups.clear()

    # --- internals: answering ----------------------------------------------------------------------------

    def _has_replica(self, pending: _Pending) -> bool:
        model = self._models.get(pending.spec.key)
        return bool(model and model.replicas)

    def _fail(self, pending: _Pending, code: ErrorCode, message: str, out: list[Action]) -> None:
        if pending.state is _State.DONE:
            return
        out.append(_error(pending.origin, code, message))
        self._finish(pending)

    def _finish(self, pending: _Pending) -> None:
        pending.state = _State.DONE
        del self._live[pending.origin]
        # The deadline heap may hold this entry until its deadline: let go of the array frames now.
        pending.frames = []
        if len(self._deadlines) > 2 * len(self._live) + 1024:
            self._deadlines = [entry for entry in self._deadlines if entry[2].state is not _State.DONE]
            heapq.heapify(self._deadlines)

    def _forget_idle_models(self) -> None:
        idle = [key for key, model in self._models.items()
                if not model.groups and not model.replicas and not model.sessions and not model.queued]
        for key in idle:
            del self._models[key]


_CODES = {code.value for code in ErrorCode}


def _code(code: str) -> ErrorCode:
    return ErrorCode(code) if code in _CODES else ErrorCode.INTERNAL


def _error(origin: Origin, code: ErrorCode, message: str) -> Reply:
    return Reply(origin, error_header(origin[1], code, message))


def _item_header_bytes(request: Request) -> int:
    """At most how many bytes ``request`` adds to a batch header: its entry in ``items`` and its tensor
    descriptions, bounded by the size of the ``infer`` header they came in (measured once otherwise)."""
    described = request.header_bytes or len(pack_header({"tensors": request.metas}))
    session = request.params.session
    if session is None:
        return described + ITEM_HEADER_BYTES
    return described + SESSION_ITEM_HEADER_BYTES + len(str(session.id).encode())


def _oldest_ready(groups: dict[Signature, _Group], now: float) -> _Group | None:
    """The ready group whose next request ranks first; empty groups are dropped on the way."""
    best: _Group | None = None
    best_key: tuple[float, int] = (0.0, 0)
    empty: list[Signature] = []
    for signature, group in groups.items():
        head = group.head()
        if head is None:
            empty.append(signature)
            continue
        key = (head.rank, head.seq)
        if best is not None and key >= best_key:
            continue
        if group.rows >= group.spec.max_batch_size:
            best, best_key = group, key
            continue
        ready_at = group.ready_at()
        if ready_at is not None and now >= ready_at:
            best, best_key = group, key
    for signature in empty:
        del groups[signature]
    return best


def _most_free(model: _Model) -> _Replica | None:
    """The usable replica with the most free credit; among equals the least recently used, so load spreads."""
    best: _Replica | None = None
    best_free = 0
    for replica in model.replicas.values():
        free = replica.capacity - len(replica.batches)
        if free > 0 and not replica.draining and (
            best is None or free > best_free or (free == best_free and replica.last_used < best.last_used)
        ):
            best, best_free = replica, free
    return best


def _waited(pending: _Pending, now: float, had_replica: bool) -> str:
    waited_ms = (now - pending.arrival) * 1000.0
    if pending.state is _State.IN_FLIGHT:
        return f"the request's timeout passed after {waited_ms:.0f} ms, while a replica was running it"
    if pending.session is not None and pending.session.replica is None:
        return (f"the request's timeout passed after {waited_ms:.0f} ms: its session waits for a free session slot "
                f"of model {pending.spec.key}")
    if not had_replica:
        return f"the request's timeout passed after {waited_ms:.0f} ms: model {pending.spec.key} has no ready replica"
    return f"the request's timeout passed after {waited_ms:.0f} ms in the queue of model {pending.spec.key}"


def _signature(metas: Sequence[TensorMeta], ragged: bool) -> Signature:
    if len(metas) == 1 and not ragged:  # the common case, on the request path: no generator
        meta = metas[0]
        return ((meta["name"], meta["dtype"], tuple(meta["shape"][1:])),)
    if ragged:
        # Items travel as a list per input: only names, dtypes and ranks must agree.
        return tuple((meta["name"], meta["dtype"], (-1,) * (len(meta["shape"]) - 1)) for meta in metas)
    return tuple((meta["name"], meta["dtype"], tuple(meta["shape"][1:])) for meta in metas)


def _check_inputs(spec: ModelSpec, request: Request) -> tuple[int, Signature] | str:
    """(rows, signature) of a request, or why it cannot go to ``spec``'s model.

    Puts the request's tensors in name order, so every request of a group lists them alike and a
    replica may concatenate them by position.
    """
    metas = request.metas
    if not metas:
        return "a request needs at least one tensor"
    if len(metas) != len(request.frames):
        return f"{len(metas)} tensors described but {len(request.frames)} frames given"
    if len(metas) > 1:
        names = [meta["name"] for meta in metas]
        if any(a >= b for a, b in zip(names[:-1], names[1:], strict=True)):
            if len(set(names)) != len(names):
                return f"tensor names must be unique, got {names}"
            order = sorted(range(len(metas)), key=names.__getitem__)
            request.metas = metas = [metas[i] for i in order]
            request.frames = [request.frames[i] for i in order]
    rows = -1
    for meta in metas:
        shape = meta["shape"]
        if not shape or shape[0] < 1:
            return f"tensor {meta['name']!r} has shape {shape}; its leading (batch) dimension must be at least 1"
        if rows == -1:
            rows = shape[0]
        elif shape[0] != rows:
            return f"tensors disagree on the batch dimension: {[meta['shape'][0] for meta in metas]}"
    if spec.inputs:
        problem = _match_spec(spec, metas)
        if problem:
            return problem
    return rows, _signature(metas, spec.ragged_batches)


def _match_spec(spec: ModelSpec, metas: Sequence[TensorMeta]) -> str | None:
    """Why the tensors do not fit the inputs the spec declares (shapes there leave out the batch dimension)."""
    declared = {tensor.name: tensor for tensor in spec.inputs}
    names = {meta["name"] for meta in metas}
    if names != declared.keys():
        return f"inputs are {sorted(declared)}, the request has {sorted(names)}"
    for meta in metas:
        tensor = declared[meta["name"]]
        dtype = DATATYPE_TO_DTYPE.get(tensor.datatype)
        if dtype is not None and meta["dtype"] != dtype:
            return f"input {tensor.name!r} is {dtype}, the request sent {meta['dtype']}"
        dims = meta["shape"][1:]
        if len(dims) != len(tensor.shape) or any(
            want not in (-1, got) for want, got in zip(tensor.shape, dims, strict=True)
        ):
            declared_shape = ", ".join(map(str, ["batch", *tensor.shape]))
            return f"input {tensor.name!r} has shape [{declared_shape}], the request sent {meta['shape']}"
    return None
