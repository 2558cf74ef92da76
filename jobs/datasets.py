"""A job's input as a stream of row chunks, each already made into the model's input tensors.

Parquet (a file or a folder of shards, as img2dataset writes them), CSV, or a folder of images; a local path or
an ``s3://`` URL (fsspec, told by the path). Rows are read ``batch_size`` at a time, never the whole dataset.
A row that cannot become tensors (a bad image, a list of the wrong length) is a failed row with its reason;
what stops the whole job (a missing column, an unreadable file, refused credentials) is a ``DatasetError``
whose message names the path.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from inferoxy.wire import DTYPES
from jobs.options import BatchOptions
from jobs.predictor import ModelInfo
from model_manager.spec import DATATYPE_TO_DTYPE, TensorSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The columns a folder of images reads as: the file's name (relative to the folder) and its bytes.
IMAGE_KEY_COLUMN = "key"
IMAGE_COLUMN = "image"
ROW_COLUMN = "row"
# Pillow refuses larger images (decompression bombs) with an error: that row fails.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# Rows read and converted at once (parquet, CSV), then cut into requests: large enough that arrow's and numpy's
# per-call costs vanish, small enough to stay a few MB in memory.
BLOCK_ROWS = 4096


class DatasetError(Exception):
    """The job cannot read its input; the message names the path and says why (shown as is)."""


@dataclass(slots=True)
class Chunk:
    """Consecutive input rows: ``first`` is the index of the first in the whole input.

    ``inputs`` hold the rows that could be made into tensors (``good`` of them, in order); ``errors`` is one entry
    per row, None for a good row."""

    first: int
    keys: pa.Array
    inputs: dict[str, np.ndarray]
    good: np.ndarray  # bool per row
    errors: list[str | None]

    @property
    def rows(self) -> int:
        return len(self.errors)


def filesystem(url: str, storage_options: dict[str, str]) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path within it."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **_storage_options(url, storage_options))
    except (ValueError, ImportError, TypeError) as exc:
        raise DatasetError(f"{url}: {exc}") from None
    return fs, path


def _storage_options(url: str, options: dict[str, str]) -> dict[str, Any]:
    if not url.startswith("s3://"):
        if options:
            raise DatasetError(f"{url}: storage options apply to s3:// URLs only")
        return {}
    # s3fs wants the endpoint and region under client_kwargs; accept the flat spelling users type.
    out: dict[str, Any] = {}
    client: dict[str, Any] = {}
    for key, value in options.items():
        if key in ("endpoint_url", "region_name", "region"):
            client["region_name" if key == "region" else key] = value
        elif key == "anon":
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = value
    if client:
        out["client_kwargs"] = client
    return out


def describe_error(url: str, exc: BaseException) -> str:
    """One line for a storage failure: s3fs raises PermissionError / FileNotFoundError / botocore errors."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, PermissionError):
        return f"{url}: access denied (check the credentials and the bucket's policy): {text}"
    if isinstance(exc, FileNotFoundError):
        return f"{url}: not found (is the path or bucket spelled right?)"
    return f"{url}: {type(exc).__name__}: {text}"


