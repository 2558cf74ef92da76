"""The task manager when a replica dies, hangs, or a batch cannot be read (issue 9): nothing is dropped
silently, and a batch manager always hears that a replica is dead before it hears about its batches."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import msgspec
import numpy as np
import zmq.asyncio

from inferoxy import envelope, wire
from inferoxy.messages import Message
from inferoxy.settings import Settings
from task_manager.replicas import ModelGroup, Replica, ReplicaState
from task_manager.service import TaskManager
from tests.support import alive
from tests.test_task_manager import ECHO, SLOW, Harness, decode_answer, eventually, redis_url, run, spec

__all__ = ["redis_url"]  # the fixture, shared with tests/test_task_manager.py



def as_dict(message: Any) -> dict[str, Any]:
    """What the relay sends a batch manager, as the map a peer reads: a struct, or frames already packed."""
    return msgspec.to_builtins(message) if isinstance(message, Message) else wire.unpack_header(message[0])

def test_a_killed_replica_is_reported_down_before_any_of_its_batches_fails(redis_url: str) -> None:
    # The failure: `failed` came first, so the batch manager gave the dead replica its credit back and sent
    # the retry (and queued requests) to it.
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("slow", SLOW))
        up, _ = await h.expect("replica_up")
        victim = h.pid_of("slow/1", up["replica"])
        for batch in (1, 2):
            await h.send_batch(up["replica"], batch, [("sleep_s", np.array([30.0], np.float32))])
        await eventually(lambda: h.replicas("slow/1")[0]["in_flight"] == 2)

        os.kill(victim, signal.SIGKILL)
        order: list[str] = []
        while len(order) < 3:
            header, _ = decode_answer(await h.bm.recv_multipart())
            if header.get("replica") == up["replica"] and header["t"] in ("replica_down", "failed"):
                order.append(header["t"])
        assert order == ["replica_down", "failed", "failed"], order

    run(redis_url, scenario)


def test_a_batch_whose_header_passes_the_bus_limit_is_answered_failed_and_credit_is_kept(redis_url: str) -> None:
    # The failure: the task manager could not read the header (over 1 MiB), dropped the batch with a warning,
    # and the batch manager's credit for the replica never came back.
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("echo", ECHO))
        up, _ = await h.expect("replica_up")
        header = {"t": "batch", "replica": up["replica"], "batch": 5, "model": "echo", "version": "1",
                  "items": [{"id": 5, "n": 0, "pad": "x" * (wire.MAX_HEADER_BYTES + 10)}], "tensors": []}
        await h.bm.send_multipart([envelope.pack(up["replica"], 5), wire.pack_header(header)])
        failed, _ = await h.expect("failed", batch=5, timeout=5)
        assert (failed["replica"], failed["code"]) == (up["replica"], "internal")
        assert str(wire.MAX_HEADER_BYTES) in failed["message"], failed["message"]

        x = np.ones((1, 2), np.float32)
        await h.send_batch(up["replica"], 6, [("x", x)])
        await h.expect("result", batch=6)

    run(redis_url, scenario)


def test_a_replica_that_holds_a_batch_past_the_request_timeout_is_replaced_and_readiness_names_it(
        redis_url: str) -> None:
    # The failure: a replica whose predict hangs keeps heartbeating, so it held its credit for ever while
    # readiness said ready.
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("slow", SLOW))
        up, _ = await h.expect("replica_up")
        stuck = h.pid_of("slow/1", up["replica"])
        await h.send_batch(up["replica"], 1, [("sleep_s", np.array([3600.0], np.float32))])

        down, _ = await h.expect("replica_down", replica=up["replica"])
        assert "without answering" in down["reason"], down["reason"]

        async def named_in_redis() -> bool:  # what /ready and GET /v2/models/{name} read
            status = await h.store.status("slow", "1")
            return status is not None and up["replica"] in (status.reason or "")

        async with asyncio.timeout(10):
            while not await named_in_redis():  # noqa: ASYNC110 (a Redis record has no event to wait on)
                await asyncio.sleep(0.02)
        lost, _ = await h.expect("failed", batch=1)
        assert lost["code"] == "replica_lost"
        status, _ = await h.expect("model_status", model="slow", state="starting")
        while status["reason"] is None:  # the one from before the first replica was ready
            status, _ = await h.expect("model_status", model="slow", state="starting")
        assert up["replica"] in status["reason"] and "without answering" in status["reason"], status
        again, _ = await h.expect("replica_up")
        assert again["replica"] != up["replica"]
        await eventually(lambda: not alive(stuck), what="the stuck replica to be killed")

    run(redis_url, scenario, request_timeout_s=1.0)


def test_a_model_with_no_replica_wanted_is_stopped_with_a_reason(redis_url: str) -> None:
    # The failure: `stopped` came with no reason, so batch managers could not say why they refuse.
    async def scenario(h: Harness) -> None:
        # max_replicas 0 is what no replica may run means (unload); min_replicas 0 alone scales to zero (`idle`).
        await h.store.put(spec("idle", ECHO, min_replicas=0, max_replicas=0))
        status, _ = await h.expect("model_status", model="idle", state="stopped")
        assert "max_replicas is 0" in status["reason"], status

    run(redis_url, scenario)


def test_a_replica_a_batch_cannot_reach_is_announced_down_then_the_batch_fails() -> None:
    # The failure: the task manager answered `replica_lost` for a replica it kept as ready (not connected at
    # that moment); batch managers stop using a replica that lost a batch, so it would have sat unused.
    async def main() -> None:
        tm = TaskManager(Settings(), zmq.asyncio.Context.instance())
        told: list[dict[str, Any]] = []
        tm.relay.send_batch_manager = lambda _identity, message: told.append(  # type: ignore[method-assign]
            as_dict(message))
        tm.relay.send_replica = lambda _replica, _frames: False  # type: ignore[method-assign]
        model = spec("echo", ECHO)
        group = ModelGroup(model)
        replica = Replica("r-0", model, group, started_at=0.0, state=ReplicaState.READY, capacity=2, announced=True)
        group.replicas[replica.id] = replica
        tm._groups[model.key] = group
        tm._replicas[replica.identity] = replica
        tm.relay.batch_managers[b"bm"] = 0.0

        tm.relay.forward_batch(b"bm", [b"bm", envelope.pack("r-0", 9), b"header"])
        assert [(m["t"], m.get("batch")) for m in told] == [("replica_down", None), ("failed", 9)]
        assert told[1]["code"] == "replica_lost"
        assert replica.state is ReplicaState.STOPPING and replica.stop_requested.is_set()
        assert "r-0" in (group.serving_state()[1] or "")

    asyncio.run(main())


def test_a_stopped_model_with_a_replica_starting_is_starting_so_requests_wait() -> None:
    # The hook for an autoscaler that starts a replica on demand: batch managers refuse a `stopped` model's
    # requests at once, but must keep them while a replica is on its way.
    model = spec("idle", ECHO, min_replicas=0)
    group = ModelGroup(model)
    state, reason = group.serving_state()
    assert state == "idle" and "scaled to zero" in (reason or "")
    group.replicas["r-0"] = Replica("r-0", model, group, started_at=0.0)  # starting
    assert group.serving_state()[0] == "starting"
    unloaded = ModelGroup(spec("off", ECHO, min_replicas=0, max_replicas=0))
    state, reason = unloaded.serving_state()
    assert state == "stopped" and "max_replicas is 0" in (reason or "")


def test_an_answer_the_task_manager_cannot_read_fails_its_batch() -> None:
    # The failure: a replica's answer with a header over the bus's limit was dropped with a warning, so the
    # batch's requests waited for their deadline and the batch manager never got the replica's credit back.
    async def main() -> None:
        tm = TaskManager(Settings(), zmq.asyncio.Context.instance())
        told: list[tuple[bytes, dict[str, Any]]] = []
        tm.relay.send_batch_manager = lambda identity, message: told.append(  # type: ignore[method-assign]
            (identity, as_dict(message)))
        model = spec("echo", ECHO)
        group = ModelGroup(model)
        replica = Replica("r-0", model, group, started_at=0.0, state=ReplicaState.READY, capacity=2, announced=True)
        replica.in_flight[4] = b"bm"
        tm._replicas[replica.identity] = replica

        huge = {"t": "result", "replica": "r-0", "batch": 4, "items": [{"n": 0, "pad": "x" * wire.MAX_HEADER_BYTES}]}
        tm.relay.on_replica_message([zmq.Frame(b"r-0"), zmq.Frame(envelope.pack("r-0", 4)),
                                     zmq.Frame(wire.pack_header(huge))])
        [(identity, failed)] = told
        assert identity == b"bm" and (failed["t"], failed["batch"], failed["code"]) == ("failed", 4, "internal")
        assert replica.in_flight == {}

    asyncio.run(main())


def test_a_status_change_made_while_the_last_one_is_written_is_written_too() -> None:
    # The failure (a flaky GPU test in CI): the flush dropped a model's dirty mark after each write whenever the
    # mark still pointed at the same group, which it always does, so a change made while a write was in flight
    # was lost; the TTL refresh then kept rewriting the stale record (1 of 2 replicas ready) for ever.
    group = ModelGroup(spec=spec("g", ECHO))
    written: list[str] = []

    class SlowStore:
        async def put_status(self, status: Any, ttl_s: float | None) -> None:
            await asyncio.sleep(0)  # the write is in flight: other handlers run
            written.append(status.state)
            if len(written) == 1:
                group.failed_reason = "weights missing"  # the model's state changes meanwhile...
                manager.statuses.mark(group)  # ...and is marked to write, as _status_changed does

    async def scenario() -> None:
        manager.statuses.mark(group)
        await manager.statuses.flush(SlowStore())  # type: ignore[arg-type]

    manager = TaskManager(Settings(models_file=""), zmq.asyncio.Context())
    asyncio.run(scenario())
    assert written == ["starting", "failed"], written
    assert manager.statuses.live[group.spec.key].state == "failed", "the record the TTL refresh rewrites"


def test_a_batch_without_its_routing_envelope_is_answered_failed_not_dropped() -> None:
    # The task manager routes by the envelope alone; a batch that comes without one (a batch manager of another
    # version) still names its batch in the header, and its requests must hear now rather than at their deadline.
    tm = TaskManager(Settings(), zmq.asyncio.Context.instance())
    told: list[tuple[bytes, dict[str, Any]]] = []
    tm.relay.send_batch_manager = lambda identity, message: told.append(  # type: ignore[method-assign]
        (identity, as_dict(message)))
    tm.relay.batch_managers[b"bm"] = 0.0
    bare = {"t": "batch", "replica": "r-0", "batch": 3, "items": [], "tensors": []}
    tm.relay.on_batch_manager_message([zmq.Frame(b"bm"), zmq.Frame(wire.pack_header(bare))])
    [(identity, failed)] = told
    assert identity == b"bm" and (failed["t"], failed["replica"], failed["batch"], failed["code"]) == (
        "failed", "r-0", 3, "internal")
    assert "envelope" in failed["message"]


def test_a_replica_cannot_settle_a_batch_it_does_not_hold() -> None:
    # The task manager relays answers by their envelope alone, so the envelope is what it checks: it must name
    # the replica on that connection and a batch that replica holds, or the answer goes nowhere.
    tm = TaskManager(Settings(), zmq.asyncio.Context.instance())
    relayed: list[list[Any]] = []
    tm.relay._send = lambda _sock, frames: relayed.append(frames) or True  # type: ignore[method-assign]
    model = spec("echo", ECHO)
    group = ModelGroup(model)
    mine = Replica("r-0", model, group, started_at=0.0, state=ReplicaState.READY, capacity=2)
    other = Replica("r-1", model, group, started_at=0.0, state=ReplicaState.READY, capacity=2)
    mine.in_flight[4] = b"bm"
    other.in_flight[5] = b"bm"
    tm._replicas.update({mine.identity: mine, other.identity: other})
    answer = wire.pack_header({"t": "result", "replica": "r-1", "batch": 5, "items": [], "tensors": []})

    tm.relay.on_replica_message([zmq.Frame(b"r-0"), zmq.Frame(envelope.pack("r-1", 5)), zmq.Frame(answer)])
    tm.relay.on_replica_message([zmq.Frame(b"r-0"), zmq.Frame(envelope.pack("r-0", 5)), zmq.Frame(answer)])
    assert relayed == [] and other.in_flight == {5: b"bm"} and mine.in_flight == {4: b"bm"}

    tm.relay.on_replica_message([zmq.Frame(b"r-1"), zmq.Frame(envelope.pack("r-1", 5)), zmq.Frame(answer)])
    [frames] = relayed
    assert frames[0] == b"bm" and envelope.unpack(frames[1]) == ("r-1", 5) and other.in_flight == {}
