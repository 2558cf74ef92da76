"""The jobs API end to end: ``inferoxy serve`` as a subprocess on a real Redis, the digits model as a process
replica, jobs over local parquet under INFEROXY_JOBS_LOCAL_ROOT (docs/JOBS.md)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis.asyncio as aioredis
from sklearn.datasets import load_digits

from model_manager.keys import KeyStore
from tests.support import ProxyProcess, delete_redis_prefix, wait_for
from tests.test_batch_cli import digits_table
from tests.test_batch_s3 import BUCKET, S3
from tests.test_batch_s3 import s3 as moto_s3  # noqa: F401 (a fixture: moto's S3 server on 127.0.0.1)

ADMIN_KEY = "jobs-test-admin-key"


def proxy_env(redis_url: str, prefix: str, root: Path) -> dict[str, str]:
    return {"INFEROXY_REDIS_URL": redis_url, "INFEROXY_REDIS_PREFIX": prefix, "INFEROXY_BRIDGES": "rest",
            "INFEROXY_JOBS_LOCAL_ROOT": str(root), "INFEROXY_JOBS_LEASE_S": "2",
            "INFEROXY_JOBS_RETRY_BACKOFF_S": "0.5", "INFEROXY_JOBS_MAX_ATTEMPTS": "5",
            "INFEROXY_ADMIN_KEY": ADMIN_KEY}


def write_digits(path: Path, copies: int = 1) -> np.ndarray:
    """The digits as a parquet file with an ``image`` column of 64 floats; their labels returned."""
    digits = load_digits()
    images = np.tile(digits.data.astype(np.float32), (copies, 1))
    labels = np.tile(digits.target, copies)
    column = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 64)
    pq.write_table(pa.table({"image": column}), path)
    return labels


def create_keys(redis_url: str, prefix: str) -> dict[str, str]:
    async def go() -> dict[str, str]:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            store = KeyStore(client, prefix)
            return {name: (await store.create(name, scopes))[1]
                    for name, scopes in (("alice", ["infer"]), ("bob", ["infer"]), ("ops", ["admin"]))}
        finally:
            await client.aclose()

    return asyncio.run(go())


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def job(proxy: ProxyProcess, job_id: str, secret: str) -> dict[str, Any]:
    answer = httpx.get(f"{proxy.rest_url}/v2/jobs/{job_id}", headers=bearer(secret), timeout=10)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def wait_state(proxy: ProxyProcess, job_id: str, secret: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
    return wait_for(lambda: (found := job(proxy, job_id, secret))["state"] in states and found, timeout=timeout,
                    interval=0.2, what=f"job {job_id} to reach {states}")


def read_output(folder: Path) -> pa.Table:
    parts = sorted(folder.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(part) for part in parts])


@pytest.fixture(scope="module")
def served(real_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, Path,
                                                                                           dict[str, str]]]:
    prefix = f"inferoxy-test-{os.getpid()}-jobs-api"
    root = tmp_path_factory.mktemp("jobs")
    keys = create_keys(real_redis_url, prefix)
    proxy = ProxyProcess(env=proxy_env(real_redis_url, prefix, root)).start(timeout=120)
    try:
        yield proxy, root, keys
    finally:
        proxy.stop()
        delete_redis_prefix(real_redis_url, prefix)


def test_a_job_runs_to_success_with_one_correct_row_per_input(served: tuple[ProxyProcess, Path, dict[str, str]]) \
        -> None:
    proxy, root, keys = served
    labels = write_digits(root / "digits.parquet")
    body = {"model": "digits", "input": "digits.parquet", "output": "out-ok", "batch_size": 16}
    headers = {**bearer(keys["alice"]), "Idempotency-Key": "first-try"}
    answer = httpx.post(f"{proxy.rest_url}/v2/jobs", json=body, headers=headers, timeout=10)
    assert answer.status_code == 202, answer.text
    submitted = answer.json()
    assert submitted["state"] == "queued" and answer.headers["location"] == f"/v2/jobs/{submitted['id']}"

    # A retried submission (the client never saw the 202) is the same job, not a second one.
    again = httpx.post(f"{proxy.rest_url}/v2/jobs", json=body, headers=headers, timeout=10)
    assert again.status_code == 202 and again.json()["id"] == submitted["id"]
    assert again.headers["idempotent-replayed"] == "true"
    clash = httpx.post(f"{proxy.rest_url}/v2/jobs", json={**body, "batch_size": 8}, headers=headers, timeout=10)
    assert clash.status_code == 409 and "error" in clash.json()

    done = wait_state(proxy, submitted["id"], keys["alice"], {"succeeded", "failed", "cancelled"})
    assert done["state"] == "succeeded", done
    assert done["progress"]["done"] == len(labels) and done["progress"]["failed"] == 0
    assert done["summary"]["rows_ok"] == len(labels) and done["attempts"] == 1

    table = read_output(root / "out-ok")
    assert table.num_rows == len(labels)
    assert sorted(table.column("row").to_pylist()) == list(range(len(labels)))
    predicted = np.array(table.column("label").to_pylist())[np.argsort(table.column("row").to_numpy())]
    assert (predicted == labels).mean() >= 0.95

    # Alice lists her job; Bob neither sees nor cancels it; the admin key sees it.
    listed = httpx.get(f"{proxy.rest_url}/v2/jobs", headers=bearer(keys["alice"]), timeout=10).json()["jobs"]
    assert submitted["id"] in [item["id"] for item in listed]
    assert httpx.get(f"{proxy.rest_url}/v2/jobs/{submitted['id']}", headers=bearer(keys["bob"])).status_code == 404
    assert httpx.delete(f"{proxy.rest_url}/v2/jobs/{submitted['id']}", headers=bearer(keys["bob"])).status_code == 404
    bobs = httpx.get(f"{proxy.rest_url}/v2/jobs", headers=bearer(keys["bob"]), timeout=10).json()["jobs"]
    assert submitted["id"] not in [item["id"] for item in bobs]
    assert httpx.get(f"{proxy.rest_url}/v2/jobs/{submitted['id']}", headers=bearer(ADMIN_KEY)).status_code == 200


def test_refusals(served: tuple[ProxyProcess, Path, dict[str, str]]) -> None:
    proxy, root, keys = served
    url = f"{proxy.rest_url}/v2/jobs"
    alice = bearer(keys["alice"])
    good = {"model": "digits", "input": "digits.parquet", "output": "out-refused"}

    def post(body: dict[str, Any], headers: dict[str, str] | None = alice) -> httpx.Response:
        return httpx.post(url, json=body, headers=headers, timeout=10)

    cases = [
        (post(good, None), 401),  # no key
        (post(good, bearer(keys["ops"])), 403),  # an admin-only key may not infer
        (post({**good, "input": "../outside.parquet"}), 400),  # leaves the local root
        (post({**good, "output": str(root.parent / "elsewhere")}), 400),
        (post({**good, "input": "http://example.invalid/x.parquet"}), 400),  # only s3:// or local
        (post({**good, "batch_size": 0}), 400),  # bad options
        (post({**good, "surprise": 1}), 400),
        (post({**good, "storage_options": {"key": "k"}}), 400),  # they are for s3:// only
        (post({**good, "model": "no-such-model"}), 404),
        (httpx.post(url, content=b"{}", headers={**alice, "Content-Type": "text/plain"}), 415),
        (httpx.post(url, json=good, headers={**alice, "Origin": "http://evil.invalid"}), 403),
        (httpx.get(f"{url}/job_nope", headers=alice), 404),
    ]
    for answer, status in cases:
        assert answer.status_code == status, (status, answer.text)
        assert isinstance(answer.json()["error"], str)


def test_storage_options_are_never_shown_back(served: tuple[ProxyProcess, Path, dict[str, str]]) -> None:
    proxy, _, keys = served
    body = {"model": "digits", "input": "s3://nowhere/in.parquet", "output": "s3://nowhere/out",
            "storage_options": {"key": "AKIA-do-not-show", "secret": "do-not-show", "endpoint_url": "http://127.0.0.1:9"}}
    answer = httpx.post(f"{proxy.rest_url}/v2/jobs", json=body, headers=bearer(keys["alice"]), timeout=10)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    shown = [answer.text, httpx.get(f"{proxy.rest_url}/v2/jobs/{job_id}", headers=bearer(keys["alice"])).text,
             httpx.get(f"{proxy.rest_url}/v2/jobs", headers=bearer(ADMIN_KEY)).text]
    assert all("do-not-show" not in text for text in shown)
    assert answer.json()["options"]["storage_options"] == {"key": "***", "secret": "***", "endpoint_url": "***"}
    httpx.delete(f"{proxy.rest_url}/v2/jobs/{job_id}", headers=bearer(keys["alice"]))
    assert wait_state(proxy, job_id, keys["alice"], {"cancelled", "failed"}, timeout=60)["state"] == "cancelled"


def test_local_paths_are_refused_without_a_root(real_redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    env = {**proxy_env(real_redis_url, redis_prefix, tmp_path), "INFEROXY_JOBS_LOCAL_ROOT": "", "INFEROXY_AUTH": "off"}
    with ProxyProcess(env=env) as proxy:
        answer = httpx.post(f"{proxy.rest_url}/v2/jobs", json={"model": "digits", "input": "/tmp/x.parquet",
                                                               "output": "s3://bucket/out"}, timeout=10)
        assert answer.status_code == 400 and "INFEROXY_JOBS_LOCAL_ROOT" in answer.json()["error"]


def test_cancelling_a_running_job(served: tuple[ProxyProcess, Path, dict[str, str]]) -> None:
    proxy, root, keys = served
    write_digits(root / "many.parquet", copies=20)
    body = {"model": "digits", "input": "many.parquet", "output": "out-cancel", "batch_size": 1, "concurrency": 1,
            "part_rows": 50}
    submitted = httpx.post(f"{proxy.rest_url}/v2/jobs", json=body, headers=bearer(keys["alice"]), timeout=10).json()
    wait_for(lambda: job(proxy, submitted["id"], keys["alice"])["progress"]["done"] > 0, timeout=120, interval=0.2,
             what="the job to make progress")
    answer = httpx.delete(f"{proxy.rest_url}/v2/jobs/{submitted['id']}", headers=bearer(keys["alice"]), timeout=10)
    assert answer.status_code == 202 and answer.json()["cancel_requested"] is True
    done = wait_state(proxy, submitted["id"], keys["alice"], {"succeeded", "failed", "cancelled"}, timeout=30)
    assert done["state"] == "cancelled", done
    assert done["progress"]["done"] < 20 * 1797


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_job_survives_a_restart_of_the_proxy_with_no_duplicate_row(real_redis_url: str, redis_prefix: str,
                                                                      tmp_path: Path, how: signal.Signals) -> None:
    labels = write_digits(tmp_path / "digits.parquet", copies=2)
    env = proxy_env(real_redis_url, redis_prefix, tmp_path)
    keys = create_keys(real_redis_url, redis_prefix)
    body = {"model": "digits", "input": "digits.parquet", "output": "out", "batch_size": 4, "concurrency": 1,
            "part_rows": 100}
    first = ProxyProcess(env=env).start(timeout=120)
    try:
        submitted = httpx.post(f"{first.rest_url}/v2/jobs", json=body, headers=bearer(keys["alice"]),
                               timeout=10).json()
        # Mid-way: some parts committed, most rows still to go.
        wait_for(lambda: job(first, submitted["id"], keys["alice"])["progress"]["done"] > 300, timeout=120,
                 interval=0.1, what="the job to be mid-way")
        assert first.process is not None
        first.process.send_signal(how)
        first.process.wait(timeout=30)
    finally:
        first.stop()
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) >= 1
    second = ProxyProcess(env=env).start(timeout=120)
    try:
        done = wait_state(second, submitted["id"], keys["alice"], {"succeeded", "failed", "cancelled"}, timeout=180)
    finally:
        second.stop()
    assert done["state"] == "succeeded", done
    assert done["summary"]["resumed"] is True
    table = read_output(tmp_path / "out")
    rows = table.column("row").to_pylist()
    assert len(rows) == len(set(rows)) == len(labels)  # every row once: none lost, none written twice
    predicted = np.array(table.column("label").to_pylist())[np.argsort(table.column("row").to_numpy())]
    assert (predicted == labels).mean() >= 0.95


def test_the_jobs_cli_submits_waits_lists_gets_and_cancels(served: tuple[ProxyProcess, Path, dict[str, str]]) -> None:
    proxy, root, keys = served
    write_digits(root / "cli.parquet")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "inferoxy", "jobs", "--url", proxy.rest_url, "--key", keys["bob"],
                               *args], capture_output=True, text=True, timeout=180, env=proxy.env)

    submitted = cli("submit", "digits", "cli.parquet", "out-cli", "--batch-size", "32", "--wait")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert "succeeded (1797/1797 rows, 0 failed)" in submitted.stdout
    listed = cli("list")
    assert listed.returncode == 0 and job_id in listed.stdout and "alice" not in listed.stdout
    shown = cli("get", job_id)
    assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "succeeded"
    assert cli("cancel", job_id).returncode == 0  # a finished job: nothing to stop, said so
    missing = cli("get", "job_nope")
    assert missing.returncode == 3 and "no job" in missing.stderr  # the models CLI's exit code for 404


def test_a_job_from_and_to_s3(served: tuple[ProxyProcess, Path, dict[str, str]], moto_s3: S3) -> None:  # noqa: F811
    """Through the API on moto's S3 server (tests/test_batch_s3.py starts it on 127.0.0.1); the credentials
    travel to the worker and are never shown back."""
    proxy, _, keys = served
    s3 = moto_s3
    table, labels = digits_table()
    body = {"model": "digits", "input": f"s3://{BUCKET}/in/digits.parquet", "output": f"s3://{BUCKET}/out/api",
            "inputs": {"image": "pixels"}, "key_column": "id",
            "storage_options": {"endpoint_url": s3.endpoint, "key": s3.key, "secret": s3.secret}}
    answer = httpx.post(f"{proxy.rest_url}/v2/jobs", json=body, headers=bearer(keys["alice"]), timeout=10)
    assert answer.status_code == 202, answer.text
    done = wait_state(proxy, answer.json()["id"], keys["alice"], {"succeeded", "failed", "cancelled"})
    assert done["state"] == "succeeded", done
    assert s3.secret not in str(done) and s3.key not in str(done)
    result = pq.read_table(f"{BUCKET}/out/api", filesystem=s3.fs())
    assert result.column("id").to_pylist() == table.column("id").to_pylist()
    assert float(np.mean(np.array(result.column("label").to_pylist()) == labels)) >= 0.95
