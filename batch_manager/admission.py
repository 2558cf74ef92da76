"""Admission, deadlines and priorities: which request is held, until when, and how it is answered.

Holds every request the scheduler has taken (``Book.live``) and a lazy heap of their deadlines, bounds
each model version's queue (``max_queue_size``; beyond it ``overloaded`` at once), and answers a request
exactly once (``fail``/``finish``). Within a group a request's rank (``Pending.rank``, read by the groups)
is its arrival time plus ``priority x aging``: higher priorities go first, and a lower one waits at most
``2 x aging`` behind later arrivals.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from batch_manager.actions import Action, Request, error_reply
from batch_manager.state import Book, Model, Pending, Signature, State
from inferoxy.protocol import ErrorCode
from model_manager.spec import ModelSpec

DEFAULT_MAX_QUEUE_SIZE = 10_000
DEFAULT_PRIORITY_AGING_S = 0.1


class Admission:
    def __init__(self, book: Book, *, max_queue_size: int, priority_aging_s: float) -> None:
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        self._book = book
        self._max_queue_size = max_queue_size
        self._aging_s = priority_aging_s
        # (deadline, seq, request); answered requests leave lazily (or in a compaction).
        self._deadlines: list[tuple[float, int, Pending]] = []
        self._seq = 0

    def queue_limit(self, spec: ModelSpec) -> int:
        return spec.max_queue_size or self._max_queue_size

    def deadline(self, request: Request, spec: ModelSpec, now: float) -> float:
        """The request's deadline: the client's, or the model's default timeout when the client named none and
        it is shorter than the server's."""
        if not request.params.timeout_given and spec.default_timeout_s is not None:
            return min(request.deadline, now + spec.default_timeout_s)
        return request.deadline

    def admit(self, request: Request, spec: ModelSpec, model: Model, signature: Signature, rows: int,
              header_bytes: int, now: float) -> Pending:
        """Hold ``request`` (checked, within its queue bound) until it is answered or its deadline passes."""
        self._seq += 1
        pending = Pending(self._seq, request, spec, signature, rows, now, self._aging_s, header_bytes)
        model.queued += 1
        self._book.changed.add(model.key)
        self._book.live[request.origin] = pending
        heapq.heappush(self._deadlines, (pending.deadline, pending.seq, pending))
        return pending

    def unqueue(self, pending: Pending) -> None:
        """Take a queued request out of the counts; its group or session drops the entry lazily."""
        self._book.models[pending.spec.key].queued -= 1
        self._book.changed.add(pending.spec.key)
        if pending.group is not None:
            pending.group.rows -= pending.rows

    def fail(self, pending: Pending, code: ErrorCode, message: str, out: list[Action]) -> None:
        if pending.state is State.DONE:
            return
        out.append(error_reply(pending.origin, code, message))
        self.finish(pending)

    def finish(self, pending: Pending) -> None:
        pending.state = State.DONE
        live = self._book.live
        del live[pending.origin]
        # The deadline heap may hold this entry until its deadline: let go of the array frames now.
        pending.frames = []
        if len(self._deadlines) > 2 * len(live) + 1024:
            self._deadlines = [entry for entry in self._deadlines if entry[2].state is not State.DONE]
            heapq.heapify(self._deadlines)

    def expire(self, now: float, out: list[Action], gone: Callable[[Pending, float, list[Action]], None]) -> None:
        """Answer ``deadline`` every request whose deadline passed; ``gone`` hears of each that left a queue."""
        # Not a local alias: answering a request may compact (replace) the heap.
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, pending = heapq.heappop(self._deadlines)
            if pending.state is State.QUEUED:
                self.unqueue(pending)
                model = self._book.models.get(pending.spec.key)
                self.fail(pending, ErrorCode.DEADLINE, waited(pending, now, bool(model and model.replicas)), out)
                gone(pending, now, out)
            elif pending.state is State.IN_FLIGHT:
                # Its batch keeps the replica's credit until the replica answers or is declared down.
                self.fail(pending, ErrorCode.DEADLINE, waited(pending, now, True), out)

    def next_deadline(self) -> float | None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].state is State.DONE:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def fail_all(self, code: ErrorCode, message: str, out: list[Action]) -> None:
        for pending in list(self._book.live.values()):
            self.fail(pending, code, message, out)
        self._deadlines.clear()


def waited(pending: Pending, now: float, had_replica: bool) -> str:
    """Why a request's deadline passed, for its ``deadline`` error."""
    waited_ms = (now - pending.arrival) * 1000.0
    if pending.state is State.IN_FLIGHT:
        return f"the request's timeout passed after {waited_ms:.0f} ms, while a replica was running it"
    if pending.session is not None and pending.session.replica is None:
        return (f"the request's timeout passed after {waited_ms:.0f} ms: its session waits for a free session slot "
                f"of model {pending.spec.key}")
    if not had_replica:
        return f"the request's timeout passed after {waited_ms:.0f} ms: model {pending.spec.key} has no ready replica"
    return f"the request's timeout passed after {waited_ms:.0f} ms in the queue of model {pending.spec.key}"
