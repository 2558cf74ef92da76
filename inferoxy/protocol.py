"""Message types and error codes spoken on Inferoxy's internal ZeroMQ bus.

docs/PROTOCOL.md describes every message with its fields. Like ``wire``, this module
is imported inside replica images and so depends on the standard library only.
"""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    """Why a request failed. Every error reply on every socket carries one of these."""

    BAD_INPUT = "bad_input"
    UNKNOWN_MODEL = "unknown_model"
    NOT_READY = "not_ready"
    OVERLOADED = "overloaded"
    DEADLINE = "deadline"
    REPLICA_LOST = "replica_lost"
    SESSION_LOST = "session_lost"
    UNAVAILABLE = "unavailable"  # a component on the request's path went silent or died while it held it
    MODEL_ERROR = "model_error"
    INTERNAL = "internal"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]


_HTTP_STATUS = {
    ErrorCode.BAD_INPUT: 400,
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.NOT_READY: 503,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.DEADLINE: 504,
    ErrorCode.REPLICA_LOST: 503,
    ErrorCode.SESSION_LOST: 409,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.MODEL_ERROR: 500,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.RATE_LIMITED: 429,
}


class InferoxyError(Exception):
    """A failure that ends in an error reply, carrying its stable code (``ErrorCode``).

    Every error a bridge, a validator or the wire format raises for a request derives from this,
    so each bridge maps ``code`` to its own status in one table (HTTP: ``http_status``; gRPC:
    bridges/grpc_bridge.py). ``code`` is the code's string (``"bad_input"``): codes read from a peer
    may be ones this version does not know, and they are passed on unchanged. ``message`` is
    written for the client and safe to send.
    """

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code: str = code.value if isinstance(code, ErrorCode) else code
        self.message = message

    @property
    def http_status(self) -> int:
        """The HTTP status of the code; an unknown code is still a server-side failure (500)."""
        known = _CODES.get(self.code)
        return 500 if known is None else known.http_status


_CODES = {code.value: code for code in ErrorCode}


# Bridges <-> batch manager
INFER = "infer"
CANCEL = "cancel"
REPLY = "reply"
ERROR = "error"

# Batch manager <-> task manager, task manager <-> replicas
HEARTBEAT = "hb"
REPLICA_UP = "replica_up"
REPLICA_DOWN = "replica_down"
REPLICA_DRAINING = "replica_draining"
MODEL_STATUS = "model_status"
MODEL_DRAINED = "model_drained"
LOAD = "load"
CREDIT = "credit"
READY = "ready"
BATCH = "batch"
RESULT = "result"
FAILED = "failed"
STOP = "stop"
