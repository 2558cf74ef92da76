"""Each answered request, counted and timed once per bridge: ``inferoxy_requests_total`` and
``inferoxy_request_duration_seconds`` (docs/METRICS.md).

Every bridge calls ``Meter.record`` once per request, where the answer (result or error) is handed to
its transport, with the time the request arrived. Labels are bounded by the registry, never by what a
client sends: a model the registry does not know (a typo, random names, a name that cannot be read) is
counted under ``model=""``, and a version the model does not have under ``version=""``. A request that
names no version is counted under the version it went to (the model's default).

Counts are gathered per label set in plain Python numbers and handed to prometheus-client at most every
``metrics.FLUSH_S`` (and at each scrape of this process's registry, and when the bridge stops). Under ``serve``
every prometheus-client update is a locked write to a memory-mapped file: a counter and a histogram
observation cost 3.4-8.6 µs per request on the 2-core machine (depending on its load), ``record`` with
its tally 0.54 µs (``python bench/bench_metrics.py --micro``). A scrape so sees another bridge process's
counts up to ``metrics.FLUSH_S`` late, far less than any scrape interval.
"""

from __future__ import annotations

import asyncio
import time
import weakref
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
# The answers that mean the model ran, for Triton's ``last_inference`` (inferoxy_last_inference_timestamp_seconds).
_INFERRED = frozenset({metrics.OK, ErrorCode.MODEL_ERROR.value})

clock = time.perf_counter


def code_of(error: BaseException) -> str:
    """The error code a client got for ``error``: its own, ``deadline`` for a call the client gave up on
    (a cancelled gRPC call, as REST counts a client that hung up), ``internal`` for a bridge failure."""
    if isinstance(error, InferoxyError):
        return error.code
    if isinstance(error, asyncio.CancelledError):
        return ErrorCode.DEADLINE.value
    return ErrorCode.INTERNAL.value


class _Tally:
    """What one label set gathered since the last flush, and the children it is flushed into."""

    __slots__ = ("count", "counter", "histogram")

    def __init__(self, counter: Any, histogram: Any) -> None:
        self.count = 0
        self.counter = counter
        self.histogram = metrics.BufferedHistogram(histogram)

    def flush(self) -> None:
        if self.count:
            self.counter.inc(self.count)
            self.count = 0
            self.histogram.flush()


class _Last:
    """A model version's last inference (wall time), and what its gauge was last set to."""

    __slots__ = ("gauge", "at", "written")

    def __init__(self, gauge: Any) -> None:
        self.gauge = gauge
        self.at = self.written = 0.0

    def flush(self) -> None:
        if self.at != self.written:
            self.gauge.set(self.at)
            self.written = self.at


class Meter:
    """Records each request one bridge answered, under its model's labels."""

    __slots__ = ("bridge", "_catalog", "_registry", "_tallies", "_last", "_due", "__weakref__")

    def __init__(self, bridge: str, catalog: Catalog) -> None:
        self.bridge = bridge
        self._catalog = catalog
        self._registry: object = None
        self._tallies: dict[tuple[str, str, str], _Tally] = {}
        self._last: dict[tuple[str, str], _Last] = {}
        self._due: asyncio.TimerHandle | None = None
        _METERS.add(self)

    def record(self, name: object, version: object, code: str, started: float) -> None:
        """One answer with ``code`` (``metrics.OK`` or an error code) to a request for model ``name`` at
        ``version`` (None: the default) that arrived at ``started`` (``clock()``)."""
        elapsed = clock() - started
        registry = self._catalog.registry
        if registry is not self._registry:  # a new snapshot: models (and defaults) may have gone or moved
            self.flush()
            self._registry = registry
            self._tallies, self._last = {}, {}
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
        tally = self._tallies.get(key)
        if tally is None:
            outcome = metrics.OK if code == metrics.OK else ERROR
            # Bounded: models x versions of one snapshot x the error codes.
            tally = self._tallies[key] = _Tally(
                metrics.REQUESTS.labels(self.bridge, model, version_label, code),
                metrics.REQUEST_SECONDS.labels(self.bridge, model, version_label, outcome))
        tally.count += 1
        tally.histogram.observe(elapsed)
        if code in _INFERRED and model:
            last = self._last.get(key[:2])
            if last is None:
                last = self._last[key[:2]] = _Last(metrics.LAST_INFERENCE.labels(model, version_label))
            last.at = time.time()
        if self._due is None:
            self._flush_later()

    def failed(self, name: object, version: object, error: BaseException, started: float) -> None:
        """``record`` for a request that ended in ``error`` (``code_of``)."""
        self.record(name, version, code_of(error), started)

    def flush(self) -> None:
        """Hand what was gathered to prometheus-client (the shared samples, under serve) now."""
        if self._due is not None:
            self._due.cancel()
            self._due = None
        for tally in self._tallies.values():
            tally.flush()
        for last in self._last.values():
            last.flush()

    def _flush_later(self) -> None:
        try:
            self._due = asyncio.get_running_loop().call_later(metrics.FLUSH_S, self.flush)
        except RuntimeError:  # no event loop (a caller outside a bridge): nothing to batch with
            self.flush()


_METERS: weakref.WeakSet[Meter] = weakref.WeakSet()


def flush_all() -> None:
    """Flush every meter of this process: before a scrape of its own registry, and when a bridge stops."""
    for meter in list(_METERS):
        meter.flush()
