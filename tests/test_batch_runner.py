"""The batch runner and dataset reading with an in-process predictor: formats, failed rows, retries, cancel and
resume, output layout (the proxy end to end is tests/test_batch_cli.py)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from inferoxy.client import InferenceError
from jobs import runner
from jobs.options import BatchOptions
from jobs.predictor import ModelInfo
from jobs.runner import JobError, Progress, run_batch
from model_manager.spec import TensorSpec


class SumModel:
    """``total`` = the sum of each row of ``x`` (FP32 [4]); a row with a negative value spoils its whole request."""

    def __init__(self, shape: list[int] | None = None, datatype: str = "FP32") -> None:
        self.info = ModelInfo("sum", "1", [TensorSpec(name="x", datatype=datatype, shape=shape or [4])],
                              [TensorSpec(name="total", datatype="FP64", shape=[]),
                               TensorSpec(name="twice", datatype="FP32", shape=[2])])
        self.requests: list[int] = []
        self.refuse: list[str] = []  # error codes to answer with, first come first served
        self.gate: asyncio.Event | None = None

    async def metadata(self, model: str, version: str | None) -> ModelInfo:
        if model != "sum":
            raise InferenceError("unknown_model", f"no model {model!r}")
        return self.info

    async def infer(self, model: str, version: str | None, inputs: dict[str, np.ndarray],
                    request_id: str | None = None) -> dict[str, np.ndarray]:
        if self.gate is not None:
            await self.gate.wait()
        x = inputs["x"]
        self.requests.append(len(x))
        if self.refuse:
            raise InferenceError(self.refuse.pop(0), "refused by the test")
        if (x < 0).any():
            raise InferenceError("model_error", "negative input")
        flat = x.reshape(len(x), -1).astype(np.float64)
        return {"total": flat.sum(axis=1), "twice": np.repeat(flat[:, :1] * 2, 2, axis=1).astype(np.float32)}

    async def aclose(self) -> None:
        pass


def rows_parquet(path: Path, n: int, bad: dict[int, list[float]] | None = None) -> None:
    values = [[float(i)] * 4 for i in range(n)]
    for index, row in (bad or {}).items():
        values[index] = row
    pq.write_table(pa.table({"x": values, "name": [f"r{i}" for i in range(n)]}), path)


def run(options: BatchOptions, model: SumModel, **kwargs: object) -> runner.JobSummary:
    return asyncio.run(run_batch(options, model, **kwargs))  # type: ignore[arg-type]


def test_a_failed_request_is_retried_row_by_row_so_only_bad_rows_fail(tmp_path: Path) -> None:
    rows_parquet(tmp_path / "in.parquet", 100, bad={5: [1.0, -1.0, 0.0, 0.0], 6: [1.0, 2.0]})
    model = SumModel()
    progress: list[Progress] = []
    summary = run(BatchOptions(model="sum", input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"),
                               batch_size=10, part_rows=30, key_column="name"), model, on_progress=progress.append)
    table = pq.read_table(tmp_path / "out")
    assert table.column("name").to_pylist() == [f"r{i}" for i in range(100)]
    errors = table.column("error").to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [5, 6]
    assert errors[5] == "model_error: negative input" and "2 values" in errors[6]
    totals = table.column("total").to_pylist()
    assert totals[5] is None and totals[7] == 28.0 and totals[99] == 396.0
    assert table.column("twice").to_pylist()[3] == [6.0, 6.0]
    # Row 6 never reached the model; the request holding row 5 (9 rows) failed, then went again row by row.
    assert model.requests.count(9) == 1 and model.requests.count(1) == 9
    assert (summary.rows_ok, summary.rows_failed, summary.parts) == (98, 2, 4)
    assert progress[-1] == Progress(100, 2, 100)
    meta = json.loads((tmp_path / "out.metadata.json").read_text())
    assert meta == summary.to_json() and meta["rows"] == 100


def test_transient_refusals_are_retried_and_a_fatal_one_stops_the_job(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "FIRST_BACKOFF_S", 0.001)
    rows_parquet(tmp_path / "in.parquet", 20)
    model = SumModel()
    model.refuse = ["overloaded", "not_ready"]
    summary = run(BatchOptions(model="sum", input=str(tmp_path / "in.parquet"), output=str(tmp_path / "a")), model)
    assert (summary.rows_ok, summary.rows_failed) == (20, 0)

    model.refuse = ["forbidden"]
    with pytest.raises(JobError, match="forbidden"):
        run(BatchOptions(model="sum", input=str(tmp_path / "in.parquet"), output=str(tmp_path / "b")), model)
    with pytest.raises(JobError, match="unknown_model"):
        run(BatchOptions(model="other", input=str(tmp_path / "in.parquet"), output=str(tmp_path / "c")), model)


def test_cancel_commits_what_is_done_and_resume_finishes_without_duplicates(tmp_path: Path) -> None:
    rows_parquet(tmp_path / "in.parquet", 200)
    model = SumModel()
    options = BatchOptions(model="sum", input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"),
                           batch_size=10, concurrency=2, part_rows=20)

    async def cancelled_half_way() -> runner.JobSummary:
        cancel = asyncio.Event()

        def report(progress: Progress) -> None:
            if progress.rows_done >= 50:
                cancel.set()

        return await run_batch(options, model, on_progress=report, cancel=cancel)

    first = asyncio.run(cancelled_half_way())
    assert first.cancelled and 50 <= first.rows < 200
    assert not (tmp_path / "out.metadata.json").exists()
    checkpoint = json.loads((tmp_path / "out" / "_checkpoint.json").read_text())
    assert checkpoint["rows"] == first.rows
    # A part written after the checkpoint by a killed run: resume replaces it.
    pq.write_table(pa.table({"row": [999]}), tmp_path / "out" / f"part-{checkpoint['parts']:05d}.parquet")

    with pytest.raises(JobError, match="not empty"):
        run(options, model)
    with pytest.raises(JobError, match="another job"):
        run(options.model_copy(update={"resume": True, "key_column": "name"}), model)
    second = run(options.model_copy(update={"resume": True}), model)
    assert second.resumed and not second.cancelled
    table = pq.read_table(tmp_path / "out")
    assert table.column("row").to_pylist() == list(range(200))
    assert (second.rows_ok, second.rows_failed) == (200, 0)


def test_csv_with_list_and_number_columns(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text('id,x\na,"[1, 2, 3, 4]"\nb,"[1, 2]"\nc,"[0, 0, 0, 5]"\n')
    summary = run(BatchOptions(model="sum", input=str(tmp_path / "in.csv"), output=str(tmp_path / "out"),
                               key_column="id"), SumModel())
    table = pq.read_table(tmp_path / "out")
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    assert table.column("total").to_pylist() == [10.0, None, 5.0]
    assert summary.rows_failed == 1


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_a_folder_of_images_is_decoded_into_the_declared_uint8_shape(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(png(np.full((4, 4, 3), 1, np.uint8)))
    (folder / "sub" / "b.png").write_bytes(png(np.full((8, 8, 3), 2, np.uint8)))  # resized to 4x4
    (folder / "c.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("not an image: skipped")
    model = SumModel(shape=[4, 4, 3], datatype="UINT8")
    run(BatchOptions(model="sum", input=str(folder), output=str(tmp_path / "out"), batch_size=2), model)
    table = pq.read_table(tmp_path / "out")
    assert table.column("key").to_pylist() == ["a.png", "c.jpg", "sub/b.png"]
    assert table.column("total").to_pylist() == [48.0, None, 96.0]
    assert "input 'x'" in table.column("error").to_pylist()[1]


def test_img2dataset_shards_with_a_jpg_column_and_max_samples(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        blobs = [png(np.full((5, 5), shard * 10 + i, np.uint8)) for i in range(3)]
        pq.write_table(pa.table({"key": [f"{shard}{i}" for i in range(3)], "jpg": blobs}),
                       shards / f"{shard:05d}.parquet")
    model = SumModel(shape=[5, 5], datatype="UINT8")
    summary = run(BatchOptions(model="sum", input=str(shards), output=str(tmp_path / "out"), inputs={"x": "jpg"},
                               key_column="key", max_samples=5), model)
    table = pq.read_table(tmp_path / "out")
    assert table.column("key").to_pylist() == ["00", "01", "02", "10", "11"]
    assert table.column("total").to_pylist() == [0.0, 25.0, 50.0, 250.0, 275.0]
    assert summary.rows == 5


@pytest.mark.parametrize(("options", "words"), [
    ({"inputs": {"y": "x"}}, "no input 'y'"),
    ({"inputs": {"x": "nope"}}, "no column 'nope'"),
    ({"key_column": "nope"}, "no column 'nope' for the key"),
    ({"input": "/nonexistent/in.parquet"}, "/nonexistent/in.parquet: not found"),
])
def test_job_errors_name_what_is_wrong(tmp_path: Path, options: dict[str, object], words: str) -> None:
    rows_parquet(tmp_path / "in.parquet", 3)
    base = {"model": "sum", "input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out")}
    with pytest.raises(JobError, match=words):
        run(BatchOptions(**{**base, **options}), SumModel())  # type: ignore[arg-type]


def test_a_corrupt_parquet_file_is_a_job_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "in.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(JobError, match="in.parquet"):
        run(BatchOptions(model="sum", input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out")), SumModel())
