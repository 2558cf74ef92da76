"""Job records in Redis: what ``POST /v2/jobs`` creates and the ``job_worker`` claims, runs and reports into.

Key schema, beside the model registry's (``P`` is ``INFEROXY_REDIS_PREFIX``; docs/JOBS.md):

===========================  ======  ==============================================================
key                          type    holds
===========================  ======  ==============================================================
``P:jobs:job:ID``            string  the job's record as JSON (``JobRecord``); expires
                                     ``jobs_retention_s`` after the job ends
``P:jobs:index``             zset    every job id, scored by creation time (``GET /v2/jobs``)
``P:jobs:active``            zset    queued and running job ids, scored by when they may next run
                                     (a retry's backoff)
``P:jobs:lease:ID``          string  the id of the worker that runs the job; expires ``jobs_lease_s``
                                     after its last renewal
``P:jobs:cancel:ID``         string  set by ``DELETE /v2/jobs/ID``: the worker stops the job
``P:jobs:idem:OWNER:SHA``    string  ``ID DIGEST``: an ``Idempotency-Key`` of one caller -> its job and
                                     the digest of the options it was sent with; expires after
                                     ``jobs_idempotency_ttl_s``
===========================  ======  ==============================================================

A worker runs a job only while it holds the job's lease (``SET NX PX``), and renews it (compare, then
``PEXPIRE``, in a WATCH transaction) while the job runs: a worker that dies stops renewing, the lease
expires and another worker (or the same one, restarted) claims the job again; one that fails to renew
has lost the job and stops it, so two workers never run one job. Only the lease holder writes a
running job's record; the API writes a record when it creates it, and when it cancels a queued job,
which it does by taking the lease itself.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, Field
from redis.exceptions import WatchError

from jobs.options import BatchOptions
from model_manager.store import redis_client

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
REDACTED = "***"
# How many candidates one claim looks at: a few are enough, since a claimed one leaves the head.
CLAIM_SCAN = 16
# The most records one listing reads (GET /v2/jobs pages are smaller).
MAX_LISTED = 1000

Clock = Callable[[], float]


class JobProgress(BaseModel):
    done: int = 0
    failed: int = 0
    total: int | None = None


class JobRecord(BaseModel):
    id: str
    state: JobState = "queued"
    options: BatchOptions
    owner: str | None = Field(None, description="The API key's name that submitted it; None with auth off.")
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    not_before: float = 0.0
    progress: JobProgress = Field(default_factory=JobProgress)
    timings: dict[str, float] = Field(default_factory=dict)
    error: str | None = None
    summary: dict[str, Any] | None = None
    cancel_requested: bool = False

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def public(self) -> dict[str, Any]:
        """The record as the API shows it: storage option values (credentials) never leave the proxy."""
        shown = self.model_dump(mode="json", exclude={"not_before"})
        shown["options"]["storage_options"] = {key: REDACTED for key in self.options.storage_options}
        return shown


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` reused with other options than its first submission's."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"this Idempotency-Key was used for job {job_id} with other options")
        self.job_id = job_id


class QueueFull(Exception):
    """As many jobs are queued or running as ``jobs_max_queued`` allows."""


def options_digest(options: BatchOptions) -> str:
    return hashlib.sha256(options.model_dump_json().encode()).hexdigest()


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


class JobStore:
    def __init__(self, client: aioredis.Redis, prefix: str = "inferoxy", *, clock: Clock = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.clock = clock
        base = f"{prefix}:jobs"
        self.index_key = f"{base}:index"
        self.active_key = f"{base}:active"
        self._job = f"{base}:job:"
        self._lease = f"{base}:lease:"
        self._cancel = f"{base}:cancel:"
        self._idem = f"{base}:idem:"

    @classmethod
    def from_url(cls, url: str, prefix: str = "inferoxy") -> JobStore:
        return cls(redis_client(url), prefix)

    async def close(self) -> None:
        await self.client.aclose()

    def _idem_key(self, owner: str | None, key: str) -> str:
        # Hashed: the header is the client's text, of any length and alphabet.
        return f"{self._idem}{owner or '-'}:{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"

    # -- the API's side ----------------------------------------------------------------------------

    async def create(self, options: BatchOptions, owner: str | None, *, idempotency_key: str | None = None,
                     idempotency_ttl_s: float = 86400.0, max_queued: int = 1000) -> tuple[JobRecord, bool]:
        """A new queued job, or (``created`` False) the one this caller's ``idempotency_key`` already made."""
        digest = options_digest(options)
        idem = self._idem_key(owner, idempotency_key) if idempotency_key else None
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    if idem is not None:
                        await pipe.watch(idem)
                        found = await pipe.get(idem)
                        if found:
                            job_id, _, was = str(found).partition(" ")
                            if was != digest:
                                raise IdempotencyConflict(job_id)
                            record = await self.get(job_id)
                            if record is not None:
                                return record, False
                            # Its record expired before the key did: a fresh job is what the caller wants.
                    if await self.client.zcard(self.active_key) >= max_queued:
                        raise QueueFull(f"{max_queued} jobs are queued or running; retry later")
                    now = self.clock()
                    record = JobRecord(id=new_job_id(), options=options, owner=owner, created_at=now)
                    pipe.multi()
                    pipe.set(self._job + record.id, record.model_dump_json())
                    pipe.zadd(self.index_key, {record.id: now})
                    pipe.zadd(self.active_key, {record.id: 0.0})
                    if idem is not None:
                        pipe.set(idem, f"{record.id} {digest}", ex=max(1, int(idempotency_ttl_s)))
                    await pipe.execute()
                    return record, True
                except WatchError:
                    continue  # another submission with this key won the race: read what it made

    async def get(self, job_id: str) -> JobRecord | None:
        text = await self.client.get(self._job + job_id)
        return JobRecord.model_validate_json(text) if text else None

    async def list(self, owner: str | None = None, *, everyone: bool = False, limit: int = 100) -> list[JobRecord]:
        """The newest jobs first: every caller's when ``everyone``, else ``owner``'s only."""
        ids = [str(job_id) for job_id in await self.client.zrevrange(self.index_key, 0, MAX_LISTED - 1)]
        if not ids:
            return []
        texts = await self.client.mget([self._job + job_id for job_id in ids])
        found: list[JobRecord] = []
        gone = []
        for job_id, text in zip(ids, texts, strict=True):
            if not text:
                gone.append(job_id)  # expired after its retention
                continue
            record = JobRecord.model_validate_json(text)
            if everyone or record.owner == owner:
                found.append(record)
                if len(found) >= limit:
                    break
        if gone:
            await self.client.zrem(self.index_key, *gone)
        return found

    async def request_cancel(self, job_id: str, *, retention_s: float = 604800.0) -> JobRecord | None:
        """Ask for the job to stop. A queued job is cancelled here (the API takes its lease so no worker
        starts it meanwhile); a running one is stopped by its worker, which sees the flag at its next renewal."""
        record = await self.get(job_id)
        if record is None or record.final:
            return record
        await self.client.set(self._cancel + job_id, "1", ex=max(1, int(retention_s)))
        token = "cancel-" + secrets.token_hex(6)
        if await self.client.set(self._lease + job_id, token, nx=True, px=10_000):
            try:
                record = await self.get(job_id)
                if record is not None and not record.final:
                    record.state = "cancelled"
                    record.cancel_requested = True
                    record.finished_at = self.clock()
                    await self.finish(record, retention_s=retention_s)
            finally:
                await self.release(job_id, token)
            return record
        record.cancel_requested = True
        return record

    # -- the worker's side -------------------------------------------------------------------------

    async def claim(self, worker: str, lease_s: float) -> JobRecord | None:
        """The next job due to run, with its lease taken by ``worker``; None when there is none."""
        now = self.clock()
        due = await self.client.zrangebyscore(self.active_key, "-inf", now, start=0, num=CLAIM_SCAN)
        ids = [str(job_id) for job_id in due]
        for job_id in ids:
            if not await self.client.set(self._lease + job_id, worker, nx=True, px=max(1, int(lease_s * 1000))):
                continue  # running on another worker, whose lease is live
            record = await self.get(job_id)
            if record is None or record.final:
                await self.client.zrem(self.active_key, job_id)
                await self.release(job_id, worker)
                continue
            return record
        return None

    async def renew(self, job_id: str, worker: str, lease_s: float) -> bool:
        """Extend ``worker``'s lease; False if it is not ``worker``'s any more (it expired, another took it)."""
        key = self._lease + job_id
        async with self.client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                if await pipe.get(key) != worker:
                    return False
                pipe.multi()
                pipe.pexpire(key, max(1, int(lease_s * 1000)))
                await pipe.execute()
                return True
            except WatchError:
                return False

    async def release(self, job_id: str, worker: str) -> None:
        """Drop ``worker``'s lease if it still holds it."""
        key = self._lease + job_id
        async with self.client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                if await pipe.get(key) == worker:
                    pipe.multi()
                    pipe.delete(key)
                    await pipe.execute()
            except WatchError:
                pass

    async def cancel_wanted(self, job_id: str) -> bool:
        return bool(await self.client.exists(self._cancel + job_id))

    async def save(self, record: JobRecord) -> None:
        await self.client.set(self._job + record.id, record.model_dump_json())

    async def requeue(self, record: JobRecord, worker: str) -> None:
        """Back in the queue (a retry after ``record.not_before``, or a stopping worker's job) and unleased."""
        record.state = "queued"
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self._job + record.id, record.model_dump_json())
            pipe.zadd(self.active_key, {record.id: record.not_before})
            await pipe.execute()
        await self.release(record.id, worker)

    async def finish(self, record: JobRecord, *, retention_s: float) -> None:
        """Store a record in its final state; it expires after ``retention_s``."""
        keep = max(1, int(retention_s))
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self._job + record.id, record.model_dump_json(), ex=keep)
            pipe.zrem(self.active_key, record.id)
            pipe.delete(self._cancel + record.id)
            await pipe.execute()


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """The wait before retry ``attempt`` (1 for the first retry): ``base_s`` doubling, at most ``max_s``."""
    return float(min(max_s, base_s * 2 ** max(0, min(attempt - 1, 62))))