class Dataset:
    """An input, opened: its format, files and columns are known; ``chunks`` reads it."""

    def __init__(self, options: BatchOptions, info: ModelInfo) -> None:
        self.url = options.input
        self.batch_size = options.batch_size
        self.fs, self.path = filesystem(options.input, options.storage_options)
        try:
            self.format, self.files = self._discover(options.input_format)
        except DatasetError:
            raise
        except Exception as exc:  # botocore's and fsspec's own errors: the one line is enough
            raise DatasetError(describe_error(self.url, exc)) from None
        self.columns = self._column_names()
        self.key_column = options.key_column
        if self.key_column is not None and self.key_column not in self.columns:
            raise DatasetError(f"{self.url}: no column {self.key_column!r} for the key; it has {sorted(self.columns)}")
        self.mapping: dict[str, str] = {}
        for name in options.inputs:
            if name not in {t.name for t in info.inputs}:
                raise DatasetError(f"--input {name}=...: the model has no input {name!r}; it has "
                                   f"{[t.name for t in info.inputs]}")
        for tensor in info.inputs:
            column = options.inputs.get(tensor.name, tensor.name)
            if column not in self.columns and self.format == "images" and len(info.inputs) == 1:
                column = IMAGE_COLUMN
            if column not in self.columns:
                raise DatasetError(f"{self.url}: no column {column!r} for the model's input {tensor.name!r}; it has "
                                   f"{sorted(self.columns)} (map one with --input {tensor.name}=COLUMN)")
            self.mapping[tensor.name] = column
        self.tensors = list(info.inputs)

    # -- discovery --------------------------------------------------------------------------------------------------

    def _discover(self, wanted: str) -> tuple[str, list[str]]:
        fs, path = self.fs, self.path
        if not fs.exists(path):
            raise DatasetError(f"{self.url}: not found")
        if fs.isdir(path):
            files = sorted(p for p in fs.find(path) if not _hidden(posixpath.relpath(p, path)))
            parquet = [p for p in files if p.endswith(".parquet")]
            images = [p for p in files if p.lower().endswith(IMAGE_SUFFIXES)]
            if wanted in ("auto", "parquet") and parquet:
                return "parquet", parquet
            if wanted in ("auto", "images") and images:
                return "images", images
            if wanted == "csv":
                csvs = [p for p in files if p.endswith(".csv")]
                if csvs:
                    return "csv", csvs
            raise DatasetError(f"{self.url}: a folder with no {'parquet or image' if wanted == 'auto' else wanted} "
                               "files")
        if wanted == "auto":
            lower = path.lower()
            if lower.endswith(".csv"):
                wanted = "csv"
            elif lower.endswith(".parquet") or lower.endswith(".pq"):
                wanted = "parquet"
            else:
                raise DatasetError(f"{self.url}: cannot tell the format from the name (.parquet, .csv, or a folder)")
        if wanted == "images":
            raise DatasetError(f"{self.url}: a folder of images is a folder")
        return wanted, [path]

    def _column_names(self) -> set[str]:
        if self.format == "images":
            return {IMAGE_KEY_COLUMN, IMAGE_COLUMN}
        first = self.files[0]
        try:
            if self.format == "parquet":
                with self.fs.open(first, "rb") as handle:
                    return set(pq.ParquetFile(handle).schema_arrow.names)
            with self.fs.open(first, "rb") as handle:
                return set(next(iter(_csv_batches(handle, 2))).schema.names)
        except (pa.ArrowInvalid, StopIteration) as exc:
            raise DatasetError(f"{self._url_of(first)}: not a readable {self.format} file: {exc}") from None
        except OSError as exc:
            raise DatasetError(describe_error(self._url_of(first), exc)) from None

    @property
    def key_name(self) -> str:
        """The output's key column: the one the user named, an image's file name, else the row's index."""
        if self.key_column is not None:
            return self.key_column
        return IMAGE_KEY_COLUMN if self.format == "images" else ROW_COLUMN

    def _url_of(self, path: str) -> str:
        return f"s3://{path}" if self.url.startswith("s3://") else path

    def total_rows(self) -> int | None:
        """How many rows the input has, when that is cheap to know (parquet footers, files in a folder)."""
        if self.format == "images":
            return len(self.files)
        if self.format == "parquet":
            total = 0
            for path in self.files:
                try:
                    with self.fs.open(path, "rb") as handle:
                        total += pq.ParquetFile(handle).metadata.num_rows
                except Exception as exc:
                    raise DatasetError(describe_error(self._url_of(path), exc)) from None
            return total
        return None

    # -- reading ----------------------------------------------------------------------------------------------------

    def blocks(self, skip: int = 0, limit: int | None = None) -> Iterator[list[Chunk]]:
        """Chunks of ``batch_size`` rows from row ``skip`` on, at most ``limit`` rows in all, a record batch's worth
        at a time (blocking I/O: run it in a thread). Whole record batches are converted at once and then cut:
        per 32-row chunk, arrow's and numpy's fixed costs would exceed the work."""
        emitted = 0
        for path, (batch, index) in self._record_batches(skip):
            if limit is not None:
                if emitted >= limit:
                    return
                batch = batch.slice(0, limit - emitted)
            emitted += batch.num_rows
            if batch.num_rows:
                yield _cut(self._chunk(index, batch, path), self.batch_size)

    def chunks(self, skip: int = 0, limit: int | None = None) -> Iterator[Chunk]:
        """``blocks``, one chunk at a time."""
        for block in self.blocks(skip, limit):
            yield from block

    def _record_batches(self, skip: int) -> Iterator[tuple[str, tuple[pa.RecordBatch, int]]]:
        """(path, (record batch, index of its first row)) from row ``skip`` on."""
        position = 0
        if self.format == "images":
            for start in range(skip, len(self.files), self.batch_size):
                yield self.url, (self._read_images(self.files[start:start + self.batch_size]), start)
            return
        for path in self.files:
            url = self._url_of(path)
            try:
                with self.fs.open(path, "rb") as handle:
                    if self.format == "parquet":
                        file = pq.ParquetFile(handle)
                        rows = file.metadata.num_rows
                        if position + rows <= skip:  # all before the checkpoint: not even read
                            position += rows
                            continue
                        batches: Iterator[pa.RecordBatch] = file.iter_batches(
                            batch_size=max(self.batch_size, BLOCK_ROWS), columns=self._wanted_columns())
                    else:
                        batches = _csv_batches(handle, max(self.batch_size, BLOCK_ROWS))
                    for batch in batches:
                        end = position + batch.num_rows
                        if end > skip:
                            cut = max(0, skip - position)
                            yield url, (batch.slice(cut), position + cut)
                        position = end
            except DatasetError:
                raise
            except (pa.ArrowInvalid, OSError, ValueError) as exc:
                raise DatasetError(describe_error(url, exc)) from None

    def _wanted_columns(self) -> list[str]:
        columns = list(dict.fromkeys(self.mapping.values()))
        if self.key_column is not None and self.key_column not in columns:
            columns.append(self.key_column)
        return columns

    def _read_images(self, paths: list[str]) -> pa.RecordBatch:
        keys, blobs = [], []
        for path in paths:
            keys.append(posixpath.relpath(path, self.path))
            try:
                with self.fs.open(path, "rb") as handle:
                    blobs.append(handle.read())
            except OSError:
                blobs.append(None)  # that row fails when decoded
        return pa.RecordBatch.from_arrays([pa.array(keys, pa.string()), pa.array(blobs, pa.binary())],
                                          names=[IMAGE_KEY_COLUMN, IMAGE_COLUMN])

    def _chunk(self, first: int, batch: pa.RecordBatch, path: str) -> Chunk:
        n = batch.num_rows
        errors: list[str | None] = [None] * n
        columns: dict[str, list[np.ndarray | None] | np.ndarray] = {}
        for tensor in self.tensors:
            column = batch.column(self.mapping[tensor.name])
            columns[tensor.name] = _to_tensors(column, tensor, errors)
        good = np.array([e is None for e in errors], dtype=bool)
        inputs: dict[str, np.ndarray] = {}
        for tensor in self.tensors:
            values = columns[tensor.name]
            if isinstance(values, np.ndarray):
                inputs[tensor.name] = values if good.all() else values[good]
            else:
                rows = [v for v, ok in zip(values, good, strict=True) if ok and v is not None]
                inputs[tensor.name] = np.stack(rows) if rows else np.empty((0, *_fixed(tensor.shape)),
                                                                            _dtype(tensor))
        if self.key_column is not None:
            keys = batch.column(self.key_column)
        elif self.format == "images":
            keys = batch.column(IMAGE_KEY_COLUMN)
        else:
            keys = pa.array(np.arange(first, first + n, dtype=np.int64))
        return Chunk(first, keys, inputs, good, errors)


