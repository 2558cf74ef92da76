"""Every Prometheus metric Inferoxy exports, defined once (docs/METRICS.md describes each).

Components record into these module attributes (``metrics.REQUESTS.labels(...).inc()``); always
through the module (``from inferoxy import metrics``), never ``from inferoxy.metrics import X``, so
``INFEROXY_METRICS=false`` can swap every metric for a no-op before a component starts (bench/ measures
the cost of metrics as on against off).

Where the numbers meet: under ``inferoxy serve`` every child process writes its samples into one
directory (prometheus-client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``, made by the
supervisor), and ``render()`` in the REST bridge merges them, so one ``GET /metrics`` shows the whole
proxy. A component run alone (``inferoxy run COMPONENT --metrics-port N``) serves its own registry.
Gauges say how samples of several processes merge (``multiprocess_mode``): ``livesum`` adds the live
processes' values, so a dead component's queue or replicas vanish with it; counters of a dead process
stay in the sum, so a restart never makes a counter go back.
"""

from __future__ import annotations

import contextlib
import os
from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, exposition, multiprocess, values

# Sub-millisecond to multi-second: a ZeroMQ round trip is ~1 ms, a big batch on a GPU may take seconds.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Pulling an image and loading weights: seconds to minutes.
STARTUP_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# How long a hot path (a bridge's answers, the batch manager's batches) gathers its observations in memory
# before writing them (``BufferedHistogram``): under serve every write is a locked mmap write, and what a
# scrape sees of another process is at most this late, far under any scrape interval.
FLUSH_S = 0.5

BRIDGES = ("rest", "grpc", "zmq")
# What a request ended as: "ok", or an inferoxy.protocol.ErrorCode value.
OK = "ok"
REPLICA_STATES = ("starting", "ready", "draining", "failed")

MODEL = ("model", "version")

REQUESTS = Counter("inferoxy_requests", "Requests answered, by bridge, model and outcome (ok or the error code).",
                   ["bridge", *MODEL, "code"])
REQUEST_SECONDS = Histogram("inferoxy_request_duration_seconds",
                            "Time from a request's arrival at its bridge to its answer, as the client sees it; "
                            "outcome is ok or error.",
                            ["bridge", *MODEL, "outcome"], buckets=LATENCY_BUCKETS_S)
QUEUE_DEPTH = Gauge("inferoxy_queue_depth", "Requests waiting in the batch manager for a batch.", MODEL,
                    multiprocess_mode="livesum")
QUEUE_SECONDS = Histogram("inferoxy_queue_wait_seconds",
                          "Time a request waited in the batch manager before its batch was sent.",
                          MODEL, buckets=LATENCY_BUCKETS_S)
BATCH_SIZE = Histogram("inferoxy_batch_size", "Requests in each batch the batch manager sent.", MODEL,
                       buckets=BATCH_SIZE_BUCKETS)
BATCH_COMPUTE_SECONDS = Histogram("inferoxy_batch_compute_seconds",
                                  "Time a replica spent computing one batch, as the replica reports it.",
                                  MODEL, buckets=LATENCY_BUCKETS_S)
BATCHES_IN_FLIGHT = Gauge("inferoxy_batches_in_flight", "Batches sent to replicas and not yet answered.", MODEL,
                          multiprocess_mode="livesum")
SESSIONS_OPEN = Gauge("inferoxy_sessions_open", "Sessions (sequences) pinned to a replica.", MODEL,
                      multiprocess_mode="livesum")
REPLICAS = Gauge("inferoxy_replicas", "Replicas by state: starting, ready, draining, failed.", [*MODEL, "state"],
                 multiprocess_mode="livesum")
REPLICA_STARTS = Counter("inferoxy_replica_starts", "Replicas the task manager started.", MODEL)
REPLICA_DEATHS = Counter("inferoxy_replica_deaths", "Replicas that died or were killed without being asked to stop.",
                         MODEL)
REPLICA_RESTARTS = Counter("inferoxy_replica_restarts", "Replicas started to replace one that died.", MODEL)
REPLICA_READY_SECONDS = Histogram("inferoxy_replica_ready_seconds",
                                  "Time from a replica's start to its first ready message.", MODEL,
                                  buckets=STARTUP_BUCKETS_S)
REPLICA_WARMUP_SECONDS = Histogram("inferoxy_replica_warmup_seconds",
                                   "Time a replica spent on its spec's warmup requests before it said ready.", MODEL,
                                   buckets=STARTUP_BUCKETS_S)
AUTOSCALER_DECISIONS = Counter("inferoxy_autoscaler_decisions",
                               "Moves of a model version's target replica count, by direction (up, down) and reason "
                               "(saturated, cold_start, underused, idle, bounds).", [*MODEL, "direction", "reason"])
AUTOSCALER_TARGET = Gauge("inferoxy_autoscaler_target_replicas",
                          "The replicas the autoscaler keeps for the model version (min_replicas..max_replicas).",
                          MODEL, multiprocess_mode="livesum")
REDIS_UP = Gauge("inferoxy_redis_up", "1 while the registry's Redis answers, 0 while it does not.",
                 multiprocess_mode="livemax")
REGISTRY_REVISION = Gauge("inferoxy_registry_revision", "The model registry's revision, as last read.",
                          multiprocess_mode="livemax")
# Triton's statistics report each model's last inference; "max" keeps the latest over every bridge process.
LAST_INFERENCE = Gauge("inferoxy_last_inference_timestamp_seconds",
                       "Unix time of the last inference request a bridge sent for the model version.", MODEL,
                       multiprocess_mode="max")
