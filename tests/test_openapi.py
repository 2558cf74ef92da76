"""``/openapi.json`` describes every route the REST bridge serves, and ``/docs`` works with no internet access."""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import httpx
from starlette.routing import Route

from tests.bridge_harness import BridgeStack
from tests.support import require_program


def _routes(routes: list[Any]) -> Iterator[Route]:
    for route in routes:
        if isinstance(route, Route):
            yield route
        elif hasattr(route, "original_router"):  # an included router (the admin API), as FastAPI keeps it
            yield from _routes(route.original_router.routes)


def served(stack: BridgeStack) -> set[tuple[str, str]]:
    """(method, path) of every /v2 route and /metrics the app serves."""
    pairs = set()
    for route in _routes(stack.rest_bridge.app.routes):
        if route.path.startswith("/v2") or route.path == "/metrics":
            pairs |= {(method, route.path) for method in route.methods or () if method != "HEAD"}
    return pairs


def test_openapi_describes_every_route_served(stack: BridgeStack) -> None:
    with httpx.Client(base_url=stack.rest_url) as http:
        answer = http.get("/openapi.json")
    assert answer.status_code == 200
    document = answer.json()
    described = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    routes = served(stack)
    assert routes - described == set(), "served but not described"
    assert described - routes == set(), "described but not served"
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]
    body = infer["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert set(document["components"]["schemas"][body]["properties"]) >= {"id", "inputs", "outputs", "parameters"}
    assert {p["name"] for p in infer["parameters"]} == {"name"}
    stats = document["paths"]["/v2/models/stats"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert stats["$ref"].endswith("/Statistics")


def test_docs_page_loads_nothing_from_outside(stack: BridgeStack) -> None:
    with httpx.Client(base_url=stack.rest_url) as http:
        page = http.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        linked = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text) + re.findall(r"url: ?'([^']+)'", page.text)
        assert linked, page.text
        for url in linked:
            assert not re.match(r"^(https?:)?//", url), f"/docs links outside the proxy: {url}"
            fetched = http.get(url)
            assert fetched.status_code == 200 and fetched.content, url
        assert "validatorUrl" in page.text, "Swagger UI's validator badge would be fetched from outside"
        assert http.get("/docs/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
        assert http.get("/docs/..%2Fcore.py").status_code == 404
        assert http.get("/docs/core.py").status_code == 404


def test_docs_stay_open_when_metadata_is_closed() -> None:
    """A description of the API, the same for every Inferoxy: no model, key or traffic in it (docs/SECURITY.md)."""
    stack = BridgeStack(auth="required", auth_metadata=True).start()
    try:
        with httpx.Client(base_url=stack.rest_url) as http:
            assert http.get("/openapi.json").status_code == 200
            assert http.get("/docs").status_code == 200
            assert http.get("/v2/models/echo").status_code == 401, "metadata itself is closed"
            assert "echo" not in http.get("/openapi.json").text
    finally:
        stack.stop()



def test_docs_render_in_a_real_browser(stack: BridgeStack) -> None:
    """Swagger UI draws every described operation in headless Chromium, with nothing but the proxy to load from."""
    chromium = require_program("chromium", "INFEROXY_REQUIRE_CHROMIUM")
    with tempfile.TemporaryDirectory() as profile:
        shown = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", f"{stack.rest_url}/docs"],
            capture_output=True, text=True, timeout=120, check=False)
    drawn = set(re.findall(r'data-path="([^"]+)"', shown.stdout))
    with httpx.Client(base_url=stack.rest_url) as http:
        described = set(http.get("/openapi.json").json()["paths"])
    assert drawn == described, shown.stderr[-2000:]
