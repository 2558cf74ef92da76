"""Each ready replica's credit (the batches it may hold at once) split between the batch managers connected.

Pure bookkeeping, tested without sockets; ``announce.Announcer`` feeds it and sends what it decides.

* **Shares.** A model version's credit (the sum of its ready replicas' capacities) is split between the
  batch managers with demand (requests queued there plus batches there at its replicas, from ``load``), in
  proportion to it, each getting at least 1 while slots last. When none has demand it is split evenly
  between all connected, so a light load is dispatched at once; one batch manager alone gets all of it.
  A split still close to the new demand's is kept (``split``), so the demand moving a little with every
  report sends nothing. Each batch manager's share is then laid over the replicas, moving as
  little as possible (``distribute``).
* **Transitions.** What batch managers may hold at a replica never adds up past its capacity. A shrink is
  told at once; an increase is granted only from room that is free, counting for each batch manager the
  larger of the batches it holds there (the relay's ``in_flight``) and the most it may still believe it has:
  a batch manager acknowledges each ``credit`` by echoing it, and until it did, batches it sent under its
  old credit may still be on the way, so its old credit still counts.
* **Reclaim.** A batch manager that goes away loses its slots; the batches it left at replicas count until
  they are answered, and its share goes to the others as they are.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Grant:
    """Tell ``batch_manager`` it may hold ``capacity`` batches at ``replica`` from now on (``m.Credit``)."""

    batch_manager: bytes
    replica: str
    capacity: int


@dataclass
class _Slot:
    """One batch manager's credit at one replica."""

    told: int = 0
    """What it was last told (``replica_up`` or ``credit``)."""
    bound: int = 0
    """The most it may still believe it has: ``told``, or more while a ``credit`` is not acknowledged."""
    unacked: int = 0
    """``credit`` messages sent and not yet echoed back."""
    announced: bool = False
    """It heard ``replica_up`` for the replica; until then a change rides on that ``replica_up``."""


class CreditLedger:
    def __init__(self) -> None:
        self._capacity: dict[str, int] = {}  # ready replicas: id -> capacity
        self._targets: dict[str, dict[bytes, int]] = {}  # replica -> batch manager -> the share it should have
        self._slots: dict[str, dict[bytes, _Slot]] = {}  # replica -> batch manager -> what it was told

    # --- deciding ----------------------------------------------------------------------------------------------

    def plan(self, replicas: Mapping[str, int], batch_managers: Collection[bytes], demand: Mapping[bytes, int]) -> None:
        """New targets for one model version's ready replicas (id -> capacity) from each batch manager's demand."""
        weights = {bm: load for bm, load in demand.items() if load > 0 and bm in batch_managers}
        if not weights:
            weights = dict.fromkeys(batch_managers, 1)
        previous = {rid: self._targets.get(rid, {}) for rid in replicas}
        totals: dict[bytes, int] = {}
        for shares in previous.values():
            for bm, share in shares.items():
                totals[bm] = totals.get(bm, 0) + share
        wanted = split(sum(replicas.values()), weights, totals)
        self._targets.update(distribute(replicas, wanted, previous))
        self._capacity.update(replicas)

    def settle(self, replica: str, held: Mapping[bytes, int]) -> list[Grant]:
        """Move a replica's credit towards its targets: shrinks at once, increases from free room only.

        ``held``: batches at the replica by the batch manager that sent them (gone ones included). Returns the
        ``credit`` messages to send; a change for a batch manager not yet told of the replica is kept for its
        ``replica_up`` (``announce``)."""
        capacity = self._capacity.get(replica)
        if capacity is None:
            return []
        slots = self._slots.setdefault(replica, {})
        targets = self._targets.get(replica, {})
        grants: list[Grant] = []
        for bm in sorted(slots.keys() | targets.keys()):
            slot = slots.setdefault(bm, _Slot())
            want = targets.get(bm, 0)
            if want < slot.told:
                slot.told = want
                self._told(replica, bm, slot, grants)
        committed = {bm: max(slot.bound, held.get(bm, 0)) for bm, slot in slots.items()}
        room = capacity - sum(committed.values()) - sum(n for bm, n in held.items() if bm not in slots)
        # Batch managers with nothing here first: each with demand is owed at least one batch somewhere.
        for bm in sorted(targets, key=lambda bm: (slots[bm].told > 0, bm)):
            slot = slots[bm]
            want = min(targets[bm], committed[bm] + max(room, 0))
            if want <= slot.told:
                continue
            slot.told = want
            slot.bound = max(slot.bound, want)
            grown = max(slot.bound, held.get(bm, 0))
            room -= grown - committed[bm]
            committed[bm] = grown
            self._told(replica, bm, slot, grants)
        return grants

    @staticmethod
    def _told(replica: str, bm: bytes, slot: _Slot, grants: list[Grant]) -> None:
        if slot.announced:
            slot.unacked += 1
            grants.append(Grant(bm, replica, slot.told))
        else:
            slot.bound = slot.told  # it has no batch there, and its replica_up will carry this

    def waiting(self, replica: str) -> bool:
        """Whether an increase at the replica waits for room (an answer there, or an acknowledgement)."""
        slots = self._slots.get(replica, {})
        targets = self._targets.get(replica, {})
        return any(share > (slots[bm].told if bm in slots else 0) for bm, share in targets.items())

    # --- what batch managers say and are told ------------------------------------------------------------------

    def announce(self, replica: str, bm: bytes) -> int:
        """The capacity a ``replica_up`` to ``bm`` carries; from now on changes go to it as ``credit``."""
        slot = self._slots.setdefault(replica, {}).setdefault(bm, _Slot())
        slot.announced = True
        return slot.told

    def acked(self, replica: str, bm: bytes) -> bool:
        """``bm`` echoed a ``credit`` for the replica (in order). True when that freed room to settle."""
        slot = self._slots.get(replica, {}).get(bm)
        if slot is None or slot.unacked == 0:
            return False  # a replica already forgotten, or an echo nothing asked for
        slot.unacked -= 1
        if slot.unacked or slot.bound == slot.told:
            return False
        slot.bound = slot.told
        return True

    def share(self, replica: str, bm: bytes) -> int:
        slot = self._slots.get(replica, {}).get(bm)
        return slot.told if slot is not None else 0

    def forget_replica(self, replica: str) -> None:
        """It drains or is gone: no batch manager may send it more, whatever it was told."""
        self._capacity.pop(replica, None)
        self._targets.pop(replica, None)
        self._slots.pop(replica, None)

    def forget_batch_manager(self, bm: bytes) -> None:
        """It went away: its slots are reclaimed (the batches it left at replicas still count, through ``held``)."""
        for shares in self._targets.values():
            shares.pop(bm, None)
        for slots in self._slots.values():
            slots.pop(bm, None)


