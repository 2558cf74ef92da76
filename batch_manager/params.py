"""Reading the request parameters the batch manager gives meaning to: priority and sequence (session) fields.

Bridges pass the client's Open Inference Protocol ``parameters`` map through as the ``infer``
message's ``params``. Only these names mean something here (docs/BATCHING.md):

* ``priority``: ``"high"``, ``"normal"``, ``"low"``, or an int the way Triton spells it, where 1 is
  the highest: 1 -> high, 0 (Triton's "use the default") and 2 -> normal, 3 and above -> low.
* ``sequence_id`` (int or non-empty string), ``sequence_start``, ``sequence_end`` (bools): a session
  of a stateful model. A stateless model ignores them, as Triton does.
* ``timeout`` (microseconds): read by the bridges; here only whether it was given matters.

Every reader raises ``WireError`` with a message that can go back to the client as ``bad_input``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inferoxy.wire import WireError

MAX_SEQUENCE_ID_BYTES = 128


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


DEFAULT_PARAMS = RequestParams()


def parse_params(params: Any) -> RequestParams:
    """The meaning of an ``infer``'s ``params`` map (absent or empty: normal priority, no session)."""
    if not params:
        return DEFAULT_PARAMS
    if not isinstance(params, Mapping):
        raise WireError("'params' must be a map")
    priority = parse_priority(params.get("priority"))
    session: SessionParams | None = None
    sequence_id = params.get("sequence_id")
    # Triton: sequence_id 0 (or "") means "no sequence".
    if sequence_id is not None and sequence_id != 0 and sequence_id != "":
        if isinstance(sequence_id, bool) or not isinstance(sequence_id, (int, str)):
            raise WireError(f"parameter 'sequence_id' must be an int or a string, got {sequence_id!r}")
        if isinstance(sequence_id, str) and len(sequence_id.encode()) > MAX_SEQUENCE_ID_BYTES:
            raise WireError(f"parameter 'sequence_id' is longer than {MAX_SEQUENCE_ID_BYTES} bytes")
        session = SessionParams(sequence_id, _flag(params, "sequence_start"), _flag(params, "sequence_end"))
    if priority is Priority.NORMAL and session is None and "timeout" not in params:
        return DEFAULT_PARAMS
    return RequestParams(priority, session, "timeout" in params)


def parse_priority(value: Any) -> Priority:
    if value is None:
        return Priority.NORMAL
    if isinstance(value, str):
        found = _NAMES.get(value.lower())
        if found is None:
            raise WireError(f"parameter 'priority' must be high, normal, low or an int >= 0, got {value!r}")
        return found
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WireError(f"parameter 'priority' must be high, normal, low or an int >= 0, got {value!r}")
    if value == 1:
        return Priority.HIGH
    if value in (0, 2):
        return Priority.NORMAL
    return Priority.LOW


def _flag(params: Mapping[str, Any], name: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise WireError(f"parameter {name!r} must be a bool, got {value!r}")
    return value
