"""Stateless dynamic batching: groups, forming batches within the bus's limits, and replicas' credit.

A group is ready when it holds ``max_batch_size`` rows or its oldest request waited ``max_batch_delay_ms``
(``wakeups.Wakeups`` says when). ``pump`` sends ready groups, the one whose next request ranks first
first, while a replica has credit; a batch closes early when its header or tensors would pass the bus's
limits. Sessions' groups are per replica and go only to it (``sessions.Sessions`` fills them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batch_manager.actions import Action, Dispatch
from batch_manager.admission import Admission, waited
from batch_manager.inputs import header_room
from batch_manager.messages import ReplicaId
from batch_manager.state import Batch, Book, Group, Model, Pending, Replica, Signature, State, batch_tensors
from batch_manager.wakeups import Wakeups
from inferoxy import messages as m
from inferoxy.protocol import ErrorCode

if TYPE_CHECKING:
    from batch_manager.sessions import Sessions

# The bus's message limit (Settings.max_message_bytes): a batch's tensors stay within it.
DEFAULT_MAX_BATCH_BYTES = 64 * 1024 * 1024
# Batches dropped with their replica, remembered so a late answer for one is known as late, not as unknown.
SETTLED_BATCHES_REMEMBERED = 65_536


class Batching:
    def __init__(self, book: Book, admission: Admission, wakeups: Wakeups, sessions: Sessions, *,
                 max_header_bytes: int, max_batch_bytes: int) -> None:
        self._book = book
        self._admission = admission
        self._wakeups = wakeups
        self._sessions = sessions
        self.max_header_bytes = max_header_bytes
        self._max_batch_bytes = max_batch_bytes
        # Batch ids dropped with their replica (replica_down, a new incarnation), oldest first; bounded.
        self._settled: dict[int, None] = {}
        self._batch_seq = 0
        self._use_seq = 0

    def enqueue(self, model: Model, pending: Pending, *, front: bool = False, timer: bool = True) -> Group:
        """Queue a stateless request in its group (a retry goes to the front: it has waited already).
        ``timer=False``: the caller pumps, then tells ``Wakeups.pushed`` if the request is still queued."""
        group = model.groups.get(pending.signature)
        if group is None:
            group = model.groups[pending.signature] = Group(pending.spec, model, None)
        if timer:
            self._wakeups.push(group, pending, front=front)
        else:
            group.push(pending, front=front)
        return group

    def pump_all(self, now: float, out: list[Action]) -> None:
        for model in self._book.models.values():
            self.pump(model, now, out)

    def pump(self, model: Model, now: float, out: list[Action]) -> None:
        """Dispatch ready groups, oldest first, while a replica of this model version has credit."""
        if not model.replicas:
            return
        for replica in model.replicas.values() if model.stateful else ():
            if replica.parked and replica.usable:
                self._wakeups.unpark(replica.parked)
            if replica.pending_ends and replica.usable:
                self._send_ends(replica, out)
            # Sessions' groups go only to their own replica.
            while replica.groups and replica.usable:
                group = _oldest_ready(replica.groups, now)
                if group is None:
                    break
                self._dispatch(model, group, replica, now, out)
        if model.parked and model.has_usable_replica():
            self._wakeups.unpark(model.parked)
        while model.groups:
            free = _most_free(model)
            if free is None:
                return
            group = _oldest_ready(model.groups, now)
            if group is None:
                return
            self._dispatch(model, group, free, now, out)

    def _dispatch(self, model: Model, group: Group, replica: Replica, now: float, out: list[Action]) -> None:
        """Send the group's first requests by rank, up to max_batch_size rows, as one batch to ``replica``."""
        spec = group.spec
        limit = spec.max_batch_size
        self._book.changed.add(model.key)
        room = header_room(self.max_header_bytes, spec.name, spec.version, len(str(replica.id)))
        taken: list[Pending] = []
        waits: list[float] = []
        rows = header_bytes = nbytes = 0
        while True:
            pending = group.head()
            if pending is None:
                break
            if pending.deadline <= now:
                group.take(pending)
                model.queued -= 1
                self._admission.fail(pending, ErrorCode.DEADLINE, waited(pending, now, True), out)
                self._sessions.item_gone(pending, now, out)
                continue
            # Rank order is kept: a request that does not fit waits for the next batch. The first one
            # always goes, even if max_batch_size shrank below its rows since it was queued (submit made sure
            # its header fits). A batch the bus could not carry would never be answered, so the header and
            # tensor bytes close it early too.
            if taken and (rows + pending.rows > limit or header_bytes + pending.header_bytes > room
                          or nbytes + pending.nbytes > self._max_batch_bytes):
                break
            group.take(pending)
            model.queued -= 1
            pending.state = State.IN_FLIGHT
            taken.append(pending)
            waits.append(now - pending.arrival)
            rows += pending.rows
            header_bytes += pending.header_bytes
            nbytes += pending.nbytes
        if not taken:
            return
        batch = self.new_batch(replica, taken)
        if spec.stateful:
            items: list[m.BatchItem] = []
            for pending in taken:
                session = pending.session
                assert session is not None
                items.append(m.BatchItem(pending.seq, len(pending.metas), session.id,
                                         pending.start or not session.started, pending.end, pending.rid,
                                         pending.params))
                # After an end the replica holds no state: whatever of the session comes next starts afresh.
                session.started = not pending.end
        else:
            items = [m.BatchItem(pending.seq, len(pending.metas), rid=pending.rid, params=pending.params)
                     for pending in taken]
        metas, frames = batch_tensors(taken)
        out.append(Dispatch(replica.id, batch.id, spec.name, spec.version, items, metas, frames,
                            ragged=spec.ragged_batches, waits=waits))

    def _send_ends(self, replica: Replica, out: list[Action]) -> None:
        """A batch with no items that tells the replica to run the end hook of sessions that idled out."""
        model_name, _, version = replica.model_key.partition("/")
        batch = self.new_batch(replica, [])
        out.append(Dispatch(replica.id, batch.id, model_name, version, [], [], [], end_sessions=replica.pending_ends))
        replica.pending_ends = []

    # --- credit ------------------------------------------------------------------------------------------

    def new_batch(self, replica: Replica, requests: list[Pending]) -> Batch:
        self._batch_seq += 1
        self._use_seq += 1
        batch = Batch(self._batch_seq, replica, requests)
        replica.batches[batch.id] = batch
        replica.last_used = self._use_seq
        self._book.batches[batch.id] = batch
        self._book.changed.add(replica.model_key)
        return batch

    def take_batch(self, replica_id: ReplicaId, batch_id: int) -> Batch | None:
        """The batch a replica answered, and its credit back; None for a late or unknown answer."""
        batch = self._book.batches.get(batch_id)
        # Batch ids are never reused, so an unknown one is a late answer for a replica declared down
        # (or a mix-up the service has logged: ``knows_batch``). Either way no credit comes back with it.
        if batch is None or batch.replica.id != replica_id:
            if batch is None:
                self._settled.pop(batch_id, None)  # its one answer came
            return None
        del self._book.batches[batch_id]
        del batch.replica.batches[batch_id]
        self._book.changed.add(batch.replica.model_key)
        return batch

    def settle(self, batch: Batch) -> None:
        """Forget a batch whose replica went; its late answer is expected, not a mix-up."""
        del self._book.batches[batch.id]
        self._book.changed.add(batch.replica.model_key)
        self._settled[batch.id] = None
        if len(self._settled) > SETTLED_BATCHES_REMEMBERED:
            del self._settled[next(iter(self._settled))]

    def knows_batch(self, replica_id: ReplicaId, batch_id: int) -> bool:
        batch = self._book.batches.get(batch_id)
        if batch is not None:
            return batch.replica.id == replica_id
        return batch_id in self._settled


def _oldest_ready(groups: dict[Signature, Group], now: float) -> Group | None:
    """The ready group whose next request ranks first; empty groups are dropped on the way."""
    best: Group | None = None
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


def _most_free(model: Model) -> Replica | None:
    """The usable replica with the most free credit; among equals the least recently used, so load spreads."""
    best: Replica | None = None
    best_free = 0
    for replica in model.replicas.values():
        free = replica.capacity - len(replica.batches)
        if free > 0 and not replica.draining and not replica.retiring and (
            best is None or free > best_free or (free == best_free and replica.last_used < best.last_used)
        ):
            best, best_free = replica, free
    return best
