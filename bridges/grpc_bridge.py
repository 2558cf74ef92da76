"""The gRPC bridge: the Open Inference Protocol's ``inference.GRPCInferenceService`` on grpcio's asyncio server.

Serves ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer and
ModelStreamInfer (bridges/proto/grpc_predict_v2.proto), plus ``grpc.health.v1.Health`` and
server reflection. Inputs come as ``raw_input_contents`` (what Triton's clients send) or as
typed ``contents``; outputs always go back as ``raw_output_contents``, as Triton does.

Requests are read as raw bytes and parsed by the handler rather than by grpcio, so an
unparseable message is INVALID_ARGUMENT, not grpcio's INTERNAL. Every failure is a
RequestError mapped to a status code: bad_input -> INVALID_ARGUMENT, unknown_model ->
NOT_FOUND, not_ready / replica_lost / unavailable -> UNAVAILABLE, overloaded / rate_limited ->
RESOURCE_EXHAUSTED, deadline -> DEADLINE_EXCEEDED, unauthenticated -> UNAUTHENTICATED, forbidden ->
PERMISSION_DENIED. The API key comes from the call's ``authorization: Bearer KEY`` metadata.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import grpc
import grpc.aio
import numpy as np
import zmq.asyncio
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bridges import tensors
from bridges.auth import credential_of_header, retry_after_header
from bridges.budget import ClientLimits, Usage
from bridges.errors import RequestError
from bridges.gateway import EXTENSIONS, GRACEFUL_SHUTDOWN_S, SERVER_NAME, Gateway, server_version
from bridges.proto import grpc_predict_v2_pb2 as pb
from bridges.tls import grpc_server_credentials
from bridges.validation import check_name, check_parameters, check_requested_outputs, requested_timeout_s
from inferoxy.protocol import ErrorCode
from inferoxy.settings import Settings
from inferoxy.wire import WireError, check_tensors, tensor_frame
from model_manager.spec import ModelSpec, TensorSpec

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"

STATUS_OF_CODE: dict[str, grpc.StatusCode] = {
    ErrorCode.BAD_INPUT.value: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNKNOWN_MODEL.value: grpc.StatusCode.NOT_FOUND,
    ErrorCode.NOT_READY.value: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.OVERLOADED.value: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE.value: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.REPLICA_LOST.value: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.SESSION_LOST.value: grpc.StatusCode.ABORTED,
    ErrorCode.UNAVAILABLE.value: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.MODEL_ERROR.value: grpc.StatusCode.INTERNAL,
    ErrorCode.INTERNAL.value: grpc.StatusCode.INTERNAL,
    ErrorCode.UNAUTHENTICATED.value: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.FORBIDDEN.value: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.RATE_LIMITED.value: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# Which typed ``InferTensorContents`` field carries each datatype; FP16 has none (raw contents only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

M = TypeVar("M", bound=Message)


def status_of(error: RequestError) -> grpc.StatusCode:
    return STATUS_OF_CODE.get(error.code, grpc.StatusCode.INTERNAL)


def _bad(message: str) -> RequestError:
    return RequestError(ErrorCode.BAD_INPUT, message)


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
                await self.gateway.close()


async def _shutdown(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
    await health_servicer.enter_graceful_shutdown()
    await server.stop(GRACEFUL_SHUTDOWN_S)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class InferenceServicer:
    """The GRPCInferenceService calls, each taking the raw request bytes (see the module docstring)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.stream_limits = ClientLimits(gateway.settings, "gRPC stream")
        self.connection_limits = ClientLimits(gateway.settings, "gRPC connection")
        # Unary ModelInfer calls in flight per connection (the peer address names the connection).
        self._connections: dict[str, Usage] = {}

    def handler(self) -> grpc.GenericRpcHandler:
        unary: dict[str, tuple[Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]], type[Message]]] = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest),
        }
        handlers: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(
                _unary(call, kind), response_serializer=_serialize
            )
            for name, (call, kind) in unary.items()
        }
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

    async def model_infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Message:
        peer = context.peer()
        usage = self._connections.get(peer)
        if usage is None:
            usage = self._connections[peer] = Usage()
        size = request.ByteSize()
        try:
            self.connection_limits.admit(usage, size)
        except RequestError:
            if usage.idle:
                del self._connections[peer]
            raise
        try:
            return await self._infer(request, context.time_remaining(), _credential(context))
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

        def queue(answer: pb.ModelStreamInferResponse, held: int) -> None:
            # The request's bytes (``held``) are let go of; the answer's are held until it is written.
            data = answer.SerializeToString()
            usage.add(0, len(data) - held)
            answers.put_nowait(data)

        async def serve(raw: bytes) -> None:
            request_id = ""
            try:
                request = _parse(pb.ModelInferRequest, raw)
                request_id = request.id
                response = await self._infer(request, context.time_remaining(), credential)
                queue(pb.ModelStreamInferResponse(infer_response=response), len(raw))
            except RequestError as exc:
                queue(_stream_error(request_id, exc), len(raw))
            except Exception:
                log.exception("failed to handle a gRPC stream request")
                failure = RequestError(ErrorCode.INTERNAL, "the bridge failed to handle the request")
                queue(_stream_error(request_id, failure), len(raw))

        def unread_fill_the_bound() -> bool:
            return answers.qsize() >= limits.max_requests or usage.bytes >= limits.max_bytes

        async def read() -> None:
            try:
                async for raw in requests:
                    if limits.fits(usage, len(raw)):
                        usage.add(1, len(raw))
                        task = asyncio.create_task(serve(raw))
                        running.add(task)
                        task.add_done_callback(running.discard)
                    else:
                        usage.add(1, 0)
                        queue(_stream_error(_request_id_of(raw), limits.refusal(usage)), 0)
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
        self, request: pb.ModelInferRequest, time_left_s: float | None, credential: str | None
    ) -> pb.ModelInferResponse:
        gateway = self.gateway
        gateway.auth.check(credential, request.model_name)
        resolved = gateway.resolve(request.model_name, request.model_version or None)
        spec = resolved.spec
        inputs = decode_inputs(request, gateway.settings.max_message_bytes)
        parameters = decode_parameters(request.parameters)
        requested = [output.name for output in request.outputs] or None
        check_requested_outputs(spec, requested)
        metas, frames = tensors.to_wire(inputs)
        resolved.rules.check(metas)
        timeout_s = gateway.default_timeout(requested_timeout_s(check_parameters(parameters)))
        if time_left_s is not None:  # the client's own gRPC deadline
            timeout_s = min(timeout_s, max(time_left_s, 0.001))
        header = {"model": spec.name, "version": spec.version, "params": parameters, "tensors": metas}
        reply, reply_frames = await gateway.submit(header, frames, timeout_s)
        try:
            outputs = tensors.from_wire(check_tensors(reply, reply_frames), reply_frames)
        except WireError as exc:
            raise RequestError(ErrorCode.INTERNAL, f"the batch manager sent a malformed reply: {exc}") from None
        return encode_response(
            reply.get("model") or spec.name, reply.get("version") or spec.version, request.id, requested, outputs
        )


