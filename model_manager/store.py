"""Model specs in Redis.

(About 480 lines: the registry's one reader and writer in Redis: specs, revisions, status records and
the watch that follows them, which share one key layout.)

Key schema (``P`` is ``INFEROXY_REDIS_PREFIX``, ``inferoxy`` by default):

=====================  ======  ==========================================================
key                    type    holds
=====================  ======  ==========================================================
``P:models``           hash    field ``name/version`` -> the spec as JSON
``P:defaults``         hash    field ``name`` -> the version served when a request names none
``P:revision``         string  an integer bumped by every write, so readers can tell they are stale
``P:events``           pubsub  a JSON message ``{"revision", "action", "name", "version"}`` per write
``P:status:NAME/VER``  string  ``ModelStatus`` JSON, written by the task manager with a TTL it refreshes
``P:unloaded``         hash    field ``name/version`` -> JSON ``{"min_replicas", "max_replicas"}`` it had before
                              ``unload`` (a bare integer, its ``min_replicas``, from before scale to zero)
=====================  ======  ==========================================================

A status key expires unless its task manager rewrites it (every heartbeat interval, TTL
``heartbeat_interval_s x heartbeat_liveness``): a proxy whose task manager is gone has no status,
so it never reads as ready. A TTL that Redis enforces, rather than a timestamp readers compare, needs
no agreement between the clocks of the writer and the readers, and a status a reader finds is
current by construction.

Every write goes through one MULTI transaction, so a reader never sees a spec without
its revision bump.

A Redis that restarts without persistence comes back empty, its revision back at 0. Watchers
notice the revision going backwards and keep serving their last snapshot for a grace period
instead of dropping every model; the model manager writes its last snapshot back
(``restore``), with a revision past the old one, and the watchers pick that up as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from inferoxy import metrics
from model_manager.spec import ModelSpec, ModelStatus, version_order

log = logging.getLogger(__name__)

DEFAULT_RESYNC_INTERVAL_S = 2.0
# How long a watcher keeps its last snapshot when Redis comes back with an older revision (it
# restarted empty), waiting for the model manager to restore the registry.
DEFAULT_RESET_GRACE_S = 15.0


def redis_client(url: str) -> aioredis.Redis:
    """A client of the registry's Redis, for every store kept there (specs, statuses, jobs)."""
    # Timeouts keep a vanished Redis from hanging an admin call or a watcher: they fail and retry.
    return aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2.0, socket_timeout=10.0)


