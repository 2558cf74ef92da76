"""A model's scale as the scaling benchmarks read it while they run, over the proxy's REST port.

``serving`` of ``GET /v2/models/{name}`` (docs/MODELS.md, "Scaling") gives the state, the ready
replicas and the autoscaler's target: the view a client has. Each replica's start and ready time
come from the status record, which the admin API shows; the benchmarks call it over loopback with
no key, which a proxy with no admin key allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Scale:
    """One reading of a model version's scale."""

    state: str | None
    replicas: int  # ready
    target: int | None  # None while no task manager reports the model
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
    """``name``'s scale; ``with_replicas``: each replica's start and ready time as well (one more call)."""
    answer = await http.get(f"/v2/models/{name}")
    answer.raise_for_status()
    serving = answer.json()["serving"]
    record = await status_record(http, name) if with_replicas else None
    times = [(r["started_at"], r["ready_at"]) for r in (record or {}).get("replicas", [])]
    return Scale(serving["state"], serving["replicas"], serving["target"], times)
