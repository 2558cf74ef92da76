"""The model manager component: makes sure a registry exists and seeds it from models.yaml.

With no ``INFEROXY_REDIS_URL`` it serves an embedded Redis-protocol server (fakeredis) on
loopback, so every other component talks to Redis the same way whether or not a real
one is deployed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from urllib.parse import quote

import zmq.asyncio
from fakeredis import TcpFakeServer
from fakeredis._clients import _tcp_server as fake_tcp_server
from fakeredis._clients._tcp_server import TCPFakeRequestHandler
from fakeredis._helpers import SimpleError
from redis.exceptions import RedisError

from inferoxy.credentials import mask_url, new_secret
from inferoxy.settings import Settings
from model_manager.models_file import load_models_file, models_file_to_seed
from model_manager.store import Registry, SpecStore

log = logging.getLogger(__name__)


NOAUTH = "NOAUTH Authentication required."
# fakeredis's thread for each connection wakes every 10 ms to look for replies pushed without a request
# (pub/sub messages): with the dozen connections of `inferoxy serve` that kept 13% of a core busy while the
# proxy was idle (bench/bench_vs_triton.py's idle line). Commands are still answered as soon as they arrive;
# only a registry change event may reach its subscribers up to this much later.
PUSH_POLL_INTERVAL_S = 0.1


class _PasswordFirstHandler(TCPFakeRequestHandler):
    """A connection that answers nothing but AUTH (or HELLO ... AUTH) until it gave the password.

    fakeredis keeps ``requirepass`` for AUTH to check but serves an unauthenticated connection all
    the same, so this wraps the connection's command dispatch: the one place every command passes.
    """

    server: _PasswordServer

    def setup(self) -> None:
        super().setup()
        sock = self.current_client.get_socket()
        dispatch = sock._process_command
        password = self.server.password
        authenticated = False

        def process(fields: list[bytes]) -> None:
            nonlocal authenticated
            if not authenticated and fields:
                given = _password_in(fields)
                if given is None or not hmac.compare_digest(given, password):
                    if fields[0].lower() == b"auth":
                        return dispatch(fields)  # fakeredis answers a wrong password itself (WRONGPASS)
                    sock.put_response(sock._decode_result(SimpleError(NOAUTH)))
                    return None
                authenticated = True
                if fields[0].lower() == b"hello":  # fakeredis's HELLO checks AUTH against its ACL: already done
                    fields = fields[:2]
            return dispatch(fields)

        sock._process_command = process  # type: ignore[method-assign]


def _password_in(fields: list[bytes]) -> bytes | None:
    """The password an AUTH or HELLO command gives for the default user, else None."""
    command = fields[0].lower()
    if command == b"auth" and len(fields) in (2, 3) and (len(fields) == 2 or fields[1] == b"default"):
        return fields[-1]
    if command == b"hello":
        upper = [field.upper() for field in fields]
        if b"AUTH" in upper:
            at = upper.index(b"AUTH")
            if len(fields) == at + 3 and at == 2 and fields[at + 1] == b"default":
                return fields[at + 2]
    return None


class _PasswordServer(TcpFakeServer):
    def __init__(self, address: tuple[str, int], password: str) -> None:
        super().__init__(address, server_type="redis")
        self.RequestHandlerClass = _PasswordFirstHandler
        if hasattr(fake_tcp_server, "_POLL_INTERVAL"):  # a private name: a fakeredis without it keeps its own
            fake_tcp_server._POLL_INTERVAL = max(fake_tcp_server._POLL_INTERVAL, PUSH_POLL_INTERVAL_S)
        self.password = password.encode()
        self.fake_server.config[b"requirepass"] = self.password  # what fakeredis's AUTH compares with


class EmbeddedRedis:
    """fakeredis's TCP server on a loopback port, behind a password, served from a daemon thread."""

    def __init__(self, port: int, password: str) -> None:
        try:
            self._server = _PasswordServer(("127.0.0.1", port), password)
        except OSError as exc:
            raise RuntimeError(
                f"cannot start the embedded Redis on 127.0.0.1:{port} ({exc}); set INFEROXY_REDIS_URL to use "
                "the Redis already there, or INFEROXY_EMBEDDED_REDIS_PORT to pick another port"
            ) from None
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self.url = f"redis://:{quote(password, safe='')}@127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="embedded-redis", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class ModelManager:
    """Starts the embedded Redis if none is configured, seeds the registry, and guards it.

    Guarding: it follows the registry like every other component, remembering the last
    snapshot. When Redis comes back empty after an outage (a restart without persistence),
    it writes that snapshot back and seeds models.yaml again, so models registered through
    the admin API survive a Redis restart and components never see the registry go empty.
    """

    name = "model_manager"

    def __init__(self, settings: Settings, ctx: zmq.asyncio.Context) -> None:
        self.settings = settings
        self.embedded: EmbeddedRedis | None = None
        self.redis_url = settings.redis_url
        self.last_registry: Registry | None = None

    async def run(self, ready: asyncio.Event) -> None:
        if not self.redis_url:
            # `serve` hands every component the same password; run alone, a component makes its own.
            password = self.settings.embedded_redis_password
            self.embedded = EmbeddedRedis(self.settings.embedded_redis_port,
                                          password.get_secret_value() if password else new_secret())
            self.embedded.start()
            self.redis_url = self.embedded.url
            log.info("embedded Redis-protocol server listening on %s", mask_url(self.redis_url))
        store = SpecStore.from_url(self.redis_url, self.settings.redis_prefix,
                                   resync_interval_s=self.settings.registry_resync_s)
        try:
            await self._seed_until_done(store)
            ready.set()
            await store.watch(self._remember, on_reset=lambda seen: self._restore(store, seen))
        finally:
            await store.close()
            if self.embedded is not None:
                self.embedded.stop()

    def _remember(self, registry: Registry) -> None:
        self.last_registry = registry

    async def _restore(self, store: SpecStore, seen: int) -> None:
        """Redis lost the registry: write back what we last saw, then what models.yaml adds."""
        try:
            if self.last_registry is not None and len(self.last_registry):
                revision = await store.restore(self.last_registry, min_revision=seen + 1)
                log.warning("Redis came back without the registry; restored %d model version(s) at revision %d",
                            len(self.last_registry), revision)
            await self.seed(store)
        except Exception as exc:  # Redis gone again: the watcher retries and calls us again
            log.warning("could not restore the registry yet: %s", exc)

    async def _seed_until_done(self, store: SpecStore) -> None:
        """Seed, retrying with backoff while Redis is unreachable (it may start after us)."""
        delay = 0.2
        while True:
            try:
                await self.seed(store)
                return
            except (RedisError, ConnectionError) as exc:  # a bad models.yaml is not retried: it fails the start
                store.watch_state.unreachable(str(exc) or type(exc).__name__)  # health and inferoxy_redis_up say so
                log.warning("model registry unreachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def seed(self, store: SpecStore) -> None:
        """models.yaml only adds what Redis lacks, unless INFEROXY_MODELS_OVERWRITE says it wins."""
        path = await asyncio.to_thread(models_file_to_seed, self.settings)  # a named file that is missing raises
        if path is None:
            return
        specs = await asyncio.to_thread(load_models_file, path)
        upgraded = await store.upgrade_unloaded()
        if upgraded:
            log.info("kept unloaded now that min_replicas 0 scales to zero (max_replicas 0): %s", ", ".join(upgraded))
        written = await store.seed(specs, overwrite=self.settings.models_overwrite)
        log.info("seeded %d model(s) from %s: %s", len(written), path, ", ".join(written) or "none new")
