"""The batch manager's scheduler, driven with a hand-held clock: no sockets, no sleeps."""

from __future__ import annotations

from collections import Counter
from typing import Any, NamedTuple

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch_manager.messages import ReplicaId
from batch_manager.params import MAX_PARAMETERS_BYTES, Priority, RequestParams, SessionParams, parse_params
from batch_manager.scheduler import Action, Dispatch, ModelDrained, Reply, Request, Scheduler
from inferoxy import messages as m
from inferoxy.protocol import ErrorCode
from inferoxy.wire import MAX_HEADER_BYTES, WireError
from model_manager.spec import ModelSpec, TensorSpec
from model_manager.store import Registry

BRIDGE = b"bridge-1"


def make_spec(name: str = "m", version: str = "1", max_batch_size: int = 4, delay_ms: float = 10.0,
              **extra: Any) -> ModelSpec:
    return ModelSpec(name=name, version=version, model_class="examples.models.echo:Echo",
                     max_batch_size=max_batch_size, max_batch_delay_ms=delay_ms, **extra)


def make_registry(*specs: ModelSpec) -> Registry:
    return Registry({spec.key: spec for spec in specs}, {spec.name: spec.version for spec in specs}, 1)


def make_request(request_id: int, rows: int = 1, *, model: str = "m", version: str | None = None,
                 dims: tuple[int, ...] = (3,), dtype: str = "float32", now: float = 0.0, timeout: float = 10.0,
                 bridge: bytes = BRIDGE) -> Request:
    metas = [{"name": "x", "dtype": dtype, "shape": [rows, *dims]}]
    return Request((bridge, request_id), model, version, metas, [f"x{request_id}"], now + timeout)


def dispatches(actions: list[Action]) -> list[Dispatch]:
    return [action for action in actions if isinstance(action, Dispatch)]


def replies(actions: list[Action]) -> list[Reply]:
    return [action for action in actions if isinstance(action, Reply)]


def only_reply(actions: list[Action]) -> Reply:
    found = replies(actions)
    assert len(found) == 1 and not dispatches(actions), actions
    return found[0]


def echo_result(scheduler: Scheduler, dispatch: Dispatch, now: float) -> list[Action]:
    """Answer a batch the way an echo model would: every item's inputs become its outputs."""
    counts = [item.n for item in dispatch.items]
    return scheduler.on_result(dispatch.replica, dispatch.batch_id, counts, dispatch.metas, dispatch.frames, now)


@pytest.fixture
def scheduler() -> Scheduler:
    return Scheduler(make_registry(make_spec(), make_spec("wide", max_batch_size=8, delay_ms=0)))


