"""Job records, claims, idempotency and the job worker's retries, against fakeredis and a fake runner
(the real runner and a real Redis: tests/test_jobs_api.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import zmq.asyncio

from bridges.jobs_api import JobsRefused, checked_location
from inferoxy import metrics
from inferoxy.settings import Settings
from jobs.options import BatchOptions
from jobs.store import IdempotencyConflict, JobRecord, JobStore, QueueFull, backoff_s
from jobs.worker import JobWorker

OPTIONS = BatchOptions(model="digits", input="s3://in/data.parquet", output="s3://out/",
                       storage_options={"key": "AKIA", "secret": "hush"})


def with_store(test: Callable[[JobStore], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test in its own event loop with a fresh job store over fakeredis."""

    def run() -> None:
        async def go() -> None:
            client = fakeredis.FakeAsyncRedis(decode_responses=True)
            try:
                await test(JobStore(client, "t"))
            finally:
                await client.aclose()

        asyncio.run(go())

    run.__name__ = test.__name__
    return run


@with_store
async def test_a_submission_is_queued_and_its_credentials_are_never_shown(store: JobStore) -> None:
    record, created = await store.create(OPTIONS, "alice")
    assert created and record.state == "queued" and record.owner == "alice"
    shown = (await store.get(record.id)).public()  # type: ignore[union-attr]
    assert shown["options"]["storage_options"] == {"key": "***", "secret": "***"}
    assert "hush" not in str(shown) and "AKIA" not in str(shown)


@with_store
async def test_an_idempotency_key_returns_the_same_job_per_caller(store: JobStore) -> None:
    first, created = await store.create(OPTIONS, "alice", idempotency_key="k1")
    again, created_again = await store.create(OPTIONS, "alice", idempotency_key="k1")
    assert created and not created_again and again.id == first.id
    other, created_other = await store.create(OPTIONS, "bob", idempotency_key="k1")
    assert created_other and other.id != first.id  # keys are per caller
    with pytest.raises(IdempotencyConflict):
        await store.create(OPTIONS.model_copy(update={"batch_size": 7}), "alice", idempotency_key="k1")
    assert len(await store.list(everyone=True)) == 2


@with_store
async def test_concurrent_submissions_with_one_key_make_one_job(store: JobStore) -> None:
    made = await asyncio.gather(*(store.create(OPTIONS, "alice", idempotency_key="same") for _ in range(8)))
    assert len({record.id for record, _ in made}) == 1
    assert sum(created for _, created in made) == 1


@with_store
async def test_the_queue_is_bounded(store: JobStore) -> None:
    await store.create(OPTIONS, None, max_queued=2)
    await store.create(OPTIONS, None, max_queued=2)
    with pytest.raises(QueueFull):
        await store.create(OPTIONS, None, max_queued=2)


@with_store
async def test_listing_shows_a_caller_its_own_jobs_only(store: JobStore) -> None:
    mine, _ = await store.create(OPTIONS, "alice")
    await store.create(OPTIONS, "bob")
    assert [record.id for record in await store.list("alice")] == [mine.id]
    assert len(await store.list(everyone=True)) == 2


@with_store
async def test_one_claim_per_job_until_its_lease_expires(store: JobStore) -> None:
    record, _ = await store.create(OPTIONS, None)
    claimed = await store.claim("w1", lease_s=0.2)
    assert claimed is not None and claimed.id == record.id
    assert await store.claim("w2", lease_s=0.2) is None  # w1's lease is live
    assert await store.renew(record.id, "w1", 0.2) and not await store.renew(record.id, "w2", 0.2)
    deadline = time.monotonic() + 5
    again = None
    while again is None and time.monotonic() < deadline:  # w1 stops renewing (it died): the lease lapses
        again = await store.claim("w2", lease_s=5)
        await asyncio.sleep(0.05)
    assert again is not None and again.id == record.id
    assert not await store.renew(record.id, "w1", 5)  # w1, if it comes back, knows it lost the job


@with_store
async def test_cancelling_a_queued_job_ends_it_and_no_worker_claims_it(store: JobStore) -> None:
    record, _ = await store.create(OPTIONS, None)
    cancelled = await store.request_cancel(record.id)
    assert cancelled is not None and cancelled.state == "cancelled"
    assert await store.claim("w1", lease_s=5) is None


def test_backoff_doubles_up_to_its_limit() -> None:
    assert [backoff_s(n, 1.0, 5.0) for n in (1, 2, 3, 4, 100)] == [1.0, 2.0, 4.0, 5.0, 5.0]


# -- the worker, over a fake runner ---------------------------------------------------------------


class FakeRunner:
    """Stands for jobs.runner.run_batch: ``rows`` rows, one progress report each; fails its first ``failures``
    runs; waits on ``gate`` after the first row when given one."""

    def __init__(self, rows: int = 5, failures: int = 0, gate: asyncio.Event | None = None) -> None:
        self.rows = rows
        self.failures = failures
        self.gate = gate
        self.runs: list[BatchOptions] = []
        self.started = asyncio.Event()

    async def __call__(self, options: BatchOptions, predictor: Any, *, on_progress: Callable[[Any], None] | None,
                       cancel: asyncio.Event | None) -> dict[str, Any]:
        self.runs.append(options)
        self.started.set()
        if len(self.runs) <= self.failures:
            raise OSError("S3 is unreachable")
        for row in range(self.rows):
            if on_progress is not None:
                on_progress({"rows_done": row + 1, "rows_failed": 0, "rows_total": self.rows})
            if self.gate is not None and row == 0:
                assert cancel is not None
                await asyncio.wait({asyncio.ensure_future(self.gate.wait()), asyncio.ensure_future(cancel.wait())},
                                   return_when=asyncio.FIRST_COMPLETED)
            if cancel is not None and cancel.is_set():
                return {"rows_ok": row + 1, "stopped": True}
        return {"rows_ok": self.rows, "rows_failed": 0}


