"""The ``job_worker`` component: claims queued jobs from Redis and runs each through the batch runner.

``inferoxy serve`` starts it after the batch manager; ``inferoxy run job_worker`` runs it alone (several
may run against one Redis: a job's lease keeps it on one worker, jobs/store.py). It reaches models over
the bus through a ``Gateway``, as a bridge does (jobs/bus_predictor.py), and runs at most
``jobs_max_running`` jobs at once; the rest wait queued in Redis (bounded by ``jobs_max_queued``).

While a job runs, a ticker renews its lease every third of ``jobs_lease_s`` (at most every second),
writes its progress into the record and looks for a cancel request. A job's own failure (the runner
raised: S3 unreachable, its output unwritable) is retried after ``jobs_retry_backoff_s`` doubling up to
``jobs_retry_backoff_max_s``, until ``jobs_max_attempts`` runs; a claim of a job left ``running`` (its
worker died) counts as a run too. Every run after the first resumes from the output's checkpoint
(``resume=True``), so no row is written twice. A worker that stops (SIGTERM) puts its jobs back in the
queue without counting the interrupted run, and the next worker to start resumes them.

The queue is polled every ``POLL_S``: jobs are few and long, and a due retry or an expired lease is a
time, not an event, so a poll is what notices them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import zmq.asyncio

from bridges.gateway import Gateway
from inferoxy import metrics
from inferoxy.settings import Settings
from inferoxy.tasks import cancel_and_wait
from jobs.bus_predictor import BusPredictor
from jobs.options import BatchOptions
from jobs.predictor import Predictor
from jobs.store import JobRecord, JobStore, backoff_s

log = logging.getLogger(__name__)

POLL_S = 0.5
# The longest a ticker waits between renewals and progress writes.
MAX_TICK_S = 1.0

# run_batch(options, predictor, on_progress=, cancel=) -> a summary (jobs/runner.py).
RunBatch = Callable[..., Awaitable[Any]]


def _default_run_batch() -> RunBatch:
    from jobs.runner import run_batch  # imported late: the runner pulls in pyarrow and fsspec

    return run_batch


def as_dict(value: Any) -> dict[str, Any] | None:
    """A runner summary or progress (a pydantic model, a dataclass or a mapping) as plain JSON-able data."""
    if value is None:
        return None
    if hasattr(value, "to_json"):  # jobs.runner.JobSummary: what metadata.json holds
        return dict(value.to_json())
    if hasattr(value, "model_dump"):
        return dict(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return dict(value)
    return {"value": str(value)}


def _progress_counts(progress: Any) -> tuple[int, int, int | None]:
    """(rows done, rows failed, rows in all or None) out of the runner's ``Progress``."""
    data = as_dict(progress) or {}

    def first(*names: str) -> Any:
        return next((data[name] for name in names if data.get(name) is not None), None)

    done = first("rows_done", "done", "rows", "processed") or 0
    failed = first("rows_failed", "failed", "errors") or 0
    total = first("rows_total", "total")
    return int(done), int(failed), None if total is None else int(total)


