"""Model lifecycle: the registry view, replicas up, draining and down, refusal, retries, and drained models.

* A replica known dead (``replica_down``, or any batch of it failed ``replica_lost``) never gets credit
  back; a stateless batch it held is retried once on another replica, everything else of it fails.
* The task manager reports each model version's serving state. While it is ``failed``, ``unschedulable``
  or ``stopped`` and no replica of it takes batches, waiting is pointless: its queued requests, and new
  ones, are answered ``not_ready`` with the reason at once.
* A model version removed from the registry takes no new request, but the requests it holds are still
  served by its replicas; once none is queued or in flight, ``ModelDrained`` says so. With no replica
  left that takes batches, its queued requests fail at once.

Methods here change the records and answer requests; the facade pumps the model versions afterwards.
"""

from __future__ import annotations

from batch_manager.actions import Action, ModelDrained
from batch_manager.admission import Admission
from batch_manager.batching import Batching
from batch_manager.messages import ReplicaId
from batch_manager.sessions import Sessions
from batch_manager.state import Batch, Book, Model, Replica, State
from batch_manager.wakeups import Wakeups
from inferoxy.protocol import ErrorCode
from model_manager.spec import ServingState
from model_manager.store import Registry

# Serving states in which no replica is on its way, so a request with no replica to go to is refused.
# ``stopped``: max_replicas is 0 (unloaded) and no replica is running. (``idle``, scaled to zero, queues instead.)
REFUSING_STATES: frozenset[str] = frozenset({"failed", "unschedulable", "stopped"})


