"""A fake Inferoxy back end for testing the bridges and the client, all on loopback.

- ``FakeRedis``: fakeredis's TCP server in a daemon thread, seeded with test model specs.
- ``FakeBatchManager``: a ROUTER in a thread speaking the bridge <-> batch manager protocol;
  what it does with an ``infer`` depends on the model name (see ``FakeBatchManager.answer``).
- ``BridgeStack``: a ZmqBridge, a RestBridge and a GrpcBridge running on an event loop in a thread.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import fakeredis
import zmq
import zmq.asyncio

from bridges.grpc_bridge import GrpcBridge
from bridges.rest import RestBridge
from bridges.zmq_bridge import ZmqBridge
from inferoxy.protocol import CANCEL, ERROR, HEARTBEAT, INFER, REPLY
from inferoxy.runner import loop_factory
from inferoxy.settings import Settings
from inferoxy.wire import pack_header, unpack_header
from model_manager.spec import ModelSpec, ModelStatus, TensorSpec
from model_manager.store import SpecStore
from tests.support import free_port

T = TypeVar("T")
WAIT_S = 10.0


def test_specs() -> list[ModelSpec]:
    """The models the tests use; the fake batch manager's behaviour follows the name."""

    def spec(name: str, version: str = "1", **fields: Any) -> ModelSpec:
        return ModelSpec(name=name, version=version, model_class="tests.fake:Model", **fields)

    echo_inputs = [
        TensorSpec(name="x", datatype="FP32", shape=[3]),
        TensorSpec(name="mask", datatype="BOOL", shape=[-1]),
    ]
    return [
        spec("echo", inputs=echo_inputs, outputs=echo_inputs),
        spec("echo", version="2", inputs=[TensorSpec(name="x", datatype="INT64", shape=[-1, 2])],
             description="Echo, taking pairs.", framework="numpy", labels={"team": "vision", "stage": "beta"}),
        spec("any"),  # declares no inputs: anything goes
        spec("slow"),
        spec("fail"),
        spec("busy"),
        spec("late"),
        spec("garbled"),
        spec("bytes", inputs=[TensorSpec(name="s", datatype="BYTES", shape=[1])]),
    ]


class RedisAt:
    """A Redis the tests seed: a real one (the ``real_redis_url`` fixture), or ``FakeRedis`` below."""

    def __init__(self, url: str) -> None:
        self.url = url

    def stop(self) -> None:
        pass

    def seed(self, prefix: str, specs: list[ModelSpec]) -> None:
        async def put_all() -> None:
            store = SpecStore.from_url(self.url, prefix)
            try:
                for spec in specs:
                    await store.put(spec)
            finally:
                await store.close()

        asyncio.run(put_all())

    def seed_statuses(self, prefix: str, statuses: list[ModelStatus]) -> None:
        async def put_all() -> None:
            store = SpecStore.from_url(self.url, prefix)
            try:
                for status in statuses:
                    await store.put_status(status)
            finally:
                await store.close()

        asyncio.run(put_all())


class FakeRedis(RedisAt):
    def __init__(self) -> None:
        self.port = free_port()
        super().__init__(f"redis://127.0.0.1:{self.port}/0")
        self.server = fakeredis.TcpFakeServer(("127.0.0.1", self.port))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="fake-redis")

    def start(self) -> FakeRedis:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(WAIT_S)


