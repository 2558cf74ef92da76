"""How the registry is doing, for health endpoints: Redis down means degraded, never dead.

While Redis is unreachable every component serves from the last snapshot it read, so the
proxy stays live and ready; only registry writes (the admin API) fail.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from model_manager.store import Registry, SpecStore

PING_TIMEOUT_S = 1.0


async def registry_health(store: SpecStore | None, serving: Registry | None) -> dict[str, Any]:
    """``{"status": "ok" | "degraded", "redis": ..., "serving_revision", "models", ...}`` for one process.

    ``store`` is pinged (at most ``PING_TIMEOUT_S``); ``serving`` is the snapshot this process
    serves from. ``status`` is ``degraded`` when Redis does not answer, or when it answers
    but nothing has been read from it yet.
    """
    redis_state: dict[str, Any]
    if store is None:
        redis_state = {"reachable": False, "error": "no registry configured"}
    else:
        try:
            revision = await asyncio.wait_for(store.revision(), PING_TIMEOUT_S)
            redis_state = {"reachable": True, "revision": revision}
        except Exception as exc:  # any failure to reach Redis is reported, not raised
            redis_state = {"reachable": False, "error": str(exc) or type(exc).__name__}
        watch = store.watch_state
        if watch.revision_applied >= 0 or watch.error is not None:
            redis_state["watch"] = {
                "connected": watch.connected,
                "error": watch.error,
                "for_s": round(time.monotonic() - watch.since, 3),
            }
    ok = bool(redis_state["reachable"]) and serving is not None
    return {
        "status": "ok" if ok else "degraded",
        "redis": redis_state,
        "serving_revision": None if serving is None else serving.revision,
        "models": 0 if serving is None else len(serving),
        "serving": serving is not None,
    }
