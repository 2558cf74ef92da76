"""``inferoxy batch`` against ``inferoxy serve`` (a subprocess, process runtime): the digits model over its held-out
split from parquet, bad rows, the bridge's metadata request, and ``--resume`` after a SIGKILL mid-way."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from examples.train_digits import held_out_split
from inferoxy.client import AsyncClient, InferenceError
from tests.support import REPO, ProxyProcess, wait_for


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    with ProxyProcess() as running:
        yield running


def batch(proxy: ProxyProcess, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inferoxy", "batch", "--url", proxy.zmq_url, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_env())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def digits_table(repeat: int = 1) -> tuple[pa.Table, np.ndarray]:
    images, labels = held_out_split()
    images = np.tile(images.astype(np.float32), (repeat, 1))
    labels = np.tile(labels, repeat)
    ids = [f"d{i}" for i in range(len(labels))]
    column = pa.FixedSizeListArray.from_arrays(pa.array(images.ravel()), 64)
    return pa.table({"id": ids, "pixels": column, "label": labels}), labels


def png(pixels: np.ndarray) -> bytes:
    # Pixel values 0..16 kept as they are in an 8-bit grey image: the model sees the same numbers.
    out = io.BytesIO()
    Image.fromarray(pixels.reshape(8, 8).astype(np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def test_the_bridge_answers_a_metadata_request(proxy: ProxyProcess) -> None:
    async def ask() -> tuple[dict, str]:
        async with AsyncClient(proxy.zmq_url, timeout=30) as client:
            meta = await client.metadata("digits")
            with pytest.raises(InferenceError) as unknown:
                await client.metadata("no-such-model")
            return meta, unknown.value.code

    meta, code = asyncio.run(ask())
    assert meta["name"] == "digits" and meta["version"] == "1"
    assert {i["name"]: i["shape"] for i in meta["inputs"]} == {"image": [-1, 64]}
    assert {o["name"] for o in meta["outputs"]} == {"label", "probabilities"}
    assert code == "unknown_model"


def test_digits_from_parquet_one_row_per_input_and_accurate(proxy: ProxyProcess, tmp_path: Path) -> None:
    table, labels = digits_table()
    pq.write_table(table, tmp_path / "data.parquet")
    out = tmp_path / "out.parquet"
    done = batch(proxy, "digits", str(tmp_path / "data.parquet"), str(out), "--input", "image=pixels", "--key", "id")
    assert done.returncode == 0, done.stderr

    result = pq.read_table(out)
    assert result.num_rows == len(labels)
    assert result.column("id").to_pylist() == table.column("id").to_pylist()  # every row, once, in order
    assert result.column("error").null_count == len(labels)
    accuracy = float(np.mean(np.array(result.column("label").to_pylist()) == labels))
    assert accuracy >= 0.95, accuracy
    probabilities = np.array(result.column("probabilities").to_pylist())
    assert probabilities.shape == (len(labels), 10)

    meta = json.loads((tmp_path / "out.parquet.metadata.json").read_text())
    assert (meta["model"], meta["version"]) == ("digits", "1")
    assert (meta["rows_ok"], meta["rows_failed"], meta["rows"]) == (len(labels), 0, len(labels))
    assert meta["started_at"] < meta["ended_at"] and meta["rows_per_s"] > 0
    assert set(meta["stages"]) == {"read", "infer", "write"} and meta["stages"]["infer"] > 0
    assert json.loads(done.stdout) == meta


def test_bad_rows_fail_alone(proxy: ProxyProcess, tmp_path: Path) -> None:
    images, labels = held_out_split()
    images, labels = images[:40].astype(np.float32), labels[:40]
    rows = [list(map(float, image)) for image in images]
    rows[3] = rows[3][:10]  # a wrong length
    blobs = [png(image) for image in images]
    blobs[7] = b"\x89PNG not an image at all"
    pq.write_table(pa.table({"pixels": rows, "png": blobs}), tmp_path / "mixed.parquet")

    for column, bad in (("pixels", 3), ("png", 7)):
        out = tmp_path / f"out-{column}"
        done = batch(proxy, "digits", str(tmp_path / "mixed.parquet"), str(out), "--input", f"image={column}",
                     "--batch-size", "8")
        assert done.returncode == 0, done.stderr
        result = pq.read_table(out)
        assert result.column("row").to_pylist() == list(range(40))
        errors = result.column("error").to_pylist()
        assert [i for i, e in enumerate(errors) if e is not None] == [bad], errors
        predicted = result.column("label").to_pylist()
        assert predicted[bad] is None
        good = [i for i in range(40) if i != bad]
        assert np.mean(np.array([predicted[i] for i in good]) == labels[good]) >= 0.9
        meta = json.loads((tmp_path / f"out-{column}.metadata.json").read_text())
        assert (meta["rows_ok"], meta["rows_failed"]) == (39, 1)


def test_job_level_errors_exit_non_zero_with_one_line(proxy: ProxyProcess, tmp_path: Path) -> None:
    table, _ = digits_table()
    pq.write_table(table, tmp_path / "data.parquet")
    cases = [
        (["digits", str(tmp_path / "data.parquet"), str(tmp_path / "o1")], "no column 'image'"),
        (["digits", str(tmp_path / "missing.parquet"), str(tmp_path / "o2")], "missing.parquet: not found"),
        (["nope", str(tmp_path / "data.parquet"), str(tmp_path / "o3")], "unknown_model"),
    ]
    for args, words in cases:
        done = batch(proxy, *args)
        assert done.returncode == 1, done
        assert words in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_resume_after_sigkill_has_no_duplicate_and_no_missing_row(proxy: ProxyProcess, tmp_path: Path) -> None:
    table, labels = digits_table(repeat=60)  # 27,000 rows
    pq.write_table(table, tmp_path / "big.parquet")
    out = tmp_path / "out"
    args = ["digits", str(tmp_path / "big.parquet"), str(out), "--input", "image=pixels", "--key", "id",
            "--part-rows", "1000", "--batch-size", "16", "--concurrency", "2"]
    job = subprocess.Popen([sys.executable, "-m", "inferoxy", "batch", "--url", proxy.zmq_url, *args],
                           cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def committed() -> int:
            try:
                return int(json.loads((out / "_checkpoint.json").read_text())["parts"])
            except (OSError, ValueError, KeyError):
                return 0

        wait_for(lambda: committed() >= 2, timeout=120, what="two committed parts")
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    rows_then = json.loads((out / "_checkpoint.json").read_text())["rows"]
    assert 0 < rows_then < len(labels), "the job was not killed mid-way"
    assert not (tmp_path / "out.metadata.json").exists()

    done = batch(proxy, *args, "--resume", timeout=300)
    assert done.returncode == 0, done.stderr
    result = pq.read_table(out)
    assert result.column("id").to_pylist() == table.column("id").to_pylist()
    assert float(np.mean(np.array(result.column("label").to_pylist()) == labels)) >= 0.95
    meta = json.loads((tmp_path / "out.metadata.json").read_text())
    assert meta["resumed"] is True and meta["rows_ok"] == len(labels)
