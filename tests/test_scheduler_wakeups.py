"""``Scheduler.next_wakeup`` comes from a lazy heap of group ready times (batch_manager/wakeups.py): it must
always equal the minimum a scan of every group finds (``next_wakeup_by_scan``), while groups' ready times
move under it: requests cancelled, batches dispatched early, models removed or their delay changed,
retries pushed to a group's front, replicas losing and regaining credit."""

from __future__ import annotations

import random

import pytest

from batch_manager.params import Priority, RequestParams
from batch_manager.scheduler import Action, Dispatch, Request, Scheduler
from model_manager.spec import ModelSpec
from model_manager.store import Registry
from tests.test_scheduler import dispatches, echo_result, make_registry, make_request, make_spec


def agree(scheduler: Scheduler) -> float | None:
    wake = scheduler.next_wakeup()
    assert wake == scheduler.next_wakeup_by_scan()
    return wake


def test_cancelling_the_oldest_request_moves_the_wakeup_later() -> None:
    scheduler = Scheduler(make_registry(make_spec(delay_ms=10.0)))
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    scheduler.submit(make_request(1), now=0.0)
    scheduler.submit(make_request(2), now=0.004)
    assert agree(scheduler) == pytest.approx(0.010)
    scheduler.cancel((b"bridge-1", 1), now=0.005)
    assert agree(scheduler) == pytest.approx(0.014)
    scheduler.cancel((b"bridge-1", 2), now=0.006)
    assert agree(scheduler) is None  # nothing held: no group delay, no deadline


def test_a_batch_dispatched_early_takes_its_groups_wakeup_with_it() -> None:
    scheduler = Scheduler(make_registry(make_spec(max_batch_size=2, delay_ms=10.0, default_timeout_s=None)))
    scheduler.replica_up("r1", "m", "1", 2, now=0.0)
    scheduler.submit(make_request(1, timeout=100.0), now=0.0)
    assert agree(scheduler) == pytest.approx(0.010)
    [batch] = dispatches(scheduler.submit(make_request(2, timeout=100.0), now=0.001))  # full: leaves at once
    assert agree(scheduler) == pytest.approx(100.0)  # request 1's deadline; no group is waiting
    scheduler.submit(make_request(3, timeout=100.0), now=0.002)
    assert agree(scheduler) == pytest.approx(0.012)
    echo_result(scheduler, batch, now=0.003)
    assert agree(scheduler) == pytest.approx(0.012)


def test_a_removed_model_with_no_replica_left_leaves_no_wakeup() -> None:
    scheduler = Scheduler(make_registry(make_spec(delay_ms=10.0), make_spec("other", delay_ms=50.0)))
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    scheduler.replica_up("r2", "other", "1", 1, now=0.0)
    scheduler.submit(make_request(1, timeout=100.0), now=0.0)
    scheduler.submit(make_request(2, model="other", timeout=100.0), now=0.0)
    assert agree(scheduler) == pytest.approx(0.010)
    scheduler.replica_down("r1", "stopped", now=0.001)
    scheduler.set_registry(make_registry(make_spec("other", delay_ms=50.0)), now=0.002)  # m's request fails
    assert agree(scheduler) == pytest.approx(0.050)


def test_a_shorter_delay_in_a_new_registry_brings_the_wakeup_forward() -> None:
    scheduler = Scheduler(make_registry(make_spec(delay_ms=50.0)))
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    scheduler.submit(make_request(1, timeout=100.0), now=0.0)
    assert agree(scheduler) == pytest.approx(0.050)
    scheduler.set_registry(make_registry(make_spec(delay_ms=5.0)), now=0.001)
    assert agree(scheduler) == pytest.approx(0.005)
    scheduler.set_registry(make_registry(make_spec(delay_ms=20.0)), now=0.002)
    assert agree(scheduler) == pytest.approx(0.020)


