"""The admin API's key routes (docs/ADMIN.md, "API keys"), guarded like every admin route.

``GET /v2/admin/keys`` lists keys (names, scopes, models, limits: never a secret);
``POST /v2/admin/keys`` creates one and answers its secret, once; ``DELETE
/v2/admin/keys/{name}`` revokes one, and every bridge refuses it within a second.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from bridges.admin import AdminError, _body, _json
from model_manager.keys import KeyExists

if TYPE_CHECKING:
    from bridges.admin import AdminApi, Handler

log = logging.getLogger(__name__)

_FIELDS = {"name", "scopes", "models", "rate", "burst"}


def add_key_routes(add: Callable[..., None], guard: Callable[[Handler], Handler], api: AdminApi) -> None:
    """Mount the key routes with ``add`` (a router's ``add_route``), each behind ``guard`` (admin access)."""

    async def list_keys(request: Request) -> Response:
        return _json({"keys": [key.public() for key in await api.keys.all()]})

    async def create_key(request: Request) -> Response:
        fields = _create_fields(await _body(request))
        try:
            key, secret = await api.keys.create(**fields)
        except ValidationError as exc:
            problems = [{"field": ".".join(map(str, e["loc"])) or "key", "reason": e["msg"]} for e in exc.errors()]
            raise AdminError(400, "invalid key: " + "; ".join(p["reason"] for p in problems), fields=problems) from None
        except KeyExists as exc:
            raise AdminError(409, str(exc)) from None
        log.info("API key %r created (scopes %s)", key.name, ",".join(key.scopes))
        response = _json({**key.public(), "key": secret}, 201)
        response.headers["Cache-Control"] = "no-store"  # the secret must not linger in a cache
        return response

    async def revoke_key(request: Request) -> Response:
        name = request.path_params["name"]
        if not await api.keys.revoke(name):
            raise AdminError(404, f"no API key named {name!r}")
        log.info("API key %r revoked", name)
        return _json({"revoked": name})

    add("/v2/admin/keys", guard(list_keys), methods=["GET"])
    add("/v2/admin/keys", guard(create_key), methods=["POST"])
    add("/v2/admin/keys/{name}", guard(revoke_key), methods=["DELETE"])


def _create_fields(body: Any) -> dict[str, Any]:
    """The create call's body, ``{"name", "scopes", "models"?, "rate"?, "burst"?}``, as ``create``'s arguments."""
    if not isinstance(body, dict):
        raise AdminError(400, 'the body must be {"name": ..., "scopes": [...]}')
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise AdminError(400, f"unknown field(s) {', '.join(unknown)}",
                         fields=[{"field": f, "reason": "unknown field"} for f in unknown])
    scopes = body.get("scopes", ["infer"])
    if isinstance(scopes, str):
        scopes = [s.strip() for s in scopes.split(",") if s.strip()]
    if not isinstance(scopes, list):
        raise AdminError(400, "scopes must be a list", fields=[{"field": "scopes", "reason": "not a list"}])
    return {"name": body.get("name"), "scopes": scopes, "models": body.get("models"),
            "rate": body.get("rate"), "burst": body.get("burst")}
