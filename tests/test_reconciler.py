"""The task manager's decisions, pure: no sockets, no processes, no clock (the test gives the time)."""

from __future__ import annotations

from model_manager.spec import ModelSpec
from task_manager.reconciler import (
    Liveness,
    RestartPolicy,
    lost_because,
    plan,
    record_unexpected_end,
    recovered,
)
from task_manager.replicas import ModelGroup, Replica, ReplicaState

POLICY = RestartPolicy(backoff_s=1.0, backoff_max_s=30.0, crash_loop_failures=3)
LIMITS = Liveness(start_timeout_s=60.0, silence_limit_s=3.0, request_timeout_s=10.0)


def group_of(desired: int = 1, generation: int = 0) -> ModelGroup:
    spec = ModelSpec(name="m", model_class="x:Y", min_replicas=desired, max_replicas=max(desired, 1))
    return ModelGroup(spec, generation=generation)


def add(group: ModelGroup, name: str, state: ReplicaState = ReplicaState.READY, *, started_at: float = 0.0,
        generation: int | None = None) -> Replica:
    replica = Replica(name, group.spec, group, started_at=started_at, state=state,
                      generation=group.generation if generation is None else generation)
    group.replicas[name] = replica
    return replica


def drained(decided: object) -> list[tuple[str, str]]:
    return [(replica.id, why) for replica, why in decided.drain]  # type: ignore[attr-defined]


def test_a_group_short_of_replicas_starts_the_missing_ones() -> None:
    group = group_of(desired=3)
    add(group, "a")
    decided = plan(group, now=100.0)
    assert (decided.start, decided.drain, decided.retry_at, decided.make_room) == (2, [], None, None)


def test_the_restart_backoff_holds_starts_until_its_time() -> None:
    group = group_of(desired=1)
    group.not_before = 105.0
    decided = plan(group, now=100.0)
    assert (decided.start, decided.retry_at) == (0, 105.0)
    assert plan(group, now=105.0).start == 1


def test_scaling_down_drains_starting_replicas_first_then_the_newest() -> None:
    group = group_of(desired=1)
    add(group, "old", started_at=1.0)
    add(group, "new", started_at=2.0)
    add(group, "starting", ReplicaState.STARTING, started_at=0.5)
    decided = plan(group, now=10.0)
    assert drained(decided) == [("starting", "scaled down"), ("new", "scaled down")]
    assert decided.start == 0


def test_a_removed_group_is_left_alone() -> None:
    group = group_of(desired=2)
    group.removed = True
    decided = plan(group, now=0.0)
    assert (decided.start, decided.drain) == (0, [])


def test_a_rolling_update_starts_the_successor_before_draining_the_old_replica() -> None:
    group = group_of(desired=1, generation=1)
    old = add(group, "old", generation=0)
    decided = plan(group, now=0.0)
    assert (decided.start, drained(decided)) == (1, [])
    assert decided.make_room is old, "no room for the successor: the old one makes room"

    successor = add(group, "new", ReplicaState.STARTING)
    assert (plan(group, now=0.0).start, plan(group, now=0.0).drain) == (0, []), "one extra at most, old still serves"

    successor.state = ReplicaState.READY
    decided = plan(group, now=0.0)
    assert drained(decided) == [("old", "replaced after the model's spec changed")]


def test_an_outdated_replica_not_yet_serving_is_drained_at_once_and_blocks_other_drains() -> None:
    group = group_of(desired=2, generation=1)
    add(group, "old-ready", generation=0)
    add(group, "old-starting", ReplicaState.STARTING, generation=0)
    add(group, "new-1")
    add(group, "new-2")
    decided = plan(group, now=0.0)
    # The starting one goes now; the serving one waits until that drain is over (one at a time).
    assert drained(decided) == [("old-starting", "the model's spec changed")]


def test_only_one_outdated_replica_drains_at_a_time() -> None:
    group = group_of(desired=2, generation=1)
    add(group, "old-1", generation=0)
    add(group, "old-2", ReplicaState.STOPPING, generation=0)  # draining already
    add(group, "new-1")
    add(group, "new-2")
    decided = plan(group, now=0.0)
    assert (drained(decided), decided.start, decided.make_room) == ([], 0, None)


