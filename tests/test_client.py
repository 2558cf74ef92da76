"""inferoxy.client's blocking and asyncio clients, against the in-process bridges and fake back end
(tests/bridge_harness.py: ``any`` echoes whatever it gets, ``echo`` declares x: FP32 [batch, 3] and
mask: BOOL [batch, any], ``slow`` never answers)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from inferoxy.client import AsyncClient, Client, InferenceError
from inferoxy.wire import DTYPES, encode, pack_header, unpack_header
from tests.bridge_harness import WAIT_S, BridgeStack
from tests.support import wait_for


@pytest.fixture
def client(stack: BridgeStack) -> Iterator[Client]:
    with Client(stack.zmq_url, timeout=WAIT_S) as client:
        yield client


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_wire_dtype_round_trips(client: Client, dtype: str) -> None:
    array = (np.arange(24) % 7).astype(DTYPES[dtype]).reshape(2, 3, 4)
    out = client.infer("any", {"t": array})
    assert list(out) == ["t"]
    assert out["t"].dtype == array.dtype
    np.testing.assert_array_equal(out["t"], array)


def test_arrays_of_any_layout_and_lists_are_sent_as_c_order_little_endian(client: Client) -> None:
    base = np.arange(16, dtype=np.int32).reshape(4, 4)
    out = client.infer("any", {"transposed": base.T, "big_endian": base.astype(">f8")})
    np.testing.assert_array_equal(out["transposed"], base.T)  # base.T is not C-contiguous
    assert out["big_endian"].dtype == np.dtype("<f8")
    np.testing.assert_array_equal(out["big_endian"], base)
    listed = client.infer("any", {"plain_list": [[1.5, 2.5]] * 4})["plain_list"]
    assert listed.dtype == np.float64 and listed.tolist() == [[1.5, 2.5]] * 4


def test_outputs_are_aligned_arrays_whatever_the_frame_offsets(client: Client) -> None:
    # small frames share one receive buffer at arbitrary offsets; outputs must still be aligned
    inputs = {"a": np.ones((1, 3), np.uint8), "b": np.arange(5, dtype=np.float64)[None], "c": np.ones((1, 1), np.int16)}
    out = client.infer("any", inputs)
    for name, array in inputs.items():
        assert out[name].flags.aligned, name
        np.testing.assert_array_equal(out[name], array)


def test_version_and_parameters_reach_the_batch_manager(stack: BridgeStack, client: Client) -> None:
    x = np.ones((1, 3, 2), np.int64)
    out = client.infer("echo", {"x": x}, version="2", parameters={"sequence_id": 77, "tag": "t"})
    np.testing.assert_array_equal(out["x"], x)
    sent = next(m for m in stack.batch_manager.messages("infer") if m["params"].get("sequence_id") == 77)
    # The client's own timeout travels too, as the Open Inference Protocol's `timeout` (µs), capped by the
    # server's (the stack's request_timeout_s is 5 s; the client's default is longer).
    assert (sent["version"], sent["params"]) == ("2", {"sequence_id": 77, "tag": "t", "timeout": 5_000_000})


def test_server_errors_raise_inference_error_with_the_code(client: Client) -> None:
    with pytest.raises(InferenceError) as unknown:
        client.infer("no-such-model", {"x": np.zeros((1, 3), np.float32)})
    assert unknown.value.code == "unknown_model"
    assert "no-such-model" in unknown.value.message

    with pytest.raises(InferenceError) as wrong:
        # echo declares x as FP32
        client.infer("echo", {"x": np.zeros((1, 3), np.int32), "mask": np.zeros((1, 1), bool)})
    assert wrong.value.code == "bad_input"
    assert "input 'x' must be FP32" in wrong.value.message
    assert str(wrong.value).startswith("bad_input: ")

    # the client is still usable after errors
    assert client.infer("any", {"a": np.ones((1, 1), np.uint8)})["a"].tolist() == [[1]]


def test_bad_requests_are_refused_before_sending(stack: BridgeStack) -> None:
    with Client(stack.zmq_url, timeout=WAIT_S, max_message_bytes=1000) as client:
        with pytest.raises(InferenceError, match="complex128 cannot be sent") as complex_input:
            client.infer("any", {"c": np.zeros((1, 2), complex)})
        assert complex_input.value.code == "bad_input"
        with pytest.raises(InferenceError, match="more than the bridge's limit of 1000"):
            client.infer("any", {"big": np.zeros((1, 1000), np.uint8)})
        with pytest.raises(InferenceError, match="non-empty mapping"):
            client.infer("any", {})


def test_blocking_timeout_raises_deadline(stack: BridgeStack, client: Client) -> None:
    started = time.monotonic()
    with pytest.raises(InferenceError) as caught:
        client.infer("slow", {"a": np.zeros((1, 1))}, timeout=0.3)  # "slow" is never answered
    assert caught.value.code == "deadline"
    assert time.monotonic() - started < 0.3 + 2.0
    # the request carried its deadline, so the bridge gave up on it (and cancelled it) too
    sent = [m for m in stack.batch_manager.messages("infer") if m["model"] == "slow" and m["timeout_ms"] == 300]
    assert sent
    wait_for(lambda: any(c["id"] == sent[-1]["id"] for c in stack.batch_manager.messages("cancel")),
             what="the bridge's cancel")


def test_blocking_client_skips_a_stale_reply_to_an_abandoned_request() -> None:
    """A fake bridge that holds request 1 until request 2 arrives, then answers 1 and 2 in that order."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def fake_bridge() -> None:
        held: list[tuple[bytes, dict[str, Any], list[bytes]]] = []
        while len(held) < 2 and router.poll(int(WAIT_S * 1000)):
            identity, head, *frames = router.recv_multipart()
            held.append((identity, unpack_header(head), frames))
        for identity, request, _ in held:
            router.send_multipart([identity, *encode({"id": request["id"], "ok": True, "model": "m", "version": "1"},
                                                     [("n", np.array([request["id"]]))])])

    thread = threading.Thread(target=fake_bridge, daemon=True)
    thread.start()
    try:
        with Client(f"tcp://127.0.0.1:{port}", timeout=WAIT_S) as client:
            with pytest.raises(InferenceError, match="deadline"):
                client.infer("m", {"a": np.zeros(1)}, timeout=0.2)
            second = client.infer("m", {"a": np.zeros(1)})
        assert second["n"].tolist() == [2]  # not the late answer to request 1
    finally:
        thread.join(WAIT_S)
        router.close()
        ctx.term()


