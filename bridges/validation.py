"""Checking a request's tensors against the inputs its model declares, before anything reaches the bus.

Bridges call this with the tensor descriptions of ``inferoxy.wire`` (``name``, ``dtype``,
``shape``, already checked for well-formedness), so it never touches array data. A model
spec's inputs give the Open Inference Protocol datatype and the shape without the batch
dimension, -1 meaning any size. A spec that declares no inputs accepts any tensors, but
every request still needs at least one tensor and one shared batch dimension of at least 1:
the batch manager concatenates requests along that axis.

Also here, for all three bridges: the 256-byte bound on names (they ride in bus headers, which
have a hard size limit), the check of requested output names, and the bridges' door to
``batch_manager.params``, the one reader of request parameters they share with the batch manager.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from batch_manager.params import RequestParams, parse_params, positive_int
from bridges.errors import RequestError
from inferoxy.protocol import ErrorCode
from inferoxy.wire import BYTES, WireError
from model_manager.spec import DATATYPE_TO_DTYPE, DTYPE_TO_DATATYPE, ModelSpec

# Every declared datatype's wire dtype; BYTES travels as length-prefixed elements (inferoxy.wire).
_WIRE_DTYPE = {**DATATYPE_TO_DTYPE, "BYTES": BYTES}
_DATATYPE = {**DTYPE_TO_DATATYPE, BYTES: "BYTES"}
# Longest model, version, input and output name a bridge passes on (docs/PROTOCOL.md).
MAX_NAME_BYTES = 256


class _Declared:
    __slots__ = ("datatype", "dims", "dtype")

    def __init__(self, datatype: str, dims: list[int]) -> None:
        self.datatype = datatype
        self.dtype = _WIRE_DTYPE[datatype]
        self.dims = tuple(dims)

    def accepts_dims(self, dims: Sequence[int]) -> bool:
        if len(dims) != len(self.dims):
            return False
        return all(want == -1 or want == got for want, got in zip(self.dims, dims, strict=True))

    def describe_shape(self) -> str:
        dims = ", ".join("any" if d == -1 else str(d) for d in self.dims)
        return f"[batch{', ' if dims else ''}{dims}]"


class InputRules:
    """The checks one model spec implies, worked out once per spec rather than once per request."""

    __slots__ = ("_declared", "model")

    def __init__(self, spec: ModelSpec) -> None:
        self.model = spec.name
        self._declared = {t.name: _Declared(t.datatype, t.shape) for t in spec.inputs}

    def check(self, metas: Sequence[Mapping[str, Any]]) -> None:
        """Raise a ``bad_input`` RequestError naming the first input that does not fit."""
        if not metas:
            raise _bad("the request has no input tensors")
        declared = self._declared
        seen: set[str] = set()
        batch = -1
        first = ""
        for meta in metas:
            name = meta["name"]
            shape = meta["shape"]
            check_name(name, "an input name")
            if name in seen:
                raise _bad(f"input {name!r} is given more than once")
            seen.add(name)
            if not shape:
                raise _bad(f"input {name!r} has shape []: every input needs a leading batch dimension")
            if batch < 0:
                batch, first = shape[0], name
            elif shape[0] != batch:
                raise _bad(
                    f"inputs must share their leading (batch) dimension: {first!r} has {batch} rows, "
                    f"{name!r} has {shape[0]}"
                )
            if declared:
                self._check_declared(declared, name, meta["dtype"], shape)
        if batch < 1:
            raise _bad(f"the batch dimension must be at least 1; {first!r} has shape {list(metas[0]['shape'])}")
        if declared and len(seen) != len(declared):
            missing = [name for name in declared if name not in seen]
            raise _bad(f"model {self.model!r} needs input(s) {', '.join(map(repr, missing))}, which are missing")

    def _check_declared(self, declared: dict[str, _Declared], name: str, dtype: str, shape: list[int]) -> None:
        rule = declared.get(name)
        if rule is None:
            raise _bad(
                f"model {self.model!r} has no input {name!r}; its inputs are {', '.join(map(repr, declared))}"
            )
        if dtype != rule.dtype:
            got = _DATATYPE.get(dtype, dtype)
            raise _bad(f"input {name!r} must be {rule.datatype} ({rule.dtype}), got {got} ({dtype})")
        if not rule.accepts_dims(shape[1:]):
            raise _bad(f"input {name!r} must have shape {rule.describe_shape()}, got {list(shape)}")


def _bad(message: str) -> RequestError:
    return RequestError(ErrorCode.BAD_INPUT, message)


def check_parameters(params: Mapping[str, Any] | None) -> RequestParams:
    """The request parameters as the batch manager will read them (batch_manager/params.py, the one
    reader every bridge shares), or a ``bad_input`` RequestError naming the parameter."""
    try:
        return parse_params(params)
    except WireError as exc:
        raise _bad(str(exc)) from None


def requested_timeout_s(parsed: RequestParams, timeout_ms: Any = None) -> float | None:
    """The deadline a request asks for, in seconds, or None when it asks for none.

    ZeroMQ clients may send ``timeout_ms``; any client may send the Open Inference Protocol
    parameter ``timeout`` in microseconds (``parsed`` from ``check_parameters``). With both, the
    shorter wins.
    """
    found: float | None = None
    if timeout_ms is not None:
        try:
            found = positive_int(timeout_ms, "'timeout_ms'") / 1000.0
        except WireError as exc:
            raise _bad(str(exc)) from None
    if parsed.timeout_us is not None:
        seconds = parsed.timeout_us / 1e6
        found = seconds if found is None else min(found, seconds)
    return found


def check_name(name: str, what: str) -> None:
    """Refuse a name longer than ``MAX_NAME_BYTES``: names ride in bus headers, which have a hard limit."""
    size = len(name.encode(errors="replace"))
    if size > MAX_NAME_BYTES:
        raise _bad(f"{what} is {size} bytes long, more than the limit of {MAX_NAME_BYTES} bytes")


def check_requested_outputs(spec: ModelSpec, requested: Sequence[str] | None) -> None:
    """Refuse output names that are too long or, when the spec declares its outputs, not among them."""
    if not requested:
        return
    for name in requested:
        check_name(name, "an output name")
    if spec.outputs:
        declared = [t.name for t in spec.outputs]
        unknown = [name for name in requested if name not in declared]
        if unknown:
            raise _bad(
                f"model {spec.name!r} has no output(s) {', '.join(map(repr, unknown))}; "
                f"its outputs are {', '.join(map(repr, declared))}"
            )