def test_a_retried_request_brings_its_groups_wakeup_forward() -> None:
    scheduler = Scheduler(make_registry(make_spec(max_batch_size=1, delay_ms=10.0)))
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    scheduler.replica_up("r2", "m", "1", 1, now=0.0)
    [lost] = dispatches(scheduler.submit(make_request(1, timeout=100.0), now=0.0))
    [other] = dispatches(scheduler.submit(make_request(2, timeout=100.0), now=0.0))
    scheduler.set_registry(make_registry(make_spec(max_batch_size=4, delay_ms=10.0)), now=0.001)
    scheduler.submit(make_request(3, timeout=100.0), now=0.005)  # waits: no credit anywhere
    assert agree(scheduler) == pytest.approx(100.0)
    scheduler.on_failed(lost.replica, lost.batch_id, "replica_lost", "it died", now=0.006)
    assert agree(scheduler) == pytest.approx(100.0)  # r1 is dead, r2 busy: no timer
    assert dispatches(echo_result(scheduler, other, now=0.007)) == []
    # Request 1 went back to the front of the group: the delay counts from its arrival, not request 3's.
    assert agree(scheduler) == pytest.approx(0.010)
    [batch] = dispatches(scheduler.tick(0.010))
    assert [item.n for item in batch.items] == [1, 1]


def test_a_retry_in_front_of_a_waiting_group_brings_its_wakeup_before_another_groups() -> None:
    scheduler = Scheduler(make_registry(make_spec(max_batch_size=4, delay_ms=100.0),
                                        make_spec("other", delay_ms=100.0)))
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    scheduler.replica_up("r2", "m", "1", 1, now=0.0)
    scheduler.replica_up("o1", "other", "1", 1, now=0.0)
    scheduler.submit(make_request(1, 2, timeout=100.0), now=0.0)
    [lost] = dispatches(scheduler.submit(make_request(2, 2, timeout=100.0), now=0.0))  # full: it leaves at once
    scheduler.cancel((b"bridge-1", 2), now=0.01)  # not retried then
    scheduler.submit(make_request(3, timeout=100.0), now=0.05)
    scheduler.submit(make_request(4, model="other", timeout=100.0), now=0.02)
    assert agree(scheduler) == pytest.approx(0.120)
    assert dispatches(scheduler.on_failed(lost.replica, lost.batch_id, "replica_lost", "it died", now=0.06)) == []
    # Request 1 is back in front of request 3, on r2: the group is ready at 0.100, before other's 0.120.
    assert agree(scheduler) == pytest.approx(0.100)


def test_a_group_partly_sent_when_its_delay_ran_out_keeps_a_timer_for_the_rest() -> None:
    # Each request's tensor is 2 bytes ("x1"): a batch holds one.
    scheduler = Scheduler(make_registry(make_spec(max_batch_size=4, delay_ms=10.0)), max_batch_bytes=3)
    scheduler.replica_up("r1", "m", "1", 2, now=0.0)
    scheduler.submit(make_request(1, timeout=100.0), now=0.0)
    scheduler.submit(make_request(2, timeout=100.0), now=0.008)
    [batch] = dispatches(scheduler.tick(0.010))
    assert batch.frames == ["x1"]  # request 2 does not fit: it waits for its own delay
    assert agree(scheduler) == pytest.approx(0.018)


def test_a_group_waiting_for_credit_wants_no_timer_until_credit_comes_back() -> None:
    scheduler = Scheduler(make_registry(make_spec(max_batch_size=4, delay_ms=10.0)))
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    scheduler.submit(make_request(1, timeout=100.0), now=0.0)
    [batch] = dispatches(scheduler.tick(0.010))
    scheduler.submit(make_request(2, timeout=100.0), now=0.011)
    assert agree(scheduler) == pytest.approx(100.0)  # r1 has no credit: the group is parked
    scheduler.submit(make_request(3, timeout=100.0), now=0.012)
    assert agree(scheduler) == pytest.approx(100.0)
    scheduler.replica_up("r2", "m", "1", 1, now=0.015)  # credit: the group's timer is back
    assert agree(scheduler) == pytest.approx(0.021)
    assert len(dispatches(scheduler.tick(0.021))) == 1
    scheduler.submit(make_request(4, timeout=100.0), now=0.022)
    assert agree(scheduler) == pytest.approx(100.0)  # parked again: r1 and r2 are both busy
    assert dispatches(echo_result(scheduler, batch, now=0.040))  # r1's credit: request 4, ready since 0.032
    assert scheduler.queued() == 0


