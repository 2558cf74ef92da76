"""The autoscaler's policy, pure: no sockets, no clock (the test gives the time and what the task manager sees)."""

from __future__ import annotations

from typing import Any

from model_manager.spec import ModelSpec
from task_manager.autoscaler import Autoscaler, Decision, Observation

CAPACITY = 2  # batches each ready replica holds at once


def spec_of(**fields: Any) -> ModelSpec:
    defaults: dict[str, Any] = {"min_replicas": 1, "max_replicas": 3, "scale_up_delay_s": 2.0,
                                "scale_down_delay_s": 60.0, "max_batch_size": 1}
    return ModelSpec(name="m", model_class="x:Y", **{**defaults, **fields})


def seen(queued: int, in_flight: int, ready: int) -> Observation:
    return Observation(queued, in_flight, ready, CAPACITY * ready)


def drive(scaler: Autoscaler, spec: ModelSpec, observation: Observation, start: float, end: float,
          step: float = 0.5) -> list[tuple[float, Decision]]:
    """The same observation every ``step`` seconds from ``start`` to ``end``: the decisions, with their time."""
    moves = []
    now = start
    while now <= end + 1e-9:
        decision = scaler.observe(spec, observation, now)
        if decision is not None:
            moves.append((now, decision))
        now += step
    return moves


def test_saturated_replicas_with_requests_waiting_scale_up_after_the_delay() -> None:
    spec = spec_of(max_batch_size=4)
    scaler = Autoscaler(target=1)
    assert scaler.observe(spec, seen(queued=4, in_flight=2, ready=1), 10.0) is None
    assert scaler.observe(spec, seen(queued=4, in_flight=2, ready=1), 11.5) is None, "before scale_up_delay_s"
    decision = scaler.observe(spec, seen(queued=4, in_flight=2, ready=1), 12.0)
    assert decision is not None and (decision.target, decision.direction, decision.cause) == (2, "up", "saturated")
    assert "2 batches at 1 ready replicas" in decision.reason and "4 requests waiting" in decision.reason
    assert scaler.target == 2


def test_a_step_up_covers_the_load_up_to_max_replicas() -> None:
    # 2 batches in flight, 12 requests waiting (batches of 1): 14 batches, 7 replicas of 2; max is 3.
    scaler = Autoscaler(target=1)
    moves = drive(scaler, spec_of(), seen(queued=12, in_flight=2, ready=1), 0.0, 2.0)
    assert [(t, d.target) for t, d in moves] == [(2.0, 3)]
    assert scaler.observe(spec_of(), seen(queued=12, in_flight=6, ready=3), 10.0) is None, "at max_replicas"


def test_a_dip_in_the_load_restarts_the_scale_up_clock() -> None:
    spec = spec_of()
    scaler = Autoscaler(target=1)
    assert not drive(scaler, spec, seen(queued=3, in_flight=2, ready=1), 0.0, 1.5)
    assert scaler.observe(spec, seen(queued=0, in_flight=2, ready=1), 1.6) is None, "nothing waits: not saturated"
    assert [t for t, _ in drive(scaler, spec, seen(queued=3, in_flight=2, ready=1), 2.0, 5.0)] == [4.0]


def test_busy_replicas_with_nothing_waiting_do_not_scale_up() -> None:
    assert not drive(Autoscaler(target=1), spec_of(), seen(queued=0, in_flight=2, ready=1), 0.0, 30.0)


def test_replicas_still_starting_are_capacity_on_its_way() -> None:
    spec = spec_of(max_batch_size=1)
    scaler = Autoscaler(target=1)
    [(_, first)] = drive(scaler, spec, seen(queued=2, in_flight=2, ready=1), 0.0, 2.0)
    assert first.target == 2
    # The new replica takes 10 s to start: the load stays, yet no second step while it is on its way.
    assert not drive(scaler, spec, seen(queued=2, in_flight=2, ready=1), 2.5, 12.0)
    # Once it is ready and both stay saturated, the clock starts from then.
    moves = drive(scaler, spec, seen(queued=4, in_flight=4, ready=2), 12.5, 20.0)
    assert [(t, d.target) for t, d in moves] == [(14.5, 3)]


def test_target_in_flight_per_replica_sets_the_threshold_instead_of_the_capacity() -> None:
    # Capacity 2 each, but the spec wants 1 batch per replica: 1 in flight with requests waiting is enough.
    spec = spec_of(target_in_flight_per_replica=1.0)
    assert [d.target for _, d in drive(Autoscaler(target=1), spec, seen(queued=1, in_flight=1, ready=1), 0, 2)] \
        == [2]
    assert not drive(Autoscaler(target=1), spec_of(), seen(queued=1, in_flight=1, ready=1), 0, 10), \
        "unset: the replica's capacity (2)"


def test_down_one_replica_at_a_time_after_the_delay_each() -> None:
    spec = spec_of(scale_down_delay_s=60.0)
    scaler = Autoscaler(target=3)
    moves = drive(scaler, spec, seen(queued=0, in_flight=0, ready=3), 0.0, 59.5)
    assert not moves, "before scale_down_delay_s"
    decision = scaler.observe(spec, seen(queued=0, in_flight=0, ready=3), 60.0)
    assert decision is not None and (decision.target, decision.direction, decision.cause) == (2, "down", "underused")
    # The next step waits a whole delay again (the cooldown), and stops at min_replicas.
    moves = drive(scaler, spec, seen(queued=0, in_flight=0, ready=2), 60.5, 300.0)
    assert [(t, d.target) for t, d in moves] == [(120.5, 1)]
    assert scaler.target == 1


