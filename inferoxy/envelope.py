"""The routing envelope: the frame in front of every batch and every answer to a batch.

A batch travels batch manager -> task manager -> replica, and its answer (``result`` or
``failed``) replica -> task manager -> batch manager, as ``[envelope, header, *tensors]``.
The envelope is a msgpack array ``[replica_id, batch_id]``; the task manager routes by it
alone and passes the header and tensor frames through as opaque ZeroMQ frames, never
decoding them (decoding a 64-request batch's header, twice per batch, was most of the task
manager's CPU: docs/ARCHITECTURE.md, "Decisions"). Every other message on these links is a
single msgpack map (a header), so the first frame's msgpack type tells the two apart.

Imported inside replica images: it depends on msgpack only.
"""

from __future__ import annotations

from typing import Any

import msgpack

# A replica id is at most 63 characters; a batch id is an int or a short string. Far above both.
MAX_ENVELOPE_BYTES = 512

BatchId = int | str


class EnvelopeError(ValueError):
    """An envelope frame that is not ``[replica_id, batch_id]``."""


def pack(replica: str, batch: BatchId) -> bytes:
    return msgpack.packb((replica, batch), use_bin_type=True)


def _data(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def is_envelope(frame: Any) -> bool:
    """Whether a message's first frame is an envelope (a msgpack array) rather than a header (a map)."""
    data = frame.buffer if hasattr(frame, "buffer") else frame
    if not len(data):
        return False
    first = data[0]
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)  # fixarray, array 16, array 32


def unpack(frame: Any) -> tuple[str, BatchId]:
    """``(replica_id, batch_id)``; EnvelopeError unless the frame is exactly that."""
    data = _data(frame)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(f"envelope of {len(data)} bytes is larger than {MAX_ENVELOPE_BYTES}")
    try:
        value = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise EnvelopeError(f"envelope is not valid msgpack: {exc}") from None
    if not isinstance(value, list) or len(value) != 2:
        raise EnvelopeError("envelope must be a msgpack array [replica, batch]")
    replica, batch = value
    if not isinstance(replica, str) or not isinstance(batch, (int, str)) or isinstance(batch, bool):
        raise EnvelopeError(f"envelope [{replica!r}, {batch!r}] must hold a replica id string and an int or "
                            "string batch id")
    return replica, batch