class Lifecycle:
    def __init__(self, book: Book, admission: Admission, sessions: Sessions, batching: Batching,
                 wakeups: Wakeups) -> None:
        self._book = book
        self._admission = admission
        self._sessions = sessions
        self._batching = batching
        self._wakeups = wakeups

    def set_registry(self, registry: Registry, out: list[Action]) -> None:
        book = self._book
        previous = book.registry
        book.registry = registry
        deleting = book.deleting
        for key in [key for key in deleting if key in registry.specs]:
            del deleting[key]  # added again before it drained
        if previous is not None:
            for key, old_spec in previous.specs.items():
                if key not in registry.specs and key not in deleting:
                    deleting[key] = old_spec
        for key, model in book.models.items():
            spec = registry.specs.get(key)
            if spec is None:
                if key in deleting and not any(not r.draining for r in model.replicas.values()):
                    self.fail_queued(model, ErrorCode.UNKNOWN_MODEL, f"model {key} was removed from the registry",
                                     out)
                continue
            for group in model.all_groups():
                if group.spec is not spec:
                    group.spec = spec
                    self._wakeups.rearm(group)  # its delay may be shorter now

    def replica_up(self, replica_id: ReplicaId, key: str, capacity: int, now: float, out: list[Action]) -> Model:
        """A replica can take batches; an id already known is a new incarnation (the old one's batches are lost)."""
        known = self._book.replicas.get(replica_id)
        if known is not None:
            self._drop_replica(known, f"replica {replica_id!r} was started again; the batches it held are lost",
                               now, out, retry=False)
            if known.model_key != key:  # the id now serves another model version: the old one may be left bare
                self.refuse_if_bare(known.model_key, out)
        replica = self._book.replicas[replica_id] = Replica(replica_id, key, max(capacity, 0))
        model = self._book.model(key)
        model.replicas[replica_id] = replica
        self._sessions.place_waiting(model, now, out)
        return model

    def stop_dispatching(self, replica: Replica, reason: str, out: list[Action]) -> None:
        """No batch goes to ``replica`` any more (results of those it holds are still taken); its sessions
        cannot go on elsewhere, so they end: their queued requests get ``session_lost``."""
        if replica.draining:
            return
        replica.draining = True
        model = self._book.model(replica.model_key)
        message = f"the session's replica {replica.id!r} is stopping ({reason}); its state is gone"
        for session in list(replica.sessions.values()):
            self._sessions.lose(model, session, ErrorCode.SESSION_LOST, message, out, answer_in_flight=False)

    def replica_down(self, replica: Replica, reason: str, now: float, out: list[Action]) -> None:
        self._drop_replica(replica, reason, now, out, retry=True)
        self.refuse_if_bare(replica.model_key, out)

    def batch_lost(self, batch: Batch, message: str, now: float, out: list[Action]) -> None:
        """A batch failed ``replica_lost``: the replica is dead or going, so its credit must never come back,
        or the retry and the queue would be sent to it. ``replica_down`` (before or after) forgets it."""
        self.stop_dispatching(batch.replica, f"it lost batch {batch.id}: {message}", out)
        self._fail_lost_batch(self._book.model(batch.replica.model_key), batch, message, now, out, retry=True)
        self.refuse_if_bare(batch.replica.model_key, out)

    def model_status(self, key: str, state: ServingState, reason: str | None, out: list[Action]) -> None:
        self._book.status[key] = (state, reason)
        self.refuse_if_bare(key, out)

    # --- refusal and draining ------------------------------------------------------------------------------

    def refusal(self, key: str) -> str | None:
        """Why requests for ``key`` are refused now, or None while they may queue (on the request path: one
        dict look-up for a model in a hopeful state)."""
        book = self._book
        status = book.status.get(key)
        deleted = key in book.deleting
        if not deleted and (status is None or status[0] not in REFUSING_STATES):
            return None
        model = book.models.get(key)
        if model is not None and any(not replica.draining for replica in model.replicas.values()):
            return None  # a replica still takes batches: the state will say degraded soon enough
        if deleted:
            return f"model {key} was removed from the registry and has no replica left to serve its queued requests"
        assert status is not None
        state, reason = status
        return f"model {key} is {state} and has no ready replica: {reason or 'no reason given'}"

    def refuse_if_bare(self, key: str, out: list[Action]) -> None:
        """Answer every queued request of ``key`` ``not_ready`` if it is refusing: none would ever be served."""
        refusal = self.refusal(key)
        model = self._book.models.get(key)
        if refusal is not None and model is not None:
            self.fail_queued(model, ErrorCode.NOT_READY, refusal, out)

    def check_drained(self, out: list[Action]) -> None:
        """``ModelDrained`` for each removed model version with nothing queued and no batch at a replica."""
        deleting = self._book.deleting
        if not deleting:
            return
        for key, spec in list(deleting.items()):
            model = self._book.models.get(key)
            if model is None or (model.queued == 0 and not any(r.batches for r in model.replicas.values())):
                del deleting[key]
                out.append(ModelDrained(spec.name, spec.version))

    def fail_queued(self, model: Model, code: ErrorCode, message: str, out: list[Action]) -> None:
        """Fail every request of ``model`` not yet at a replica and end its sessions; in-flight batches go on."""
        self._book.changed.add(model.key)
        for session in list(model.sessions.values()):
            self._sessions.lose(model, session, code, message, out, answer_in_flight=False)
        for group in model.all_groups():
            for level in group.levels:
                for pending in level:
                    if pending.state is State.QUEUED:
                        model.queued -= 1
                        self._admission.fail(pending, code, message, out)
                level.clear()
            group.rows = 0
        model.groups.clear()
        for replica in model.replicas.values():
            replica.groups.clear()

    # --- replicas going away, retries -------------------------------------------------------------------

    def _drop_replica(self, replica: Replica, reason: str, now: float, out: list[Action], *, retry: bool) -> None:
        del self._book.replicas[replica.id]
        self._book.changed.add(replica.model_key)  # its batches and sessions leave the counts with it
        model = self._book.model(replica.model_key)
        model.replicas.pop(replica.id, None)
        message = f"the session's replica {replica.id!r} is gone ({reason}); its state is gone"
        for session in list(replica.sessions.values()):
            self._sessions.lose(model, session, ErrorCode.SESSION_LOST, message, out, answer_in_flight=True)
        for batch in list(replica.batches.values()):
            self._batching.settle(batch)
            self._fail_lost_batch(model, batch, reason, now, out, retry=retry)
        replica.batches.clear()
        replica.groups.clear()

    def _fail_lost_batch(self, model: Model, batch: Batch, reason: str, now: float, out: list[Action], *,
                         retry: bool) -> None:
        """The replica died holding ``batch``: stateless requests go round once more if another replica can
        take them (and the queue has room), everything else fails."""
        can_retry = retry and any(r is not batch.replica and not r.draining and not r.retiring
                                  for r in model.replicas.values())
        for pending in batch.requests:
            if pending.session is not None:
                # Answered or not (its deadline may have passed), the session's state went with the replica.
                session = pending.session
                self._admission.fail(pending, ErrorCode.SESSION_LOST, f"the session's replica died: {reason}", out)
                if not session.lost:
                    self._sessions.lose(model, session, ErrorCode.SESSION_LOST,
                                        f"the session's replica died: {reason}", out, answer_in_flight=True)
                continue
            if pending.state is not State.IN_FLIGHT:
                continue
            if can_retry and not pending.retried and pending.deadline > now \
                    and model.queued < self._admission.queue_limit(pending.spec):
                pending.retried = True
                pending.state = State.QUEUED
                model.queued += 1
                self._book.changed.add(model.key)
                self._batching.enqueue(model, pending, front=True)
            else:
                self._admission.fail(pending, ErrorCode.REPLICA_LOST, reason, out)