def test_the_down_threshold_is_well_under_the_up_one_so_a_steady_load_never_flaps() -> None:
    spec = spec_of(scale_up_delay_s=2.0, scale_down_delay_s=10.0)
    scaler = Autoscaler(target=2)
    # Two replicas each hold 1.5 batches on average: too much for one at half its capacity (1), not saturated.
    for i in range(2000):
        now = i * 0.5
        in_flight = 3 if i % 2 else 2
        assert scaler.observe(spec, seen(queued=0, in_flight=in_flight, ready=2), now) is None
    # At 1 batch (fits one replica at half its capacity) it goes down once, and stays there.
    moves = drive(scaler, spec, seen(queued=0, in_flight=1, ready=2), 1000.0, 1100.0)
    assert [d.target for _, d in moves] == [1]
    assert not drive(scaler, spec, seen(queued=0, in_flight=1, ready=1), 1100.5, 1300.0)


def test_a_short_burst_does_not_hold_a_scale_down_back_but_a_sustained_load_does() -> None:
    # Reports are instants: one catching a burst (or a request in its batching window) restarted a wait of
    # scale_down_delay_s, and in a bench run the last replica never went. The down rule averages the window.
    spec = spec_of(scale_down_delay_s=10.0)
    scaler = Autoscaler(target=2)
    assert not drive(scaler, spec, seen(queued=0, in_flight=0, ready=2), 0.0, 9.5)
    assert scaler.observe(spec, seen(queued=3, in_flight=4, ready=2), 9.6) is None
    moves = drive(scaler, spec, seen(queued=0, in_flight=0, ready=2), 10.0, 30.0)
    assert [t for t, _ in moves] == [10.0], "7 batches for 0.4 s average 0.28 over 10 s: under 1, it goes down"
    assert "0.28 batches on average over 10s" in moves[0][1].reason

    scaler = Autoscaler(target=2)
    assert not drive(scaler, spec, seen(queued=0, in_flight=0, ready=2), 0.0, 9.5)
    # 4 batches now: more than one replica holds, whatever the window's average says.
    assert not drive(scaler, spec, seen(queued=0, in_flight=4, ready=2), 9.5, 12.0)
    # Three seconds of them weigh 1.2 batches over the window: more than one replica at half its capacity, until
    # the window holds only 2.5 of those seconds.
    moves = drive(scaler, spec, seen(queued=0, in_flight=0, ready=2), 12.5, 40.0)
    assert [t for t, _ in moves] == [20.0], "down once the busy seconds weigh 1 batch or less over the window"


def test_min_zero_scales_to_zero_when_idle_and_back_at_once_on_a_request() -> None:
    spec = spec_of(min_replicas=0, max_replicas=2, scale_up_delay_s=30.0, scale_down_delay_s=5.0)
    scaler = Autoscaler(target=1)
    assert not drive(scaler, spec, seen(queued=0, in_flight=1, ready=1), 0.0, 20.0), "busy: not idle"
    moves = drive(scaler, spec, seen(queued=0, in_flight=0, ready=1), 20.5, 30.0)
    assert [(t, d.target, d.cause) for t, d in moves] == [(25.5, 0, "idle")]
    assert not drive(scaler, spec, Observation(0, 0, 0, 0), 30.5, 100.0), "idle stays idle"
    decision = scaler.observe(spec, Observation(queued=1, in_flight=0, ready=0, capacity=0), 100.2)
    assert decision is not None and (decision.target, decision.cause) == (1, "cold_start"), \
        "no scale_up_delay_s from zero: the request is already waiting"
    # While the first replica starts, requests keep waiting: no further step, and no scale back to zero.
    assert not drive(scaler, spec, Observation(queued=5, in_flight=0, ready=0, capacity=0), 100.5, 200.0)


def test_a_model_with_max_replicas_zero_never_starts_on_demand() -> None:
    spec = spec_of(min_replicas=0, max_replicas=0)
    scaler = Autoscaler(target=0)
    assert not drive(scaler, spec, Observation(queued=5, in_flight=0, ready=0, capacity=0), 0.0, 100.0)


def test_a_spec_change_clamps_the_target_into_its_bounds_at_once() -> None:
    scaler = Autoscaler(target=3)
    decision = scaler.bound(spec_of(min_replicas=1, max_replicas=2))
    assert decision is not None and (decision.target, decision.direction, decision.cause) == (2, "down", "bounds")
    assert scaler.bound(spec_of(min_replicas=1, max_replicas=2)) is None
    decision = scaler.observe(spec_of(min_replicas=3, max_replicas=4), seen(queued=0, in_flight=0, ready=2), 0.0)
    assert decision is not None and (decision.target, decision.direction) == (3, "up")
    unloaded = scaler.bound(spec_of(min_replicas=0, max_replicas=0))
    assert unloaded is not None and unloaded.target == 0
