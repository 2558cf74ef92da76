"""The task manager's credit ledger (task_manager/credit.py), without sockets: shares, transitions, reclaim."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from hypothesis import example, given, settings
from hypothesis import strategies as st

from task_manager.credit import CreditLedger, Grant, distribute, split

A, B, C = b"a", b"b", b"c"


def announced(ledger: CreditLedger, replicas: dict[str, int], bms: list[bytes],
              demand: dict[bytes, int] | None = None) -> dict[tuple[str, bytes], int]:
    """Plan, settle with nothing held, and announce every replica to every batch manager: what replica_up says."""
    ledger.plan(replicas, bms, demand or {})
    for rid in replicas:
        assert ledger.settle(rid, {}) == []  # nobody knows the replicas yet: their replica_up carries the shares
    return {(rid, bm): ledger.announce(rid, bm) for rid in replicas for bm in bms}


def test_one_batch_manager_alone_gets_every_replica_whole() -> None:
    ledger = CreditLedger()
    assert announced(ledger, {"r0": 2, "r1": 3}, [A]) == {("r0", A): 2, ("r1", A): 3}
    ledger.plan({"r0": 2, "r1": 3}, [A], {A: 50})
    assert ledger.settle("r0", {A: 2}) == [] and ledger.settle("r1", {A: 3}) == []


def test_idle_batch_managers_split_evenly_and_one_with_demand_gets_it_all() -> None:
    ledger = CreditLedger()
    assert announced(ledger, {"r0": 2, "r1": 2}, [A, B]) == {("r0", A): 1, ("r1", A): 1, ("r0", B): 1, ("r1", B): 1}
    ledger.plan({"r0": 2, "r1": 2}, [A, B], {A: 10})
    assert sorted(ledger.settle("r0", {}) + ledger.settle("r1", {}), key=str) == [
        Grant(B, "r0", 0), Grant(B, "r1", 0)], "the shrink goes out alone: A waits for B's echo"
    assert ledger.acked("r0", B)
    assert ledger.settle("r0", {}) == [Grant(A, "r0", 2)]
    assert ledger.acked("r1", B)
    assert ledger.settle("r1", {}) == [Grant(A, "r1", 2)]


def test_shares_follow_demand_with_at_least_one_each() -> None:
    assert split(8, {A: 30, B: 10}, {}) == {A: 6, B: 2}
    assert split(4, {A: 1000, B: 1}, {}) == {A: 3, B: 1}, "one each first, however small the demand"
    assert split(2, {A: 5, B: 9, C: 1}, {}) == {B: 1, A: 1}, "fewer slots than batch managers: the heaviest"
    assert split(2, {A: 5, B: 9, C: 1}, {C: 1}) == {C: 1, B: 1}, "...keeping the one already served"
    assert split(0, {A: 1}, {}) == {}


def test_a_split_that_is_still_a_fair_rounding_is_kept() -> None:
    # Demand moves with every report under load; shares must not flap with it.
    assert split(4, {A: 41, B: 40}, {A: 2, B: 2}) == {A: 2, B: 2}
    assert split(4, {A: 40, B: 41}, {A: 2, B: 2}) == {A: 2, B: 2}
    assert split(4, {A: 80, B: 10}, {A: 2, B: 2}) == {A: 3, B: 1}, "a real change moves it"


def test_distribute_moves_as_little_as_it_can_and_spreads_fresh_shares() -> None:
    assert distribute({"r0": 2, "r1": 2}, {A: 2, B: 2}, {}) == {"r0": {A: 1, B: 1}, "r1": {A: 1, B: 1}}
    before = {"r0": {A: 2}, "r1": {B: 2}}
    assert distribute({"r0": 2, "r1": 2}, {A: 2, B: 2}, before) == before
    assert distribute({"r0": 2, "r1": 2}, {A: 3, B: 1}, before) == {"r0": {A: 2}, "r1": {B: 1, A: 1}}


def test_an_increase_waits_until_the_shrinking_batch_managers_batches_fit() -> None:
    ledger = CreditLedger()
    announced(ledger, {"r0": 2}, [A], {A: 5})  # A alone: both slots
    ledger.plan({"r0": 2}, [A, B], {A: 5, B: 5})
    assert ledger.settle("r0", {A: 2}) == [Grant(A, "r0", 1)]
    assert ledger.announce("r0", B) == 0, "nothing is free for B yet"
    assert ledger.acked("r0", A)
    assert ledger.settle("r0", {A: 2}) == [], "A applied its shrink but still holds 2 there"
    assert ledger.waiting("r0")
    assert ledger.settle("r0", {A: 1}) == [Grant(B, "r0", 1)], "one answered: B's share is free now"
    assert not ledger.waiting("r0")


def test_an_increase_waits_for_the_echo_even_when_the_batches_already_fit() -> None:
    # Batches A sent before it read the shrink may still be on the way: only its echo says they all arrived.
    ledger = CreditLedger()
    announced(ledger, {"r0": 2}, [A], {A: 5})
    ledger.plan({"r0": 2}, [A, B], {A: 5, B: 5})
    assert ledger.settle("r0", {}) == [Grant(A, "r0", 1)]
    ledger.announce("r0", B)
    assert ledger.settle("r0", {}) == []
    assert ledger.acked("r0", A)
    assert ledger.settle("r0", {}) == [Grant(B, "r0", 1)]


def test_a_batch_manager_that_goes_away_is_reclaimed_once_its_batches_are_answered() -> None:
    ledger = CreditLedger()
    announced(ledger, {"r0": 2}, [A, B], {A: 5, B: 5})
    ledger.forget_batch_manager(B)
    ledger.plan({"r0": 2}, [A], {A: 5})
    assert ledger.settle("r0", {A: 1, B: 1}) == [], "B's batch is still at the replica"
    assert ledger.settle("r0", {A: 1}) == [Grant(A, "r0", 2)]
    assert ledger.share("r0", A) == 2 and ledger.share("r0", B) == 0


def test_acknowledgements_are_counted_in_order() -> None:
    # 2 -> 1 -> 2 -> 1: the echo of the first 1 must not be taken for the last one.
    ledger = CreditLedger()
    announced(ledger, {"r0": 2}, [A], {A: 5})
    for demand, want in (({A: 5, B: 5}, 1), ({A: 5}, 2), ({A: 5, B: 5}, 1)):
        ledger.plan({"r0": 2}, [A, B], demand)
        assert ledger.settle("r0", {}) == [Grant(A, "r0", want)]
    ledger.announce("r0", B)
    assert not ledger.acked("r0", A) and not ledger.acked("r0", A)
    assert ledger.settle("r0", {}) == []
    assert ledger.acked("r0", A)
    assert ledger.settle("r0", {}) == [Grant(B, "r0", 1)]
    assert not ledger.acked("r0", A), "an echo nothing asked for changes nothing"


@settings(max_examples=300, deadline=None)
@given(capacities=st.dictionaries(st.sampled_from(["r0", "r1", "r2"]), st.integers(1, 4), min_size=1),
       weights=st.dictionaries(st.sampled_from([A, B, C]), st.integers(1, 100), min_size=1),
       before=st.dictionaries(st.sampled_from(["r0", "r1", "r2"]),
                              st.dictionaries(st.sampled_from([A, B, C]), st.integers(0, 4))))
def test_shares_add_up_to_the_capacity_and_fit_every_replica(capacities: dict[str, int], weights: dict[bytes, int],
                                                            before: dict[str, dict[bytes, int]]) -> None:
    total = sum(capacities.values())
    previous = {bm: sum(shares.get(bm, 0) for shares in before.values()) for bm in weights}
    totals = split(total, weights, previous)
    assert sum(totals.values()) == total, "every slot given out"
    if total >= len(weights):
        assert set(totals) == set(weights) and min(totals.values()) >= 1, "at least one each while slots last"
    laid = distribute(capacities, totals, before)
    assert set(laid) == set(capacities)
    for rid, shares in laid.items():
        assert sum(shares.values()) <= capacities[rid]
    for bm, share in totals.items():
        assert sum(shares.get(bm, 0) for shares in laid.values()) == share


# --- every interleaving: nothing beyond a replica's capacity ever reaches it -----------------------------------------


@dataclass
class Bm:
    belief: dict[str, int] = field(default_factory=dict)  # what it was told, per replica
    sent: Counter[str] = field(default_factory=Counter)  # its batches not answered yet, per replica
    inbox: deque[tuple[str, str, int]] = field(default_factory=deque)  # TM -> BM: (kind, replica, value)
    outbox: deque[tuple[str, str]] = field(default_factory=deque)  # BM -> TM: (kind, replica)
    alive: bool = True


# (what happens, to which batch manager, at which replica, its demand when it reports): a few values each, so
# that races (a batch on its way while credit moves) come up often.
OPS = st.lists(st.tuples(st.sampled_from(["plan", "deliver", "send", "arrive", "answer", "die"]),
                         st.integers(0, 2), st.integers(0, 1), st.sampled_from([0, 1, 5, 40])), max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops=OPS)
# The race random search rarely builds: B's batch is on its way when B's credit shrinks and A's grows.
@example(ops=[("deliver", 1, 0, 0), ("send", 1, 0, 0), ("plan", 0, 0, 40), ("deliver", 0, 0, 0), ("send", 0, 0, 0),
              ("arrive", 0, 0, 0), ("arrive", 1, 0, 0)])
def test_no_interleaving_oversubscribes_a_replica(ops: list[tuple[str, int, int, int]]) -> None:
    capacities = {"r0": 2, "r1": 3}
    ledger = CreditLedger()
    bms = {A: Bm(), B: Bm(), C: Bm()}
    names = [A, B, C]
    held: dict[str, list[bytes]] = {rid: [] for rid in capacities}  # batches at each replica, by sender
    demand: dict[bytes, int] = {}

    def settle(rid: str) -> None:
        for grant in ledger.settle(rid, Counter(held[rid])):
            bms[grant.batch_manager].inbox.append(("credit", rid, grant.capacity))

    def replan() -> None:
        live = [bm for bm in names if bms[bm].alive]
        ledger.plan(capacities, live, demand)
        for rid in capacities:
            settle(rid)

    for rid in capacities:
        ledger.plan(capacities, [A, B, C], {})
        settle(rid)
        for bm in names:
            bms[bm].inbox.append(("up", rid, ledger.announce(rid, bm)))

    for op, who, where, amount in ops:
        bm, rid = names[who], list(capacities)[where]
        peer = bms[bm]
        if op == "plan":
            demand[bm] = amount
            replan()
        elif op == "deliver":  # what the task manager sent it, in order
            while peer.inbox:
                kind, at, value = peer.inbox.popleft()
                if kind == "answer":
                    peer.sent[at] -= 1
                else:
                    peer.belief[at] = value
                    if kind == "credit":
                        peer.outbox.append(("ack", at))
        elif op == "send" and peer.alive:
            while peer.sent[rid] < peer.belief.get(rid, 0):  # saturated: as many as its credit allows
                peer.sent[rid] += 1
                peer.outbox.append(("batch", rid))
        elif op == "arrive":  # what it sent, in order
            while peer.outbox:
                kind, at = peer.outbox.popleft()
                if kind == "batch":
                    held[at].append(bm)
                    assert len(held[at]) <= capacities[at], f"{at} got more than its capacity: overloaded"
                elif peer.alive and ledger.acked(at, bm):
                    settle(at)
        elif op == "answer" and bm in held[rid]:
            held[rid].remove(bm)
            peer.inbox.append(("answer", rid, 0))
            if ledger.waiting(rid):
                settle(rid)
        elif op == "die" and peer.alive and sum(p.alive for p in bms.values()) > 1:
            peer.alive = False
            demand.pop(bm, None)
            ledger.forget_batch_manager(bm)
            replan()

    # Quiet: every message arrives, every batch is answered. Every share the ledger planned is then granted.
    while any(p.inbox or p.outbox for p in bms.values()) or any(held.values()):
        for bm, peer in bms.items():
            while peer.outbox:
                kind, at = peer.outbox.popleft()
                if kind == "batch":
                    held[at].append(bm)
                elif peer.alive and ledger.acked(at, bm):
                    settle(at)
            for rid in capacities:
                while bm in held[rid]:
                    held[rid].remove(bm)
                    if ledger.waiting(rid):
                        settle(rid)
            while peer.inbox:
                kind, at, value = peer.inbox.popleft()
                if kind == "credit":
                    peer.outbox.append(("ack", at))
    for rid, capacity in capacities.items():
        assert not ledger.waiting(rid), f"{rid}: a share still waits once everything is quiet"
        total = sum(ledger.share(rid, bm) for bm in names if bms[bm].alive)
        assert total == capacity, f"{rid}: {total} of {capacity} given out once quiet"
