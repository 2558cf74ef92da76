"""The error a bridge raises for a request it cannot answer with a result."""

from __future__ import annotations

from inferoxy.protocol import ErrorCode, InferoxyError


class RequestError(InferoxyError):
    """An ``InferoxyError`` that may say when to retry (``rate_limited``, ``overloaded``)."""

    def __init__(self, code: ErrorCode | str, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(code, message)
        # When a client may try again (``rate_limited``): REST's Retry-After, gRPC's retry-after metadata.
        self.retry_after_s = retry_after_s

    @classmethod
    def of(cls, error: InferoxyError) -> RequestError:
        """Any InferoxyError (a WireError from a validator) as a RequestError with the same code and text."""
        if isinstance(error, RequestError):
            return error
        return cls(error.code, error.message)

    def __repr__(self) -> str:
        return f"RequestError({self.code!r}, {self.message!r})"
