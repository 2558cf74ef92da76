"""Who may send a request: API keys, their scopes and their rate limits, for every bridge.

Each bridge's gateway holds one ``Authorizer``, which follows the keys in Redis
(model_manager/keys.py) and answers ``check(credential, model)`` from memory, before the
request is resolved or sent. REST reads the credential from ``Authorization: Bearer KEY``,
gRPC from the ``authorization`` metadata (the same text), ZeroMQ from the request header's
``api_key``; ``credential_of_header`` turns the first two into the key.

``INFEROXY_AUTH``: ``off`` checks nothing; ``required`` refuses every request without a valid
key; ``auto`` (the default) is ``off`` while no key was ever created and ``required`` from the
first one on, even once every key is revoked: revoking a leaked last key must not open the proxy
to everyone (``P:keys:revision`` above 0 records that keys existed).
Until the keys have been read once, a bridge in ``required`` or ``auto`` mode refuses with
``not_ready`` rather than guess (the gateway is not ready before that either).

Refusals: no key or an unknown one -> ``unauthenticated``; a key without the ``infer`` scope,
or limited to other models -> ``forbidden``; a key over its rate -> ``rate_limited`` with the
seconds until it may try again. The rate limit is a token bucket per key *in each bridge
process* (``rate`` tokens a second, ``burst`` at most): a proxy with three bridges lets a key
send up to three times its rate in all, one rate per bridge.

``INFEROXY_ADMIN_KEY`` (the bootstrap admin key) authenticates too, with the ``admin`` scope
only: it is refused ``forbidden`` for inference. Secrets never reach a log: messages name keys
by their name, never by what the client sent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from bridges.errors import RequestError
from inferoxy.protocol import ErrorCode
from inferoxy.settings import Settings
from inferoxy.tasks import cancel_and_wait
from model_manager.keys import ApiKey, KeyStore
from model_manager.keys import digest as _digest

log = logging.getLogger(__name__)

Clock = Callable[[], float]
BOOTSTRAP = "INFEROXY_ADMIN_KEY"
# Longer than any key this proxy makes (47 characters) or an operator would pick; a longer credential
# is refused before it is hashed, so a megabyte "key" costs the bridge nothing.
MAX_CREDENTIAL_CHARS = 1024
_MISSING = ("this server needs an API key: send Authorization: Bearer KEY (REST), authorization metadata (gRPC) "
            "or api_key (ZeroMQ)")


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; each request takes one. Time comes from ``clock``."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one will be there."""
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate


def credential_of_header(value: str | None) -> str | None:
    """The key in an ``Authorization: Bearer KEY`` header (or gRPC metadata); None if there is none."""
    if not value:
        return None
    scheme, _, key = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


