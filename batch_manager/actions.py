"""What goes into the scheduler (``Request``) and what it asks the service to do (``Action``).

Import them from ``batch_manager.scheduler``, which re-exports them; they live here so the scheduler's
parts (batching, sessions, admission, lifecycle) can build actions without importing the facade.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batch_manager.messages import Origin, ReplicaId, TensorMeta
from batch_manager.params import DEFAULT_PARAMS, RequestParams, SessionId
from inferoxy import messages as m
from inferoxy.protocol import ErrorCode

# A per-item error in a ``result``: (code, message).
ItemError = tuple[str, str]


@dataclass(slots=True)
class Request:
    """An ``infer`` as the scheduler needs it. ``frames`` are opaque: the scheduler never reads array bytes."""

    origin: Origin
    model: str
    version: str | None
    metas: list[TensorMeta]
    frames: list[Any]
    deadline: float
    params: RequestParams = DEFAULT_PARAMS
    # Bytes of the ``infer`` header it came in: an upper bound of what its tensor descriptions add to a batch
    # header, known without encoding anything. 0: the scheduler measures its tensor descriptions itself.
    header_bytes: int = 0
    rid: str | None = None  # the request's id (the bridge's), passed on to the replica for its log lines


@dataclass(slots=True)
class Reply:
    """Send ``header`` (a ``reply`` or an ``error``) and ``frames`` to the bridge ``origin[0]``."""

    origin: Origin
    header: m.Reply | m.Error
    frames: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return isinstance(self.header, m.Reply)

    @property
    def code(self) -> str | None:
        return self.header.code if isinstance(self.header, m.Error) else None


@dataclass(slots=True)
class Dispatch:
    """Send batch ``batch_id`` to ``replica``: ``items`` as in a ``batch`` header, then every item's tensors."""

    replica: ReplicaId
    batch_id: int
    model: str
    version: str
    items: list[m.BatchItem]
    metas: list[TensorMeta]
    frames: list[Any]
    ragged: bool = False
    end_sessions: list[SessionId] | None = None
    # How long each item's request waited between its arrival and this batch, in seconds (the queue wait metric).
    waits: list[float] = field(default_factory=list)

    def header(self) -> m.Batch:
        # An empty end_sessions is left out, as the optional fields are (docs/PROTOCOL.md).
        return m.Batch(self.replica, self.batch_id, self.model, self.version, self.items, self.metas, self.ragged,
                       self.end_sessions or None)


@dataclass(slots=True)
class ModelDrained:
    """Tell the task manager that a model version removed from the registry holds no request here any more."""

    model: str
    version: str

    def header(self) -> m.ModelDrained:
        return m.ModelDrained(self.model, self.version)


Action = Reply | Dispatch | ModelDrained

_CODES = {code.value for code in ErrorCode}


def error_code(code: str) -> ErrorCode:
    """A peer's error code as ours; one we do not know is ``internal``."""
    return ErrorCode(code) if code in _CODES else ErrorCode.INTERNAL


def error_reply(origin: Origin, code: ErrorCode, message: str) -> Reply:
    return Reply(origin, m.Error(origin[1], code, message))