class JobWorker:
    name = "job_worker"

    def __init__(self, settings: Settings, ctx: zmq.asyncio.Context, *, run_batch: RunBatch | None = None,
                 predictor: Predictor | None = None, store: JobStore | None = None) -> None:
        self.settings = settings
        self.ctx = ctx
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._run_batch = run_batch
        self._predictor = predictor
        self._store = store
        self._running: dict[str, asyncio.Task[None]] = {}

    async def run(self, ready: asyncio.Event) -> None:
        settings = self.settings
        store = self._store
        if store is None:
            if not settings.redis_url:
                raise RuntimeError("INFEROXY_REDIS_URL is not set: run the job worker under `inferoxy serve` or "
                                   "point it at the registry's Redis")
            store = JobStore.from_url(settings.redis_url, settings.redis_prefix)
        gateway: Gateway | None = None
        predictor = self._predictor
        if predictor is None:
            gateway = Gateway(settings, self.ctx)
            await gateway.start()
            predictor = BusPredictor(gateway)
        run_batch = self._run_batch or _default_run_batch()
        poller = asyncio.create_task(self._poll(store, predictor, run_batch), name="job-poll")
        try:
            ready.set()
            log.info("job worker %s: at most %d jobs at once", self.worker_id, settings.jobs_max_running)
            # The poller talks to Redis all the time, and a cancellation landing as a Redis command completes
            # is lost on Python 3.11 (inferoxy/tasks.py): cancelled through asyncio.wait, this task never hands
            # its own cancellation to it, and cancel_and_wait below repeats it until the poller has ended.
            await asyncio.wait({poller})
            poller.result()
        finally:
            await cancel_and_wait([poller])
            # Each job's own handler puts it back in the queue (uncounted) before its task ends.
            await cancel_and_wait(list(self._running.values()))
            self._running.clear()
            if gateway is not None:
                await gateway.close()
            if self._store is None:
                with contextlib.suppress(Exception):
                    await store.close()

    async def _poll(self, store: JobStore, predictor: Predictor, run_batch: RunBatch) -> None:
        """Claim jobs while there is room, every POLL_S or as soon as a running one ends."""
        while True:
            await self._fill(store, predictor, run_batch)
            if self._running:
                await asyncio.wait(set(self._running.values()), timeout=POLL_S)
            else:
                await asyncio.sleep(POLL_S)

    async def _fill(self, store: JobStore, predictor: Predictor, run_batch: RunBatch) -> None:
        while len(self._running) < self.settings.jobs_max_running:
            try:
                record = await store.claim(self.worker_id, self.settings.jobs_lease_s)
            except Exception as exc:  # Redis away: try again at the next poll
                log.warning("job worker: cannot read the job queue: %s", exc)
                return
            if record is None:
                return
            task = asyncio.create_task(self._run_job(store, predictor, run_batch, record), name=f"job-{record.id}")
            self._running[record.id] = task
            task.add_done_callback(self._forget(record.id))

    def _forget(self, job_id: str) -> Callable[[asyncio.Task[None]], None]:
        def forget(_: asyncio.Task[None]) -> None:
            self._running.pop(job_id, None)

        return forget

    async def _run_job(self, store: JobStore, predictor: Predictor, run_batch: RunBatch, record: JobRecord) -> None:
        settings = self.settings
        now = time.time()
        if record.state == "running":
            log.warning("job %s: its worker stopped renewing its claim; running it again", record.id)
            if not record.error:
                record.error = "the worker running it stopped"
        if record.attempts >= settings.jobs_max_attempts:
            await self._end(store, record, "failed", f"gave up after {record.attempts} runs; last: {record.error}")
            return
        if await store.cancel_wanted(record.id):
            await self._end(store, record, "cancelled", None)
            return
        options: BatchOptions = record.options
        if record.started_at is not None:
            options = options.model_copy(update={"resume": True})  # an earlier run wrote parts: continue them
        record.state = "running"
        record.attempts += 1
        record.started_at = record.started_at or now
        await store.save(record)
        log.info("job %s: run %d of %s on %s", record.id, record.attempts, options.model, self.worker_id)

        cancel = asyncio.Event()
        latest: list[Any] = []
        lost = asyncio.Event()

        def on_progress(progress: Any) -> None:
            latest[:] = [progress]

        ticker = asyncio.create_task(self._tick(store, record, latest, cancel, lost), name=f"job-{record.id}-tick")
        started = time.monotonic()
        metrics.JOBS_RUNNING.inc()
        try:
            summary = await run_batch(options, predictor, on_progress=on_progress, cancel=cancel)
        except asyncio.CancelledError:
            # The worker stops: the job goes back to the queue, and this interrupted run does not count.
            await cancel_and_wait([ticker])
            record.attempts -= 1
            record.not_before = 0.0
            with contextlib.suppress(Exception):
                await asyncio.shield(store.requeue(record, self.worker_id))
            raise
        except Exception as exc:
            await cancel_and_wait([ticker])
            if lost.is_set():
                return
            record.timings["run_s"] = time.monotonic() - started
            error = f"{type(exc).__name__}: {exc}"
            if cancel.is_set():
                await self._end(store, record, "cancelled", error)
            elif record.attempts < settings.jobs_max_attempts:
                wait_s = backoff_s(record.attempts, settings.jobs_retry_backoff_s, settings.jobs_retry_backoff_max_s)
                log.warning("job %s: run %d failed (%s); retrying in %.1fs", record.id, record.attempts, error, wait_s)
                record.error = error
                record.not_before = time.time() + wait_s
                metrics.JOB_RETRIES.inc()
                await store.requeue(record, self.worker_id)
            else:
                log.error("job %s: run %d failed (%s); no runs left", record.id, record.attempts, error)
                await self._end(store, record, "failed", error)
            return
        finally:
            metrics.JOBS_RUNNING.dec()
        await cancel_and_wait([ticker])
        if lost.is_set():
            return
        record.timings["run_s"] = time.monotonic() - started
        if latest:
            record.progress.done, record.progress.failed, record.progress.total = _progress_counts(latest[0])
        record.summary = as_dict(summary)
        stages = (record.summary or {}).get("stages")
        if isinstance(stages, dict):
            record.timings.update({f"{stage}_s": float(seconds) for stage, seconds in stages.items()})
        await self._end(store, record, "cancelled" if cancel.is_set() else "succeeded", None)

    async def _end(self, store: JobStore, record: JobRecord, state: str, error: str | None) -> None:
        record.state = state  # type: ignore[assignment]
        record.finished_at = time.time()
        record.cancel_requested = record.cancel_requested or state == "cancelled"
        if error is not None:
            record.error = error
        await store.finish(record, retention_s=self.settings.jobs_retention_s)
        await store.release(record.id, self.worker_id)
        metrics.JOBS_FINISHED.labels(state).inc()
        log.info("job %s: %s", record.id, state)

    async def _tick(self, store: JobStore, record: JobRecord, latest: list[Any], cancel: asyncio.Event,
                    lost: asyncio.Event) -> None:
        """Renew the lease, store progress, notice a cancel request; stop the run if the lease is lost."""
        lease_s = self.settings.jobs_lease_s
        every_s = min(MAX_TICK_S, lease_s / 3)
        written: Any = None
        while True:
            await asyncio.sleep(every_s)
            try:
                if not await store.renew(record.id, self.worker_id, lease_s):
                    log.error("job %s: this worker lost its claim; stopping its run", record.id)
                    lost.set()
                    cancel.set()
                    return
                if not cancel.is_set() and await store.cancel_wanted(record.id):
                    log.info("job %s: cancel requested", record.id)
                    record.cancel_requested = True
                    cancel.set()
                if latest and latest[0] is not written:
                    written = latest[0]
                    record.progress.done, record.progress.failed, record.progress.total = _progress_counts(written)
                    await store.save(record)
            except Exception as exc:  # Redis away for a moment: the lease outlives a few missed ticks
                log.warning("job %s: cannot reach Redis: %s", record.id, exc)
