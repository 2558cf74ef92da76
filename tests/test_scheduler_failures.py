"""The scheduler when replicas die, batches would not fit on the bus, or a model has no replica (issue 9).

Pure scheduler, hand-held clock: no sockets, no sleeps.
"""

from __future__ import annotations

import pytest

from batch_manager.scheduler import Action, Dispatch, Scheduler
from inferoxy import messages as m
from inferoxy.protocol import ErrorCode
from inferoxy.wire import MAX_HEADER_BYTES
from tests.test_scheduler import dispatches, echo_result, make_registry, make_request, make_spec, only_reply, replies


def two_replicas_one_batch_each() -> tuple[Scheduler, Dispatch, Dispatch]:
    """r1 and r2 hold one batch each (credit 1), two more requests queue behind them."""
    scheduler = Scheduler(make_registry(make_spec(max_batch_size=1, delay_ms=0)))
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    scheduler.replica_up("r2", "m", "1", 1, now=0.0)
    sent: list[Dispatch] = []
    for i in range(4):
        sent += dispatches(scheduler.submit(make_request(i), now=0.0))
    on_r1, on_r2 = sorted(sent, key=lambda d: str(d.replica))
    assert (on_r1.replica, on_r2.replica) == ("r1", "r2") and scheduler.queued() == 2
    return scheduler, on_r1, on_r2


def serve_on_r2(scheduler: Scheduler, first: Dispatch, now: float) -> list[Action]:
    """Answer every batch as r2 until nothing is left; every batch must go to r2."""
    actions: list[Action] = []
    pending = [first]
    while pending:
        batch = pending.pop()
        assert batch.replica == "r2", f"batch {batch.batch_id} went to dead replica {batch.replica!r}"
        answered = echo_result(scheduler, batch, now)
        actions += answered
        pending += dispatches(answered)
    return actions


@pytest.mark.parametrize("down_first", [False, True], ids=["failed-then-down", "down-then-failed"])
def test_a_dead_replicas_batch_is_retried_on_the_healthy_one_and_nothing_goes_to_the_corpse(down_first: bool) -> None:
    # The failure: the task manager reports the death of r1 as `failed` (replica_lost) for its batch and as
    # `replica_down`, in either order. A `failed` used to give r1 its credit back, so the retry and the queue
    # went to the dead replica and failed there.
    scheduler, on_r1, on_r2 = two_replicas_one_batch_each()
    lost = ("r1", on_r1.batch_id, ErrorCode.REPLICA_LOST.value, "replica r1 was lost: killed by signal -9")
    if down_first:
        actions = scheduler.replica_down("r1", "killed by signal -9", now=0.01)
        assert scheduler.knows_batch("r1", on_r1.batch_id), "the late `failed` is expected, not unknown"
        actions += scheduler.on_failed(*lost, now=0.02)
        assert not scheduler.knows_batch("r1", on_r1.batch_id), "it had its one answer"
    else:
        actions = scheduler.on_failed(*lost, now=0.01)
        actions += scheduler.replica_down("r1", "killed by signal -9", now=0.02)
    assert replies(actions) == [] and dispatches(actions) == [], actions  # r2 is busy: the retry waits for it
    assert scheduler.queued() == 3

    answered = replies(serve_on_r2(scheduler, on_r2, now=0.03))
    assert sorted(reply.origin[1] for reply in answered) == [0, 1, 2, 3]
    assert all(reply.ok for reply in answered), [reply.header for reply in answered]


def test_with_one_replica_only_the_batch_it_held_fails_and_the_queue_waits_for_its_replacement() -> None:
    # The failure: with a single replica, `failed` handed the dead replica its credit back, so requests that
    # never reached it were sent to it and failed too.
    scheduler = Scheduler(make_registry(make_spec(max_batch_size=1, delay_ms=0)))
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    [held] = dispatches(scheduler.submit(make_request(0), now=0.0))
    for i in (1, 2):
        assert scheduler.submit(make_request(i), now=0.0) == []

    actions = scheduler.on_failed("r1", held.batch_id, ErrorCode.REPLICA_LOST.value, "lost", now=0.01)
    reply = only_reply(actions)
    assert (reply.origin[1], reply.code) == (0, ErrorCode.REPLICA_LOST.value)
    assert scheduler.replica_down("r1", "lost", now=0.02) == []
    assert scheduler.queued() == 2

    [first] = dispatches(scheduler.replica_up("r1-new", "m", "1", 1, now=0.5))
    assert first.replica == "r1-new"