def test_batch_leaves_as_soon_as_it_is_full(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    for i in range(3):
        assert scheduler.submit(make_request(i, now=0.0), now=0.0) == []
    actions = scheduler.submit(make_request(3), now=0.001)
    [batch] = dispatches(actions)
    assert replies(actions) == []
    assert batch.replica == "r1" and batch.model == "m" and batch.version == "1"
    assert [item.n for item in batch.items] == [1, 1, 1, 1]
    assert batch.frames == ["x0", "x1", "x2", "x3"]
    assert batch.header().tensors == batch.metas and isinstance(batch.header(), m.Batch)
    assert scheduler.queued() == 0


def test_batch_leaves_at_its_groups_delay_deadline(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "m", "1", 4, now=0.0)
    scheduler.submit(make_request(1, now=0.0), now=0.0)
    scheduler.submit(make_request(2, now=0.004), now=0.004)
    # A second group (other non-batch dims) has its own deadline, counted from its own first request.
    scheduler.submit(make_request(3, dims=(5,), now=0.006), now=0.006)
    assert scheduler.next_wakeup() == pytest.approx(0.010)
    assert scheduler.tick(0.0099) == []
    [first] = dispatches(scheduler.tick(0.010))
    assert first.frames == ["x1", "x2"]
    assert scheduler.next_wakeup() == pytest.approx(0.016)
    [second] = dispatches(scheduler.tick(0.016))
    assert second.frames == ["x3"]
    # Nothing is queued; what is left to watch is the deadline of the requests in flight.
    assert scheduler.next_wakeup() == pytest.approx(10.0)


def test_zero_delay_dispatches_at_once_and_queue_grows_while_credit_is_out(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "wide", "1", 1, now=0.0)
    [first] = dispatches(scheduler.submit(make_request(0, model="wide"), now=0.0))
    for i in range(1, 6):
        assert scheduler.submit(make_request(i, model="wide"), now=0.0) == []
    assert scheduler.queued("wide/1") == 5
    # No timer is needed while the only replica has no credit: the result is what frees it.
    assert scheduler.next_wakeup() == pytest.approx(10.0)
    actions = echo_result(scheduler, first, now=0.001)
    assert [reply.origin for reply in replies(actions)] == [(BRIDGE, 0)]
    [bigger] = dispatches(actions)
    assert bigger.frames == ["x1", "x2", "x3", "x4", "x5"]


def test_credit_is_never_exceeded(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "wide", "1", 2, now=0.0)
    sent: list[Dispatch] = []
    for i in range(30):
        sent += dispatches(scheduler.submit(make_request(i, rows=3, model="wide"), now=i * 0.001))
        sent += dispatches(scheduler.tick(i * 0.001))
        assert scheduler.batches_in_flight("r1") <= 2
    assert len(sent) == 2
    assert all(sum(meta["shape"][0] for meta in batch.metas) <= 8 for batch in sent)
    sent += dispatches(echo_result(scheduler, sent[0], now=1.0))
    assert len(sent) == 3 and scheduler.batches_in_flight("r1") == 2
    # The next batch takes whole requests in arrival order up to max_batch_size rows: 3 + 3 (a third would be 9).
    assert sent[2].frames == ["x2", "x3"]


def test_a_share_moved_by_credit_parks_and_then_dispatches(scheduler: Scheduler) -> None:
    # Several batch managers share a replica: the task manager moves each one's share with `credit`.
    scheduler.replica_up("r1", "wide", "1", 2, now=0.0)
    [first] = dispatches(scheduler.submit(make_request(0, model="wide"), now=0.0))
    assert scheduler.replica_credit("r1", 0, now=0.0) == []
    assert scheduler.submit(make_request(1, model="wide"), now=0.0) == [], "no share: it waits, parked"
    assert replies(actions := echo_result(scheduler, first, now=0.01)) and not dispatches(actions)
    [second] = dispatches(scheduler.replica_credit("r1", 1, now=0.02))
    assert second.frames == ["x1"]
    assert scheduler.replica_credit("unknown", 3, now=0.02) == [], "a replica it does not know: nothing to do"


def test_requests_with_no_share_anywhere_ask_for_one_at_once(scheduler: Scheduler) -> None:
    # Its load report is what makes the task manager give it a share: it must not wait for the periodic one.
    scheduler.replica_up("r1", "wide", "1", 0, now=0.0)
    assert scheduler.submit(make_request(0, model="wide"), now=0.0) == []
    assert scheduler.take_cold_demand() and not scheduler.take_cold_demand()
    scheduler.replica_credit("r1", 1, now=0.0)
    scheduler.submit(make_request(1, model="wide"), now=0.0)
    scheduler.submit(make_request(2, model="wide"), now=0.0)
    assert not scheduler.take_cold_demand(), "a replica busy with its share is not cold"


def test_load_spreads_over_replicas(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "wide", "1", 2, now=0.0)
    scheduler.replica_up("r2", "wide", "1", 2, now=0.0)
    sent = [d for i in range(4) for d in dispatches(scheduler.submit(make_request(i, model="wide"), now=0.0))]
    assert Counter(batch.replica for batch in sent) == {"r1": 2, "r2": 2}
    assert sent[0].replica != sent[1].replica


def test_requests_that_differ_in_non_batch_dimensions_never_share_a_batch(scheduler: Scheduler) -> None:
    scheduler.submit(make_request(1, dims=(3,)), now=0.0)
    scheduler.submit(make_request(2, dims=(4,)), now=0.0)
    scheduler.submit(make_request(3, dims=(3,), dtype="float64"), now=0.0)
    scheduler.submit(make_request(4, rows=2, dims=(3,)), now=0.0)
    actions = scheduler.replica_up("r1", "m", "1", 8, now=1.0)
    batches = {tuple(batch.frames) for batch in dispatches(actions)}
    assert batches == {("x1", "x4"), ("x2",), ("x3",)}
    for batch in dispatches(actions):
        assert len({(m["name"], m["dtype"], tuple(m["shape"][1:])) for m in batch.metas}) == 1


def test_results_go_back_to_the_right_requests_in_item_order(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    # Two bridges, ids that only mean something per bridge, the default version or an explicit one.
    for i, (origin, version) in enumerate([((b"a", 10), None), ((b"b", 7), "1"), ((b"a", 12), None)]):
        metas = [{"name": "y", "dtype": "int64", "shape": [1]}, {"name": "x", "dtype": "int64", "shape": [1, 2]}]
        scheduler.submit(Request(origin, "m", version, metas, [f"y{i}", f"x{i}"], 10.0), now=0.0)
    [batch] = dispatches(scheduler.tick(0.010))
    # Each item's tensors are listed by name, so a replica can concatenate them by position.
    assert [meta["name"] for meta in batch.metas] == ["x", "y"] * 3
    assert batch.frames == ["x0", "y0", "x1", "y1", "x2", "y2"]
    outputs = [{"name": "out", "dtype": "float32", "shape": [1]}] * 3
    actions = scheduler.on_result("r1", batch.batch_id, [1, 1, 1], outputs, ["o0", "o1", "o2"], now=0.02)
    got = {reply.origin: reply for reply in replies(actions)}
    assert set(got) == {(b"a", 10), (b"b", 7), (b"a", 12)}
    assert got[(b"b", 7)].frames == ["o1"] and got[(b"a", 12)].frames == ["o2"]
    assert msgspec.to_builtins(got[(b"b", 7)].header) == {"t": "reply", "id": 7, "model": "m", "version": "1",
                                                          "tensors": [outputs[1]]}
    assert all(reply.ok for reply in got.values())
    assert scheduler.pending() == 0


def test_a_malformed_result_fails_every_request_of_its_batch(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "wide", "1", 1, now=0.0)
    [batch] = dispatches(scheduler.submit(make_request(1, model="wide"), now=0.0))
    actions = scheduler.on_result("r1", batch.batch_id, [1, 1], [], [], now=0.1)
    assert only_reply(actions).code == "internal"
    assert scheduler.batches_in_flight() == 0


def test_failed_batch_passes_its_code_on(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "wide", "1", 2, now=0.0)
    [one] = dispatches(scheduler.submit(make_request(1, model="wide"), now=0.0))
    [two] = dispatches(scheduler.submit(make_request(2, model="wide"), now=0.0))
    reply = only_reply(scheduler.on_failed("r1", one.batch_id, "model_error", "ZeroDivisionError", now=0.1))
    assert msgspec.to_builtins(reply.header) == {"t": "error", "id": 1, "code": "model_error",
                                                 "message": "ZeroDivisionError"}
    assert only_reply(scheduler.on_failed("r1", two.batch_id, "no-such-code", "?", now=0.1)).code == "internal"


def test_replica_down_retries_stateless_batches_once_on_another_replica(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "wide", "1", 2, now=0.0)
    scheduler.replica_up("r2", "wide", "1", 1, now=0.0)
    sent = [d for i in range(3) for d in dispatches(scheduler.submit(make_request(i, model="wide"), now=0.0))]
    on_r1 = [batch for batch in sent if batch.replica == "r1"]
    [on_r2] = [batch for batch in sent if batch.replica == "r2"]
    assert len(on_r1) == 2
    # r1 dies: its requests go back to the head of the queue, nobody is answered yet.
    assert scheduler.replica_down("r1", "exit code 137", now=0.5) == []
    assert scheduler.queued("wide/1") == 2
    # A result that arrives after the replica was declared down is ignored, not answered twice.
    assert echo_result(scheduler, on_r1[0], now=0.6) == []
    assert scheduler.replica_down("r1", "again", now=0.7) == []
    actions = echo_result(scheduler, on_r2, now=0.8)
    [retry] = dispatches(actions)
    assert retry.replica == "r2" and sorted(retry.frames) == sorted(f for b in on_r1 for f in b.frames)
    # The second death is final: replica_lost, with the reason.
    lost = replies(scheduler.replica_down("r2", "exit code 137", now=0.9))
    assert sorted(reply.origin[1] for reply in lost) == sorted(int(b.frames[0][1:]) for b in on_r1)
    assert all(reply.code == "replica_lost" and "exit code 137" in reply.header.message for reply in lost)
    assert scheduler.pending() == 0


def test_replica_down_without_another_replica_fails_at_once(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "wide", "1", 1, now=0.0)
    [batch] = dispatches(scheduler.submit(make_request(1, model="wide"), now=0.0))
    [lost] = replies(scheduler.replica_down("r1", "exit code 137", now=0.5))
    assert lost.code == "replica_lost" and scheduler.pending() == 0


def test_a_replica_announced_again_is_a_new_incarnation(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "wide", "1", 1, now=0.0)
    [old] = dispatches(scheduler.submit(make_request(1, model="wide"), now=0.0))
    scheduler.submit(make_request(2, model="wide"), now=0.0)
    # A restarted task manager announces its new replica under the old id: the old batch is lost, and
    # the credit it held is not leaked.
    actions = scheduler.replica_up("r1", "wide", "1", 1, now=1.0)
    [lost] = replies(actions)
    assert lost.origin == (BRIDGE, 1) and lost.code == "replica_lost"
    [new] = dispatches(actions)
    assert new.frames == ["x2"] and new.batch_id != old.batch_id
    assert echo_result(scheduler, old, now=1.1) == []


def test_queued_requests_fail_when_their_deadline_passes(scheduler: Scheduler) -> None:
    scheduler.submit(make_request(1, timeout=0.5), now=0.0)
    scheduler.submit(make_request(2, timeout=1.0), now=0.0)
    assert scheduler.next_wakeup() == pytest.approx(0.5)
    reply = only_reply(scheduler.tick(0.5))
    assert reply.origin == (BRIDGE, 1) and reply.code == "deadline"
    assert "no ready replica" in reply.header.message
    assert scheduler.next_wakeup() == pytest.approx(1.0)
    assert only_reply(scheduler.tick(2.0)).origin == (BRIDGE, 2)
    assert scheduler.next_wakeup() is None and scheduler.queued() == 0


def test_in_flight_request_past_its_deadline_is_answered_once_and_keeps_credit_taken(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "wide", "1", 1, now=0.0)
    [batch] = dispatches(scheduler.submit(make_request(1, model="wide", timeout=1.0), now=0.0))
    scheduler.submit(make_request(2, model="wide", timeout=5.0), now=0.0)
    assert only_reply(scheduler.tick(1.0)).code == "deadline"
    # The replica still works on that batch: no second batch until it answers.
    assert scheduler.batches_in_flight("r1") == 1
    actions = echo_result(scheduler, batch, now=1.5)
    assert replies(actions) == [] and len(dispatches(actions)) == 1


def test_unknown_model_and_missing_registry() -> None:
    assert only_reply(Scheduler().submit(make_request(1), now=0.0)).code == "not_ready"
    scheduler = Scheduler(make_registry(make_spec()))
    reply = only_reply(scheduler.submit(make_request(1, model="nope"), now=0.0))
    assert reply.header.code == "unknown_model" and reply.header.id == 1
    assert only_reply(scheduler.submit(make_request(2, version="9"), now=0.0)).code == "unknown_model"
    assert scheduler.pending() == 0


@pytest.mark.parametrize(
    ("metas", "frames", "needle"),
    [
        ([], [], "at least one tensor"),
        ([{"name": "x", "dtype": "float32", "shape": []}], ["f"], "leading (batch) dimension"),
        ([{"name": "x", "dtype": "float32", "shape": [0, 3]}], ["f"], "leading (batch) dimension"),
        ([{"name": "x", "dtype": "float32", "shape": [2]}, {"name": "y", "dtype": "float32", "shape": [3]}],
         ["f", "g"], "disagree"),
        ([{"name": "x", "dtype": "float32", "shape": [1]}, {"name": "x", "dtype": "float32", "shape": [1]}],
         ["f", "g"], "unique"),
        ([{"name": "x", "dtype": "float32", "shape": [5, 3]}], ["f"], "exceed max_batch_size 4"),
    ],
)
def test_bad_input(scheduler: Scheduler, metas: list[dict[str, Any]], frames: list[str], needle: str) -> None:
    reply = only_reply(scheduler.submit(Request((BRIDGE, 1), "m", None, metas, frames, 10.0), now=0.0))
    assert reply.code == "bad_input"
    assert needle in reply.header.message


def test_inputs_are_checked_against_the_spec_when_it_declares_them() -> None:
    spec = make_spec(inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 3])])
    scheduler = Scheduler(make_registry(spec))
    assert scheduler.submit(make_request(1, dims=(7, 3)), now=0.0) == []
    assert "shape" in only_reply(scheduler.submit(make_request(2, dims=(7, 4)), now=0.0)).header.message
    assert "float32" in only_reply(scheduler.submit(make_request(3, dims=(7, 3), dtype="int8"), now=0.0)).header.message
    assert "inputs are ['x']" in only_reply(scheduler.submit(
        Request((BRIDGE, 4), "m", None, [{"name": "z", "dtype": "float32", "shape": [1, 1, 3]}], ["f"], 9.0),
        now=0.0)).header.message


