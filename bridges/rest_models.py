"""REST routes about models beyond metadata: Triton's statistics and model configuration.

``GET /v2/models/stats`` (every model: the observer rule, ``Authorizer.check_observer``),
``GET /v2/models/{name}[/versions/{v}]/stats`` and ``.../config`` (one model: the metadata rule).
The documents are built by bridges/statistics.py and bridges/model_config.py, which gRPC uses too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response

from bridges import metering
from bridges.auth import credential_of_header
from bridges.errors import RequestError
from bridges.gateway import Gateway
from bridges.model_config import triton_config
from bridges.statistics import requested, statistics

Add = Callable[..., None]


def add_model_routes(add: Add, gateway: Gateway, error_response: Callable[[RequestError], Response]) -> None:
    def credential(request: Request) -> str | None:
        return credential_of_header(request.headers.get("authorization"))

    async def stats(request: Request) -> Response:
        params = request.path_params
        try:
            specs = requested(gateway, credential(request), params.get("name"), params.get("version"))
        except RequestError as exc:
            return error_response(exc)
        metering.flush_all()  # this process's latest counts, as a scrape gets them (others': FLUSH_S late at most)
        # In a thread: reading serve's metrics directory takes milliseconds that inference on this loop must not wait.
        document = await asyncio.to_thread(statistics, specs)
        return Response(orjson.dumps(document), media_type="application/json")

    async def config(request: Request) -> Response:
        params = request.path_params
        try:
            gateway.auth.check_metadata(credential(request), params["name"])
            spec = gateway.resolve(params["name"], params.get("version")).spec
        except RequestError as exc:
            return error_response(exc)
        settings = gateway.settings
        document = triton_config(spec, max_queue_size=settings.max_queue_size,
                                 request_timeout_s=settings.request_timeout_s)
        return Response(orjson.dumps(document), media_type="application/json")

    # /v2/models/stats before /v2/models/{name}: "stats" is the statistics of every model, not a model's name.
    add("/v2/models/stats", stats, methods=["GET"])
    add("/v2/models/{name}/stats", stats, methods=["GET"])
    add("/v2/models/{name}/versions/{version}/stats", stats, methods=["GET"])
    add("/v2/models/{name}/config", config, methods=["GET"])
    add("/v2/models/{name}/versions/{version}/config", config, methods=["GET"])