def test_an_answer_for_a_batch_nobody_sent_is_recognised_as_unknown_and_changes_nothing() -> None:
    # The failure tried: an answer naming another replica's batch, or a batch never sent; it must neither
    # return credit nor answer anyone, and the service must be able to tell (it logs such answers loudly).
    scheduler, on_r1, _ = two_replicas_one_batch_each()
    assert scheduler.knows_batch("r1", on_r1.batch_id)
    assert not scheduler.knows_batch("r2", on_r1.batch_id), "another replica's batch"
    assert not scheduler.knows_batch("r1", 10_000)
    assert scheduler.on_failed("r2", on_r1.batch_id, ErrorCode.INTERNAL.value, "mix-up", now=0.0) == []
    assert scheduler.batches_in_flight("r1") == 1 and scheduler.pending() == 4


def test_a_burst_is_cut_into_batches_whose_header_fits_the_bus_limit() -> None:
    # The failure: a batch header over the bus's 1 MiB limit was dropped by the task manager, and its
    # replica's credit never came back (max_batch_size 8192, 4 inputs, a burst of 8,000). Scaled down here.
    scheduler = Scheduler(make_registry(make_spec(max_batch_size=64, delay_ms=5)), max_header_bytes=4000)
    for i in range(64):
        scheduler.submit(make_request(i), now=0.0)
    actions = scheduler.replica_up("r1", "m", "1", 64, now=0.01)
    batches = dispatches(actions)
    assert sum(len(b.items) for b in batches) == 64 and len(batches) > 1
    for batch in batches:
        assert len(m.encode(batch.header())) <= 4000


def test_a_batch_closes_early_when_its_tensors_would_pass_the_message_limit() -> None:
    # The failure tried: tensors of many requests adding up past INFEROXY_MAX_MESSAGE_BYTES in one batch.
    scheduler = Scheduler(make_registry(make_spec(max_batch_size=8, delay_ms=5)), max_batch_bytes=10)
    for i in range(6):
        request = make_request(i)
        request.frames = [b"abcd"]  # 4 bytes each: two fit in 10
        scheduler.submit(request, now=0.0)
    batches = dispatches(scheduler.replica_up("r1", "m", "1", 8, now=0.01))
    assert [len(b.items) for b in batches] == [2, 2, 2]


def test_a_request_whose_descriptions_alone_pass_the_header_limit_is_refused_at_once() -> None:
    # The failure tried: one request (a ~2 kB tensor name here, ~1 MB in the issue) that no batch header can
    # carry; it must be refused at once, not dispatched into a batch the bus then drops.
    scheduler = Scheduler(make_registry(make_spec()), max_header_bytes=1000)
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    request = make_request(0)
    request.metas[0]["name"] = "x" * 2000
    reply = only_reply(scheduler.submit(request, now=0.0))
    assert reply.code == ErrorCode.BAD_INPUT.value and "1000" in reply.header.message


def test_a_stopped_model_answers_not_ready_at_once() -> None:
    # The failure: after `inferoxy models unload` (or with min_replicas 0) requests waited their whole
    # timeout and got `deadline`.
    reason = "min_replicas is 0 and no replica is running"
    scheduler = Scheduler(make_registry(make_spec()))
    assert scheduler.submit(make_request(0), now=0.0) == []  # queued: the task manager has not spoken yet
    queued = only_reply(scheduler.model_status("m", "1", "stopped", reason, now=0.1))
    assert (queued.origin[1], queued.code) == (0, ErrorCode.NOT_READY.value)
    refused = only_reply(scheduler.submit(make_request(1, now=0.2), now=0.2))
    assert refused.code == ErrorCode.NOT_READY.value
    assert "stopped" in refused.header.message and reason in refused.header.message

    # The hook for an autoscaler: a replica being started makes the state `starting`, and requests wait.
    assert scheduler.model_status("m", "1", "starting", None, now=0.3) == []
    assert scheduler.submit(make_request(2, now=0.3), now=0.3) == []
    [batch] = dispatches(scheduler.replica_up("r1", "m", "1", 1, now=0.4))
    assert [item.id for item in batch.items] and scheduler.queued() == 0


def test_the_issues_burst_8000_requests_of_4_inputs_never_makes_a_header_over_the_bus_limit() -> None:
    # The reproduction from issue 9: max_batch_size 8192, 4 inputs, an 8,000-request burst, real limits.
    inputs = [f"input_tensor_{i}" for i in range(4)]
    scheduler = Scheduler(make_registry(make_spec(max_batch_size=8192, delay_ms=50, max_queue_size=10_000)))
    for i in range(8000):
        request = make_request(i)
        request.metas = [{"name": name, "dtype": "float32", "shape": [1, 3]} for name in inputs]
        request.frames = [b"\0" * 12] * 4
        scheduler.submit(request, now=0.0)
    batches = dispatches(scheduler.replica_up("r1", "m", "1", 64, now=0.1))  # past the delay: all go
    assert sum(len(batch.items) for batch in batches) == 8000
    assert len(batches) > 1
    assert max(len(m.encode(batch.header())) for batch in batches) <= MAX_HEADER_BYTES