class SpecStore:
    """Reads and writes model specs under one key prefix."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = "inferoxy",
        *,
        resync_interval_s: float = DEFAULT_RESYNC_INTERVAL_S,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.resync_interval_s = resync_interval_s
        self.models_key = f"{prefix}:models"
        self.defaults_key = f"{prefix}:defaults"
        self.revision_key = f"{prefix}:revision"
        self.events_channel = f"{prefix}:events"
        self.status_key_prefix = f"{prefix}:status:"
        self.unloaded_key = f"{prefix}:unloaded"
        # What the last ``watch`` loop saw; read by health checks in the same process.
        self.watch_state = WatchState()

    @classmethod
    def from_url(
        cls, url: str, prefix: str = "inferoxy", *, resync_interval_s: float = DEFAULT_RESYNC_INTERVAL_S
    ) -> SpecStore:
        return cls(redis_client(url), prefix, resync_interval_s=resync_interval_s)

    async def close(self) -> None:
        await self.client.aclose()

    async def put(self, spec: ModelSpec, *, make_default: bool = False) -> int:
        """Store ``spec``; it becomes its model's default version if asked or if the model had none."""
        has_default = await self.client.hexists(self.defaults_key, spec.name)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.models_key, spec.key, spec.model_dump_json())
            if make_default or not has_default:
                pipe.hset(self.defaults_key, spec.name, spec.version)
            pipe.incr(self.revision_key)
            results = await pipe.execute()
        revision = int(results[-1])
        await self._publish(revision, "put", spec.name, spec.version)
        return revision

    async def delete(self, name: str, version: str | None = None) -> bool:
        """Remove one version, or every version of ``name``. False if there was nothing to remove."""
        versions = await self.versions(name)
        doomed = versions if version is None else versions & {version}
        if not doomed:
            return False
        remaining = versions - doomed
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(self.models_key, *(f"{name}/{v}" for v in doomed))
            if remaining:
                pipe.hset(self.defaults_key, name, max(remaining, key=version_order))
            else:
                pipe.hdel(self.defaults_key, name)
            pipe.incr(self.revision_key)
            results = await pipe.execute()
        await self._publish(int(results[-1]), "delete", name, version)
        return True

    async def set_default(self, name: str, version: str) -> int:
        """Make ``version`` the one served when a request names none. KeyError if it is not registered."""
        if version not in await self.versions(name):
            raise KeyError(f"{name}/{version}")
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.defaults_key, name, version)
            pipe.incr(self.revision_key)
            results = await pipe.execute()
        revision = int(results[-1])
        await self._publish(revision, "default", name, version)
        return revision

    async def unload(self, spec: ModelSpec) -> int:
        """Stop serving ``spec``'s version: no replica may run (min and max_replicas 0), remembering its bounds.

        Not the same as scale to zero (``min_replicas`` 0 alone): a request for an unloaded model is refused at
        once, where one for a model scaled to zero starts a replica and waits for it."""
        if spec.max_replicas == 0 and await self.client.hexists(self.unloaded_key, spec.key):
            return await self.revision()
        unloaded = spec.model_copy(update={"min_replicas": 0, "max_replicas": 0})
        bounds = json.dumps({"min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas})
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.models_key, spec.key, unloaded.model_dump_json())
            pipe.hset(self.unloaded_key, spec.key, bounds)
            pipe.incr(self.revision_key)
            results = await pipe.execute()
        revision = int(results[-1])
        await self._publish(revision, "unload", spec.name, spec.version)
        return revision

    async def load(self, spec: ModelSpec) -> int:
        """Serve ``spec``'s version again with the bounds it had before ``unload``.

        With nothing saved, a version no replica may run gets one (``max_replicas`` 1); a record from before scale
        to zero (its ``min_replicas`` alone, when 0 meant unloaded) comes back with at least one replica."""
        min_replicas, max_replicas = _loaded_bounds(await self.client.hget(self.unloaded_key, spec.key), spec)
        loaded = spec.model_copy(update={"min_replicas": min_replicas, "max_replicas": max_replicas})
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.models_key, spec.key, loaded.model_dump_json())
            pipe.hdel(self.unloaded_key, spec.key)
            pipe.incr(self.revision_key)
            results = await pipe.execute()
        revision = int(results[-1])
        await self._publish(revision, "load", spec.name, spec.version)
        return revision

    async def upgrade_unloaded(self) -> list[str]:
        """Make versions unloaded before scale to zero existed unloaded still; returns their keys.

        Their record is a bare ``min_replicas`` and their spec kept ``max_replicas``: with ``min_replicas`` 0 now
        meaning "start a replica on demand", they would serve again. Their ``max_replicas`` becomes 0 and the
        record keeps both bounds, so ``load`` restores them as before."""
        upgraded = []
        for key, saved in (await self.client.hgetall(self.unloaded_key)).items():
            raw = await self.client.hget(self.models_key, key)
            if raw is None or not str(saved).strip().isdigit():
                continue
            try:
                spec = ModelSpec.model_validate_json(raw)
            except ValidationError:
                continue  # the watchers skip it too, with a warning
            if spec.max_replicas == 0:
                continue
            wanted = max(1, int(saved))
            bounds = json.dumps({"min_replicas": wanted, "max_replicas": max(wanted, spec.max_replicas)})
            unloaded = spec.model_copy(update={"min_replicas": 0, "max_replicas": 0})
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(self.models_key, key, unloaded.model_dump_json())
                pipe.hset(self.unloaded_key, key, bounds)
                pipe.incr(self.revision_key)
                results = await pipe.execute()
            await self._publish(int(results[-1]), "unload", spec.name, spec.version)
            upgraded.append(str(key))
        return upgraded

    async def unloaded(self) -> set[str]:
        """The ``name/version`` keys that were unloaded and not loaded since."""
        return {str(key) for key in await self.client.hkeys(self.unloaded_key)}

    async def restore(self, registry: Registry, *, min_revision: int) -> int:
        """Write back a snapshot after Redis lost its data, leaving alone whatever was written since.

        The revision ends at ``min_revision`` or above, so watchers that still hold the old
        snapshot see it move forward and re-read.
        """
        current = await self.revision()
        async with self.client.pipeline(transaction=True) as pipe:
            for key, spec in registry.specs.items():
                pipe.hsetnx(self.models_key, key, spec.model_dump_json())
            for name, version in registry.defaults.items():
                pipe.hsetnx(self.defaults_key, name, version)
            # INCRBY, not SET: a write that lands meanwhile still moves the revision forward.
            pipe.incrby(self.revision_key, max(1, min_revision - current))
            results = await pipe.execute()
        revision = int(results[-1])
        await self._publish(revision, "restore", "*", None)
        return revision

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def versions(self, name: str) -> set[str]:
        keys = [str(key) for key in await self.client.hkeys(self.models_key)]  # decode_responses: already str
        return {version for model, version in map(_split_key, keys) if model == name}

    async def revision(self) -> int:
        return int(await self.client.get(self.revision_key) or 0)

    async def snapshot(self) -> Registry:
        """Every spec and default version, read in one round trip."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.models_key)
            pipe.hgetall(self.defaults_key)
            pipe.get(self.revision_key)
            raw_specs, defaults, revision = await pipe.execute()
        specs: dict[str, ModelSpec] = {}
        for key, text in raw_specs.items():
            try:
                specs[key] = ModelSpec.model_validate_json(text)
            except ValidationError as exc:
                # A hand-edited bad spec must not take the other models down with it.
                log.error("ignoring invalid spec %s in Redis: %s", key, exc)
        return Registry(specs, defaults, int(revision or 0))

    async def seed(self, specs: Iterable[ModelSpec], *, overwrite: bool = False) -> list[str]:
        """Add specs Redis lacks (or replace them, with ``overwrite``). Returns the keys written."""
        written = []
        existing = set(await self.client.hkeys(self.models_key))
        for spec in specs:
            if overwrite or spec.key not in existing:
                await self.put(spec)
                written.append(spec.key)
        return written

    def status_key(self, name: str, version: str) -> str:
        return f"{self.status_key_prefix}{name}/{version}"

    async def put_status(self, status: ModelStatus, *, ttl_s: float | None = None) -> None:
        """Record a model's serving status; with ``ttl_s`` it vanishes unless written again in time."""
        ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        await self.client.set(self.status_key(status.name, status.version), status.model_dump_json(), px=ttl_ms)

    async def put_statuses(self, statuses: Iterable[ModelStatus], *, ttl_s: float) -> None:
        """Refresh several statuses in one round trip."""
        ttl_ms = max(1, int(ttl_s * 1000))
        async with self.client.pipeline(transaction=False) as pipe:
            for status in statuses:
                pipe.set(self.status_key(status.name, status.version), status.model_dump_json(), px=ttl_ms)
            await pipe.execute()

    async def delete_status(self, name: str, version: str) -> None:
        await self.client.delete(self.status_key(name, version))

    async def statuses(self) -> dict[str, ModelStatus]:
        """Every model's serving status that has not expired, by ``name/version``."""
        pattern = _glob_escape(self.status_key_prefix) + "*"
        keys = [str(key) async for key in self.client.scan_iter(match=pattern, count=500)]
        found: dict[str, ModelStatus] = {}
        texts = await self.client.mget(keys) if keys else []
        for key, text in zip(keys, texts, strict=True):
            if text is None:  # expired between the scan and the read
                continue
            try:
                found[key.removeprefix(self.status_key_prefix)] = ModelStatus.model_validate_json(text)
            except ValidationError:
                log.warning("ignoring unreadable status %s", key)
        return found

    async def status(self, name: str, version: str) -> ModelStatus | None:
        text = await self.client.get(self.status_key(name, version))
        return None if text is None else ModelStatus.model_validate_json(text)

    async def _publish(self, revision: int, action: str, name: str, version: str | None) -> None:
        message = {"revision": revision, "action": action, "name": name, "version": version}
        await self.client.publish(self.events_channel, json.dumps(message))

    async def watch(
        self,
        on_change: Callable[[Registry], Awaitable[None] | None],
        *,
        resync_interval_s: float | None = None,
        retry_max_s: float = 5.0,
        reset_grace_s: float = DEFAULT_RESET_GRACE_S,
        on_reset: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        """Call ``on_change`` with a fresh snapshot whenever the registry changes; runs until cancelled.

        Pub/sub makes changes arrive at once; the periodic revision check (every
        ``resync_interval_s``, the store's own by default) heals a missed message. While Redis
        is unreachable the caller keeps its last snapshot and this retries with backoff. When
        Redis comes back with an older revision (it restarted empty), ``on_reset`` is called
        with the revision last seen, and the old snapshot stays in force until the revision
        passes it again (a restore) or ``reset_grace_s`` passes.
        """
        interval = self.resync_interval_s if resync_interval_s is None else resync_interval_s
        state = self.watch_state
        seen = -1
        reset_since: float | None = None
        delay = 0.2
        while True:
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.subscribe(self.events_channel)
                    delay = 0.2
                    while True:
                        revision = await self.revision()
                        state.reachable(revision)
                        wait_s = interval
                        if seen > 0 and revision < seen:
                            if reset_since is None:
                                reset_since = time.monotonic()
                                log.warning("the registry's revision went back from %d to %d (Redis lost its data?); "
                                            "keeping the last snapshot while it is restored", seen, revision)
                                if on_reset is not None:
                                    await on_reset(seen)
                                continue
                            if time.monotonic() - reset_since < reset_grace_s:
                                wait_s = min(interval, 0.5)
                                await wait_for_event(pubsub, wait_s)
                                continue
                            log.warning("no restore within %.0fs; taking the registry as Redis holds it", reset_grace_s)
                        reset_since = None
                        if revision != seen:
                            registry = await self.snapshot()
                            seen = registry.revision
                            state.applied(seen)
                            result = on_change(registry)
                            if asyncio.iscoroutine(result):
                                await result
                        await wait_for_event(pubsub, wait_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection errors of every kind: keep serving what we know
                state.unreachable(str(exc) or type(exc).__name__)
                log.warning("model registry unreachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, retry_max_s)


async def wait_for_event(pubsub: Any, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for a message on ``pubsub`` (its content does not matter: the caller re-reads).

    redis-py's pub/sub read can swallow the cancel of the task awaiting it: a cancelled watcher was seen
    polling on, about once in 30 starts under load, which hung whatever awaited its end (a test for 180 s; a
    component's shutdown the same way). So after each read the task's own pending cancel is honoured here.
    """
    await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout_s)
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Task.cancelling() is Python 3.11+
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


class WatchState:
    """Whether a watcher reaches Redis, and which revision it serves: what health checks and the
    ``inferoxy_redis_up`` / ``inferoxy_registry_revision`` gauges report (this process's view)."""

    def __init__(self) -> None:
        self.connected = False
        self.error: str | None = None
        self.revision_seen = -1
        self.revision_applied = -1
        self.since = time.monotonic()

    def reachable(self, revision: int) -> None:
        if not self.connected:
            self.since = time.monotonic()
        self.connected, self.error, self.revision_seen = True, None, revision
        metrics.REDIS_UP.set(1)

    def applied(self, revision: int) -> None:
        self.revision_applied = revision
        metrics.REGISTRY_REVISION.set(revision)

    def unreachable(self, error: str) -> None:
        if self.connected or self.error is None:
            self.since = time.monotonic()
        self.connected, self.error = False, error
        metrics.REDIS_UP.set(0)


class Registry:
    """A consistent view of the registry at one revision."""

    def __init__(self, specs: dict[str, ModelSpec], defaults: dict[str, str], revision: int) -> None:
        self.specs = specs
        self.defaults = defaults
        self.revision = revision

    def get(self, name: str, version: str | None = None) -> ModelSpec | None:
        """The spec a request for ``name`` (and optionally ``version``) is served by."""
        if version is None:
            version = self.defaults.get(name)
            if version is None:
                return None
        return self.specs.get(f"{name}/{version}")

    def names(self) -> list[str]:
        return sorted({spec.name for spec in self.specs.values()})

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self.specs.values())

    def __len__(self) -> int:
        return len(self.specs)


def _glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _split_key(key: str) -> tuple[str, str]:
    name, _, version = key.partition("/")
    return name, version


def open_store(redis_url: str | None, prefix: str, *, resync_interval_s: float | None = None) -> SpecStore:
    """The store a component reads specs from. Only ``inferoxy serve`` and the model manager may start
    an embedded Redis, so every other component needs to be told where Redis is.

    ``resync_interval_s`` left out: ``INFEROXY_REGISTRY_RESYNC_S`` (callers that hold their
    settings may pass ``settings.registry_resync_s``)."""
    if not redis_url:
        raise RuntimeError(
            "INFEROXY_REDIS_URL is not set: run this component under `inferoxy serve` (which starts an "
            "embedded Redis) or point it at a Redis server"
        )
    if resync_interval_s is None:
        resync_interval_s = _resync_interval_from_settings()
    return SpecStore.from_url(redis_url, prefix, resync_interval_s=resync_interval_s)


def _resync_interval_from_settings() -> float:
    # Imported here: the settings module must stay importable without the registry and vice versa.
    from inferoxy.settings import load_settings

    try:
        return float(load_settings().registry_resync_s)
    except Exception:  # unreadable settings are reported by the component that loads them
        return DEFAULT_RESYNC_INTERVAL_S


def _loaded_bounds(saved: str | bytes | None, spec: ModelSpec) -> tuple[int, int]:
    """``min_replicas`` and ``max_replicas`` for ``load``, from what ``unload`` saved (``P:unloaded``)."""
    if saved is None:
        return spec.min_replicas, max(spec.max_replicas, spec.min_replicas, 1)
    with contextlib.suppress(ValueError, TypeError, KeyError):
        bounds = json.loads(saved)
        if isinstance(bounds, int):  # from before scale to zero: min_replicas alone, 0 meant unloaded
            wanted = max(1, bounds)
            return wanted, max(wanted, spec.max_replicas)
        low, high = int(bounds["min_replicas"]), int(bounds["max_replicas"])
        if 0 <= low <= high:
            return low, max(high, 1)  # loaded: a replica may run (min_replicas 0 then scales from zero)
    log.warning("P:unloaded holds %r for %s, not what unload writes; loading it with one replica", saved, spec.key)
    return max(1, spec.min_replicas), max(1, spec.max_replicas, spec.min_replicas)