def test_overloaded_beyond_max_queue_size() -> None:
    scheduler = Scheduler(make_registry(make_spec(), make_spec("other")), max_queue_size=3)
    for i in range(3):
        assert scheduler.submit(make_request(i), now=0.0) == []
    reply = only_reply(scheduler.submit(make_request(3), now=0.0))
    assert reply.code == "overloaded"
    # The bound is per model version.
    assert scheduler.submit(make_request(4, model="other"), now=0.0) == []
    scheduler.cancel((BRIDGE, 0))
    assert scheduler.submit(make_request(5), now=0.0) == []


def test_cancelled_request_is_dropped_silently(scheduler: Scheduler) -> None:
    scheduler.submit(make_request(1), now=0.0)
    scheduler.submit(make_request(2), now=0.0)
    scheduler.cancel((BRIDGE, 1))
    scheduler.cancel((BRIDGE, 99))  # unknown: nothing to do
    [batch] = dispatches(scheduler.replica_up("r1", "m", "1", 1, now=1.0))
    assert batch.frames == ["x2"]
    scheduler.cancel((BRIDGE, 2))  # in flight: its result is dropped
    assert echo_result(scheduler, batch, now=1.1) == []
    assert scheduler.tick(100.0) == [] and scheduler.pending() == 0


def test_duplicate_id_from_one_bridge_is_refused_but_other_bridges_may_reuse_it(scheduler: Scheduler) -> None:
    scheduler.submit(make_request(1), now=0.0)
    assert only_reply(scheduler.submit(make_request(1), now=0.0)).code == "bad_input"
    assert scheduler.submit(make_request(1, bridge=b"other"), now=0.0) == []
    assert scheduler.pending() == 2


