"""Run a batch job: stream the input through a ``Predictor`` and write the results in parts (docs/JOBS.md).

    summary = await run_batch(options, predictor, on_progress=..., cancel=event)

``concurrency`` requests of ``batch_size`` rows are kept in flight; results are committed in input order, a part
of about ``part_rows`` rows at a time, each followed by the checkpoint, so ``resume`` continues where the last
committed part ends. A request that fails for its rows (bad input, a model error) is sent again row by row, so
only the bad rows fail; a row that fails has its reason in the ``error`` column and never stops the job. What
stops the job is a ``JobError`` (one line, naming the path or the model): unreadable input, refused credentials,
an unknown model, or a proxy that keeps refusing for lack of capacity.

Cancel (``cancel`` set): no new request is sent, those in flight finish, their rows are committed with the
checkpoint, and the summary comes back with ``cancelled=True`` (no metadata.json: the job is not finished;
``resume`` finishes it). No exception is raised for a cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from inferoxy.client import InferenceError
from inferoxy.protocol import ErrorCode
from jobs.datasets import Chunk, Dataset, DatasetError
from jobs.options import BatchOptions
from jobs.output import ERROR_COLUMN, Checkpoint, Output, output_columns, output_schema
from jobs.predictor import ModelInfo, Predictor

# Requests in flight when the options leave it unset: with 32-row requests, 256 rows, enough to fill a few
# replicas' batches (the ZeroMQ bridge's own benchmarks saturate near there).
DEFAULT_CONCURRENCY = 8
# Errors that say nothing about the rows: retried with backoff, then the job fails.
TRANSIENT = frozenset({ErrorCode.OVERLOADED.value, ErrorCode.RATE_LIMITED.value, ErrorCode.NOT_READY.value,
                       ErrorCode.UNAVAILABLE.value, ErrorCode.REPLICA_LOST.value})
# Errors no retry mends: the job stops at once.
FATAL = frozenset({ErrorCode.UNKNOWN_MODEL.value, ErrorCode.UNAUTHENTICATED.value, ErrorCode.FORBIDDEN.value})
MAX_ATTEMPTS = 8
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
# A part is committed once it has part_rows rows or has waited this long, so a slow job still checkpoints.
PART_SECONDS = 30.0


class JobError(Exception):
    """The job cannot go on; the message is one line, meant for the user as is."""


@dataclass(frozen=True, slots=True)
class Progress:
    rows_done: int  # committed or answered, failed ones included
    rows_failed: int
    rows_total: int | None  # None when the input's size is not known up front (CSV)


@dataclass(slots=True)
class JobSummary:
    """What metadata.json holds (``to_json``)."""

    model: str
    version: str
    input: str
    output: str
    rows_ok: int = 0
    rows_failed: int = 0
    parts: int = 0
    started_at: str = ""
    ended_at: str = ""
    seconds: float = 0.0  # this run's wall time (a resumed job: since the resume)
    rows_per_s: float = 0.0  # rows this run / seconds
    stages: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "infer": 0.0, "write": 0.0})
    cancelled: bool = False
    resumed: bool = False

    @property
    def rows(self) -> int:
        return self.rows_ok + self.rows_failed

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows"] = self.rows
        return data


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


@dataclass(slots=True)
class _Done:
    chunk: Chunk
    outputs: dict[str, np.ndarray]  # the good rows'
    good: np.ndarray
    errors: list[str | None]


class _Job:
    def __init__(self, options: BatchOptions, predictor: Predictor, info: ModelInfo,
                 on_progress: Callable[[Progress], None] | None, cancel: asyncio.Event | None) -> None:
        self.options = options
        self.predictor = predictor
        self.info = info
        self.on_progress = on_progress
        self.cancel = cancel
        self.concurrency = options.concurrency or DEFAULT_CONCURRENCY
        self.stages = {"read": 0.0, "infer": 0.0, "write": 0.0}
        self._in_flight = 0
        self._busy_since = 0.0

    # -- requests ---------------------------------------------------------------------------------------------------

    def _busy(self, delta: int) -> None:
        # Infer time is the wall time with at least one request out: the stages overlap, this does not double count.
        now = time.perf_counter()
        if self._in_flight == 0 and delta > 0:
            self._busy_since = now
        self._in_flight += delta
        if self._in_flight == 0:
            self.stages["infer"] += now - self._busy_since

    async def _send(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs, or InferenceError for a failure of these rows; JobError when retrying cannot help."""
        options = self.options
        backoff = FIRST_BACKOFF_S
        for attempt in range(MAX_ATTEMPTS):
            self._busy(1)
            try:
                return await self.predictor.infer(options.model, options.version, inputs)
            except InferenceError as exc:
                if exc.code in FATAL:
                    raise JobError(f"model {options.model!r}: {exc.code}: {exc.message}") from None
                if exc.code not in TRANSIENT:
                    raise
                if attempt == MAX_ATTEMPTS - 1:
                    raise JobError(f"model {options.model!r}: still {exc.code} after {MAX_ATTEMPTS} attempts: "
                                   f"{exc.message}") from None
                delay = exc.retry_after_s if exc.retry_after_s is not None else backoff
            finally:
                self._busy(-1)
            await asyncio.sleep(min(delay, MAX_BACKOFF_S))
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        raise AssertionError("unreachable")

    def _check(self, outputs: dict[str, np.ndarray], rows: int) -> None:
        for tensor in self.info.outputs:
            value = outputs.get(tensor.name)
            if value is None:
                raise InferenceError(ErrorCode.MODEL_ERROR.value, f"the reply has no output {tensor.name!r}")
            if value.ndim == 0 or len(value) != rows:
                raise InferenceError(ErrorCode.MODEL_ERROR.value,
                                     f"output {tensor.name!r} has shape {list(value.shape)} for {rows} rows")

    async def _row(self, inputs: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray] | str:
        one = {name: value[index:index + 1] for name, value in inputs.items()}
        try:
            outputs = await self._send(one)
            self._check(outputs, 1)
            return outputs
        except InferenceError as exc:
            return f"{exc.code}: {exc.message}"

    async def _infer(self, chunk: Chunk) -> _Done:
        good = chunk.good.copy()
        errors = list(chunk.errors)
        rows = int(good.sum())
        if rows == 0:
            return _Done(chunk, {}, good, errors)
        try:
            outputs = await self._send(chunk.inputs)
            self._check(outputs, rows)
            return _Done(chunk, outputs, good, errors)
        except InferenceError as exc:
            if rows == 1:
                errors[int(np.flatnonzero(good)[0])] = f"{exc.code}: {exc.message}"
                good[:] = False
                return _Done(chunk, {}, good, errors)
        # Some row spoiled the request: each alone, so only the bad ones fail.
        results = await asyncio.gather(*(self._row(chunk.inputs, i) for i in range(rows)))
        positions = np.flatnonzero(good)
        kept: list[dict[str, np.ndarray]] = []
        for position, result in zip(positions, results, strict=True):
            if isinstance(result, str):
                errors[position] = result
                good[position] = False
            else:
                kept.append(result)
        stacked = {t.name: np.concatenate([r[t.name] for r in kept]) for t in self.info.outputs} if kept else {}
        return _Done(chunk, stacked, good, errors)

    # -- the pipeline -----------------------------------------------------------------------------------------------

    async def run(self, dataset: Dataset, output: Output, checkpoint: Checkpoint, total: int | None) -> JobSummary:
        options = self.options
        started = time.perf_counter()
        resumed = checkpoint.rows > 0 or checkpoint.parts > 0
        started_at = checkpoint.started_at or _now()
        checkpoint.started_at = started_at
        base_stages = dict(checkpoint.stages)
        rows_before = checkpoint.rows
        limit = None if options.max_samples is None else max(0, options.max_samples - checkpoint.rows)
        blocks = dataset.blocks(skip=checkpoint.rows, limit=limit)
        window = asyncio.Semaphore(self.concurrency)
        # Answered requests wait here for those before them (and through a part's write): bounded, a few per lane.
        order: asyncio.Queue[asyncio.Task[_Done] | None] = asyncio.Queue(maxsize=4 * self.concurrency)
        producer = asyncio.create_task(self._produce(blocks, window, order), name="batch-read")
        pending: list[_Done] = []
        answered = checkpoint.ok + checkpoint.failed
        failed = checkpoint.failed
        last_commit = time.perf_counter()
        schema: pa.Schema | None = None
        cancelled = False
        try:
            while True:
                task = await order.get()
                if task is None:
                    break
                done = await task
                pending.append(done)
                answered += done.chunk.rows
                failed += done.chunk.rows - int(done.good.sum())
                if self.on_progress is not None:
                    self.on_progress(Progress(answered, failed, total))
                if schema is None:
                    schema = output_schema(self.info, done.chunk.keys.type, dataset.key_name)
                if (sum(d.chunk.rows for d in pending) >= options.part_rows
                        or time.perf_counter() - last_commit >= PART_SECONDS):
                    await self._commit(output, checkpoint, pending, schema, base_stages)
                    pending = []
                    last_commit = time.perf_counter()
            await producer  # its error (an unreadable shard) is the job's
            if pending and schema is not None:
                await self._commit(output, checkpoint, pending, schema, base_stages)
            cancelled = self.cancel is not None and self.cancel.is_set()
        finally:
            producer.cancel()
            while not order.empty():
                leftover = order.get_nowait()
                if leftover is not None:
                    leftover.cancel()
            with contextlib.suppress(BaseException):
                await producer
        seconds = time.perf_counter() - started
        this_run = checkpoint.rows - rows_before
        summary = JobSummary(
            model=options.model, version=self.info.version, input=options.input, output=output.url,
            rows_ok=checkpoint.ok, rows_failed=checkpoint.failed, parts=checkpoint.parts, started_at=started_at,
            ended_at=_now(), seconds=round(seconds, 3), rows_per_s=round(this_run / seconds, 1) if seconds else 0.0,
            stages={k: round(v, 3) for k, v in checkpoint.stages.items()}, cancelled=cancelled, resumed=resumed)
        if not cancelled:
            await asyncio.to_thread(output.write_metadata, summary.to_json())
        return summary

    async def _produce(self, blocks: Iterator[list[Chunk]], window: asyncio.Semaphore,
                       order: asyncio.Queue[asyncio.Task[_Done] | None]) -> None:
        try:
            while self.cancel is None or not self.cancel.is_set():
                began = time.perf_counter()
                block = await asyncio.to_thread(next, blocks, None)
                self.stages["read"] += time.perf_counter() - began
                if block is None:
                    break
                for chunk in block:
                    await window.acquire()
                    if self.cancel is not None and self.cancel.is_set():
                        window.release()
                        break
                    task = asyncio.create_task(self._infer(chunk))
                    task.add_done_callback(lambda _: window.release())
                    await order.put(task)
        except asyncio.CancelledError:
            raise  # the consumer stopped us: nobody reads the queue any more
        except BaseException:
            # The consumer stops at the end mark, then awaits this task and gets the error (an unreadable shard).
            await order.put(None)
            raise
        await order.put(None)

    async def _commit(self, output: Output, checkpoint: Checkpoint, done: list[_Done], schema: pa.Schema,
                      base: dict[str, float]) -> None:
        began = time.perf_counter()
        table = await asyncio.to_thread(_table, self.info, done, schema)
        await asyncio.to_thread(output.write_part, checkpoint.parts, table)
        checkpoint.parts += 1
        checkpoint.rows += table.num_rows
        bad = sum(len(d.errors) - int(d.good.sum()) for d in done)
        checkpoint.failed += bad
        checkpoint.ok += table.num_rows - bad
        self.stages["write"] += time.perf_counter() - began
        checkpoint.stages = {k: base.get(k, 0.0) + v for k, v in self.stages.items()}
        await asyncio.to_thread(output.write_checkpoint, checkpoint)


