"""The dashboard's routes on the REST bridge: ``GET /dashboard`` (a static page and its script and style,
shipped in the package: bridges/static/) and ``GET /dashboard/state`` (the JSON it polls: bridges/overview.py).

Who may call: the page, its script and style are static and reveal nothing, so they are open; the state shows
every model's name and traffic, so it takes what ``/metrics`` takes (``Authorizer.check_observer``). The page
asks for a key when the state answers 401 or 403 and sends it as ``Authorization: Bearer`` (docs/SECURITY.md).
A browser's call from another site's page is refused (the admin API's rule), though without CORS headers such
a page could not read the answer anyway.

Every answer carries a Content-Security-Policy that allows only this origin's own script, style and fetches
(no inline script, so an injected string cannot run), forbids framing (clickjacking), and ``nosniff``.
"""

from __future__ import annotations

from importlib import resources

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridges.admin_access import AdminError, refuse_cross_site
from bridges.auth import credential_of_header
from bridges.errors import RequestError
from bridges.gateway import Gateway
from bridges.overview import Overview

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# name -> media type; read once, from the package (so it works from a wheel and offline).
STATIC = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def static_file(name: str) -> bytes:
    return resources.files("bridges").joinpath("static", name).read_bytes()


def dashboard_routes(gateway: Gateway, overview: Overview | None = None) -> list[Route]:
    view = overview or Overview(lambda: gateway.registry, gateway.statuses)
    files = {name: (static_file(name), media_type) for name, media_type in STATIC.items()}

    def serve(name: str) -> Response:
        body, media_type = files[name]
        # no-cache: revalidated each load, so a proxy upgrade never runs yesterday's script against today's JSON.
        return Response(body, media_type=media_type, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    def route(path: str, name: str) -> Route:
        async def endpoint(request: Request) -> Response:
            return serve(name)

        return Route(path, endpoint, methods=["GET"])

    async def state(request: Request) -> Response:
        try:
            refuse_cross_site(request)
            gateway.auth.check_observer(credential_of_header(request.headers.get("authorization")))
        except AdminError as exc:
            return _json_error(str(exc), exc.status)
        except RequestError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else {}
            return _json_error(exc.message, exc.http_status, headers)
        body = await view.state()
        return Response(body, media_type="application/json",
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})

    return [
        route("/dashboard", "dashboard.html"),
        route("/dashboard/", "dashboard.html"),
        *(route(f"/dashboard/{name}", name) for name in STATIC if name != "dashboard.html"),
        Route("/dashboard/state", state, methods=["GET"]),
    ]


def _json_error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, media_type="application/json",
                    headers={**SECURITY_HEADERS, **(headers or {})})
