"""The ZeroMQ bridge's ``metadata`` operation (docs/PROTOCOL.md, "Other operations"): what it answers, what it
refuses, and that it follows the model metadata rule of REST (open, or closed by INFEROXY_AUTH_METADATA)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import zmq

from inferoxy.client import AsyncClient, InferenceError
from inferoxy.wire import pack_header, unpack_header
from tests.bridge_harness import BridgeStack
from tests.support import delete_redis_prefix
from tests.test_api_keys import create_key


def metadata(url: str, model: str, version: str | None = None, key: str | None = None) -> dict[str, Any] | str:
    async def ask() -> dict[str, Any] | str:
        async with AsyncClient(url, timeout=5, api_key=key) as client:
            try:
                return await client.metadata(model, version=version)
            except InferenceError as exc:
                return exc.code
    return asyncio.run(ask())


def test_metadata_is_what_rest_serves_with_the_resolved_version(stack: BridgeStack) -> None:
    found = metadata(stack.zmq_url, "echo")
    assert isinstance(found, dict)
    rest = httpx.get(f"{stack.rest_url}/v2/models/echo", timeout=5).json()
    assert {k: found[k] for k in ("name", "versions", "platform", "inputs", "outputs")} == \
        {k: rest[k] for k in ("name", "versions", "platform", "inputs", "outputs")}
    default = found["version"]
    assert default in found["versions"]
    other = metadata(stack.zmq_url, "echo", version="2")
    assert isinstance(other, dict) and other["version"] == "2"
    assert metadata(stack.zmq_url, "nope") == "unknown_model"
    assert metadata(stack.zmq_url, "echo", version="99") == "unknown_model"


def test_an_unknown_op_or_a_bad_field_is_bad_input_and_the_bridge_serves_on(stack: BridgeStack) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(stack.zmq_url)
    try:
        for rid, header in enumerate([{"op": "shutdown", "model": "echo"}, {"op": "metadata"},
                                      {"op": "metadata", "model": "echo", "version": 3}, {"op": ["x"]}]):
            sock.send_multipart([pack_header({"id": rid, **header})])
            assert sock.poll(5000), header
            reply = unpack_header(sock.recv_multipart()[0])
            assert reply["id"] == rid and reply["ok"] is False and reply["error"]["code"] == "bad_input", reply
    finally:
        sock.close()
    assert isinstance(metadata(stack.zmq_url, "echo"), dict)


@pytest.fixture(scope="module")
def keyed(real_redis_url: str) -> Iterator[BridgeStack]:
    prefix = f"inferoxy-test-zmq-meta-{time.monotonic_ns()}"
    stack = BridgeStack(redis_url=real_redis_url, redis_prefix=prefix).start()
    try:
        yield stack
    finally:
        stack.stop()
        delete_redis_prefix(real_redis_url, prefix)


def test_metadata_follows_the_model_metadata_rule(keyed: BridgeStack) -> None:
    good = create_key(keyed, "good")
    other = create_key(keyed, "other", models=["any"])
    assert isinstance(metadata(keyed.zmq_url, "echo"), dict), "open by default, as REST's"
    gateway = keyed.zmq_bridge.gateway
    gateway.auth.metadata_closed = True
    try:
        assert metadata(keyed.zmq_url, "echo") == "unauthenticated"
        assert metadata(keyed.zmq_url, "echo", key=other) == "forbidden"
        assert isinstance(metadata(keyed.zmq_url, "echo", key=good), dict)
    finally:
        gateway.auth.metadata_closed = False
