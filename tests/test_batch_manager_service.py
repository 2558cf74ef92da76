"""The batch manager as a running component: in-process sockets, a fake task manager and fake bridges.

The registry is a fakeredis TCP server on loopback. Nothing here sleeps to synchronise: every
wait is for a message (with a timeout) or a poll of a condition (with a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from batch_manager.service import BatchManager
from inferoxy import envelope, wire
from inferoxy.settings import Settings
from model_manager.spec import ModelSpec
from model_manager.store import SpecStore
from tests.support import tcp_fakeredis

TIMEOUT = 10.0
_names = itertools.count()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A fakeredis over TCP of this module's own (tests.support.tcp_fakeredis)."""
    with tcp_fakeredis() as url:
        yield url


def run(coro: Awaitable[None]) -> None:
    """Run an async test body, failing it rather than hanging if it never finishes."""
    asyncio.run(asyncio.wait_for(coro, timeout=60))


async def poll(check: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
    return result


class FakeTaskManager:
    """A ROUTER where the task manager would be: announces a replica on demand and echoes batches as results."""

    def __init__(self, ctx: zmq.asyncio.Context, url: str) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(url)
        self.peer: bytes | None = None
        self.heartbeats = 0
        self.answer_heartbeats = True
        self.resyncs = 0
        self.epoch = "e1"
        self.batches: list[dict[str, Any]] = []
        self.hold = False  # keep batches unanswered
        self.held: list[list[Any]] = []
        self.others: list[dict[str, Any]] = []  # every other message
        self.task: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        while True:
            identity, header_frame, *frames = await self.sock.recv_multipart()
            route = None
            if envelope.is_envelope(header_frame):  # a batch: the envelope the task manager routes by, then its header
                route = envelope.unpack(header_frame)
                header_frame, *frames = frames
            header = msgpack.unpackb(header_frame)
            self.peer = identity
            assert (route is not None) == (header["t"] == "batch"), header
            assert route is None or route == (header["replica"], header["batch"]), (route, header)
            if header["t"] == "hb":
                self.heartbeats += 1
                self.resyncs += header.get("resync") is True
                if self.answer_heartbeats:  # a live task manager beats too; a silent one is a lost one
                    await self.sock.send_multipart([identity, msgpack.packb({"t": "hb", "epoch": self.epoch})])
            elif header["t"] == "batch":
                self.batches.append(header)
                if self.hold:
                    self.held.append([header, *frames])
                else:
                    await self.answer(header, frames)
            else:
                self.others.append(header)

    async def answer(self, header: dict[str, Any], frames: list[bytes]) -> None:
        result = {"t": "result", "replica": header["replica"], "batch": header["batch"],
                  "items": [{"n": item["n"]} for item in header["items"]], "tensors": header["tensors"]}
        await self.send(result, frames, route=(header["replica"], header["batch"]))

    async def send(self, header: dict[str, Any], frames: Sequence[Any] = (), *,
                   route: tuple[str, Any] | None = None) -> None:
        """``route``: an answer as the task manager relays it, behind the envelope it was routed by."""
        assert self.peer is not None, "the batch manager has not said hello"
        envelope_frames = [] if route is None else [envelope.pack(*route)]
        await self.sock.send_multipart([self.peer, *envelope_frames, msgpack.packb(header), *frames])

    async def replica_up(self, replica: str = "r1", capacity: int = 2, model: str = "m") -> None:
        await poll(lambda: self.peer, "the batch manager's first heartbeat")
        await self.send({"t": "replica_up", "replica": replica, "model": model, "version": "1", "capacity": capacity})


class Bridge:
    """A DEALER speaking the bridge side of the protocol."""

    def __init__(self, ctx: zmq.asyncio.Context, url: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)

    async def infer(self, request_id: Any, array: np.ndarray, *, model: str = "m", **extra: Any) -> None:
        header = {"t": "infer", "id": request_id, "model": model, "version": None, "timeout_ms": None,
                  "params": {}, **extra}
        await self.sock.send_multipart(wire.encode(header, [("x", array)]))

    async def send_raw(self, frames: list[bytes]) -> None:
        await self.sock.send_multipart(frames)

    async def receive(self) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
        frames = await asyncio.wait_for(self.sock.recv_multipart(), TIMEOUT)
        return wire.decode(frames)

    async def receive_all(self, count: int) -> dict[Any, tuple[dict[str, Any], list[tuple[str, np.ndarray]]]]:
        got = {}
        for _ in range(count):
            header, tensors = await self.receive()
            assert header["id"] not in got, f"second reply for {header['id']}"
            got[header["id"]] = (header, tensors)
        return got


@dataclass
class Running:
    service: BatchManager
    task: asyncio.Task[None]
    task_manager: FakeTaskManager
    ctx: zmq.asyncio.Context
    url: str

    def bridge(self) -> Bridge:
        return Bridge(self.ctx, self.url)


@contextlib.asynccontextmanager
async def running_batch_manager(
    redis_url: str, *, spec: ModelSpec | None = None, **overrides: Any
) -> AsyncIterator[Running]:
    name = f"bmtest{next(_names)}"
    settings = Settings(
        batch_manager_url=f"inproc://{name}-bm",
        task_manager_url=f"inproc://{name}-tm",
        redis_url=redis_url,
        redis_prefix=name,
        # Beats 0.2 s apart: the fake task manager answers from this same loop, and a loaded machine must not make it
        # look silent (the batch manager would drop its replicas).
        **{"heartbeat_interval_s": 0.2, **overrides},
    )
    store = SpecStore.from_url(redis_url, name)
    await store.put(spec or ModelSpec(name="m", model_class="examples.models.echo:Echo", max_batch_size=4,
                                      max_batch_delay_ms=20))
    ctx = zmq.asyncio.Context()
    task_manager = FakeTaskManager(ctx, settings.task_manager_url)
    task_manager.task = asyncio.create_task(task_manager.serve())
    service = BatchManager(settings, ctx)
    ready = asyncio.Event()
    service_task = asyncio.create_task(service.run(ready))
    try:
        await asyncio.wait_for(ready.wait(), TIMEOUT)
        running = Running(service, service_task, task_manager, ctx, settings.batch_manager_url)
        yield running
        assert running.task.cancelled() or not running.task.done(), "the batch manager stopped by itself"
    finally:
        for task in (service_task, task_manager.task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        task_manager.sock.close()
        await store.close()
        ctx.destroy(linger=0)


def test_requests_are_batched_and_answered(redis_url: str) -> None:
    async def body() -> None:
        async with running_batch_manager(redis_url) as running:
            service, task_manager, bridge = running.service, running.task_manager, running.bridge()
            for i in range(8):
                await bridge.infer(i, np.full((1, 3), i, dtype=np.float32))
            # Queue all eight before the replica exists, so how they are batched does not depend on timing.
            await poll(lambda: service.scheduler.queued("m/1") == 8, "eight queued requests")
            await task_manager.replica_up(capacity=2)
            replies = await bridge.receive_all(8)
            for i, (header, tensors) in replies.items():
                assert header == {"t": "reply", "id": i, "model": "m", "version": "1",
                                  "tensors": [{"name": "x", "dtype": "float32", "shape": [1, 3]}]}
                np.testing.assert_array_equal(tensors[0][1], np.full((1, 3), i, dtype=np.float32))
            assert [len(batch["items"]) for batch in task_manager.batches] == [4, 4]
            # Bridges' ids never reach replicas; the batch manager's own item ids do, once each.
            item_ids = [item["id"] for batch in task_manager.batches for item in batch["items"]]
            assert len(set(item_ids)) == 8
            # With credit free, a lone request leaves when its group's delay runs out, not before a tick.
            loop = asyncio.get_running_loop()
            sent_at = loop.time()
            await bridge.infer(100, np.zeros((2, 3), dtype=np.float32), timeout_ms=5000)
            header, tensors = await bridge.receive()
            assert header["id"] == 100 and tensors[0][1].shape == (2, 3)
            assert loop.time() - sent_at >= 0.019
            assert task_manager.heartbeats >= 1
            bridge.sock.close()

    run(body())


def test_malformed_messages_get_bad_input_and_cost_no_one_else_their_reply(redis_url: str) -> None:
    good_meta = {"name": "x", "dtype": "float32", "shape": [1, 3]}
    three_floats = np.zeros(3, dtype=np.float32).tobytes()

    def header(**fields: Any) -> bytes:
        return msgpack.packb({"t": "infer", "model": "m", "version": None, "timeout_ms": None, "params": {},
                              "tensors": [good_meta], **fields})

    garbage: list[tuple[list[bytes], Any, str]] = [
        ([b"\xc1\xff not msgpack"], None, "not valid msgpack"),
        ([msgpack.packb([1, 2, 3])], None, "must be a msgpack map"),
        ([b""], None, "not valid msgpack"),
        ([header(id=1)], 1, "1 tensors but 0 data frames"),
        ([header(id=2), three_floats, three_floats], 2, "1 tensors but 2 data frames"),
        ([header(id=3), b"12345"], 3, "needs 12 bytes, frame has 5"),
        ([msgpack.packb({"t": "infer", "id": 4, "tensors": [good_meta]}), three_floats], 4, "'model'"),
        ([header(id="four"), three_floats], None, "'id' must be an int"),
        ([header(id=5, timeout_ms=-1), three_floats], 5, "timeout_ms"),
        ([header(id=6, tensors=[{"name": "x", "dtype": "object", "shape": [1]}]), b"1234"], 6, "dtype"),
        ([header(id=7, t="explode"), three_floats], 7, "unknown message type"),
        ([header(id=8, tensors=[{"name": "x", "dtype": "float32", "shape": [7]}]), three_floats],
         8, "needs 28 bytes"),
        ([header(id=9, tensors=[{"name": "x", "dtype": "float32", "shape": [5, 3]}]), three_floats * 5], 9,
         "max_batch_size 4"),
        ([header(id=10, model="nope"), three_floats], 10, "no model nope"),
        ([msgpack.packb({"t": "cancel"})], None, "'id' must be an int"),
    ]
    codes = {10: "unknown_model"}

    async def body() -> None:
        async with running_batch_manager(redis_url) as running:
            await running.task_manager.replica_up()
            bad, other = running.bridge(), running.bridge()
            for frames, _, _ in garbage:
                await bad.send_raw(frames)
            await bad.infer(1000, np.ones((1, 3), dtype=np.float32))
            await other.infer(1000, np.full((1, 3), 2, dtype=np.float32))
            for frames, request_id, needle in garbage:
                reply, tensors = await bad.receive()
                assert reply["t"] == "error" and tensors == [], frames
                assert reply["id"] == request_id, (frames, reply)
                assert reply["code"] == codes.get(request_id, "bad_input"), reply
                assert needle in reply["message"], (needle, reply["message"])
            reply, tensors = await bad.receive()
            assert reply["t"] == "reply" and reply["id"] == 1000
            np.testing.assert_array_equal(tensors[0][1], np.ones((1, 3), dtype=np.float32))
            reply, tensors = await other.receive()
            assert reply["t"] == "reply" and reply["id"] == 1000
            np.testing.assert_array_equal(tensors[0][1], np.full((1, 3), 2, dtype=np.float32))
            bad.sock.close()
            other.sock.close()

    run(body())


def test_deadline_replica_loss_and_late_results(redis_url: str) -> None:
    async def body() -> None:
        async with running_batch_manager(redis_url) as running:
            service, task_manager, bridge = running.service, running.task_manager, running.bridge()
            # No replica yet: the timer fires at the request's deadline, with nothing else happening.
            await bridge.infer(1, np.zeros((1, 3), dtype=np.float32), timeout_ms=50)
            reply, _ = await bridge.receive()
            assert (reply["id"], reply["code"]) == (1, "deadline") and "no ready replica" in reply["message"]

            task_manager.hold = True
            await task_manager.replica_up("r9", capacity=1)
            await bridge.infer(2, np.zeros((1, 3), dtype=np.float32))
            await poll(lambda: len(task_manager.held) == 1, "a batch on replica r9")
            # The task manager's garbage is logged and dropped; the batch manager keeps going.
            await task_manager.send({"t": "result", "replica": "r9", "batch": "one", "items": 3})
            await task_manager.send({"t": "mystery"})
            await task_manager.send({"t": "replica_down", "replica": "r9", "reason": "OOM-killed"})
            reply, _ = await bridge.receive()
            assert (reply["id"], reply["code"]) == (2, "replica_lost") and "OOM-killed" in reply["message"]
            # Its result comes too late to count: no second reply (the next reply read must be request 3's).
            header, *frames = task_manager.held.pop()
            await task_manager.answer(header, frames)

            # A result that names its batch but is garbled otherwise fails that batch at once.
            await task_manager.replica_up("r11", capacity=1)
            await bridge.infer(4, np.zeros((1, 3), dtype=np.float32))
            await poll(lambda: len(task_manager.held) == 1, "a batch on replica r11")
            header, *frames = task_manager.held.pop()
            assert header["replica"] == "r11"
            await task_manager.send({"t": "result", "replica": "r11", "batch": header["batch"], "items": [{"n": 1}],
                                     "tensors": [{"name": "y", "dtype": "float32", "shape": [1, 3]}]}, [b"short"])
            reply, _ = await bridge.receive()
            assert (reply["id"], reply["code"]) == (4, "internal") and "malformed result" in reply["message"]
            await task_manager.send({"t": "replica_down", "replica": "r11", "reason": "test over"})
            # So does one whose header the codec refuses but that still names its batch (inferoxy.messages.peek_batch).
            await task_manager.replica_up("r12", capacity=1)
            await bridge.infer(5, np.zeros((1, 3), dtype=np.float32))
            await poll(lambda: len(task_manager.held) == 1, "a batch on replica r12")
            header, *frames = task_manager.held.pop()
            await task_manager.send({"t": "result", "replica": "r12", "batch": header["batch"], "items": [{"n": "1"}]})
            reply, _ = await bridge.receive()
            assert (reply["id"], reply["code"]) == (5, "internal") and "'items[0].n' must be an int" in reply["message"]
            await task_manager.send({"t": "replica_down", "replica": "r12", "reason": "test over"})

            task_manager.hold = False
            await task_manager.replica_up("r10", capacity=1)
            await bridge.infer(3, np.zeros((1, 3), dtype=np.float32))
            reply, _ = await bridge.receive()
            assert (reply["t"], reply["id"]) == ("reply", 3)
            assert service.scheduler.pending() == 0
            bridge.sock.close()

    run(body())


def test_an_answer_behind_its_envelope_settles_its_batch_even_when_its_header_cannot_be_read(redis_url: str) -> None:
    # The task manager relays answers without reading their headers (inferoxy.envelope): an answer whose header
    # is garbage, or names another batch than its envelope, must fail the batch the envelope names, at once.
    async def body() -> None:
        async with running_batch_manager(redis_url) as running:
            task_manager, bridge = running.task_manager, running.bridge()
            task_manager.hold = True
            await task_manager.replica_up("r1", capacity=1)
            for request_id, answer in ((1, [b"\xc1 not msgpack"]), (2, None)):
                await bridge.infer(request_id, np.zeros((1, 3), dtype=np.float32))
                await poll(lambda: len(task_manager.held) == 1, "a batch on replica r1")
                header, *_ = task_manager.held.pop()
                route = (header["replica"], header["batch"])
                if answer is None:  # a well-formed result, for another batch than the one routed
                    answer = [msgpack.packb({"t": "result", "replica": "r1", "batch": header["batch"] + 100,
                                             "items": [{"n": 0}], "tensors": []})]
                assert task_manager.peer is not None
                await task_manager.sock.send_multipart([task_manager.peer, envelope.pack(*route), *answer])
                reply, _ = await bridge.receive()
                assert (reply["id"], reply["code"]) == (request_id, "internal"), reply
                assert "unreadable answer" in reply["message"], reply["message"]
            # The credit came back each time: a third request is sent on.
            await bridge.infer(3, np.zeros((1, 3), dtype=np.float32))
            await poll(lambda: len(task_manager.held) == 1, "a third batch on replica r1")
            bridge.sock.close()

    run(body())


def test_a_model_the_task_manager_cannot_run_is_refused_at_once_with_the_reason(redis_url: str) -> None:
    async def body() -> None:
        async with running_batch_manager(redis_url) as running:
            service, task_manager, bridge = running.service, running.task_manager, running.bridge()
            await bridge.infer(1, np.zeros((1, 3), dtype=np.float32), timeout_ms=60_000)
            await poll(lambda: service.scheduler.queued("m/1") == 1, "a queued request")
            await poll(lambda: task_manager.peer, "the batch manager's first heartbeat")
            # Malformed statuses are logged and dropped (one socket keeps the order: they come before the real one).
            for garbage in ({"model": "m", "version": "1", "state": "exploded", "reason": None},
                            {"model": "m", "version": 1, "state": "failed", "reason": None},
                            {"model": "m", "version": "1", "state": "failed", "reason": 7}):
                await task_manager.send({"t": "model_status", **garbage})
            await task_manager.send({"t": "model_status", "model": "m", "version": "1", "state": "starting",
                                     "reason": None})
            reason = "could not start: image 'ghost' is not on the Docker engine and the pull policy is 'never'"
            await task_manager.send({"t": "model_status", "model": "m", "version": "1", "state": "failed",
                                     "reason": reason})
            reply, _ = await bridge.receive()
            assert (reply["id"], reply["code"]) == (1, "not_ready") and reason in reply["message"]
            await bridge.infer(2, np.zeros((1, 3), dtype=np.float32))
            reply, _ = await bridge.receive()
            assert (reply["id"], reply["code"]) == (2, "not_ready") and reason in reply["message"]

            # A replica that comes up serves again.
            await task_manager.replica_up("r1")
            await poll(lambda: not service.scheduler.refusing("m/1"), "the replica to be known")
            await bridge.infer(3, np.zeros((1, 3), dtype=np.float32))
            reply, _ = await bridge.receive()
            assert (reply["t"], reply["id"]) == ("reply", 3)
            bridge.sock.close()

    run(body())


def test_cancelled_request_gets_no_reply(redis_url: str) -> None:
    async def body() -> None:
        async with running_batch_manager(redis_url) as running:
            service, task_manager, bridge = running.service, running.task_manager, running.bridge()
            await bridge.infer(1, np.zeros((1, 3), dtype=np.float32))
            await bridge.send_raw([msgpack.packb({"t": "cancel", "id": 1})])
            await poll(lambda: service.scheduler.pending() == 0, "the cancel to land")
            await task_manager.replica_up()
            await bridge.infer(2, np.zeros((1, 3), dtype=np.float32))
            reply, _ = await bridge.receive()
            assert reply["id"] == 2
            assert [item["n"] for batch in task_manager.batches for item in batch["items"]] == [1]
            bridge.sock.close()

    run(body())


def test_stopping_answers_every_request_still_held(redis_url: str) -> None:
    async def body() -> None:
        async with running_batch_manager(redis_url) as running:
            bridge = running.bridge()
            await bridge.infer(1, np.zeros((1, 3), dtype=np.float32))
            await poll(lambda: running.service.scheduler.pending() == 1, "the request to be queued")
            running.task.cancel()
            reply, _ = await bridge.receive()
            assert (reply["id"], reply["code"]) == (1, "not_ready") and "stopping" in reply["message"]
            bridge.sock.close()

    run(body())


def test_draining_replica_gets_no_new_batch_but_its_results_still_count(redis_url: str) -> None:
    async def body() -> None:
        async with running_batch_manager(redis_url) as running:
            task_manager, bridge = running.task_manager, running.bridge()
            task_manager.hold = True
            await task_manager.replica_up("r1", capacity=2)
            await bridge.infer(1, np.zeros((4, 3), dtype=np.float32))
            await poll(lambda: len(task_manager.held) == 1, "a batch on r1")
            await task_manager.send({"t": "replica_draining", "replica": "r1", "reason": "rolling update"})
            await poll(lambda: running.service.scheduler.is_draining("r1"), "the drain to land")
            await bridge.infer(2, np.zeros((4, 3), dtype=np.float32))
            await task_manager.replica_up("r2", capacity=2)
            await poll(lambda: len(task_manager.held) == 2, "request 2's batch")
            assert task_manager.held[1][0]["replica"] == "r2", "a draining replica got a new batch"
            for header, *frames in list(task_manager.held):
                await task_manager.answer(header, frames)
            got = await bridge.receive_all(2)
            assert all(header["t"] == "reply" for header, _ in got.values())
            bridge.sock.close()

    run(body())


def test_credit_moves_its_share_and_is_echoed_once_applied(redis_url: str) -> None:
    # Several batch managers share a replica: the task manager grows one's share only once the other's echo says
    # every batch it sent under its old share has arrived.
    async def body() -> None:
        async with running_batch_manager(redis_url) as running:
            task_manager, bridge = running.task_manager, running.bridge()
            task_manager.hold = True
            await task_manager.replica_up("r1", capacity=0)
            await bridge.infer(1, np.zeros((4, 3), dtype=np.float32))
            # With no share anywhere it reports its load at once: that is what gets it one.
            report = await poll(lambda: [h for h in task_manager.others if h["t"] == "load"], "a load report")
            assert report[0]["models"] == [{"model": "m", "version": "1", "queued": 1, "in_flight": 0}]
            assert task_manager.batches == []
            await task_manager.send({"t": "credit", "replica": "r1", "capacity": 1})
            await poll(lambda: len(task_manager.held) == 1, "the batch its share lets go")
            assert {"t": "credit", "replica": "r1", "capacity": 1} in task_manager.others, "echoed"
            await bridge.infer(2, np.zeros((4, 3), dtype=np.float32))
            await task_manager.send({"t": "credit", "replica": "r1", "capacity": 0})
            await poll(lambda: task_manager.others.count({"t": "credit", "replica": "r1", "capacity": 0}), "echo")
            for header, *frames in list(task_manager.held):
                await task_manager.answer(header, frames)
            assert (await bridge.receive())[0]["id"] == 1
            assert len(task_manager.batches) == 1, "no share: request 2 waits"
            await task_manager.send({"t": "credit", "replica": "r1", "capacity": 2})
            await poll(lambda: len(task_manager.batches) == 2, "request 2's batch once it has a share again")
            bridge.sock.close()

    run(body())


def test_a_repeated_replica_up_still_sets_our_share(redis_url: str) -> None:
    # A task manager that forgot this batch manager (silent for a while, yet it kept the replicas) splits the
    # replicas afresh and says so in the replica_ups it repeats: the repeat must not keep the old share.
    async def body() -> None:
        async with running_batch_manager(redis_url) as running:
            task_manager, bridge = running.task_manager, running.bridge()
            task_manager.hold = True
            await task_manager.replica_up("r1", capacity=2)
            await poll(lambda: "r1" in running.service._tm_replicas, "r1 up")
            await task_manager.replica_up("r1", capacity=1)
            await poll(lambda: running.service.scheduler.credit("r1") == 1, "the repeat's share applied")
            for i in range(2):
                await bridge.infer(i, np.zeros((4, 3), dtype=np.float32))
            await poll(lambda: len(task_manager.held) == 1 and running.service.scheduler.queued("m/1") == 1,
                       "one batch out, one request waiting for room")
            bridge.sock.close()

    run(body())


def test_request_parameters_are_read_and_bad_ones_refused(redis_url: str) -> None:
    async def body() -> None:
        async with running_batch_manager(redis_url) as running:
            task_manager, bridge = running.task_manager, running.bridge()
            await bridge.infer(1, np.zeros((1, 3), dtype=np.float32), params={"priority": "urgent"})
            reply, _ = await bridge.receive()
            assert (reply["id"], reply["code"]) == (1, "bad_input") and "priority" in reply["message"]
            await bridge.infer(2, np.zeros((1, 3), dtype=np.float32), params={"sequence_id": 5, "sequence_start": 1})
            reply, _ = await bridge.receive()
            assert (reply["id"], reply["code"]) == (2, "bad_input") and "sequence_start" in reply["message"]
            await task_manager.replica_up()
            await bridge.infer(3, np.zeros((1, 3), dtype=np.float32), params={"priority": 1, "timeout": 5_000_000})
            reply, _ = await bridge.receive()
            assert (reply["t"], reply["id"]) == ("reply", 3)
            bridge.sock.close()

    run(body())


def test_a_removed_model_serves_what_it_queued_then_says_model_drained(redis_url: str) -> None:
    async def body() -> None:
        async with running_batch_manager(redis_url) as running:
            task_manager, bridge = running.task_manager, running.bridge()
            task_manager.hold = True
            await task_manager.replica_up("r1", capacity=1)
            await bridge.infer(1, np.zeros((4, 3), dtype=np.float32))
            await poll(lambda: len(task_manager.held) == 1, "a batch on r1")
            await bridge.infer(2, np.zeros((1, 3), dtype=np.float32))  # queued: r1 has no credit left
            await poll(lambda: running.service.scheduler.queued("m/1") == 1, "request 2 queued")
            store = SpecStore.from_url(redis_url, running.service.settings.redis_prefix)
            await store.delete("m")
            await store.close()
            scheduler = running.service.scheduler
            await poll(lambda: scheduler.registry is not None and "m/1" not in scheduler.registry.specs,
                       "the removal to land")
            await bridge.infer(3, np.zeros((1, 3), dtype=np.float32))
            header, _ = await bridge.receive()
            assert (header["id"], header["code"]) == (3, "unknown_model")
            task_manager.hold = False
            await task_manager.answer(task_manager.held[0][0], task_manager.held[0][1:])
            got = await bridge.receive_all(2)
            assert all(header["t"] == "reply" for header, _ in got.values()), got
            drained = await poll(lambda: [m for m in task_manager.others if m["t"] == "model_drained"], "model_drained")
            assert drained == [{"t": "model_drained", "model": "m", "version": "1"}]
            bridge.sock.close()

    run(body())


# --- liveness: heartbeats on the bridge and task manager links (issue 9, item 3) ---------------------------


def test_a_bridge_heartbeat_is_answered(redis_url: str) -> None:
    """A bridge's `hb` must be answered with `hb` (it judges the batch manager alive by that), not refused as bad
    input."""
    async def body() -> None:
        async with running_batch_manager(redis_url) as running:
            bridge = running.bridge()
            await bridge.send_raw([msgpack.packb({"t": "hb"})])
            header, tensors = await bridge.receive()
            assert header == {"t": "hb", "epoch": running.service.epoch} and tensors == []
            bridge.sock.close()

    run(body())


def test_a_silent_task_manager_fails_what_its_replicas_held_and_they_come_back_with_it(redis_url: str) -> None:
    """The task manager stops beating (killed or SIGSTOPped): the batches its replicas held fail replica_lost
    within the heartbeat limit, not at the request's deadline, and its replicas are forgotten until it
    announces them again; then requests are served."""
    async def body() -> None:
        async with running_batch_manager(redis_url, request_timeout_s=60.0) as running:
            service, task_manager, bridge = running.service, running.task_manager, running.bridge()
            task_manager.hold = True
            await task_manager.replica_up("r1", capacity=1)
            await bridge.infer(1, np.zeros((1, 3), dtype=np.float32))
            await poll(lambda: len(task_manager.held) == 1, "a batch on r1")

            task_manager.answer_heartbeats = False
            reply, _ = await bridge.receive()
            assert (reply["id"], reply["code"]) == (1, "replica_lost") and "silent" in reply["message"]
            # r1 is forgotten: a new request waits for a replica instead of going to the lost one.
            await bridge.infer(2, np.zeros((1, 3), dtype=np.float32))
            await poll(lambda: service.scheduler.queued("m/1") == 1, "request 2 queued")
            assert len(task_manager.batches) == 1

            # It comes back (restarted: a new epoch) and announces its replica again.
            task_manager.hold, task_manager.held = False, []
            task_manager.epoch = "e2"
            task_manager.answer_heartbeats = True
            # A real task manager's first message to a batch manager is its hb; the fake's replica_up waits for it.
            await poll(lambda: task_manager.resyncs >= 1, "the batch manager to hear it again")
            await task_manager.replica_up("r1", capacity=1)
            reply, _ = await bridge.receive()
            assert (reply["id"], reply["t"]) == (2, "reply")
            bridge.sock.close()

    run(body())


def test_a_restarted_task_manager_is_recognised_by_its_epoch(redis_url: str) -> None:
    """A task manager that restarts faster than the heartbeat limit never goes silent; its new epoch must still
    fail what the old run's replicas held, at once."""
    async def body() -> None:
        async with running_batch_manager(redis_url, request_timeout_s=60.0, heartbeat_interval_s=0.5) as running:
            task_manager, bridge = running.task_manager, running.bridge()
            task_manager.hold = True
            await task_manager.replica_up("r1", capacity=1)
            await bridge.infer(1, np.zeros((1, 3), dtype=np.float32))
            await poll(lambda: len(task_manager.held) == 1, "a batch on r1")
            await task_manager.send({"t": "hb", "epoch": "a-new-run"})
            reply, _ = await bridge.receive()
            assert (reply["id"], reply["code"]) == (1, "replica_lost") and "restarted" in reply["message"]
            bridge.sock.close()

    run(body())


def test_a_task_manager_heard_again_is_asked_to_resync_and_a_repeated_announcement_costs_nothing(
        redis_url: str) -> None:
    """The batch manager gave up on a task manager that never noticed (the batch manager itself was frozen, or
    the task manager was, briefly): unasked, that task manager would never announce its replicas again. And its
    answer repeats replica_up for replicas the batch manager may hold batches at: taken as a new incarnation, that
    would fail them."""
    async def body() -> None:
        async with running_batch_manager(redis_url, request_timeout_s=60.0) as running:
            task_manager, bridge = running.task_manager, running.bridge()
            await task_manager.replica_up("r1", capacity=1)
            await poll(lambda: "r1" in running.service._tm_replicas, "r1 up")
            task_manager.answer_heartbeats = False
            await poll(lambda: "r1" not in running.service._tm_replicas,
                       "r1 dropped with the silent task manager")
            task_manager.answer_heartbeats = True
            await poll(lambda: task_manager.resyncs >= 1, "an hb asking for a resync")

            await task_manager.replica_up("r1", capacity=1)  # the resync's answer
            task_manager.hold = True
            await bridge.infer(1, np.zeros((1, 3), dtype=np.float32))
            await poll(lambda: len(task_manager.held) == 1, "a batch on r1")
            await task_manager.replica_up("r1", capacity=1)  # announced once more (another resync)
            header, *frames = task_manager.held.pop()
            await task_manager.answer(header, frames)
            reply, _ = await bridge.receive()
            assert (reply["id"], reply["t"]) == (1, "reply"), reply
            bridge.sock.close()

    run(body())
