"""``GET /openapi.json`` and ``GET /docs`` on the REST bridge: the HTTP API described, and Swagger UI over it.

The routes the bridge serves are plain Starlette routes that read raw bodies (the hot path never goes
through pydantic), so FastAPI cannot describe them by itself. Each is described here instead, in
``OPERATIONS``, with pydantic models that exist for the description only; tests/test_openapi.py checks
that every ``/v2`` route the app serves is described and that nothing described is missing.

Swagger UI's script, stylesheet and icon are served by the bridge from the ``fastapi-offline`` package
(which ships them), not from a CDN: the page works on a machine with no internet access.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Literal

import fastapi_offline
import orjson
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from bridges.gateway import server_version
from jobs.options import BatchOptions
from model_manager.spec import ModelSpec

ASSETS = Path(fastapi_offline.__file__).parent / "static"
_ASSET_TYPES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}

# -- the documents, for the description only -------------------------------------------------------------

Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
                   "FP64", "BYTES"]


class Error(BaseModel):
    error: str = Field(description="What went wrong; the HTTP status gives the error code (docs/PROTOCOL.md).")


class InputTensor(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: the tensor is in the binary "
                                              "part of the body (binary tensor data extension).")
    data: list[Any] | None = Field(None, description="The values, flattened in row-major order (or nested).")


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true to get it as binary data.")


class InferRequest(BaseModel):
    """An inference request (JSON; with binary tensors the JSON part, its length in Inference-Header-Content-Length)."""

    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="timeout (µs), priority, sequence_id, sequence_start, "
                                              "sequence_end (docs/PROTOCOL.md).")
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None


class OutputTensor(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1 for a free dimension; the first is the batch dimension.")


class Serving(BaseModel):
    state: str
    ready: bool
    reason: str
    replicas: int = Field(description="Replicas ready now.")
    target: int | None = Field(description="The replicas the autoscaler keeps (min..max); null while no task "
                               "manager reports the model.")
    min: int = Field(description="The spec's min_replicas.")
    max: int = Field(description="The spec's max_replicas (0: unloaded).")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    description: str | None = Field(None, description="Inferoxy's own, from the spec; absent when unset.")
    framework: str | None = Field(None, description="Inferoxy's own, from the spec; absent when unset.")
    labels: dict[str, str] | None = Field(None, description="Inferoxy's own: the spec's free key/value metadata; "
                                          "absent when it has none.")
    serving: Serving = Field(description="Inferoxy's own: how this version is being served, and why not.")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool
    name: str | None = None


class Duration(BaseModel):
    count: int
    ns: int


class InferenceStats(BaseModel):
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    cache_hit: Duration
    cache_miss: Duration


class BatchStats(BaseModel):
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


class ModelStats(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="Milliseconds since the epoch.")
    inference_count: int
    execution_count: int
    inference_stats: InferenceStats
    batch_stats: list[BatchStats]
    memory_usage: list[Any]


class Statistics(BaseModel):
    """Triton's statistics extension; docs/METRICS.md says which metric each field comes from."""

    model_stats: list[ModelStats]


class RepositoryIndexRequest(BaseModel):
    ready: bool = False


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: Literal["READY", "LOADING", "UNAVAILABLE", "UNKNOWN"]
    reason: str


class RepositoryCall(BaseModel):
    parameters: dict[str, Any] | None = Field(None, description="version: one version; config: a spec (JSON text) to "
                                              "store first (load only).")


class Document(BaseModel):
    """A JSON object; docs/ADMIN.md describes its fields."""

    model_config = {"extra": "allow"}


class NewKey(BaseModel):
    name: str
    scopes: list[Literal["infer", "admin"]] | str
    models: list[str] | None = None
    rate: float | None = None
    burst: int | None = None


class DefaultVersion(BaseModel):
    version: str


# -- the operations ------------------------------------------------------------------------------------

