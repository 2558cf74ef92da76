"""The model manager component: makes sure a registry exists and seeds it from models.yaml.

With no ``INFEROXY_REDIS_URL`` it serves an embedded Redis-protocol server (fakeredis) on
loopback, so every other component talks to Redis the same way whether or not a real
one is deployed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import zmq.asyncio
from fakeredis import TcpFakeServer

from inferoxy.settings import Settings
from model_manager.models_file import load_models_file
from model_manager.store import SpecStore

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """fakeredis's TCP server on a loopback port, served from a daemon thread."""

    def __init__(self, port: int) -> None:
        try:
            self._server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
        except OSError as exc:
            raise RuntimeError(
                f"cannot start the embedded Redis on 127.0.0.1:{port} ({exc}); set INFEROXY_REDIS_URL to use "
                "the Redis already there, or INFEROXY_EMBEDDED_REDIS_PORT to pick another port"
            ) from None
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self.url = f"redis://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="embedded-redis", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class ModelManager:
    name = "model_manager"

    def __init__(self, settings: Settings, ctx: zmq.asyncio.Context) -> None:
        self.settings = settings
        self.embedded: EmbeddedRedis | None = None
        self.redis_url = settings.redis_url

    async def run(self, ready: asyncio.Event) -> None:
        if not self.redis_url:
            self.embedded = EmbeddedRedis(self.settings.embedded_redis_port)
            self.embedded.start()
            self.redis_url = self.embedded.url
            log.info("embedded Redis-protocol server listening on %s", self.redis_url)
        store = SpecStore.from_url(self.redis_url, self.settings.redis_prefix)
        try:
            await self.seed(store)
            ready.set()
            await asyncio.Event().wait()  # serve the embedded Redis until cancelled
        finally:
            await store.close()
            if self.embedded is not None:
                self.embedded.stop()

    async def seed(self, store: SpecStore) -> None:
        path = self.settings.models_file
        if not path:
            return
        if not await asyncio.to_thread(Path(path).is_file):
            log.warning("models file %s not found; the registry starts with what Redis holds", path)
            return
        written = await store.seed(await asyncio.to_thread(load_models_file, path))
        log.info("seeded %d model(s) from %s: %s", len(written), path, ", ".join(written) or "none new")