class Authorizer:
    """The keys one bridge process knows, and its rate limit buckets."""

    def __init__(self, settings: Settings, *, clock: Clock = time.monotonic) -> None:
        self.mode = settings.auth
        self.metadata_closed = settings.auth_metadata
        self._admin_digest = _digest(settings.admin_key) if settings.admin_key else None
        self._resync_s = settings.registry_resync_s
        self._clock = clock
        self._by_digest: dict[str, ApiKey] = {}
        self._keys_existed = False
        self._buckets: dict[str, TokenBucket] = {}
        self._task: asyncio.Task[None] | None = None
        self.loaded = asyncio.Event()
        if self.mode == "off":
            self.loaded.set()
        self.on_loaded: Callable[[], None] = lambda: None

    @property
    def required(self) -> bool:
        if self.mode == "auto":
            return self._keys_existed or not self.loaded.is_set()
        return self.mode == "required"

    @property
    def key_names(self) -> set[str]:
        """The names of the keys this bridge knows now (for health checks and tests)."""
        return {key.name for key in self._by_digest.values()}

    # -- following Redis -----------------------------------------------------------------------

    def start(self, client: aioredis.Redis, prefix: str) -> None:
        if self.mode == "off" or self._task is not None:
            return
        store = KeyStore(client, prefix)
        self._task = asyncio.create_task(store.watch(self.apply, resync_interval_s=self._resync_s), name="api-keys")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    def apply(self, keys: list[ApiKey], revision: int = 0) -> None:
        """Take the keys Redis holds now (at the keys' ``revision``); buckets of keys whose limit did not
        change keep their tokens."""
        self._by_digest = {key.digest: key for key in keys}
        self._keys_existed = bool(keys) or revision > 0
        limits = {key.name: (key.rate, key.effective_burst) for key in keys if key.rate is not None}
        self._buckets = {name: bucket for name, bucket in self._buckets.items()
                         if limits.get(name) == (bucket.rate, bucket.burst)}
        if not self.loaded.is_set():
            self.loaded.set()
            self.on_loaded()

    # -- the checks ----------------------------------------------------------------------------

    def check(self, credential: object, model: str) -> None:
        """Let an inference request for ``model`` through, or raise RequestError saying why not."""
        if not self.required:
            return
        key = self._authenticate(credential)
        if "infer" not in key.scopes:
            raise RequestError(ErrorCode.FORBIDDEN, f"API key {key.name!r} lacks the 'infer' scope")
        if not key.allows_model(model):
            raise RequestError(ErrorCode.FORBIDDEN, f"API key {key.name!r} may not use model {model!r}")
        if key.rate is not None:
            self._meter(key)

    def check_metadata(self, credential: object, model: str) -> None:
        """Model metadata: open unless ``INFEROXY_AUTH_METADATA`` closes it; then as inference, without the rate."""
        if not self.metadata_closed or not self.required:
            return
        key = self._authenticate(credential)
        if "infer" not in key.scopes or not key.allows_model(model):
            raise RequestError(ErrorCode.FORBIDDEN, f"API key {key.name!r} may not read model {model!r}")

    def check_observer(self, credential: object) -> None:
        """What spans every model (``/metrics``, statistics of all models, the dashboard): open unless
        ``INFEROXY_AUTH_METADATA`` closes metadata; then a key with the admin scope, or one that may call
        every model, since these show every model's name and traffic."""
        if not self.metadata_closed or not self.required:
            return
        key = self._authenticate(credential)
        if "admin" not in key.scopes and not ("infer" in key.scopes and key.models is None):
            raise RequestError(ErrorCode.FORBIDDEN, f"API key {key.name!r} may not read every model's metrics: "
                               "it needs the admin scope, or infer on every model")

    def identify(self, credential: object) -> ApiKey | None:
        """The key a caller presents (its name owns the jobs it submits), or None while no key is required:
        then callers cannot be told apart. Raises as ``check`` does for a missing or unknown key."""
        if not self.required:
            return None
        return self._authenticate(credential)

    def _authenticate(self, credential: object) -> ApiKey:
        if not self.loaded.is_set():
            raise RequestError(ErrorCode.NOT_READY, "the API keys have not been read yet; retry shortly")
        if not isinstance(credential, str) or not credential:
            raise RequestError(ErrorCode.UNAUTHENTICATED, _MISSING)
        if len(credential) > MAX_CREDENTIAL_CHARS:
            raise RequestError(ErrorCode.UNAUTHENTICATED, "unknown or revoked API key")
        wanted = _digest(credential)
        key = self._by_digest.get(wanted)
        # The dict finds the candidate; the comparison that decides is constant-time.
        if key is not None and secrets.compare_digest(key.digest, wanted):
            return key
        if self._admin_digest is not None and secrets.compare_digest(self._admin_digest, wanted):
            return ApiKey(name=BOOTSTRAP, digest=wanted, scopes=["admin"])
        raise RequestError(ErrorCode.UNAUTHENTICATED, "unknown or revoked API key")

    def _meter(self, key: ApiKey) -> None:
        assert key.rate is not None
        now = self._clock()
        bucket = self._buckets.get(key.name)
        if bucket is None:
            bucket = self._buckets[key.name] = TokenBucket(key.rate, key.effective_burst, now)
        wait_s = bucket.take(now)
        if wait_s:
            raise RequestError(
                ErrorCode.RATE_LIMITED,
                f"API key {key.name!r} is over its rate of {key.rate:g} requests/s; retry in {wait_s:.3f}s",
                retry_after_s=wait_s,
            )


def retry_after_header(seconds: float | None) -> str:
    """HTTP's Retry-After: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds or 1)))