def _cut(whole: Chunk, size: int) -> list[Chunk]:
    """``whole`` as chunks of ``size`` rows: views of its arrays, no copy."""
    if whole.rows <= size:
        return [whole]
    # Where each chunk's good rows start among ``whole.inputs`` (which hold the good rows only).
    good_before = np.concatenate([[0], np.cumsum(whole.good)])
    out = []
    for start in range(0, whole.rows, size):
        end = min(start + size, whole.rows)
        first, last = int(good_before[start]), int(good_before[end])
        out.append(Chunk(whole.first + start, whole.keys.slice(start, end - start),
                         {name: value[first:last] for name, value in whole.inputs.items()},
                         whole.good[start:end], whole.errors[start:end]))
    return out


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _csv_batches(handle: Any, rows: int) -> Iterator[pa.RecordBatch]:
    # arrow infers each column's type (numbers, or text such as a JSON list, parsed per row); the first block fixes it.
    reader = pacsv.open_csv(handle, read_options=pacsv.ReadOptions(block_size=1 << 20),
                            convert_options=pacsv.ConvertOptions(auto_dict_encode=False))
    for batch in reader:
        for offset in range(0, batch.num_rows, rows):
            yield batch.slice(offset, rows)


def _dtype(tensor: TensorSpec) -> np.dtype[Any]:
    if tensor.datatype == "BYTES":
        return np.dtype(object)
    return DTYPES[DATATYPE_TO_DTYPE[tensor.datatype]]


