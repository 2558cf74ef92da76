"""The registry live on a running proxy: direct Redis changes, rolling a changed spec, a Redis restart under load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from tests.support import ProxyProcess, free_port, require_program, wait_for

ECHO = {"name": "echo", "model_class": "examples.models.echo.model:EchoModel", "max_batch_size": 8,
        "max_batch_delay_ms": 0}
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]}


def infer(url: str, model: str = "echo") -> httpx.Response:
    return httpx.post(f"{url}/v2/models/{model}/infer", json=BODY, timeout=30)


def write_spec(client: redis.Redis, prefix: str, spec: dict) -> None:
    """What another proxy instance (or an operator with redis-cli) does: the documented key schema, by hand."""
    key = f"{spec['name']}/{spec.get('version', '1')}"
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(f"{prefix}:models", key, json.dumps(spec))
        pipe.hsetnx(f"{prefix}:defaults", spec["name"], spec.get("version", "1"))
        pipe.incr(f"{prefix}:revision")
        revision = pipe.execute()[-1]
    client.publish(f"{prefix}:events", json.dumps({"revision": revision, "action": "put", "name": spec["name"],
                                                   "version": spec.get("version", "1")}))


class Streamer:
    """Sends requests back to back from a few threads; records every failure."""

    def __init__(self, url: str, model: str = "echo", threads: int = 3) -> None:
        self.url, self.model = url, model
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(f"{self.url}/v2/models/{self.model}/infer", json=BODY)
                    failure = None if response.status_code == 200 else f"{response.status_code} {response.text}"
                except httpx.HTTPError as exc:
                    failure = repr(exc)
                with self._lock:
                    if failure is None:
                        self.ok += 1
                    else:
                        self.failures.append(failure)

    def __enter__(self) -> Streamer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=40)


@pytest.fixture
def proxy(real_redis_url: str, redis_prefix: str) -> Iterator[ProxyProcess]:
    client = redis.Redis.from_url(real_redis_url)
    write_spec(client, redis_prefix, {**ECHO, "min_replicas": 2, "max_replicas": 2})
    env = {"INFEROXY_REDIS_URL": real_redis_url, "INFEROXY_REDIS_PREFIX": redis_prefix, "INFEROXY_MODELS_FILE": "",
           "INFEROXY_BRIDGES": "rest"}
    with ProxyProcess(env=env) as running:
        wait_for(lambda: infer(running.rest_url).status_code == 200, timeout=30, interval=0.2, what="echo")
        yield running


def test_a_change_written_directly_to_redis_is_picked_up_live(proxy: ProxyProcess, real_redis_url: str,
                                                              redis_prefix: str) -> None:
    client = redis.Redis.from_url(real_redis_url)
    assert infer(proxy.rest_url, "late").status_code == 404
    started = time.monotonic()
    write_spec(client, redis_prefix, {**ECHO, "name": "late"})
    # The bridge learns of it by pub/sub well within a second; the replica then takes its time to start.
    wait_for(lambda: infer(proxy.rest_url, "late").status_code != 404, timeout=1.0, interval=0.05,
             what="the bridge to know the new model")
    wait_for(lambda: infer(proxy.rest_url, "late").status_code == 200, timeout=30, interval=0.2, what="late to serve")
    assert time.monotonic() - started < 30


def test_a_changed_command_env_rolls_replicas_without_failing_requests(proxy: ProxyProcess) -> None:
    old = wait_for(lambda: len(pids := set(proxy.replica_pids())) == 2 and pids, timeout=30, what="two replicas")
    headers = {}
    with Streamer(proxy.rest_url) as streamer:
        wait_for(lambda: streamer.ok > 20, timeout=20, what="requests flowing")
        response = httpx.patch(f"{proxy.rest_url}/v2/admin/models/echo", json={"env": {"ROLLED": "1"}},
                               headers=headers, timeout=10)
        assert response.status_code == 200, response.text
        wait_for(lambda: (pids := set(proxy.replica_pids())) and not (pids & old) and len(pids) == 2, timeout=60,
                 interval=0.1, what="every replica replaced")
        served_before = streamer.ok
        wait_for(lambda: streamer.ok > served_before + 20, timeout=20, what="the new replicas to serve")
    assert streamer.failures == [], f"{len(streamer.failures)} failed during the roll: {streamer.failures[:5]}"
    for pid in set(proxy.replica_pids()):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"ROLLED=1" in environ, "the new replicas run the new spec"


def test_a_deleted_model_stops_taking_requests_and_its_replicas_stop(proxy: ProxyProcess) -> None:
    assert wait_for(lambda: set(proxy.replica_pids()), timeout=30, what="replicas")
    assert httpx.delete(f"{proxy.rest_url}/v2/admin/models/echo", timeout=10).status_code == 200
    wait_for(lambda: infer(proxy.rest_url).status_code == 404, timeout=1.0, interval=0.05, what="echo refused")
    wait_for(lambda: not set(proxy.replica_pids()), timeout=30, what="echo's replicas to stop")


def test_a_deleted_model_answers_what_it_queued_before_its_replicas_stop(proxy: ProxyProcess) -> None:
    slow = {"name": "slow", "model_class": "tests.models_for_tests:SlowModel", "max_batch_size": 1,
            "max_batch_delay_ms": 0, "env": {"SLOW_MODEL_SECONDS": "0.4"}}
    echo_replicas = wait_for(lambda: len(pids := set(proxy.replica_pids())) == 2 and pids, timeout=30, what="echo")
    assert httpx.post(f"{proxy.rest_url}/v2/admin/models", json=slow, timeout=10).status_code == 201
    wait_for(lambda: infer(proxy.rest_url, "slow").status_code == 200, timeout=30, interval=0.2, what="slow")
    wait_for(lambda: len(pids := set(proxy.replica_pids())) == 3 and pids, timeout=30, what="slow's replica")
    with ThreadPoolExecutor(6) as pool:
        # One at the replica, the rest queued behind it (one row a batch, 0.4 s each) when it is deleted.
        pending = [pool.submit(infer, proxy.rest_url, "slow") for _ in range(6)]
        time.sleep(0.3)
        assert httpx.delete(f"{proxy.rest_url}/v2/admin/models/slow", timeout=10).status_code == 200
        wait_for(lambda: infer(proxy.rest_url, "slow").status_code == 404, timeout=1.0, interval=0.05,
                 what="slow refused")
        answers = [future.result() for future in pending]
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers if a.status_code != 200]
    wait_for(lambda: set(proxy.replica_pids()) == echo_replicas, timeout=30, what="slow's replica to stop")


def test_changed_batching_limits_apply_to_the_next_batch(proxy: ProxyProcess) -> None:
    probe = {"name": "probe", "model_class": "tests.models_for_tests:BatchProbeModel", "max_batch_size": 64,
             "max_batch_delay_ms": 200}
    assert httpx.post(f"{proxy.rest_url}/v2/admin/models", json=probe, timeout=10).status_code == 201
    wait_for(lambda: infer(proxy.rest_url, "probe").status_code == 200, timeout=30, interval=0.2, what="probe")

    def largest_batch() -> int:
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: infer(proxy.rest_url, "probe").json(), range(8)))
        return max(int(o["data"][0]) for r in replies for o in r["outputs"] if o["name"] == "batch_rows")

    assert largest_batch() > 1
    patched = httpx.patch(f"{proxy.rest_url}/v2/admin/models/probe", json={"max_batch_size": 1}, timeout=10)
    assert patched.status_code == 200
    time.sleep(1.0)  # within a second every component has the change
    assert largest_batch() == 1


# -- Redis outages -------------------------------------------------------------------------------------------


@contextmanager
def redis_server(port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server of this test's own, without persistence: a restart loses everything, on purpose."""
    program = require_program("redis-server", "INFEROXY_REQUIRE_REDIS")
    process = subprocess.Popen([program, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _pings(port), timeout=10, what=f"redis-server on {port}")
        yield process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def test_serving_survives_a_redis_restart(tmp_path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    models = tmp_path / "models.yaml"
    models.write_text(json.dumps({"models": [ECHO]}))
    env = {"INFEROXY_REDIS_URL": url, "INFEROXY_MODELS_FILE": str(models), "INFEROXY_BRIDGES": "rest",
           "INFEROXY_REGISTRY_RESYNC_S": "0.5"}
    first = redis_server(port)
    first.__enter__()
    try:
        with ProxyProcess(env=env) as proxy:
            wait_for(lambda: infer(proxy.rest_url).status_code == 200, timeout=30, interval=0.2, what="echo")
            # A model known only through the admin API (not in models.yaml) must survive too.
            extra = {**ECHO, "name": "extra"}
            assert httpx.post(f"{proxy.rest_url}/v2/admin/models", json=extra, timeout=10).status_code == 201
            wait_for(lambda: infer(proxy.rest_url, "extra").status_code == 200, timeout=30, interval=0.2,
                     what="extra")
            with Streamer(proxy.rest_url) as streamer, Streamer(proxy.rest_url, "extra", threads=1) as second:
                wait_for(lambda: streamer.ok > 10, timeout=20, what="requests flowing")
                first.__exit__(None, None, None)  # SIGKILL: Redis is gone, and with it every key
                down_at = streamer.ok
                wait_for(lambda: streamer.ok > down_at + 30, timeout=20, what="serving while Redis is down")

                refused = httpx.post(f"{proxy.rest_url}/v2/admin/models", json={**ECHO, "name": "during"}, timeout=10)
                assert refused.status_code == 503 and "Redis" in refused.json()["error"]
                health = httpx.get(f"{proxy.rest_url}/v2/health/registry", timeout=10).json()
                assert health["status"] == "degraded" and health["serving"] is True
                assert httpx.get(f"{proxy.rest_url}/v2/health/live", timeout=10).status_code == 200
                assert httpx.get(f"{proxy.rest_url}/v2/health/ready", timeout=10).status_code == 200

                with redis_server(port):  # the same port, empty
                    client = redis.Redis(port=port, decode_responses=True)
                    wait_for(lambda: {"echo/1", "extra/1"} <= set(client.hkeys("inferoxy:models")), timeout=20,
                             interval=0.1, what="the model manager to restore the registry")
                    wait_for(lambda: httpx.get(f"{proxy.rest_url}/v2/health/registry", timeout=10).json()["status"]
                             == "ok", timeout=20, what="health to recover")
                    up_at = streamer.ok
                    wait_for(lambda: streamer.ok > up_at + 30, timeout=20, what="serving after the restart")
                    # The components follow the restarted Redis: a new model reaches them live.
                    late = {**ECHO, "name": "late"}
                    assert httpx.post(f"{proxy.rest_url}/v2/admin/models", json=late, timeout=10).status_code == 201
                    wait_for(lambda: infer(proxy.rest_url, "late").status_code == 200, timeout=30, interval=0.2,
                             what="a model added after the restart to serve")
                    streamer_failures = list(streamer.failures)
                    second_failures = list(second.failures)
                    proxy.stop()
            assert streamer_failures == [], streamer_failures[:5]
            assert second_failures == [], second_failures[:5]
    finally:
        first.__exit__(None, None, None)
