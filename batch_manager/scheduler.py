"""Dynamic batching: which requests travel together, to which replica, and when.

The scheduler is pure logic. The caller passes the clock into every call and performs the
actions it returns (``Dispatch`` a batch to a replica, send a ``Reply`` to a bridge), so the
service owns every socket and tests drive the scheduler deterministically.

The model is Triton's dynamic batcher:

* Requests are grouped per model version and *signature* (tensor names, dtypes and
  non-batch dimensions): only requests of one group can be concatenated along axis 0.
* A group is ready when it holds ``max_batch_size`` rows, or when its oldest request has
  waited ``max_batch_delay_ms``.
* A ready group is dispatched when a replica of its model version has credit: a replica
  holds at most ``capacity`` unanswered batches. Without credit requests keep queueing,
  so the next batch is bigger; batching adapts to load by itself.

Every submitted request gets exactly one reply (its result or an error), unless its bridge
cancels it.
"""

from __future__ import annotations

import enum
import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from batch_manager.messages import Origin, ReplicaId, TensorMeta, error_header, reply_header
from inferoxy import protocol
from inferoxy.protocol import ErrorCode
from model_manager.spec import DATATYPE_TO_DTYPE, ModelSpec
from model_manager.store import Registry

DEFAULT_MAX_QUEUE_SIZE = 10_000

# (name, dtype, non-batch dims) of every tensor, sorted by name.
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]


@dataclass(slots=True)
class Request:
    """An ``infer`` as the scheduler needs it. ``frames`` are opaque: the scheduler never reads array bytes."""

    origin: Origin
    model: str
    version: str | None
    metas: list[TensorMeta]
    frames: list[Any]
    deadline: float


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
    items: list[dict[str, int]]
    metas: list[TensorMeta]
    frames: list[Any]

    def header(self) -> dict[str, Any]:
        return {
            "t": protocol.BATCH,
            "replica": self.replica,
            "batch": self.batch_id,
            "model": self.model,
            "version": self.version,
            "items": self.items,
            "tensors": self.metas,
        }


Action = Reply | Dispatch


class _State(enum.Enum):
    QUEUED = 1
    IN_FLIGHT = 2
    DONE = 3


class _Pending:
    """A request the scheduler holds until it is answered."""

    __slots__ = ("seq", "origin", "spec", "group", "metas", "frames", "rows", "arrival", "deadline", "state")

    def __init__(self, seq: int, request: Request, spec: ModelSpec, group: _Group, rows: int, now: float) -> None:
        self.seq = seq  # also the item id replicas see: bridges' ids never leave the batch manager
        self.origin = request.origin
        self.spec = spec
        self.group = group
        self.metas = request.metas
        self.frames = request.frames
        self.rows = rows
        self.arrival = now
        self.deadline = request.deadline
        self.state = _State.QUEUED


class _Group:
    """Requests of one model version and signature, in arrival order."""

    __slots__ = ("spec", "queue", "rows")

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        # Answered requests (deadline, cancel) stay here until they reach the head; ``rows`` counts live ones.
        self.queue: deque[_Pending] = deque()
        self.rows = 0

    def head(self) -> _Pending | None:
        queue = self.queue
        while queue and queue[0].state is not _State.QUEUED:
            queue.popleft()
        return queue[0] if queue else None

    def ready_at(self, head: _Pending) -> float:
        # The delay counts from the oldest request's arrival: a per-group deadline, not a global tick.
        return head.arrival + self.spec.max_batch_delay_ms / 1000.0


class _Replica:
    __slots__ = ("id", "model_key", "capacity", "batches", "last_used")

    def __init__(self, replica_id: ReplicaId, model_key: str, capacity: int) -> None:
        self.id = replica_id
        self.model_key = model_key
        self.capacity = capacity
        self.batches: dict[int, _Batch] = {}
        self.last_used = 0

    @property
    def free(self) -> int:
        return self.capacity - len(self.batches)


class _Batch:
    __slots__ = ("id", "replica", "requests")

    def __init__(self, batch_id: int, replica: _Replica, requests: list[_Pending]) -> None:
        self.id = batch_id
        self.replica = replica
        self.requests = requests


