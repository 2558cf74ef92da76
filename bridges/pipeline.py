"""The one request pipeline every bridge runs: authorize -> resolve -> check -> deadline -> submit -> answer.

REST, gRPC and ZeroMQ each decode their own request format into wire tensor descriptions and
frames (``inferoxy.wire``), then hand them here, so each rule lives once:

1. ``admit``: the API key (``Authorizer.check``, which also meters the key's rate limit), then the
   model and version the request goes to (unknown ones are refused without a round trip).
2. ``prepare``: requested output names, the inputs against the model's declared inputs
   (``InputRules``), the request parameters as the batch manager will read them, and the deadline:
   the client's own (``timeout`` parameter, ZeroMQ's ``timeout_ms``, a gRPC deadline), never longer
   than the server's.
3. ``start`` (callback, for the ZeroMQ bridge's reactor) or ``run`` (await, for REST and gRPC): the
   gateway sends it to the batch manager and settles it exactly once.
4. The reply's tensors are checked (O(1) per tensor) before a bridge encodes them; a malformed reply
   is ``internal``.
5. ``meter.record``: each bridge counts and times every request once, where its answer (result or
   error) goes to the transport (bridges/metering.py).

Every failure is an ``InferoxyError`` (``RequestError`` here) with a stable code; each bridge maps
codes to its protocol's status in one table (REST: ``InferoxyError.http_status``; gRPC:
``bridges.grpc_codec.STATUS_OF_CODE``). What stays in a bridge is its protocol: reading its request
format, its per-connection budgets, its transport (a disconnecting HTTP client, a gRPC stream).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from bridges.catalog import ResolvedModel
from bridges.errors import RequestError
from bridges.gateway import Gateway, Outcome, Reply
from bridges.metering import Meter
from bridges.validation import check_parameters, check_requested_outputs, requested_timeout_s
from inferoxy.protocol import ErrorCode
from inferoxy.wire import Frame, WireError, check_tensors
from model_manager.spec import ModelSpec


class Prepared(NamedTuple):
    """A checked request, ready for the bus: the model version it goes to, its parameters as the batch
    manager reads them, its inputs' descriptions and frames (untouched), and the deadline it runs under."""

    spec: ModelSpec
    params: dict[str, Any]
    metas: list[dict[str, Any]]
    frames: Sequence[Frame]
    timeout_s: float
    request_id: str | None = None  # the request's one id (bridges/request_ids.py), for log lines and the reply


class Answer(NamedTuple):
    """A reply whose tensor descriptions were checked against its frames."""

    model: str
    version: str
    metas: list[dict[str, Any]]
    frames: list[Any]


AnswerCallback = Callable[["Answer | RequestError"], None]


class Pipeline:
    """The steps every bridge runs, over one gateway."""

    __slots__ = ("gateway", "meter")

    def __init__(self, gateway: Gateway, bridge: str) -> None:
        self.gateway = gateway
        self.meter = Meter(bridge, gateway.catalog)

    def admit(self, credential: object, name: str, version: str | None) -> ResolvedModel:
        """The model the request goes to, once its API key may call it (``unauthenticated``, ``forbidden``,
        ``rate_limited``, ``unknown_model``, ``not_ready`` otherwise)."""
        self.gateway.auth.check(credential, name)
        return self.gateway.resolve(name, version)

    def prepare(
        self,
        resolved: ResolvedModel,
        metas: list[dict[str, Any]],
        frames: Sequence[Frame],
        parameters: Mapping[str, Any] | None,
        *,
        outputs: Sequence[str] | None = None,
        timeout_ms: Any = None,
        time_left_s: float | None = None,
        request_id: str | None = None,
    ) -> Prepared:
        """Check a decoded request against its model; ``bad_input`` names the first thing that does not fit.

        ``timeout_ms``: ZeroMQ's own deadline field; ``time_left_s``: what is left of a gRPC call's deadline;
        ``request_id``: the request's id (``bridges.request_ids.choose``).
        """
        spec = resolved.spec
        check_requested_outputs(spec, outputs)
        resolved.rules.check(metas)
        parsed = check_parameters(parameters)
        requested_s = requested_timeout_s(parsed, timeout_ms)
        timeout_s = self.gateway.default_timeout(requested_s)
        if time_left_s is not None:
            timeout_s = min(timeout_s, max(time_left_s, 0.001))
        params = dict(parameters) if parameters else {}
        if requested_s is not None and parsed.timeout_us is None:
            # The batch manager reads a client's own deadline from the Open Inference Protocol `timeout`
            # parameter (µs); without it the model's default would apply over the client's `timeout_ms`.
            # The deadline capped by the server's is sent, so a huge `timeout_ms` cannot overflow it.
            params["timeout"] = max(1, int(timeout_s * 1_000_000))
        return Prepared(spec, params, metas, frames, timeout_s, request_id)

    def start(self, prepared: Prepared, callback: AnswerCallback) -> int:
        """Send the request; ``callback`` gets its ``Answer`` or ``RequestError`` exactly once, later.

        Raises RequestError (``overloaded``, ``unavailable``, ``bad_input`` for an oversized message)
        instead, and then the callback is never called. Returns the id ``gateway.cancel`` takes."""

        def settle(outcome: Outcome) -> None:
            callback(outcome if isinstance(outcome, RequestError) else _answer(prepared.spec, outcome))

        spec = prepared.spec
        return self.gateway.start_request(spec.name, spec.version, prepared.metas, prepared.frames, prepared.timeout_s,
                                          settle, params=prepared.params, request_id=prepared.request_id)

    async def run(self, prepared: Prepared) -> Answer:
        """Send the request and wait for its answer; cancelling this cancels the request at the batch manager."""
        spec = prepared.spec
        reply, frames = await self.gateway.submit(spec.name, spec.version, prepared.metas, prepared.frames,
                                                  prepared.timeout_s, params=prepared.params,
                                                  request_id=prepared.request_id)
        answer = _answer(prepared.spec, Reply(reply, frames))
        if isinstance(answer, RequestError):
            raise answer
        return answer


def _answer(spec: ModelSpec, reply: Reply) -> Answer | RequestError:
    header = reply.header
    try:
        metas = check_tensors({"tensors": header.tensors}, reply.frames)
    except WireError as exc:
        return RequestError(ErrorCode.INTERNAL, f"the batch manager sent a malformed reply: {exc}")
    return Answer(header.model or spec.name, header.version or spec.version, metas, reply.frames)
