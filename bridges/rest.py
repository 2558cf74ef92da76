"""The REST bridge: the Open Inference Protocol (KServe v2) over HTTP, served by uvicorn.

Routes: ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``,
``GET /v2/models/{name}[/versions/{v}]`` (model metadata), ``.../ready`` (the model's serving
status from Redis), ``POST .../infer`` (JSON or binary tensors), and Inferoxy's own
``POST .../infer/image`` (a PNG or JPEG upload sent as a uint8 ``[1, H, W, 3]`` tensor). Also ``GET /metrics``
and ``GET /dashboard`` with the JSON it polls (bridges/dashboard.py), and the jobs API (``/v2/jobs``,
bridges/jobs_api.py).

Handlers take the raw ``Request`` and return ready-made ``Response`` bodies: tensors are
parsed with orjson and numpy (``bridges.tensors``), never through pydantic models, which
are far too slow for large arrays. Every error is ``{"error": "..."}`` with the HTTP status
of its ``ErrorCode``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import uvicorn
import zmq.asyncio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from bridges import metering, request_ids, rest_reply, tensors
from bridges.admin import admin_router
from bridges.auth import credential_of_header, retry_after_header
from bridges.catalog import Readiness, metadata
from bridges.dashboard import dashboard_routes
from bridges.errors import RequestError
from bridges.gateway import EXTENSIONS, GRACEFUL_SHUTDOWN_S, SERVER_NAME, Gateway, server_version
from bridges.http_server import ComponentServer, head_deadline_protocol, listen
from bridges.images import decode_image
from bridges.jobs_api import add_job_routes
from bridges.metering import clock
from bridges.openapi import add_docs_routes
from bridges.pipeline import Answer, Pipeline, Prepared
from bridges.rest_models import add_model_routes
from bridges.rest_reply import json_response
from bridges.tls import uvicorn_tls_options
from bridges.validation import check_parameters
from inferoxy import metrics
from inferoxy.logs import REQUEST_IDS, current_request_id
from inferoxy.protocol import ErrorCode, InferoxyError
from inferoxy.settings import Settings
from model_manager.spec import ModelSpec

Endpoint = Callable[[Request], Awaitable[Response]]
log = logging.getLogger(__name__)

JSON = "application/json"
# Every inference answer names its request (docs/PROTOCOL.md, "Request ids").
REQUEST_ID_HEADER = b"x-request-id"
# Where the endpoint keeps the id the client's headers gave (or None), for the answer's body `id`.
GIVEN_ID = "inferoxy.given_request_id"
# What a client hears when told to come back (429); the queues drain within about this long.
RETRY_AFTER_S = "1"


class RestBridge:
    name = "rest_bridge"

    def __init__(self, settings: Settings, ctx: zmq.asyncio.Context, *, gateway: Gateway | None = None) -> None:
        self.settings = settings
        self.ctx = ctx
        self.gateway = gateway if gateway is not None else Gateway(settings, ctx)
        self.app = build_app(self.gateway)

    async def run(self, ready: asyncio.Event) -> None:
        # Binding here (not in uvicorn) makes a taken port an OSError for our caller, not sys.exit.
        listener = listen(self.settings.bind_host, self.settings.rest_port)
        started = asyncio.Event()
        server = ComponentServer(
            uvicorn.Config(
                self.app,
                lifespan="off",
                ws="none",
                # The process runner owns logging; uvicorn's dictConfig would replace its handlers.
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                timeout_keep_alive=self.settings.http_keep_alive_s,  # type: ignore[arg-type]
                # With TLS the protocol sees the connection once the handshake is done (asyncio's own
                # handshake timeout bounds that), so the head deadline works the same over https.
                http=head_deadline_protocol(self.settings.http_header_timeout_s),
                **uvicorn_tls_options(self.settings),
            ),
            started,
        )
        serving: asyncio.Task[None] | None = None
        try:
            await self.gateway.start()
            serving = asyncio.create_task(server.serve(sockets=[listener]), name="rest-uvicorn")
            # asyncio.wait, not await: cancelling run() must not cancel uvicorn mid-request.
            waiting = asyncio.create_task(started.wait())
            await asyncio.wait({serving, waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if serving.done():
                serving.result()  # uvicorn's own startup error
                raise RuntimeError("the REST server stopped during startup")
            # Ready means able to answer: until the registry is read every request would be refused
            # (and /v2/health/ready says 503).
            await self.gateway.registry_loaded.wait()
            ready.set()
            log.info("REST bridge listening on %s://%s:%d", "https" if self.settings.tls else "http",
                     self.settings.bind_host, self.settings.rest_port)
            await asyncio.wait({serving})
            serving.result()
        finally:
            # uvicorn stops accepting, lets requests in progress finish (the gateway is still up to
            # answer them) for up to GRACEFUL_SHUTDOWN_S, then the gateway fails whatever is left.
            server.should_exit = True
            if serving is not None and not serving.done():
                await asyncio.wait({serving}, timeout=GRACEFUL_SHUTDOWN_S + 1)
                serving.cancel()
            listener.close()
            await self.app.state.jobs_api.close()
            await self.gateway.close()
            metering.flush_all()  # the last counts, before the process ends


# -- the application --------------------------------------------------------------------------


def error_response(error: RequestError) -> Response:
    status = error.http_status
    headers = None
    if status == 429:
        rate_limited = error.retry_after_s is not None
        headers = {"Retry-After": retry_after_header(error.retry_after_s) if rate_limited else RETRY_AFTER_S}
    elif status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return json_response({"error": error.message}, status, headers)


def _credential(request: Request) -> str | None:
    return credential_of_header(request.headers.get("authorization"))


def build_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="Inferoxy", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return json_response({"error": str(exc.detail)}, exc.status_code, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return json_response({"error": str(exc)}, 400)

    # Plain Starlette routes: the handlers read the raw request themselves, so FastAPI's
    # per-request dependency solving would be pure overhead on the hot path.
    pipeline = Pipeline(gateway, "rest")
    meter = pipeline.meter

    def inference(handle: Callable[[Pipeline, Request, str, str | None], Awaitable[Response]]) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            started = clock()
            params = request.path_params
            name, version = params["name"], params.get("version")
            # The id from the headers until the body is read (_infer may switch to the body's own); every log
            # line of this request carries it, and so does the answer, error or not.
            given = request.scope[GIVEN_ID] = _header_request_id(request)
            token = REQUEST_IDS.set(given or request_ids.fresh())
            error: RequestError | None = None
            try:
                response = await handle(pipeline, request, name, version)
            except InferoxyError as exc:
                error = RequestError.of(exc)
            except ClientDisconnect:
                # Nobody is left to answer; a client that hangs up mid-body is routine, not a bridge failure.
                log.info("%s %s: the client disconnected before sending the whole body", request.method,
                         request.url.path)
                error = RequestError(ErrorCode.BAD_INPUT, "the client disconnected")
            except Exception:
                log.exception("failed to handle %s %s", request.method, request.url.path)
                error = RequestError(ErrorCode.INTERNAL, "the bridge failed to handle the request")
            if error is None:
                meter.record(name, version, metrics.OK, started)
            else:
                meter.record(name, version, error.code, started)
                response = error_response(error)
            # Appended raw: the id is visible ASCII, and MutableHeaders would rebuild the list (0.7 against 0.15 µs).
            response.raw_headers.append((REQUEST_ID_HEADER, str(current_request_id()).encode("ascii")))
            REQUEST_IDS.reset(token)
            return response

        return endpoint

    infer, infer_image = inference(_infer), inference(_infer_image)

    async def model_ready(request: Request) -> Response:
        params = request.path_params
        try:
            readiness = await gateway.readiness(params["name"], params.get("version"))
        except RequestError as exc:
            return error_response(exc)
        if readiness.ready:
            return json_response({"name": params["name"], "ready": True})
        # Triton answers a bare 400 here; a 503 with the reason is what a load balancer and a person want.
        return json_response({"error": readiness.reason, "name": params["name"], "ready": False}, 503)

    async def model_metadata(request: Request) -> Response:
        params = request.path_params
        try:
            gateway.auth.check_metadata(_credential(request), params["name"])
            resolved = gateway.resolve(params["name"], params.get("version"))
            readiness = await gateway.readiness(params["name"], params.get("version"))
        except RequestError as exc:
            return error_response(exc)
        # Beyond the protocol's fields (clients ignore extra ones): how the version is being served, and why not.
        spec = resolved.spec
        return json_response({**metadata(spec, gateway.versions(spec.name)), "serving": serving(spec, readiness)})

    async def live(request: Request) -> Response:
        return json_response({"live": True})

    async def ready(request: Request) -> Response:
        is_ready = gateway.registry is not None
        return json_response({"ready": is_ready}, 200 if is_ready else 503)

    about = orjson.dumps({"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS})

    async def server_metadata(request: Request) -> Response:
        return Response(about, media_type=JSON)

    async def prometheus_metrics(request: Request) -> Response:
        try:
            gateway.auth.check_observer(_credential(request))
        except RequestError as exc:
            return error_response(exc)
        metering.flush_all()  # this process's latest counts (other processes' are at most metrics.FLUSH_S late)
        # In a thread: merging serve's samples files grows with models x processes (235 ms for 50 models,
        # bench/bench_stats.py), and on the loop it would stall every request this bridge holds meanwhile.
        body, content_type = await asyncio.to_thread(metrics.render, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    add = app.router.add_route
    add_model_routes(add, gateway, error_response)  # statistics and configuration (before /v2/models/{name})
    add("/v2/models/{name}/infer", infer, methods=["POST"])
    add("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"])
    add("/v2/models/{name}/infer/image", infer_image, methods=["POST"])
    add("/v2/models/{name}/versions/{version}/infer/image", infer_image, methods=["POST"])
    add("/v2/models/{name}/ready", model_ready, methods=["GET"])
    add("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"])
    add("/v2/models/{name}", model_metadata, methods=["GET"])
    add("/v2/models/{name}/versions/{version}", model_metadata, methods=["GET"])
    add("/v2/health/live", live, methods=["GET"])
    add("/v2/health/ready", ready, methods=["GET"])
    add("/v2", server_metadata, methods=["GET"])
    add("/metrics", prometheus_metrics, methods=["GET"])
    # The jobs API (docs/JOBS.md); its Redis client is closed with the bridge.
    app.state.jobs_api = add_job_routes(add, gateway, error_response)
    # GET /dashboard and the JSON it polls (docs/ADMIN.md, "The dashboard").
    app.router.routes.extend(dashboard_routes(gateway))
    add_docs_routes(app)  # /openapi.json and /docs (bridges/openapi.py)
    # The admin API and GET /v2/health/registry (docs/ADMIN.md).
    app.include_router(admin_router(gateway.settings, lambda: gateway.registry))
    return app


async def _infer(pipeline: Pipeline, request: Request, name: str, version: str | None) -> Response:
    resolved = pipeline.admit(_credential(request), name, version)
    settings = pipeline.gateway.settings
    limit = settings.max_message_bytes
    body = await _within(_read_body(request, limit), settings.request_timeout_s)
    parsed = tensors.parse_infer_request(body, _header_length(request), max_bytes=limit)
    own = request_ids.usable(parsed.id)
    if own is not None:
        REQUEST_IDS.set(own)  # the endpoint resets it
    request_id = current_request_id()
    prepared = pipeline.prepare(resolved, parsed.metas, parsed.frames, parsed.parameters, outputs=parsed.outputs,
                                request_id=request_id)
    answer = await _run(pipeline, request, prepared)
    body, json_length = rest_reply.encode_infer_reply(answer.model, answer.version, parsed, answer.metas, answer.frames,
                                                      request.scope[GIVEN_ID])
    if json_length is None:
        return Response(body, media_type=JSON)
    return Response(
        body,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(json_length)},
    )


async def _run(pipeline: Pipeline, request: Request, prepared: Prepared) -> Answer:
    """The pipeline's answer, unless the HTTP client leaves first: a client that disconnects cancels its
    request, so the batch manager drops it if it still queues it."""
    answered = asyncio.ensure_future(pipeline.run(prepared))
    gone = asyncio.ensure_future(_client_disconnected(request))
    try:
        await asyncio.wait({answered, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answered.done():
            answered.cancel()  # the gateway sends the batch manager a cancel
    if not answered.done() or answered.cancelled():
        raise RequestError(ErrorCode.DEADLINE, "the client disconnected before the answer")
    return answered.result()


async def _client_disconnected(request: Request) -> None:
    # Once the body is read, the next ASGI message is http.disconnect: when the client goes away
    # (or after the response is sent, by which time nobody waits for this).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _infer_image(pipeline: Pipeline, request: Request, name: str, version: str | None) -> Response:
    """One uploaded image (the raw body, or the first file of a multipart form) as a uint8 [1, H, W, 3] input.

    Query parameters: ``input`` names the input (default: the model's only declared input, else
    ``image``); ``timeout`` (µs), ``sequence_id``, ``sequence_start``, ``sequence_end`` and
    ``priority`` become request parameters as in a JSON request.
    """
    resolved = pipeline.admit(_credential(request), name, version)
    spec = resolved.spec
    settings = pipeline.gateway.settings
    limit = settings.max_message_bytes
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        data = await _within(_uploaded_file(request, limit), settings.request_timeout_s)
    else:
        data = await _within(_read_body(request, limit), settings.request_timeout_s)
    input_name = request.query_params.get("input") or (spec.inputs[0].name if len(spec.inputs) == 1 else "image")
    parameters = _query_parameters(request)
    check_parameters(parameters)  # before the image is decoded: a bad parameter costs no decoding
    # Three bytes a pixel: an image whose pixels would not fit in a message is refused before decoding.
    array = decode_image(data, max_pixels=limit // 3)
    metas, frames = tensors.to_wire([(input_name, array)])
    request_id = current_request_id()
    answer = await _run(pipeline, request, pipeline.prepare(resolved, metas, frames, parameters, request_id=request_id))
    parsed = tensors.InferRequest(None, metas, frames, parameters, None, frozenset(), False)
    body, _ = rest_reply.encode_infer_reply(answer.model, answer.version, parsed, answer.metas, answer.frames,
                                            request.scope[GIVEN_ID])
    return Response(body, media_type=JSON)


async def _uploaded_file(request: Request, limit: int) -> bytes:
    try:
        async with request.form(max_files=1, max_fields=16, max_part_size=limit) as form:
            for value in form.values():
                if not isinstance(value, str):  # an UploadFile
                    return await value.read()
    except Exception as exc:  # python-multipart's parse errors, over-limit parts
        raise RequestError(ErrorCode.BAD_INPUT, f"the multipart body cannot be read: {exc}") from None
    raise RequestError(ErrorCode.BAD_INPUT, "the multipart form holds no file: upload the image as a file field")


def _query_parameters(request: Request) -> dict[str, Any]:
    """Session and scheduling parameters given in the query string, typed as in a JSON request."""
    found: dict[str, Any] = {}
    query = request.query_params
    for key in ("timeout", "priority", "sequence_id"):
        raw = query.get(key)
        if raw is not None:
            # A number only if it could be one (int() refuses over 4300 digits); else the string is refused by type.
            found[key] = int(raw) if raw.lstrip("-").isdigit() and len(raw) <= 24 else raw
    for key in ("sequence_start", "sequence_end"):
        raw = query.get(key)
        if raw is not None:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise RequestError(ErrorCode.BAD_INPUT, f"query parameter {key!r} must be true or false, got {raw!r}")
            found[key] = raw.lower() in ("true", "1")
    return found


async def _within(receiving: Awaitable[bytes], timeout_s: float) -> bytes:
    """A request body that arrives within ``timeout_s`` (the server's request timeout), else ``deadline``:
    a client that sends its body a byte at a time must not hold a connection for ever."""
    try:
        return await asyncio.wait_for(receiving, timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(ErrorCode.DEADLINE, f"the request body did not arrive within {timeout_s:g}s") from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to pass ``limit`` (the same limit as ZeroMQ messages)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(ErrorCode.BAD_INPUT, f"the request body is {declared} bytes, more than the limit of {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(ErrorCode.BAD_INPUT, f"the request body is more than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _header_request_id(request: Request) -> str | None:
    """The id the client gave the request in its headers (X-Request-ID, else a traceparent's trace id), if usable."""
    headers = request.headers
    return request_ids.given(None, headers.get(request_ids.HEADER), headers.get(request_ids.TRACEPARENT))


def _header_length(request: Request) -> int | None:
    raw = request.headers.get(tensors.HEADER_LENGTH)
    if raw is None:
        return None
    # Digits only, and few enough to be a byte count: int() would take "+5" or " 5" and choke on 5000 digits.
    if not raw.isdigit() or len(raw) > 19:
        shown = raw if len(raw) <= 24 else raw[:24] + "..."
        raise RequestError(ErrorCode.BAD_INPUT, f"Inference-Header-Content-Length {shown!r} is not a byte count")
    return int(raw)


def serving(spec: ModelSpec, readiness: Readiness) -> dict[str, Any]:
    """How a model version is served (docs/MODELS.md, "Scaling"): its state, ready replicas and the autoscaler's
    target from the task manager's status record (``target`` None while no task manager reports it)."""
    status = readiness.status
    return {"state": readiness.state, "ready": readiness.ready, "reason": readiness.reason,
            "replicas": status.ready_replicas if status else 0, "target": status.desired_replicas if status else None,
            "min": spec.min_replicas, "max": spec.max_replicas}
