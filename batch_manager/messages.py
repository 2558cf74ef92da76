"""The batch manager's side of docs/PROTOCOL.md: the headers the scheduler builds, the task manager's it reads.

What bridges send is read by ``inferoxy.messages`` (typed structs, validated as they decode); the
readers here still take the task manager's headers as dicts until that link moves to the structs
too. Every reader raises ``WireError`` with a message that is safe to send back to the peer, so the
service can answer a malformed message instead of dying on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard, get_args

from inferoxy.protocol import ErrorCode
from inferoxy.wire import WireError
from model_manager.spec import ServingState

# A request as the bridge knows it: its DEALER identity and its own id for the request.
Origin = tuple[bytes, int]
# Replica ids are echoed back exactly as the task manager spelled them.
ReplicaId = str | bytes
TensorMeta = dict[str, Any]


# --- task manager -> batch manager -----------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ReplicaUp:
    replica: ReplicaId
    model: str
    version: str
    capacity: int


@dataclass(slots=True, frozen=True)
class ReplicaDown:
    replica: ReplicaId
    reason: str


@dataclass(slots=True, frozen=True)
class ModelStatusUpdate:
    """A model version's serving state as the task manager sees it, and why (``ModelStatus``)."""

    model: str
    version: str
    state: ServingState
    reason: str | None


_SERVING_STATES: frozenset[str] = frozenset(get_args(ServingState))


@dataclass(slots=True, frozen=True)
class BatchRef:
    """Which batch a ``result`` or ``failed`` answers: enough to settle it even when the rest is garbled."""

    replica: ReplicaId
    batch_id: int


@dataclass(slots=True, frozen=True)
class BatchFailed:
    replica: ReplicaId
    batch_id: int
    code: str
    message: str


def parse_replica_up(header: Mapping[str, Any]) -> ReplicaUp:
    replica = _replica(header)
    model, version, capacity = header.get("model"), header.get("version"), header.get("capacity")
    if not isinstance(model, str) or not isinstance(version, str):
        raise WireError("replica_up: 'model' and 'version' must be strings")
    if not _is_int(capacity) or capacity < 0:
        raise WireError("replica_up: 'capacity' must be an int >= 0")
    return ReplicaUp(replica, model, version, capacity)


def parse_replica_down(header: Mapping[str, Any]) -> ReplicaDown:
    reason = header.get("reason")
    return ReplicaDown(_replica(header), reason if isinstance(reason, str) and reason else "replica went down")


def parse_model_status(header: Mapping[str, Any]) -> ModelStatusUpdate:
    model, version, state, reason = (header.get(k) for k in ("model", "version", "state", "reason"))
    if not isinstance(model, str) or not model or not isinstance(version, str) or not version:
        raise WireError("model_status: 'model' and 'version' must be non-empty strings")
    if state not in _SERVING_STATES:
        # An unknown state could mean anything; guessing wrong would refuse or queue requests wrongly.
        raise WireError(f"model_status: 'state' must be one of {sorted(_SERVING_STATES)}, got {state!r}")
    if reason is not None and not isinstance(reason, str):
        raise WireError("model_status: 'reason' must be a string or null")
    return ModelStatusUpdate(model, version, state, reason or None)


def parse_batch_ref(header: Mapping[str, Any]) -> BatchRef:
    return BatchRef(_replica(header), _batch_id(header))


def parse_result_items(header: Mapping[str, Any]) -> list[int]:
    """How many tensors each item of a ``result`` owns."""
    items = header.get("items")
    if not isinstance(items, list):
        raise WireError("result: 'items' must be a list")
    counts = []
    for item in items:
        n = item.get("n") if isinstance(item, dict) else None
        if not _is_int(n) or n < 0:
            raise WireError("result: every item must be a map with an int 'n' >= 0")
        counts.append(n)
    return counts


def parse_result_item_errors(header: Mapping[str, Any]) -> list[tuple[str, str] | None] | None:
    """Per-item errors of a ``result`` (an item with ``code`` failed alone, e.g. ``session_lost``), or None if none."""
    items = header.get("items")
    if not isinstance(items, list) or not any(isinstance(item, dict) and "code" in item for item in items):
        return None
    errors: list[tuple[str, str] | None] = []
    for item in items:
        code = item.get("code") if isinstance(item, dict) else None
        if code is None:
            errors.append(None)
            continue
        message = item.get("message")
        errors.append((code if isinstance(code, str) else ErrorCode.INTERNAL.value,
                       message if isinstance(message, str) else "the item failed"))
    return errors


def parse_failed(header: Mapping[str, Any]) -> BatchFailed:
    code, message = header.get("code"), header.get("message")
    return BatchFailed(
        _replica(header),
        _batch_id(header),
        code if isinstance(code, str) else ErrorCode.INTERNAL.value,
        message if isinstance(message, str) else "the batch failed",
    )


def _replica(header: Mapping[str, Any]) -> ReplicaId:
    replica = header.get("replica")
    if not isinstance(replica, (str, bytes)) or not replica:
        raise WireError("'replica' must be a non-empty string")
    return replica


def _batch_id(header: Mapping[str, Any]) -> int:
    batch_id = header.get("batch")
    if not _is_int(batch_id):
        raise WireError("'batch' must be an int")
    return batch_id


def _is_int(value: Any) -> TypeGuard[int]:
    # bool is an int subclass, and True is no request id.
    return isinstance(value, int) and not isinstance(value, bool)
