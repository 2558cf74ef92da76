"""Triton's model repository calls over gRPC (``RepositoryIndex``, ``RepositoryModelLoad``,
``RepositoryModelUnload``), under the admin API's rules (docs/ADMIN.md, "Access").

The operations are the REST ones (``AdminApi.index``, ``load_model``, ``unload_model``); what differs is
how the caller is read. The key comes from ``x-inferoxy-admin-key`` or ``authorization: Bearer KEY``
metadata, the address from the call's peer. A gRPC call carries no browser headers, since a web page
cannot speak gRPC itself; one that does (a gRPC-Web proxy passes ``origin`` and ``sec-fetch-*`` on as
metadata) is refused whatever key it carries, the strictest of the REST rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc.aio
from redis.exceptions import RedisError

from bridges.admin import AdminApi, registry_unreachable
from bridges.admin_access import BROWSER_HEADERS, AdminError, Caller, supplied_key
from bridges.errors import RequestError
from bridges.proto import grpc_predict_v2_pb2 as pb
from inferoxy.protocol import ErrorCode
from inferoxy.settings import Settings
from model_manager.editing import SpecError

T = TypeVar("T")

# The REST statuses of AdminError as the error codes every bridge maps (gRPC: grpc_codec.STATUS_OF_CODE).
_CODE_OF_STATUS = {
    400: ErrorCode.BAD_INPUT,
    401: ErrorCode.UNAUTHENTICATED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.UNKNOWN_MODEL,
    409: ErrorCode.BAD_INPUT,
    415: ErrorCode.BAD_INPUT,
    503: ErrorCode.UNAVAILABLE,
}


def caller_of(context: grpc.aio.ServicerContext) -> Caller:
    """The caller as the REST admin API reads one, from the call's metadata (names are lower case) and peer."""
    metadata = {name: value for name, value in context.invocation_metadata() or () if isinstance(value, str)}
    browser = any(name in metadata for name in BROWSER_HEADERS)
    return Caller(supplied_key(metadata), peer_host(context.peer() or ""), browser)


def peer_host(peer: str) -> str:
    """The address in grpcio's peer string: ``ipv4:127.0.0.1:5000`` or ``ipv6:[::1]:5000``; "" for others."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return ""  # unix sockets and the like: never taken for loopback


def _parameter(value: pb.ModelRepositoryParameter) -> Any:
    choice = value.WhichOneof("parameter_choice")
    if choice == "bytes_param":
        raise AdminError(400, "file parameters are not supported: an Inferoxy model is a spec; send it as the "
                              "'config' parameter (JSON)")
    return None if choice is None else getattr(value, choice)


def parameters_of(request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest) -> dict[str, Any]:
    parameters = {name: _parameter(value) for name, value in request.parameters.items()}
    if parameters.get("version") is not None:
        parameters["version"] = str(parameters["version"])  # REST takes it as JSON; gRPC as a string or int64
    return parameters


class RepositoryServicer:
    """The three calls; each admits its caller as the REST admin API does, then runs the shared operation."""

    def __init__(self, settings: Settings, serving: Callable[[], Any] = lambda: None) -> None:
        self.api = AdminApi(settings, serving)

    async def close(self) -> None:
        await self.api.close()

    async def index(self, request: pb.RepositoryIndexRequest,
                    context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        rows = await self._admitted(context, lambda: self.api.index(only_ready=request.ready))
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows])

    async def load(self, request: pb.RepositoryModelLoadRequest,
                   context: grpc.aio.ServicerContext) -> pb.RepositoryModelLoadResponse:
        await self._admitted(context, lambda: self.api.load_model(request.model_name, parameters_of(request)))
        return pb.RepositoryModelLoadResponse()

    async def unload(self, request: pb.RepositoryModelUnloadRequest,
                     context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        await self._admitted(context, lambda: self.api.unload_model(request.model_name, parameters_of(request)))
        return pb.RepositoryModelUnloadResponse()

    async def _admitted(self, context: grpc.aio.ServicerContext, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            caller = caller_of(context)
            if caller.browser:
                raise AdminError(403, "refused: the gRPC admin calls answer no browser (the call carried Origin or "
                                      "Sec-Fetch-* metadata)")
            await self.api.admit(caller)
            return await operation()
        except AdminError as exc:
            raise RequestError(_CODE_OF_STATUS.get(exc.status, ErrorCode.INTERNAL), str(exc)) from None
        except SpecError as exc:
            raise RequestError(ErrorCode.BAD_INPUT, str(exc)) from None
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise RequestError(ErrorCode.UNAVAILABLE, registry_unreachable(exc)) from None
