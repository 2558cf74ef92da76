"""The task manager in this process with real replica processes, fakeredis over TCP, and the test as batch manager."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from inferoxy import envelope, metrics, wire
from inferoxy.settings import Settings
from model_manager.spec import ModelSpec
from model_manager.store import SpecStore
from task_manager.replicas import backoff_delay, new_nonce, replica_id, sanitize
from task_manager.service import TaskManager, clip_reason
from tests.support import REPO, alive, descendants, free_port, tcp_fakeredis

Tensors = Sequence[tuple[str, np.ndarray]]
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A fakeredis over TCP of this module's own (tests.support.tcp_fakeredis)."""
    with tcp_fakeredis() as url:
        yield url


def spec(name: str, model_class: str, **fields: Any) -> ModelSpec:
    return ModelSpec(name=name, model_class=model_class, env={"PYTHONPATH": str(REPO)}, **fields)


ECHO = "examples.models.echo.model:EchoModel"
SLOW = "tests.models_for_tests:SlowModel"


class Harness:
    """A running TaskManager, its spec store, and a fake batch manager (a DEALER that heartbeats)."""

    def __init__(self, redis_url: str, **settings: Any) -> None:
        self.settings = Settings(
            task_manager_url=f"tcp://127.0.0.1:{free_port()}",
            redis_url=redis_url,
            redis_prefix=f"tm-test-{os.getpid()}-{next(_prefixes)}",
            **{"replica_bind_url": f"tcp://127.0.0.1:{free_port()}",
               "instance": "Test", "heartbeat_interval_s": 0.1, "heartbeat_liveness": 10, "restart_backoff_s": 0.05,
               "restart_backoff_max_s": 1.0, **settings},
        )
        self.ctx = zmq.asyncio.Context()
        self.tm = TaskManager(self.settings, self.ctx)
        self.store = SpecStore.from_url(redis_url, self.settings.redis_prefix)
        self.inbox: list[tuple[dict[str, Any], Tensors]] = []
        self.bm = self.batch_manager()
        self._tasks: list[asyncio.Task[None]] = []

    def batch_manager(self) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.settings.task_manager_url)
        return sock

    async def __aenter__(self) -> Harness:
        ready = asyncio.Event()
        self._tasks.append(asyncio.create_task(self.tm.run(ready)))
        await asyncio.wait_for(ready.wait(), 10)
        self._tasks.append(asyncio.create_task(self._heartbeat()))
        return self

    async def _heartbeat(self) -> None:
        while True:
            await self.bm.send_multipart(wire.encode({"t": "hb"}))
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def stop(self) -> None:
        for task in reversed(self._tasks):
            # One cancel: the task manager's shutdown drains replicas and writes final statuses.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        await self.store.close()
        self.ctx.destroy(linger=0)

    async def expect(self, kind: str, timeout: float = 20.0, **fields: Any) -> tuple[dict[str, Any], Tensors]:
        """The first message of type ``kind`` (with ``fields``) from the task manager; others stay in the inbox."""

        def match(header: dict[str, Any]) -> bool:
            return header["t"] == kind and all(header.get(k) == v for k, v in fields.items())

        for index, (header, tensors) in enumerate(self.inbox):
            if match(header):
                del self.inbox[index]
                return header, tensors
        async with asyncio.timeout(timeout):
            while True:
                header, tensors = decode_answer(await self.bm.recv_multipart())
                if match(header):
                    return header, tensors
                self.inbox.append((header, tensors))

    async def drained(self, name: str, version: str = "1", sock: zmq.asyncio.Socket | None = None) -> None:
        """What a batch manager says once it holds nothing more of a removed model."""
        await (sock or self.bm).send_multipart(wire.encode({"t": "model_drained", "model": name, "version": version}))

    async def delete(self, name: str) -> None:
        """Remove a model, and play a batch manager that held nothing of it."""
        await self.store.delete(name)
        await self.drained(name)

    async def send_batch(self, replica: str, batch: int, tensors: Tensors) -> None:
        header = {"t": "batch", "replica": replica, "batch": batch, "model": "m", "version": "1",
                  "items": [{"id": batch, "n": len(tensors)}]}
        await self.bm.send_multipart([envelope.pack(replica, batch), *wire.encode(header, tensors)])

    def replicas(self, key: str) -> list[dict[str, Any]]:
        return self.tm.status().get(key, {}).get("replicas", [])

    async def status_eventually(self, name: str, state: str | None, timeout: float = 20.0,
                                ready_replicas: int | None = None) -> Any:
        """The model's status record in Redis once its state is ``state`` (None: once it has none), and once
        it counts ``ready_replicas`` if given (a state can be written before its last replica is ready)."""

        def reached(status: Any) -> bool:
            found = status.state if status else None
            return found == state and (ready_replicas is None or status.ready_replicas == ready_replicas)

        status = None
        try:
            async with asyncio.timeout(timeout):
                while not reached(status := await self.store.status(name, "1")):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"status of {name} after {timeout}s: {status}") from None
        return status

    def pid_of(self, key: str, replica: str) -> int:
        (pid,) = [r["pid"] for r in self.replicas(key) if r["id"] == replica]
        assert isinstance(pid, int)
        return pid


