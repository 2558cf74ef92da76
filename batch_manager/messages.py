"""The batch manager's names for what its messages carry; the messages themselves are ``inferoxy.messages``.

Every header the batch manager reads (from bridges and from the task manager) is decoded by that
module's codecs, which validate while they decode and raise ``WireError`` with a text safe to send
back; every header it sends is built there as a struct.
"""

from __future__ import annotations

from typing import Any

# A request as the bridge knows it: its DEALER identity and its own id for the request.
Origin = tuple[bytes, int]
# Replica ids are echoed back exactly as the task manager spelled them.
ReplicaId = str
TensorMeta = dict[str, Any]