def split(total: int, weights: Mapping[bytes, int], previous: Mapping[bytes, int]) -> dict[bytes, int]:
    """``total`` slots between the batch managers in ``weights`` (each > 0): at least 1 each while slots last,
    the rest in proportion to the weights, largest remainders first. ``previous`` is kept while it is still
    close to that (every share within 3/4 of its exact value, the same total): no churn on noise."""
    names = sorted(weights)
    if not names or total <= 0:
        return {}
    if total < len(names):
        # Not one each: the heaviest, those holding one already first.
        order = sorted(names, key=lambda bm: (previous.get(bm, 0) == 0, -weights[bm], bm))
        return dict.fromkeys(order[:total], 1)
    rest = total - len(names)
    weight = sum(weights.values())
    # Kept while each share is within 3/4 of its exact value (1 + rest * w / weight), in integers: a quarter
    # of a slot of hysteresis either side of where rounding would flip.
    if sum(previous.get(bm, 0) for bm in names) == total and all(
            4 * abs(previous.get(bm, 0) * weight - weight - rest * weights[bm]) < 3 * weight for bm in names):
        return {bm: previous[bm] for bm in names}
    shares = {bm: 1 + rest * weights[bm] // weight for bm in names}
    left = total - sum(shares.values())
    by_remainder = sorted(names, key=lambda bm: (-(rest * weights[bm] % weight), -previous.get(bm, 0), bm))
    for bm in by_remainder[:left]:
        shares[bm] += 1
    return shares


def distribute(capacities: Mapping[str, int], totals: Mapping[bytes, int],
               previous: Mapping[str, Mapping[bytes, int]]) -> dict[str, dict[bytes, int]]:
    """Lay each batch manager's total over the replicas (id -> capacity), keeping what ``previous`` gave where it
    can: a surplus leaves the replica where it holds most, a deficit goes where most room is free."""
    alloc = {rid: {bm: n for bm, n in previous.get(rid, {}).items() if bm in totals and n > 0} for rid in capacities}
    for rid, capacity in capacities.items():
        shares = alloc[rid]
        while sum(shares.values()) > capacity:
            largest = max(sorted(shares), key=lambda bm: shares[bm])
            shares[largest] -= 1
    have = {bm: sum(alloc[rid].get(bm, 0) for rid in capacities) for bm in totals}
    for bm in sorted(totals):
        while have[bm] > totals[bm]:
            rid = max(capacities, key=lambda rid: alloc[rid].get(bm, 0))
            alloc[rid][bm] -= 1
            have[bm] -= 1
    free = {rid: capacity - sum(alloc[rid].values()) for rid, capacity in capacities.items()}
    for bm in sorted(totals):
        while have[bm] < totals[bm]:
            rid = max(capacities, key=lambda rid: (free[rid], -alloc[rid].get(bm, 0)))
            if free[rid] <= 0:
                break
            alloc[rid][bm] = alloc[rid].get(bm, 0) + 1
            free[rid] -= 1
            have[bm] += 1
    return {rid: {bm: n for bm, n in shares.items() if n > 0} for rid, shares in alloc.items()}
