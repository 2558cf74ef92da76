"""Replicas as Docker containers, through the Docker Engine API (docker-py).

Every engine call is blocking HTTP, so each one runs in a worker thread (``asyncio.to_thread``) and
the event loop never waits on the engine. Waiting for a container to exit lasts the replica's whole
life, so each wait gets a daemon thread of its own instead of a slot in the default executor (which
has few, and which start() and stop() need), and it polls in short slices so it notices a stop.

Every container carries the labels below. ``inferoxy.instance`` is how ``remove_orphans`` finds what
an earlier run of the same proxy instance left behind (invariant: no orphans). Before that, the proxy
claims the instance name with a labelled volume (``claim_instance``), so that a second proxy with the
same name refuses to start instead of removing the first one's replicas as leftovers.

Exits are learned two ways: one thread follows the engine's ``die`` events for this instance's
containers (an exit is known within moments), and each replica's wait thread is the backstop for
events missed while the event stream reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import requests
from docker.client import DockerClient, from_env
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest
from docker.utils import parse_repository_tag
from urllib3.exceptions import ReadTimeoutError

from inferoxy.settings import Settings
from task_manager.runtimes.base import (
    InstanceTaken,
    ReplicaExit,
    ReplicaHandle,
    ReplicaPlan,
    Runtime,
    RuntimeStartError,
)
from task_manager.runtimes.ownership import Owner, own_container_id, owner_alive

log = logging.getLogger(__name__)

LABEL_INSTANCE = "inferoxy.instance"
LABEL_MODEL = "inferoxy.model"
LABEL_VERSION = "inferoxy.version"
LABEL_REPLICA = "inferoxy.replica"
LABEL_CLAIM = "inferoxy.claim"  # on the volume that marks who owns an instance name (see claim_instance)
CLAIM_ATTEMPTS = 3

PULL_POLICIES = ("if-not-present", "always", "never")
LOG_TAIL_LINES = 50
LOG_TAIL_MAX_CHARS = 8000  # 50 lines can still be megabytes; error replies and logs want a screenful
WAIT_SLICE_S = 5  # how long one engine wait call blocks before the watcher looks around again
ENGINE_RETRY_S = 1.0  # pause between wait calls while the engine does not answer
# Waits hold a connection each: a pool this big keeps urllib3 from discarding connections.
MAX_POOL_SIZE = 64

# Docker's own network modes; any other name is a network to attach to.
_NETWORK_MODES = {"host", "none", "bridge"}
_CONTAINER_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]")
# What an engine call can raise: the engine's answers, and requests' own when it does not answer.
_ENGINE_ERRORS = (DockerException, requests.exceptions.RequestException)

T = TypeVar("T")


class DockerRuntime(Runtime):
    """Starts each replica as a container from ``plan.spec.image``."""

    name = "docker"

    def __init__(
        self,
        instance: str,
        *,
        base_url: str | None = None,
        network: str = "host",
        pull_policy: str = "if-not-present",
        registry_auth: dict[str, str] | None = None,
    ) -> None:
        """
        instance: this proxy's name; labels every container (``Settings.instance``).
        base_url: the engine (``unix:///var/run/docker.sock``, ``tcp://...``); None: DOCKER_HOST & co.
        network: ``host`` (replicas dial the task manager on the host's addresses), ``none``, or the
            name of a Docker network the task manager is reachable on.
        pull_policy: ``if-not-present``, ``always`` or ``never``, as Kubernetes spells them.
        registry_auth: docker-py ``auth_config`` for pulls (``username``, ``password``, ...).
        """
        if not instance:
            raise ValueError("a DockerRuntime needs an instance name: it labels and finds its containers")
        if pull_policy not in PULL_POLICIES:
            raise ValueError(f"pull_policy {pull_policy!r}: expected one of {', '.join(PULL_POLICIES)}")
        self.instance = instance
        self.base_url = base_url
        self.network = network
        self.pull_policy = pull_policy
        self._registry_auth = registry_auth
        self._client: DockerClient | None = None
        self._client_lock = asyncio.Lock()
        self._events = _EventFollower(instance)
        self._claim: Any = None  # the volume that says this proxy owns the instance name, once claimed
        # One pull per image at a time: replicas of one model start together.
        self._image_locks: dict[str, asyncio.Lock] = {}

    # --- the Runtime interface -------------------------------------------------------------------

    async def start(self, plan: ReplicaPlan) -> DockerReplica:
        image = plan.spec.image
        if not image:
            raise RuntimeStartError(
                f"model {plan.spec.key} has no image; the docker runtime runs replicas from images"
            )
        try:
            options = self.container_options(plan)
        except ValueError as exc:  # a spec the engine cannot take (an unreadable memory size)
            raise RuntimeStartError(f"model {plan.spec.key}: {exc}") from exc
        client = await self._engine()
        async with self._image_locks.setdefault(image, asyncio.Lock()):
            await asyncio.to_thread(self._ensure_image, client, image, plan.spec.pull_policy or self.pull_policy)
        handover = _Handover()
        try:
            container = await asyncio.to_thread(self._create_and_start, client, options, plan, handover)
        except asyncio.CancelledError:
            # The thread carries on regardless; whatever it starts would have no handle, so it goes.
            handover.abandon()
            raise
        log.info("replica %s: container %s started from %s", plan.replica_id, container.short_id, image)
        replica = DockerReplica(plan.replica_id, container)
        self._events.follow(client, replica)
        return replica

    async def claim_instance(self) -> None:
        client = await self._engine()
        try:
            self._claim = await asyncio.to_thread(self._claim_blocking, client)
        except _ENGINE_ERRORS as exc:
            raise RuntimeStartError(f"cannot claim instance {self.instance!r} on the Docker engine: "
                                    f"{_explain(exc)}") from exc

    async def remove_orphans(self) -> int:
        """Remove every container labelled with this instance. Call it, once claimed, before starting replicas."""
        client = await self._engine()
        return await asyncio.to_thread(self._remove_orphans, client)

    async def close(self) -> None:
        self._events.close()
        if self._claim is not None:
            claim, self._claim = self._claim, None
            await asyncio.to_thread(_release_claim, claim)
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.to_thread(client.close)

    # --- what a container looks like (pure, so it is testable without an engine) ----------------

    def container_options(self, plan: ReplicaPlan) -> dict[str, Any]:
        """The keyword arguments of ``client.containers.create`` for this plan."""
        spec = plan.spec
        environment = {**spec.env, **plan.env}
        # Ours last: a plan cannot relabel a container out of this instance's reach.
        labels = {
            **plan.labels,
            LABEL_INSTANCE: self.instance,
            LABEL_MODEL: spec.name,
            LABEL_VERSION: spec.version,
            LABEL_REPLICA: plan.replica_id,
        }
        options: dict[str, Any] = {
            "image": spec.image,
            "name": container_name(plan.replica_id),
            "environment": environment,
            "labels": labels,
            "detach": True,
            # docker-init as PID 1 forwards SIGTERM to the runtime, so stop() ends it before the grace.
            "init": True,
        }
        if spec.command:
            options["command"] = list(spec.command)
        if self.network in _NETWORK_MODES or self.network.startswith("container:"):
            options["network_mode"] = self.network
        else:
            options["network"] = self.network
        if plan.gpu is not None:
            environment["NVIDIA_VISIBLE_DEVICES"] = plan.gpu
            options["device_requests"] = [DeviceRequest(device_ids=[plan.gpu], capabilities=[["gpu"]])]
        if spec.resources.cpus is not None:
            options["nano_cpus"] = round(spec.resources.cpus * 1e9)
        if spec.resources.memory is not None:
            options["mem_limit"] = memory_bytes(spec.resources.memory)
        return options

    # --- blocking engine work, run in threads ------------------------------------------------------

    async def _engine(self) -> DockerClient:
        async with self._client_lock:
            if self._client is None:
                self._client = await asyncio.to_thread(self._connect)
            return self._client

    def _connect(self) -> DockerClient:
        where = self.base_url or "the engine DOCKER_HOST names (default unix:///var/run/docker.sock)"
        try:
            # version "auto": the engine may be older than docker-py's default API version.
            if self.base_url:
                return DockerClient(base_url=self.base_url, version="auto", max_pool_size=MAX_POOL_SIZE)
            return from_env(version="auto", max_pool_size=MAX_POOL_SIZE)
        except DockerException as exc:
            raise RuntimeStartError(f"no Docker engine answers at {where}: {exc}") from exc

    def _ensure_image(self, client: DockerClient, image: str, pull_policy: str) -> None:
        if pull_policy != "always":
            try:
                client.images.get(image)
                return
            except ImageNotFound:
                if pull_policy == "never":
                    raise RuntimeStartError(
                        f"image {image!r} is not on the Docker engine and the pull policy is 'never': "
                        "build or load it there first (docker build, docker load)"
                    ) from None
            except _ENGINE_ERRORS as exc:
                raise RuntimeStartError(f"cannot look up image {image!r}: {_explain(exc)}") from exc
        repository, tag = parse_repository_tag(image)
        log.info("pulling image %s", image)
        try:
            client.images.pull(repository, tag=tag or "latest", auth_config=self._registry_auth)
        except _ENGINE_ERRORS as exc:
            raise RuntimeStartError(
                f"image {image!r} is not on the Docker engine and could not be pulled "
                f"(pull policy {pull_policy!r}): {_explain(exc)}"
            ) from exc

    def _create_and_start(self, client: DockerClient, options: dict[str, Any], plan: ReplicaPlan,
                          handover: _Handover) -> Any:
        try:
            container = client.containers.create(**options)
        except _ENGINE_ERRORS as exc:
            raise RuntimeStartError(
                f"replica {plan.replica_id}: cannot create a container from {options['image']!r}: {_explain(exc)}"
            ) from exc
        try:
            container.start()
        except _ENGINE_ERRORS as exc:
            _remove_quietly(container)  # created but never ran: not worth leaving behind
            raise RuntimeStartError(
                f"replica {plan.replica_id}: the container from {options['image']!r} did not start: "
                f"{_explain(exc)}"
            ) from exc
        handover.deliver(container)
        return container

    def _claim_blocking(self, client: DockerClient) -> Any:
        """Create the instance's claim volume, or take over a dead owner's; InstanceTaken for a live one.

        Creating a volume whose name exists returns the existing one with its labels unchanged, so of two
        proxies claiming at once exactly one finds its own labels there.
        """
        me = Owner.this_process(_known_container(client, own_container_id()))
        name = claim_volume_name(self.instance)
        for _ in range(CLAIM_ATTEMPTS):
            volume = client.volumes.create(name, labels={LABEL_CLAIM: self.instance, **me.labels()})
            holder = Owner.from_labels(volume.attrs.get("Labels") or {})
            if holder == me:
                log.info("claimed instance %s on the Docker engine (volume %s)", self.instance, name)
                return volume
            alive = False if holder is None else owner_alive(holder, me, partial(_container_running, client))
            if alive is not False:
                raise InstanceTaken(_instance_taken(self.instance, name, holder, alive))
            log.warning("instance %s was owned by a proxy that is gone (%s); taking it over", self.instance,
                        holder.describe() if holder else "its claim is unreadable")
            with contextlib.suppress(NotFound):
                volume.remove(force=True)
        raise InstanceTaken(f"instance {self.instance!r} is being claimed by another proxy at the same time; "
                            "give each proxy on one Docker engine its own name: set INFEROXY_INSTANCE")

    def _remove_orphans(self, client: DockerClient) -> int:
        leftovers = client.containers.list(
            all=True, sparse=True, filters={"label": f"{LABEL_INSTANCE}={self.instance}"}
        )
        removed = 0
        for container in leftovers:
            try:
                container.remove(force=True, v=True)
            except NotFound:
                continue  # gone on its own meanwhile
            removed += 1
            log.info("removed orphan container %s of instance %s", container.short_id, self.instance)
        return removed


def create_runtime(settings: Settings) -> DockerRuntime:
    """The runtime for ``INFEROXY_RUNTIME=docker`` (see task_manager.runtimes.factory)."""
    return DockerRuntime(
        settings.instance,
        base_url=settings.docker_url,
        network=settings.docker_network,
        pull_policy=settings.docker_pull_policy,
        registry_auth=registry_auth(settings),
    )


def claim_volume_name(instance: str) -> str:
    return container_name(f"{instance}-claim")


def _instance_taken(instance: str, volume: str, holder: Owner | None, alive: bool | None) -> str:
    who = holder.describe() if holder else "another proxy"
    if alive:
        return (f"another Inferoxy proxy ({who}) is running with INFEROXY_INSTANCE={instance!r} on this Docker "
                "engine; two proxies with one instance name remove each other's replicas. Give this one a name of "
                "its own: set INFEROXY_INSTANCE")
    return (f"instance {instance!r} is owned by another Inferoxy proxy ({who}) that this one cannot see from here "
            "(another machine or PID namespace). Set INFEROXY_INSTANCE to give this proxy a name of its own; or, "
            f"if that proxy is no longer running, remove its claim (docker volume rm {volume}) and start again")


def _known_container(client: DockerClient, container_id: str) -> str:
    """``container_id`` if this engine runs that container (the proxy's own), else empty."""
    return container_id if container_id and _container_running(client, container_id) else ""


def _container_running(client: DockerClient, container_id: str) -> bool:
    try:
        return bool(client.containers.get(container_id).status == "running")
    except NotFound:
        return False


def _release_claim(volume: Any) -> None:
    try:
        volume.remove(force=True)
    except NotFound:
        pass
    except _ENGINE_ERRORS as exc:  # the next start sees a dead owner and takes over
        log.warning("could not release the instance claim %s: %s", getattr(volume, "name", "?"), _explain(exc))


def registry_auth(settings: Settings) -> dict[str, str] | None:
    """docker-py's ``auth_config`` from the registry settings; None (anonymous pulls) without a username."""
    if not settings.registry_username:
        return None
    auth = {"username": settings.registry_username, "password": settings.registry_password or ""}
    if settings.registry_server:
        auth["serveraddress"] = settings.registry_server
    return auth


class _EventFollower:
    """One thread following the engine's ``die`` events for this instance's containers.

    Started with the first replica; reconnects when the stream breaks (the replicas' wait threads
    cover the gap). ``close`` ends it by closing the stream it is blocked on.
    """

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self._lock = threading.Lock()
        self._replicas: dict[str, DockerReplica] = {}  # container id -> replica
        self._thread: threading.Thread | None = None
        self._stream: Any = None
        self._closed = False

    def follow(self, client: DockerClient, replica: DockerReplica) -> None:
        with self._lock:
            self._replicas[replica.container.id] = replica
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, args=(client,), name="docker-events", daemon=True)
                self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
            self._replicas.clear()
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()

    def _run(self, client: DockerClient) -> None:
        filters = {"label": f"{LABEL_INSTANCE}={self.instance}", "type": "container", "event": "die"}
        while not self._closed:
            try:
                stream = client.events(filters=filters, decode=True)
                with self._lock:
                    if self._closed:
                        stream.close()
                        return
                    self._stream = stream
                for event in stream:
                    self._on_die(event)
            except Exception as exc:  # a broken stream: the wait threads still notice exits
                if self._closed:
                    return
                log.warning("following Docker events failed (%s); reconnecting", exc)
            if not self._closed:
                time.sleep(ENGINE_RETRY_S)

    def _on_die(self, event: dict[str, Any]) -> None:
        with self._lock:
            replica = self._replicas.pop(str(event.get("id", "")), None)
        if replica is None:
            return
        code = event.get("Actor", {}).get("Attributes", {}).get("exitCode")
        replica.died(int(code) if isinstance(code, str) and code.lstrip("-").isdigit() else None)


class DockerReplica(ReplicaHandle):
    """One replica's container. ``wait()`` and ``stop()`` may run at once, from any number of callers."""

    def __init__(self, replica_id: str, container: Any) -> None:
        self.replica_id = replica_id
        self.container = container
        self._exit: ReplicaExit | None = None  # set once, by whichever of wait/stop learns it first
        self._exit_lock = threading.Lock()
        # wait() and stop() both remove the container; this makes the second wait for the first.
        self._remove_lock = threading.Lock()
        self._removed = False
        self._watch: asyncio.Future[ReplicaExit] | None = None
        # Resolved from the event thread when the engine reports the container's death.
        self._died: asyncio.Future[ReplicaExit] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def wait(self) -> ReplicaExit:
        with self._exit_lock:
            if self._watch is None:
                self._loop = asyncio.get_running_loop()
                self._died = self._loop.create_future()
                self._watch = _in_daemon_thread(self._wait_blocking, f"wait-{self.replica_id}")
            if self._exit is not None:
                return self._exit
            watch, died = self._watch, self._died
        assert died is not None
        # asyncio.wait, not gather: one cancelled waiter must not end the watch the others share.
        done, _ = await asyncio.wait({watch, died}, return_when=asyncio.FIRST_COMPLETED)
        return self._exit or next(iter(done)).result()

    def died(self, code: int | None) -> None:
        """The engine reported the container's death (called from the event thread)."""
        exit_ = self._record(ReplicaExit(code, self._log_tail()))
        self._remove()  # as the wait thread does: once wait() returns, the container is gone
        with self._exit_lock:
            loop, died = self._loop, self._died
        if loop is not None and died is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(_set_result, died, exit_)

    async def stop(self, grace_s: float = 5.0) -> None:
        await asyncio.to_thread(self._stop_blocking, grace_s)

    # --- blocking ----------------------------------------------------------------------------------

    def _wait_blocking(self) -> ReplicaExit:
        while self._exit is None:
            try:
                status = self.container.wait(timeout=WAIT_SLICE_S)
            except NotFound:
                # Removed underneath us (stop() in another thread, or someone with the docker CLI).
                return self._record(ReplicaExit(None, ""))
            except requests.exceptions.ConnectionError as exc:
                if not (exc.args and isinstance(exc.args[0], ReadTimeoutError)):
                    log.warning("replica %s: the Docker engine does not answer (%s); still waiting",
                                self.replica_id, exc)
                    time.sleep(ENGINE_RETRY_S)
                continue  # a read timeout: still running
            except APIError as exc:
                log.warning("replica %s: waiting for the container failed (%s); retrying",
                            self.replica_id, _explain(exc))
                time.sleep(ENGINE_RETRY_S)
                continue
            ended = self._record(ReplicaExit(status.get("StatusCode"), self._log_tail()))
            # The replica has ended: its container goes now, its exit and log tail are kept here.
            self._remove()
            return ended
        return self._exit

    def _stop_blocking(self, grace_s: float) -> None:
        try:
            self.container.stop(timeout=max(0, math.ceil(grace_s)))
        except NotFound:
            self._record(ReplicaExit(None, ""))
            return
        except _ENGINE_ERRORS as exc:
            log.warning("replica %s: stopping the container failed (%s); removing it by force",
                        self.replica_id, _explain(exc))
        self._record(ReplicaExit(self._exit_code(), self._log_tail()))
        self._remove()

    def _remove(self) -> None:
        with self._remove_lock:
            if not self._removed:
                _remove_quietly(self.container)
                self._removed = True

    def _record(self, exit_: ReplicaExit) -> ReplicaExit:
        """Keep the first exit learned; a later, poorer one (the container already gone) loses."""
        with self._exit_lock:
            if self._exit is None:
                self._exit = exit_
            return self._exit

    def _exit_code(self) -> int | None:
        try:
            self.container.reload()
        except _ENGINE_ERRORS:
            return None
        state = self.container.attrs.get("State", {})
        return None if state.get("Running") else state.get("ExitCode")

    def _log_tail(self) -> str:
        try:
            raw = self.container.logs(stdout=True, stderr=True, tail=LOG_TAIL_LINES)
        except _ENGINE_ERRORS:
            return ""  # removed meanwhile, or a log driver that cannot be read back
        text = raw.decode("utf-8", errors="replace").rstrip()
        return text[-LOG_TAIL_MAX_CHARS:]


# --- helpers ---------------------------------------------------------------------------------------


def container_name(replica_id: str) -> str:
    """The replica id as a valid container name ([a-zA-Z0-9][a-zA-Z0-9_.-]+)."""
    name = _CONTAINER_NAME_BAD.sub("-", replica_id)
    if not name[:1].isalnum():
        name = "r" + name
    return name if len(name) >= 2 else name + "-0"


_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50, "ei": 2**60}
_DECIMAL = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_DOCKER = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def memory_bytes(text: str) -> int:
    """A memory size as Docker ("512m", "2g": binary) or Kubernetes ("2Gi", "500M") spells it."""
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(f"memory {text!r}: expected a number with an optional unit (512m, 2g, 2Gi, 500M)")
    number, unit = float(match.group(1)), match.group(2)
    if unit == "":
        factor = 1
    elif unit.lower() in _BINARY and unit[1] == "i":
        factor = _BINARY[unit.lower()]
    elif unit in _DOCKER:  # lower case: Docker's binary units ("k" too, unlike Kubernetes)
        factor = _DOCKER[unit]
    elif unit in _DECIMAL:
        factor = _DECIMAL[unit]
    elif len(unit) == 2 and unit.lower()[1] == "b" and unit.lower()[0] in _DOCKER:  # "512mb", "2GB"
        factor = _DOCKER[unit.lower()[0]]
    else:
        raise ValueError(f"memory {text!r}: unknown unit {unit!r}")
    return int(number * factor)


def _explain(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)


def _remove_quietly(container: Any) -> None:
    try:
        container.remove(force=True, v=True)
    except NotFound:
        pass
    except _ENGINE_ERRORS as exc:
        if isinstance(exc, APIError) and exc.status_code == 409 and "in progress" in _explain(exc):
            return  # someone else is removing it already
        # Left for remove_orphans at the next start; nothing better to do from here.
        log.warning("could not remove container %s: %s", getattr(container, "short_id", "?"), _explain(exc))


class _Handover:
    """Hands a started container from the engine thread to start(), or removes it if start() gave up.

    Exactly one side removes an abandoned container: whichever of deliver/abandon comes second.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._container: Any = None
        self._abandoned = False

    def deliver(self, container: Any) -> None:
        with self._lock:
            self._container = container
            abandoned = self._abandoned
        if abandoned:
            _remove_quietly(container)

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            container = self._container
        if container is not None:
            threading.Thread(target=_remove_quietly, args=(container,), daemon=True).start()


def _in_daemon_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run ``fn`` in a daemon thread; its outcome resolves the returned future on this loop.

    A daemon thread, so that a wait still blocked in the engine never holds up the interpreter's exit.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        deliver: Callable[[], None]
        try:
            deliver = partial(_set_result, future, fn())
        except BaseException as exc:  # handed to whoever awaits the future
            deliver = partial(_set_exception, future, exc)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            loop.call_soon_threadsafe(deliver)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _set_result(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
