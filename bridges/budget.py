"""How much one client may have buffered in a bridge: a bound on requests and on bytes.

A client that sends and never reads makes a bridge hold its requests while they are served and
then its replies until they are read. Each bridge keeps a ``Usage`` per client (a ZeroMQ peer
identity, a gRPC stream, a gRPC connection) and asks ``ClientLimits.admit`` before taking a new
request; past either bound the request is refused ``overloaded`` at once, so the excess costs
the client a small error instead of the bridge its memory. A client with nothing buffered is
always admitted, so one request of any size the message limit allows gets through.
"""

from __future__ import annotations

from bridges.errors import RequestError
from inferoxy.protocol import ErrorCode
from inferoxy.settings import Settings


class Usage:
    """What one client has buffered now: requests in flight or replies not yet read, and their bytes."""

    __slots__ = ("bytes", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0

    @property
    def idle(self) -> bool:
        return self.requests == 0 and self.bytes == 0

    def add(self, requests: int, nbytes: int) -> None:
        self.requests += requests
        self.bytes += nbytes


class ClientLimits:
    """The bounds of ``settings.client_max_outstanding`` and ``settings.client_max_buffered_bytes``."""

    __slots__ = ("max_bytes", "max_requests", "who")

    def __init__(self, settings: Settings, who: str) -> None:
        self.max_requests = settings.client_max_outstanding
        self.max_bytes = settings.client_max_buffered_bytes
        self.who = who

    def fits(self, usage: Usage, nbytes: int) -> bool:
        if usage.idle:
            return True
        return usage.requests < self.max_requests and usage.bytes + nbytes <= self.max_bytes

    def admit(self, usage: Usage, nbytes: int) -> None:
        """Count a request of ``nbytes`` against ``usage``, or refuse it ``overloaded``."""
        if not self.fits(usage, nbytes):
            raise self.refusal(usage)
        usage.add(1, nbytes)

    def refusal(self, usage: Usage) -> RequestError:
        return RequestError(
            ErrorCode.OVERLOADED,
            f"this {self.who} already has {usage.requests} requests ({usage.bytes} bytes) in flight or unread; "
            f"the limit is {self.max_requests} requests (INFEROXY_CLIENT_MAX_OUTSTANDING) and {self.max_bytes} "
            "bytes (INFEROXY_CLIENT_MAX_BUFFERED_BYTES): read the replies, then retry",
        )