# --- random operation sequences -------------------------------------------------------------------------

MODELS = ["a", "b", "c", "d", "e"]


def registry(rng: random.Random) -> Registry:
    specs = [ModelSpec(name=name, version="1", model_class="x:Y", max_batch_size=rng.choice([1, 2, 4, 8]),
                       max_batch_delay_ms=rng.choice([0.0, 1.0, 5.0, 20.0]), max_queue_size=20)
             for name in MODELS if rng.random() < 0.85]
    return Registry({spec.key: spec for spec in specs}, {spec.name: spec.version for spec in specs}, 1)


def run_sequence(seed: int, steps: int = 400) -> None:
    rng = random.Random(seed)
    scheduler = Scheduler(registry(rng), max_queue_size=50, priority_aging_s=0.002)
    now = 0.0
    next_id = 0
    live: list[tuple[bytes, int]] = []
    outstanding: list[Dispatch] = []
    replicas: list[str] = []

    def take(actions: list[Action]) -> None:
        outstanding.extend(dispatches(actions))

    for _ in range(steps):
        op = rng.random()
        if op < 0.35:
            next_id += 1
            model = rng.choice(MODELS)
            params = RequestParams(priority=rng.choice(list(Priority)))
            request = make_request(next_id, rng.choice([1, 1, 2]), model=model, dims=(rng.choice([3, 4]),),
                                   timeout=rng.choice([0.003, 0.05, 1.0]), now=now)
            take(scheduler.submit(Request(request.origin, request.model, None, request.metas, request.frames,
                                          request.deadline, params), now))
            live.append(request.origin)
        elif op < 0.45 and live:
            take(scheduler.cancel(live.pop(rng.randrange(len(live))), now))
        elif op < 0.6 and outstanding:
            batch = outstanding.pop(rng.randrange(len(outstanding)))
            if rng.random() < 0.8:
                take(echo_result(scheduler, batch, now))
            else:
                take(scheduler.on_failed(batch.replica, batch.batch_id, "replica_lost", "gone", now))
        elif op < 0.68:
            replica = f"r{rng.randrange(8)}"
            take(scheduler.replica_up(replica, rng.choice(MODELS), "1", rng.choice([1, 2]), now))
            replicas.append(replica)
        elif op < 0.72 and replicas:
            replica = replicas.pop(rng.randrange(len(replicas)))
            outstanding[:] = [d for d in outstanding if d.replica != replica]
            if rng.random() < 0.5:
                take(scheduler.replica_down(replica, "stopped", now))
            else:
                take(scheduler.replica_draining(replica, "scaling down", now))
        elif op < 0.76:
            take(scheduler.set_registry(registry(rng), now))
        elif op < 0.9:
            now += rng.choice([0.0005, 0.001, 0.004, 0.02])
            take(scheduler.tick(now))
        else:
            wake = scheduler.next_wakeup()
            if wake is not None:
                now = max(now, wake)
                take(scheduler.tick(now))
        # Asked after some steps only, as the service asks after each drain: stale entries pile up between.
        if rng.random() < 0.5:
            assert scheduler.next_wakeup() == scheduler.next_wakeup_by_scan(), f"seed {seed}"
    assert scheduler.next_wakeup() == scheduler.next_wakeup_by_scan(), f"seed {seed}"


@pytest.mark.parametrize("seed", range(40))
def test_next_wakeup_equals_a_scan_of_every_group_across_random_operations(seed: int) -> None:
    run_sequence(seed)