def _fixed(shape: list[int]) -> list[int]:
    return [0 if d == -1 else d for d in shape]


def _to_tensors(column: pa.Array, tensor: TensorSpec, errors: list[str | None]) -> np.ndarray | list[Any]:
    """The column's rows as ``tensor``'s rows: one array [n, *shape] when the whole column converts at once (the
    common case), else a list of per-row arrays (None where that row failed, with its reason in ``errors``)."""
    dtype = _dtype(tensor)
    kind = column.type
    if column.null_count == 0 and tensor.datatype != "BYTES":
        fast = _whole_column(column, tensor, dtype)
        if fast is not None:
            return fast
    rows: list[Any] = []
    for index in range(len(column)):
        if errors[index] is not None:
            rows.append(None)
            continue
        try:
            rows.append(_one_row(column[index].as_py(), kind, tensor, dtype))
        except Exception as exc:  # Pillow, numpy and json raise many kinds: each is this row's failure
            errors[index] = f"input {tensor.name!r}: {_short(exc)}"
            rows.append(None)
    return rows


def _whole_column(column: pa.Array, tensor: TensorSpec, dtype: np.dtype[Any]) -> np.ndarray | None:
    n = len(column)
    kind = column.type
    shape = tensor.shape
    if not shape and (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=dtype)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        if -1 in shape:
            return None
        size = int(np.prod(shape)) if shape else 1
        flat = column.flatten()
        if len(flat) != n * size or flat.null_count:
            return None  # some row has the wrong length: row by row, to fail just those
        if not pa.types.is_list(kind) and not pa.types.is_large_list(kind) and not pa.types.is_fixed_size_list(kind):
            return None
        offsets = None if pa.types.is_fixed_size_list(kind) else np.asarray(column.offsets)
        if offsets is not None and not np.all(np.diff(offsets) == size):
            return None
        values = flat.to_numpy(zero_copy_only=False)
        if values.dtype == object:
            return None  # nested lists: row by row
        return np.asarray(values, dtype=dtype).reshape((n, *shape))
    return None


def _one_row(value: Any, kind: pa.DataType, tensor: TensorSpec, dtype: np.dtype[Any]) -> np.ndarray:
    if value is None:
        raise ValueError("empty (null)")
    if tensor.datatype == "BYTES":
        array = np.empty(1, dtype=object)
        array[0] = value if isinstance(value, bytes) else str(value).encode()
        return array.reshape(()) if not tensor.shape else array.reshape((1,) * len(tensor.shape))
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return _decode_image(value, tensor, dtype)
    if isinstance(value, str):  # CSV: a number or a JSON list
        value = json.loads(value)
    array = np.asarray(value, dtype=dtype)
    return _reshape(array, tensor.shape)


def _reshape(array: np.ndarray, shape: list[int]) -> np.ndarray:
    if -1 not in shape:
        if array.size != int(np.prod(shape)) if shape else array.size != 1:
            raise ValueError(f"{array.size} values where the model takes shape {shape}")
        return array.reshape(shape)
    if array.ndim != len(shape) or any(d not in (-1, s) for d, s in zip(shape, array.shape, strict=True)):
        raise ValueError(f"shape {list(array.shape)} where the model takes {shape}")
    return array


def _decode_image(data: bytes, tensor: TensorSpec, dtype: np.dtype[Any]) -> np.ndarray:
    """Pillow decodes the bytes into the declared shape: HxWxC (C 1, 3 or 4), HxW, or a flat vector of the image's
    pixels (grey). Images of another size are resized to HxW; a flat vector must match the pixel count."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    shape = tensor.shape
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        channels = shape[2] if len(shape) == 3 else 1
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
        if mode is None:
            raise ValueError(f"an image cannot fill shape {shape} (channels 1, 3 or 4)")
        converted = image.convert(mode)
        if len(shape) in (2, 3) and -1 not in shape[:2] and converted.size != (shape[1], shape[0]):
            converted = converted.resize((shape[1], shape[0]))
        pixels = np.asarray(converted)
    if len(shape) == 3 and pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return _reshape(pixels.astype(dtype), shape)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
