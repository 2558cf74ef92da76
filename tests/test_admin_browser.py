"""No way into the admin API through a browser (issue 10, item 2; docs/SECURITY.md).

The attack: the operator runs Inferoxy without INFEROXY_ADMIN_KEY, so only a loopback check guards
the admin API, and visits a web page. The page's script sends a "simple" cross-site request (no
CORS preflight: POST with ``Content-Type: text/plain``) to http://127.0.0.1:8698 whose body is a
spec with ``command: ["sh", "-c", ...]``; the browser runs on the operator's machine, so the
request comes from loopback, and the process runtime would run the command. The same through
Triton's repository load endpoint, whose ``config`` parameter carries a spec.

These tests send exactly the headers a browser would (``Origin``, ``Sec-Fetch-Site``) from a
loopback client; no browser is needed to forge them, and none could leave them out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi import FastAPI
from starlette.testclient import TestClient

from bridges.admin import admin_router
from inferoxy.settings import Settings
from tests.support import ProxyProcess, wait_for

EVIL = "http://evil.example"
PLAIN = {"Content-Type": "text/plain"}


def command_spec(name: str, marker: Path) -> dict[str, object]:
    """A spec whose replica is a shell command writing ``marker``: what an attacker would register."""
    return {"name": name, "command": ["sh", "-c", f"touch {marker}; exec sleep 60"], "max_batch_size": 1}


def stored(redis_url: str, prefix: str) -> dict[bytes, bytes]:
    return redis.Redis.from_url(redis_url).hgetall(f"{prefix}:models")


@pytest.fixture
def local(real_redis_url: str, redis_prefix: str) -> Iterator[TestClient]:
    """The admin API with no admin key, called from loopback: the exemption the attack abuses."""
    settings = Settings(redis_url=real_redis_url, redis_prefix=redis_prefix, admin_key=None, models_file="")
    app = FastAPI()
    app.include_router(admin_router(settings))
    with TestClient(app, base_url="http://127.0.0.1:8698", client=("127.0.0.1", 40000)) as client:
        yield client


def csrf_requests(marker: Path) -> list[tuple[str, str]]:
    """(path, text/plain body) of each way a page could register a command spec."""
    spec = command_spec("pwned", marker)
    load = {"parameters": {"config": json.dumps(spec)}}
    return [("/v2/admin/models", json.dumps(spec)), ("/v2/repository/models/pwned/load", json.dumps(load))]


@pytest.mark.parametrize("endpoint", [0, 1], ids=["create", "repository-load"])
def test_a_cross_site_text_plain_post_registers_nothing(
    local: TestClient, real_redis_url: str, redis_prefix: str, tmp_path: Path, endpoint: int
) -> None:
    # Attack: the CSRF request itself (text/plain, a foreign Origin, from loopback).
    path, body = csrf_requests(tmp_path / "marker")[endpoint]
    headers = {**PLAIN, "Origin": EVIL, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    response = local.post(path, content=body, headers=headers)
    assert response.status_code == 403, response.text
    assert stored(real_redis_url, redis_prefix) == {}


@pytest.mark.parametrize("endpoint", [0, 1], ids=["create", "repository-load"])
def test_a_text_plain_body_is_refused_with_415_even_without_browser_markers(
    local: TestClient, real_redis_url: str, redis_prefix: str, tmp_path: Path, endpoint: int
) -> None:
    # Bad input: a body that is not declared JSON (the only kind a browser may send cross-site unasked).
    path, body = csrf_requests(tmp_path / "marker")[endpoint]
    response = local.post(path, content=body, headers=PLAIN)
    assert response.status_code == 415, response.text
    assert "application/json" in response.json()["error"]
    form = local.post(path, content=b"a=b", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415, form.text
    undeclared = local.post(path, content=body, headers={"Content-Type": ""})
    assert undeclared.status_code == 415, undeclared.text
    assert stored(real_redis_url, redis_prefix) == {}


@pytest.mark.parametrize(
    "markers",
    [
        {"Origin": EVIL},
        {"Origin": "null"},  # a sandboxed iframe or a file:// page
        {"Origin": "http://127.0.0.1:3000"},  # another port on the same host: same-site, not same-origin
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://127.0.0.1:8698", "Sec-Fetch-Site": "cross-site"},
    ],
    ids=["foreign-origin", "null-origin", "other-port", "cross-site", "same-site", "own-origin-but-cross-site"],
)
def test_a_json_request_from_another_site_is_refused(
    local: TestClient, real_redis_url: str, redis_prefix: str, tmp_path: Path, markers: dict[str, str]
) -> None:
    # Attack: a well-formed JSON request, but one a browser sent on another site's behalf.
    spec = command_spec("pwned", tmp_path / "marker")
    assert local.post("/v2/admin/models", json=spec, headers=markers).status_code == 403
    assert local.post("/v2/repository/models/pwned/load", json={"parameters": {"config": spec}},
                      headers=markers).status_code == 403
    assert local.get("/v2/admin/models", headers=markers).status_code == 403, "reads are refused too"
    assert stored(real_redis_url, redis_prefix) == {}


def test_a_foreign_origin_is_refused_even_with_the_admin_key(real_redis_url: str, redis_prefix: str) -> None:
    # Attack: a page on another site that somehow holds the key; the browser's word is what counts.
    settings = Settings(redis_url=real_redis_url, redis_prefix=redis_prefix, admin_key="k", models_file="")
    app = FastAPI()
    app.include_router(admin_router(settings))
    with TestClient(app, base_url="http://proxy.internal:8698", client=("203.0.113.7", 40000)) as client:
        auth = {"Authorization": "Bearer k"}
        assert client.get("/v2/admin/models", headers={**auth, "Origin": EVIL}).status_code == 403
        # The proxy's own origin (a same-origin page) with the key is fine.
        own = {**auth, "Origin": "http://proxy.internal:8698", "Sec-Fetch-Site": "same-origin"}
        assert client.get("/v2/admin/models", headers=own).status_code == 200


def test_without_a_key_loopback_callers_with_browser_markers_are_refused(local: TestClient) -> None:
    # Attack: DNS rebinding. A page on evil.example whose name now resolves to 127.0.0.1 is "same-origin"
    # by every header, so without a key the loopback exemption must not cover any browser at all.
    rebound = {"Origin": "http://127.0.0.1:8698", "Sec-Fetch-Site": "same-origin"}
    refused = local.get("/v2/admin/models", headers=rebound)
    assert refused.status_code == 403 and "browser" in refused.json()["error"]
    assert local.get("/v2/admin/models", headers={"Sec-Fetch-Mode": "navigate"}).status_code == 403
    # A rebound request with no browser headers still names the attacker's host.
    assert local.get("/v2/admin/models", headers={"Host": "evil.example:8698"}).status_code == 403
    # curl, scripts and the CLI: no browser markers, a loopback Host.
    assert local.get("/v2/admin/models").status_code == 200
    for host in ("localhost:8698", "localhost", "127.0.0.1", "[::1]:8698", "[::1]"):
        assert local.get("/v2/admin/models", headers={"Host": host}).status_code == 200, host


def test_json_with_a_charset_and_bodiless_calls_are_accepted(local: TestClient) -> None:
    spec = {"name": "echo", "model_class": "examples.models.echo.model:EchoModel"}
    created = local.post("/v2/admin/models", content=json.dumps(spec),
                         headers={"Content-Type": "application/json; charset=utf-8"})
    assert created.status_code == 201, created.text
    assert local.post("/v2/repository/models/echo/unload").status_code == 200, "no body, no content type: fine"
    assert local.delete("/v2/admin/models/echo").status_code == 200


def test_against_a_running_proxy_the_csrf_request_runs_nothing(
    real_redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    # Attack, end to end: `inferoxy serve` (process runtime, no admin key) and both CSRF requests.
    import httpx

    env = {"INFEROXY_REDIS_URL": real_redis_url, "INFEROXY_REDIS_PREFIX": redis_prefix, "INFEROXY_MODELS_FILE": "",
           "INFEROXY_BRIDGES": "rest", "INFEROXY_ADMIN_KEY": ""}
    with ProxyProcess(env=env) as proxy:
        for path, body in csrf_requests(tmp_path / "pwned"):
            response = httpx.post(proxy.rest_url + path, content=body, timeout=30,
                                  headers={**PLAIN, "Origin": EVIL, "Sec-Fetch-Site": "cross-site"})
            assert response.status_code == 403, response.text
        # The control: the same kind of spec sent as a script sends it (JSON, no browser) does run, so the
        # marker below would have appeared had the refused spec been stored.
        control = command_spec("control", tmp_path / "control")
        assert httpx.post(proxy.rest_url + "/v2/admin/models", json=control, timeout=30).status_code == 201
        wait_for(lambda: (tmp_path / "control").exists(), timeout=30, what="the control command to run")
        assert set(stored(real_redis_url, redis_prefix)) == {b"control/1"}
        assert not (tmp_path / "pwned").exists()
