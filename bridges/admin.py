"""The admin API: the model registry over HTTP, mounted on the REST bridge (docs/ADMIN.md).

(About 425 lines: one route table and its handlers; the operations are shared with the gRPC repository
calls, so the rules stay written once.)

Every write goes through ``SpecStore``, so it is one Redis transaction plus a change event
that every component applies within a second. Reads come from Redis too, so an admin
sees what is stored, not what one bridge last heard.

Access: with ``INFEROXY_ADMIN_KEY`` set, every admin call must carry it or an API key with the
``admin`` scope (``Authorization: Bearer KEY`` or ``X-Inferoxy-Admin-Key: KEY``); without it,
admin calls are accepted from loopback clients only, and only from those that are not a browser
(no ``Origin``, no ``Sec-Fetch-*``, a loopback ``Host``), until an API key with the ``admin`` scope
exists (then that key is needed, from anywhere). Whatever the key and the address, a call a browser
makes on another site's behalf (``Origin`` not this host, ``Sec-Fetch-Site`` other than same-origin
or none) is refused 403, and a body must be ``application/json`` (415 otherwise): a web page can
send neither without a CORS preflight, which this API never answers (docs/SECURITY.md).
``GET /v2/health/registry`` is open, like the other health endpoints.

Errors are ``{"error": "..."}`` (plus ``fields`` for an invalid spec) with 400 (bad
spec or patch), 401/403 (refused), 404 (no such model or version), 409 (exists
already), 415 (a body that is not JSON), 503 (Redis unreachable: serving continues, changes cannot be stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from bridges.admin_access import (
    AdminError,
    Caller,
    is_loopback,
    refuse_cross_site,
    require_json,
)
from inferoxy.settings import Settings
from model_manager.editing import SpecError, apply_patch, check_runnable, validate_spec
from model_manager.health import registry_health
from model_manager.keys import ApiKey, KeyStore
from model_manager.keys import digest as key_digest
from model_manager.spec import ModelSpec, ModelStatus, version_order
from model_manager.store import SpecStore, open_store

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


class AdminApi:
    """The handlers, sharing one ``SpecStore`` that is opened on first use (so building the app needs no Redis)."""

    def __init__(
        self,
        settings: Settings,
        serving: Callable[[], Any] = lambda: None,
        store: SpecStore | None = None,
    ) -> None:
        self.settings = settings
        self.serving = serving  # the Registry this process serves from (the bridge's gateway snapshot)
        self._store = store

    @property
    def store(self) -> SpecStore:
        if self._store is None:
            self._store = open_store(self.settings.redis_url, self.settings.redis_prefix,
                                     resync_interval_s=self.settings.registry_resync_s)
        return self._store

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None

    # -- access --------------------------------------------------------------------------------

    @property
    def keys(self) -> KeyStore:
        return KeyStore(self.store.client, self.settings.redis_prefix)

    async def admit(self, caller: Caller) -> None:
        """``check_access``, after looking the presented key up among the API keys when it is not the admin key.

        The loopback exemption holds only while no key can administer the proxy: neither
        ``INFEROXY_ADMIN_KEY`` nor an API key with the ``admin`` scope exists."""
        supplied = caller.key
        admin_key = self.settings.admin_key
        if supplied is not None and admin_key and hmac.compare_digest(supplied.encode(), admin_key.encode()):
            self.check_access(caller)
            return
        known = await self.keys.all()
        wanted = key_digest(supplied) if supplied is not None else None
        api_key = None
        for candidate in known:
            if wanted is not None and hmac.compare_digest(candidate.digest, wanted):
                api_key = candidate
        loopback = not admin_key and not any("admin" in candidate.scopes for candidate in known)
        self.check_access(caller, api_key, loopback=loopback)

    def check_access(self, caller: Caller, api_key: ApiKey | None = None, *, loopback: bool = True) -> None:
        if api_key is not None:
            if "admin" not in api_key.scopes:
                raise AdminError(403, f"API key {api_key.name!r} lacks the 'admin' scope")
            return
        key = self.settings.admin_key
        if key or not loopback:
            supplied = caller.key
            if supplied is None:
                raise AdminError(401, "admin calls need the admin key or an API key with the admin scope: "
                                      "Authorization: Bearer KEY or X-Inferoxy-Admin-Key: KEY")
            if not key or not hmac.compare_digest(supplied.encode(), key.encode()):
                raise AdminError(403, "wrong admin key")
            return
        if not is_loopback(caller.host):
            raise AdminError(403, "admin calls are accepted from loopback only while INFEROXY_ADMIN_KEY is unset; "
                                  "set it to administer this proxy remotely")
        if caller.browser:
            # A page in the operator's browser runs on loopback too; with DNS rebinding it even looks same-origin.
            raise AdminError(403, "without INFEROXY_ADMIN_KEY the admin API answers no browser (it sent Origin, "
                                  "Sec-Fetch-* or a Host that is not loopback); use the CLI or curl, or set the key")

    # -- reads ---------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        registry = await self.store.snapshot()
        statuses = await self.store.statuses()
        unloaded = await self.store.unloaded()
        rows = [
            _summary(spec, registry.defaults.get(spec.name) == spec.version, spec.key not in unloaded,
                     statuses.get(spec.key))
            for spec in sorted(registry, key=lambda s: (s.name, version_order(s.version)))
        ]
        return _json({"revision": registry.revision, "models": rows})

    async def show_model(self, request: Request) -> Response:
        name = request.path_params["name"]
        registry = await self.store.snapshot()
        statuses = await self.store.statuses()
        unloaded = await self.store.unloaded()
        versions = sorted((s for s in registry if s.name == name), key=lambda s: version_order(s.version))
        if not versions:
            raise AdminError(404, f"unknown model {name!r}")
        return _json({
            "name": name,
            "default_version": registry.defaults.get(name),
            "revision": registry.revision,
            "versions": [
                {"spec": s.model_dump(mode="json"), "loaded": s.key not in unloaded,
                 "status": _status_dict(statuses.get(s.key))}
                for s in versions
            ],
        })

    async def show_version(self, request: Request) -> Response:
        spec = await self._existing(request.path_params["name"], request.path_params["version"])
        return _json(spec.model_dump(mode="json"))

    # -- writes --------------------------------------------------------------------------------

    def _runnable(self, spec: ModelSpec) -> ModelSpec:
        return check_runnable(spec, self.settings.runtime)

    async def create(self, request: Request) -> Response:
        spec = self._runnable(validate_spec(await _body(request)))
        if spec.version in await self.store.versions(spec.name):
            raise AdminError(409, f"model {spec.key} exists already; replace it with PUT "
                                  f"/v2/admin/models/{spec.name}/versions/{spec.version} or change it with PATCH")
        revision = await self.store.put(spec, make_default=_flag(request, "default"))
        return _json({"revision": revision, "spec": spec.model_dump(mode="json")}, 201)

    async def replace(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params["version"]
        document = await _body(request)
        if isinstance(document, dict):
            for field, expected in (("name", name), ("version", version)):
                if document.setdefault(field, expected) != expected:
                    message = f"the body's {field} {document[field]!r} differs from the path's {expected!r}"
                    raise AdminError(400, message, fields=[{"field": field, "reason": "differs from the path"}])
        spec = self._runnable(validate_spec(document))
        existed = version in await self.store.versions(name)
        revision = await self.store.put(spec, make_default=_flag(request, "default"))
        return _json({"revision": revision, "spec": spec.model_dump(mode="json")}, 200 if existed else 201)

    async def patch(self, request: Request) -> Response:
        name = request.path_params["name"]
        version = request.path_params.get("version") or await self._default_version(name)
        current = await self._existing(name, version)
        spec = self._runnable(apply_patch(current, await _body(request)))
        revision = await self.store.put(spec)
        return _json({"revision": revision, "spec": spec.model_dump(mode="json")})

    async def delete(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        if not await self.store.delete(name, version):
            what = f"{name!r}" if version is None else f"{name!r} version {version!r}"
            raise AdminError(404, f"unknown model {what}")
        return _json({"deleted": name if version is None else f"{name}/{version}",
                      "revision": await self.store.revision()})

    async def set_default(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await _body(request)
        version = body.get("version") if isinstance(body, dict) else None
        if not isinstance(version, str):
            problem = [{"field": "version", "reason": "missing"}]
            raise AdminError(400, 'the body must be {"version": "..."}', fields=problem)
        await self._existing(name, version)
        revision = await self.store.set_default(name, version)
        return _json({"name": name, "default_version": version, "revision": revision})

    # -- Triton's repository extension ---------------------------------------------------------

    async def repository_index(self, request: Request) -> Response:
        body = await _body(request, optional=True)
        return _json(await self.index(only_ready=isinstance(body, dict) and body.get("ready") is True))

    async def load(self, request: Request) -> Response:
        """Serve the model again: its min_replicas and max_replicas come back as they were before ``unload``."""
        parameters = _parameters(await _body(request, optional=True))
        return _json(await self.load_model(request.path_params["name"], parameters))

    async def unload(self, request: Request) -> Response:
        """Stop serving the model: min and max_replicas become 0 so its replicas stop and requests for it are refused
        (not scale to zero, where a request starts one); the spec stays registered."""
        parameters = _parameters(await _body(request, optional=True))
        return _json(await self.unload_model(request.path_params["name"], parameters))

    # The repository calls themselves, shared by REST (above) and gRPC (bridges/grpc_repository.py).

    async def index(self, *, only_ready: bool = False) -> list[dict[str, str]]:
        registry = await self.store.snapshot()
        statuses = await self.store.statuses()
        unloaded = await self.store.unloaded()
        index = []
        for spec in sorted(registry, key=lambda s: (s.name, version_order(s.version))):
            state, reason = _triton_state(spec.key in unloaded, statuses.get(spec.key))
            if not only_ready or state == "READY":
                index.append({"name": spec.name, "version": spec.version, "state": state, "reason": reason})
        return index

    async def load_model(self, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
        config = parameters.get("config")
        if config is not None:
            # Triton's load may carry the model's configuration: here, a spec (JSON text or object).
            document = _config_document(config)
            if isinstance(document, dict):
                document.setdefault("name", name)
            spec = self._runnable(validate_spec(document))
            if spec.name != name:
                raise AdminError(400, f"the config names model {spec.name!r}, not {name!r}")
            await self.store.put(spec)
        specs = await self._targets(name, parameters.get("version"))
        for spec in specs:
            await self.store.load(spec)
        return {"loaded": [s.key for s in specs], "revision": await self.store.revision()}

    async def unload_model(self, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
        specs = await self._targets(name, parameters.get("version"))
        for spec in specs:
            await self.store.unload(spec)
        return {"unloaded": [s.key for s in specs], "revision": await self.store.revision()}

    # -- health (open) -------------------------------------------------------------------------

    async def registry_health(self, request: Request) -> Response:
        store = None
        with contextlib.suppress(RuntimeError):  # no Redis configured: reported as degraded
            store = self.store
        return _json(await registry_health(store, self.serving()))

    # -- helpers -------------------------------------------------------------------------------

    async def _existing(self, name: str, version: str) -> ModelSpec:
        registry = await self.store.snapshot()
        spec = registry.specs.get(f"{name}/{version}")
        if spec is None:
            versions = sorted({s.version for s in registry if s.name == name}, key=version_order)
            if versions:
                raise AdminError(404, f"model {name!r} has no version {version!r}; it has {', '.join(versions)}")
            raise AdminError(404, f"unknown model {name!r}")
        return spec

    async def _default_version(self, name: str) -> str:
        registry = await self.store.snapshot()
        version = registry.defaults.get(name)
        if version is None:
            raise AdminError(404, f"unknown model {name!r}")
        return version

    async def _targets(self, name: str, version: Any) -> list[ModelSpec]:
        if version is not None:
            return [await self._existing(name, str(version))]
        registry = await self.store.snapshot()
        specs = sorted((s for s in registry if s.name == name), key=lambda s: version_order(s.version))
        if not specs:
            raise AdminError(404, f"unknown model {name!r}")
        return specs


def registry_unreachable(exc: BaseException) -> str:
    """What an admin call answers (REST 503, gRPC UNAVAILABLE) while Redis is away."""
    return (f"the model registry (Redis) is unreachable ({exc}); the proxy keeps serving the models it knows, "
            "but changes cannot be stored until Redis is back")


def admin_router(
    settings: Settings, serving: Callable[[], Any] = lambda: None, *, store: SpecStore | None = None
) -> APIRouter:
    """The admin routes. ``serving`` returns the Registry this process serves from (for the health report)."""
    api = AdminApi(settings, serving, store)
    router = APIRouter()

    def admin(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: Request) -> Response:
            try:
                refuse_cross_site(request)  # before any key is looked at: a browser's call never gets further
                await api.admit(Caller.of_request(request))
                require_json(request)
                return await handler(request)
            except AdminError as exc:
                return _json({"error": str(exc), **exc.extra}, exc.status)
            except SpecError as exc:
                return _json({"error": str(exc), "fields": exc.fields}, 400)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                log.warning("admin call %s %s failed: Redis unreachable (%s)", request.method, request.url.path, exc)
                return _json({"error": registry_unreachable(exc)}, 503)
        return guarded

    add = router.add_route
    add("/v2/admin/models", admin(api.list_models), methods=["GET"])
    add("/v2/admin/models", admin(api.create), methods=["POST"])
    add("/v2/admin/models/{name}", admin(api.show_model), methods=["GET"])
    add("/v2/admin/models/{name}", admin(api.patch), methods=["PATCH"])
    add("/v2/admin/models/{name}", admin(api.delete), methods=["DELETE"])
    add("/v2/admin/models/{name}/default", admin(api.set_default), methods=["PUT"])
    add("/v2/admin/models/{name}/versions/{version}", admin(api.show_version), methods=["GET"])
    add("/v2/admin/models/{name}/versions/{version}", admin(api.replace), methods=["PUT"])
    add("/v2/admin/models/{name}/versions/{version}", admin(api.patch), methods=["PATCH"])
    add("/v2/admin/models/{name}/versions/{version}", admin(api.delete), methods=["DELETE"])
    add("/v2/repository/index", admin(api.repository_index), methods=["POST"])
    add("/v2/repository/models/{name}/load", admin(api.load), methods=["POST"])
    add("/v2/repository/models/{name}/unload", admin(api.unload), methods=["POST"])
    add("/v2/health/registry", api.registry_health, methods=["GET"])
    from bridges.admin_keys import add_key_routes  # here: that module builds on this one

    add_key_routes(add, admin, api)
    return router


# -- small pure helpers ---------------------------------------------------------------------------


async def _body(request: Request, *, optional: bool = False) -> Any:
    raw = await request.body()
    if not raw.strip():
        if optional:
            return {}
        raise AdminError(400, "the request needs a JSON body")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise AdminError(400, f"the body is not JSON: {exc}") from None


def _config_document(config: Any) -> Any:
    """Triton's load ``config`` parameter: JSON text, or the object itself."""
    if not isinstance(config, str | bytes):
        return config
    try:
        return orjson.loads(config)
    except orjson.JSONDecodeError as exc:
        raise AdminError(400, f"parameters.config is not JSON: {exc}",
                         fields=[{"field": "parameters.config", "reason": "not JSON"}]) from None


