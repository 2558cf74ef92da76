"""Who owns an instance name (task_manager/runtimes/ownership.py), and the Docker runtime's claim on a real engine.

The failure these guard against: two proxies with the default INFEROXY_INSTANCE on one engine removed each
other's replicas at start, each taking the other's containers for leftovers of a crash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from task_manager.runtimes.base import InstanceTaken
from task_manager.runtimes.docker import LABEL_CLAIM, DockerRuntime, claim_volume_name
from task_manager.runtimes.ownership import Owner, owner_alive, process_start


def never_asked(container_id: str) -> bool:
    raise AssertionError(f"the engine was asked about {container_id}")


@pytest.fixture
def other_process() -> Iterator[tuple[subprocess.Popen[bytes], Owner]]:
    """A live process of this machine and PID namespace, as another proxy on the host would be recorded."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    me = Owner.this_process()
    started = process_start(process.pid)
    assert started is not None
    yield process, dataclasses.replace(me, pid=process.pid, started=started)
    process.kill()
    process.wait()


def test_an_owner_on_this_host_is_alive_while_its_process_runs(other_process: tuple[Any, Owner]) -> None:
    process, owner = other_process
    me = Owner.this_process()
    assert owner_alive(owner, me, never_asked) is True
    # A PID reused by another process later is not the owner: the start time tells them apart.
    assert owner_alive(dataclasses.replace(owner, started=str(int(owner.started) - 1)), me, never_asked) is False
    process.kill()
    process.wait()
    assert owner_alive(owner, me, never_asked) is False


def test_an_owner_in_another_container_is_alive_while_the_engine_runs_it() -> None:
    me = Owner.this_process()
    owner = dataclasses.replace(me, pid=1, container="c" * 64, pid_namespace="pid:[1]", host="c" * 12)
    assert owner_alive(owner, me, lambda cid: cid == "c" * 64) is True
    assert owner_alive(owner, me, lambda cid: False) is False
    # Our own container, restarted since (a new PID namespace): the process it recorded is gone.
    mine = dataclasses.replace(me, container="d" * 64)
    assert owner_alive(dataclasses.replace(mine, pid_namespace="pid:[1]"), mine, never_asked) is False


def test_an_owner_that_cannot_be_seen_from_here_is_unknown_and_a_reboot_ends_it() -> None:
    me = Owner.this_process()
    elsewhere = dataclasses.replace(me, host="other-machine", boot_id="another-boot")
    assert owner_alive(elsewhere, me, never_asked) is None
    assert owner_alive(dataclasses.replace(me, pid_namespace="pid:[1]"), me, never_asked) is None
    assert owner_alive(dataclasses.replace(me, boot_id="before-the-reboot"), me, never_asked) is False


def test_owner_labels_round_trip() -> None:
    me = Owner.this_process("e" * 64)
    assert Owner.from_labels(me.labels()) == me
    assert Owner.from_labels({}) is None
    assert Owner.from_labels({**me.labels(), "inferoxy.owner.pid": "x"}) is None


# --- the claim on a real engine ----------------------------------------------------------------------------


@pytest.fixture
def instance(engine: Any) -> Iterator[str]:
    name = f"claim{uuid.uuid4().hex[:8]}"
    yield name
    for volume in engine.volumes.list(filters={"name": claim_volume_name(name)}):
        volume.remove(force=True)


def test_a_live_owner_keeps_the_instance_and_a_dead_ones_claim_is_taken_over(
    engine: Any, instance: str, other_process: tuple[Any, Owner]
) -> None:
    process, other = other_process
    volume = claim_volume_name(instance)
    engine.volumes.create(volume, labels={LABEL_CLAIM: instance, **other.labels()})

    async def claim() -> DockerRuntime:
        runtime = DockerRuntime(instance, pull_policy="never")
        try:
            await runtime.claim_instance()
        except BaseException:
            await runtime.close()
            raise
        return runtime

    with pytest.raises(InstanceTaken, match="INFEROXY_INSTANCE") as refused:
        asyncio.run(claim())
    assert f"pid {process.pid} on host" in str(refused.value)
    assert Owner.from_labels(engine.volumes.get(volume).attrs["Labels"]) == other, "the refused claim changed it"

    process.kill()
    process.wait()

    async def take_over_and_release() -> None:
        runtime = await claim()
        assert Owner.from_labels(engine.volumes.get(volume).attrs["Labels"]) == Owner.this_process(), \
            "the claim is ours now"
        await runtime.close()

    asyncio.run(take_over_and_release())
    assert not engine.volumes.list(filters={"name": volume}), "a clean stop gives the name back"
