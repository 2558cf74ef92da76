"""Sequence batching: sessions pinned to a replica's slot, one request of each at a replica at a time, idle ends.

A session (sequence id) of a stateful model is pinned to the usable replica with the fewest sessions,
which holds at most ``max_sessions_per_replica``; without a free slot it waits. Its requests queue behind
one another and enter their replica's group one at a time, which keeps their order. A session ends on
``sequence_end``, after ``session_idle_timeout_s`` idle (the replica is told with an ``end_sessions``
batch), or when its state is gone (``lose``): then its queued requests get ``session_lost``.
"""

from __future__ import annotations

import heapq

from batch_manager.actions import Action
from batch_manager.admission import Admission
from batch_manager.params import SessionId, SessionParams
from batch_manager.state import Book, Group, Model, Pending, Session, State
from batch_manager.wakeups import Wakeups
from inferoxy.protocol import ErrorCode
from model_manager.spec import ModelSpec

# Why a session ended, kept for the message of a later request to it; bounded per model version.
ENDED_SESSIONS_REMEMBERED = 4096


class Sessions:
    def __init__(self, book: Book, admission: Admission, wakeups: Wakeups) -> None:
        self._book = book
        self._admission = admission
        self._wakeups = wakeups
        self._idle: list[tuple[float, int, Session]] = []  # (when it may be reaped, tie-break, session)
        self._idle_seq = 0

    # --- requests ---------------------------------------------------------------------------------------

    def open(self, model: Model, spec: ModelSpec, params: SessionParams, now: float) -> Session | str:
        """The session a request belongs to (started now if it says ``sequence_start``), or why it has none."""
        session = model.sessions.get(params.id)
        if session is not None and session.closing and not params.start:
            return (f"session {params.id!r} of model {spec.key} is ending (sequence_end); "
                    "start a new one with sequence_start")
        if session is None:
            if not params.start:
                why = model.ended.get(params.id, "it was never started or has ended")
                return (f"model {spec.key} has no open session {params.id!r}: {why}; "
                        "start a new one with sequence_start")
            session = model.sessions[params.id] = Session(params.id, spec.key, now)
            model.stateful = True
            model.ended.pop(params.id, None)
            self._place(model, session)
        return session

    def queue(self, session: Session, pending: Pending, now: float, out: list[Action]) -> None:
        """Queue a request behind the session's others (the caller pumps)."""
        pending.session = session
        session.queue.append(pending)
        session.closing = pending.end
        session.last_active = now
        self._advance(session, now, out)

    def item_gone(self, pending: Pending, now: float, out: list[Action]) -> None:
        """A session's request left before reaching its replica (deadline, cancel)."""
        session = pending.session
        if session is None or session.lost:
            return
        if session.active is pending:
            session.active = None
        model = self._book.model(session.model_key)
        if session.replica is None and session.idle():
            # It never got a slot and nothing of it is left to run: it was never started anywhere.
            self.end(model, session, "it ended before it got a session slot", now, out, notify=False)
            return
        if pending.end and not any(p.state is State.QUEUED for p in session.queue) and session.active is None:
            # Its sequence_end never reached the replica: end the session anyway, and tell the replica.
            self.end(model, session, "its sequence_end request was not run", now, out, notify=True)
            return
        self._advance(session, now, out)

    def item_done(self, pending: Pending, now: float, out: list[Action], *, lost: bool = False) -> None:
        """The replica answered (or failed) a session's request: its next one may go."""
        session = pending.session
        if session is None or session.lost or session.active is not pending:
            return
        session.active = None
        session.last_active = now
        model = self._book.model(session.model_key)
        if lost:
            self.lose(model, session, ErrorCode.SESSION_LOST, "the replica no longer holds the session",
                      out, answer_in_flight=False)
        elif pending.end and not any(p.state is State.QUEUED for p in session.queue):
            # The replica ran the end hook after this request.
            self.end(model, session, "it ended with sequence_end", now, out, notify=False)
        else:
            self._advance(session, now, out)

    # --- slots --------------------------------------------------------------------------------------------

    def _place(self, model: Model, session: Session) -> bool:
        """Pin ``session`` to the usable replica with the fewest sessions and a free slot, else let it wait."""
        spec = self._book.spec(session.model_key)
        slots = spec.max_sessions_per_replica if spec else 1
        best = None
        for replica in model.replicas.values():
            if not replica.draining and not replica.retiring and len(replica.sessions) < slots and (
                    best is None or len(replica.sessions) < len(best.sessions)):
                best = replica
        if best is None:
            model.waiting.append(session)
            return False
        session.replica = best
        best.sessions[session.id] = session
        self._book.changed.add(session.model_key)
        return True

    def place_waiting(self, model: Model, now: float, out: list[Action]) -> None:
        """Give free slots to waiting sessions, first come first served (the caller pumps)."""
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

    def _advance(self, session: Session, now: float, out: list[Action]) -> None:
        """Hand the session's next request to its replica's group, once the one before it is answered."""
        replica = session.replica
        if session.active is not None or replica is None:
            return
        queue = session.queue
        while queue and queue[0].state is not State.QUEUED:
            queue.popleft()
        if not queue:
            self._watch_idle(session)
            return
        pending = queue.popleft()
        session.active = pending
        group = replica.groups.get(pending.signature)
        if group is None:
            group = replica.groups[pending.signature] = Group(pending.spec, self._book.model(session.model_key),
                                                              replica)
        self._wakeups.push(group, pending)  # the caller pumps: this may run in the middle of a dispatch

    # --- ends -----------------------------------------------------------------------------------------------

    def _watch_idle(self, session: Session) -> None:
        spec = self._book.spec(session.model_key)
        if spec is not None:
            self._idle_seq += 1
            session.idle_due = session.last_active + spec.session_idle_timeout_s
            heapq.heappush(self._idle, (session.idle_due, self._idle_seq, session))
            if len(self._idle) > 4 * self._open_sessions() + 1024:
                # A busy session goes idle after every answer; keep only each open session's latest entry.
                latest: dict[int, tuple[float, int, Session]] = {}
                for entry in self._idle:
                    if not entry[2].lost and (id(entry[2]) not in latest or entry[1] > latest[id(entry[2])][1]):
                        latest[id(entry[2])] = entry
                self._idle = list(latest.values())
                heapq.heapify(self._idle)

    def _open_sessions(self) -> int:
        return sum(len(model.sessions) for model in self._book.models.values())

    def next_idle(self) -> float | None:
        idle = self._idle
        while idle and (idle[0][2].lost or idle[0][0] != idle[0][2].idle_due or not idle[0][2].idle()):
            heapq.heappop(idle)  # superseded: the session was busy since, or it ended
        return idle[0][0] if idle else None

    def reap_idle(self, now: float, out: list[Action]) -> list[Model]:
        """End sessions idle past their timeout; the model versions that freed slots (to pump)."""
        touched: list[Model] = []
        while self._idle and self._idle[0][0] <= now:
            _, _, session = heapq.heappop(self._idle)
            model = self._book.models.get(session.model_key)
            if model is None or model.sessions.get(session.id) is not session or not session.idle():
                continue
            spec = self._book.spec(session.model_key)
            timeout = spec.session_idle_timeout_s if spec else 0.0
            if session.last_active + timeout > now:
                continue  # it was busy since; going idle again pushed a later entry
            self.end(model, session, f"it was idle for more than {timeout:g}s", now, out, notify=True)
            touched.append(model)
        return touched

    def end(self, model: Model, session: Session, why: str, now: float, out: list[Action], *, notify: bool) -> None:
        """Free the session's slot; ``notify``: the replica has not ended it itself, so tell it."""
        session.lost = True  # nothing more of it is dispatched
        if model.sessions.get(session.id) is session:
            del model.sessions[session.id]
        self._remember_end(model, session.id, why)
        replica = session.replica
        if replica is not None:
            replica.sessions.pop(session.id, None)
            self._book.changed.add(session.model_key)
            if notify and session.started and self._book.replicas.get(replica.id) is replica:
                replica.pending_ends.append(session.id)
            self.place_waiting(model, now, out)  # the caller pumps

    def lose(self, model: Model, session: Session, code: ErrorCode, message: str, out: list[Action], *,
             answer_in_flight: bool) -> None:
        """The session's state is gone: its queued requests (and, if asked, the one at the replica) fail."""
        session.lost = True
        if model.sessions.get(session.id) is session:
            del model.sessions[session.id]
        self._remember_end(model, session.id, message)
        if session.replica is not None:
            session.replica.sessions.pop(session.id, None)
            self._book.changed.add(session.model_key)
        doomed = list(session.queue)
        if session.active is not None:
            doomed.append(session.active)
        for pending in doomed:
            if pending.state is State.QUEUED:
                self._admission.unqueue(pending)
                self._admission.fail(pending, code, message, out)
            elif pending.state is State.IN_FLIGHT and answer_in_flight:
                self._admission.fail(pending, code, message, out)
        session.queue.clear()

    def _remember_end(self, model: Model, session_id: SessionId, why: str) -> None:
        ended = model.ended
        ended.pop(session_id, None)
        ended[session_id] = why
        if len(ended) > ENDED_SESSIONS_REMEMBERED:
            del ended[next(iter(ended))]

    def clear(self) -> None:
        self._idle.clear()

