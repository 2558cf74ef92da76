"""API keys (model_manager/keys.py, bridges/auth.py): who may infer, on which model, how often, over every bridge.

The bridges run for real (tests/bridge_harness.py) against a real Redis and a fake batch manager.
Each test names the bad credential or the abuse it tries: no key, a wrong one, a revoked one, a key
without the scope or the model, a key over its rate, a key that could leak into the logs.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
import tritonclient.grpc as grpcclient
from fastapi import FastAPI
from starlette.testclient import TestClient
from tritonclient.utils import InferenceServerException

from bridges.admin import admin_router
from bridges.auth import Authorizer, TokenBucket, credential_of_header
from bridges.errors import RequestError
from inferoxy.cli import main as cli_main
from inferoxy.client import AsyncClient, Client, InferenceError
from inferoxy.settings import Settings
from model_manager.keys import ApiKey, KeyStore, digest
from tests.bridge_harness import BridgeStack
from tests.support import ProxyProcess, delete_redis_prefix, wait_for

ROW = np.arange(3, dtype=np.float32)[None]
ECHO = {"x": ROW, "mask": np.ones((1, 2), dtype=bool)}
REST_BODY = {"inputs": [
    {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [0.0, 1.0, 2.0]},
    {"name": "mask", "datatype": "BOOL", "shape": [1, 2], "data": [True, True]},
]}
# A well-formed key nobody created: what a guessing client sends.
FORGED = "ixk_" + "A" * 43


# -- helpers ------------------------------------------------------------------------------------


def run_keys(url: str, prefix: str, action: str, *args: Any, **kwargs: Any) -> Any:
    async def go() -> Any:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            return await getattr(KeyStore(client, prefix), action)(*args, **kwargs)
        finally:
            await client.aclose()

    return asyncio.run(go())


def create_key(stack: BridgeStack, name: str, **fields: Any) -> str:
    """A new key, once every bridge of ``stack`` knows it."""
    fields.setdefault("scopes", ["infer"])
    _, secret = run_keys(stack.redis.url, stack.prefix, "create", name, **fields)
    wait_until_known(stack, name)
    return str(secret)


def wait_until_known(stack: BridgeStack, name: str) -> None:
    bridges = (stack.zmq_bridge, stack.rest_bridge, stack.grpc_bridge)
    wait_for(lambda: all(name in b.gateway.auth.key_names for b in bridges), timeout=5, what=f"bridges to know {name}")


def zmq_code(stack: BridgeStack, key: str | None, model: str = "echo") -> str:
    """'ok', or the error code the ZeroMQ bridge answers."""
    inputs = ECHO if model == "echo" else {"x": ROW}
    with Client(stack.zmq_url, timeout=5, api_key=key) as client:
        try:
            client.infer(model, inputs)
        except InferenceError as exc:
            return exc.code
    return "ok"


def rest_call(stack: BridgeStack, key: str | None, model: str = "echo") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    body = REST_BODY if model == "echo" else {"inputs": [REST_BODY["inputs"][0]]}
    return httpx.post(f"{stack.rest_url}/v2/models/{model}/infer", json=body, headers=headers, timeout=5)


def grpc_status(stack: BridgeStack, key: str | None, model: str = "echo") -> str:
    """'OK', or the gRPC status name the bridge answers (tritonclient sends ``headers=`` as metadata)."""
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    tensor = grpcclient.InferInput("x", [1, 3], "FP32")
    tensor.set_data_from_numpy(ROW)
    inputs = [tensor]
    if model == "echo":
        mask = grpcclient.InferInput("mask", [1, 2], "BOOL")
        mask.set_data_from_numpy(np.ones((1, 2), dtype=bool))
        inputs.append(mask)
    headers = {"authorization": f"Bearer {key}"} if key is not None else None
    try:
        client.infer(model, inputs, headers=headers)
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode.")
    finally:
        client.close()
    return "OK"


@pytest.fixture(scope="module")
def keyed(real_redis_url: str) -> Iterator[BridgeStack]:
    """The three bridges on a real Redis, in the default ``auto`` mode, with keys created by the tests."""
    prefix = f"inferoxy-test-keys-{time.monotonic_ns()}"
    stack = BridgeStack(redis_url=real_redis_url, redis_prefix=prefix).start()
    try:
        # An admin key from the start, so tests that create admin-scoped keys do not depend on their order.
        stack.admin_secret = create_key(stack, "root", scopes=["admin"])  # type: ignore[attr-defined]
        yield stack
    finally:
        stack.stop()
        delete_redis_prefix(real_redis_url, prefix)


# -- the token bucket and the authorizer, alone ----------------------------------------------------


def test_token_bucket_lets_through_its_rate_plus_its_burst() -> None:
    # A client offering 200 req/s to a 50 req/s key, on a clock the test drives: 5 s of it.
    bucket = TokenBucket(rate=50, burst=5, now=0.0)
    accepted = sum(bucket.take(i / 200) == 0 for i in range(1000))
    assert accepted == 5 + 250 - 1  # the burst, then one every 20 ms (the last tick lands at 4.995 s)
    wait = bucket.take(4.995)
    assert 0 < wait <= 1 / 50, "a refusal says how long until the next token"


def test_authorizer_modes_scopes_and_models() -> None:
    infer = ApiKey(name="app", digest=digest("k-app"), scopes=["infer"], models=["echo"])
    admin = ApiKey(name="ops", digest=digest("k-ops"), scopes=["admin"])

    def authorizer(mode: str, admin_key: str | None = None) -> Authorizer:
        auth = Authorizer(Settings(auth=mode, admin_key=admin_key))  # type: ignore[arg-type]
        auth.apply([])
        return auth

    def code(auth: Authorizer, credential: object, model: str = "echo") -> str:
        try:
            auth.check(credential, model)
        except RequestError as exc:
            return exc.code
        return "ok"

    auto = authorizer("auto", admin_key="bootstrap")
    assert code(auto, None) == "ok", "auto with no key: open"
    auto.apply([infer, admin])
    # No key, an empty one, one of the wrong type, a wrong one, a megabyte one (refused unhashed), the right one.
    tries = (None, "", 7, "wrong", "k" * 1_000_000, "k-app")
    assert [code(auto, c) for c in tries] == ["unauthenticated"] * 5 + ["ok"]
    assert code(auto, "k-app", "other") == "forbidden", "a key limited to echo asks for another model"
    assert code(auto, "k-ops") == "forbidden", "an admin-only key asks to infer"
    assert code(auto, "bootstrap") == "forbidden", "INFEROXY_ADMIN_KEY is an admin key, not an inference key"
    auto.apply([], revision=4)
    assert code(auto, None) == "unauthenticated", "the last key revoked (a leaked one?): auto stays closed"

    required = authorizer("required")
    assert code(required, None) == "unauthenticated", "required with no key at all refuses everyone"
    off = authorizer("off")
    off.apply([infer])
    assert code(off, None) == "ok" and code(off, "wrong") == "ok", "off checks nothing"

    unread = Authorizer(Settings(auth="auto"))
    assert code(unread, None) == "not_ready", "auto before the keys are read does not guess 'open'"

    closed = Authorizer(Settings(auth="auto", auth_metadata=True))
    closed.apply([infer])
    with pytest.raises(RequestError, match="API key"):
        closed.check_metadata("k-app", "other")
    closed.check_metadata("k-app", "echo")
    open_metadata = authorizer("auto")
    open_metadata.apply([infer])
    open_metadata.check_metadata(None, "echo")  # metadata stays open by default


def test_credential_of_header() -> None:
    assert credential_of_header("Bearer abc") == "abc"
    assert credential_of_header("bearer   abc ") == "abc"
    assert credential_of_header("Basic abc") is None, "another scheme is not a key"
    assert credential_of_header("Bearer") is None and credential_of_header(None) is None


def test_keys_are_stored_hashed_and_listed_without_the_secret(real_redis_url: str, redis_prefix: str) -> None:
    key, secret = run_keys(real_redis_url, redis_prefix, "create", "app", ["infer"], rate=5.0)
    raw = redis.Redis.from_url(real_redis_url).hgetall(f"{redis_prefix}:keys")
    assert secret.encode() not in b"".join(raw.values()), "the secret itself is never stored"
    assert digest(secret).encode() in raw[b"app"]
    assert secret.startswith("ixk_") and len(secret) >= 40
    listed = run_keys(real_redis_url, redis_prefix, "all")
    assert [k.public() for k in listed] == [key.public()] and "digest" not in key.public()
    with pytest.raises(Exception, match="exists already"):
        run_keys(real_redis_url, redis_prefix, "create", "app", ["infer"])
    with pytest.raises(Exception, match="name"):
        run_keys(real_redis_url, redis_prefix, "create", "../etc", ["infer"])
    with pytest.raises(Exception, match="scopes"):
        run_keys(real_redis_url, redis_prefix, "create", "nobody", ["root"])


# -- over the three bridges ------------------------------------------------------------------------


def test_missing_wrong_unscoped_and_forbidden_keys_are_refused_on_every_bridge(keyed: BridgeStack) -> None:
    good = create_key(keyed, "good")
    admin_only = create_key(keyed, "admin-only", scopes=["admin"])
    any_only = create_key(keyed, "any-only", models=["any"])

    for key, zmq, rest, grpc in [
        (None, "unauthenticated", 401, "UNAUTHENTICATED"),       # no key at all
        (FORGED, "unauthenticated", 401, "UNAUTHENTICATED"),     # a guessed key
        (admin_only, "forbidden", 403, "PERMISSION_DENIED"),     # no infer scope
        (any_only, "forbidden", 403, "PERMISSION_DENIED"),       # another model than its own
        (good, "ok", 200, "OK"),
    ]:
        assert zmq_code(keyed, key) == zmq
        response = rest_call(keyed, key)
        assert response.status_code == rest, response.text
        assert grpc_status(keyed, key) == grpc
    assert rest_call(keyed, None).headers["www-authenticate"] == "Bearer"
    assert zmq_code(keyed, any_only, model="any") == "ok", "the model it is limited to"

    # Health and metadata stay open without a key.
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/echo", "/v2/models/echo/ready", "/v2"):
        assert httpx.get(keyed.rest_url + path, timeout=5).status_code == 200, path

    # INFEROXY_AUTH_METADATA=true (switched on the running bridges): model metadata needs a key, health does not.
    gateways = (keyed.rest_bridge.gateway, keyed.grpc_bridge.gateway)
    for gateway in gateways:
        gateway.auth.metadata_closed = True
    try:
        assert httpx.get(f"{keyed.rest_url}/v2/models/echo", timeout=5).status_code == 401
        assert httpx.get(f"{keyed.rest_url}/v2/models/echo", headers={"Authorization": f"Bearer {good}"},
                         timeout=5).status_code == 200
        assert httpx.get(f"{keyed.rest_url}/v2/models/echo", headers={"Authorization": f"Bearer {any_only}"},
                         timeout=5).status_code == 403, "a key limited to another model"
        assert httpx.get(f"{keyed.rest_url}/v2/models/echo/ready", timeout=5).status_code == 200
        client = grpcclient.InferenceServerClient(keyed.grpc_url)
        try:
            with pytest.raises(InferenceServerException) as refused:
                client.get_model_metadata("echo")
            assert str(refused.value.status()) == "StatusCode.UNAUTHENTICATED"
            assert client.get_model_metadata("echo", headers={"authorization": f"Bearer {good}"}).name == "echo"
        finally:
            client.close()
    finally:
        for gateway in gateways:
            gateway.auth.metadata_closed = False


def test_a_key_over_its_rate_is_refused_with_retry_after_on_every_bridge(keyed: BridgeStack) -> None:
    # Burst 1 at 0.1/s: the second request within 10 s is over the rate, on each bridge (buckets are per bridge).
    slow = create_key(keyed, "slow", rate=0.1, burst=1)
    assert zmq_code(keyed, slow) == "ok"
    with Client(keyed.zmq_url, timeout=5, api_key=slow) as client, pytest.raises(InferenceError) as refused:
        client.infer("echo", ECHO)
    assert refused.value.code == "rate_limited" and refused.value.retry_after_s is not None
    assert 0 < refused.value.retry_after_s <= 10

    assert rest_call(keyed, slow).status_code == 200
    limited = rest_call(keyed, slow)
    assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 10, limited.text

    assert grpc_status(keyed, slow) == "OK"
    assert grpc_status(keyed, slow) == "RESOURCE_EXHAUSTED"


def test_a_revoked_key_is_refused_by_every_running_bridge_within_a_second(keyed: BridgeStack) -> None:
    doomed = create_key(keyed, "doomed")
    assert (zmq_code(keyed, doomed), rest_call(keyed, doomed).status_code, grpc_status(keyed, doomed)) == (
        "ok", 200, "OK")
    assert run_keys(keyed.redis.url, keyed.prefix, "revoke", "doomed") is True
    revoked_at = time.monotonic()

    def refused_everywhere() -> bool:
        return (zmq_code(keyed, doomed) == "unauthenticated" and rest_call(keyed, doomed).status_code == 401
                and grpc_status(keyed, doomed) == "UNAUTHENTICATED")

    wait_for(refused_everywhere, timeout=1.0, interval=0.01, what="the revoked key to be refused by all bridges")
    assert time.monotonic() - revoked_at < 1.0


def test_rate_limit_is_accurate_under_four_times_the_offered_load(keyed: BridgeStack) -> None:
    """A key limited to 50 req/s, offered 200 req/s for 5 s over ZeroMQ: 50 ± 10% a second get through."""
    rate, offered, window_s = 50.0, 200.0, 5.0
    metered = create_key(keyed, "metered", rate=rate, burst=5)

    async def drive() -> tuple[int, int, float]:
        async with AsyncClient(keyed.zmq_url, timeout=10, api_key=metered) as client:
            async def one() -> str:
                try:
                    await client.infer("echo", ECHO)
                except InferenceError as exc:
                    return exc.code
                return "ok"

            loop = asyncio.get_running_loop()
            start = loop.time()
            calls = []
            for i in range(int(offered * window_s)):
                # Pacing the offered load (not waiting for anything): request i leaves at start + i/200.
                delay = start + i / offered - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                calls.append(asyncio.ensure_future(one()))
            sent_for = loop.time() - start
            outcomes = await asyncio.gather(*calls)
        return outcomes.count("ok"), outcomes.count("rate_limited"), sent_for

    accepted, refused, sent_for = asyncio.run(drive())
    assert accepted + refused == offered * window_s, "every request is answered, accepted or rate_limited"
    # The window is how long the load was offered (5 s, a little more on a loaded machine); it must have been
    # well above the limit throughout, or the count would say nothing about the bucket.
    assert offered * window_s / sent_for >= 2 * rate, f"the load generator offered too little ({sent_for:.2f}s)"
    per_second = accepted / sent_for
    assert rate * 0.9 <= per_second <= rate * 1.1, f"{accepted} accepted in {sent_for:.2f}s: {per_second:.1f}/s"


def test_keys_never_reach_the_logs_or_the_bus(keyed: BridgeStack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    admin = {"Authorization": f"Bearer {keyed.admin_secret}"}  # type: ignore[attr-defined]
    created = httpx.post(f"{keyed.rest_url}/v2/admin/keys", json={"name": "secretive", "scopes": ["infer"],
                                                                  "rate": 1000, "burst": 1}, headers=admin, timeout=5)
    assert created.status_code == 201, created.text
    assert created.headers["cache-control"] == "no-store"
    secret = created.json()["key"]
    wait_until_known(keyed, "secretive")
    before = len(keyed.batch_manager.received)
    for key in (secret, FORGED):  # a valid key and a guessed one: neither may be written down
        zmq_code(keyed, key)
        rest_call(keyed, key)
        grpc_status(keyed, key)
        zmq_code(keyed, key, model="no-such-model")
        rest_call(keyed, key, model="no-such-model")
    assert httpx.delete(f"{keyed.rest_url}/v2/admin/keys/secretive", headers=admin, timeout=5).status_code == 200
    assert "secretive" in caplog.text, "the key's name is logged (created, revoked)"
    for key in (secret, FORGED, keyed.admin_secret):  # type: ignore[attr-defined]
        assert key not in caplog.text
    forwarded = keyed.batch_manager.received[before:]
    assert forwarded and not any("api_key" in message for message in forwarded), "the key never goes on the bus"


def test_cli_creates_lists_and_revokes_keys(keyed: BridgeStack, capsys: pytest.CaptureFixture[str]) -> None:
    def cli(*args: str) -> tuple[int, str]:
        code = cli_main(["keys", "--url", keyed.rest_url, "--key", keyed.admin_secret, *args])  # type: ignore[attr-defined]
        return code, capsys.readouterr().out

    code, out = cli("create", "cli-app", "--scopes", "infer", "--models", "echo,any", "--rate", "20", "--burst", "4")
    assert code == 0, out
    *lines, secret = out.rstrip("\n").split("\n")
    assert secret.startswith("ixk_") and " " not in secret, "the key is alone on the last line"
    assert not any(secret in line for line in lines)
    wait_until_known(keyed, "cli-app")
    assert zmq_code(keyed, secret) == "ok"

    code, listing = cli("list")
    assert code == 0 and "cli-app" in listing and "echo,any" in listing and "20/s burst 4" in listing
    assert secret not in listing and "ixk_" not in listing, "list never shows a key"

    assert cli("revoke", "cli-app")[0] == 0
    assert "cli-app" not in cli("list")[1]
    assert cli("revoke", "cli-app")[0] == 3, "revoking a key that is not there: not found"
    assert cli("create", "bad", "--scopes", "root")[0] == 5, "an unknown scope is refused"
    assert cli_main(["keys", "--url", keyed.rest_url, "list"]) == 4, "an admin key exists: loopback alone is refused"
    assert cli_main(["keys", "--url", keyed.rest_url, "--key", FORGED, "list"]) == 4


def test_auto_mode_requires_keys_once_the_first_one_is_created(real_redis_url: str, redis_prefix: str) -> None:
    stack = BridgeStack(redis_url=real_redis_url, redis_prefix=redis_prefix).start()
    try:
        assert zmq_code(stack, None) == "ok", "no key exists: inference is open"
        assert rest_call(stack, None).status_code == 200
        assert cli_main(["keys", "--url", stack.rest_url, "create", "first", "--scopes", "infer"]) == 0
        wait_for(lambda: zmq_code(stack, None) == "unauthenticated", timeout=2, what="auto to require a key")
        assert rest_call(stack, None).status_code == 401
        assert grpc_status(stack, None) == "UNAUTHENTICATED"
        # Revoking the only key (a leaked one, say) must not open the proxy to everyone again.
        assert cli_main(["keys", "--url", stack.rest_url, "revoke", "first"]) == 0
        bridges = (stack.zmq_bridge, stack.rest_bridge, stack.grpc_bridge)
        wait_for(lambda: not any(b.gateway.auth.key_names for b in bridges), timeout=2, what="the revocation")
        assert (zmq_code(stack, None), rest_call(stack, None).status_code, grpc_status(stack, None)) == (
            "unauthenticated", 401, "UNAUTHENTICATED")
    finally:
        stack.stop()


# -- the admin API with API keys -------------------------------------------------------------------


def admin_client(url: str, prefix: str, host: str, admin_key: str | None = None) -> TestClient:
    settings = Settings(redis_url=url, redis_prefix=prefix, admin_key=admin_key, models_file="")
    app = FastAPI()
    app.include_router(admin_router(settings))
    # A loopback Host, as curl and the CLI send it (any other is refused without a key: DNS rebinding).
    return TestClient(app, base_url="http://127.0.0.1:8698", client=(host, 40000))


def test_admin_api_takes_keys_with_the_admin_scope(real_redis_url: str, redis_prefix: str) -> None:
    with admin_client(real_redis_url, redis_prefix, "127.0.0.1") as local:
        # No admin key anywhere: loopback administers, and creates the first keys.
        made = local.post("/v2/admin/keys", json={"name": "app", "scopes": "infer"})
        assert made.status_code == 201, made.text
        app_key = made.json()["key"]
        assert local.get("/v2/admin/keys").status_code == 200, "an infer-only key does not end the loopback rule"
        ops_key = local.post("/v2/admin/keys", json={"name": "ops", "scopes": ["infer", "admin"]}).json()["key"]
        refused = local.get("/v2/admin/keys")
        assert refused.status_code == 401, "once an admin key exists, loopback alone no longer administers"
        assert local.get("/v2/admin/keys", headers={"Authorization": f"Bearer {ops_key}"}).status_code == 200
        bad = local.post("/v2/admin/keys", json={"name": "x", "scopes": ["infer"], "rate": -1},
                         headers={"Authorization": f"Bearer {ops_key}"})
        assert bad.status_code == 400 and bad.json()["fields"][0]["field"] == "rate"
    with admin_client(real_redis_url, redis_prefix, "203.0.113.7", admin_key="bootstrap") as remote:
        assert remote.get("/v2/admin/models", headers={"Authorization": f"Bearer {app_key}"}).status_code == 403
        assert remote.get("/v2/admin/models", headers={"Authorization": f"Bearer {ops_key}"}).status_code == 200
        assert remote.get("/v2/admin/models", headers={"Authorization": "Bearer bootstrap"}).status_code == 200
        assert remote.get("/v2/admin/models", headers={"Authorization": f"Bearer {FORGED}"}).status_code == 403
        listed = remote.get("/v2/admin/keys", headers={"X-Inferoxy-Admin-Key": "bootstrap"}).json()["keys"]
        assert [k["name"] for k in listed] == ["app", "ops"] and all("key" not in k and "digest" not in k
                                                                   for k in listed)
        assert remote.delete("/v2/admin/keys/ops", headers={"Authorization": f"Bearer {ops_key}"}).status_code == 200
        assert remote.get("/v2/admin/models", headers={"Authorization": f"Bearer {ops_key}"}).status_code == 403


def test_a_whole_proxy_logs_no_key_at_debug_level(real_redis_url: str, redis_prefix: str) -> None:
    """`inferoxy serve` (every component, DEBUG logs) and the CLI as a user runs them: the key is printed by
    `keys create` and nowhere else, while it is used, guessed at, and revoked."""
    env = {"INFEROXY_REDIS_URL": real_redis_url, "INFEROXY_REDIS_PREFIX": redis_prefix, "INFEROXY_LOG_LEVEL": "DEBUG"}
    with ProxyProcess(env=env) as proxy:
        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "inferoxy", "keys", "--url", proxy.rest_url, *args],
                                  capture_output=True, text=True, timeout=30, env=proxy.env)

        created = cli("create", "e2e", "--scopes", "infer", "--rate", "100")
        assert created.returncode == 0, created.stderr
        secret = created.stdout.rstrip("\n").split("\n")[-1]
        inputs = {"x": np.ones((1, 2), np.float32)}

        def code(key: str | None) -> str:
            with Client(proxy.zmq_url, timeout=30, api_key=key) as client:
                try:
                    client.infer("echo", inputs)
                except InferenceError as exc:
                    return exc.code
            return "ok"

        wait_for(lambda: code(None) == "unauthenticated", timeout=5, what="the proxy to require a key")
        assert code(secret) == "ok" and code(FORGED) == "unauthenticated"
        assert rest_call_at(proxy.rest_url, secret).status_code == 200
        assert cli("revoke", "e2e").returncode == 0
        wait_for(lambda: code(secret) == "unauthenticated", timeout=1, what="the revocation")
        proxy.stop()
    everything = "".join(proxy.output)
    assert "e2e" in everything, "the key's name is logged"
    assert secret not in everything and FORGED not in everything


def rest_call_at(url: str, key: str) -> httpx.Response:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 1.0]}]}
    return httpx.post(f"{url}/v2/models/echo/infer", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
