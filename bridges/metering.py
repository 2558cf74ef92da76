"""Each answered request, counted and timed once per bridge: ``inferoxy_requests_total`` and
``inferoxy_request_duration_seconds`` (docs/METRICS.md).

Every bridge calls ``Meter.record`` once per request, where the answer (result or error) is handed to
its transport, with the time the request arrived. Labels are bounded by the registry, never by what a
client sends: a model the registry does not know (a typo, random names, a name that cannot be read) is
counted under ``model=""``, and a version the model does not have under ``version=""``. A request that
names no version is counted under the version it went to (the model's default).

Labelled children are kept per (model, version, code) for the current registry snapshot: prometheus-
client's ``labels()`` validates and looks up under a lock on every call, which the hot path need not
pay more than once per label set (bench/bench_metrics.py measures the whole cost).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bridges.catalog import Catalog
from inferoxy import metrics
from inferoxy.protocol import ErrorCode, InferoxyError

# What a model outside the registry is counted as (see the module docstring).
UNKNOWN = ""
ERROR = "error"
# Codes counted as they are; any other (a replica may send its own, passed on to the client unchanged) is
# counted as ``internal``, so a replica cannot grow the label set either.
_CODES = frozenset({metrics.OK, *(code.value for code in ErrorCode)})

clock = time.perf_counter


def code_of(error: BaseException) -> str:
    """The error code a client got for ``error``: its own, ``deadline`` for a call the client gave up on
    (a cancelled gRPC call, as REST counts a client that hung up), ``internal`` for a bridge failure."""
    if isinstance(error, InferoxyError):
        return error.code
    if isinstance(error, asyncio.CancelledError):
        return ErrorCode.DEADLINE.value
    return ErrorCode.INTERNAL.value


class Meter:
    """Records each request one bridge answered, under its model's labels."""

    __slots__ = ("bridge", "_catalog", "_registry", "_children")

    def __init__(self, bridge: str, catalog: Catalog) -> None:
        self.bridge = bridge
        self._catalog = catalog
        self._registry: object = None
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def record(self, name: object, version: object, code: str, started: float) -> None:
        """One answer with ``code`` (``metrics.OK`` or an error code) to a request for model ``name`` at
        ``version`` (None: the default) that arrived at ``started`` (``clock()``)."""
        elapsed = clock() - started
        registry = self._catalog.registry
        if registry is not self._registry:  # a new snapshot: models (and defaults) may have gone or moved
            self._registry = registry
            self._children = {}
        if code not in _CODES:
            code = ErrorCode.INTERNAL.value
        model, version_label = UNKNOWN, UNKNOWN
        if registry is not None and isinstance(name, str):
            default = registry.defaults.get(name)
            if default is not None:
                model = name
                if version is None:
                    version_label = default
                elif isinstance(version, str) and f"{name}/{version}" in registry.specs:
                    version_label = version
        key = (model, version_label, code)
        children = self._children.get(key)
        if children is None:
            outcome = metrics.OK if code == metrics.OK else ERROR
            children = (metrics.REQUESTS.labels(self.bridge, model, version_label, code),
                        metrics.REQUEST_SECONDS.labels(self.bridge, model, version_label, outcome))
            # Bounded: models x versions of one snapshot x the error codes the bus carries.
            self._children[key] = children
        children[0].inc()
        children[1].observe(elapsed)

    def failed(self, name: object, version: object, error: BaseException, started: float) -> None:
        """``record`` for a request that ended in ``error`` (``code_of``)."""
        self.record(name, version, code_of(error), started)
