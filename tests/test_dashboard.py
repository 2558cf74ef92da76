"""GET /dashboard and GET /dashboard/state on the REST bridge (bridges/dashboard.py): what they answer, to whom,
and with which security headers. The page in a real browser: tests/test_dashboard_browser.py."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from bridges.auth import Authorizer
from bridges.dashboard import SECURITY_HEADERS, STATIC, dashboard_routes
from inferoxy.settings import Settings
from model_manager.keys import ApiKey, digest
from model_manager.spec import ModelSpec, ModelStatus
from model_manager.store import Registry
from tests.bridge_harness import BridgeStack
from tests.support import REPO


def test_the_page_loads_with_its_script_and_style_from_the_proxy(stack: BridgeStack) -> None:
    page = httpx.get(f"{stack.rest_url}/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    # Everything it loads comes from the proxy itself: no CDN, works offline.
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and all(s.startswith("/dashboard/") for s in sources), sources
    # No inline script: the policy forbids it, so an injected string could not run either.
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
    assert "style=" not in html
    for source in sources:
        answer = httpx.get(f"{stack.rest_url}{source}")
        assert answer.status_code == 200, source
        assert answer.headers["x-content-type-options"] == "nosniff"
    script = httpx.get(f"{stack.rest_url}/dashboard/dashboard.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "/dashboard/state" in script.text
    assert "innerHTML" not in script.text, "values from the server go in as text, never as HTML"


def test_every_answer_carries_the_security_headers(stack: BridgeStack) -> None:
    for path in ("/dashboard", "/dashboard/dashboard.js", "/dashboard/dashboard.css", "/dashboard/state"):
        headers = httpx.get(f"{stack.rest_url}{path}").headers
        policy = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert "http" not in policy, "nothing is loaded from elsewhere"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
    assert httpx.get(f"{stack.rest_url}/dashboard/state").headers["cache-control"] == "no-store"


def test_the_state_shows_every_model_version_with_its_serving_state(stack: BridgeStack) -> None:
    answer = httpx.get(f"{stack.rest_url}/dashboard/state")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    state = answer.json()
    rows = {f"{m['name']}/{m['version']}": m for m in state["models"]}
    assert {"echo/1", "echo/2", "fail/1", "slow/1"} <= set(rows)
    assert rows["echo/1"]["state"] == "ready" and rows["echo/1"]["default"] is True
    assert rows["echo/2"]["state"] == "degraded" and rows["echo/2"]["desired_replicas"] == 2
    assert rows["fail/1"]["state"] == "failed" and "not found" in rows["fail/1"]["reason"]
    assert rows["slow/1"]["state"] == "unknown"
    # The spec's metadata (tests/bridge_harness.py gives echo/2 some, echo/1 none).
    assert (rows["echo/2"]["description"], rows["echo/2"]["framework"]) == ("Echo, taking pairs.", "numpy")
    assert (rows["echo/1"]["description"], rows["echo/1"]["framework"]) == (None, None)
    for field in ("queue_depth", "requests", "errors", "request_rate", "latency_p50_s", "latency_p99_s",
                  "batch_size_mean", "replicas", "restarts"):
        assert field in rows["echo/1"], field
    assert state["problems"] == []


def test_a_page_on_another_site_is_refused(stack: BridgeStack) -> None:
    cross = httpx.get(f"{stack.rest_url}/dashboard/state", headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    foreign = httpx.get(f"{stack.rest_url}/dashboard/state", headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403
    own = httpx.get(f"{stack.rest_url}/dashboard/state", headers={"Sec-Fetch-Site": "same-origin"})
    assert own.status_code == 200


class FakeGateway:
    """What the dashboard's routes use of a gateway: the keys, the registry and the statuses."""

    def __init__(self, auth: Authorizer) -> None:
        self.auth = auth
        spec = ModelSpec(name="m", model_class="x:Y")
        self.registry = Registry({spec.key: spec}, {"m": "1"}, 1)

    async def statuses(self) -> dict[str, ModelStatus]:
        return {"m/1": ModelStatus(name="m", version="1", state="ready", ready_replicas=1, desired_replicas=1,
                                   updated_at=0)}


KEYS = {"admin": ["admin"], "every": ["infer"], "narrow": ["infer"]}


@pytest.fixture
def closed() -> TestClient:
    """A bridge with API keys required and metadata closed (INFEROXY_AUTH_METADATA=true)."""
    auth = Authorizer(Settings(auth="required", auth_metadata=True))
    auth.apply([ApiKey(name=name, digest=digest(f"secret-{name}"), scopes=scopes,
                       models=["m"] if name == "narrow" else None) for name, scopes in KEYS.items()])
    return TestClient(Starlette(routes=dashboard_routes(FakeGateway(auth))))  # type: ignore[arg-type]


def get(client: TestClient, path: str, key: str | None = None) -> Any:
    return client.get(path, headers={"Authorization": f"Bearer {key}"} if key else {})


def test_with_metadata_closed_the_state_needs_an_observer_key(closed: TestClient) -> None:
    missing = get(closed, "/dashboard/state")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert get(closed, "/dashboard/state", "wrong").status_code == 401
    narrow = get(closed, "/dashboard/state", "secret-narrow")
    assert narrow.status_code == 403, "a key for some models only may not see every model's traffic"
    assert "every model" in narrow.json()["error"]
    for name in ("admin", "every"):
        answer = get(closed, "/dashboard/state", f"secret-{name}")
        assert answer.status_code == 200 and answer.json()["models"][0]["name"] == "m"
    # The page itself is static and shows nothing until its script fetches the state with a key.
    assert get(closed, "/dashboard").status_code == 200


def test_the_static_files_ship_in_the_package() -> None:
    """pyproject's package-data names every file the routes serve, so a proxy installed from a wheel serves the
    page too (checked by hand with ``pip wheel .``: bridges/static/ is in it)."""
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["bridges"]
    for name in STATIC:
        assert (REPO / "bridges" / "static" / name).is_file(), name
        assert any(fnmatch.fnmatch(f"static/{name}", pattern) for pattern in patterns), name


def test_the_policy_allows_nothing_from_outside() -> None:
    policy = dict(part.strip().split(" ", 1) for part in SECURITY_HEADERS["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert all(value in ("'self'", "'none'") for value in policy.values()), policy
