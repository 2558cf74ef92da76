"""Where a job's results go: parquet parts in the output folder, a checkpoint, and metadata.json next to it.

Layout (docs/JOBS.md, "Output")::

    OUTPUT/part-00000.parquet ...   results, in input order, one part per committed stretch of rows
    OUTPUT/_checkpoint.json         parts committed and input rows they cover (pyarrow skips names starting
                                    with "_" when it reads the folder as one table)
    OUTPUT.metadata.json            the finished job's summary: named after the output, so two jobs writing
                                    into one folder never share one

A part is written whole, then the checkpoint names it: a part the checkpoint does not name is left over from a
killed run and is overwritten (or removed) on ``--resume``, so no row is written twice and none is missed.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.datasets import DatasetError, describe_error, filesystem
from jobs.predictor import ModelInfo
from model_manager.spec import TensorSpec

CHECKPOINT = "_checkpoint.json"
METADATA_SUFFIX = ".metadata.json"
ERROR_COLUMN = "error"
_PART = re.compile(r"part-(\d{5,})\.parquet$")

_ARROW_TYPES: dict[str, pa.DataType] = {
    "BOOL": pa.bool_(), "UINT8": pa.uint8(), "UINT16": pa.uint16(), "UINT32": pa.uint32(), "UINT64": pa.uint64(),
    "INT8": pa.int8(), "INT16": pa.int16(), "INT32": pa.int32(), "INT64": pa.int64(), "FP16": pa.float16(),
    "FP32": pa.float32(), "FP64": pa.float64(), "BYTES": pa.binary(),
}


def arrow_type(tensor: TensorSpec) -> pa.DataType:
    """A row of ``tensor`` in the output: a scalar, or a flat list (row-major) for any other shape."""
    scalar = _ARROW_TYPES[tensor.datatype]
    return scalar if not tensor.shape else pa.list_(scalar)


@dataclass(slots=True)
class Checkpoint:
    """What a stopped job had committed. ``fingerprint`` ties it to the job's model and input."""

    fingerprint: dict[str, Any]
    parts: int = 0
    rows: int = 0  # input rows the committed parts cover
    ok: int = 0
    failed: int = 0
    started_at: str | None = None
    stages: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "infer": 0.0, "write": 0.0})

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "parts": self.parts, "rows": self.rows, "ok": self.ok,
                "failed": self.failed, "started_at": self.started_at, "stages": self.stages}