def _unary(
    call: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]], kind: type[Message]
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            return await call(_parse(kind, raw), context)
        except RequestError as exc:
            if exc.retry_after_s is not None:
                context.set_trailing_metadata((("retry-after", retry_after_header(exc.retry_after_s)),))
            await context.abort(status_of(exc), exc.message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("failed to handle a gRPC request")
            await context.abort(grpc.StatusCode.INTERNAL, "the bridge failed to handle the request")
        raise AssertionError("context.abort returns only by raising")

    return handle


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
        raise _bad(f"the request is not a valid {kind.DESCRIPTOR.name} message: {exc}") from None


def _request_id_of(raw: bytes) -> str:
    # Only to name a refused request in its error; an unreadable one gets no id.
    try:
        return pb.ModelInferRequest.FromString(raw).id
    except (DecodeError, RuntimeError, ValueError):
        return ""


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _stream_error(request_id: str, error: RequestError) -> pb.ModelStreamInferResponse:
    # Triton's stream has no status per message; the code leads the text so a client can tell.
    return pb.ModelStreamInferResponse(
        error_message=f"[{status_of(error).name}] {error.message}",
        infer_response=pb.ModelInferResponse(id=request_id),
    )


def _ascii(text: str) -> str:
    return text.encode("ascii", errors="replace").decode()


# -- messages <-> arrays -------------------------------------------------------------------------


class _Output(NamedTuple):
    name: str
    array: np.ndarray


def decode_inputs(request: pb.ModelInferRequest, max_bytes: int | None = None) -> list[tuple[str, np.ndarray]]:
    """The request's inputs as arrays, from ``raw_input_contents`` or each input's typed ``contents``.

    ``max_bytes`` (the bus's message limit) bounds what typed contents may take once decoded (packed
    varints expand up to 8x); it is checked from the shape and datatype before decoding."""
    if not request.inputs:
        raise _bad("the request has no inputs")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise _bad(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents; give one per input, in order")
    decoded = []
    budget = tensors.Budget(max_bytes)
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise _bad(f"input {index}: 'name' must be a non-empty string")
        check_name(name, f"input {index}'s name")
        shape = list(tensor.shape)
        if raw:
            decoded.append((name, tensors.array_from_bytes(name, tensor.datatype, shape, raw[index])))
        else:
            decoded.append((name, _from_contents(name, tensor.datatype, shape, tensor.contents, budget)))
    return decoded


def _from_contents(
    name: str, datatype: str, shape: list[int], contents: pb.InferTensorContents, budget: tensors.Budget
) -> np.ndarray:
    dtype = tensors.DATATYPES.get(datatype)
    if dtype is None:
        raise _bad(f"input {name!r}: datatype {datatype!r} is not one of {', '.join(tensors.DATATYPES)}")
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise _bad(f"input {name!r}: {datatype} has no typed contents; send it in raw_input_contents")
    shape = tensors.check_shape(name, shape)
    count = math.prod(shape)
    budget.take(name, datatype, shape, count, 4 if dtype.kind == "O" else dtype.itemsize)
    values = getattr(contents, field)
    if len(values) != count:
        raise _bad(f"input {name!r}: shape {shape} holds {count} elements, contents.{field} has {len(values)}")
    if dtype.kind == "O":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    wide = np.array(values, dtype=np.uint64 if field == "uint64_contents" else None)
    if dtype.kind in "iu" and count and wide.dtype != dtype:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise _bad(f"input {name!r}: {datatype} values must lie in [{info.min}, {info.max}]")
    return wide.astype(dtype, copy=False).reshape(shape)


def decode_parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A parameter map as plain values, which is how they travel on the bus."""
    found: dict[str, Any] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            found[key] = getattr(parameter, choice)
    return found


def encode_response(
    model: str,
    version: str | None,
    request_id: str,
    requested: list[str] | None,
    outputs: list[tuple[str, np.ndarray]],
) -> pb.ModelInferResponse:
    chosen = outputs
    if requested is not None:
        by_name = dict(outputs)
        missing = [name for name in requested if name not in by_name]
        if missing:
            raise _bad(
                f"the model has no output(s) {', '.join(map(repr, missing))}; it produced "
                f"{', '.join(repr(name) for name, _ in outputs)}"
            )
        chosen = [(name, by_name[name]) for name in requested]
    response = pb.ModelInferResponse(model_name=model, model_version=version or "", id=request_id)
    for name, array in chosen:
        response.outputs.add(name=name, datatype=tensors.datatype_of(array), shape=array.shape)
        response.raw_output_contents.append(bytes(tensor_frame(array)))
    return response


def model_metadata(spec: ModelSpec, versions: list[str]) -> pb.ModelMetadataResponse:
    """As REST's: -1 leads each shape for the batch dimension."""

    def tensor(t: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=[-1, *t.shape])

    return pb.ModelMetadataResponse(
        name=spec.name,
        versions=versions,
        platform="inferoxy",
        inputs=[tensor(t) for t in spec.inputs],
        outputs=[tensor(t) for t in spec.outputs],
    )
