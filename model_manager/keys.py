"""API keys in Redis: who may call the bridges, and how often (docs/ADMIN.md, "API keys").

Key schema, beside the model registry's (``P`` is ``INFEROXY_REDIS_PREFIX``):

=======================  ======  =====================================================
key                      type    holds
=======================  ======  =====================================================
``P:keys``               hash    field ``NAME`` -> the key's record as JSON (no secret)
``P:keys:revision``      string  an integer bumped by every create and revoke; above 0, keys have
                                 existed, and ``INFEROXY_AUTH=auto`` stays required
``P:keys:events``        pubsub  ``{"revision", "action", "name"}`` per create / revoke
=======================  ======  =====================================================

A key is ``ixk_`` and 43 characters of ``secrets.token_urlsafe(32)`` (256 random bits). Only its
SHA-256 digest is stored: with that much entropy a plain hash cannot be brute-forced, and a
bridge checks a key with one hash and one dict lookup. The secret is returned once, by
``create``, and never stored, logged or listed.

Bridges follow ``P:keys`` as they follow the registry: pub/sub makes a revocation arrive at
once, and a periodic revision check heals a lost message.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, Field, ValidationError, field_validator

from model_manager.store import wait_for_event

log = logging.getLogger(__name__)

Scope = Literal["infer", "admin"]
SCOPES: tuple[Scope, ...] = ("infer", "admin")
KEY_PREFIX = "ixk_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeyExists(Exception):
    """``create`` of a name that is taken: revoke it first."""


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class ApiKey(BaseModel):
    """What a key allows. ``models`` None: every model; ``rate`` None: no rate limit."""

    name: str
    digest: str = Field(repr=False)
    scopes: list[Scope] = Field(min_length=1)
    models: list[str] | None = None
    rate: float | None = Field(None, gt=0, description="requests per second, per bridge process")
    burst: int | None = Field(None, ge=1, description="requests allowed at once above the rate")
    created_at: float = 0.0

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError("a key's name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
                             "or digit")
        return name

    @field_validator("scopes")
    @classmethod
    def _no_repeats(cls, scopes: list[Scope]) -> list[Scope]:
        return sorted(set(scopes), key=SCOPES.index)

    @property
    def effective_burst(self) -> int:
        """The bucket's size: the given burst, else one second's worth of requests."""
        if self.burst is not None:
            return self.burst
        return max(1, round(self.rate or 1))

    def allows_model(self, name: str) -> bool:
        return self.models is None or name in self.models

    def public(self) -> dict[str, object]:
        """The record as the admin API and the CLI show it: everything but the digest."""
        return self.model_dump(mode="json", exclude={"digest"})


class KeyStore:
    """Creates, revokes, lists and watches API keys under one prefix."""

    def __init__(self, client: aioredis.Redis, prefix: str = "inferoxy") -> None:
        self.client = client
        self.keys_key = f"{prefix}:keys"
        self.revision_key = f"{prefix}:keys:revision"
        self.events_channel = f"{prefix}:keys:events"

    async def create(
        self,
        name: str,
        scopes: Iterable[str],
        *,
        models: list[str] | None = None,
        rate: float | None = None,
        burst: int | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its secret (shown once). ValidationError for bad fields, KeyExists for a taken name."""
        secret = new_secret()
        key = ApiKey(name=name, digest=digest(secret), scopes=list(scopes),
                     models=models, rate=rate, burst=burst, created_at=time.time())
        if not await self.client.hsetnx(self.keys_key, name, key.model_dump_json()):
            raise KeyExists(f"a key named {name!r} exists already; revoke it first")
        await self._announce("create", name)
        return key, secret

    async def revoke(self, name: str) -> bool:
        """Remove the key; False if there was none of that name."""
        if not await self.client.hdel(self.keys_key, name):
            return False
        await self._announce("revoke", name)
        return True

    async def all(self) -> list[ApiKey]:
        found = []
        for name, text in (await self.client.hgetall(self.keys_key)).items():
            try:
                found.append(ApiKey.model_validate_json(text))
            except ValidationError as exc:
                # A hand-edited bad record must not take the other keys down with it; it allows nothing.
                log.error("ignoring invalid API key record %s in Redis: %s", name, exc.errors()[0]["msg"])
        return sorted(found, key=lambda k: k.name)

    async def find(self, secret: str) -> ApiKey | None:
        """The key whose secret this is (read from Redis now: for the admin API, where freshness beats speed)."""
        wanted = digest(secret)
        match = None
        for key in await self.all():
            if secrets.compare_digest(key.digest, wanted):
                match = key
        return match

    async def revision(self) -> int:
        return int(await self.client.get(self.revision_key) or 0)

    async def _announce(self, action: str, name: str) -> None:
        revision = int(await self.client.incr(self.revision_key))
        await self.client.publish(self.events_channel, json.dumps({"revision": revision, "action": action,
                                                                   "name": name}))

    async def watch(
        self,
        on_change: Callable[[list[ApiKey], int], None],
        *,
        resync_interval_s: float = 2.0,
        retry_max_s: float = 5.0,
    ) -> None:
        """Call ``on_change`` with every key and the keys' revision, now and whenever they change; runs until
        cancelled. A revision above 0 means keys have been created here, even if every one is revoked since.

        While Redis is unreachable the caller keeps the keys it has (a revoked key may then work
        until Redis is back: the registry of models behaves the same way)."""
        delay = 0.2
        seen = -1
        while True:
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.subscribe(self.events_channel)
                    delay = 0.2
                    while True:
                        revision = await self.revision()
                        if revision != seen:
                            # Subscribed before reading, so a change made meanwhile still brings a message.
                            on_change(await self.all(), revision)
                            seen = revision
                        await wait_for_event(pubsub, resync_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection errors of every kind: keep the keys we know
                log.warning("API keys unreachable in Redis (%s); retrying in %.1fs", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, retry_max_s)
