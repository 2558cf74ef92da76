"""When the next group's delay runs out: a heap of group ready times, so asking costs O(1) amortised.

The service asks after every socket drain; scanning every group instead cost 0.06 ms at 50 model
versions and 0.83 ms at 500 (bench/bench_scheduler.py). The heap is lazy, and its invariant is:

    every group with a live request and not parked has ``group.due`` set, an entry ``(group.due, _, group)``
    in the heap, and ``group.due <= group.ready_at()``.

Ready times only move later as requests leave a group (dispatched, cancelled, past their deadline), so
those changes cost nothing here: a stale entry is repaired when it reaches the top. Only a request that
makes its group's ready time earlier (the first of an empty group, a retry pushed to the front) pushes an
entry, and an entry whose time no longer equals ``group.due`` is dropped when met. A group that is ready
but waits for credit needs no timer (returning credit dispatches it), so it is *parked* off the heap on
its model (or, for sessions' groups, its replica) until the batching pump sees credit there again.
"""

from __future__ import annotations

import heapq

from batch_manager.state import Book, Group, Pending


class Wakeups:
    def __init__(self, book: Book) -> None:
        self._book = book
        self._heap: list[tuple[float, int, Group]] = []
        self._seq = 0  # tie-break: groups do not compare

    def push(self, group: Group, pending: Pending, *, front: bool = False) -> None:
        """Queue ``pending`` in ``group``; arm the group's timer if this made its delay run out earlier."""
        group.push(pending, front=front)
        self.pushed(group, pending)

    def pushed(self, group: Group, pending: Pending) -> None:
        """``pending`` was pushed into ``group`` without ``push``: arm the group's timer if it must run earlier.
        (A new request may be pushed, pumped, and only then, if it is still queued, reported here: one that
        leaves at once then costs the heap nothing.)"""
        if not group.parked:
            # Group.ready_at's expression, inlined (the request path): equal inputs give equal floats.
            due = pending.arrival + group.spec.max_batch_delay_ms / 1000.0
            if group.due is None or due < group.due:
                self._arm(group, due)

    def rearm(self, group: Group) -> None:
        """The group's ready time may be earlier than its timer says (its spec changed, or it left the heap)."""
        if group.parked:
            return
        group.head()
        due = group.ready_at()
        if due is not None and (group.due is None or due < group.due):
            self._arm(group, due)

    def unpark(self, parked: list[Group]) -> None:
        """Credit came back where these groups wait: they need their timers again."""
        groups = parked[:]
        parked.clear()
        for group in groups:
            group.parked = False
            self.rearm(group)

    def next_due(self) -> float | None:
        """The earliest ready time of a group that could be dispatched now."""
        heap = self._heap
        while heap:
            due, _, group = heap[0]
            if due != group.due:
                heapq.heappop(heap)  # superseded by an earlier entry of its group
                continue
            group.head()
            actual = group.ready_at()
            if actual is None:
                group.due = None
                heapq.heappop(heap)
            elif actual != due:
                group.due = actual
                self._seq += 1
                heapq.heapreplace(heap, (actual, self._seq, group))
            elif not self._can_go(group):
                heapq.heappop(heap)
                group.due = None
                group.parked = True
                (group.replica.parked if group.replica is not None else group.model.parked).append(group)
            else:
                return due
        return None

    def pop_due(self, now: float) -> list[Group]:
        """Take the groups whose delay ran out by ``now`` off the heap; ``rearm`` each after pumping it."""
        groups: list[Group] = []
        while True:
            due = self.next_due()
            if due is None or due > now:
                return groups
            group = heapq.heappop(self._heap)[2]
            group.due = None
            groups.append(group)

    def clear(self) -> None:
        for _, _, group in self._heap:
            group.due = None
        self._heap.clear()

    def _arm(self, group: Group, due: float) -> None:
        group.due = due
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, group))
        if len(self._heap) > 4 * len(self._book.live) + 1024:
            # Entries superseded, or of groups emptied since, wait deep in the heap to reach the top (the service
            # asks after every drain, so they seldom pile up): keep only each live group's valid entry.
            valid: dict[int, tuple[float, int, Group]] = {}
            for entry in self._heap:
                group = entry[2]
                if entry[0] == group.due:
                    if group.rows > 0:
                        valid[id(group)] = entry
                    else:
                        group.due = None
            self._heap = list(valid.values())
            heapq.heapify(self._heap)

    def _can_go(self, group: Group) -> bool:
        replica = group.replica
        if replica is None:
            return self._book.models.get(group.model.key) is group.model and group.model.has_usable_replica()
        return replica.usable and self._book.replicas.get(replica.id) is replica


def scan_groups(book: Book) -> float | None:
    """The earliest ready time of a group that could be dispatched now, by scanning them all: what the heap
    replaced, kept as the reference it is tested against (and benchmarked with)."""
    earliest: float | None = None
    for model in book.models.values():
        # A group that waits for credit needs no timer: returning credit dispatches it.
        groups = list(model.groups.values()) if model.groups and model.has_usable_replica() else []
        for replica in model.replicas.values():
            if replica.groups and replica.usable:
                groups += replica.groups.values()
        for group in groups:
            group.head()
            ready_at = group.ready_at()
            if ready_at is not None and (earliest is None or ready_at < earliest):
                earliest = ready_at
    return earliest