class Output:
    """The output folder of one job (local or s3://)."""

    def __init__(self, url: str, storage_options: dict[str, str]) -> None:
        url = url.rstrip("/")
        self.url = url
        self.fs, self.path = filesystem(url, storage_options)
        if not posixpath.basename(self.path) or (url.startswith("s3://") and "/" not in self.path):
            raise DatasetError(f"{url}: the output needs a folder name (s3://BUCKET/NAME), not a bucket's root")
        self.metadata_path = self.path + METADATA_SUFFIX

    def _url_of(self, path: str) -> str:
        return f"s3://{path}" if self.url.startswith("s3://") else path

    def _storage(self, path: str, action: Any) -> Any:
        try:
            return action()
        except DatasetError:
            raise
        except Exception as exc:  # s3fs/botocore: denied, no bucket, no endpoint... one line names the path
            raise DatasetError(describe_error(self._url_of(path), exc)) from None

    def open(self, fingerprint: dict[str, Any], resume: bool) -> Checkpoint:
        """Prepare the folder: a fresh job needs it absent or empty; a resumed one reads its checkpoint and removes
        parts it does not name."""
        return self._storage(self.path, lambda: self._open(fingerprint, resume))

    def _open(self, fingerprint: dict[str, Any], resume: bool) -> Checkpoint:
        fs, path = self.fs, self.path
        checkpoint_path = posixpath.join(path, CHECKPOINT)
        exists = fs.exists(path)
        if exists and not fs.isdir(path):
            raise DatasetError(f"{self.url}: exists and is a file; the output is a folder of parquet parts")
        if resume and exists and fs.exists(checkpoint_path):
            with fs.open(checkpoint_path, "rb") as handle:
                data = json.loads(handle.read())
            if data.get("fingerprint") != fingerprint:
                raise DatasetError(f"{self.url}: its checkpoint is from another job ({data.get('fingerprint')}); "
                                   "resume with the same model, version and input")
            checkpoint = Checkpoint(fingerprint, int(data["parts"]), int(data["rows"]), int(data["ok"]),
                                    int(data["failed"]), data.get("started_at"), dict(data["stages"]))
            for name in self._parts():
                match = _PART.search(name)
                if match and int(match.group(1)) >= checkpoint.parts:
                    fs.rm(name)  # written by the killed run after its last checkpoint
            return checkpoint
        if exists and fs.ls(path):
            if not resume:
                raise DatasetError(f"{self.url}: the output folder exists and is not empty (--resume continues "
                                   "the job that wrote it; else remove it or pick another)")
            raise DatasetError(f"{self.url}: nothing to resume (no {CHECKPOINT}), and the folder is not empty")
        if not self.url.startswith("s3://"):
            fs.makedirs(path, exist_ok=True)
        elif not fs.exists(path.split("/", 1)[0]):
            raise DatasetError(f"{self.url}: the bucket {path.split('/', 1)[0]!r} does not exist")
        return Checkpoint(fingerprint)

    def _parts(self) -> list[str]:
        return sorted(p for p in self.fs.ls(self.path, detail=False) if _PART.search(p))

    def write_part(self, index: int, table: pa.Table) -> None:
        name = posixpath.join(self.path, f"part-{index:05d}.parquet")

        def write() -> None:
            with self.fs.open(name, "wb") as handle:
                pq.write_table(table, handle)

        self._storage(name, write)

    def write_checkpoint(self, checkpoint: Checkpoint) -> None:
        self._write_json(posixpath.join(self.path, CHECKPOINT), checkpoint.to_json())

    def write_metadata(self, summary: dict[str, Any]) -> None:
        self._write_json(self.metadata_path, summary)

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        payload = json.dumps(data, indent=2).encode()

        def write() -> None:
            if self.url.startswith("s3://"):
                self.fs.pipe_file(name, payload)  # one PUT: S3 replaces an object whole
            else:
                # Local: write aside and rename, so a kill never leaves half a checkpoint.
                temporary = name + ".tmp"
                with self.fs.open(temporary, "wb") as handle:
                    handle.write(payload)
                self.fs.mv(temporary, name)

        self._storage(name, write)


def output_schema(info: ModelInfo, key_type: pa.DataType, key_name: str) -> pa.Schema:
    fields = [pa.field(key_name, key_type)]
    for tensor in info.outputs:
        if tensor.name in (key_name, ERROR_COLUMN):
            raise DatasetError(f"the model's output {tensor.name!r} has the name of the output's "
                               f"{'key' if tensor.name == key_name else 'error'} column")
        fields.append(pa.field(tensor.name, arrow_type(tensor)))
    fields.append(pa.field(ERROR_COLUMN, pa.string()))
    return pa.schema(fields)


def output_columns(info: ModelInfo, outputs: dict[str, np.ndarray], good: np.ndarray) -> list[pa.Array]:
    """One arrow column per declared output, as long as ``good`` (null where a row failed); ``outputs`` hold the
    good rows only."""
    n = len(good)
    all_good = bool(good.all())
    columns = []
    for tensor in info.outputs:
        kind = arrow_type(tensor)
        values = outputs.get(tensor.name)
        if values is None:
            columns.append(pa.nulls(n, kind))
            continue
        if tensor.datatype == "BYTES":
            rows: list[Any] = [None] * n
            flat_rows = iter(values.reshape(len(values), -1) if tensor.shape else values.reshape(-1))
            for index in np.flatnonzero(good):
                row = next(flat_rows)
                rows[index] = [bytes(v) for v in row] if tensor.shape else bytes(row)
            columns.append(pa.array(rows, kind))
            continue
        scalar = _ARROW_TYPES[tensor.datatype]
        if not tensor.shape:
            flat = values.reshape(-1)
            if all_good:
                columns.append(pa.array(flat, scalar))
            else:
                full = np.zeros(n, dtype=flat.dtype)
                full[good] = flat
                columns.append(pa.array(full, scalar, mask=~good))
            continue
        per_row = values.reshape(len(values), -1)
        lengths = np.zeros(n, dtype=np.int32)
        lengths[good] = per_row.shape[1]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        mask = None if all_good else pa.array(~good)
        columns.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                                pa.array(per_row.reshape(-1), scalar), type=kind, mask=mask))
    return columns

