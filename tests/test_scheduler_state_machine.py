"""A hypothesis state machine over the scheduler: random interleavings of requests (with priorities and
sessions), results, failures, timeouts, cancels, replica deaths and drains, and the task manager's model
statuses, models removed from the registry and added again, checked after every step.

The machine plays the replicas too: it keeps, per replica, the sessions a real runtime would hold
(applying every batch in the order it was sent, as the runtime's one worker thread does), so it can
check that no request of a session ever reaches a replica that does not hold that session's state.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from batch_manager.messages import ReplicaId
from batch_manager.params import Priority, RequestParams, SessionParams
from batch_manager.scheduler import REFUSING_STATES, Action, Dispatch, ModelDrained, Reply, Request, Scheduler
from model_manager.spec import ModelSpec, ServingState
from model_manager.store import Registry

BRIDGE = b"bridge"
STATELESS = ModelSpec(name="m", model_class="x:Y", max_batch_size=4, max_batch_delay_ms=10, max_queue_size=5)
STATEFUL = ModelSpec(name="s", model_class="x:Y", max_batch_size=4, max_batch_delay_ms=5, max_queue_size=6,
                     stateful=True, max_sessions_per_replica=2, session_idle_timeout_s=1.0)
SPECS = {"m": STATELESS, "s": STATEFUL}
REPLICAS = [f"r{i}" for i in range(4)]
SESSIONS = [1, 2, 3, 4, 5]
STATES: list[ServingState] = ["starting", "ready", "degraded", "failed", "unschedulable", "stopped", "idle"]


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        registry = Registry({spec.key: spec for spec in SPECS.values()}, {n: "1" for n in SPECS}, 1)
        self.scheduler = Scheduler(registry, max_queue_size=100, priority_aging_s=0.05)
        self.now = 0.0
        self.next_id = 0
        self.submitted: dict[tuple[bytes, int], tuple[str, int | None]] = {}  # origin -> (model, session)
        self.cancelled: set[tuple[bytes, int]] = set()
        self.answers: Counter[tuple[bytes, int]] = Counter()
        self.replicas: dict[ReplicaId, dict[str, Any]] = {}  # id -> {model, capacity, draining}
        self.outstanding: list[Dispatch] = []
        self.held: dict[ReplicaId, set[int]] = {}  # sessions a real runtime would hold, per replica
        self.last_item: dict[int, int] = {}  # session -> last item id dispatched (item ids grow with arrival)
        self.status: dict[str, ServingState] = {}  # model -> the state the task manager last reported
        self.registered: set[str] = set(SPECS)  # models in the registry
        self.deleting: set[str] = set()  # removed from the registry, ModelDrained not yet said
        # What the service's gauges would show: (queued, in flight, sessions), set only from take_changed.
        self.gauges: dict[str, tuple[int, int, int]] = {}

    # --- checking every action -----------------------------------------------------------------------

    def check(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Reply):
                assert action.origin in self.submitted, action
                assert action.origin not in self.cancelled, f"{action.origin} answered after its cancel"
                self.answers[action.origin] += 1
                assert self.answers[action.origin] == 1, f"{action.origin} answered twice"
            elif isinstance(action, ModelDrained):
                model = action.model
                assert model in self.deleting, f"ModelDrained for {model}, which is not being removed (or said twice)"
                self.deleting.discard(model)
                assert self.scheduler.queued(SPECS[model].key) == 0, "drained with requests queued"
                assert not [d for d in self.outstanding if d.model == model], "drained with batches at replicas"
            else:
                self.check_dispatch(action)

    def check_dispatch(self, batch: Dispatch) -> None:
        replica = self.replicas.get(batch.replica)
        assert replica is not None, "a batch for a replica that is not up"
        assert not replica["draining"], "a batch for a draining replica"
        # Retiring (a stateful scale-down): its sessions go on there, nothing else does.
        assert not (replica.get("retiring") and batch.model != "s"), "a stateless batch for a retiring replica"
        assert batch.model == replica["model"]
        assert sum(1 for d in self.outstanding if d.replica == batch.replica) < replica["capacity"], "credit"
        self.outstanding.append(batch)
        rows = sum(meta["shape"][0] for meta in batch.metas)
        assert len(batch.items) <= 1 or rows <= SPECS[batch.model].max_batch_size
        held = self.held.setdefault(batch.replica, set())
        for session in batch.end_sessions or ():
            held.discard(session)
        sessions = [item.session for item in batch.items if item.session is not None]
        assert len(sessions) == len(set(sessions)), "two items of one session in one batch"
        for item in batch.items:
            if batch.model != "s":
                continue
            session = item.session
            if item.start:
                held.add(session)
            # Never a silent fresh state: a session's request goes only where its state lives.
            assert session in held, f"session {session} sent to {batch.replica}, which does not hold it"
            # Order within a session: item ids grow with arrival.
            assert item.id > self.last_item.get(session, -1), "a session's requests overtook each other"
            self.last_item[session] = item.id
            if item.end:
                held.discard(session)

    # --- rules ---------------------------------------------------------------------------------------

    def _request(self, model: str, params: RequestParams, timeout: float, rows: int = 1,
                 width: int = 3) -> Request:
        origin = (BRIDGE, self.next_id)
        self.next_id += 1
        self.submitted[origin] = (model, params.session.id if params.session else None)
        metas = [{"name": "x", "dtype": "float32", "shape": [rows, width]}]
        return Request(origin, model, None, metas, [f"f{origin[1]}"], self.now + timeout, params)

    def refusing(self, model: str) -> bool:
        """The model cannot run and no replica of it takes batches: its requests must not wait."""
        return (self.status.get(model) in REFUSING_STATES or model in self.deleting) and not any(
            r["model"] == model and not r["draining"] for r in self.replicas.values())

    def submit(self, request: Request) -> None:
        refused = self.refusing(request.model)
        unknown = request.model not in self.registered
        actions = self.scheduler.submit(request, self.now)
        self.check(actions)
        if unknown:
            assert [(a.origin, a.code) for a in actions if isinstance(a, Reply)] == [(request.origin, "unknown_model")]
        elif refused:
            assert [(a.origin, a.code) for a in actions if isinstance(a, Reply)] == [(request.origin, "not_ready")]

    @rule(rows=st.integers(1, 3), width=st.sampled_from([3, 4]), priority=st.sampled_from(list(Priority)),
          timeout=st.sampled_from([0.05, 0.5, 5.0]))
    def submit_stateless(self, rows: int, width: int, priority: Priority, timeout: float) -> None:
        self.submit(self._request("m", RequestParams(priority), timeout, rows, width))

    @rule(session=st.sampled_from(SESSIONS), start=st.booleans(), end=st.booleans(),
          priority=st.sampled_from(list(Priority)), timeout=st.sampled_from([0.05, 0.5, 5.0]))
    def submit_session(self, session: int, start: bool, end: bool, priority: Priority, timeout: float) -> None:
        params = RequestParams(priority, SessionParams(session, start, end))
        self.submit(self._request("s", params, timeout))

    @rule(model=st.sampled_from(["m", "s"]), state=st.sampled_from(STATES))
    def model_status(self, model: str, state: ServingState) -> None:
        self.status[model] = state
        self.check(self.scheduler.model_status(model, "1", state, f"{model} is {state}", self.now))

    @rule(present=st.sets(st.sampled_from(sorted(SPECS))))
    def set_registry(self, present: set[str]) -> None:
        """Models removed from the registry (and added again): what they queued is still served."""
        for model in self.registered - present:
            self.deleting.add(model)
        self.deleting &= set(SPECS) - present  # one added again before it drained is served as before
        self.registered = set(present)
        registry = Registry({SPECS[m].key: SPECS[m] for m in present}, {m: "1" for m in present}, 1)
        self.check(self.scheduler.set_registry(registry, self.now))

    # 0: another batch manager holds the whole replica for now (a share moved by ``credit``).
    @rule(replica=st.sampled_from(REPLICAS), model=st.sampled_from(["m", "s"]), capacity=st.integers(0, 3))
    def replica_up(self, replica: str, model: str, capacity: int) -> None:
        self.outstanding = [d for d in self.outstanding if d.replica != replica]  # a new incarnation
        self.replicas[replica] = {"model": model, "capacity": capacity, "draining": False}
        self.held[replica] = set()
        self.check(self.scheduler.replica_up(replica, model, "1", capacity, self.now))

    @rule(replica=st.sampled_from(REPLICAS))
    def replica_down(self, replica: str) -> None:
        self.outstanding = [d for d in self.outstanding if d.replica != replica]
        self.replicas.pop(replica, None)
        self.held.pop(replica, None)
        self.check(self.scheduler.replica_down(replica, "killed", self.now))

    @rule(replica=st.sampled_from(REPLICAS), capacity=st.integers(0, 3))
    def credit(self, replica: str, capacity: int) -> None:
        """The task manager moved this batch manager's share: batches beyond it stay, none is added past it."""
        if replica in self.replicas:
            self.replicas[replica]["capacity"] = capacity
        self.check(self.scheduler.replica_credit(replica, capacity, self.now))

    @rule(replica=st.sampled_from(REPLICAS))
    def replica_draining(self, replica: str) -> None:
        if replica in self.replicas:
            self.replicas[replica]["draining"] = True
        self.check(self.scheduler.replica_draining(replica, "scale down", self.now))

    @rule(replica=st.sampled_from(REPLICAS))
    def replica_retiring(self, replica: str) -> None:
        if replica in self.replicas:
            self.replicas[replica]["retiring"] = True
        self.check(self.scheduler.replica_draining(replica, "scaled down", self.now, sessions_grace_s=30.0))

    @precondition(lambda self: self.outstanding)
    @rule(pick=st.integers(0, 50), how=st.sampled_from(["result", "result", "model_error", "replica_lost",
                                                         "session_lost_item"]))
    def answer(self, pick: int, how: str) -> None:
        batch = self.outstanding.pop(pick % len(self.outstanding))
        s = self.scheduler
        if how == "model_error":
            self.check(s.on_failed(batch.replica, batch.batch_id, "model_error", "boom", self.now))
        elif how == "replica_lost":
            # A replica that lost a batch is dead or going: it takes no batch any more, as if draining.
            if batch.replica in self.replicas:
                self.replicas[batch.replica]["draining"] = True
            self.check(s.on_failed(batch.replica, batch.batch_id, "replica_lost", "undeliverable", self.now))
        else:
            counts = [item.n for item in batch.items]
            errors: list[tuple[str, str] | None] | None = None
            metas, frames = batch.metas, batch.frames
            if how == "session_lost_item" and batch.items and batch.model == "s":
                errors = [("session_lost", "gone")] + [None] * (len(batch.items) - 1)
                counts[0] = 0
                metas, frames = metas[1:], frames[1:]
            self.check(s.on_result(batch.replica, batch.batch_id, counts, metas, frames, self.now, errors))

    @rule(pick=st.integers(0, 200))
    def cancel(self, pick: int) -> None:
        if not self.submitted:
            return
        origins = list(self.submitted)
        origin = origins[pick % len(origins)]
        self.check(self.scheduler.cancel(origin, self.now))
        if not self.answers[origin]:
            self.cancelled.add(origin)

    @rule(seconds=st.sampled_from([0.001, 0.01, 0.1, 0.6, 2.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.check(self.scheduler.tick(self.now))

    @rule()
    def wake_up_when_asked(self) -> None:
        wake = self.scheduler.next_wakeup()
        if wake is not None:
            self.now = max(self.now, wake)
            self.check(self.scheduler.tick(self.now))

    # --- invariants ----------------------------------------------------------------------------------

    @invariant()
    def queues_stay_within_their_bounds(self) -> None:
        for spec in SPECS.values():
            assert self.scheduler.queued(spec.key) <= (spec.max_queue_size or 0)

    @invariant()
    def session_slots_are_bounded_and_accounted(self) -> None:
        pinned = Counter(r for r in self.scheduler.sessions("s/1").values() if r is not None)
        for replica in REPLICAS:
            taken = self.scheduler.sessions_on(replica)
            assert taken <= STATEFUL.max_sessions_per_replica
            assert taken == pinned.get(replica, 0), "a slot held by no open session (leaked)"

    @invariant()
    def nothing_waits_for_a_model_that_cannot_run(self) -> None:
        for model, spec in SPECS.items():
            assert self.scheduler.refusing(spec.key) == self.refusing(model)
            if self.refusing(model):
                assert self.scheduler.queued(spec.key) == 0, f"a request queued for {model}, which cannot run"

    @invariant()
    def a_removed_model_says_it_drained_once_empty(self) -> None:
        for model in self.deleting:
            assert self.scheduler.queued(SPECS[model].key) > 0 or [d for d in self.outstanding if d.model == model], \
                f"{model} holds nothing any more, yet ModelDrained was not said"

    @invariant()
    def the_wakeup_heap_agrees_with_a_scan_of_every_group(self) -> None:
        assert self.scheduler.next_wakeup() == self.scheduler.next_wakeup_by_scan()

    @invariant()
    def gauges_set_from_what_changed_match_the_counts(self) -> None:
        # The service sets its gauges only for the model versions take_changed names: one whose counts moved
        # without being named would leave its gauge stale (a queue depth that never returns to 0).
        for key, counts in self.scheduler.take_changed():
            self.gauges[key] = counts
        for spec in SPECS.values():
            counts = self.scheduler.counts(spec.key)
            assert self.gauges.get(spec.key, (0, 0, 0)) == counts, (spec.key, self.gauges.get(spec.key), counts)
            assert counts[0] == self.scheduler.queued(spec.key)
        in_flight = Counter(d.model for d in self.outstanding)
        for model, spec in SPECS.items():
            assert self.scheduler.counts(spec.key)[1] == in_flight[model]

    @invariant()
    def nothing_is_answered_twice(self) -> None:
        assert all(count == 1 for count in self.answers.values())

    def teardown(self) -> None:
        """Serve everything left, let every deadline and idle timeout pass, then count the answers."""
        s = self.scheduler
        self.set_registry(set(SPECS))
        for model in ("m", "s"):
            self.replica_up(f"final-{model}", model, 3)
            self.model_status(model, "ready")
        for _ in range(2000):
            if self.outstanding:
                self.answer(0, "result")
                continue
            wake = s.next_wakeup()
            if wake is None:
                break
            self.now = max(self.now, wake)
            self.check(s.tick(self.now))
        # Batches held by replicas that never answered keep their requests until a deadline answers them.
        assert s.pending() == 0
        assert s.sessions("s/1") == {}, "sessions outlived their idle timeout"
        for replica in [*REPLICAS, "final-m", "final-s"]:
            assert s.sessions_on(replica) == 0, f"slots leaked on {replica}"
        for origin in self.submitted:
            expected = 0 if origin in self.cancelled else 1
            assert self.answers[origin] == expected, (origin, self.answers[origin])


# STATE_MACHINE_EXAMPLES=3000 for a deeper search (about a minute).
SchedulerMachine.TestCase.settings = settings(max_examples=int(os.environ.get("STATE_MACHINE_EXAMPLES", "300")),
                                              stateful_step_count=60, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
TestSchedulerStateMachine = SchedulerMachine.TestCase
