"""The gRPC bridge: the Open Inference Protocol's ``inference.GRPCInferenceService`` on grpcio's asyncio server.

(About 450 lines: the servicer's calls, each a thin shell over the shared pipeline, and the
per-connection and per-stream budgets that are gRPC's own.)

Serves ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer and
ModelStreamInfer (bridges/proto/grpc_predict_v2.proto), Triton's ModelConfig, ModelStatistics and
repository calls (bridges/grpc_repository.py), plus ``grpc.health.v1.Health`` and server reflection.
Inputs come as ``raw_input_contents`` (what Triton's clients send) or as typed ``contents``; outputs
always go back as ``raw_output_contents``, as Triton does.

Requests are read as raw bytes and parsed by the handler rather than by grpcio, so an
unparseable message is INVALID_ARGUMENT, not grpcio's INTERNAL, and raw tensor bytes reach the
bus without a copy (bridges/grpc_codec.py). Inference runs through the bridges' one pipeline
(bridges/pipeline.py). Every failure is an InferoxyError mapped to a status code by one table
(``grpc_codec.STATUS_OF_CODE``): bad_input -> INVALID_ARGUMENT, unknown_model -> NOT_FOUND,
not_ready / replica_lost / unavailable -> UNAVAILABLE, overloaded / rate_limited ->
RESOURCE_EXHAUSTED, deadline -> DEADLINE_EXCEEDED, unauthenticated -> UNAUTHENTICATED, forbidden ->
PERMISSION_DENIED. The API key comes from the call's ``authorization: Bearer KEY`` metadata.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
import zmq.asyncio
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bridges import metering, request_ids
from bridges.auth import credential_of_header, retry_after_header
from bridges.budget import ClientLimits, Usage
from bridges.errors import RequestError
from bridges.gateway import EXTENSIONS, GRACEFUL_SHUTDOWN_S, SERVER_NAME, Gateway, server_version
from bridges.grpc_codec import (
    decode_inputs,
    decode_parameters,
    encode_response,
    model_metadata,
    parse_infer_request,
    status_of,
)
from bridges.grpc_repository import RepositoryServicer
from bridges.metering import clock
from bridges.model_config import triton_config
from bridges.pipeline import Pipeline
from bridges.proto import grpc_predict_v2_pb2 as pb
from bridges.statistics import requested, statistics
from bridges.tls import grpc_server_credentials
from inferoxy import metrics
from inferoxy.logs import REQUEST_IDS, current_request_id
from inferoxy.protocol import ErrorCode, InferoxyError
from inferoxy.settings import Settings

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"

M = TypeVar("M", bound=Message)


# -- the server --------------------------------------------------------------------------------


class GrpcBridge:
    name = "grpc_bridge"

    def __init__(self, settings: Settings, ctx: zmq.asyncio.Context, *, gateway: Gateway | None = None) -> None:
        self.settings = settings
        self.ctx = ctx
        self.gateway = gateway if gateway is not None else Gateway(settings, ctx)
        self.address = f"{_host(settings.bind_host)}:{settings.grpc_port}"

    async def run(self, ready: asyncio.Event) -> None:
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            options=[
                # A little over the tensor limit, so the bridge (not grpcio) refuses an oversized
                # request with a message that says which limit it passed.
                ("grpc.max_receive_message_length", limit + 64 * 1024),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
                # Calls one connection may have open at once; a client that never reads its answers keeps
                # them open, so this bounds what it can make the bridge hold.
                ("grpc.max_concurrent_streams", self.settings.client_max_outstanding),
            ]
        )
        servicer = InferenceServicer(self.gateway)
        server.add_generic_rpc_handlers((servicer.handler(),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name, health.SERVICE_NAME,
             reflection.SERVICE_NAME],
            server,
            pool=pb.POOL,
        )
        credentials = grpc_server_credentials(self.settings)
        port = (server.add_insecure_port(self.address) if credentials is None
                else server.add_secure_port(self.address, credentials))
        if port == 0:
            raise OSError(f"the gRPC bridge cannot listen on {self.address}")
        try:
            await self.gateway.start()
            await server.start()
            # Ready means able to answer: until the registry is read every request would be refused.
            await self.gateway.registry_loaded.wait()
            serving = health_pb2.HealthCheckResponse.SERVING
            await health_servicer.set(health.OVERALL_HEALTH, serving)
            await health_servicer.set(SERVICE, serving)
            ready.set()
            log.info("gRPC bridge listening on %s%s", self.address, " (TLS)" if self.settings.tls else "")
            await server.wait_for_termination()
        finally:
            # Refuse new calls, let those in flight finish for a while, then fail the rest. In a task of its
            # own: grpcio's stop() uses timeouts, which Python 3.11 turns into CancelledError inside a task
            # that is being cancelled, and the gateway would then never be closed.
            stopping = asyncio.create_task(_shutdown(server, health_servicer))
            try:
                await asyncio.wait({stopping})
            finally:
                await servicer.repository.close()
                await self.gateway.close()
                metering.flush_all()  # the last counts, before the process ends


async def _shutdown(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
    await health_servicer.enter_graceful_shutdown()
    await server.stop(GRACEFUL_SHUTDOWN_S)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class InferenceServicer:
    """The GRPCInferenceService calls, each taking the raw request bytes (see the module docstring)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.pipeline = Pipeline(gateway, "grpc")
        self.stream_limits = ClientLimits(gateway.settings, "gRPC stream")
        self.connection_limits = ClientLimits(gateway.settings, "gRPC connection")
        # Unary ModelInfer calls in flight per connection (the peer address names the connection).
        self._connections: dict[str, Usage] = {}
        self.repository = RepositoryServicer(gateway.settings, lambda: gateway.registry)

    def handler(self) -> grpc.GenericRpcHandler:
        unary: dict[str, tuple[Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]], type[Message]]] = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest),
            "ModelConfig": (self.model_config, pb.ModelConfigRequest),
            "ModelStatistics": (self.model_statistics, pb.ModelStatisticsRequest),
            "RepositoryIndex": (self.repository.index, pb.RepositoryIndexRequest),
            "RepositoryModelLoad": (self.repository.load, pb.RepositoryModelLoadRequest),
            "RepositoryModelUnload": (self.repository.unload, pb.RepositoryModelUnloadRequest),
        }
        handlers: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(
                _unary(call, kind), response_serializer=_serialize
            )
            for name, (call, kind) in unary.items()
        }
        # ModelInfer parses its own request (raw contents are split out uncopied) and answers serialized bytes.
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
            _unary_raw(self.model_infer), response_serializer=_serialize
        )
        # Stream answers are serialized as they are queued, so their size is known while they wait.
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self.model_stream_infer)
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    async def server_live(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Message:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Message:
        return pb.ServerReadyResponse(ready=self.gateway.registry is not None)

    async def model_ready(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Message:
        readiness = await self.gateway.readiness(request.name, request.version or None)
        if not readiness.ready:
            # The answer stays ready=false (what clients read); the reason travels as metadata for people.
            context.set_trailing_metadata((("inferoxy-reason", _ascii(readiness.reason)),))
        return pb.ModelReadyResponse(ready=readiness.ready)

    async def server_metadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Message:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

    async def model_metadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Message:
        self.gateway.auth.check_metadata(_credential(context), request.name)
        spec = self.gateway.resolve(request.name, request.version or None).spec
        return model_metadata(spec, self.gateway.versions(spec.name))

    async def model_config(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> Message:
        self.gateway.auth.check_metadata(_credential(context), request.name)
        spec = self.gateway.resolve(request.name, request.version or None).spec
        settings = self.gateway.settings
        config = triton_config(spec, max_queue_size=settings.max_queue_size,
                               request_timeout_s=settings.request_timeout_s)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))

    async def model_statistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext) -> Message:
        specs = requested(self.gateway, _credential(context), request.name or None, request.version or None)
        metering.flush_all()  # this process's latest counts, as over REST
        # In a thread, as over REST: reading serve's metrics directory must not hold up inference on this loop.
        return json_format.ParseDict(await asyncio.to_thread(statistics, specs), pb.ModelStatisticsResponse())

    async def model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = clock()
        peer = context.peer()
        usage = self._connections.get(peer)
        if usage is None:
            usage = self._connections[peer] = Usage()
        size = len(raw)
        try:
            self.connection_limits.admit(usage, size)
        except RequestError as exc:
            if usage.idle:
                del self._connections[peer]
            self._refused(raw, exc, started)
            raise
        # The id from the call's metadata until the request is parsed (_infer may switch to the request's own);
        # _unary_raw sends it back as x-request-id, answer or error.
        given = request_ids.given(None, *_metadata(context, request_ids.HEADER, request_ids.TRACEPARENT))
        REQUEST_IDS.set(given or request_ids.fresh())
        try:
            return await self._infer(raw, started, context.time_remaining(), _credential(context), given=given)
        finally:
            usage.add(-1, -size)
            if usage.idle:
                self._connections.pop(peer, None)

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Each request on the stream is served as it arrives; answers go back as they complete, each
        naming its request by ``id``. A failed request is an ``error_message`` on the stream, which
        stays open for the next one.

        What the stream holds is bounded (bridges/budget.py): requests in flight plus answers the client
        has not read yet. Past the bound a request is refused ``RESOURCE_EXHAUSTED`` on the stream; while
        unread answers alone fill it, the stream is not read at all, so HTTP/2 flow control holds the
        client back instead of the bridge buffering what it sends."""
        limits = self.stream_limits
        usage = Usage()
        answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        written = asyncio.Event()  # set each time an answer leaves the queue
        running: set[asyncio.Task[None]] = set()
        credential = _credential(context)

        def queue(data: bytes, held: int) -> None:
            # The request's bytes (``held``) are let go of; the answer's are held until it is written.
            usage.add(0, len(data) - held)
            answers.put_nowait(data)

        async def serve(raw: bytes, started: float) -> None:
            ids: list[str] = []  # the request's id once it is parsed, to name it in an error
            try:
                queue(await self._infer(raw, started, context.time_remaining(), credential, ids), len(raw))
            except InferoxyError as exc:
                queue(_stream_error(ids[0] if ids else "", RequestError.of(exc)), len(raw))
            except Exception:
                log.exception("failed to handle a gRPC stream request")
                failure = RequestError(ErrorCode.INTERNAL, "the bridge failed to handle the request")
                queue(_stream_error(ids[0] if ids else "", failure), len(raw))

        def unread_fill_the_bound() -> bool:
            return answers.qsize() >= limits.max_requests or usage.bytes >= limits.max_bytes

        async def read() -> None:
            try:
                async for raw in requests:
                    started = clock()
                    if limits.fits(usage, len(raw)):
                        usage.add(1, len(raw))
                        task = asyncio.create_task(serve(raw, started))
                        running.add(task)
                        task.add_done_callback(running.discard)
                    else:
                        usage.add(1, 0)
                        refusal = limits.refusal(usage)
                        queue(_stream_error(self._refused(raw, refusal, started), refusal), 0)
                    while unread_fill_the_bound():
                        written.clear()
                        await written.wait()
                if running:
                    await asyncio.wait(set(running))
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
                usage.add(-1, -len(answer))
                written.set()
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _infer(
        self, raw: bytes, started: float, time_left_s: float | None, credential: str | None,
        ids: list[str] | None = None, given: str | None = None,
    ) -> bytes:
        """A serialized ModelInferResponse, or with ``ids`` (a stream's call: the request's id is put there once
        parsed, to name it in an error) a serialized ModelStreamInferResponse. ``given``: the id the call's
        metadata gave (a unary call's; a stream's requests each have their own). Counted in the metrics here,
        whatever its end (``started``: when it arrived)."""
        pipeline = self.pipeline
        request: pb.ModelInferRequest | None = None
        try:
            request, contents = parse_infer_request(raw)
            request_id = request_ids.usable(request.id) or current_request_id() or request_ids.fresh()
            REQUEST_IDS.set(request_id)
            echo = request.id or given or ""  # the client's own id, or the one it gave in metadata (request_ids.py)
            if ids is not None:
                ids.append(echo)
            resolved = pipeline.admit(credential, request.model_name, request.model_version or None)
            metas, frames = decode_inputs(request, contents, pipeline.gateway.settings.max_message_bytes)
            requested = [output.name for output in request.outputs] or None
            prepared = pipeline.prepare(resolved, metas, frames, decode_parameters(request.parameters),
                                        outputs=requested, time_left_s=time_left_s,  # the client's own gRPC deadline
                                        request_id=request_id)
            answer = await pipeline.run(prepared)
            encoded = encode_response(answer.model, answer.version, echo, requested, answer.metas, answer.frames,
                                      stream=ids is not None)
        except BaseException as exc:  # a cancel too: the client gave up (counted as deadline)
            if request is None:
                pipeline.meter.failed(None, None, exc, started)
            else:
                pipeline.meter.failed(request.model_name, request.model_version or None, exc, started)
            raise
        pipeline.meter.record(request.model_name, request.model_version or None, metrics.OK, started)
        return encoded

    def _refused(self, raw: bytes, error: RequestError, started: float) -> str:
        """Count a request refused before it was read (a connection or stream over its bound); its id, to name it
        in the error. Parsed as a request is (its raw tensor bytes split off uncopied), for its model and id."""
        try:
            request, _ = parse_infer_request(raw)
        except RequestError:  # unreadable: no model, no id
            self.pipeline.meter.record(None, None, error.code, started)
            return ""
        self.pipeline.meter.record(request.model_name, request.model_version or None, error.code, started)
        return request.id


def _unary(
    call: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]], kind: type[Message]
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message | bytes]]:
    async def parsed(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        return await call(_parse(kind, raw), context)

    return _unary_raw(parsed)


def _unary_raw(
    call: Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message | bytes]],
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message | bytes]]:
    """A unary call that maps every InferoxyError to its status (and ``retry-after`` metadata)."""

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Message | bytes:
        # An inference call sets the request id; whatever a call sets ends with it.
        token = REQUEST_IDS.set(None)
        try:
            try:
                answer = await call(raw, context)
            except InferoxyError as exc:
                error = RequestError.of(exc)
                metadata = _request_id_metadata()
                if error.retry_after_s is not None:
                    metadata.append(("retry-after", retry_after_header(error.retry_after_s)))
                if metadata:
                    context.set_trailing_metadata(tuple(metadata))
                await context.abort(status_of(error), error.message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("failed to handle a gRPC request")
                if metadata := _request_id_metadata():
                    context.set_trailing_metadata(tuple(metadata))
                await context.abort(grpc.StatusCode.INTERNAL, "the bridge failed to handle the request")
            else:
                if metadata := _request_id_metadata():
                    context.set_trailing_metadata(tuple(metadata))
                return answer
            raise AssertionError("context.abort returns only by raising")
        finally:
            REQUEST_IDS.reset(token)

    return handle


def _request_id_metadata() -> list[tuple[str, str]]:
    """``x-request-id`` for an inference call (its handler set ``REQUEST_IDS``); nothing for the other calls."""
    request_id = current_request_id()
    return [(request_ids.HEADER, request_id)] if isinstance(request_id, str) else []


def _metadata(context: grpc.aio.ServicerContext, *keys: str) -> list[str | None]:
    """The values of ``keys`` in the call's metadata (the first of each; None where absent)."""
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key in keys and isinstance(value, str):
            found.setdefault(key, value)
    return [found.get(key) for key in keys]


def _credential(context: grpc.aio.ServicerContext) -> str | None:
    """The API key in the call's ``authorization: Bearer KEY`` metadata (what tritonclient's ``headers=`` sends)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return credential_of_header(value)
    return None


def _parse(kind: type[M], raw: bytes) -> M:
    try:
        return kind.FromString(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        message = f"the request is not a valid {kind.DESCRIPTOR.name} message: {exc}"
        raise RequestError(ErrorCode.BAD_INPUT, message) from None


def _serialize(message: Message | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def _stream_error(request_id: str, error: RequestError) -> bytes:
    # Triton's stream has no status per message; the code leads the text so a client can tell.
    return pb.ModelStreamInferResponse(
        error_message=f"[{status_of(error).name}] {error.message}",
        infer_response=pb.ModelInferResponse(id=request_id),
    ).SerializeToString()


def _ascii(text: str) -> str:
    return text.encode("ascii", errors="replace").decode()


