"""Each request's one id, chosen where it enters (docs/PROTOCOL.md, "Request ids").

The first usable of: the request's own id (the Open Inference Protocol body's ``id``, gRPC's
``ModelInferRequest.id``, the ZeroMQ header's ``request_id``), the ``X-Request-ID`` header (gRPC:
``x-request-id`` metadata), the trace id of a W3C ``traceparent`` header, else a fresh one (32 hex
digits). The id goes into log lines, so a client's id is usable only if it is 1 to 128 visible ASCII
characters (``!`` to ``~``: no spaces, no control characters, nothing a log line could be forged
with); any other is passed over as if absent, never refused, so no request that was served before
is refused for its id. The protocol's own echo (the body's ``id``, gRPC's response ``id``, ZeroMQ's
``id``) still returns what the client sent; when the request had no id of its own, the answer's ``id``
is the one the client gave in a header (``given``), and a fresh id is only in the response header (REST:
``X-Request-ID``; gRPC: ``x-request-id`` metadata) so answers to clients that named nothing stay as they were.
"""

from __future__ import annotations

import os
import re

from inferoxy.messages import REQUEST_ID_MAX_CHARS

HEADER = "x-request-id"
TRACEPARENT = "traceparent"

_USABLE = re.compile(rf"[!-~]{{1,{REQUEST_ID_MAX_CHARS}}}")
# version "-" trace id "-" parent id "-" flags; version ff is invalid, and so is an all-zero trace id.
_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-(?!0{32})([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}(?:-.*)?")


def usable(value: object) -> str | None:
    """``value`` if it may name a request in logs and headers, else None."""
    if isinstance(value, str) and _USABLE.fullmatch(value):
        return value
    return None


def from_traceparent(value: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header, or None when there is none or it is malformed."""
    if not value or len(value) > 512:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    return match[1] if match else None


def fresh() -> str:
    """A new id: 128 random bits as 32 hex digits (a W3C trace id's shape)."""
    return os.urandom(16).hex()


def given(own: object = None, header: str | None = None, traceparent: str | None = None) -> str | None:
    """The first usable of the request's own id, the X-Request-ID header and the trace id: the client's name for
    the request, or None when it gave none."""
    return usable(own) or usable(header) or from_traceparent(traceparent)


def choose(own: object = None, header: str | None = None, traceparent: str | None = None) -> str:
    """The request's id: the client's (``given``), else a fresh one."""
    return given(own, header, traceparent) or fresh()
