"""The Docker runtime against a real engine (start one with .ci/docker.sh), plus its pure parts.

Without an engine these tests skip, unless CI or INFEROXY_REQUIRE_DOCKER is set, where they fail. Containers use
host networking and talk to the test over 127.0.0.1 only. Every container a test starts carries this
session's label and is removed afterwards, whatever the test's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import tarfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from docker.client import DockerClient
from docker.errors import ImageNotFound, NotFound

from model_manager.spec import ModelSpec, Resources
from task_manager.runtimes.base import (
    LABEL_INSTANCE,
    LABEL_MODEL,
    LABEL_REPLICA,
    LABEL_VERSION,
    ReplicaPlan,
    RuntimeStartError,
)
from task_manager.runtimes.docker import DockerRuntime, container_name
from task_manager.runtimes.quantity import memory_bytes
from tests.support import require_service

BASE_IMAGE = os.environ.get("INFEROXY_BASE_IMAGE", "inferoxy/base:bookworm")
SESSION_LABEL = "inferoxy.test-session"
SESSION = uuid.uuid4().hex[:10]
# The test image: the offline base plus what makes test output prompt. Its tag follows its content
# and its base, so a change to either builds it anew and otherwise it is reused across runs.
TEST_DOCKERFILE = f"""FROM {BASE_IMAGE}
ENV PYTHONUNBUFFERED=1
LABEL inferoxy.test-image=1
CMD ["python3", "-c", "print('test image')"]
"""
TIMEOUT_S = 30.0


# --- the engine and the test image ----------------------------------------------------------------


def _unavailable(what: str, problem: str) -> None:
    require_service(what, "INFEROXY_REQUIRE_DOCKER", f"{problem} (start one with: bash .ci/docker.sh)")


@pytest.fixture(scope="session")
def test_image(engine: DockerClient) -> str:
    try:
        base_id = engine.images.get(BASE_IMAGE).id
    except ImageNotFound:
        _unavailable(f"the offline base image {BASE_IMAGE}", "is missing")
    tag = "inferoxy/test-runtime:" + hashlib.sha256(f"{base_id}\n{TEST_DOCKERFILE}".encode()).hexdigest()[:12]
    try:
        engine.images.get(tag)
        return tag
    except ImageNotFound:
        pass
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        data = TEST_DOCKERFILE.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    engine.images.build(fileobj=context, custom_context=True, tag=tag, rm=True, network_mode="host")
    return tag


@pytest.fixture
def cleanup(engine: DockerClient) -> Iterator[None]:
    """Remove every container of this session once the test is over, passed or not."""
    yield
    for container in engine.containers.list(all=True, sparse=True, filters={"label": f"{SESSION_LABEL}={SESSION}"}):
        with contextlib.suppress(NotFound):
            container.remove(force=True, v=True)


@pytest.fixture
def instance() -> str:
    return f"test-{SESSION}-{uuid.uuid4().hex[:6]}"


def _plan(image: str, command: list[str] | None, env: dict[str, str] | None = None,
          spec_env: dict[str, str] | None = None, **spec_fields: Any) -> ReplicaPlan:
    spec = ModelSpec(name="probe", version="7", image=image, command=command, env=spec_env or {}, **spec_fields)
    return ReplicaPlan(
        replica_id=f"probe-{uuid.uuid4().hex[:8]}",
        spec=spec,
        env=env or {},
        labels={SESSION_LABEL: SESSION, "team": "vision"},
    )


def _gone(engine: DockerClient, name: str) -> bool:
    try:
        engine.containers.get(name)
    except NotFound:
        return True
    return False


# --- against the engine ---------------------------------------------------------------------------

# Dials the test's ROUTER the way a replica dials the task manager, and reports what it was given.
PROBE = """
import os, msgpack, zmq
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.IDENTITY, os.environ["INFEROXY_REPLICA_ID"].encode())
sock.setsockopt(zmq.LINGER, 2000)
sock.connect(os.environ["INFEROXY_REPLICA_URL"])
keys = ("INFEROXY_REPLICA_ID", "FROM_SPEC", "FROM_PLAN", "OVERRIDDEN")
sock.send(msgpack.packb({k: os.environ.get(k) for k in keys}))
if sock.poll(20000):
    print("told:", sock.recv().decode())