def _parameters(body: Any) -> dict[str, Any]:
    parameters = body.get("parameters") if isinstance(body, dict) else None
    return parameters if isinstance(parameters, dict) else {}


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in {"1", "true", "yes"}


def _status_dict(status: ModelStatus | None) -> dict[str, Any] | None:
    return None if status is None else status.model_dump(mode="json")


def _summary(spec: ModelSpec, is_default: bool, loaded: bool, status: ModelStatus | None) -> dict[str, Any]:
    return {
        "name": spec.name,
        "version": spec.version,
        "default": is_default,
        "loaded": loaded,
        "image": spec.image,
        "model_class": spec.model_class,
        "max_batch_size": spec.max_batch_size,
        "min_replicas": spec.min_replicas,
        "max_replicas": spec.max_replicas,
        "state": None if status is None else status.state,
        "ready_replicas": None if status is None else status.ready_replicas,
        "description": spec.description,
        "framework": spec.framework,
        "labels": spec.labels,
    }


def _triton_state(unloaded: bool, status: ModelStatus | None) -> tuple[str, str]:
    """Triton's model states: READY, LOADING, UNAVAILABLE, UNKNOWN, with a reason."""
    if unloaded:
        return "UNAVAILABLE", "unloaded"
    if status is None:
        return "UNKNOWN", "no status reported yet"
    if status.state in ("ready", "degraded", "idle"):  # idle: scaled to zero, its next request starts a replica
        return "READY", status.reason or ""
    if status.state == "starting":
        return "LOADING", status.reason or ""
    return "UNAVAILABLE", status.reason or status.state