def test_context_managers_close_their_sockets(stack: BridgeStack) -> None:
    with Client(stack.zmq_url) as blocking:
        assert not blocking.closed
    assert blocking.closed

    async def use() -> AsyncClient:
        async with AsyncClient(stack.zmq_url) as client:
            assert (await client.infer("any", {"a": np.ones((1, 2), np.int8)}))["a"].tolist() == [[1, 1]]
        return client

    assert asyncio.run(use()).closed
    with AsyncClient(stack.zmq_url) as plain:
        pass
    assert plain.closed


def test_async_client_many_concurrent_calls_over_one_socket(stack: BridgeStack) -> None:
    async def many() -> list[dict[str, np.ndarray]]:
        async with AsyncClient(stack.zmq_url, timeout=WAIT_S) as client:
            return await asyncio.gather(
                *(client.infer("any", {"v": np.full((1, 8), i, np.int32)}) for i in range(500))
            )

    results = asyncio.run(many())
    for i, result in enumerate(results):
        assert result["v"].tolist() == [[i] * 8]


def test_async_client_errors_timeouts_and_cancellation_do_not_disturb_other_calls(stack: BridgeStack) -> None:
    async def scenario() -> None:
        async with AsyncClient(stack.zmq_url, timeout=WAIT_S) as client:
            ok = np.ones((1, 3), np.float32)
            slow = asyncio.ensure_future(client.infer("slow", {"a": ok}, timeout=0.3))
            abandoned = asyncio.ensure_future(client.infer("slow", {"a": ok}, timeout=1.0))
            unknown = asyncio.ensure_future(client.infer("nope", {"a": ok}))
            good = [asyncio.ensure_future(client.infer("any", {"a": ok * i})) for i in range(20)]
            await asyncio.sleep(0)  # let every call send
            abandoned.cancel()

            with pytest.raises(InferenceError) as deadline:
                await slow
            assert deadline.value.code == "deadline"
            with pytest.raises(asyncio.CancelledError):
                await abandoned
            with pytest.raises(InferenceError) as missing:
                await unknown
            assert missing.value.code == "unknown_model"
            for i, call in enumerate(good):
                assert (await call)["a"].tolist() == [[float(i)] * 3]
            assert not client._waiting  # every finished call let go of its slot

    asyncio.run(scenario())


def test_async_client_close_fails_calls_in_flight(stack: BridgeStack) -> None:
    async def scenario() -> None:
        client = AsyncClient(stack.zmq_url, timeout=WAIT_S)
        call = asyncio.ensure_future(client.infer("slow", {"a": np.zeros((1, 1))}, timeout=1.0))
        await asyncio.sleep(0)  # one step of the call: it sends and waits for its reply
        assert client._waiting
        await client.aclose()
        with pytest.raises(InferenceError, match="closed"):
            await call
        with pytest.raises(RuntimeError, match="closed"):
            await client.infer("any", {"a": np.zeros((1, 1))})

    asyncio.run(scenario())


def test_replies_the_client_cannot_read_are_ignored() -> None:
    """A peer that sends garbage before the real answer: the call still gets its answer."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def fake_bridge() -> None:
        if router.poll(int(WAIT_S * 1000)):
            identity, head, *_ = router.recv_multipart()
            rid = unpack_header(head)["id"]
            router.send_multipart([identity, b"\xc1 not msgpack"])
            router.send_multipart([identity, pack_header({"id": None, "ok": False,
                                                          "error": {"code": "bad_input", "message": "?"}})])
            router.send_multipart([identity, pack_header({"id": rid, "ok": True, "tensors": []})])

    thread = threading.Thread(target=fake_bridge, daemon=True)
    thread.start()

    async def call() -> dict[str, np.ndarray]:
        async with AsyncClient(f"tcp://127.0.0.1:{port}", timeout=WAIT_S) as client:
            return await client.infer("m", {"a": np.zeros(1)})

    try:
        assert asyncio.run(call()) == {}
    finally:
        thread.join(WAIT_S)
        router.close()
        ctx.term()


def test_async_client_moves_to_a_new_event_loop_once_the_old_one_is_closed(stack: BridgeStack) -> None:
    client = AsyncClient(stack.zmq_url, timeout=WAIT_S)
    try:
        for i in range(2):  # each asyncio.run is a new loop
            out = asyncio.run(client.infer("any", {"a": np.full((1, 1), i, np.int8)}))
            assert out["a"].tolist() == [[i]]

        async def on_another_loop_while_the_first_runs() -> None:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: pytest.raises(RuntimeError, asyncio.run, client.infer("any", {"a": np.zeros((1, 1))}))
            )

        async def first() -> None:
            await client.infer("any", {"a": np.zeros((1, 1))})
            await on_another_loop_while_the_first_runs()

        asyncio.run(first())
    finally:
        client.close()
