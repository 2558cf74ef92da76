"""Heartbeats on the bridge <-> batch manager link, seen from the bridge's side (the Gateway).

The batch manager here is a ROUTER the test drives: it answers heartbeats while "alive", keeps
requests unanswered, and falls silent on demand (as a killed or SIGSTOPped batch manager does).
Every wait is for an outcome or a condition, with a timeout.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import fakeredis
import zmq
import zmq.asyncio

from bridges.errors import RequestError
from bridges.gateway import Gateway, Outcome, Reply
from inferoxy.liveness import PeerLiveness
from inferoxy.settings import Settings
from inferoxy.wire import pack_header, unpack_header
from model_manager.store import SpecStore

TIMEOUT = 10.0
_names = itertools.count()


class FakeBatchManager:
    def __init__(self, ctx: zmq.asyncio.Context, url: str) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(url)
        self.alive = True
        self.epoch = "run-1"
        self.heartbeats = 0
        self.requests: list[tuple[bytes, dict[str, Any]]] = []

    async def serve(self) -> None:
        while True:
            identity, header_frame, *_ = await self.sock.recv_multipart()
            header = unpack_header(header_frame)
            if header["t"] == "hb":
                self.heartbeats += 1
                if self.alive:
                    await self.sock.send_multipart([identity, pack_header({"t": "hb", "epoch": self.epoch})])
            elif header["t"] == "infer":
                self.requests.append((identity, header))

    async def reply(self, identity: bytes, header: dict[str, Any]) -> None:
        answer = {"t": "reply", "id": header["id"], "model": header["model"], "version": "1", "tensors": []}
        await self.sock.send_multipart([identity, pack_header(answer)])


async def poll(check: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := check()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
    return result


def request(gateway: Gateway, outcomes: list[Outcome], timeout_s: float = 60.0) -> int:
    return gateway.start_request("echo", None, [], [], timeout_s, outcomes.append)


Scenario = Callable[[Gateway, FakeBatchManager], Awaitable[None]]


def with_gateway(scenario: Scenario, heartbeat_interval_s: float = 0.2) -> None:
    async def body() -> None:
        ctx = zmq.asyncio.Context()
        url = f"inproc://liveness-{next(_names)}"
        batch_manager = FakeBatchManager(ctx, url)
        serving = asyncio.create_task(batch_manager.serve())
        settings = Settings(batch_manager_url=url, redis_url="redis://unused",
                            heartbeat_interval_s=heartbeat_interval_s, heartbeat_liveness=3, request_timeout_s=60.0)
        gateway = Gateway(settings, ctx, store=SpecStore(fakeredis.aioredis.FakeRedis(decode_responses=True), "p"))
        await gateway.start()
        try:
            await scenario(gateway, batch_manager)
        finally:
            await gateway.close()
            serving.cancel()
            batch_manager.sock.close()
            ctx.destroy(linger=0)

    asyncio.run(asyncio.wait_for(body(), 60))


def test_a_silent_batch_manager_fails_requests_in_flight_with_unavailable_then_recovers() -> None:
    """Before: a batch manager killed or SIGSTOPped left requests waiting for their own deadline (here 60 s),
    and new ones were queued into the void."""
    async def scenario(gateway: Gateway, batch_manager: FakeBatchManager) -> None:
        await poll(lambda: batch_manager.heartbeats >= 2, "the bridge's heartbeats")
        outcomes: list[Outcome] = []
        request(gateway, outcomes)
        await poll(lambda: batch_manager.requests, "the request at the batch manager")

        batch_manager.alive = False  # killed or stopped: it holds the request and answers nothing
        await poll(lambda: outcomes, "the request to fail", timeout=5.0)
        (failure,) = outcomes
        assert isinstance(failure, RequestError) and failure.code == "unavailable", failure
        assert gateway.outstanding == 0 and gateway.batch_manager_lost
        try:
            request(gateway, [])
        except RequestError as exc:
            assert exc.code == "unavailable" and exc.http_status == 503
        else:
            raise AssertionError("a request was taken while the batch manager is known silent")

        batch_manager.alive = True  # back (restarted): the next heartbeat is answered
        await poll(lambda: not gateway.batch_manager_lost, "the batch manager to be heard again")
        outcomes.clear()
        request(gateway, outcomes)
        identity, header = await poll(lambda: batch_manager.requests[1:] and batch_manager.requests[1],
                                      "the new request")
        await batch_manager.reply(identity, header)
        await poll(lambda: outcomes, "the reply")
        assert isinstance(outcomes[0], Reply)

    with_gateway(scenario)


def test_a_restarted_batch_manager_is_told_by_its_epoch_and_what_the_old_one_held_fails_at_once() -> None:
    """A batch manager restarted faster than the silence limit never looks silent; before the epoch, what the
    killed one held waited for its deadline."""
    async def scenario(gateway: Gateway, batch_manager: FakeBatchManager) -> None:
        await poll(lambda: batch_manager.heartbeats >= 1, "a heartbeat")
        outcomes: list[Outcome] = []
        request(gateway, outcomes)
        await poll(lambda: batch_manager.requests, "the request at the batch manager")
        batch_manager.epoch = "run-2"  # killed and back between two heartbeats; the request is gone with it
        await poll(lambda: outcomes, "the request to fail", timeout=5.0)
        assert isinstance(outcomes[0], RequestError) and outcomes[0].code == "unavailable", outcomes
        assert not gateway.batch_manager_lost, "it is back: new requests are taken"

    # Heartbeats far apart next to the test's wait: only the epoch can explain a failure within it.
    with_gateway(scenario, heartbeat_interval_s=1.0)


def test_liveness_notices_silence_once_and_recovery_once() -> None:
    peer = PeerLiveness(interval_s=1.0, liveness=3, now=0.0)
    assert not peer.check(3.0), "silent for exactly the limit is still alive"
    assert peer.next_check_s(2.5) <= 0.51, "the check after the limit must not wait a whole interval"
    assert peer.check(3.01) and peer.lost
    assert not peer.check(4.0), "reported once"
    assert peer.heard(5.0) and not peer.lost
    assert not peer.heard(5.5)


def answered_with(header: Callable[[int], dict[str, Any]]) -> Outcome:
    """The outcome of one request that the batch manager answers with ``header(request id)``."""
    outcomes: list[Outcome] = []

    async def scenario(gateway: Gateway, batch_manager: FakeBatchManager) -> None:
        request(gateway, outcomes)
        identity, sent = await poll(lambda: batch_manager.requests and batch_manager.requests[0], "the request")
        await batch_manager.sock.send_multipart([identity, pack_header(header(sent["id"]))])
        await poll(lambda: outcomes, "the outcome", timeout=5.0)

    with_gateway(scenario)
    return outcomes[0]


def test_an_error_code_this_version_does_not_know_reaches_the_client_unchanged() -> None:
    # A newer batch manager may answer with a code this bridge has never heard of (InferoxyError's promise).
    outcome = answered_with(lambda rid: {"t": "error", "id": rid, "code": "brand_new", "message": "why"})
    assert isinstance(outcome, RequestError) and (outcome.code, outcome.message) == ("brand_new", "why")


def test_a_malformed_answer_to_a_request_fails_it_at_once_as_internal() -> None:
    """Before: a reply whose model was not a string passed as a success (the client got that "model" back)."""
    for header in ({"t": "reply", "id": "RID", "model": 5, "version": "1", "tensors": []},
                   {"t": "reply", "id": "RID", "model": "echo", "version": "1", "tensors": "none"},
                   {"t": "explode", "id": "RID"},
                   {"t": "error", "id": "RID", "code": 3, "message": "?"}):
        outcome = answered_with(lambda rid, header=header: {k: rid if v == "RID" else v for k, v in header.items()})
        assert isinstance(outcome, RequestError) and outcome.code == "internal", (header, outcome)
        assert "the batch manager sent a malformed answer" in outcome.message, outcome.message