async def until(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("not within the timeout")
        await asyncio.sleep(0.02)


def settings(**changes: Any) -> Settings:
    base = {"jobs_lease_s": 0.6, "jobs_retry_backoff_s": 0.05, "jobs_retry_backoff_max_s": 0.2, "jobs_max_attempts": 3}
    return Settings(**{**base, **changes})  # type: ignore[arg-type]


async def run_worker(store: JobStore, runner: FakeRunner, **changes: Any) -> tuple[JobWorker, asyncio.Task[None]]:
    worker = JobWorker(settings(**changes), zmq.asyncio.Context.instance(), run_batch=runner, predictor=object(),
                       store=store)  # type: ignore[arg-type]
    ready = asyncio.Event()
    return worker, asyncio.create_task(worker.run(ready))


async def state_of(store: JobStore, job_id: str, *states: str) -> JobRecord | None:
    record = await store.get(job_id)
    return record if record is not None and record.state in states else None


@with_store
async def test_the_worker_runs_a_job_to_success_with_its_progress_and_summary(store: JobStore) -> None:
    record, _ = await store.create(OPTIONS, None)
    runner = FakeRunner(rows=5)
    succeeded = metrics.JOBS_FINISHED.labels("succeeded")._value.get()
    _, task = await run_worker(store, runner)
    try:
        done = await until(lambda: state_of(store, record.id, "succeeded"))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert done.attempts == 1 and done.summary == {"rows_ok": 5, "rows_failed": 0}
    assert (done.progress.done, done.progress.total) == (5, 5)
    assert runner.runs[0].resume is False
    assert metrics.JOBS_FINISHED.labels("succeeded")._value.get() == succeeded + 1
    assert metrics.JOBS_RUNNING._value.get() == 0


@with_store
async def test_a_failing_job_is_retried_with_resume_then_succeeds(store: JobStore) -> None:
    record, _ = await store.create(OPTIONS, None)
    runner = FakeRunner(failures=2)
    _, task = await run_worker(store, runner)
    try:
        done = await until(lambda: state_of(store, record.id, "succeeded", "failed"))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert done.state == "succeeded" and done.attempts == 3
    assert metrics.JOB_RETRIES._value.get() >= 2
    assert [options.resume for options in runner.runs] == [False, True, True]


@with_store
async def test_a_job_that_keeps_failing_fails_after_its_attempts(store: JobStore) -> None:
    record, _ = await store.create(OPTIONS, None)
    _, task = await run_worker(store, FakeRunner(failures=10), jobs_max_attempts=2)
    try:
        done = await until(lambda: state_of(store, record.id, "failed"))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert done.attempts == 2 and "S3 is unreachable" in (done.error or "")


@with_store
async def test_cancelling_a_running_job_stops_it(store: JobStore) -> None:
    record, _ = await store.create(OPTIONS, None)
    runner = FakeRunner(gate=asyncio.Event())  # never opened: only the cancel ends the run
    _, task = await run_worker(store, runner)
    try:
        await until(lambda: state_of(store, record.id, "running"))
        await store.request_cancel(record.id)
        done = await until(lambda: state_of(store, record.id, "cancelled"))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert done.cancel_requested and done.finished_at is not None


@with_store
async def test_a_stopping_worker_requeues_its_job_and_the_next_resumes_it_uncounted(store: JobStore) -> None:
    record, _ = await store.create(OPTIONS, None)
    gate = asyncio.Event()
    first = FakeRunner(gate=gate)
    _, task = await run_worker(store, first)
    await until(lambda: state_of(store, record.id, "running"))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    queued = await state_of(store, record.id, "queued")
    assert queued is not None and queued.attempts == 0
    second = FakeRunner()
    _, task = await run_worker(store, second)
    try:
        done = await until(lambda: state_of(store, record.id, "succeeded"))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert done.attempts == 1 and second.runs[0].resume is True


@with_store
async def test_at_most_max_running_jobs_run_at_once(store: JobStore) -> None:
    ids = [(await store.create(OPTIONS, None))[0].id for _ in range(3)]
    gate = asyncio.Event()
    runner = FakeRunner(gate=gate)
    _, task = await run_worker(store, runner, jobs_max_running=2)
    try:
        await until(lambda: _count(store, ids, "running", 2))
        assert await _count(store, ids, "queued", 1)
        gate.set()
        await until(lambda: _count(store, ids, "succeeded", 3))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _count(store: JobStore, ids: list[str], state: str, wanted: int) -> bool:
    records = [await store.get(job_id) for job_id in ids]
    return sum(record is not None and record.state == state for record in records) == wanted


# -- where a job submitted over the API may read and write ---------------------------------------


def test_local_paths_stay_under_the_root_even_through_a_symlink(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path)  # a link inside the root to the folder above it
    assert checked_location("data.parquet", str(root), "input") == str(root / "data.parquet")
    assert checked_location(str(root / "sub" / "out"), str(root), "output") == str(root / "sub" / "out")
    for outside in ("../x.parquet", "/etc/passwd", "escape/x.parquet", "sub/../../x"):
        with pytest.raises(JobsRefused) as refused:
            checked_location(outside, str(root), "input")
        assert refused.value.status == 400
    with pytest.raises(JobsRefused):
        checked_location("data.parquet", None, "input")  # no root: no local path at all
    assert checked_location("s3://bucket/key", None, "input") == "s3://bucket/key"
    with pytest.raises(JobsRefused):
        checked_location("file:///etc/passwd", str(root), "input")
