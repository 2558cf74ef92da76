"""The one error type every bridge raises for a request it cannot answer with a result."""

from __future__ import annotations

from inferoxy.protocol import ErrorCode


class RequestError(Exception):
    """A request that ends in an error reply. ``message`` is written for the client and safe to send."""

    def __init__(self, code: ErrorCode | str, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code.value if isinstance(code, ErrorCode) else code
        self.message = message
        # When a client may try again (``rate_limited``): REST's Retry-After, gRPC's retry-after metadata.
        self.retry_after_s = retry_after_s

    @property
    def http_status(self) -> int:
        try:
            return ErrorCode(self.code).http_status
        except ValueError:  # a code this bridge does not know: still a server-side failure
            return 500

    def __repr__(self) -> str:
        return f"RequestError({self.code!r}, {self.message!r})"