def _table(info: ModelInfo, done: list[_Done], schema: pa.Schema) -> pa.Table:
    """One part's rows as one record batch: built per chunk, thousands of 32-row batches cost more to make and
    to write than the rows themselves."""
    good = np.concatenate([item.good for item in done])
    try:
        outputs = {t.name: np.concatenate([item.outputs[t.name] for item in done if item.outputs])
                   for t in info.outputs if any(item.outputs for item in done)}
    except ValueError:  # outputs of free dimensions that differ between requests: chunk by chunk
        return pa.Table.from_batches([_record_batch(info, [item], schema) for item in done], schema=schema)
    keys = pa.concat_arrays([item.chunk.keys.cast(schema.field(0).type) for item in done])
    errors = pa.array([e for item in done for e in item.errors], pa.string())
    columns = [keys, *output_columns(info, outputs, good), errors]
    return pa.Table.from_batches([pa.RecordBatch.from_arrays(columns, schema=schema)], schema=schema)


def _record_batch(info: ModelInfo, done: list[_Done], schema: pa.Schema) -> pa.RecordBatch:
    item = done[0]
    keys = item.chunk.keys.cast(schema.field(0).type)
    columns = [keys, *output_columns(info, item.outputs, item.good), pa.array(item.errors, pa.string())]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def fingerprint(options: BatchOptions, info: ModelInfo) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the same rows through the same model version."""
    return {"model": options.model, "version": info.version, "input": options.input,
            "inputs": dict(sorted(options.inputs.items())), "key_column": options.key_column}


async def run_batch(options: BatchOptions, predictor: Predictor, *,
                    on_progress: Callable[[Progress], None] | None = None,
                    cancel: asyncio.Event | None = None) -> JobSummary:
    """Run the job to its end (or its cancel); raises ``JobError`` when it cannot go on."""
    try:
        info = await predictor.metadata(options.model, options.version)
    except InferenceError as exc:
        raise JobError(f"model {options.model!r}: {exc.code}: {exc.message}") from None
    try:
        dataset = await asyncio.to_thread(Dataset, options, info)
        output = Output(options.output, options.storage_options)
        checkpoint = await asyncio.to_thread(output.open, fingerprint(options, info), options.resume)
        total = await asyncio.to_thread(dataset.total_rows)
        if total is not None and options.max_samples is not None:
            total = min(total, options.max_samples)
        return await _Job(options, predictor, info, on_progress, cancel).run(dataset, output, checkpoint, total)
    except DatasetError as exc:
        raise JobError(str(exc)) from None


__all__ = ["ERROR_COLUMN", "JobError", "JobSummary", "Progress", "run_batch"]
