"""CURVE on the internal bus (inferoxy/curve.py): the ZAP handler's answers, the keys, and a task manager
that admits a replica only over the connection holding the key it issued to that replica."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio
import zmq.utils.monitor
from zmq.utils import z85

from inferoxy import curve, wire
from inferoxy.client import Client
from inferoxy.settings import Settings
from model_manager.service import EmbeddedRedis
from tests.support import ProxyProcess
from tests.test_task_manager import ECHO, Harness, eventually, spec

SECRET = "a bus secret for the tests"
HANG = "tests.models_for_tests:HangingLoadModel"
REFUSED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED)
WAIT_S = 20.0


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """The embedded Redis, behind its password, as `serve` runs it."""
    embedded = EmbeddedRedis(0, "a redis password for the tests")
    embedded.start()
    yield embedded.url
    embedded.stop()


# --- the pure parts ---------------------------------------------------------------------------------


def test_keys_derive_from_the_secret_and_differ_by_name() -> None:
    first = curve.derive(SECRET, curve.BATCH_MANAGER)
    assert first == curve.derive(SECRET, curve.BATCH_MANAGER)  # every component computes the same
    assert first.public == zmq.curve_public(first.secret) and len(first.public) == 40
    assert first != curve.derive(SECRET, curve.TASK_MANAGER)
    assert first != curve.derive(SECRET + "x", curve.BATCH_MANAGER)


def test_inproc_links_and_a_plain_bus_get_no_curve() -> None:
    assert curve.server_for(SECRET, curve.BATCH_MANAGER, "inproc://bm") is None
    assert curve.client_for(SECRET, curve.BATCH_MANAGER, "inproc://bm") is None
    assert curve.server_for(None, curve.BATCH_MANAGER, "tcp://127.0.0.1:1") is None
    assert curve.server_for(SECRET, curve.BATCH_MANAGER, "ipc:///tmp/bm") is not None
    assert Settings(bus_secret=SECRET, bus_curve=False).bus_key_secret is None
    assert Settings(bus_secret=SECRET).bus_key_secret == SECRET


def test_the_zap_handler_admits_only_known_curve_keys_on_known_domains() -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        handler = curve.zap_handler(ctx)
        known = zmq.curve_keypair()[0]
        handler.set_check("d", lambda public: z85.encode(public) == known)

        def ask(domain: bytes, mechanism: bytes, *credentials: bytes) -> bytes:
            return handler.answer([b"1.0", b"7", domain, b"127.0.0.1", b"", mechanism, *credentials])[2]

        assert ask(b"d", b"CURVE", z85.decode(known)) == b"200"
        assert ask(b"d", b"CURVE", z85.decode(zmq.curve_keypair()[0])) == b"400"  # unknown key
        assert ask(b"other", b"CURVE", z85.decode(known)) == b"400"  # unknown domain
        assert ask(b"d", b"NULL") == b"400"  # no key at all
        assert ask(b"d", b"PLAIN", b"user", b"password") == b"400"
        assert handler.answer([b"1.0"])[2] == b"500"  # a malformed request is refused, not a crash

        def broken(public: bytes) -> bool:
            raise RuntimeError("bug")

        handler.set_check("broken", broken)
        assert ask(b"broken", b"CURVE", z85.decode(known)) == b"400"
        assert handler.is_alive()
    finally:
        ctx.destroy(linger=0)  # ends the handler's thread: must not hang
    handler.join(timeout=5)
    assert not handler.is_alive() and ctx.underlying not in curve._handlers  # a new context gets a new one


# --- a task manager on an authenticated bus ------------------------------------------------------------


class KeyedHarness(Harness):
    """The task manager harness, its fake batch manager holding the components' client key."""

    def batch_manager(self) -> zmq.asyncio.Socket:
        url = self.settings.task_manager_url
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        curve.apply(sock, None, curve.client_for(SECRET, curve.TASK_MANAGER, url))
        sock.connect(url)
        return sock