COMPONENT_UP = Gauge("inferoxy_component_up", "1 while the component runs, 0 while serve waits to restart it.",
                     ["component"], multiprocess_mode="livemax")
COMPONENT_RESTARTS = Counter("inferoxy_component_restarts", "Times serve restarted a component that died.",
                             ["component"])
# Jobs (docs/JOBS.md): recorded by the job_worker.
JOBS_RUNNING = Gauge("inferoxy_jobs_running", "Jobs the job workers are running now.", multiprocess_mode="livesum")
JOBS_FINISHED = Counter("inferoxy_jobs_finished", "Jobs ended, by state: succeeded, failed, cancelled.", ["state"])
JOB_RETRIES = Counter("inferoxy_job_retries", "Job runs that failed and were queued again after a backoff.")

ALL = (REQUESTS, REQUEST_SECONDS, QUEUE_DEPTH, QUEUE_SECONDS, BATCH_SIZE, BATCH_COMPUTE_SECONDS,
       BATCHES_IN_FLIGHT, SESSIONS_OPEN, REPLICAS, REPLICA_STARTS, REPLICA_DEATHS, REPLICA_RESTARTS,
       REPLICA_READY_SECONDS, REPLICA_WARMUP_SECONDS, AUTOSCALER_DECISIONS, AUTOSCALER_TARGET, REDIS_UP,
       REGISTRY_REVISION, LAST_INFERENCE, COMPONENT_UP, COMPONENT_RESTARTS, JOBS_RUNNING, JOBS_FINISHED, JOB_RETRIES)


def exported_names() -> list[str]:
    """Every metric family name a scrape shows (counters with ``_total``), for docs and dashboard checks."""
    names = []
    for metric in ALL:
        name = metric._name  # the family name without the suffix prometheus-client adds
        names.append(f"{name}_total" if isinstance(metric, Counter) else name)
    return names


def multiprocess_dir() -> str | None:
    """The directory every process of this proxy writes samples to, or None when each keeps its own."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def use_directory(directory: str) -> None:
    """Record into ``directory`` from now on, in this process and the processes it starts.

    prometheus-client picks its value store when it is imported; a labelled metric makes its values at its
    first ``labels()`` call, so switching here still covers every labelled metric this process records
    (serve's own: the component ones). Children read the variable at their start."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()


def registry() -> CollectorRegistry:
    """What ``GET /metrics`` shows: every process's samples merged, or this process's alone."""
    directory = multiprocess_dir()
    if directory is None:
        from prometheus_client import REGISTRY

        return REGISTRY
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=directory)
    return merged


def render(accept: str | None = None) -> tuple[bytes, str]:
    """The exposition body and its content type (OpenMetrics when the scraper asks for it)."""
    encode, content_type = exposition.choose_encoder(accept or "")
    return encode(registry()), content_type


def process_dead(pid: int) -> None:
    """Forget a dead process's live gauges (its counters stay in the sums)."""
    directory = multiprocess_dir()
    if directory is not None:
        multiprocess.mark_process_dead(pid, directory)


class BufferedHistogram:
    """One labelled histogram whose observations wait in this process's memory until ``flush``.

    Under ``serve`` every prometheus-client write is a locked mmap write (1-2 µs), and ``observe`` makes
    three (a bucket, the sum, and the count it derives); a hot path (a bridge's answers, the batch
    manager's batches) instead counts in plain ints per bucket and writes once per bucket touched at
    ``flush``. It reads prometheus-client's histogram internals (``_upper_bounds``, ``_buckets``, ``_sum``;
    tests/test_metrics_core.py holds the result to ``observe``'s); a child without them (a no-op one,
    metrics off) is observed directly. ``pending``, when given, gets this histogram appended at its first
    observation since the last flush, so an owner flushes only what moved."""

    __slots__ = ("_child", "_bounds", "_buckets", "_sum", "_counts", "_total", "_pending")

    def __init__(self, child: Any, pending: list[BufferedHistogram] | None = None) -> None:
        self._child = child
        self._bounds: list[float] | None = getattr(child, "_upper_bounds", None)
        self._buckets: list[Any] | None = getattr(child, "_buckets", None)
        self._sum: Any = getattr(child, "_sum", None)
        if self._buckets is None or self._sum is None:
            self._bounds = None
        self._counts: dict[int, int] = {}
        self._total = 0.0
        self._pending = pending

    def observe(self, amount: float) -> None:
        bounds = self._bounds
        if bounds is None:
            self._child.observe(amount)
            return
        counts = self._counts
        if not counts and self._pending is not None:
            self._pending.append(self)
        index = bisect_left(bounds, amount)  # the first bucket with amount <= its bound (the last is +Inf)
        counts[index] = counts.get(index, 0) + 1
        self._total += amount

    def flush(self) -> None:
        """Write what waits (prometheus-client keeps buckets uncumulated and adds them up when read)."""
        if not self._counts:
            return
        buckets = self._buckets
        assert buckets is not None
        for index, count in self._counts.items():
            buckets[index].inc(count)
        self._sum.inc(self._total)
        self._counts = {}
        self._total = 0.0


class _Off:
    """A metric that records nothing: every metric under ``INFEROXY_METRICS=false``."""

    def labels(self, *args: Any, **kwargs: Any) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass

    def remove(self, *args: Any) -> None:
        pass


def disable() -> None:
    """Turn every metric into a no-op in this process (``INFEROXY_METRICS=false``), and take them out of
    the default registry: an unlabelled gauge would still show its 0 there."""
    from prometheus_client import REGISTRY

    off = _Off()
    for name, value in list(globals().items()):
        if value in ALL:
            globals()[name] = off
            with contextlib.suppress(KeyError):  # disabled before
                REGISTRY.unregister(value)