def test_fail_all_answers_queued_and_in_flight_requests(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "wide", "1", 1, now=0.0)
    scheduler.submit(make_request(1, model="wide"), now=0.0)
    scheduler.submit(make_request(2, model="wide"), now=0.0)
    scheduler.submit(make_request(3), now=0.0)
    actions = scheduler.fail_all(ErrorCode.NOT_READY, "stopping")
    assert sorted(reply.origin[1] for reply in replies(actions)) == [1, 2, 3]
    assert {reply.code for reply in replies(actions)} == {"not_ready"}
    assert scheduler.pending() == 0 and scheduler.queued() == 0 and scheduler.next_wakeup() is None


def test_oldest_ready_group_goes_first(scheduler: Scheduler) -> None:
    scheduler.submit(make_request(1, dims=(4,)), now=0.0)
    scheduler.submit(make_request(2, dims=(3,)), now=0.001)
    scheduler.submit(make_request(3, dims=(4,)), now=0.002)
    actions = scheduler.replica_up("r1", "m", "1", 1, now=0.05)
    [batch] = dispatches(actions)
    assert batch.frames == ["x1", "x3"]
    [batch] = dispatches(echo_result(scheduler, batch, now=0.06))
    assert batch.frames == ["x2"]


def drained(actions: list[Action]) -> list[tuple[str, str]]:
    return [(a.model, a.version) for a in actions if isinstance(a, ModelDrained)]


def test_removed_model_without_a_replica_fails_its_queued_requests(scheduler: Scheduler) -> None:
    scheduler.submit(make_request(1), now=0.0)
    actions = scheduler.set_registry(make_registry(make_spec("wide")), now=0.1)
    assert only_reply(actions).code == "unknown_model"
    assert drained(actions) == [("m", "1")]
    assert scheduler.next_wakeup() is None