async def dial(url: str, frames: list[bytes], identity: str, keys: tuple[bytes, bytes, bytes] | None = None
               ) -> tuple[zmq.Socket[Any], int]:
    """Dial ``url`` as ``identity``, send ``frames``; the socket and the first handshake event."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    if keys is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys
    monitor: zmq.Socket[Any] = sock.get_monitor_socket(REFUSED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(url)
        sock.send_multipart(frames)
        ready = await asyncio.to_thread(monitor.poll, int(WAIT_S * 1000))
        assert ready, "the handshake neither failed nor succeeded"
        event = int(zmq.utils.monitor.recv_monitor_message(monitor)["event"])
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
    return sock, event


def ready_message(replica: str) -> list[bytes]:
    return [wire.pack_header({"t": "ready", "replica": replica, "model": "hang", "version": "1",
                              "capacity": 8, "pid": 1})]


def test_a_starting_replicas_id_cannot_be_taken_without_its_own_key(redis_url: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Attack: while a replica is loading, dial the replica port with its id and say `ready` first,
    (a) with no keys, (b) with a CURVE key of one's own, (c) with the key issued to another replica."""

    async def scenario(h: Harness) -> None:
        await h.store.put(spec("hang", HANG))
        await eventually(lambda: h.replicas("hang/1"), what="the replica to be starting")
        [starting] = h.replicas("hang/1")
        victim = starting["id"]
        url = h.settings.replica_bind_url
        server_public = curve.derive(SECRET, curve.REPLICA_PORT).public

        plain, event = await dial(url, ready_message(victim), victim)
        assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED and plain.poll(0) == 0
        plain.close()
        # The operator hears of it, with the usual cause (a model image too old to speak CURVE).
        await eventually(lambda: "without the bus keys" in caplog.text, what="the refusal to be logged")
        assert "rebuild it FROM the current inferoxy/model-base" in caplog.text
        own, event = await dial(url, ready_message(victim), victim, (server_public, *zmq.curve_keypair()))
        assert event == zmq.EVENT_HANDSHAKE_FAILED_AUTH and own.poll(0) == 0
        own.close()

        assert h.tm._replica_keys is not None
        stolen = h.tm._replica_keys.issue("another-replica")  # as if another replica's model code were hostile
        seen_before = h.tm._replicas[victim.encode()].last_seen
        keys = (server_public, stolen["INFEROXY_BUS_PUBLIC_KEY"].encode(),
                stolen["INFEROXY_BUS_SECRET_KEY"].encode())
        other, event = await dial(url, ready_message(victim), victim, keys)
        assert event == zmq.EVENT_HANDSHAKE_SUCCEEDED  # its key is a valid one, for another replica
        await eventually(lambda: h.tm._replicas[victim.encode()].last_seen > seen_before,
                         what="the task manager to read the false `ready`")
        assert [r["state"] for r in h.replicas("hang/1")] == ["starting"]
        assert not any(header["t"] == "replica_up" for header, _ in h.inbox)
        other.close()

        # A replica started the proper way still comes up and serves on the same bus.
        await h.store.put(spec("echo", ECHO))
        up, _ = await h.expect("replica_up", model="echo")
        x = np.arange(6, dtype=np.float32)
        await h.send_batch(up["replica"], 1, [("x", x)])
        _, tensors = await h.expect("result", batch=1)
        np.testing.assert_array_equal(dict(tensors)["x"], x)

    async def main() -> None:
        async with KeyedHarness(redis_url, bus_secret=SECRET) as harness:
            await scenario(harness)

    asyncio.run(main())


def test_a_replica_key_is_revoked_when_its_replica_ends(redis_url: str) -> None:
    async def scenario(h: Harness) -> None:
        await h.store.put(spec("echo", ECHO))
        up, _ = await h.expect("replica_up", model="echo")
        keys = h.tm._replica_keys
        assert keys is not None and keys.issued_to(up["replica"], keys._by_replica[up["replica"]].public.decode())
        public = keys._by_replica[up["replica"]].public
        await h.delete("echo")
        await h.expect("replica_down", replica=up["replica"])
        await eventually(lambda: not keys.admits(z85.decode(public)), what="the key to be revoked")

    async def main() -> None:
        async with KeyedHarness(redis_url, bus_secret=SECRET) as harness:
            await scenario(harness)

    asyncio.run(main())


def test_a_local_replica_on_a_private_ipc_link_serves_without_curve_and_its_id_cannot_be_taken(
        redis_url: str) -> None:
    """With the replica link on ipc:// in a 0700 directory (what `serve` gives process replicas), the ROUTER
    identity the replica sets is all that names it: a second connection with a live replica's id must get none
    of its batches (no ROUTER_HANDOVER), and the relay's envelope check keeps working on that identity."""
    directory = Path(tempfile.mkdtemp(prefix="ixr", dir="/tmp"))  # short: a socket path holds 107 bytes

    async def scenario(h: Harness) -> None:
        assert h.tm._replica_keys is None  # nothing to issue: no CURVE on this link
        await h.store.put(spec("echo", ECHO))
        up, _ = await h.expect("replica_up", model="echo")
        intruder, _ = await dial(h.settings.replica_bind_url, ready_message(up["replica"]), up["replica"])
        for batch in (1, 2):
            x = np.arange(batch * 4, dtype=np.float32)
            await h.send_batch(up["replica"], batch, [("x", x)])
            _, tensors = await h.expect("result", batch=batch)
            np.testing.assert_array_equal(dict(tensors)["x"], x)
        assert intruder.poll(200) == 0, "a batch reached the second connection that named itself the replica"
        intruder.close()

    async def main() -> None:
        async with KeyedHarness(redis_url, bus_secret=SECRET,
                                replica_bind_url=f"ipc://{directory}/replicas") as harness:
            await scenario(harness)

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("bus", ["tcp", "inproc"])
def test_serve_in_process_answers_over_an_authenticated_or_inproc_bus(bus: str) -> None:
    """One process, one ZeroMQ context: one ZAP handler serves the batch and task managers' sockets."""
    urls = ({} if bus == "tcp" else
            {"INFEROXY_BATCH_MANAGER_URL": "inproc://bm", "INFEROXY_TASK_MANAGER_URL": "inproc://tm"})
    env = {"INFEROXY_BUS_SECRET": SECRET, **urls}
    with ProxyProcess(env=env, args=["--in-process"]) as proxy, Client(proxy.zmq_url, timeout=30) as client:
        x = np.arange(4, dtype=np.int32)
        np.testing.assert_array_equal(client.infer("echo", {"x": x})["x"], x)