class _Model:
    """One model version: its groups, its replicas and how many of its requests wait."""

    __slots__ = ("groups", "replicas", "queued")

    def __init__(self) -> None:
        self.groups: dict[Signature, _Group] = {}
        self.replicas: dict[ReplicaId, _Replica] = {}
        self.queued = 0


class Scheduler:
    """Batches requests per model version and hands batches to replicas with credit.

    ``registry`` is the view of the model registry requests are checked against; until one
    is set every request is answered ``not_ready``. ``max_queue_size`` bounds the requests
    queued per model version; beyond it a request is answered ``overloaded`` at once.
    """

    def __init__(self, registry: Registry | None = None, *, max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE) -> None:
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        self._registry = registry
        self._max_queue_size = max_queue_size
        self._models: dict[str, _Model] = {}
        self._replicas: dict[ReplicaId, _Replica] = {}
        self._batches: dict[int, _Batch] = {}
        self._live: dict[Origin, _Pending] = {}
        self._deadlines: list[tuple[float, int, _Pending]] = []
        self._seq = 0
        self._batch_seq = 0
        self._use_seq = 0

    # --- inputs --------------------------------------------------------------------------------------

    def set_registry(self, registry: Registry, now: float) -> list[Action]:
        """Take a new registry view. Queued requests of a model version that was removed fail ``unknown_model``."""
        self._registry = registry
        out: list[Action] = []
        for key, model in self._models.items():
            spec = registry.specs.get(key)
            for group in model.groups.values():
                if spec is not None:
                    group.spec = spec
                    continue
                for pending in group.queue:
                    if pending.state is _State.QUEUED:
                        model.queued -= 1
                        self._fail(pending, ErrorCode.UNKNOWN_MODEL, f"model {key} was removed from the registry", out)
                group.queue.clear()
                group.rows = 0
        self._pump_all(now, out)
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
        model = self._models.get(spec.key)
        if model is None:
            model = self._models[spec.key] = _Model()
        if model.queued >= self._max_queue_size:
            out.append(_error(request.origin, ErrorCode.OVERLOADED,
                              f"model {spec.key} has {model.queued} requests queued, the limit"))
            return out
        if request.deadline <= now:
            out.append(_error(request.origin, ErrorCode.DEADLINE, "the request's timeout passed before it was queued"))
            return out

        group = model.groups.get(signature)
        if group is None:
            group = model.groups[signature] = _Group(spec)
        self._seq += 1
        pending = _Pending(self._seq, request, spec, group, rows, now)
        group.queue.append(pending)
        group.rows += rows
        model.queued += 1
        self._live[request.origin] = pending
        heapq.heappush(self._deadlines, (pending.deadline, pending.seq, pending))
        self._pump(model, now, out)
        return out

    def cancel(self, origin: Origin) -> None:
        """Forget a request without replying (its bridge gave up); a result that still comes is dropped."""
        pending = self._live.get(origin)
        if pending is None:
            return
        if pending.state is _State.QUEUED:
            self._unqueue(pending)
        self._finish(pending)

    def replica_up(self, replica_id: ReplicaId, model: str, version: str, capacity: int, now: float) -> list[Action]:
        """A replica can take batches.

        An announcement of a replica already known means a new incarnation: replica ids are reused
        (``instance-model-version-n``) and a restarted task manager announces its fresh replicas under
        the old ids. The batches the old one held will never be answered, so they fail ``replica_lost``
        now instead of holding its credit for ever.
        """
        out: list[Action] = []
        key = f"{model}/{version}"
        known = self._replicas.get(replica_id)
        if known is not None:
            self._drop_replica(known, f"replica {replica_id!r} was started again; the batches it held are lost", out)
        replica = self._replicas[replica_id] = _Replica(replica_id, key, max(capacity, 0))
        model_entry = self._model(key)
        model_entry.replicas[replica_id] = replica
        self._pump(model_entry, now, out)
        return out

    def replica_down(self, replica_id: ReplicaId, reason: str, now: float) -> list[Action]:
        """A replica is gone: the requests in its batches fail ``replica_lost``."""
        out: list[Action] = []
        replica = self._replicas.get(replica_id)
        if replica is not None:
            self._drop_replica(replica, reason, out)
        return out

    def on_result(
        self,
        replica_id: ReplicaId,
        batch_id: int,
        item_counts: Sequence[int],
        metas: Sequence[TensorMeta],
        frames: Sequence[Any],
        now: float,
    ) -> list[Action]:
        """A batch's outputs. Item ``i`` owns the next ``item_counts[i]`` tensors and answers the ``i``-th request."""
        out: list[Action] = []
        batch = self._take_batch(replica_id, batch_id)
        if batch is None:
            return out
        if len(item_counts) != len(batch.requests) or sum(item_counts) != len(metas) or len(metas) != len(frames):
            message = (f"replica {replica_id!r} answered batch {batch_id} of {len(batch.requests)} items "
                       f"with {len(item_counts)} items and {len(frames)} tensors")
            for pending in batch.requests:
                self._fail(pending, ErrorCode.INTERNAL, message, out)
        else:
            start = 0
            for pending, count in zip(batch.requests, item_counts, strict=True):
                end = start + count
                if pending.state is _State.IN_FLIGHT:
                    spec = pending.spec
                    header = reply_header(pending.origin[1], spec.name, spec.version, list(metas[start:end]))
                    out.append(Reply(pending.origin, header, list(frames[start:end])))
                    self._finish(pending)
                start = end
        self._pump(self._model(batch.replica.model_key), now, out)
        return out

    def on_failed(self, replica_id: ReplicaId, batch_id: int, code: str, message: str, now: float) -> list[Action]:
        """A batch failed as a whole: each of its requests gets the error."""
        out: list[Action] = []
        batch = self._take_batch(replica_id, batch_id)
        if batch is None:
            return out
        error_code = ErrorCode(code) if code in _CODES else ErrorCode.INTERNAL
        for pending in batch.requests:
            self._fail(pending, error_code, message, out)
        self._pump(self._model(batch.replica.model_key), now, out)
        return out

    def tick(self, now: float) -> list[Action]:
        """Let time pass: fail requests whose deadline passed, send batches whose delay ran out."""
        out: list[Action] = []
        # Not a local alias: answering a request may compact (replace) the heap.
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, pending = heapq.heappop(self._deadlines)
            if pending.state is _State.QUEUED:
                self._unqueue(pending)
                self._fail(pending, ErrorCode.DEADLINE, _waited(pending, now, self._has_replica(pending)), out)
            elif pending.state is _State.IN_FLIGHT:
                # Its batch keeps the replica's credit until the replica answers or is declared down.
                self._fail(pending, ErrorCode.DEADLINE, _waited(pending, now, True), out)
        self._pump_all(now, out)
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
        for replica in self._replicas.values():
            replica.batches.clear()
        self._batches.clear()
        self._deadlines.clear()
        return out

    # --- what the caller asks --------------------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        """When ``tick`` next has something to do: a group's delay runs out, or a request's deadline passes."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].state is _State.DONE:
            heapq.heappop(deadlines)
        earliest = deadlines[0][0] if deadlines else None
        for model in self._models.values():
            # A group that waits for credit needs no timer: returning credit dispatches it.
            if not any(replica.free > 0 for replica in model.replicas.values()):
                continue
            for group in model.groups.values():
                head = group.head()
                if head is not None:
                    ready_at = group.ready_at(head)
                    if earliest is None or ready_at < earliest:
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

    # --- internals -----------------------------------------------------------------------------------

    def _model(self, key: str) -> _Model:
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = _Model()
        return model

    def _pump_all(self, now: float, out: list[Action]) -> None:
        for model in self._models.values():
            self._pump(model, now, out)

    def _pump(self, model: _Model, now: float, out: list[Action]) -> None:
        """Dispatch ready groups, oldest first, while a replica of this model version has credit."""
        if not model.groups or not model.replicas:
            return
        while True:
            replica = _most_free(model)
            if replica is None:
                return
            oldest: _Group | None = None
            oldest_seq = 0
            empty: list[Signature] = []
            for signature, group in model.groups.items():
                head = group.head()
                if head is None:
                    empty.append(signature)
                elif (group.rows >= group.spec.max_batch_size or now >= group.ready_at(head)) and (
                    oldest is None or head.seq < oldest_seq
                ):
                    oldest, oldest_seq = group, head.seq
            for signature in empty:
                del model.groups[signature]
            if oldest is None:
                return
            self._dispatch(model, oldest, replica, now, out)

    def _dispatch(self, model: _Model, group: _Group, replica: _Replica, now: float, out: list[Action]) -> None:
        """Send the group's oldest requests, up to max_batch_size rows, as one batch to ``replica``."""
        limit = group.spec.max_batch_size
        queue = group.queue
        taken: list[_Pending] = []
        rows = 0
        while queue:
            pending = queue[0]
            if pending.state is not _State.QUEUED:
                queue.popleft()
                continue
            if pending.deadline <= now:
                queue.popleft()
                self._dequeued(model, group, pending)
                self._fail(pending, ErrorCode.DEADLINE, _waited(pending, now, True), out)
                continue
            # Arrival order is kept: a request that does not fit waits for the next batch. The first one
            # always goes, even if max_batch_size shrank below its rows since it was queued.
            if taken and rows + pending.rows > limit:
                break
            queue.popleft()
            self._dequeued(model, group, pending)
            pending.state = _State.IN_FLIGHT
            taken.append(pending)
            rows += pending.rows
        if not taken:
            return
        self._batch_seq += 1
        self._use_seq += 1
        batch = _Batch(self._batch_seq, replica, taken)
        replica.batches[batch.id] = batch
        replica.last_used = self._use_seq
        self._batches[batch.id] = batch
        items = [{"id": pending.seq, "n": len(pending.metas)} for pending in taken]
        if len(taken) == 1:
            metas, frames = list(taken[0].metas), list(taken[0].frames)
        else:
            metas, frames = [], []
            for pending in taken:
                metas += pending.metas
                frames += pending.frames
        spec = group.spec
        out.append(Dispatch(replica.id, batch.id, spec.name, spec.version, items, metas, frames))

    def _dequeued(self, model: _Model, group: _Group, pending: _Pending) -> None:
        group.rows -= pending.rows
        model.queued -= 1

    def _unqueue(self, pending: _Pending) -> None:
        """Take a queued request out of the counts; its group drops the entry when it reaches the head."""
        self._dequeued(self._models[pending.spec.key], pending.group, pending)

    def _take_batch(self, replica_id: ReplicaId, batch_id: int) -> _Batch | None:
        batch = self._batches.get(batch_id)
        # Batch ids are never reused, so an unknown one is a late answer for a replica declared down.
        if batch is None or batch.replica.id != replica_id:
            return None
        del self._batches[batch_id]
        del batch.replica.batches[batch_id]
        return batch

    def _drop_replica(self, replica: _Replica, reason: str, out: list[Action]) -> None:
        del self._replicas[replica.id]
        model = self._models.get(replica.model_key)
        if model is not None:
            model.replicas.pop(replica.id, None)
        for batch in replica.batches.values():
            del self._batches[batch.id]
            for pending in batch.requests:
                self._fail(pending, ErrorCode.REPLICA_LOST, reason, out)
        replica.batches.clear()

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
        idle = [key for key, model in self._models.items() if not model.groups and not model.replicas]
        for key in idle:
            del self._models[key]


_CODES = {code.value for code in ErrorCode}


def _error(origin: Origin, code: ErrorCode, message: str) -> Reply:
    return Reply(origin, error_header(origin[1], code, message))


def _most_free(model: _Model) -> _Replica | None:
    """The replica with the most free credit; among equals the least recently used, so load spreads."""
    best: _Replica | None = None
    for replica in model.replicas.values():
        if replica.free > 0 and (
            best is None
            or replica.free > best.free
            or (replica.free == best.free and replica.last_used < best.last_used)
        ):
            best = replica
    return best


def _waited(pending: _Pending, now: float, had_replica: bool) -> str:
    waited_ms = (now - pending.arrival) * 1000.0
    if pending.state is _State.IN_FLIGHT:
        return f"the request's timeout passed after {waited_ms:.0f} ms, while a replica was running it"
    if not had_replica:
        return f"the request's timeout passed after {waited_ms:.0f} ms: model {pending.spec.key} has no ready replica"
    return f"the request's timeout passed after {waited_ms:.0f} ms in the queue of model {pending.spec.key}"


def _signature(metas: Sequence[TensorMeta]) -> Signature:
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
    return rows, _signature(metas)


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
