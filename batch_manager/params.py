"""The one reader of request parameters: every bridge and the batch manager call ``parse_params``.

Bridges pass the client's Open Inference Protocol ``parameters`` map through as the ``infer``
message's ``params``. A bridge runs ``parse_params`` before it sends a request (so a bad
parameter is refused at the edge, in the client's own protocol) and the batch manager runs it
again on what arrives; both therefore accept and refuse exactly the same maps. Only these
names mean something (docs/BATCHING.md, docs/PROTOCOL.md):

* ``priority``: ``"high"``, ``"normal"``, ``"low"``, or an int the way Triton spells it, where 1 is
  the highest: 1 -> high, 0 (Triton's "use the default") and 2 -> normal, 3 and above -> low.
* ``sequence_id`` (int in [0, 2**64) or a string of at most ``MAX_SEQUENCE_ID_BYTES``),
  ``sequence_start``, ``sequence_end`` (bools): a session of a stateful model. A stateless model
  ignores them, as Triton does.
* ``timeout`` (microseconds, an int in [1, 2**63)): the bridges read the deadline from it; the batch
  manager only needs to know whether it was given.

Any other parameter travels untouched to the replica (``RequestParams.passed``, the batch item's ``params``:
``Model.predict``'s ``params``), but the map is bounded: keys of at most
``MAX_PARAMETER_KEY_BYTES`` and at most ``MAX_PARAMETERS_BYTES`` packed, because every request's
parameters ride in the header of the batch it joins, and a header has a hard size limit.

This module depends on the standard library and ``inferoxy.wire`` only, so the bridges import it
without pulling in the batch manager. Every reader raises ``WireError`` with a message that can
go back to the client as ``bad_input``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inferoxy.wire import WireError, pack_header

MAX_SEQUENCE_ID_BYTES = 128
MAX_PARAMETER_KEY_BYTES = 256
MAX_PARAMETERS_BYTES = 16 * 1024
# msgpack carries integers up to 2**64 - 1; larger ones cannot travel on the bus at all.
_UINT64_END = 1 << 64
# Timeouts are int64 as in gRPC's int64_param (and Triton); a larger one is a client's mistake, not a wish.
_INT64_END = 1 << 63


class Priority(enum.IntEnum):
    """Lower value = dispatched earlier. The value also scales the aging offset (docs/BATCHING.md)."""

    HIGH = 0
    NORMAL = 1
    LOW = 2


_NAMES = {"high": Priority.HIGH, "normal": Priority.NORMAL, "low": Priority.LOW}

SessionId = int | str


@dataclass(slots=True, frozen=True)
class SessionParams:
    id: SessionId
    start: bool = False
    end: bool = False


@dataclass(slots=True, frozen=True)
class RequestParams:
    priority: Priority = Priority.NORMAL
    session: SessionParams | None = None
    timeout_given: bool = False
    timeout_us: int | None = None
    passed: dict[str, Any] | None = None
    """The parameters the proxy does not read (``RESERVED`` left out): they reach the model; None when none."""


DEFAULT_PARAMS = RequestParams()
# The parameters the proxy itself reads (binary_data_output: the REST bridge); they never reach the model.
# Request ids and API keys are not parameters: the bridges read them from the request's own fields and headers.
RESERVED = frozenset({"priority", "sequence_id", "sequence_start", "sequence_end", "timeout", "binary_data_output"})


def parse_params(params: Any) -> RequestParams:
    """The meaning of an ``infer``'s ``params`` map (absent or empty: normal priority, no session)."""
    if not params:
        return DEFAULT_PARAMS
    if not isinstance(params, Mapping):
        raise WireError("'params' must be a map")
    _check_size(params)
    priority = parse_priority(params.get("priority"))
    session = _session(params)
    timeout_us = parse_timeout_us(params.get("timeout"))
    passed = {key: value for key, value in params.items() if key not in RESERVED} or None
    if priority is Priority.NORMAL and session is None and timeout_us is None and passed is None:
        return DEFAULT_PARAMS
    return RequestParams(priority, session, timeout_us is not None, timeout_us, passed)


def parse_priority(value: Any) -> Priority:
    if value is None:
        return Priority.NORMAL
    if isinstance(value, str):
        found = _NAMES.get(value.lower())
        if found is None:
            raise WireError(f"parameter 'priority' must be high, normal, low or an int >= 0, got {_show(value)}")
        return found
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _UINT64_END:
        raise WireError(f"parameter 'priority' must be high, normal, low or an int >= 0, got {_show(value)}")
    if value == 1:
        return Priority.HIGH
    if value in (0, 2):
        return Priority.NORMAL
    return Priority.LOW


def parse_timeout_us(value: Any) -> int | None:
    """The ``timeout`` parameter (µs), or None when absent."""
    if value is None:
        return None
    return positive_int(value, "parameter 'timeout' (microseconds)")


def positive_int(value: Any, what: str) -> int:
    """``value`` if it is an int in [1, 2**63), else WireError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < _INT64_END:
        raise WireError(f"{what} must be a positive integer below 2**63, got {_show(value)}")
    return value


def _session(params: Mapping[str, Any]) -> SessionParams | None:
    sequence_id = params.get("sequence_id")
    # Triton: sequence_id 0 (or "") means "no sequence".
    if sequence_id is None or sequence_id == 0 or sequence_id == "":
        _flag(params, "sequence_start")  # still typed, so a typo is caught whether or not a session is named
        _flag(params, "sequence_end")
        return None
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, (int, str)):
        raise WireError(f"parameter 'sequence_id' must be an int or a string, got {_show(sequence_id)}")
    if isinstance(sequence_id, int) and not 0 <= sequence_id < _UINT64_END:
        raise WireError(f"parameter 'sequence_id' must lie in [0, 2**64), got {sequence_id}")
    if isinstance(sequence_id, str) and len(sequence_id.encode()) > MAX_SEQUENCE_ID_BYTES:
        raise WireError(
            f"parameter 'sequence_id' is {len(sequence_id.encode())} bytes, more than the limit of "
            f"{MAX_SEQUENCE_ID_BYTES}"
        )
    return SessionParams(sequence_id, _flag(params, "sequence_start"), _flag(params, "sequence_end"))


def _flag(params: Mapping[str, Any], name: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise WireError(f"parameter {name!r} must be a bool, got {_show(value)}")
    return value


def _check_size(params: Mapping[str, Any]) -> None:
    for key in params:
        if not isinstance(key, str):
            raise WireError(f"parameter names must be strings, got {_show(key)}")
        if len(key.encode()) > MAX_PARAMETER_KEY_BYTES:
            raise WireError(
                f"a parameter name is {len(key.encode())} bytes, more than the limit of {MAX_PARAMETER_KEY_BYTES}"
            )
    try:
        size = len(pack_header(params))
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"the parameters cannot be sent: {exc}") from None
    if size > MAX_PARAMETERS_BYTES:
        raise WireError(f"the parameters take {size} bytes, more than the limit of {MAX_PARAMETERS_BYTES}")


def _show(value: Any) -> str:
    # A client's value goes back in the message; a huge one must not make a huge error.
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."
