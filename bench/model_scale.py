"""A model's scale as the scaling benchmarks read it while they run, over the proxy's REST port.

``GET /v2/models/{name}`` answers ``serving`` with ``replicas`` (ready) and ``target`` once the
autoscaler is there; a proxy without them (fixed replicas) still has its status record, which the
admin API shows (``ready_replicas``, ``desired_replicas``, and each replica's start and ready time).
The benchmarks call the admin API over loopback with no key, which a proxy with no admin key allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Scale:
    """One reading of a model version's scale."""

    state: str | None
    replicas: int | None  # ready
    target: int | None
    source: str  # "serving" (GET /v2/models/{name}) or "status" (the status record, via the admin API)
    # Each replica in the status record: (started_at, ready_at), Unix times; ready_at None while starting.
    replica_times: list[tuple[float, float | None]] = field(default_factory=list)


async def status_record(http: httpx.AsyncClient, name: str) -> dict[str, Any] | None:
    """The status record of ``name``'s default version (the admin API's view of ``P:status``); None if none."""
    answer = await http.get(f"/v2/admin/models/{name}")
    answer.raise_for_status()
    document = answer.json()
    default = document.get("default_version")
    for version in document["versions"]:
        if version["spec"]["version"] == default or default is None:
            status: dict[str, Any] | None = version["status"]
            return status
    return None


async def read_scale(http: httpx.AsyncClient, name: str, *, with_replicas: bool = False) -> Scale:
    """``name``'s scale: from ``serving`` when it carries the counts, else from the status record.

    ``with_replicas``: read the status record as well, for each replica's start and ready time."""
    answer = await http.get(f"/v2/models/{name}")
    answer.raise_for_status()
    serving = answer.json().get("serving") or {}
    record = await status_record(http, name) if with_replicas or "target" not in serving else None
    times = [(r["started_at"], r["ready_at"]) for r in (record or {}).get("replicas", [])]
    if "replicas" in serving and "target" in serving:
        return Scale(serving.get("state"), serving["replicas"], serving["target"], "serving", times)
    if record is None:
        return Scale(serving.get("state"), None, None, "status", times)
    return Scale(record["state"], record["ready_replicas"], record["desired_replicas"], "status", times)