def test_unexpected_ends_back_off_and_a_crash_loop_fails_the_model() -> None:
    group = group_of()
    replica = add(group, "r")
    assert not record_unexpected_end(group, replica, "exit 1", 100.0, POLICY)
    assert (group.failures, group.restarts, group.not_before, group.last_error) == (1, 1, 101.0, "exit 1")
    assert not record_unexpected_end(group, replica, "exit 1", 200.0, POLICY)
    assert group.not_before == 202.0, "doubles"
    assert record_unexpected_end(group, replica, "exit 1", 300.0, POLICY), "the third in a row fails the model"
    assert group.failed_reason == "exit 1"
    assert not record_unexpected_end(group, replica, "exit 2", 400.0, POLICY), "already failed: not news"
    assert group.failed_reason == "exit 2"


def test_a_replica_that_served_long_enough_resets_the_count_and_a_refused_start_fails_at_once() -> None:
    group = group_of()
    replica = add(group, "r")
    group.failures = 2
    replica.ready_at = 0.0
    assert not record_unexpected_end(group, replica, "oom", 31.0, POLICY)
    assert group.failures == 1
    other = group_of()
    assert record_unexpected_end(other, add(other, "s", ReplicaState.STARTING), "no such image", 0.0, POLICY,
                                 start_failed=True)


def test_a_model_is_healthy_again_once_a_replica_of_its_spec_served_long_enough() -> None:
    group = group_of(generation=1)
    group.failed_reason = "crash loop"
    replica = add(group, "r")
    replica.ready_at = 100.0
    assert not recovered(group, 129.0, healthy_after_s=30.0)
    assert recovered(group, 130.0, healthy_after_s=30.0)
    replica.generation = 0
    assert not recovered(group, 1000.0, healthy_after_s=30.0), "an outdated replica proves nothing"
    assert not recovered(group_of(), 1000.0, healthy_after_s=30.0), "nothing to forgive"


def test_lost_replicas_never_ready_silent_or_stuck() -> None:
    group = group_of()
    starting = add(group, "s", ReplicaState.STARTING, started_at=0.0)
    assert lost_because(starting, 60.0, LIMITS) is None
    assert "not ready within 60s" in (lost_because(starting, 60.5, LIMITS) or "")

    ready = add(group, "r")
    ready.last_seen = ready.progress_at = 100.0
    assert lost_because(ready, 103.0, LIMITS) is None
    assert "no heartbeat for 3.5s" in (lost_because(ready, 103.5, LIMITS) or "")

    ready.last_seen = 200.0
    assert lost_because(ready, 200.0, LIMITS) is None, "holds nothing: never stuck"
    ready.in_flight[1] = b"bm"
    assert lost_because(ready, 110.0, LIMITS) is None
    ready.last_seen = 110.5
    reason = lost_because(ready, 110.5, LIMITS)
    assert reason is not None and "held 1 batches for 10.5s without answering" in reason

    stopping = add(group, "d", ReplicaState.STOPPING)
    assert lost_because(stopping, 1e9, LIMITS) is None, "already ending"


def test_a_replica_the_cluster_cannot_place_yet_is_not_lost_for_its_wait() -> None:
    # A cluster runtime says the pod is unschedulable (RuntimeEvents): the model's status shows why, and the start
    # timeout runs only once the replica is placed, or every wait for a node (a cluster autoscaler adding one)
    # would end the replica after replica_start_timeout_s, and three such ends would mark the model failed.
    group = group_of()
    waiting = add(group, "w", ReplicaState.STARTING, started_at=0.0)
    waiting.unplaced = True
    assert lost_because(waiting, 600.0, LIMITS) is None
    waiting.unplaced, waiting.placed_at = False, 600.0
    assert lost_because(waiting, 660.0, LIMITS) is None
    assert "not ready within 60s" in (lost_because(waiting, 660.5, LIMITS) or "")