def decode_answer(frames: list[bytes]) -> tuple[dict[str, Any], Tensors]:
    """A message from the task manager; a replica's answer comes behind the envelope of its batch."""
    if envelope.is_envelope(frames[0]):
        route = envelope.unpack(frames.pop(0))
        header, tensors = wire.decode(frames)
        assert header["t"] in ("result", "failed") and route == (header["replica"], header["batch"]), header
        return header, tensors
    return wire.decode(frames)


def environ_of(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def run(redis_url: str, scenario: Callable[[Harness], Awaitable[None]], **settings: Any) -> None:
    async def main() -> None:
        async with Harness(redis_url, **settings) as harness:
            await scenario(harness)

    asyncio.run(main())


async def eventually(check: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``check`` (task manager state, process table) until it holds; these have no event to wait on."""
    try:
        async with asyncio.timeout(timeout):
            while not check():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def test_replica_up_then_batches_travel_both_ways(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("echo", ECHO))
        up, _ = await h.expect("replica_up")
        prefix = replica_id("Test", "echo", "1", 0, "")  # then a random nonce of 12 hex digits
        assert up["replica"].startswith(prefix) and len(up["replica"]) == len(prefix) + 12
        assert {k: v for k, v in up.items() if k != "replica"} == {"t": "replica_up", "model": "echo",
                                                                    "version": "1", "capacity": 2}

        x = np.arange(12, dtype=np.float32).reshape(4, 3)
        await h.send_batch(up["replica"], 7, [("x", x)])
        result, tensors = await h.expect("result", batch=7)
        assert result["replica"] == up["replica"] and result["items"] == [{"n": 1}]
        np.testing.assert_array_equal(dict(tensors)["x"], x)

        (status,) = h.replicas("echo/1")
        assert status["state"] == "ready" and status["in_flight"] == 0
        assert status["pid"] in descendants(os.getpid())

    run(redis_url, scenario)


def test_a_killed_replica_is_reported_and_replaced(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("slow", SLOW))
        up, _ = await h.expect("replica_up")
        victim = h.pid_of("slow/1", up["replica"])
        await h.send_batch(up["replica"], 1, [("sleep_s", np.array([30.0], np.float32))])
        await eventually(lambda: h.replicas("slow/1")[0]["in_flight"] == 1)

        os.kill(victim, signal.SIGKILL)
        lost, _ = await h.expect("failed", batch=1)
        assert (lost["code"], lost["replica"]) == ("replica_lost", up["replica"])
        down, _ = await h.expect("replica_down", replica=up["replica"])
        assert "-9" in down["reason"], down["reason"]
        again, _ = await h.expect("replica_up")
        assert again["replica"] != up["replica"] and again["model"] == "slow"
        assert not alive(victim)

        status = h.tm.status()["slow/1"]
        assert status["restarts"] == 1 and "-9" in status["last_error"]
        assert [r["state"] for r in status["replicas"]] == ["ready"]

    run(redis_url, scenario)


def test_a_batch_for_a_replica_that_is_not_there_fails_with_replica_lost(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.send_batch("nobody-0", 3, [("x", np.zeros(1, np.float32))])
        failed, tensors = await h.expect("failed", batch=3)
        assert (failed["code"], failed["replica"]) == ("replica_lost", "nobody-0")
        assert not tensors

    run(redis_url, scenario)


def test_a_silent_replica_is_killed_and_replaced(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("echo", ECHO))
        up, _ = await h.expect("replica_up")
        frozen = h.pid_of("echo/1", up["replica"])
        os.kill(frozen, signal.SIGSTOP)  # alive, but silent
        down, _ = await h.expect("replica_down", replica=up["replica"])
        assert "no heartbeat" in down["reason"], down["reason"]
        await h.expect("replica_up")
        await eventually(lambda: not alive(frozen), what="the silent replica to be killed")

    run(redis_url, scenario)


def test_a_replica_that_never_gets_ready_is_replaced(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("hangs", "tests.models_for_tests:HangingLoadModel"))
        await eventually(lambda: h.tm.status().get("hangs/1", {}).get("restarts", 0) >= 2, timeout=30)
        status = h.tm.status()["hangs/1"]
        assert "not ready within 0.5s" in status["last_error"]
        await eventually(lambda: [r["state"] for r in h.replicas("hangs/1")] == ["starting"], what="a new try")
        assert not [m for m in h.inbox if m[0]["t"] == "replica_up"]

    run(redis_url, scenario, replica_start_timeout_s=0.5)


def test_a_model_whose_load_fails_backs_off_and_keeps_the_reason(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("broken", "tests.models_for_tests:FailingLoadModel"))
        await eventually(lambda: h.tm.status().get("broken/1", {}).get("restarts", 0) >= 2, timeout=30)
        last_error = h.tm.status()["broken/1"]["last_error"]
        assert "exited with status 2" in last_error and "weights missing" in last_error, last_error

    run(redis_url, scenario)


def test_specs_coming_and_going_start_and_stop_replicas(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("echo", ECHO, min_replicas=2, max_replicas=2))
        ups = {(await h.expect("replica_up"))[0]["replica"] for _ in range(2)}
        assert len(ups) == 2
        pids = [r["pid"] for r in h.replicas("echo/1")]

        await h.delete("echo")
        downs = {(await h.expect("replica_down"))[0]["replica"] for _ in range(2)}
        assert downs == ups
        await eventually(lambda: not any(alive(pid) for pid in pids), what="replicas of the removed model to exit")
        await eventually(lambda: "echo/1" not in h.tm.status())

    run(redis_url, scenario)


def test_a_changed_spec_rolls_its_replicas_without_failing_a_batch(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("slow", SLOW))
        first, _ = await h.expect("replica_up")
        # Held by the old replica across the whole update.
        await h.send_batch(first["replica"], 1, [("sleep_s", np.array([4.0], np.float32))])
        await eventually(lambda: h.replicas("slow/1")[0]["in_flight"] == 1)
        changed = spec("slow", SLOW)
        changed.env["SLOW_FLAVOUR"] = "new"
        await h.store.put(changed)

        # The new replica first; only then is the old one drained, and it answers what it holds.
        second, _ = await h.expect("replica_up")
        assert second["replica"] != first["replica"]
        assert not [m for m in h.inbox if m[0]["t"] in ("replica_draining", "replica_down")]
        draining, _ = await h.expect("replica_draining", replica=first["replica"])
        assert "spec changed" in draining["reason"]
        assert not [m for m in h.inbox if m[0]["t"] == "replica_down"], "down only after it exits"
        result, _ = await h.expect("result", batch=1)
        assert result["replica"] == first["replica"]
        down, _ = await h.expect("replica_down", replica=first["replica"])
        assert "spec changed" in down["reason"]
        assert not [m for m in h.inbox if m[0]["t"] == "failed"]
        assert b"SLOW_FLAVOUR=new" in environ_of(h.pid_of("slow/1", second["replica"]))
        await eventually(lambda: [r["id"] for r in h.replicas("slow/1")] == [second["replica"]])

    run(redis_url, scenario)


def test_a_removed_model_drains_then_goes_down(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("slow", SLOW))
        up, _ = await h.expect("replica_up")
        await h.send_batch(up["replica"], 5, [("sleep_s", np.array([1.0], np.float32))])
        await eventually(lambda: h.replicas("slow/1")[0]["in_flight"] == 1)
        await h.delete("slow")
        await h.expect("replica_draining", replica=up["replica"])
        await h.expect("result", batch=5)
        await h.expect("replica_down", replica=up["replica"])
        await eventually(lambda: "slow/1" not in h.tm.status())
        await h.status_eventually("slow", None)

    run(redis_url, scenario)


def test_a_removed_models_replicas_serve_until_batch_managers_drained_it(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("slow", SLOW))
        up, _ = await h.expect("replica_up")
        await h.store.delete("slow")
        await eventually(lambda: "slow/1" in h.tm._retiring, what="the removal to be seen")
        # The batch manager still holds requests for it: its replica takes and answers batches.
        await h.send_batch(up["replica"], 7, [("sleep_s", np.array([0.2], np.float32))])
        await h.expect("result", batch=7)
        assert not [m for m in h.inbox if m[0]["t"] in ("replica_draining", "replica_down")]
        assert h.tm._replicas[up["replica"].encode()].live
        await h.drained("slow")
        await h.expect("replica_draining", replica=up["replica"])
        await h.expect("replica_down", replica=up["replica"])
        await eventually(lambda: "slow/1" not in h.tm.status())

    run(redis_url, scenario)


def test_a_removed_model_drains_once_every_batch_manager_said_model_drained(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("slow", SLOW))
        up, _ = await h.expect("replica_up")
        other = h.batch_manager()
        await other.send_multipart(wire.encode({"t": "hb"}))
        await eventually(lambda: len(h.tm.relay.batch_managers) == 2, what="the second batch manager")
        await h.store.delete("slow")
        await eventually(lambda: "slow/1" in h.tm._retiring, what="the removal to be seen")
        await h.drained("slow")
        await asyncio.sleep(0.3)
        assert h.tm._replicas[up["replica"].encode()].live, "one batch manager still holds requests for it"
        await h.drained("slow", sock=other)
        await h.expect("replica_draining", replica=up["replica"])
        await h.expect("replica_down", replica=up["replica"])
        await eventually(lambda: "slow/1" not in h.tm.status())
        other.close()

    run(redis_url, scenario)


def test_a_removed_model_drains_after_the_grace_without_model_drained(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("slow", SLOW))
        up, _ = await h.expect("replica_up")
        await h.store.delete("slow")
        await eventually(lambda: "slow/1" in h.tm._retiring, what="the removal to be seen")
        removed_at = asyncio.get_running_loop().time()
        await h.expect("replica_draining", replica=up["replica"])
        assert asyncio.get_running_loop().time() - removed_at > 1.0, "drained before the grace"
        await h.expect("replica_down", replica=up["replica"])

    run(redis_url, scenario, request_timeout_s=1.5)


def test_a_removed_model_added_again_before_it_drained_keeps_its_replicas(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("slow", SLOW))
        up, _ = await h.expect("replica_up")
        await h.store.delete("slow")
        await eventually(lambda: "slow/1" in h.tm._retiring, what="the removal to be seen")
        await h.store.put(spec("slow", SLOW))
        await eventually(lambda: "slow/1" not in h.tm._retiring, what="the model to be back")
        await asyncio.sleep(2.0)  # past the grace
        assert [r["id"] for r in h.replicas("slow/1")] == [up["replica"]]
        assert not [m for m in h.inbox if m[0]["t"] in ("replica_draining", "replica_down")]

    run(redis_url, scenario, request_timeout_s=1.0)


def test_model_status_is_written_to_redis(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("echo", ECHO))
        await h.expect("replica_up")
        status = await h.status_eventually("echo", "ready")
        assert (status.ready_replicas, status.desired_replicas, status.reason) == (1, 1, None)

        await h.store.put(spec("broken", "tests.models_for_tests:FailingLoadModel"))
        failed = await h.status_eventually("broken", "failed", timeout=30)
        assert "weights missing" in (failed.reason or ""), failed.reason
        assert (await h.store.status("echo", "1")).state == "ready"  # type: ignore[union-attr]

        await h.delete("broken")
        await h.status_eventually("broken", None)

    run(redis_url, scenario, crash_loop_failures=2)


def test_batch_managers_hear_when_a_model_cannot_start_and_why(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        # The process runtime cannot run an image: every start fails, as a missing image does under Docker.
        await h.store.put(ModelSpec(name="ghost", image="inferoxy/no-such-image:never"))
        failed, _ = await h.expect("model_status", model="ghost", version="1", state="failed")
        assert "could not start" in failed["reason"] and "names only an image" in failed["reason"], failed
        await h.status_eventually("ghost", "failed")

        # A batch manager that connects later hears the state with the reason, not just the (no) replicas.
        late = h.batch_manager()
        await late.send_multipart(wire.encode({"t": "hb"}))
        async with asyncio.timeout(10):
            header = await next_not_heartbeat(late)
        assert (header["t"], header["model"], header["state"]) == ("model_status", "ghost", "failed")
        assert header["reason"] == failed["reason"]
        late.close()

        # Restarts go on without news for the batch managers: the state and its reason stay the same.
        # (Forget what was set aside while waiting for "failed", a "starting" before it say: only news counts.)
        h.inbox.clear()
        restarts = h.tm.status()["ghost/1"]["restarts"]
        await eventually(lambda: h.tm.status()["ghost/1"]["restarts"] > restarts, what="another start")
        with pytest.raises(TimeoutError):
            await h.expect("model_status", timeout=0.5)

    # The fake batch manager beats from the task manager's own event loop: on a loaded machine a stall of that loop
    # past a 1 s silence limit made the task manager forget it and, at its next beat, announce every model again
    # (news to this test, though not a change). 5 s of silence allowed keeps the test about restarts.
    run(redis_url, scenario, heartbeat_liveness=50)


def test_a_gpu_model_gets_one_gpu_per_replica_and_the_rest_is_unschedulable(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("g", ECHO, run_on_gpu=True, min_replicas=3, max_replicas=3))
        for _ in range(2):
            await h.expect("replica_up")
        gpus = sorted(r["gpu"] for r in h.replicas("g/1"))
        assert gpus == ["0", "1"], "never two replicas of one model on one GPU"
        status = await h.status_eventually("g", "degraded", ready_replicas=2)
        assert "no GPU free" in (status.reason or "")
        # Sharing is off: another GPU model has nowhere to go, and says so.
        await h.store.put(spec("h", ECHO, run_on_gpu=True))
        status = await h.status_eventually("h", "unschedulable")
        assert "INFEROXY_GPU_SHARING" in (status.reason or "")
        # A freed GPU is taken by the model that waits for one.
        await h.delete("g")
        await h.expect("replica_up", model="h")
        await h.status_eventually("h", "ready")

    run(redis_url, scenario, gpus="0,1")


def test_cpu_replicas_are_bounded_by_slots(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("a", ECHO))
        await h.expect("replica_up", model="a")
        await h.store.put(spec("b", ECHO))
        status = await h.status_eventually("b", "unschedulable")
        assert "CPU slots" in (status.reason or "")
        assert not h.replicas("b/1")
        await h.delete("a")
        await h.expect("replica_up", model="b")

    run(redis_url, scenario, cpu_slots=1)


def test_a_new_batch_manager_hears_of_every_ready_replica(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("echo", ECHO))
        up, _ = await h.expect("replica_up")

        # A replica the task manager did not start is ignored, even when it says ready.
        intruder = h.ctx.socket(zmq.DEALER)
        intruder.setsockopt(zmq.IDENTITY, b"intruder-0")
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.connect(h.settings.replica_bind_url)
        await intruder.send_multipart(wire.encode({"t": "ready", "replica": "intruder-0", "model": "echo",
                                                   "version": "1", "capacity": 9, "pid": 1}))

        late = h.batch_manager()
        await late.send_multipart(wire.encode({"t": "hb"}))
        async with asyncio.timeout(10):
            header, _ = wire.decode(await late.recv_multipart())
        assert header == {"t": "hb", "epoch": h.tm.epoch}, "first the run it talks to, so it can tell a restart"
        async with asyncio.timeout(10):
            header = await next_not_heartbeat(late)
        # Its share is 0 for now: the first batch manager holds both slots until it echoes the `credit` that
        # halves its share (this fake one never does; test_credit_is_split_between_batch_managers_and_reclaimed).
        assert header == {"t": "replica_up", "replica": up["replica"], "model": "echo", "version": "1",
                          "capacity": 0}
        async with asyncio.timeout(10):
            status = await next_not_heartbeat(late)
        assert status == {"t": "model_status", "model": "echo", "version": "1", "state": "ready", "reason": None}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                extra = await next_not_heartbeat(late)
                raise AssertionError(f"only the replica it started; then {extra}")
        late.close()
        intruder.close()

    run(redis_url, scenario)


def test_credit_is_split_between_batch_managers_and_reclaimed(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("echo", ECHO))
        up, _ = await h.expect("replica_up")
        replica = up["replica"]
        assert up["capacity"] == 2, "alone, a batch manager has the whole replica"

        late = h.batch_manager()
        await late.send_multipart(wire.encode({"t": "hb"}))
        async with asyncio.timeout(10):
            assert (await next_not_heartbeat(late))["capacity"] == 0, "nothing is free for it yet"
            assert (await next_not_heartbeat(late))["t"] == "model_status"
        shrink, _ = await h.expect("credit", timeout=5)
        assert shrink == {"t": "credit", "replica": replica, "capacity": 1}, "two idle ones: half each"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                early = await next_not_heartbeat(late)
                raise AssertionError(f"granted before the first one applied its shrink: {early}")
        await h.bm.send_multipart(wire.encode(shrink))  # applied: everything it sent before is here
        async with asyncio.timeout(5):
            assert await next_not_heartbeat(late) == {"t": "credit", "replica": replica, "capacity": 1}

        # Demand at the late one only: it gets the whole replica, once the first one gave its half back.
        load = {"t": "load", "models": [{"model": "echo", "version": "1", "queued": 5, "in_flight": 1}]}
        await late.send_multipart(wire.encode({"t": "hb"}))  # alive until it stops beating, below
        await late.send_multipart(wire.encode(load))
        to_zero, _ = await h.expect("credit", timeout=5)
        assert to_zero["capacity"] == 0
        await h.bm.send_multipart(wire.encode(to_zero))
        async with asyncio.timeout(5):
            assert await next_not_heartbeat(late) == {"t": "credit", "replica": replica, "capacity": 2}

        # The late one falls silent (it never beats): forgotten, its share comes back to the first one.
        back, _ = await h.expect("credit", timeout=10)
        assert back == {"t": "credit", "replica": replica, "capacity": 2}
        assert len(h.tm.relay.batch_managers) == 1
        late.close()

    run(redis_url, scenario, heartbeat_liveness=20)


def test_a_batch_manager_that_disconnects_is_forgotten_before_the_silence_limit(redis_url: str) -> None:
    # A killed batch manager's connection closes at once; waiting out the silence limit would keep its share of
    # every replica from the one `serve` restarts in its place (a new identity) for that long.
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("echo", ECHO))
        await h.expect("replica_up")
        late = h.batch_manager()
        await late.send_multipart(wire.encode({"t": "hb"}))
        await eventually(lambda: len(h.tm.relay.batch_managers) == 2, timeout=10, what="the second batch manager")
        late.close()
        # The next heartbeat to it finds no connection (well before the 30 s silence limit).
        await eventually(lambda: len(h.tm.relay.batch_managers) == 1, timeout=10, what="the closed one forgotten")
        back, _ = await h.expect("credit", capacity=2, timeout=10)
        assert back["t"] == "credit", "its share came back to the one left"

    run(redis_url, scenario, heartbeat_liveness=300)


async def next_not_heartbeat(sock: zmq.asyncio.Socket) -> dict[str, Any]:
    while True:
        header, _ = wire.decode(await sock.recv_multipart())
        if header["t"] != "hb":
            return header


def test_the_task_manager_beats_to_each_batch_manager_with_its_epoch(redis_url: str) -> None:
    """Without beats from the task manager a batch manager cannot tell it died (or was SIGSTOPped)."""
    async def scenario(h: Harness) -> None:
        first, _ = await h.expect("hb", timeout=5)
        second, _ = await h.expect("hb", timeout=5)
        assert first == second == {"t": "hb", "epoch": h.tm.epoch}
        assert TaskManager(h.settings, h.ctx).epoch != h.tm.epoch, "each run has its own epoch"

    run(redis_url, scenario)


def test_a_silent_batch_manager_is_forgotten_and_gets_no_more_beats(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.expect("hb", timeout=5)
        h._tasks.pop().cancel()  # the fake batch manager stops beating
        await eventually(lambda: not h.tm.relay.batch_managers, timeout=10, what="the batch manager forgotten")

    run(redis_url, scenario, heartbeat_liveness=3)


def test_a_known_batch_manager_that_asks_for_a_resync_hears_every_replica_again(redis_url: str) -> None:
    """A batch manager that gave the task manager up for lost (while the task manager never noticed) has dropped
    its replicas; it asks with `hb` + `resync`, and must hear them again."""
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("echo", ECHO))
        up, _ = await h.expect("replica_up")
        await h.bm.send_multipart(wire.encode({"t": "hb", "resync": True}))
        again, _ = await h.expect("replica_up", replica=up["replica"], timeout=5)
        assert again == up

    run(redis_url, scenario)


def test_model_status_has_an_expiry_that_the_task_manager_keeps_refreshing(redis_url: str) -> None:
    """A status without expiry outlives its task manager, and /ready would say ready for a dead proxy."""
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("echo", ECHO))
        await h.status_eventually("echo", "ready")
        key = h.store.status_key("echo", "1")
        ttl_ms = h.settings.heartbeat_interval_s * h.settings.heartbeat_liveness * 1000
        assert 0 < await h.store.client.pttl(key) <= ttl_ms
        # Time passing is the point here: twice the TTL later, the refreshed record is still there.
        await asyncio.sleep(2 * ttl_ms / 1000)
        assert (await h.store.status("echo", "1")) is not None
        assert 0 < await h.store.client.pttl(key) <= ttl_ms

    run(redis_url, scenario)


def test_shutdown_stops_every_replica(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("echo", ECHO))
        await h.store.put(spec("slow", SLOW, min_replicas=2, max_replicas=2))
        for _ in range(3):
            await h.expect("replica_up")
        await h.store.put(spec("hangs", "tests.models_for_tests:HangingLoadModel"))
        await eventually(lambda: h.replicas("hangs/1"))
        children = descendants(os.getpid())
        assert len(children) >= 4

        await h.stop()
        assert not [pid for pid in children if alive(pid)]
        for name in ("echo", "slow"):
            assert (await h.store.status(name, "1")).state == "stopped"  # type: ignore[union-attr]
        assert not descendants(os.getpid())

    run(redis_url, scenario)


def test_replica_ids_are_safe_names() -> None:
    assert replica_id("inferoxy", "echo", "1", 0, "0a1b2c3d4e5f") == "inferoxy-echo-1-0-0a1b2c3d4e5f"
    assert sanitize("My_Model") != sanitize("my.model")
    assert all(set(sanitize(name)) <= set("abcdefghijklmnopqrstuvwxyz0123456789-") for name in ("A_b", "x.y", "--z"))
    long = replica_id("inferoxy", "m" * 64, "v" * 64, 12, "0a1b2c3d4e5f")
    assert len(long) <= 63 and long.endswith("-12-0a1b2c3d4e5f")
    assert long != replica_id("inferoxy", "m" * 64, "w" * 64, 12, "0a1b2c3d4e5f")


def test_replica_ids_are_unguessable() -> None:
    """Attack: a peer dials the replica port with the next id (`-0`, `-1`, ...) before the real replica does."""
    nonces = {new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000 and all(len(n) == 12 for n in nonces)


def test_backoff_doubles_up_to_its_limit() -> None:
    assert [backoff_delay(n, 0.5, 3.0) for n in range(6)] == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]


def test_long_reasons_keep_how_it_ended_and_the_last_lines() -> None:
    reason = "exited with status 1; last output:\n" + "\n".join(f"line {i}" * 50 for i in range(100))
    clipped = clip_reason(reason)
    assert len(clipped) <= 4000
    assert clipped.startswith("exited with status 1") and clipped.endswith("line 99" * 50)
    assert clip_reason("short") == "short"


def test_warmup_runs_before_the_replica_is_up_and_its_time_is_a_metric(redis_url: str, tmp_path: Path) -> None:
    record = tmp_path / "warmup.txt"
    warmup = [{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "fill": "random"}], "count": 3}]

    async def scenario(h: Harness) -> None:
        before = metrics.registry().get_sample_value("inferoxy_replica_warmup_seconds_count",
                                                     {"model": "warm", "version": "1"}) or 0
        model = spec("warm", "tests.models_for_tests:WarmupRecorderModel", warmup=warmup)
        await h.store.put(model.model_copy(update={"env": {**model.env, "WARMUP_RECORD": str(record)}}))
        await h.expect("replica_up")
        # The replica answers nothing after ready here: every line was written before it was announced.
        assert record.read_text().splitlines() == ["x:float32[2, 3]"] * 3
        await eventually(lambda: metrics.registry().get_sample_value(
            "inferoxy_replica_warmup_seconds_count", {"model": "warm", "version": "1"}) == before + 1,
            what="the warmup time to be observed")

    run(redis_url, scenario)


def test_a_failing_warmup_marks_the_model_failed_with_the_reason(redis_url: str) -> None:
    warmup = [{"inputs": [{"name": "fail", "datatype": "INT32", "shape": [4], "fill": "random"}]}]

    async def scenario(h: Harness) -> None:
        await h.store.put(spec("coldfail", "tests.models_for_tests:RaisingModel", warmup=warmup))
        failed = await h.status_eventually("coldfail", "failed", timeout=30)
        assert "warmup failed" in (failed.reason or "") and "asked to fail" in (failed.reason or ""), failed.reason
        assert not [m for m in h.inbox if m[0]["t"] == "replica_up"]

    run(redis_url, scenario, crash_loop_failures=2)
