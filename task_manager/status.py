"""Each model's status record in Redis (``ModelStatus``), written when it changes and kept alive by a TTL.

Readers (the REST bridge's readiness, ``GET /v2/models/{name}``, the admin API) must find no status
once this task manager is gone (docs/ARCHITECTURE.md), so every live record expires after the same
silence that makes every other peer give up on us, and is rewritten every heartbeat interval. The
last record a stopping task manager writes (``stopped``) has no expiry: it claims nothing, and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any, cast

from model_manager.spec import ModelStatus, ReplicaStateName, ReplicaStatus, ServingState
from model_manager.store import SpecStore
from task_manager import replica_metrics
from task_manager.replicas import ModelGroup, Replica

log = logging.getLogger(__name__)

# A reason travels in message headers and may reach clients: the first line (how it ended) and the last log lines.
MAX_REASON_CHARS = 4000


def clip_reason(text: str, limit: int = MAX_REASON_CHARS) -> str:
    if len(text) <= limit:
        return text
    first_line = text.partition("\n")[0][: limit // 4]
    return f"{first_line}\n[...]\n{text[-(limit - len(first_line) - 7):]}"


class StatusWriter:
    """Writes the status of each changed model (``mark``) from one task (``run``), never from a handler."""

    def __init__(self, groups: Mapping[str, ModelGroup], *, ttl_s: float, refresh_s: float) -> None:
        self.groups = groups  # the models the task manager runs, by spec key (a removed one is not among them)
        self.ttl_s = ttl_s
        self.refresh_s = refresh_s
        # Records to (re)write: by spec key, the group (removed groups too, to delete theirs).
        self.dirty: dict[str, ModelGroup] = {}
        self._event = asyncio.Event()
        self._written: dict[str, tuple[Any, ...]] = {}  # what Redis holds, to write only changes
        # The records last written, by spec key: rewritten every refresh interval, since they expire.
        self.live: dict[str, ModelStatus] = {}

    def mark(self, group: ModelGroup) -> None:
        self.dirty[group.spec.key] = group
        self._event.set()

    async def run(self, store: SpecStore) -> None:
        next_refresh = time.monotonic()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), max(0.0, next_refresh - time.monotonic()))
            self._event.clear()
            try:
                await self.flush(store)
                if time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + self.refresh_s
                    await self._refresh(store)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: keep serving, write when it is back
                log.warning("could not write model status to Redis (%s); retrying", exc)
                self._event.set()
                await asyncio.sleep(1.0)

    async def flush(self, store: SpecStore, *, stopped: bool = False) -> None:
        while self.dirty:
            # Taken before the write: a change made while the write is in flight marks the model again and is
            # written in turn. (Dropping the mark after the write lost such changes: it is always the same group.)
            key, group = self.dirty.popitem()
            try:
                await self._write(store, key, group, stopped=stopped)
            except BaseException:
                self.dirty.setdefault(key, group)  # left for the retry
                raise

    async def _write(self, store: SpecStore, key: str, group: ModelGroup, *, stopped: bool) -> None:
        spec = group.spec
        if group.removed and key not in self.groups:
            if not group.replicas:
                await store.delete_status(spec.name, spec.version)
                self._written.pop(key, None)
                self.live.pop(key, None)
            return
        record: tuple[ServingState, int, int, str | None, int, tuple[tuple[Any, ...], ...]]
        if stopped:
            record = ("stopped", 0, group.desired, "the task manager stopped", group.restarts, ())
        else:
            state, reason = group.serving_state()
            # The replicas' identity and state only: their times never change, so they never cause a write.
            replicas = tuple((r.id, replica_state(r), r.gpu, r.pid, r.ready_at) for r in group.replicas.values())
            record = (state, group.ready_count(), group.desired, clip_reason(reason) if reason else None,
                      group.restarts, replicas)
        if self._written.get(key) == record:
            return
        status = ModelStatus(name=spec.name, version=spec.version, state=record[0], ready_replicas=record[1],
                             desired_replicas=record[2], reason=record[3], updated_at=time.time(),
                             restarts=record[4], replicas=[] if stopped else replica_statuses(group))
        # The final "stopped" record stays (it claims nothing, and says why); live ones expire.
        await store.put_status(status, ttl_s=None if stopped else self.ttl_s)
        self.live[key] = status
        previous = self._written.get(key, ("none",))[0]
        if previous != record[0]:
            log.info("model %s is %s (%d of %d replicas ready)%s", key, record[0], record[1], record[2],
                     f": {record[3].splitlines()[0]}" if record[3] else "")
        self._written[key] = record

    async def _refresh(self, store: SpecStore) -> None:
        """Write every live status again before its TTL runs out (and into a Redis that restarted empty)."""
        if self.live:
            await store.put_statuses(list(self.live.values()), ttl_s=self.ttl_s)


def replica_state(replica: Replica) -> ReplicaStateName:
    """A replica's state as the status record names it: as ``inferoxy_replicas`` counts it, one rule for both."""
    return cast(ReplicaStateName, replica_metrics.state_of(replica))


def replica_statuses(group: ModelGroup) -> list[ReplicaStatus]:
    # Monotonic times (immune to clock steps, what the task manager decides by) become Unix times here, since
    # the reader is another process, maybe on another machine: uptime is then as good as the clocks agree.
    offset = time.time() - time.monotonic()
    return [ReplicaStatus(id=r.id, state=replica_state(r), gpu=r.gpu, pid=r.pid, started_at=r.started_at + offset,
                          ready_at=None if r.ready_at is None else r.ready_at + offset)
            for r in group.replicas.values()]