"""


def test_container_gets_env_labels_and_host_network(engine: DockerClient, test_image: str, cleanup: None,
                                                    instance: str) -> None:
    router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        plan = _plan(
            test_image,
            ["python3", "-c", PROBE],
            env={"INFEROXY_REPLICA_URL": f"tcp://127.0.0.1:{port}", "FROM_PLAN": "plan", "OVERRIDDEN": "plan"},
            spec_env={"FROM_SPEC": "spec", "OVERRIDDEN": "spec"},
        )
        plan.env["INFEROXY_REPLICA_ID"] = plan.replica_id

        async def scenario() -> Any:
            runtime = DockerRuntime(instance)
            try:
                replica = await runtime.start(plan)
                assert replica.replica_id == plan.replica_id
                # Over host networking the replica reaches a socket bound on the host's loopback.
                assert await asyncio.to_thread(router.poll, int(TIMEOUT_S * 1000)), "the replica never dialled"
                identity, payload = router.recv_multipart()
                assert identity == plan.replica_id.encode()
                assert msgpack.unpackb(payload) == {
                    "INFEROXY_REPLICA_ID": plan.replica_id,
                    "FROM_SPEC": "spec",
                    "FROM_PLAN": "plan",
                    "OVERRIDDEN": "plan",  # the plan's env wins over the spec's
                }
                container = engine.containers.get(plan.replica_id)
                labels = container.labels
                assert labels[LABEL_INSTANCE] == instance
                assert labels[LABEL_MODEL] == "probe"
                assert labels[LABEL_VERSION] == "7"
                assert labels[LABEL_REPLICA] == plan.replica_id
                assert labels["team"] == "vision"
                assert container.attrs["HostConfig"]["NetworkMode"] == "host"

                router.send_multipart([identity, b"goodbye"])
                ended = await asyncio.wait_for(replica.wait(), TIMEOUT_S)
                await replica.stop()  # after the end: nothing left to do, and no error
                return ended
            finally:
                await runtime.close()

        ended = asyncio.run(scenario())
        assert ended.code == 0
        assert "told: goodbye" in ended.log_tail
        assert _gone(engine, plan.replica_id)
    finally:
        router.close()


def test_wait_reports_exit_code_and_log_tail_without_blocking_the_loop(
        engine: DockerClient, test_image: str, cleanup: None, instance: str) -> None:
    script = (
        "import sys, time\n"
        "for i in range(80): print('line', i)\n"
        "time.sleep(0.5)\n"  # the engine copies stdout and stderr apart: let the order settle
        "print('about to fail', file=sys.stderr)\n"
        "time.sleep(0.5)\n"
        "sys.exit(3)\n"
    )
    plan = _plan(test_image, ["python3", "-c", script])

    async def scenario() -> Any:
        runtime = DockerRuntime(instance)
        try:
            replica = await runtime.start(plan)
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            ended = await asyncio.wait_for(replica.wait(), TIMEOUT_S)
            ticker.cancel()
            again = await replica.wait()  # a second wait gets the same answer at once
            assert again == ended
            return ended, ticks
        finally:
            await runtime.close()

    ended, ticks = asyncio.run(scenario())
    assert ended.code == 3
    lines = ended.log_tail.splitlines()
    assert "about to fail" in lines
    assert "line 79" in lines
    assert "line 0" not in lines  # a tail, not the whole log
    assert len(lines) <= 50
    assert "exited with status 3" in ended.describe()
    assert ticks > 20, "the event loop was blocked while the replica ran"
    assert _gone(engine, plan.replica_id), "an ended replica's container must be removed"


def test_stop_ends_and_removes_the_container(engine: DockerClient, test_image: str, cleanup: None,
                                             instance: str) -> None:
    plan = _plan(test_image, ["python3", "-c", "import time; print('up'); time.sleep(600)"])

    async def scenario() -> Any:
        runtime = DockerRuntime(instance)
        try:
            replica = await runtime.start(plan)
            waiter = asyncio.create_task(replica.wait())
            await asyncio.sleep(0.5)
            assert not waiter.done()
            started = time.monotonic()
            await replica.stop(grace_s=5)
            took = time.monotonic() - started
            ended = await asyncio.wait_for(waiter, TIMEOUT_S)
            await replica.stop()  # twice: tolerated
            return ended, took
        finally:
            await runtime.close()

    ended, took = asyncio.run(scenario())
    assert _gone(engine, plan.replica_id)
    # docker-init forwards SIGTERM, so the replica ends well before the grace period runs out.
    assert took < 4, f"stop took {took:.1f}s"
    assert ended.code is not None and ended.code != 0


def test_wait_tolerates_the_container_vanishing(engine: DockerClient, test_image: str, cleanup: None,
                                                instance: str) -> None:
    plan = _plan(test_image, ["python3", "-c", "import time; time.sleep(600)"])

    async def scenario() -> Any:
        runtime = DockerRuntime(instance)
        try:
            replica = await runtime.start(plan)
            waiter = asyncio.create_task(replica.wait())
            await asyncio.sleep(0.3)
            # Someone else removes it (docker rm -f): the wait ends, the stop after it is a no-op.
            await asyncio.to_thread(engine.containers.get(plan.replica_id).remove, force=True)
            ended = await asyncio.wait_for(waiter, TIMEOUT_S)
            await replica.stop()
            return ended
        finally:
            await runtime.close()

    ended = asyncio.run(scenario())
    assert ended.code in (None, 137)  # removed mid-wait, or seen exiting from the kill first


def test_a_cancelled_start_leaves_no_container(engine: DockerClient, test_image: str, cleanup: None,
                                               instance: str) -> None:
    plan = _plan(test_image, ["python3", "-c", "import time; time.sleep(600)"])

    async def scenario() -> None:
        runtime = DockerRuntime(instance)
        try:
            await runtime.remove_orphans()  # connects, so the cancel below lands in create/start
            starting = asyncio.create_task(runtime.start(plan))
            await asyncio.sleep(0.05)
            starting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await starting
        finally:
            await runtime.close()

    asyncio.run(scenario())
    deadline = time.monotonic() + TIMEOUT_S
    while not _gone(engine, plan.replica_id):
        assert time.monotonic() < deadline, "the container of a cancelled start was left behind"
        time.sleep(0.1)


def test_remove_orphans_takes_only_this_instances_containers(engine: DockerClient, test_image: str,
                                                             cleanup: None, instance: str) -> None:
    other = instance + "-other"

    def leftover(owner: str) -> str:
        container = engine.containers.run(
            test_image, ["sleep", "600"], detach=True, network_mode="host",
            labels={LABEL_INSTANCE: owner, SESSION_LABEL: SESSION},
        )
        return str(container.id)

    mine = [leftover(instance), leftover(instance)]
    theirs = leftover(other)
    engine.containers.get(mine[1]).stop(timeout=0)  # an exited leftover counts too

    async def scenario() -> int:
        runtime = DockerRuntime(instance)
        try:
            return await runtime.remove_orphans()
        finally:
            await runtime.close()

    assert asyncio.run(scenario()) == 2
    assert all(_gone(engine, cid) for cid in mine)
    assert not _gone(engine, theirs)


def test_missing_image_with_pull_policy_never(engine: DockerClient, cleanup: None, instance: str) -> None:
    image = f"inferoxy/no-such-image:{uuid.uuid4().hex[:8]}"
    plan = _plan(image, None)

    async def scenario() -> None:
        runtime = DockerRuntime(instance, pull_policy="never")
        try:
            await runtime.start(plan)
        finally:
            await runtime.close()

    with pytest.raises(RuntimeStartError, match=f"image '{image}' is not on the Docker engine.*'never'"):
        asyncio.run(scenario())
    assert _gone(engine, plan.replica_id)


def test_a_spec_pull_policy_overrides_the_runtime_default(engine: DockerClient, cleanup: None, instance: str) -> None:
    # The runtime would pull (if-not-present); the spec says never, so nothing is pulled and the error says so.
    image = f"inferoxy/no-such-image:{uuid.uuid4().hex[:8]}"
    plan = _plan(image, None, pull_policy="never")

    async def scenario() -> None:
        runtime = DockerRuntime(instance, pull_policy="if-not-present")
        try:
            await runtime.start(plan)
        finally:
            await runtime.close()

    with pytest.raises(RuntimeStartError, match="'never'"):
        asyncio.run(scenario())


def test_a_container_that_cannot_start_is_reported_and_removed(engine: DockerClient, test_image: str,
                                                                cleanup: None, instance: str) -> None:
    plan = _plan(test_image, ["python3", "-c", "print('never')"], resources=Resources(cpus=10_000))  # > host CPUs

    async def scenario() -> None:
        runtime = DockerRuntime(instance)
        try:
            await runtime.start(plan)
        finally:
            await runtime.close()

    with pytest.raises(RuntimeStartError, match=plan.replica_id):
        asyncio.run(scenario())
    assert _gone(engine, plan.replica_id)


def test_no_engine_is_a_start_error(instance: str) -> None:
    async def scenario() -> None:
        runtime = DockerRuntime(instance, base_url="unix:///nonexistent/docker.sock")
        try:
            await runtime.start(_plan("whatever:1", None))
        finally:
            await runtime.close()

    with pytest.raises(RuntimeStartError, match="no Docker engine answers at unix:///nonexistent/docker.sock"):
        asyncio.run(scenario())


# --- the pure parts: no engine needed -------------------------------------------------------------


def test_container_options_for_a_gpu_replica_with_limits() -> None:
    spec = ModelSpec(name="resnet", version="2", image="acme/resnet:2", command=["serve", "--fast"],
                     env={"A": "spec", "B": "spec"}, resources=Resources(cpus=1.5, memory="2Gi"))
    plan = ReplicaPlan(replica_id="resnet-2-0", spec=spec, env={"B": "plan"}, gpu="3",
                       labels={LABEL_INSTANCE: "hijack", "extra": "yes"})
    options = DockerRuntime("prod", network="inferoxy-net").container_options(plan)
    assert options["image"] == "acme/resnet:2"
    assert options["command"] == ["serve", "--fast"]
    assert options["name"] == "resnet-2-0"
    assert options["environment"] == {"A": "spec", "B": "plan", "NVIDIA_VISIBLE_DEVICES": "3"}
    assert options["labels"] == {LABEL_INSTANCE: "prod", LABEL_MODEL: "resnet", LABEL_VERSION: "2",
                                 LABEL_REPLICA: "resnet-2-0", "extra": "yes"}
    assert options["network"] == "inferoxy-net" and "network_mode" not in options
    assert options["nano_cpus"] == 1_500_000_000
    assert options["mem_limit"] == 2 * 2**30
    [request] = options["device_requests"]
    assert request["DeviceIDs"] == ["3"] and request["Capabilities"] == [["gpu"]]


def test_an_unreadable_memory_size_is_a_start_error() -> None:
    spec = ModelSpec(name="echo", image="inferoxy/echo", resources=Resources(memory="lots"))
    runtime = DockerRuntime("prod", base_url="unix:///nonexistent/docker.sock")
    with pytest.raises(RuntimeStartError, match="model echo/1: memory 'lots'"):
        asyncio.run(runtime.start(ReplicaPlan("echo-1", spec, env={})))


def test_container_options_without_gpu_or_command() -> None:
    spec = ModelSpec(name="echo", image="inferoxy/echo")
    options = DockerRuntime("prod").container_options(ReplicaPlan("echo-1", spec, env={}))
    assert options["network_mode"] == "host"
    assert "command" not in options and "device_requests" not in options
    assert "nano_cpus" not in options and "mem_limit" not in options


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="pull_policy 'sometimes'"):
        DockerRuntime("prod", pull_policy="sometimes")
    with pytest.raises(ValueError, match="instance name"):
        DockerRuntime("")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512m", 512 * 2**20), ("2g", 2 * 2**30), ("2Gi", 2 * 2**30), ("500M", 500 * 10**6), ("1024", 1024),
     ("1.5Gi", int(1.5 * 2**30)), ("64k", 64 * 1024), ("64Ki", 64 * 1024), ("2GB", 2 * 2**30)],
)
def test_memory_bytes(text: str, expected: int) -> None:
    assert memory_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "2 parsecs", "-1g"])
def test_memory_bytes_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="memory"):
        memory_bytes(text)


@pytest.mark.parametrize(
    ("replica_id", "expected"),
    [("echo-1-ab12", "echo-1-ab12"), ("echo/1:ab", "echo-1-ab"), ("_x", "r_x"), ("a", "a-0")],
)
def test_container_name(replica_id: str, expected: str) -> None:
    assert container_name(replica_id) == expected