def test_removed_model_serves_what_it_queued_and_refuses_new_requests(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    [first] = dispatches(scheduler.submit(make_request(0, rows=4), now=0.0))  # full: leaves at once
    for i in range(1, 6):
        scheduler.submit(make_request(i), now=0.0)
    actions = scheduler.set_registry(make_registry(make_spec("wide")), now=0.01)
    assert replies(actions) == [] and drained(actions) == []
    assert scheduler.queued("m/1") == 5
    assert only_reply(scheduler.submit(make_request(9), now=0.02)).code == "unknown_model"
    answered: list[Reply] = []
    actions = echo_result(scheduler, first, now=0.05)
    answered += replies(actions)
    assert drained(actions) == []
    [second] = dispatches(actions)  # the queued requests still go, with the spec they had
    assert second.model == "m" and second.frames == ["x1", "x2", "x3", "x4"]
    actions = echo_result(scheduler, second, now=0.06)
    answered += replies(actions)
    [third] = dispatches(actions)
    assert drained(actions) == [], "a batch is still at the replica"
    actions = echo_result(scheduler, third, now=0.07)
    answered += replies(actions)
    assert drained(actions) == [("m", "1")]
    assert [(r.origin[1], r.ok) for r in answered] == [(i, True) for i in range(6)]
    assert drained(scheduler.tick(1.0)) == [], "said once"
    assert scheduler.pending() == 0


def test_removed_model_with_nothing_queued_is_drained_at_once(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    assert drained(scheduler.set_registry(make_registry(make_spec("wide")), now=0.0)) == [("m", "1")]
    # A version that was never used here is reported too: the task manager waits for every batch manager.
    assert drained(scheduler.set_registry(make_registry(), now=0.0)) == [("wide", "1")]


def test_removed_model_added_again_before_it_drained_is_served_as_before(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    [first] = dispatches(scheduler.submit(make_request(0, rows=4), now=0.0))
    scheduler.set_registry(make_registry(make_spec("wide")), now=0.01)
    actions = scheduler.set_registry(make_registry(make_spec(), make_spec("wide")), now=0.02)
    assert drained(actions) == []
    assert drained(echo_result(scheduler, first, now=0.03)) == []
    [batch] = dispatches(scheduler.submit(make_request(1, rows=4), now=0.04))
    assert batch.frames == ["x1"]


def test_removed_models_queued_requests_fail_once_when_its_replicas_go(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    [first] = dispatches(scheduler.submit(make_request(0, rows=4), now=0.0))
    scheduler.submit(make_request(1), now=0.0)
    scheduler.set_registry(make_registry(make_spec("wide")), now=0.01)
    actions = scheduler.replica_draining("r1", "stopping", now=0.02)
    # Nothing will ever serve the queued one now: it fails at once; the batch at the replica is still answered.
    assert only_reply(actions).code == "not_ready" and drained(actions) == []
    actions = echo_result(scheduler, first, now=0.03)
    assert [r.origin[1] for r in replies(actions)] == [0] and drained(actions) == [("m", "1")]
    assert replies(scheduler.replica_down("r1", "exited", now=0.04)) == []
    assert scheduler.pending() == 0


def test_removed_models_batch_lost_with_its_replica_fails_replica_lost(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    dispatches(scheduler.submit(make_request(0, rows=4), now=0.0))
    scheduler.set_registry(make_registry(make_spec("wide")), now=0.01)
    actions = scheduler.replica_down("r1", "crashed", now=0.02)
    assert only_reply(actions).code == "replica_lost" and drained(actions) == [("m", "1")]


def test_smaller_max_batch_size_takes_effect_for_queued_requests(scheduler: Scheduler) -> None:
    for i in range(3):
        scheduler.submit(make_request(i), now=0.0)
    scheduler.set_registry(make_registry(make_spec(max_batch_size=2, delay_ms=0)), now=0.0)
    actions = scheduler.replica_up("r1", "m", "1", 5, now=0.0)
    assert [batch.frames for batch in dispatches(actions)] == [["x0", "x1"], ["x2"]]


# --- property: random traffic, replicas coming and going, results, time -------------------------------------

MODELS = [make_spec("m", max_batch_size=4, delay_ms=5), make_spec("n", max_batch_size=2, delay_ms=0)]
MODEL_NAMES = ["m", "n", "ghost"]
# Drawn with replacement, so the repeats are weights: traffic and results are most of what happens.
KINDS = ["submit"] * 6 + ["up"] * 2 + ["result"] * 4 + ["down", "failed", "garbled", "late", "cancel",
                                                        "advance", "advance", "wake", "wake"]


class Op(NamedTuple):
    kind: str
    pick: int  # a replica, a batch in flight or a request, modulo how many there are
    model: str
    number: int  # rows of a request, capacity of a replica
    dims: tuple[int, ...]
    seconds: float  # a request's timeout, or how far the clock moves


operations = st.lists(
    st.builds(Op, st.sampled_from(KINDS), st.integers(0, 50), st.sampled_from(MODEL_NAMES + ["m", "n"]),
              st.integers(0, 3), st.sampled_from([(3,), (4,)]), st.sampled_from([0.0, 0.002, 0.02, 0.2, 1.0, 1.0])),
    min_size=10,
    max_size=150,
)


class Harness:
    """Drives a scheduler and checks every action against the promises it makes."""

    def __init__(self) -> None:
        self.scheduler = Scheduler(make_registry(*MODELS), max_queue_size=6)
        self.now = 0.0
        self.submitted: list[tuple[bytes, int]] = []
        self.cancelled: set[tuple[bytes, int]] = set()
        self.answers: Counter[tuple[bytes, int]] = Counter()
        self.capacity: dict[ReplicaId, tuple[str, int]] = {}  # replica -> (model, capacity)
        self.outstanding: dict[ReplicaId, list[Dispatch]] = {}

    def check(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Reply):
                assert action.origin in self.submitted, action
                assert action.origin not in self.cancelled, action
                self.answers[action.origin] += 1
                assert self.answers[action.origin] == 1, f"{action.origin} answered twice"
            else:
                model, capacity = self.capacity[action.replica]
                assert action.model == model
                in_flight = self.outstanding.setdefault(action.replica, [])
                assert len(in_flight) < capacity, "credit exceeded"
                in_flight.append(action)
                limit = {"m": 4, "n": 2}[model]
                rows = [meta["shape"][0] for meta in action.metas]
                assert len(action.items) == 1 or sum(rows) <= limit
                assert len({tuple(meta["shape"][1:]) for meta in action.metas}) == 1

    def take(self, index: int) -> Dispatch | None:
        flat = [d for batches in self.outstanding.values() for d in batches]
        if not flat:
            return None
        dispatch = flat[index % len(flat)]
        self.outstanding[dispatch.replica].remove(dispatch)
        return dispatch

    def apply(self, op: Op) -> None:
        s = self.scheduler
        if op.kind == "submit":
            origin = (BRIDGE, len(self.submitted))
            self.submitted.append(origin)
            request = make_request(origin[1], max(op.number, 1), model=op.model, dims=op.dims, now=self.now,
                                   timeout=op.seconds)
            self.check(s.submit(request, self.now))
        elif op.kind == "up":
            replica, model = f"r{op.pick % 3}", "n" if op.model == "n" else "m"
            self.outstanding.pop(replica, None)  # a new incarnation: the batches the old one held are lost
            self.capacity[replica] = (model, op.number)
            self.check(s.replica_up(replica, model, "1", op.number, self.now))
        elif op.kind == "down":
            replica = f"r{op.pick % 3}"
            self.outstanding.pop(replica, None)
            self.capacity.pop(replica, None)
            self.check(s.replica_down(replica, "gone", self.now))
        elif op.kind in ("result", "failed", "garbled"):
            dispatch = self.take(op.pick)
            if dispatch is None:
                return
            if op.kind == "result":
                self.check(echo_result(s, dispatch, self.now))
            elif op.kind == "failed":
                self.check(s.on_failed(dispatch.replica, dispatch.batch_id, "model_error", "boom", self.now))
            else:
                self.check(s.on_result(dispatch.replica, dispatch.batch_id, [], [], [], self.now))
        elif op.kind == "late":
            self.check(s.on_result("r0", 10_000 + op.pick, [1], [{}], ["f"], self.now))
        elif op.kind == "cancel":
            if self.submitted:
                origin = self.submitted[op.pick % len(self.submitted)]
                s.cancel(origin)
                if not self.answers[origin]:
                    self.cancelled.add(origin)
        elif op.kind == "advance":
            self.now += op.seconds
            self.check(s.tick(self.now))
        else:
            wake = s.next_wakeup()
            if wake is not None:
                self.now = max(self.now, wake)
                self.check(s.tick(self.now))

    def drain(self) -> None:
        """Serve everything left: one replica per model, answer every batch, let every deadline pass."""
        for model in ("m", "n"):
            self.capacity[f"final-{model}"] = (model, 2)
            self.check(self.scheduler.replica_up(f"final-{model}", model, "1", 2, self.now))
        for _ in range(1000):
            dispatch = self.take(0)
            if dispatch is not None:
                self.check(echo_result(self.scheduler, dispatch, self.now))
                continue
            wake = self.scheduler.next_wakeup()
            if wake is None:
                break
            self.now = max(self.now, wake)
            self.check(self.scheduler.tick(self.now))
        # Batches on replicas that were never answered nor declared down still hold their requests' deadlines.
        assert self.scheduler.next_wakeup() is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_every_request_is_answered_exactly_once_and_credit_is_never_exceeded(ops: list[Op]) -> None:
    harness = Harness()
    for op in ops:
        harness.apply(op)
    harness.drain()
    assert harness.scheduler.pending() == 0
    for origin in harness.submitted:
        expected = 0 if origin in harness.cancelled else 1
        assert harness.answers[origin] == expected, origin


# --- priorities, fairness, shapes, sessions (issue 5) -----------------------------------------------------



def with_params(request: Request, priority: Priority = Priority.NORMAL, session: SessionParams | None = None,
                timeout_given: bool = False) -> Request:
    request.params = RequestParams(priority, session, timeout_given)
    return request


@pytest.mark.parametrize(("value", "expected"), [
    (None, Priority.NORMAL), ("high", Priority.HIGH), ("LOW", Priority.LOW), ("normal", Priority.NORMAL),
    (1, Priority.HIGH), (0, Priority.NORMAL), (2, Priority.NORMAL), (3, Priority.LOW), (100, Priority.LOW),
])
def test_priority_names_and_triton_integers(value: Any, expected: Priority) -> None:
    assert parse_params({"priority": value} if value is not None else {}).priority is expected


@pytest.mark.parametrize("params", [{"priority": "urgent"}, {"priority": -1}, {"priority": True},
                                    {"sequence_id": 1.5}, {"sequence_id": 3, "sequence_end": "yes"}, [1]])
def test_bad_parameters_are_refused(params: Any) -> None:
    with pytest.raises(WireError):
        parse_params(params)


def test_higher_priority_goes_first_and_lower_is_not_starved() -> None:
    scheduler = Scheduler(make_registry(make_spec(max_batch_size=1, delay_ms=0)), priority_aging_s=0.1)
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    [first] = dispatches(scheduler.submit(make_request(0), now=0.0))  # takes the only credit
    scheduler.submit(with_params(make_request(1, now=0.0), Priority.LOW), now=0.0)
    scheduler.submit(with_params(make_request(2, now=0.01), Priority.NORMAL), now=0.01)
    scheduler.submit(with_params(make_request(3, now=0.02), Priority.HIGH), now=0.02)
    order = []
    batch = first
    for step in range(3):
        [batch] = dispatches(echo_result(scheduler, batch, now=0.03 + step * 0.001))
        order.append(batch.frames[0])
    assert order == ["x3", "x2", "x1"]
    # Aging: a low request queued at t=1.0 ranks as if it came at 1.2, so high ones arriving after 1.2 wait behind it.
    scheduler.submit(with_params(make_request(10, now=1.0), Priority.LOW), now=1.0)
    scheduler.submit(with_params(make_request(11, now=1.25), Priority.HIGH), now=1.25)
    [batch] = dispatches(echo_result(scheduler, batch, now=1.3))
    assert batch.frames == ["x10"]


def test_one_models_flood_does_not_delay_another_models_batches() -> None:
    scheduler = Scheduler(make_registry(make_spec("flood", max_batch_size=4, delay_ms=0, max_queue_size=50),
                                        make_spec("quiet", max_batch_size=4, delay_ms=0)))
    scheduler.replica_up("f1", "flood", "1", 1, now=0.0)
    scheduler.replica_up("q1", "quiet", "1", 1, now=0.0)
    codes = Counter()
    for i in range(200):
        for reply in replies(scheduler.submit(make_request(i, model="flood"), now=0.0)):
            codes[reply.code] += 1
    # The flood hit its own bound (refused at once), and the quiet model's request leaves at once.
    assert codes["overloaded"] == 200 - 50 - 1 and scheduler.queued("flood/1") == 50
    [batch] = dispatches(scheduler.submit(make_request(1000, model="quiet"), now=0.0))
    assert batch.replica == "q1"


def test_ragged_models_batch_requests_of_any_shape_together() -> None:
    scheduler = Scheduler(make_registry(make_spec(ragged_batches=True, max_batch_size=8, delay_ms=0)))
    scheduler.submit(make_request(1, dims=(3,)), now=0.0)
    scheduler.submit(make_request(2, dims=(5,)), now=0.0)
    scheduler.submit(make_request(3, dims=(5, 2)), now=0.0)  # another rank: another group
    actions = scheduler.replica_up("r1", "m", "1", 2, now=0.0)
    first, second = dispatches(actions)
    assert first.frames == ["x1", "x2"] and first.header().ragged is True
    assert second.frames == ["x3"]


def test_model_default_timeout_applies_when_the_client_named_none() -> None:
    scheduler = Scheduler(make_registry(make_spec(default_timeout_s=0.5)))
    scheduler.submit(make_request(1, timeout=10.0), now=0.0)
    scheduler.submit(with_params(make_request(2, timeout=10.0), timeout_given=True), now=0.0)
    assert only_reply(scheduler.tick(0.5)).origin == (BRIDGE, 1)
    assert scheduler.pending() == 1


def stateful(**extra: Any) -> Scheduler:
    spec = make_spec("s", stateful=True, max_batch_size=4, delay_ms=0, max_sessions_per_replica=2,
                     session_idle_timeout_s=5.0, **extra)
    return Scheduler(make_registry(spec))


def session_request(request_id: int, sid: int, *, start: bool = False, end: bool = False, now: float = 0.0,
                    timeout: float = 10.0) -> Request:
    return with_params(make_request(request_id, model="s", now=now, timeout=timeout),
                       session=SessionParams(sid, start, end))


def test_sessions_are_pinned_ordered_and_ended() -> None:
    scheduler = stateful()
    scheduler.replica_up("r1", "s", "1", 2, now=0.0)
    scheduler.replica_up("r2", "s", "1", 2, now=0.0)
    [a1] = dispatches(scheduler.submit(session_request(1, 7, start=True), now=0.0))
    [b1] = dispatches(scheduler.submit(session_request(2, 8, start=True), now=0.0))
    assert a1.replica != b1.replica, "sessions spread over replicas"
    assert a1.items == [m.BatchItem(id=a1.items[0].id, n=1, session=7, start=True, end=False)]
    # The session's next requests wait for the one at the replica: at most one in its hands, in order.
    assert dispatches(scheduler.submit(session_request(3, 7), now=0.0)) == []
    assert dispatches(scheduler.submit(session_request(4, 7, end=True), now=0.0)) == []
    actions = echo_result(scheduler, a1, now=0.1)
    [a2] = dispatches(actions)
    assert a2.replica == a1.replica and a2.frames == ["x3"] and a2.items[0].start is False
    [a3] = dispatches(echo_result(scheduler, a2, now=0.2))
    assert a3.frames == ["x4"] and a3.items[0].end is True
    echo_result(scheduler, a3, now=0.3)
    assert 7 not in scheduler.sessions("s/1")
    lost = only_reply(scheduler.submit(session_request(5, 7), now=0.4))
    assert lost.code == "session_lost" and "sequence_end" in lost.header.message


def test_a_stateful_model_needs_a_sequence_id_and_a_start() -> None:
    scheduler = stateful()
    assert only_reply(scheduler.submit(make_request(1, model="s"), now=0.0)).code == "bad_input"
    assert only_reply(scheduler.submit(session_request(2, 9), now=0.0)).code == "session_lost"


def test_new_sessions_wait_for_a_free_slot() -> None:
    scheduler = stateful()
    scheduler.replica_up("r1", "s", "1", 4, now=0.0)
    first = dispatches(scheduler.submit(session_request(1, 1, start=True, end=True), now=0.0))
    dispatches(scheduler.submit(session_request(2, 2, start=True), now=0.0))
    assert scheduler.sessions_on("r1") == 2
    # No slot: session 3 waits (its request too) until session 1 ends.
    assert scheduler.submit(session_request(3, 3, start=True), now=0.0) == []
    assert scheduler.sessions("s/1")[3] is None
    [third] = dispatches(echo_result(scheduler, first[0], now=0.1))
    assert third.items[0].session == 3 and scheduler.sessions_on("r1") == 2


def test_idle_sessions_end_and_the_replica_is_told() -> None:
    scheduler = stateful()
    scheduler.replica_up("r1", "s", "1", 2, now=0.0)
    [batch] = dispatches(scheduler.submit(session_request(1, 4, start=True), now=0.0))
    echo_result(scheduler, batch, now=1.0)
    assert scheduler.next_wakeup() == pytest.approx(6.0)
    [ends] = dispatches(scheduler.tick(6.0))
    assert ends.items == [] and ends.header().end_sessions == [4]
    assert scheduler.sessions_on("r1") == 0
    reply = only_reply(scheduler.submit(session_request(2, 4), now=6.1))
    assert reply.code == "session_lost" and "idle" in reply.header.message
    assert scheduler.on_result("r1", ends.batch_id, [], [], [], now=6.2) == []


def test_a_dead_replica_loses_its_sessions_explicitly() -> None:
    scheduler = stateful()
    scheduler.replica_up("r1", "s", "1", 2, now=0.0)
    [batch] = dispatches(scheduler.submit(session_request(1, 5, start=True), now=0.0))
    scheduler.submit(session_request(2, 5), now=0.0)
    lost = replies(scheduler.replica_down("r1", "exit code 137", now=0.1))
    assert sorted(r.origin[1] for r in lost) == [1, 2] and {r.code for r in lost} == {"session_lost"}
    assert only_reply(scheduler.submit(session_request(3, 5), now=0.2)).code == "session_lost"
    # Starting again is explicit, and waits for a replica.
    assert scheduler.submit(session_request(4, 5, start=True), now=0.3) == []
    [fresh] = dispatches(scheduler.replica_up("r2", "s", "1", 2, now=0.4))
    assert fresh.items[0].start is True and fresh.replica == "r2"


def test_draining_ends_sessions_but_takes_the_results_held() -> None:
    scheduler = stateful()
    scheduler.replica_up("r1", "s", "1", 2, now=0.0)
    [batch] = dispatches(scheduler.submit(session_request(1, 6, start=True), now=0.0))
    scheduler.submit(session_request(2, 6), now=0.0)
    [queued] = replies(scheduler.replica_draining("r1", "rolling update", now=0.1))
    assert queued.origin == (BRIDGE, 2) and queued.code == "session_lost"
    [answer] = replies(echo_result(scheduler, batch, now=0.2))
    assert answer.origin == (BRIDGE, 1) and answer.ok
    assert scheduler.replica_down("r1", "stopped", now=0.3) == []


def test_a_replica_retiring_keeps_its_sessions_going_and_takes_no_new_work() -> None:
    # A scale-down drain of a stateful model: the replica's sessions go on where their state is (issue 12), for
    # the grace the task manager gives; new sessions and stateless batches go elsewhere.
    scheduler = stateful()
    scheduler.replica_up("r1", "s", "1", 2, now=0.0)
    [first] = dispatches(scheduler.submit(session_request(1, 7, start=True), now=0.0))
    scheduler.replica_up("r2", "s", "1", 2, now=0.0)
    assert scheduler.replica_draining("r1", "scaled down", now=0.1, sessions_grace_s=30.0) == [], "no session lost"
    [answer] = replies(echo_result(scheduler, first, now=0.2))
    assert answer.ok
    [again] = dispatches(scheduler.submit(session_request(2, 7), now=0.3))
    assert again.replica == "r1", "the session goes on at its replica"
    [fresh] = dispatches(scheduler.submit(session_request(3, 8, start=True), now=0.3))
    assert fresh.replica == "r2", "a new session never starts on a retiring replica"
    assert scheduler.sessions_on("r1") == 1
    # The grace is over: the drain proper ends what is left there, as any drain does.
    echo_result(scheduler, again, now=0.4)
    [held] = dispatches(scheduler.submit(session_request(4, 7), now=0.5))
    scheduler.submit(session_request(5, 7), now=0.5)  # behind 4: one request of a session at a replica at a time
    [queued] = replies(scheduler.replica_draining("r1", "scaled down", now=0.6))
    assert queued.origin == (BRIDGE, 5) and queued.code == "session_lost"
    [last] = replies(echo_result(scheduler, held, now=0.7))
    assert last.ok and last.origin == (BRIDGE, 4), "what it held is still answered"


def test_a_retiring_replica_takes_no_stateless_batch() -> None:
    scheduler = Scheduler(make_registry(make_spec(max_batch_size=1, delay_ms=0)))
    scheduler.replica_up("r1", "m", "1", 2, now=0.0)
    scheduler.replica_up("r2", "m", "1", 2, now=0.0)
    scheduler.replica_draining("r1", "scaled down", now=0.0, sessions_grace_s=30.0)
    sent = [d.replica for i in range(3) for d in dispatches(scheduler.submit(make_request(i), now=0.1))]
    assert sent == ["r2", "r2"], "r1 retires: the third waits for r2's credit"


def test_the_idle_watch_list_stays_bounded_for_a_busy_session() -> None:
    scheduler = stateful()
    scheduler.replica_up("r1", "s", "1", 2, now=0.0)
    now = 0.0
    for i in range(5000):
        [batch] = dispatches(scheduler.submit(session_request(i, 1, start=i == 0), now=now))
        # Each answer leaves the session idle once: the watch list is compacted rather than growing with traffic.
        [reply] = replies(echo_result(scheduler, batch, now=now + 0.0005))
        assert reply.ok
        now += 0.001
    assert len(scheduler._sessions._idle) <= 4 + 1024 + 1
    assert scheduler.next_wakeup() == pytest.approx(now - 0.001 + 0.0005 + 5.0)


# --- models the task manager reports as unable to run ---------------------------------------------------

MISSING = "could not start: image 'ghost:1' is not on the Docker engine and the pull policy is 'never'"


def test_queued_requests_of_a_failed_model_are_answered_at_once_with_the_reason(scheduler: Scheduler) -> None:
    for i in range(3):
        assert scheduler.submit(make_request(i), now=0.0) == []
    assert scheduler.model_status("m", "1", "starting", None, now=0.1) == []
    failed = replies(scheduler.model_status("m", "1", "failed", MISSING, now=0.2))
    assert sorted(reply.origin[1] for reply in failed) == [0, 1, 2]
    assert all(reply.code == "not_ready" and MISSING in reply.header.message for reply in failed)
    assert scheduler.queued() == 0 and scheduler.pending() == 0 and scheduler.next_wakeup() is None
    assert scheduler.tick(100.0) == [], "exactly one answer: no deadline error later"


@pytest.mark.parametrize("state", ["failed", "unschedulable"])
def test_new_requests_for_a_model_that_cannot_run_are_refused_not_queued(scheduler: Scheduler, state: str) -> None:
    scheduler.model_status("m", "1", state, "all 2 CPU slots are taken", now=0.0)  # type: ignore[arg-type]
    refused = only_reply(scheduler.submit(make_request(1), now=0.1))
    assert refused.code == "not_ready" and "CPU slots" in refused.header.message
    assert state in refused.header.message and scheduler.pending() == 0
    # Other models are untouched.
    assert scheduler.submit(make_request(2, model="wide"), now=0.1) == []
    assert scheduler.queued("wide/1") == 1


def test_a_failed_model_with_a_serving_replica_still_queues(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    assert scheduler.model_status("m", "1", "failed", MISSING, now=0.0) == []
    [first] = dispatches(scheduler.submit(make_request(1, rows=4), now=0.0))
    assert scheduler.submit(make_request(2), now=0.0) == [], "queued behind the batch the replica holds"
    # Its last replica goes: the queued request is answered now, not at its deadline.
    actions = scheduler.replica_down("r1", "exited with status 1", now=0.1)
    codes = sorted((reply.origin[1], reply.code) for reply in replies(actions))
    assert codes == [(1, "replica_lost"), (2, "not_ready")]
    assert scheduler.pending() == 0


def test_a_draining_replica_does_not_keep_a_failed_model_queueing(scheduler: Scheduler) -> None:
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    scheduler.model_status("m", "1", "failed", MISSING, now=0.0)
    [held] = dispatches(scheduler.submit(make_request(1, rows=4), now=0.0))
    scheduler.submit(make_request(2), now=0.0)
    refused = only_reply(scheduler.replica_draining("r1", "scaled down", now=0.1))
    assert (refused.origin[1], refused.code) == (2, "not_ready")
    assert only_reply(echo_result(scheduler, held, now=0.2)).ok, "the batch it holds is still answered"


def test_a_model_queues_again_once_a_replica_comes_up_or_its_state_is_hopeful(scheduler: Scheduler) -> None:
    scheduler.model_status("m", "1", "failed", MISSING, now=0.0)
    assert only_reply(scheduler.submit(make_request(1), now=0.0)).code == "not_ready"
    scheduler.model_status("m", "1", "starting", "exited with status 1", now=0.1)
    assert scheduler.submit(make_request(2), now=0.1) == [] and scheduler.queued("m/1") == 1

    scheduler.model_status("m", "1", "unschedulable", "no GPU free", now=0.2)
    assert only_reply(scheduler.submit(make_request(3), now=0.2)).code == "not_ready"
    assert scheduler.queued("m/1") == 0, "request 2 was answered too"
    # A replica that comes up serves even before the task manager reports the state again.
    scheduler.replica_up("r1", "m", "1", 1, now=0.3)
    [batch] = dispatches(scheduler.submit(make_request(4, rows=4), now=0.3))
    assert only_reply(echo_result(scheduler, batch, now=0.4)).ok


def test_sessions_of_a_failed_model_are_refused_and_their_queued_requests_fail() -> None:
    scheduler = stateful()
    assert scheduler.submit(session_request(1, 7, start=True), now=0.0) == []
    assert scheduler.submit(session_request(2, 7), now=0.0) == []
    failed = replies(scheduler.model_status("s", "1", "failed", MISSING, now=0.1))
    assert sorted(reply.origin[1] for reply in failed) == [1, 2]
    assert all(reply.code == "not_ready" and MISSING in reply.header.message for reply in failed)
    assert scheduler.sessions("s/1") == {}
    refused = only_reply(scheduler.submit(session_request(3, 8, start=True), now=0.2))
    assert refused.code == "not_ready" and MISSING in refused.header.message

    # Recovered: a new session runs; the old one's state is gone, and says why.
    scheduler.replica_up("r1", "s", "1", 2, now=0.3)
    assert dispatches(scheduler.submit(session_request(4, 8, start=True), now=0.3))
    lost = only_reply(scheduler.submit(session_request(5, 7), now=0.3))
    assert lost.code == "session_lost" and MISSING in lost.header.message


def test_the_parameters_the_proxy_does_not_read_travel_with_their_item() -> None:
    assert parse_params({"priority": "high", "timeout": 5, "sequence_id": 0, "binary_data_output": True}).passed is None
    scheduler = Scheduler(make_registry(make_spec(max_batch_size=3, delay_ms=0)))
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    [busy] = dispatches(scheduler.submit(make_request(0), now=0.0))  # takes the only credit: the next two wait
    first = make_request(1)
    first.params = parse_params({"threshold": 0.5, "priority": "low", "timeout": 10, "note": {"a": [1]}})
    second = make_request(2)
    second.params = parse_params({"threshold": 0.9})
    scheduler.submit(first, now=0.0)
    scheduler.submit(second, now=0.0)
    [batch] = dispatches(echo_result(scheduler, busy, now=0.001))
    assert busy.items[0].params is None
    assert sorted((item.params or {}).get("threshold", 0) for item in batch.items) == [0.5, 0.9]
    assert {"threshold": 0.5, "note": {"a": [1]}} in [item.params for item in batch.items]
    # They reach the replica in the batch header, as msgpack.
    header = m.TASK_MANAGER_TO_REPLICA.decode(m.encode(m.Batch("r1", batch.batch_id, "m", "1", batch.items)))
    assert isinstance(header, m.Batch) and [item.params for item in header.items] == [i.params for i in batch.items]


def test_a_batch_of_requests_with_large_parameters_closes_before_its_header_is_too_big() -> None:
    # 16 KiB of parameters each (the most a request may send): 100 of them would make a 1.6 MB header.
    big = {"blob": "p" * (MAX_PARAMETERS_BYTES - 64)}
    scheduler = Scheduler(make_registry(make_spec(max_batch_size=1000, delay_ms=0)))
    scheduler.replica_up("r1", "m", "1", 1, now=0.0)
    [busy] = dispatches(scheduler.submit(make_request(0), now=0.0))
    for request_id in range(1, 101):
        request = make_request(request_id)  # header_bytes 0: the scheduler measures its share itself
        request.params = parse_params(big)
        assert not scheduler.submit(request, now=0.0)
    [batch] = dispatches(echo_result(scheduler, busy, now=0.001))
    assert 1 < len(batch.items) < 100
    header = m.encode(m.Batch("r1", batch.batch_id, "m", "1", batch.items, batch.metas))
    assert len(header) <= MAX_HEADER_BYTES