class FakeBatchManager:
    """Answers ``infer`` by model name: ``slow`` never, ``late`` only once it is cancelled, ``fail``
    with model_error, ``busy`` with overloaded, ``garbled`` with a reply whose frames do not match
    its header, anything else by echoing the inputs back as outputs; a request with the parameter
    ``fake_error`` with that error code, whatever its model. Records every message."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.url = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._late: dict[int, list[Any]] = {}
        self.thread = threading.Thread(target=self._serve, daemon=True, name="fake-batch-manager")

    def start(self) -> FakeBatchManager:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(WAIT_S)
        self.sock.close()
        self.ctx.term()

    def messages(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.received if m.get("t") == kind]

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(20):
                continue
            identity, *frames = self.sock.recv_multipart()
            header = unpack_header(frames[0])
            with self.lock:
                # Each bridge numbers its own requests: the sender tells equal ids apart.
                self.received.append({**header, "sender": identity})
            if header.get("t") == INFER:
                answer = self.answer(header, frames[1:])
                if header["model"] == "late":
                    self._late[header["id"]] = answer or []
                elif answer is not None:
                    self.sock.send_multipart([identity, *answer])
            elif header.get("t") == HEARTBEAT:  # a live batch manager answers each one
                self.sock.send_multipart([identity, pack_header({"t": HEARTBEAT})])
            elif header.get("t") == CANCEL:
                late = self._late.pop(header["id"], None)
                if late is not None:  # the answer the bridge gave up waiting for, after all
                    self.sock.send_multipart([identity, *late])
            else:
                raise AssertionError(f"unexpected message {header}")

    def answer(self, header: dict[str, Any], frames: list[bytes]) -> list[Any] | None:
        model, rid = header["model"], header["id"]
        # Any error code on demand (the request parameter ``fake_error``), as a batch manager would send it.
        wanted = (header.get("params") or {}).get("fake_error")
        if wanted is not None:
            return [pack_header({"t": ERROR, "id": rid, "code": wanted, "message": f"{wanted}, as asked"})]
        if model == "slow":
            return None
        if model == "fail":
            return [pack_header({"t": ERROR, "id": rid, "code": "model_error", "message": "predict raised ValueError"})]
        if model == "busy":
            return [pack_header({"t": ERROR, "id": rid, "code": "overloaded", "message": "queue full"})]
        reply = {"t": REPLY, "id": rid, "model": model, "version": header["version"], "tensors": header["tensors"]}
        if model == "garbled":
            return [pack_header(reply)]
        return [pack_header(reply), *frames]


class BridgeStack:
    """The three bridges on one event loop in a background thread, against the fakes (or a real Redis:
    ``redis_url`` and ``redis_prefix``, whose keys the caller cleans up)."""

    def __init__(self, *, redis_url: str | None = None, redis_prefix: str | None = None, **settings: Any) -> None:
        self.redis = FakeRedis().start() if redis_url is None else RedisAt(redis_url)
        self.prefix = redis_prefix or f"test-{uuid.uuid4().hex[:8]}"
        self.redis.seed(self.prefix, test_specs())
        # Serving states for the model ready endpoints; models not listed have no status yet.
        self.redis.seed_statuses(self.prefix, [
            ModelStatus(name="echo", version="1", state="ready", ready_replicas=1, desired_replicas=1, updated_at=0),
            ModelStatus(name="echo", version="2", state="degraded", ready_replicas=1, desired_replicas=2,
                        updated_at=0),
            ModelStatus(name="fail", version="1", state="failed", reason="image inferoxy/fail not found",
                        updated_at=0),
        ])
        self.batch_manager = FakeBatchManager().start()
        self.settings = Settings(
            bind_host="127.0.0.1",
            rest_port=free_port(),
            zmq_port=free_port(),
            grpc_port=free_port(),
            batch_manager_url=self.batch_manager.url,
            redis_url=self.redis.url,
            redis_prefix=self.prefix,
            **{"request_timeout_s": 5.0, "max_message_bytes": 1 << 20, **settings},
        )
        self.zmq_url = f"tcp://127.0.0.1:{self.settings.zmq_port}"
        self.rest_url = f"http://127.0.0.1:{self.settings.rest_port}"
        self.grpc_url = f"127.0.0.1:{self.settings.grpc_port}"
        # The loop the REST bridge gets in production (uvloop); the other bridges are tested on it too, since
        # INFEROXY_BRIDGE_EVENT_LOOP=uvloop puts them there.
        self.loop = (loop_factory("rest_bridge", self.settings) or asyncio.new_event_loop)()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="bridges")
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> BridgeStack:
        self.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.zmq_bridge = ZmqBridge(self.settings, self.ctx)
        self.rest_bridge = RestBridge(self.settings, self.ctx)
        self.grpc_bridge = GrpcBridge(self.settings, self.ctx)
        for bridge in (self.zmq_bridge, self.rest_bridge, self.grpc_bridge):
            ready = asyncio.Event()
            self.tasks.append(asyncio.create_task(bridge.run(ready)))
            await asyncio.wait_for(ready.wait(), WAIT_S)
            assert bridge.gateway.registry is not None, "a bridge is ready only once it knows the models"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = WAIT_S) -> T:
        """Run ``coro`` on the bridges' loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)
        self.loop.close()
        self.ctx.term()
        self.batch_manager.stop()
        self.redis.stop()

    async def _stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        for result in results:
            if not isinstance(result, asyncio.CancelledError):
                raise AssertionError(f"a bridge ended with {result!r} instead of being cancelled")
