"""Running components inside one process: one alone (``inferoxy run``) or all together (``serve --in-process``)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
from collections.abc import Callable

import zmq.asyncio

from inferoxy import gctune, metrics
from inferoxy.service import Service
from inferoxy.settings import Settings

log = logging.getLogger(__name__)

# Imported lazily: a bridge process has no business importing the task manager's Docker client.
COMPONENTS: dict[str, str] = {
    "model_manager": "model_manager.service:ModelManager",
    "task_manager": "task_manager.service:TaskManager",
    "batch_manager": "batch_manager.service:BatchManager",
    "job_worker": "jobs.worker:JobWorker",
    "zmq_bridge": "bridges.zmq_bridge:ZmqBridge",
    "rest_bridge": "bridges.rest:RestBridge",
    "grpc_bridge": "bridges.grpc_bridge:GrpcBridge",
}
BRIDGE_COMPONENTS = {"rest": "rest_bridge", "zmq": "zmq_bridge", "grpc": "grpc_bridge"}


def component_names(settings: Settings) -> list[str]:
    """Every component ``serve`` starts, in start order: the registry first, bridges last."""
    unknown = [b for b in settings.bridge_names if b not in BRIDGE_COMPONENTS]
    if unknown:
        raise ValueError(f"unknown bridge(s) {unknown}; choose from {sorted(BRIDGE_COMPONENTS)}")
    bridges = [BRIDGE_COMPONENTS[b] for b in settings.bridge_names]
    # The job worker sends over the bus as a bridge does, and stops before the batch manager so it can put its
    # jobs back in the queue.
    return ["model_manager", "task_manager", "batch_manager", "job_worker", *bridges]


# Bridges that run on uvloop with INFEROXY_BRIDGE_EVENT_LOOP=auto: where it was measured to pay
# (bench/bench_bridge_loop.py, docs/PERFORMANCE.md). The REST bridge's sockets are the loop's own
# transports, which uvloop runs in C (about 13% less CPU per request); grpcio and libzmq do their I/O
# in their own threads, and their bridges spent the same on either loop.
UVLOOP_BY_DEFAULT = {"rest_bridge"}


def loop_factory(name: str, settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop component ``name`` gets when run alone: uvloop's (``settings.bridge_event_loop``), or
    asyncio's own (None). Only bridges ever get uvloop: the other components' hot path is ZeroMQ, read
    from asyncio's selector (inferoxy/reactor.py)."""
    choice = settings.bridge_event_loop
    if name not in BRIDGE_COMPONENTS.values() or choice == "asyncio":
        return None
    if choice == "auto" and name not in UVLOOP_BY_DEFAULT:
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None  # an install without it: asyncio's loop works the same, only slower
    return uvloop.new_event_loop


def load_component(name: str) -> type[Service]:
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; choose from {', '.join(COMPONENTS)}")
    module_name, _, class_name = COMPONENTS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


async def run_until_signalled(main: Callable[[asyncio.Event], asyncio.Future[None] | object]) -> None:
    """Run ``main(stop)`` where ``stop`` is set on SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await main(stop)  # type: ignore[misc]


async def run_component(name: str, settings: Settings) -> None:
    """Run one component until SIGINT/SIGTERM; tell a supervising ``serve`` when it is ready."""
    if not settings.metrics:
        metrics.disable()
    ctx = zmq.asyncio.Context()
    service = load_component(name)(settings, ctx)
    ready = asyncio.Event()

    async def main(stop: asyncio.Event) -> None:
        task = asyncio.create_task(service.run(ready), name=name)
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            gctune.settle()
            _report_ready(name, service)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        waiter.cancel()
        if not task.done():
            # One cancel: the component's own shutdown (draining replicas, final statuses) must run to its end.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not task.cancelled():
            task.result()  # it failed, on its own or while stopping: raised so the process exits non-zero

    try:
        await run_until_signalled(main)
    finally:
        ctx.destroy(linger=0)


def _report_ready(name: str, service: Service) -> None:
    """Write one JSON line to the pipe ``serve`` handed us, saying we are up (and where Redis is)."""
    fd = os.environ.get("INFEROXY_READY_FD")
    log.info("%s ready", name)
    if not fd:
        return
    message = {"component": name, "redis_url": getattr(service, "redis_url", None)}
    with os.fdopen(int(fd), "w") as pipe:
        pipe.write(json.dumps(message) + "\n")


async def run_in_process(settings: Settings, on_ready: Callable[[Settings], None]) -> None:
    """Every component in this one event loop, sharing a ZeroMQ context so inproc:// endpoints work."""
    ctx = zmq.asyncio.Context()
    tasks: list[asyncio.Task[None]] = []

    async def start(name: str, component_settings: Settings) -> Service:
        service = load_component(name)(component_settings, ctx)
        ready = asyncio.Event()
        task = asyncio.create_task(service.run(ready), name=name)
        tasks.append(task)
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not ready.is_set():
            await task  # it ended before it was ready: let its exception speak
            raise RuntimeError(f"{name} stopped before it was ready")
        return service

    async def main(stop: asyncio.Event) -> None:
        names = component_names(settings)
        model_manager = await start(names[0], settings)
        shared = settings.model_copy(update={"redis_url": getattr(model_manager, "redis_url", None)})
        for name in names[1:]:
            await start(name, shared)
        on_ready(shared)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({stopper, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()

    try:
        await run_until_signalled(main)
    finally:
        # Bridges first, the registry last: the reverse of the start order.
        for task in reversed(tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await task
                except Exception:
                    log.exception("%s failed", task.get_name())
        ctx.destroy(linger=0)
