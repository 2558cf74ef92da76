"""The jobs API on the REST bridge: ``POST /v2/jobs``, ``GET /v2/jobs[/{id}]``, ``DELETE /v2/jobs/{id}``.

A job runs a dataset through a model (``jobs.options.BatchOptions``); the ``job_worker`` component runs it
(jobs/worker.py) and records live in Redis (jobs/store.py). docs/JOBS.md describes the API.

Who may (docs/SECURITY.md): a caller whose API key may infer the model submits; each caller sees and
cancels its own jobs (a job of another key's is 404, as if it did not exist); a key with the ``admin``
scope, or ``INFEROXY_ADMIN_KEY``, sees and cancels every job. With no key required
(``INFEROXY_AUTH=off``, or ``auto`` before the first key) callers cannot be told apart, and everyone sees
every job. A job reads and writes where the proxy can, so local paths are accepted only under
``INFEROXY_JOBS_LOCAL_ROOT`` (resolved, symlinks followed: ``..`` cannot leave it) and refused when it is
unset; otherwise only ``s3://`` URLs. Storage options (credentials) are never shown back: ``GET`` gives
their names with ``***`` for values. As the admin API, a call a browser makes on another site's behalf is
refused (403) and a body must be ``application/json`` (415): a page cannot make a proxy with auth off
write files for it.

Errors are the API's usual ``{"error": "..."}``: 400 (bad options, a refused path), 401/403 (the key),
404 (no such job, or not the caller's; an unknown model), 409 (an ``Idempotency-Key`` reused with other
options), 415, 429 (``jobs_max_queued`` jobs wait already), 503 (Redis unreachable).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from bridges.admin_access import AdminError, refuse_cross_site, require_json
from bridges.auth import credential_of_header
from bridges.errors import RequestError
from bridges.gateway import Gateway
from bridges.rest_reply import json_response
from inferoxy.protocol import ErrorCode
from inferoxy.settings import Settings
from jobs.options import BatchOptions
from jobs.store import IdempotencyConflict, JobRecord, JobStore, QueueFull

log = logging.getLogger(__name__)

Add = Callable[..., None]
IDEMPOTENCY_HEADER = "idempotency-key"
MAX_IDEMPOTENCY_KEY = 255
MAX_BODY_BYTES = 1 << 20
MAX_LISTED = 500


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


class JobsRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def checked_location(location: str, root: str | None, what: str) -> str:
    """``location`` as the job may use it: an s3:// URL as given, or a local path resolved under ``root``."""
    scheme, sep, _ = location.partition("://")
    if sep:
        if scheme.lower() != "s3":
            raise JobsRefused(400, f"{what}: only s3:// URLs and local paths are accepted, not {scheme}://")
        return location
    if not root:
        raise JobsRefused(400, f"{what}: local paths are refused over the API while INFEROXY_JOBS_LOCAL_ROOT is "
                               "unset; use an s3:// URL")
    base = os.path.realpath(root)
    # realpath follows symlinks and folds "..", so what is compared is where the file system would go.
    resolved = os.path.realpath(os.path.join(base, location))
    if os.path.commonpath([base, resolved]) != base:
        raise JobsRefused(400, f"{what}: {location!r} is outside INFEROXY_JOBS_LOCAL_ROOT")
    return resolved


