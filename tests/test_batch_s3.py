"""``inferoxy batch`` from and to ``s3://`` on moto's S3 server (started here, on 127.0.0.1): the digits job end to
end, wrong credentials, a missing bucket.

moto's server checks credentials only with its IAM simulation on, and then (moto 5.x) it also refuses, as a bad
signature, every *correctly* signed listing whose query holds a "/" (``prefix=in/``), which any folder listing
does. So IAM checks are on only for the wrong-credentials test, which also shows that the right key is accepted
for the same object; the other tests run with moto's default (any key accepted).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from moto.core import authorization
from moto.server import ThreadedMotoServer

from jobs.options import BatchOptions
from jobs.runner import Progress, run_batch
from tests.support import REPO, ProxyProcess, free_port
from tests.test_batch_cli import digits_table
from tests.test_batch_runner import SumModel

BUCKET = "inferoxy-batch-test"
ALLOW_S3 = json.dumps({"Version": "2012-10-17",
                       "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})


@dataclass
class S3:
    endpoint: str
    key: str
    secret: str

    def options(self, key: str | None = None, secret: str | None = None) -> list[str]:
        return ["--storage-option", f"endpoint_url={self.endpoint}", "--storage-option", f"key={key or self.key}",
                "--storage-option", f"secret={secret or self.secret}"]

    def fs(self) -> s3fs.S3FileSystem:
        return s3fs.S3FileSystem(key=self.key, secret=self.secret, client_kwargs={"endpoint_url": self.endpoint},
                                 skip_instance_cache=True)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        # moto keeps its accounts in the process, not the server: another module's server (tests/test_jobs_api.py
        # uses this fixture too) left its user and bucket behind.
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
        # The user and bucket are made before IAM checks start; every request after is signed and checked.
        plain = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **plain)
        iam.create_user(UserName="batch")
        iam.put_user_policy(UserName="batch", PolicyName="s3", PolicyDocument=ALLOW_S3)
        access = iam.create_access_key(UserName="batch")["AccessKey"]
        boto3.client("s3", **plain).create_bucket(Bucket=BUCKET)
        found = S3(endpoint, access["AccessKeyId"], access["SecretAccessKey"])
        with found.fs().open(f"{BUCKET}/in/digits.parquet", "wb") as handle:
            pq.write_table(digits_table()[0], handle)
        yield found
    finally:
        server.stop()


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    with ProxyProcess() as running:
        yield running


def batch(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inferoxy", "batch", "--url", proxy.zmq_url, *args],
                          capture_output=True, text=True, timeout=180, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_digits_from_and_to_s3(s3: S3, proxy: ProxyProcess) -> None:
    table, labels = digits_table()
    fs = s3.fs()

    done = batch(proxy, "digits", f"s3://{BUCKET}/in/digits.parquet", f"s3://{BUCKET}/out/digits",
                 "--input", "image=pixels", "--key", "id", *s3.options())
    assert done.returncode == 0, done.stderr

    result = pq.read_table(f"{BUCKET}/out/digits", filesystem=fs)
    assert result.column("id").to_pylist() == table.column("id").to_pylist()
    assert float(np.mean(np.array(result.column("label").to_pylist()) == labels)) >= 0.95
    meta = json.loads(fs.cat_file(f"{BUCKET}/out/digits.metadata.json"))
    assert (meta["model"], meta["rows_ok"], meta["rows_failed"]) == ("digits", len(labels), 0)
    assert meta["output"] == f"s3://{BUCKET}/out/digits"


def test_wrong_credentials_are_one_clear_line(s3: S3, proxy: ProxyProcess) -> None:
    with authorization.enable_iam_authentication():
        assert s3.fs().info(f"{BUCKET}/in/digits.parquet")["size"] > 0  # the right key passes the checks
        done = batch(proxy, "digits", f"s3://{BUCKET}/in/digits.parquet", f"s3://{BUCKET}/out/refused",
                     "--input", "image=pixels", *s3.options(secret="not-the-secret"))
    assert done.returncode == 1, done
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert f"s3://{BUCKET}/in/digits.parquet" in line and "access denied" in line, line


def test_a_missing_bucket_is_one_clear_line(s3: S3, proxy: ProxyProcess) -> None:
    for args, words in (
        (["s3://no-such-bucket/in.parquet", f"s3://{BUCKET}/out/x"], "s3://no-such-bucket/in.parquet"),
        ([f"s3://{BUCKET}/in/digits.parquet", "s3://no-such-bucket/out"], "bucket 'no-such-bucket' does not exist"),
    ):
        done = batch(proxy, "digits", *args, "--input", "image=pixels", *s3.options())
        assert done.returncode == 1, done
        line = done.stderr.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in line, line
        assert words in line, line


def test_a_job_on_s3_stops_and_resumes_without_duplicates(s3: S3) -> None:
    fs = s3.fs()
    with fs.open(f"{BUCKET}/in/rows.parquet", "wb") as handle:
        pq.write_table(pa.table({"x": [[float(i)] * 4 for i in range(300)]}), handle)
    storage = {"endpoint_url": s3.endpoint, "key": s3.key, "secret": s3.secret}
    options = BatchOptions(model="sum", input=f"s3://{BUCKET}/in/rows.parquet", output=f"s3://{BUCKET}/out/rows",
                           batch_size=10, concurrency=2, part_rows=50, storage_options=storage)
    model = SumModel()

    async def stopped_half_way() -> int:
        cancel = asyncio.Event()

        def report(progress: Progress) -> None:
            if progress.rows_done >= 120:
                cancel.set()

        return (await run_batch(options, model, on_progress=report, cancel=cancel)).rows

    first = asyncio.run(stopped_half_way())
    assert 120 <= first < 300
    # What a killed run leaves after its last checkpoint: a part the checkpoint does not name.
    parts = json.loads(fs.cat_file(f"{BUCKET}/out/rows/_checkpoint.json"))["parts"]
    with fs.open(f"{BUCKET}/out/rows/part-{parts:05d}.parquet", "wb") as handle:
        pq.write_table(pa.table({"row": [7]}), handle)

    summary = asyncio.run(run_batch(options.model_copy(update={"resume": True}), model))
    assert (summary.resumed, summary.rows_ok) == (True, 300)
    table = pq.read_table(f"{BUCKET}/out/rows", filesystem=s3.fs())
    assert table.column("row").to_pylist() == list(range(300))
    assert table.column("total").to_pylist()[299] == 4 * 299.0


def test_from_s3_to_a_local_folder(s3: S3, proxy: ProxyProcess, tmp_path: Path) -> None:
    # The storage options are for the s3:// side; the local side takes none and must not refuse them.
    done = batch(proxy, "digits", f"s3://{BUCKET}/in/digits.parquet", str(tmp_path / "out"),
                 "--input", "image=pixels", *s3.options())
    assert done.returncode == 0, done.stderr
    assert pq.read_table(tmp_path / "out").num_rows == len(digits_table()[1])
