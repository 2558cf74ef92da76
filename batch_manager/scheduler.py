"""Dynamic and sequence batching: which requests travel together, to which replica, and when.

(About 425 lines, a third of them docstrings: this facade is the scheduler's whole public API, one
method per event, each composing the parts below; splitting it would split that API.)

The scheduler is pure logic. The caller passes the clock into every call and performs the
actions it returns (``Dispatch`` a batch to a replica, send a ``Reply`` to a bridge), so the
service owns every socket and tests drive the scheduler deterministically. docs/BATCHING.md
explains every rule; in short it follows Triton's dynamic and sequence batchers.

``Scheduler`` is a thin facade: each public call validates, then composes the parts, each with one job
and each sharing the records in ``state.Book``:

* ``batching``  per model version and signature groups, batch forming within the bus's limits, credit;
* ``wakeups``   a heap of group ready times, so ``next_wakeup`` costs O(1) amortised, not a scan;
* ``sessions``  sequence batching: slots pinned to replicas, one request of a session at a time, idle ends;
* ``admission`` queue bounds, deadlines (a heap), priorities with aging, answering exactly once;
* ``lifecycle`` the registry view, replicas up / draining / down, retries, refusal, drained models;
* ``inputs``    stateless checks of a request's tensors and its share of a batch header.

Every submitted request gets exactly one reply (its result or an error), unless its bridge
cancels it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batch_manager.actions import Action, Dispatch, ItemError, ModelDrained, Reply, Request, error_code, error_reply
from batch_manager.admission import DEFAULT_MAX_QUEUE_SIZE, DEFAULT_PRIORITY_AGING_S, Admission
from batch_manager.batching import DEFAULT_MAX_BATCH_BYTES, Batching
from batch_manager.inputs import MAX_REPLICA_ID_BYTES, check_inputs, header_room, item_header_bytes
from batch_manager.lifecycle import REFUSING_STATES, Lifecycle
from batch_manager.messages import Origin, ReplicaId, TensorMeta
from batch_manager.params import SessionId
from batch_manager.sessions import Sessions
from batch_manager.state import Book, Model, ModelCounts, Session, Signature, State
from batch_manager.wakeups import Wakeups, scan_groups
from inferoxy import messages as m
from inferoxy.protocol import ErrorCode
from inferoxy.wire import MAX_HEADER_BYTES
from model_manager.spec import ModelSpec, ServingState
from model_manager.store import Registry

__all__ = ["DEFAULT_MAX_BATCH_BYTES", "DEFAULT_MAX_QUEUE_SIZE", "DEFAULT_PRIORITY_AGING_S", "REFUSING_STATES",
           "Action", "Dispatch", "ItemError", "ModelCounts", "ModelDrained", "Reply", "Request",
           "Scheduler"]


# What a request that may queue is: its spec, model version, rows, signature and share of a batch header.
_Checked = tuple[ModelSpec, Model, int, Signature, int]


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
        book = self._book = Book(registry)
        admission = self._admission = Admission(book, max_queue_size=max_queue_size,
                                                priority_aging_s=priority_aging_s)
        wakeups = self._wakeups = Wakeups(book)
        sessions = self._sessions = Sessions(book, admission, wakeups)
        batching = self._batching = Batching(book, admission, wakeups, sessions, max_header_bytes=max_header_bytes,
                                             max_batch_bytes=max_batch_bytes)
        self._lifecycle = Lifecycle(book, admission, sessions, batching, wakeups)
        self._cold = False

    @property
    def registry(self) -> Registry | None:
        """The registry view requests are checked against."""
        return self._book.registry

    # --- inputs --------------------------------------------------------------------------------------

    def set_registry(self, registry: Registry, now: float) -> list[Action]:
        """Take a new registry view.

        A model version that was removed takes no new request, but its queued requests are still served
        (they fail ``unknown_model`` at once only if no replica of it takes batches); ``ModelDrained`` says
        when it holds nothing more. A model version added again is served as before.
        """
        out: list[Action] = []
        self._book.touch_all()
        self._lifecycle.set_registry(registry, out)
        self._batching.pump_all(now, out)
        self._lifecycle.check_drained(out)
        return out

    def submit(self, request: Request, now: float) -> list[Action]:
        """Validate and queue ``request``; a batch leaves at once if this made its group ready."""
        checked = self._check(request, now)
        if isinstance(checked, Reply):
            return [checked]
        spec, model, rows, signature, header_bytes = checked
        out: list[Action] = []
        session: Session | None = None
        if spec.stateful:
            assert request.params.session is not None  # _check made sure
            opened = self._sessions.open(model, spec, request.params.session, now)
            if isinstance(opened, str):
                return [error_reply(request.origin, ErrorCode.SESSION_LOST, opened)]
            session = opened
        pending = self._admission.admit(request, spec, model, signature, rows, header_bytes, now)
        if model.queued == 1 and not model.has_credit():
            self._cold = True  # the first to wait with no replica (or no share of one) at all: ``take_cold_demand``
        if session is None:
            group = self._batching.enqueue(model, pending, timer=False)
            self._batching.pump(model, now, out)
            if pending.state is State.QUEUED:  # it waits: its group's timer may have to run earlier
                self._wakeups.pushed(group, pending)
            return out
        self._sessions.queue(session, pending, now, out)
        self._batching.pump(model, now, out)
        return out

    def _check(self, request: Request, now: float) -> _Checked | Reply:
        """Where a request queues and what it weighs, or the error it is answered with at once."""
        origin = request.origin
        if origin in self._book.live:
            # Its own id is the only address we have; the request already holding it keeps going.
            return error_reply(origin, ErrorCode.BAD_INPUT, f"request id {origin[1]} is already in flight")
        registry = self._book.registry
        if registry is None:
            return error_reply(origin, ErrorCode.NOT_READY, "the model registry has not been loaded yet")
        spec = registry.get(request.model, request.version)
        if spec is None:
            what = request.model if request.version is None else f"{request.model} version {request.version}"
            return error_reply(origin, ErrorCode.UNKNOWN_MODEL, f"no model {what} is registered")
        checked = check_inputs(spec, request)
        if isinstance(checked, str):
            return error_reply(origin, ErrorCode.BAD_INPUT, f"model {spec.key}: {checked}")
        rows, signature = checked
        if rows > spec.max_batch_size:
            return error_reply(origin, ErrorCode.BAD_INPUT,
                               f"model {spec.key}: {rows} rows exceed max_batch_size {spec.max_batch_size}")
        if spec.stateful and request.params.session is None:
            return error_reply(origin, ErrorCode.BAD_INPUT,
                               f"model {spec.key} is stateful: every request needs the parameter 'sequence_id'")
        header_bytes = item_header_bytes(request)
        max_header_bytes = self._batching.max_header_bytes
        if header_bytes > header_room(max_header_bytes, spec.name, spec.version, MAX_REPLICA_ID_BYTES):
            return error_reply(origin, ErrorCode.BAD_INPUT,
                               f"model {spec.key}: the request's header ({header_bytes} bytes with its entry in a "
                               f"batch) does not fit in a batch header (the bus's limit is {max_header_bytes} "
                               "bytes); send shorter tensor names or fewer parameters")
        refusal = self._lifecycle.refusal(spec.key)
        if refusal is not None:
            return error_reply(origin, ErrorCode.NOT_READY, refusal)
        model = self._book.model(spec.key)
        if model.queued >= self._admission.queue_limit(spec):
            return error_reply(origin, ErrorCode.OVERLOADED, f"model {spec.key} has {model.queued} requests queued, "
                                                             "the limit")
        request.deadline = self._admission.deadline(request, spec, now)
        if request.deadline <= now:
            return error_reply(origin, ErrorCode.DEADLINE, "the request's timeout passed before it was queued")
        return spec, model, rows, signature, header_bytes

    def cancel(self, origin: Origin, now: float = 0.0) -> list[Action]:
        """Forget a request without replying (its bridge gave up); a result that still comes is dropped."""
        out: list[Action] = []
        pending = self._book.live.get(origin)
        if pending is None:
            return out
        queued = pending.state is State.QUEUED
        self._book.touched.add(pending.spec.key)
        if queued:
            self._admission.unqueue(pending)
        self._admission.finish(pending)
        if queued and pending.session is not None:
            self._sessions.item_gone(pending, now, out)
            self._batching.pump(self._book.model(pending.spec.key), now, out)
        self._lifecycle.check_drained(out)
        return out

    def replica_up(self, replica_id: ReplicaId, model: str, version: str, capacity: int, now: float) -> list[Action]:
        """A replica can take batches.

        An announcement of a replica already known means a new incarnation: replica ids are reused
        (``instance-model-version-n``) and a restarted task manager announces its fresh replicas under
        the old ids. The batches the old one held will never be answered, so they fail ``replica_lost``
        now instead of holding its credit for ever (its sessions are lost).
        """
        out: list[Action] = []
        model_entry = self._lifecycle.replica_up(replica_id, f"{model}/{version}", capacity, now, out)
        self._batching.pump(model_entry, now, out)
        self._lifecycle.check_drained(out)
        return out

    def replica_credit(self, replica_id: ReplicaId, capacity: int, now: float) -> list[Action]:
        """This batch manager's share of a replica moved (``credit``, when several share the task manager): at
        most ``capacity`` batches there from now on. 0 parks it; batches it holds beyond are still answered."""
        out: list[Action] = []
        replica = self._book.replicas.get(replica_id)
        if replica is None:
            return out
        replica.capacity = max(capacity, 0)
        self._batching.pump(self._book.model(replica.model_key), now, out)
        return out

    def replica_draining(self, replica_id: ReplicaId, reason: str, now: float,
                         sessions_grace_s: float | None = None) -> list[Action]:
        """A planned stop: no new batch goes to the replica, results of those it holds are still taken.

        Its sessions cannot go on anywhere else, so they end now: queued requests of theirs get
        ``session_lost``; a request of theirs the replica already holds is still answered by it. With
        ``sessions_grace_s`` (a scale-down) it only retires: its sessions go on there, nothing else goes to it,
        until the task manager drains it for good.
        """
        out: list[Action] = []
        replica = self._book.replicas.get(replica_id)
        if replica is None or replica.draining:
            return out
        if sessions_grace_s:
            replica.retiring = True
        else:
            self._lifecycle.stop_dispatching(replica, reason, out)
        self._lifecycle.refuse_if_bare(replica.model_key, out)
        self._batching.pump(self._book.model(replica.model_key), now, out)
        self._lifecycle.check_drained(out)
        return out

    def replica_down(self, replica_id: ReplicaId, reason: str, now: float) -> list[Action]:
        """A replica is gone: stateless batches it held are retried once elsewhere, the rest fail."""
        out: list[Action] = []
        replica = self._book.replicas.get(replica_id)
        if replica is not None:
            self._lifecycle.replica_down(replica, reason, now, out)
            self._batching.pump(self._book.model(replica.model_key), now, out)
        self._lifecycle.check_drained(out)
        return out

    def model_status(self, model: str, version: str, state: ServingState, reason: str | None,
                     now: float) -> list[Action]:
        """The task manager's view of a model version changed. In a refusing state with no replica to take
        batches, its queued requests are answered ``not_ready`` now rather than at their deadline."""
        out: list[Action] = []
        key = f"{model}/{version}"
        self._book.touched.add(key)
        self._lifecycle.model_status(key, state, reason, out)
        model_entry = self._book.models.get(key)
        if model_entry is not None:
            self._batching.pump(model_entry, now, out)
        self._lifecycle.check_drained(out)
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
        batch = self._batching.take_batch(replica_id, batch_id)
        if batch is None:
            return out
        admission, sessions = self._admission, self._sessions
        if len(item_counts) != len(batch.requests) or sum(item_counts) != len(metas) or len(metas) != len(frames) \
                or (item_errors is not None and len(item_errors) != len(item_counts)):
            message = (f"replica {replica_id!r} answered batch {batch_id} of {len(batch.requests)} items "
                       f"with {len(item_counts)} items and {len(frames)} tensors")
            for pending in batch.requests:
                admission.fail(pending, ErrorCode.INTERNAL, message, out)
                sessions.item_done(pending, now, out)
        else:
            start = 0
            for index, (pending, count) in enumerate(zip(batch.requests, item_counts, strict=True)):
                end = start + count
                problem = item_errors[index] if item_errors is not None else None
                if pending.state is State.IN_FLIGHT:
                    if problem is not None:
                        admission.fail(pending, error_code(problem[0]), problem[1], out)
                    else:
                        spec = pending.spec
                        header = m.Reply(pending.origin[1], spec.name, spec.version, list(metas[start:end]))
                        out.append(Reply(pending.origin, header, list(frames[start:end])))
                        admission.finish(pending)
                if pending.session is not None:
                    sessions.item_done(pending, now, out, lost=problem is not None
                                       and problem[0] == ErrorCode.SESSION_LOST.value)
                start = end
        self._batching.pump(self._book.model(batch.replica.model_key), now, out)
        self._lifecycle.check_drained(out)
        return out

    def on_failed(self, replica_id: ReplicaId, batch_id: int, code: str, message: str, now: float) -> list[Action]:
        """A batch failed as a whole: each of its requests gets the error (``replica_lost``: retried once)."""
        out: list[Action] = []
        batch = self._batching.take_batch(replica_id, batch_id)
        if batch is None:
            return out
        error = error_code(code)
        if error is ErrorCode.REPLICA_LOST:
            self._lifecycle.batch_lost(batch, message, now, out)
        else:
            for pending in batch.requests:
                self._admission.fail(pending, error, message, out)
                self._sessions.item_done(pending, now, out)
        self._batching.pump(self._book.model(batch.replica.model_key), now, out)
        self._lifecycle.check_drained(out)
        return out

    def tick(self, now: float) -> list[Action]:
        """Let time pass: fail requests whose deadline passed, reap idle sessions, send batches whose delay ran out.

        Only the model versions something happened to are pumped: every other one was pumped when it last
        changed, and a group's delay running out is the wake-up heap's to say.
        """
        out: list[Action] = []
        touched: dict[str, Model] = {}

        def gone(pending: Any, now: float, out: list[Action]) -> None:
            self._sessions.item_gone(pending, now, out)
            touched[pending.spec.key] = self._book.model(pending.spec.key)

        self._admission.expire(now, out, gone)
        for model in self._sessions.reap_idle(now, out):
            touched[model.key] = model
        due = self._wakeups.pop_due(now)
        for group in due:
            touched[group.model.key] = group.model
        for key, model in touched.items():
            if self._book.models.get(key) is model:
                self._batching.pump(model, now, out)
        for group in due:
            self._wakeups.rearm(group)
        self._lifecycle.check_drained(out)
        self._book.forget_idle()
        return out

    def fail_all(self, code: ErrorCode, message: str) -> list[Action]:
        """Answer every request still held (the batch manager is stopping); replicas' credit is returned."""
        out: list[Action] = []
        self._book.touch_all()
        self._book.changed.update(self._book.models)
        self._admission.fail_all(code, message, out)
        for model in self._book.models.values():
            model.groups.clear()
            model.queued = 0
            model.sessions.clear()
            model.waiting.clear()
            model.parked.clear()
        for replica in self._book.replicas.values():
            replica.batches.clear()
            replica.groups.clear()
            replica.sessions.clear()
            replica.parked.clear()
        self._book.batches.clear()
        self._sessions.clear()
        self._wakeups.clear()
        return out

    # --- what the caller asks --------------------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        """When ``tick`` next has something to do: a group's delay runs out, a deadline passes, a session idles out.

        Each comes from a lazy heap: O(1) amortised, however many model versions and groups there are."""
        return _earliest(_earliest(self._admission.next_deadline(), self._sessions.next_idle()),
                         self._wakeups.next_due())

    def next_wakeup_by_scan(self) -> float | None:
        """``next_wakeup`` found by scanning every group, as before the wake-up heap: the reference the tests
        hold the heap to, and the "before" figure of bench/bench_scheduler.py. Not for the service."""
        return _earliest(_earliest(self._admission.next_deadline(), self._sessions.next_idle()),
                         scan_groups(self._book))

    def queued(self, model_key: str | None = None) -> int:
        """Requests waiting for a batch, for one model version (``name/version``) or all."""
        models = self._book.models
        if model_key is not None:
            model = models.get(model_key)
            return model.queued if model else 0
        return sum(model.queued for model in models.values())

    def take_changed(self) -> list[tuple[str, ModelCounts]]:
        """The model versions whose counts may have moved since the last call, with their counts now (zero once
        forgotten). The service sets its gauges from these: the cost follows what changed, not the model count."""
        book = self._book
        changed = [(key, book.counts(key)) for key in book.changed]
        book.changed.clear()
        return changed

    def take_cold_demand(self) -> bool:
        """Whether requests started waiting for a model version with no replica at all (scaled to zero), or none
        this batch manager has a share of (credit 0 everywhere), since the last call: the service then reports
        its load at once, so the task manager starts a replica, or gives it a share, without delay."""
        cold, self._cold = self._cold, False
        return cold

    def load(self) -> dict[str, tuple[int, int]]:
        """Each model version with requests queued or batches at replicas: (requests queued, batches at replicas).
        What the batch manager reports to the task manager (``m.Load``); a scan, for a periodic report."""
        book = self._book
        loads: dict[str, tuple[int, int]] = {}
        for key in book.models:
            queued, in_flight, _sessions = book.counts(key)
            if queued or in_flight:
                loads[key] = (queued, in_flight)
        return loads

    def counts(self, model_key: str) -> ModelCounts:
        return self._book.counts(model_key)

    def model_of(self, replica_id: ReplicaId) -> str | None:
        """The model version (``name/version``) a known replica serves."""
        replica = self._book.replicas.get(replica_id)
        return replica.model_key if replica is not None else None

    def pending(self) -> int:
        """Requests not answered yet, queued or in flight."""
        return len(self._book.live)

    def batches_in_flight(self, replica_id: ReplicaId | None = None) -> int:
        if replica_id is None:
            return len(self._book.batches)
        replica = self._book.replicas.get(replica_id)
        return len(replica.batches) if replica else 0

    def sessions(self, model_key: str) -> dict[SessionId, ReplicaId | None]:
        """Open sessions of a model version and the replica each is pinned to (None: waiting for a slot)."""
        model = self._book.models.get(model_key)
        if model is None:
            return {}
        return {sid: (s.replica.id if s.replica else None) for sid, s in model.sessions.items()}

    def refusing(self, model_key: str) -> bool:
        """Whether requests for a model version (``name/version``) are refused ``not_ready`` rather than queued."""
        return self._lifecycle.refusal(model_key) is not None

    def knows_batch(self, replica_id: ReplicaId, batch_id: int) -> bool:
        """Whether an answer for the batch is expected: it is at ``replica_id``, or was settled when that
        replica went (the task manager answers such a batch too, after ``replica_down``). False: nothing
        sent it, so the answer is a peer's bug or a mix-up worth a loud log line."""
        return self._batching.knows_batch(replica_id, batch_id)

    def is_draining(self, replica_id: ReplicaId) -> bool:
        replica = self._book.replicas.get(replica_id)
        return replica is not None and replica.draining

    def credit(self, replica_id: ReplicaId) -> int:
        """The batches this batch manager may have at a replica at once (its share: ``replica_up``, ``credit``)."""
        replica = self._book.replicas.get(replica_id)
        return replica.capacity if replica else 0

    def sessions_on(self, replica_id: ReplicaId) -> int:
        """Session slots taken on a replica."""
        replica = self._book.replicas.get(replica_id)
        return len(replica.sessions) if replica else 0


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a <= b else b