class JobsApi:
    def __init__(self, gateway: Gateway, error_response: Callable[[RequestError], Response],
                 store: JobStore | None = None) -> None:
        self.gateway = gateway
        self.settings: Settings = gateway.settings
        self.error_response = error_response
        self._store = store

    @property
    def store(self) -> JobStore:
        if self._store is None:
            if not self.settings.redis_url:
                raise RequestError(ErrorCode.NOT_READY, "no Redis is configured for jobs")
            self._store = JobStore.from_url(self.settings.redis_url, self.settings.redis_prefix)
        return self._store

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None

    def _caller(self, request: Request) -> tuple[str | None, bool]:
        """(the caller's key name, whether it may see every job)."""
        key = self.gateway.auth.identify(credential_of_header(request.headers.get("authorization")))
        if key is None:
            return None, True
        return key.name, "admin" in key.scopes

    async def _answer(self, request: Request, handle: Callable[[Request], Any]) -> Response:
        try:
            refuse_cross_site(request)
            response: Response = await handle(request)
            return response
        except AdminError as exc:
            return _error(exc.status, str(exc))
        except JobsRefused as exc:
            return _error(exc.status, exc.message)
        except RequestError as exc:
            return self.error_response(exc)
        except RedisError as exc:
            log.warning("jobs API: Redis unreachable: %s", exc)
            return _error(503, "the job store (Redis) is unreachable; retry shortly")

    # -- the routes ------------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        return await self._answer(request, self._submit)

    async def _submit(self, request: Request) -> Response:
        require_json(request)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise JobsRefused(400, f"a job's options are at most {MAX_BODY_BYTES} bytes")
        try:
            options = BatchOptions.model_validate_json(body)
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
            raise JobsRefused(400, f"invalid job options: {fields}") from None
        credential = credential_of_header(request.headers.get("authorization"))
        self.gateway.auth.check(credential, options.model)  # may this key infer the model (and its rate)
        owner, _ = self._caller(request)
        self.gateway.resolve(options.model, options.version)  # an unknown model is refused now, not in the worker
        root = self.settings.jobs_local_root
        if options.storage_options and not any(where.startswith("s3://") for where in (options.input, options.output)):
            raise JobsRefused(400, "storage options apply to s3:// URLs only")
        options = options.model_copy(update={"input": checked_location(options.input, root, "input"),
                                             "output": checked_location(options.output, root, "output")})
        idempotency_key = request.headers.get(IDEMPOTENCY_HEADER)
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise JobsRefused(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
        try:
            record, created = await self.store.create(
                options, owner, idempotency_key=idempotency_key, idempotency_ttl_s=self.settings.jobs_idempotency_ttl_s,
                max_queued=self.settings.jobs_max_queued)
        except IdempotencyConflict as exc:
            raise JobsRefused(409, str(exc)) from None
        except QueueFull as exc:
            return _error(429, str(exc), {"Retry-After": "10"})
        if created:
            log.info("job %s submitted by %s: %s", record.id, owner or "(no key)", options.model)
        headers = {"Location": f"/v2/jobs/{record.id}"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return json_response(record.public(), 202, headers)

    async def _visible(self, request: Request) -> JobRecord:
        owner, everyone = self._caller(request)
        job_id = request.path_params["id"]
        record = await self.store.get(job_id) if len(job_id) <= 64 else None
        if record is None or not (everyone or record.owner == owner):
            raise JobsRefused(404, f"no job {job_id!r}")
        return record

    async def get(self, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            return json_response((await self._visible(request)).public())

        return await self._answer(request, handle)

    async def list(self, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            owner, everyone = self._caller(request)
            raw = request.query_params.get("limit", "100")
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_LISTED:
                raise JobsRefused(400, f"limit must be 1 to {MAX_LISTED}")
            state = request.query_params.get("state")
            records = await self.store.list(owner, everyone=everyone, limit=MAX_LISTED if state else int(raw))
            if state:
                records = [record for record in records if record.state == state][: int(raw)]
            return json_response({"jobs": [record.public() for record in records]})

        return await self._answer(request, handle)

    async def cancel(self, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            record = await self._visible(request)
            if record.final:
                return json_response(record.public())  # nothing left to stop
            cancelled = await self.store.request_cancel(record.id, retention_s=self.settings.jobs_retention_s)
            assert cancelled is not None
            log.info("job %s: cancel requested", record.id)
            return json_response(cancelled.public(), 202)

        return await self._answer(request, handle)


def add_job_routes(add: Add, gateway: Gateway, error_response: Callable[[RequestError], Response]) -> JobsApi:
    api = JobsApi(gateway, error_response)
    add("/v2/jobs", api.submit, methods=["POST"])
    add("/v2/jobs", api.list, methods=["GET"])
    add("/v2/jobs/{id}", api.get, methods=["GET"])
    add("/v2/jobs/{id}", api.cancel, methods=["DELETE"])
    return api
