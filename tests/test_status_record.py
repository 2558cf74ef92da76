"""The status record the task manager writes lists each replica (issue 11: the dashboard's replicas)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from model_manager.spec import ModelSpec, ModelStatus
from task_manager.replicas import ModelGroup, Replica, ReplicaState
from task_manager.status import StatusWriter


class RecordingStore:
    """What StatusWriter calls on a SpecStore, kept in memory."""

    def __init__(self) -> None:
        self.written: list[ModelStatus] = []

    async def put_status(self, status: ModelStatus, *, ttl_s: float | None = None) -> None:
        self.written.append(status)

    async def put_statuses(self, statuses: Any, *, ttl_s: float) -> None:
        self.written.extend(statuses)

    async def delete_status(self, name: str, version: str) -> None:
        pass


def group_with(*states: tuple[ReplicaState, bool]) -> ModelGroup:
    spec = ModelSpec(name="m", model_class="x:Y", min_replicas=len(states), max_replicas=max(1, len(states)))
    group = ModelGroup(spec)
    now = time.monotonic()
    for n, (state, wanted_gone) in enumerate(states):
        replica = Replica(f"r{n}", spec, group, started_at=now - 100 * (n + 1), state=state,
                          gpu="0" if n == 0 else None)
        replica.wanted_gone = wanted_gone
        if state is ReplicaState.READY:
            replica.ready_at = now - 50
            replica.pid = 4000 + n
        group.replicas[replica.id] = replica
    return group


def flush(writer: StatusWriter, store: RecordingStore) -> None:
    asyncio.run(writer.flush(store))  # type: ignore[arg-type]


def test_the_record_lists_each_replica_with_its_state_gpu_and_start() -> None:
    group = group_with((ReplicaState.READY, False), (ReplicaState.STARTING, False),
                       (ReplicaState.STOPPING, True), (ReplicaState.STOPPING, False))
    group.restarts = 3
    writer = StatusWriter({group.spec.key: group}, ttl_s=3, refresh_s=1)
    store = RecordingStore()
    before = time.time()
    writer.mark(group)
    flush(writer, store)

    (status,) = store.written
    assert status.restarts == 3
    assert [(r.id, r.state, r.gpu) for r in status.replicas] == [
        ("r0", "ready", "0"), ("r1", "starting", None), ("r2", "draining", None), ("r3", "failed", None)]
    ready = status.replicas[0]
    assert ready.pid == 4000
    # Monotonic times become Unix times, so another process (the bridge) can tell the uptime.
    assert before - 100 - 1 < ready.started_at < before - 100 + 1
    assert ready.ready_at is not None and before - 50 - 1 < ready.ready_at < before - 50 + 1
    assert status.replicas[1].ready_at is None
    # It survives the trip through Redis's JSON.
    assert ModelStatus.model_validate_json(status.model_dump_json()) == status


def test_a_replica_changing_state_rewrites_the_record() -> None:
    group = group_with((ReplicaState.READY, False), (ReplicaState.STARTING, False))
    writer = StatusWriter({group.spec.key: group}, ttl_s=3, refresh_s=1)
    store = RecordingStore()
    writer.mark(group)
    flush(writer, store)
    writer.mark(group)
    flush(writer, store)
    assert len(store.written) == 1  # nothing changed: nothing written

    # The model stays ready with one replica ready of two wanted: only the replica list moves.
    group.replicas["r1"].state, group.replicas["r1"].wanted_gone = ReplicaState.STOPPING, True
    writer.mark(group)
    flush(writer, store)
    assert len(store.written) == 2
    assert [r.state for r in store.written[-1].replicas] == ["ready", "draining"]
    assert store.written[-1].state == store.written[0].state == "ready"


def test_an_older_record_without_replicas_still_reads() -> None:
    old = '{"name":"m","version":"1","state":"ready","ready_replicas":1,"desired_replicas":1,"updated_at":1.0}'
    status = ModelStatus.model_validate_json(old)
    assert status.replicas == [] and status.restarts == 0
