"""Replicas as containers on a real Docker engine: the proxy in a subprocess and as an image.

Needs a Docker engine (`.ci/docker.sh`) and the images of `docker/build-images.sh` (built here
once per session when missing). Without an engine these tests skip, or fail where CI or
INFEROXY_REQUIRE_DOCKER is set. Containers use host networking; all traffic is on 127.0.0.1.
Every container a test starts carries its instance label and is removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from examples.train_digits import held_out_split
from inferoxy.client import AsyncClient, Client, InferenceError
from inferoxy.settings import Settings
from model_manager.spec import ModelSpec
from model_manager.store import SpecStore
from task_manager.gpus import GpuAllocator, gpu_inventory
from task_manager.replicas import ModelGroup, Replica
from task_manager.runtimes.docker import LABEL_CLAIM, DockerRuntime
from task_manager.service import TaskManager
from tests.models_for_tests import SLOW_MODEL_SLEEPING
from tests.support import REPO, ProxyProcess, free_port, require_service, wait_for

docker = pytest.importorskip("docker")

IMAGES = ("inferoxy/echo", "inferoxy/digits", "inferoxy/proxy")
# Tagged by content: a test run from another checkout may build its own version under the same name.
SLOW_IMAGE = "inferoxy/test-slow:" + hashlib.sha256((REPO / "tests/models_for_tests.py").read_bytes()).hexdigest()[:12]
MISSING_IMAGE = "inferoxy/no-such-image:never-built"


@pytest.fixture(scope="session")
def images(engine: Any) -> None:
    """The example and proxy images, built from this checkout, plus a test image with a slow model.

    Built every session, not only when missing: an image left by an older checkout carries an older runtime
    and proxy, and testing against it tests the wrong code. Docker's layer cache makes an unchanged rebuild
    cheap.
    """
    # A fresh machine may have an engine but not what building needs (debootstrap, a network for pip).
    built = subprocess.run(["bash", str(REPO / "docker/build-images.sh")], cwd=REPO, capture_output=True, text=True)
    if built.returncode != 0:
        require_service(f"the images {', '.join(IMAGES)}", "INFEROXY_REQUIRE_DOCKER",
                        f"could not be built by docker/build-images.sh:\n{built.stderr[-2000:]}")
    with tempfile.TemporaryDirectory() as context:
        (Path(context) / "tests").mkdir()
        (Path(context) / "tests/__init__.py").write_text("")
        shutil.copy(REPO / "tests/models_for_tests.py", Path(context) / "tests/models_for_tests.py")
        (Path(context) / "Dockerfile").write_text("FROM inferoxy/echo\nCOPY tests/ /opt/inferoxy/tests/\n")
        engine.images.build(path=context, tag=SLOW_IMAGE, network_mode="host", rm=True, forcerm=True)


@pytest.fixture
def instance(engine: Any) -> Iterator[str]:
    """A fresh instance name; every container labelled with it is removed afterwards, however the test ended."""
    name = f"e2e{uuid.uuid4().hex[:8]}"
    yield name
    for label in (f"inferoxy.instance={name}", f"inferoxy.test={name}"):
        for container in engine.containers.list(all=True, sparse=True, filters={"label": label}):
            container.remove(force=True)
    for volume in engine.volumes.list(filters={"label": f"{LABEL_CLAIM}={name}"}):
        volume.remove(force=True)


def containers_of(engine: Any, instance: str, model: str | None = None) -> list[Any]:
    filters = [f"inferoxy.instance={instance}"] + ([f"inferoxy.model={model}"] if model else [])
    # sparse: no inspect per container, which would race with the proxy removing one.
    return list(engine.containers.list(all=True, sparse=True, filters={"label": filters}))


def models_file(tmp_path: Path, *extra: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n" + "".join(extra))
    return path


ECHO = "  echo: {image: inferoxy/echo, max_batch_size: 64, max_batch_delay_ms: 0}\n"
DIGITS = ("  digits: {image: inferoxy/digits, max_batch_size: 32, max_batch_delay_ms: 2,\n"
          "           inputs: [{name: image, datatype: FP32, shape: [64]}]}\n")
GHOST = f"  ghost: {{image: '{MISSING_IMAGE}'}}\n"
SLOW = (f"  slow: {{image: '{SLOW_IMAGE}', model_class: 'tests.models_for_tests:SlowModel', max_batch_size: 1,\n"
        "         max_batch_delay_ms: 0, env: {SLOW_MODEL_SECONDS: '30'}}\n")


def docker_proxy(instance: str, models: Path, redis_url: str, prefix: str, **env: str) -> ProxyProcess:
    return ProxyProcess(env={
        "INFEROXY_RUNTIME": "docker",
        "INFEROXY_DOCKER_NETWORK": "host",
        "INFEROXY_DOCKER_PULL_POLICY": "never",
        "INFEROXY_INSTANCE": instance,
        "INFEROXY_MODELS_FILE": str(models),
        "INFEROXY_REDIS_URL": redis_url,
        "INFEROXY_REDIS_PREFIX": prefix,
        "INFEROXY_REQUEST_TIMEOUT_S": "20",
        **env,
    })


def model_status(redis_url: str, prefix: str, name: str) -> Any:
    async def read() -> Any:
        store = SpecStore.from_url(redis_url, prefix)
        try:
            return await store.status(name, "1")
        finally:
            await store.close()

    return asyncio.run(read())


def rest_infer(proxy: ProxyProcess, model: str, data: list[float], shape: list[int]) -> httpx.Response:
    body = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": data}]}
    return httpx.post(f"{proxy.rest_url}/v2/models/{model}/infer", json=body, timeout=60)


def test_echo_and_digits_from_containers_and_a_missing_image_fails_alone(
    engine: Any, images: None, instance: str, tmp_path: Path, real_redis_url: str, redis_prefix: str
) -> None:
    models = models_file(tmp_path, ECHO, DIGITS, GHOST)
    with docker_proxy(instance, models, real_redis_url, redis_prefix) as proxy:
        wait_for(lambda: (model_status(real_redis_url, redis_prefix, "echo") or 0)
                 and model_status(real_redis_url, redis_prefix, "echo").state == "ready", timeout=60,
                 what="echo ready")
        response = rest_infer(proxy, "echo", [1.0, 2.0, 3.0], [1, 3])
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0]

        images_x, labels = held_out_split()
        with Client(proxy.zmq_url, timeout=60) as client:
            echoed = client.infer("echo", {"frame": np.arange(12, dtype=np.uint8).reshape(3, 4)})
            np.testing.assert_array_equal(echoed["frame"], np.arange(12, dtype=np.uint8).reshape(3, 4))
            batches = [images_x[i:i + 30].astype(np.float32) for i in range(0, len(images_x), 30)]
            predicted = np.concatenate([client.infer("digits", {"image": b})["label"] for b in batches])
        assert float(np.mean(predicted == labels)) >= 0.95

        # Each model's replica is a labelled container of this instance, from its image.
        for model, image in (("echo", "inferoxy/echo"), ("digits", "inferoxy/digits")):
            (container,) = containers_of(engine, instance, model)
            assert container.status == "running" and container.attrs["Image"].startswith(image)

        # The missing image: model failed, naming the image; its requests get not_ready with the reason at
        # once, long before their deadline (20 s); others serve on.
        status = wait_for(lambda: (s := model_status(real_redis_url, redis_prefix, "ghost")) and s.state == "failed"
                          and s, timeout=30, what="ghost failed")
        assert MISSING_IMAGE in (status.reason or ""), status
        with Client(proxy.zmq_url, timeout=30) as client, pytest.raises(InferenceError) as failure:
            asked = time.monotonic()
            client.infer("ghost", {"x": np.zeros((1, 1), np.float32)}, timeout=20)
        assert time.monotonic() - asked < 3.0, "answered at its deadline, not at once"
        assert failure.value.code == "not_ready" and MISSING_IMAGE in failure.value.message, failure.value
        response = rest_infer(proxy, "ghost", [1.0], [1, 1])
        assert response.status_code == 503 and MISSING_IMAGE in response.text, response.text
        assert rest_infer(proxy, "echo", [5.0], [1, 1]).status_code == 200
        assert not containers_of(engine, instance, "ghost")

    # Stopping the proxy removes its containers.
    assert not containers_of(engine, instance)


def test_a_killed_container_fails_its_requests_and_is_replaced(
    engine: Any, images: None, instance: str, tmp_path: Path, real_redis_url: str, redis_prefix: str
) -> None:
    models = models_file(tmp_path, SLOW)
    with docker_proxy(instance, models, real_redis_url, redis_prefix) as proxy:
        wait_for(lambda: (s := model_status(real_redis_url, redis_prefix, "slow")) and s.state == "ready",
                 timeout=60, what="slow ready")
        (victim,) = containers_of(engine, instance, "slow")

        def holding() -> bool:
            return SLOW_MODEL_SLEEPING in victim.logs().decode(errors="replace")

        async def under_load() -> list[Any]:
            # Two requests, one batch each: the replica's credit (2 batches) covers both, so the dead replica
            # held every one of them. A request it never held would wait for the replacement instead.
            async with AsyncClient(proxy.zmq_url, timeout=60) as client:
                calls = [asyncio.ensure_future(client.infer("slow", {"sleep_s": np.array([30.0], np.float32)}))
                         for _ in range(2)]
                await asyncio.to_thread(wait_for, holding, timeout=30, what="the replica sleeping on a batch")
                await asyncio.to_thread(victim.kill)
                return await asyncio.gather(*calls, return_exceptions=True)

        outcomes = asyncio.run(under_load())
        lost = [o for o in outcomes if isinstance(o, InferenceError) and o.code == "replica_lost"]
        assert len(lost) == 2, outcomes
        assert all("exited with status 137" in o.message for o in lost), [o.message for o in lost]

        def replaced() -> bool:
            return any(c.id != victim.id and c.status == "running" for c in containers_of(engine, instance, "slow"))

        wait_for(replaced, timeout=60, what="a new container")
        with Client(proxy.zmq_url, timeout=60) as client:
            result = client.infer("slow", {"sleep_s": np.array([0.1], np.float32)})
        assert result["sleep_s"].tolist() == [np.float32(0.1)]
        assert "exited with status 137" in proxy.log()
    assert not containers_of(engine, instance)


def test_sigterm_with_a_replica_holding_a_long_batch_removes_everything_within_docker_stops_10_s(
    engine: Any, images: None, instance: str, tmp_path: Path, real_redis_url: str, redis_prefix: str
) -> None:
    # The failure: `docker stop` SIGKILLs the proxy 10 s after SIGTERM; the task manager gave a replica holding a
    # batch 5 s after the bridges' own 5 s, so the proxy died first and the replica's container was orphaned.
    models = models_file(tmp_path, SLOW)
    proxy = docker_proxy(instance, models, real_redis_url, redis_prefix).start()
    try:
        wait_for(lambda: (s := model_status(real_redis_url, redis_prefix, "slow")) and s.state == "ready",
                 timeout=60, what="slow ready")
        (replica,) = containers_of(engine, instance, "slow")
        caller = hold_a_batch(proxy, "slow")
        wait_for(lambda: SLOW_MODEL_SLEEPING in replica.logs().decode(errors="replace"), timeout=30,
                 interval=0.2, what="the replica to hold the batch")
    finally:
        code = proxy.stop(timeout=10.0)  # SIGTERM; fails unless serve (so everything below it) ended within 10 s
    assert code == 0, proxy.log()
    assert not containers_of(engine, instance), "the replica's container outlived the proxy"
    caller.join(timeout=30)


def hold_a_batch(proxy: ProxyProcess, model: str) -> threading.Thread:
    """A request the slow model sleeps on (30 s); what it is answered once the proxy stops is not the point."""
    def call() -> None:
        with contextlib.suppress(httpx.HTTPError):
            rest_infer(proxy, model, [1.0], [1, 1])

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def test_a_second_proxy_with_the_same_instance_refuses_to_start_and_leaves_the_first_alone(
    engine: Any, images: None, instance: str, tmp_path: Path, real_redis_url: str, redis_prefix: str
) -> None:
    # The failure: the second proxy took the first one's replicas for leftovers of a crash and removed them.
    models = models_file(tmp_path, ECHO)
    with docker_proxy(instance, models, real_redis_url, redis_prefix) as first:
        wait_for(lambda: rest_infer(first, "echo", [1.0], [1, 1]).status_code == 200, timeout=60, interval=0.5,
                 what="echo served by the first proxy")
        (replica,) = containers_of(engine, instance, "echo")
        second = docker_proxy(instance, models, real_redis_url, f"{redis_prefix}-second")
        try:
            with pytest.raises(AssertionError, match="exited before printing"):
                second.start(timeout=60)
        finally:
            if second.process is not None and second.process.poll() is None:
                second.stop()
        refusal = re.search(r"another Inferoxy proxy \(task manager pid (\d+) .*INFEROXY_INSTANCE", second.log())
        assert refusal and int(refusal.group(1)) in first.pids(), second.log()
        assert "Traceback" not in second.log(), "a refusal is one clear message, not a stack trace"
        assert [c.id for c in containers_of(engine, instance, "echo")] == [replica.id], "the first one's replica"
        assert rest_infer(first, "echo", [2.0], [1, 1]).status_code == 200
    assert not containers_of(engine, instance)
    assert not engine.volumes.list(filters={"label": f"{LABEL_CLAIM}={instance}"}), "the name was given back"


def test_a_sigkilled_proxy_leaves_no_container_after_its_restart(
    engine: Any, images: None, instance: str, tmp_path: Path, real_redis_url: str, redis_prefix: str
) -> None:
    models = models_file(tmp_path, ECHO)
    first = docker_proxy(instance, models, real_redis_url, redis_prefix).start()
    try:
        wait_for(lambda: [c for c in containers_of(engine, instance) if c.status == "running"], timeout=60,
                 what="a replica container")
        old = {c.id for c in containers_of(engine, instance)}
    finally:
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=30)
    assert old <= {c.id for c in containers_of(engine, instance)}, "a SIGKILL leaves its containers behind"

    with docker_proxy(instance, models, real_redis_url, redis_prefix) as second:
        wait_for(lambda: rest_infer(second, "echo", [1.0], [1, 1]).status_code == 200, timeout=60, interval=0.5,
                 what="echo served by the new run")
        assert not old & {c.id for c in containers_of(engine, instance)}
    assert not containers_of(engine, instance)


def test_the_proxy_image_starts_sibling_containers(
    engine: Any, images: None, instance: str, tmp_path: Path
) -> None:
    models = models_file(tmp_path, ECHO)
    rest, zmq_port = free_port(), free_port()
    env = {
        "INFEROXY_BIND_HOST": "127.0.0.1",
        "INFEROXY_REST_PORT": str(rest),
        "INFEROXY_ZMQ_PORT": str(zmq_port),
        "INFEROXY_BATCH_MANAGER_URL": f"tcp://127.0.0.1:{free_port()}",
        "INFEROXY_TASK_MANAGER_URL": f"tcp://127.0.0.1:{free_port()}",
        "INFEROXY_REPLICA_BIND_URL": f"tcp://127.0.0.1:{free_port()}",
        "INFEROXY_EMBEDDED_REDIS_PORT": str(free_port()),
        "INFEROXY_INSTANCE": instance,
        "INFEROXY_DOCKER_PULL_POLICY": "never",
    }
    # Not labelled inferoxy.instance: that label marks what the proxy owns (and removes as orphans).
    proxy = engine.containers.run(
        "inferoxy/proxy", detach=True, network_mode="host", environment=env,
        labels={"inferoxy.test": instance}, name=f"{instance}-proxy",
        volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
                 str(models): {"bind": "/etc/inferoxy/models.yaml", "mode": "ro"}},
    )

    def answers() -> bool:
        try:
            response = httpx.post(f"http://127.0.0.1:{rest}/v2/models/echo/infer", timeout=10,
                                  json={"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32",
                                                    "data": [7.0, 8.0]}]})
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and response.json()["outputs"][0]["data"] == [7.0, 8.0]

    try:
        wait_for(answers, timeout=90, interval=0.5, what="the proxy container to serve echo")
        (replica,) = containers_of(engine, instance, "echo")
        assert replica.id != proxy.id
        proxy.stop(timeout=30)
        assert not containers_of(engine, instance), "stopping the proxy removes its replicas"
    except BaseException:
        print(proxy.logs(tail=80).decode(errors="replace"))
        raise


def test_gpu_replicas_get_their_own_device(engine: Any, images: None, instance: str,
                                           real_redis_url: str) -> None:
    """No GPU here: placement is planned by the task manager, and the created (never started)
    container carries the device request and NVIDIA_VISIBLE_DEVICES."""
    settings = Settings(instance=instance, gpus="0,1", redis_url=real_redis_url, runtime="docker")
    tm = TaskManager(settings, ctx=None, runtime=None)  # type: ignore[arg-type]
    tm.placement.gpus = GpuAllocator(gpu_inventory(settings.gpus), allow_sharing=settings.gpu_sharing)
    spec = ModelSpec(name="gpu-echo", image="inferoxy/echo", run_on_gpu=True, min_replicas=3, max_replicas=3)
    group = ModelGroup(spec)
    placed = [tm.placement.place(spec.key, True, f"{instance}-gpu-echo-1-{n}", on_cpu=0) for n in range(3)]
    assert [gpu for gpu, _ in placed[:2]] == ["0", "1"], "never two replicas of one model on one GPU"
    assert placed[2][0] is None and "no GPU free" in (placed[2][1] or "")

    runtime = DockerRuntime(instance, pull_policy="never")
    for n, (gpu, _) in enumerate(placed[:2]):
        replica = Replica(f"{instance}-gpu-echo-1-{n}", spec, group, started_at=0.0, gpu=gpu)
        container = engine.containers.create(**runtime.container_options(tm._plan(replica)))
        container.reload()
        (request,) = container.attrs["HostConfig"]["DeviceRequests"]
        assert request["DeviceIDs"] == [gpu] and request["Capabilities"] == [["gpu"]]
        assert f"NVIDIA_VISIBLE_DEVICES={gpu}" in container.attrs["Config"]["Env"]
        assert container.labels["inferoxy.instance"] == instance
    assert len(containers_of(engine, instance)) == 2

