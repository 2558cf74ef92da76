from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis
from docker.client import DockerClient, from_env
from docker.errors import DockerException

from tests.bridge_harness import BridgeStack
from tests.support import delete_redis_prefix, require_service


@pytest.fixture(scope="session")
def real_redis_url() -> str:
    """A real redis-server (started by .ci/run). Missing: a failure in CI, a skip elsewhere."""
    url = os.environ.get("INFEROXY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
    except redis.RedisError:
        require_service(f"Redis at {url}", "INFEROXY_REQUIRE_REDIS")
    return url


@pytest.fixture
def redis_prefix(real_redis_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A key prefix of this test's own in the real Redis, deleted afterwards."""
    prefix = f"inferoxy-test-{os.getpid()}-{request.node.name}"[:120]
    yield prefix
    delete_redis_prefix(real_redis_url, prefix)


@pytest.fixture(scope="module")
def stack() -> Iterator[BridgeStack]:
    """The bridges in-process against a fake batch manager and an embedded Redis (tests/bridge_harness.py)."""
    stack = BridgeStack().start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def engine() -> Iterator[DockerClient]:
    """The Docker engine the tests use; a missing one skips outside CI and fails in it."""
    try:
        client = from_env(version="auto", timeout=30)
        client.ping()
    except DockerException as exc:
        require_service("a Docker engine", "INFEROXY_REQUIRE_DOCKER",
                        f"does not answer ({exc}) (start one with: bash .ci/docker.sh)")
    yield client
    client.close()