# (method, path, tag, summary, request body, answer)
Operation = tuple[str, str, str, str, type[BaseModel] | None, Any]
_MODEL = "/v2/models/{name}"
_VERSION = "/v2/models/{name}/versions/{version}"
OPERATIONS: list[Operation] = [
    ("GET", "/v2", "server", "Server metadata", None, ServerMetadata),
    ("GET", "/v2/health/live", "server", "Liveness", None, Live),
    ("GET", "/v2/health/ready", "server", "Readiness: the model registry has been read", None, Ready),
    ("GET", "/v2/health/registry", "server", "The registry's health (Redis, revisions)", None, Document),
    ("GET", "/metrics", "server", "Prometheus metrics of the whole proxy (docs/METRICS.md)", None, None),
    ("GET", "/v2/models/stats", "statistics", "Statistics of every model version", None, Statistics),
    *[op for base in (_MODEL, _VERSION) for op in [
        ("GET", base, "models", "Model metadata", None, ModelMetadata),
        ("GET", f"{base}/ready", "models", "Whether the model takes requests (503 says why not)", None, Ready),
        ("GET", f"{base}/config", "models", "The spec as a Triton model configuration", None, Document),
        ("GET", f"{base}/stats", "statistics", "Statistics of the model's versions, or of one", None, Statistics),
        ("POST", f"{base}/infer", "inference", "Inference (JSON, or binary tensor data)", InferRequest,
         InferResponse),
        ("POST", f"{base}/infer/image", "inference", "Inference on one uploaded PNG or JPEG (raw body or multipart)",
         None, InferResponse),
    ]],
    ("POST", "/v2/repository/index", "repository", "Every model version and its state", RepositoryIndexRequest,
     list[RepositoryModel]),
    ("POST", "/v2/repository/models/{name}/load", "repository", "Serve a model again", RepositoryCall, Document),
    ("POST", "/v2/repository/models/{name}/unload", "repository", "Stop serving a model", RepositoryCall, Document),
    ("GET", "/v2/admin/models", "admin", "Every model version", None, Document),
    ("POST", "/v2/admin/models", "admin", "Register a model version", ModelSpec, Document),
    ("GET", "/v2/admin/models/{name}", "admin", "A model's versions", None, Document),
    ("PATCH", "/v2/admin/models/{name}", "admin", "Merge-patch the default version", Document, Document),
    ("DELETE", "/v2/admin/models/{name}", "admin", "Remove every version", None, Document),
    ("PUT", "/v2/admin/models/{name}/default", "admin", "Set the default version", DefaultVersion, Document),
    ("GET", "/v2/admin/models/{name}/versions/{version}", "admin", "One spec", None, ModelSpec),
    ("PUT", "/v2/admin/models/{name}/versions/{version}", "admin", "Create or replace a version", ModelSpec,
     Document),
    ("PATCH", "/v2/admin/models/{name}/versions/{version}", "admin", "Merge-patch a version", Document, Document),
    ("DELETE", "/v2/admin/models/{name}/versions/{version}", "admin", "Remove a version", None, Document),
    ("GET", "/v2/admin/keys", "admin", "Every API key (never a secret)", None, Document),
    ("POST", "/v2/admin/keys", "admin", "Create an API key (its secret is shown once)", NewKey, Document),
    ("DELETE", "/v2/admin/keys/{name}", "admin", "Revoke an API key", None, Document),
    ("POST", "/v2/jobs", "jobs", "Submit a batch job (202; Idempotency-Key header; docs/JOBS.md)", BatchOptions,
     Document),
    ("GET", "/v2/jobs", "jobs", "The caller's jobs, newest first (every job for an admin key)", None, Document),
    ("GET", "/v2/jobs/{id}", "jobs", "A job: state, progress, timings, errors (credentials never shown)", None,
     Document),
    ("DELETE", "/v2/jobs/{id}", "jobs", "Cancel a job", None, Document),
]

_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": Error, "description": text} for status, text in (
    (400, "Bad input"), (401, "No key, or an unknown one"), (403, "Refused"), (404, "No such model or version"),
    (409, "Conflict (an Idempotency-Key reused with other options)"), (415, "A body that is not JSON"),
    (429, "Overloaded or over the key's rate"), (503, "Not ready"))}


def _describing(method: str, path: str, tag: str, summary: str, body: type[BaseModel] | None, answer: Any) -> APIRoute:
    """A route that only describes (it is never mounted): its endpoint's signature carries the path and body."""

    async def endpoint(**_: Any) -> None:  # never called
        raise NotImplementedError

    parameters = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=str)
                  for name in re.findall(r"{(\w+)}", path)]
    if body is not None:
        parameters.append(inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY, annotation=body))
    endpoint.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    responses = dict(_ERRORS) if path.startswith("/v2/") else {}
    return APIRoute(path, endpoint, methods=[method], tags=[tag], summary=summary, response_model=answer,
                    responses=responses, operation_id=f"{method.lower()}_{re.sub(r'[^a-z0-9]+', '_', path.lower())}")


def openapi_document() -> dict[str, Any]:
    routes = [_describing(*operation) for operation in OPERATIONS]
    return get_openapi(title="Inferoxy", version=server_version(), routes=routes,
                       description="The Open Inference Protocol (KServe v2) and Inferoxy's admin API. Who may call "
                                   "what: docs/SECURITY.md.")


def add_docs_routes(app: FastAPI) -> None:
    """``/openapi.json``, ``/docs`` and Swagger UI's assets under ``/docs/``. Open to everyone (docs/SECURITY.md)."""
    document: dict[str, Any] = {}

    async def openapi_json(request: Request) -> Response:
        if not document:  # built once, on first use, so a bridge's start does not pay for it
            document.update(openapi_document())
        return Response(orjson.dumps(document), media_type="application/json")

    async def docs(request: Request) -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Inferoxy API",
            swagger_js_url="/docs/swagger-ui-bundle.js",
            swagger_css_url="/docs/swagger-ui.css",
            swagger_favicon_url="/docs/favicon.png",
            # No validator badge: by default Swagger UI fetches it from an outside site.
            swagger_ui_parameters={"validatorUrl": None},
        )

    async def asset(request: Request) -> Response:
        name = request.path_params["asset"]
        if name not in _ASSET_TYPES:  # only these files: a path never reaches the file system
            return Response(orjson.dumps({"error": f"no such file: {name}"}), 404, media_type="application/json")
        return FileResponse(ASSETS / name, media_type=_ASSET_TYPES[name], headers={"Cache-Control": "max-age=86400"})

    app.router.add_route("/openapi.json", openapi_json, methods=["GET"])
    app.router.add_route("/docs", docs, methods=["GET"])
    app.router.add_route("/docs/{asset}", asset, methods=["GET"])
