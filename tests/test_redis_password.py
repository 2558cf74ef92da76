"""The embedded Redis answers only clients that give its password, and no log or banner shows it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import zmq.asyncio

from inferoxy.credentials import make_serve_secrets, mask_url
from inferoxy.settings import Settings
from inferoxy.supervisor import print_endpoints
from model_manager.service import EmbeddedRedis, ModelManager
from model_manager.spec import ModelSpec
from model_manager.store import SpecStore

PASSWORD = "p4ss:w/rd@with%odd-chars"


@pytest.fixture
def embedded() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(0, PASSWORD)
    server.start()
    yield server
    server.stop()


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("redis://:s3cret@127.0.0.1:6379/0") == "redis://:****@127.0.0.1:6379/0"
    assert mask_url("rediss://app:s3cret@redis.example:6380") == "rediss://app:****@redis.example:6380"
    assert mask_url("redis://[::1]:6379/2") == "redis://[::1]:6379/2"
    assert mask_url("redis://:s3cret@[::1]:6379") == "redis://:****@[::1]:6379"
    assert mask_url("redis://127.0.0.1:6379") == "redis://127.0.0.1:6379"
    assert mask_url(None) == ""


def resp(*args: str) -> bytes:
    return f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)


def test_a_client_without_the_password_can_neither_read_nor_write(embedded: EmbeddedRedis) -> None:
    """Attack: a local process talks to the embedded Redis directly, skipping the admin API and its key."""
    with socket.create_connection(("127.0.0.1", embedded.port), timeout=5) as conn:
        replies = conn.makefile("rb")

        def ask(*args: str) -> bytes:
            conn.sendall(resp(*args))
            return replies.readline().rstrip()

        assert ask("HSET", "inferoxy:models", "evil/1", "{}").startswith(b"-NOAUTH")
        assert ask("KEYS", "*").startswith(b"-NOAUTH")
        assert ask("HELLO", "3").startswith(b"-NOAUTH")
        assert ask("AUTH", "guess").startswith(b"-")
        assert ask("AUTH", "admin", PASSWORD).startswith(b"-")  # the right password, for another user
        assert ask("HELLO", "3", "AUTH", "default", "guess").startswith(b"-NOAUTH")
        assert ask("GET", "inferoxy:revision").startswith(b"-NOAUTH")  # still locked after all that
        # The same connection, once it gives the password, is served.
        assert ask("AUTH", PASSWORD) == b"+OK"
        assert ask("SET", "k", "v") == b"+OK"
    # A client library without the password cannot even connect (it fails on its first command).
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=embedded.port, socket_timeout=5).ping()


def test_the_url_carries_the_password_and_both_protocols_use_it(embedded: EmbeddedRedis) -> None:
    assert ":****@" in mask_url(embedded.url) and PASSWORD not in mask_url(embedded.url)
    for protocol in (2, 3):  # RESP3 clients authenticate with HELLO 3 AUTH
        client = redis.Redis.from_url(embedded.url, protocol=protocol, socket_timeout=5)
        assert client.ping()
        client.close()


def test_a_spec_store_without_the_password_cannot_write_a_spec(embedded: EmbeddedRedis) -> None:
    async def attempt() -> None:
        bare = SpecStore.from_url(f"redis://127.0.0.1:{embedded.port}", "inferoxy")
        try:
            with pytest.raises(redis.RedisError):
                await bare.put(ModelSpec(name="evil", command=["sh", "-c", "id"]))
        finally:
            await bare.close()
        store = SpecStore.from_url(embedded.url, "inferoxy")
        try:
            assert await store.versions("evil") == set()
        finally:
            await store.close()

    asyncio.run(attempt())


def test_the_model_manager_logs_its_embedded_redis_masked(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(embedded_redis_password=PASSWORD, models_file="")

    async def start() -> str:
        ctx = zmq.asyncio.Context()
        manager = ModelManager(settings, ctx)
        ready = asyncio.Event()
        task = asyncio.create_task(manager.run(ready))
        await asyncio.wait_for(ready.wait(), 10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        ctx.destroy(linger=0)
        assert manager.redis_url is not None
        return manager.redis_url

    with caplog.at_level(logging.INFO):
        url = asyncio.run(start())
    assert redis.connection.parse_url(url)["password"] == PASSWORD  # what the components are handed
    assert "embedded Redis-protocol server listening on redis://:****@127.0.0.1:" in caplog.text
    assert PASSWORD not in caplog.text


def test_the_serve_banner_masks_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    print_endpoints(Settings(redis_url="redis://:hunter2hunter2@127.0.0.1:4242/0"), embedded_redis=True)
    out = capsys.readouterr().out
    assert "redis://:****@127.0.0.1:4242/0 (embedded)" in out and "hunter2" not in out


def test_serve_makes_each_missing_secret_once() -> None:
    made = make_serve_secrets(Settings())
    assert set(made) == {"INFEROXY_BUS_SECRET", "INFEROXY_EMBEDDED_REDIS_PASSWORD"}
    assert all(len(value) >= 40 for value in made.values()) and len(set(made.values())) == 2
    given: dict[str, Any] = {"bus_secret": "mine", "embedded_redis_password": "mine too"}
    assert make_serve_secrets(Settings(**given)) == {}
    assert make_serve_secrets(Settings(redis_url="redis://127.0.0.1:6379", bus_curve=False)) == {}
