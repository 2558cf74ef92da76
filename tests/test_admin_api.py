"""The admin API (bridges/admin.py) against a real Redis: CRUD, patches, versions, load/unload, access, outages."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from fastapi import FastAPI
from starlette.testclient import TestClient

from bridges.admin import admin_router
from inferoxy.settings import RuntimeKind, Settings
from tests.support import free_port

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
ECHO = {"name": "echo", "model_class": "examples.models.echo.model:EchoModel", "max_batch_size": 8}


# The peer address the in-process ASGI client claims to be: a documentation address (TEST-NET-3),
# used only to look like a non-loopback caller. No traffic leaves this process.
REMOTE_PEER = "203.0.113.7"


def make_client(redis_url: str, prefix: str, *, key: str | None = KEY, host: str = REMOTE_PEER,
                runtime: RuntimeKind = "process") -> TestClient:
    settings = Settings(redis_url=redis_url, redis_prefix=prefix, admin_key=key, models_file="", runtime=runtime)
    app = FastAPI()
    app.include_router(admin_router(settings))
    # A loopback Host, as curl and the CLI send it: without a key, any other Host is refused (DNS rebinding).
    return TestClient(app, base_url="http://127.0.0.1:8698", client=(host, 40000))


@pytest.fixture
def client(real_redis_url: str, redis_prefix: str) -> Iterator[TestClient]:
    with make_client(real_redis_url, redis_prefix) as test_client:
        yield test_client


def test_crud(client: TestClient, real_redis_url: str, redis_prefix: str) -> None:
    assert client.get("/v2/admin/models", headers=AUTH).json()["models"] == []

    created = client.post("/v2/admin/models", json=ECHO, headers=AUTH)
    assert created.status_code == 201, created.text
    assert client.post("/v2/admin/models", json=ECHO, headers=AUTH).status_code == 409

    (row,) = client.get("/v2/admin/models", headers=AUTH).json()["models"]
    assert (row["name"], row["version"], row["default"], row["loaded"]) == ("echo", "1", True, True)

    shown = client.get("/v2/admin/models/echo", headers=AUTH).json()
    assert shown["default_version"] == "1" and shown["versions"][0]["spec"]["max_batch_size"] == 8

    # Replace: the path names the model; the body may leave name and version out.
    replaced = client.put("/v2/admin/models/echo/versions/1", headers=AUTH,
                          json={"model_class": "examples.models.echo.model:EchoModel", "max_batch_size": 4})
    assert replaced.status_code == 200, replaced.text
    assert client.get("/v2/admin/models/echo/versions/1", headers=AUTH).json()["max_batch_size"] == 4

    patched = client.patch("/v2/admin/models/echo", json={"max_batch_size": 16, "env": {"MODE": "x"}}, headers=AUTH)
    assert patched.status_code == 200, patched.text
    stored = json.loads(redis.Redis.from_url(real_redis_url).hget(f"{redis_prefix}:models", "echo/1"))
    assert (stored["max_batch_size"], stored["env"]) == (16, {"MODE": "x"})

    # Every write is announced: the revision moved with each one.
    assert int(redis.Redis.from_url(real_redis_url).get(f"{redis_prefix}:revision")) == 3

    assert client.delete("/v2/admin/models/echo", headers=AUTH).status_code == 200
    assert client.delete("/v2/admin/models/echo", headers=AUTH).status_code == 404
    assert client.get("/v2/admin/models/echo", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"min_replicas": 5}, "min_replicas"),  # above max_replicas
        ({"inputs": [{"name": "x", "datatype": "FP33", "shape": [1]}]}, "inputs.0.datatype"),
        ({"surprise": True}, "surprise"),
        ({"name": "other"}, "name"),
    ],
)
def test_bad_patch_is_refused_with_field_and_reason_and_stores_nothing(
    client: TestClient, real_redis_url: str, redis_prefix: str, patch: dict, field: str
) -> None:
    client.post("/v2/admin/models", json=ECHO, headers=AUTH)
    before = redis.Redis.from_url(real_redis_url).hgetall(f"{redis_prefix}:models")
    response = client.patch("/v2/admin/models/echo/versions/1", json=patch, headers=AUTH)
    assert response.status_code == 400, response.text
    body = response.json()
    assert field.split(".")[0] in body["error"]
    if field != "min_replicas":  # a whole-spec rule: reported against the spec, with the reason
        assert any(problem["field"] == field for problem in body["fields"]), body
    assert all(problem["reason"] for problem in body["fields"])
    assert redis.Redis.from_url(real_redis_url).hgetall(f"{redis_prefix}:models") == before


def test_bad_specs_are_refused(client: TestClient) -> None:
    no_runner = client.post("/v2/admin/models", json={"name": "x"}, headers=AUTH)
    assert no_runner.status_code == 400 and "image, a model_class or a command" in no_runner.json()["error"]
    declared = {**AUTH, "Content-Type": "application/json"}
    not_json = client.post("/v2/admin/models", content=b"{not json", headers=declared)
    assert not_json.status_code == 400
    mismatch = client.put("/v2/admin/models/a/versions/1", json={**ECHO, "name": "b"}, headers=AUTH)
    assert mismatch.status_code == 400 and "differs" in mismatch.json()["error"]


def test_versions_and_default(client: TestClient) -> None:
    client.post("/v2/admin/models", json=ECHO, headers=AUTH)
    assert client.post("/v2/admin/models", json={**ECHO, "version": "2"}, headers=AUTH).status_code == 201
    assert client.get("/v2/admin/models/echo", headers=AUTH).json()["default_version"] == "1"
    assert client.put("/v2/admin/models/echo/default", json={"version": "2"}, headers=AUTH).status_code == 200
    assert client.get("/v2/admin/models/echo", headers=AUTH).json()["default_version"] == "2"
    missing = client.put("/v2/admin/models/echo/default", json={"version": "9"}, headers=AUTH)
    assert missing.status_code == 404 and "has no version '9'" in missing.json()["error"]
    # A patch without a version changes the default version only.
    client.patch("/v2/admin/models/echo", json={"max_batch_size": 2}, headers=AUTH)
    assert client.get("/v2/admin/models/echo/versions/2", headers=AUTH).json()["max_batch_size"] == 2
    assert client.get("/v2/admin/models/echo/versions/1", headers=AUTH).json()["max_batch_size"] == 8
    assert client.delete("/v2/admin/models/echo/versions/2", headers=AUTH).status_code == 200
    assert client.get("/v2/admin/models/echo", headers=AUTH).json()["default_version"] == "1"


def test_repository_load_unload(client: TestClient) -> None:
    client.post("/v2/admin/models", json={**ECHO, "min_replicas": 2, "max_replicas": 3}, headers=AUTH)
    index = client.post("/v2/repository/index", headers=AUTH).json()
    assert index == [{"name": "echo", "version": "1", "state": "UNKNOWN", "reason": "no status reported yet"}]

    assert client.post("/v2/repository/models/echo/unload", headers=AUTH).json()["unloaded"] == ["echo/1"]
    unloaded = client.get("/v2/admin/models/echo/versions/1", headers=AUTH).json()
    assert (unloaded["min_replicas"], unloaded["max_replicas"]) == (0, 0), \
        "no replica may run: not scale to zero, where a request would start one"
    (entry,) = client.post("/v2/repository/index", headers=AUTH).json()
    assert (entry["state"], entry["reason"]) == ("UNAVAILABLE", "unloaded")
    assert client.post("/v2/repository/index", json={"ready": True}, headers=AUTH).json() == []

    assert client.post("/v2/repository/models/echo/load", headers=AUTH).json()["loaded"] == ["echo/1"]
    loaded = client.get("/v2/admin/models/echo/versions/1", headers=AUTH).json()
    assert (loaded["min_replicas"], loaded["max_replicas"]) == (2, 3), \
        "load restores the replicas the model had before unload"
    assert client.post("/v2/repository/models/nope/load", headers=AUTH).status_code == 404

    # Triton's load may carry the configuration: here, a spec.
    config = json.dumps({"model_class": "examples.models.echo.model:EchoModel", "max_batch_size": 3})
    loaded = client.post("/v2/repository/models/fresh/load", json={"parameters": {"config": config}}, headers=AUTH)
    assert loaded.status_code == 200, loaded.text
    assert client.get("/v2/admin/models/fresh/versions/1", headers=AUTH).json()["max_batch_size"] == 3


@pytest.mark.parametrize("config", ["{not json", "", "echo", b"\xff".decode("latin-1")])
def test_load_with_a_config_that_is_not_json_is_refused_with_400(
    client: TestClient, real_redis_url: str, redis_prefix: str, config: str
) -> None:
    # Bad input: Triton's load carrying a `config` string that does not parse as JSON (it used to be a bare 500).
    response = client.post("/v2/repository/models/fresh/load", json={"parameters": {"config": config}}, headers=AUTH)
    assert response.status_code == 400, response.text
    assert "config" in response.json()["error"] and "JSON" in response.json()["error"]
    assert redis.Redis.from_url(real_redis_url).hgetall(f"{redis_prefix}:models") == {}


def test_a_spec_without_an_image_is_refused_on_the_docker_runtime(real_redis_url: str, redis_prefix: str) -> None:
    # Bad input: a spec that names only a model_class while replicas run as containers; it could never start.
    with make_client(real_redis_url, redis_prefix, runtime="docker") as client:
        created = client.post("/v2/admin/models", json=ECHO, headers=AUTH)
        assert created.status_code == 400, created.text
        assert "image" in created.json()["error"] and "docker" in created.json()["error"]
        assert created.json()["fields"] == [{"field": "image", "reason": created.json()["fields"][0]["reason"]}]
        replaced = client.put("/v2/admin/models/echo/versions/1", json=ECHO, headers=AUTH)
        assert replaced.status_code == 400, replaced.text
        loaded = client.post("/v2/repository/models/echo/load", json={"parameters": {"config": json.dumps(ECHO)}},
                             headers=AUTH)
        assert loaded.status_code == 400, loaded.text
        assert redis.Redis.from_url(real_redis_url).hgetall(f"{redis_prefix}:models") == {}

        with_image = {**ECHO, "image": "inferoxy/echo"}
        assert client.post("/v2/admin/models", json=with_image, headers=AUTH).status_code == 201
        # A patch that takes the image away is refused the same way, and stores nothing.
        unset = client.patch("/v2/admin/models/echo", json={"image": None}, headers=AUTH)
        assert unset.status_code == 400 and "image" in unset.json()["error"], unset.text
        assert client.get("/v2/admin/models/echo/versions/1", headers=AUTH).json()["image"] == "inferoxy/echo"


def test_access_needs_the_key(real_redis_url: str, redis_prefix: str) -> None:
    with make_client(real_redis_url, redis_prefix) as client:
        assert client.get("/v2/admin/models").status_code == 401
        assert client.get("/v2/admin/models", headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert client.get("/v2/admin/models", headers={"X-Inferoxy-Admin-Key": KEY}).status_code == 200
        assert client.get("/v2/health/registry").status_code == 200, "health stays open"
    # No key configured: loopback clients only.
    with make_client(real_redis_url, redis_prefix, key=None) as remote:
        refused = remote.get("/v2/admin/models")
        assert refused.status_code == 403 and "INFEROXY_ADMIN_KEY" in refused.json()["error"]
    for host in ("127.0.0.1", "::1"):
        with make_client(real_redis_url, redis_prefix, key=None, host=host) as local:
            assert local.get("/v2/admin/models").status_code == 200


def test_redis_down_writes_fail_with_503_and_health_is_degraded(redis_prefix: str) -> None:
    nobody = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    with make_client(nobody, redis_prefix) as client:
        response = client.post("/v2/admin/models", json=ECHO, headers=AUTH)
        assert response.status_code == 503
        assert "Redis" in response.json()["error"] and "keeps serving" in response.json()["error"]
        health = client.get("/v2/health/registry")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["redis"]["reachable"] is False
