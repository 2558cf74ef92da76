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
events missed while the event stream reconnects. A container once started (its waits, stop, log
tail) and the event thread live in ``docker_replica.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from functools import partial
from typing import Any

from docker.client import DockerClient, from_env
from docker.errors import DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest
from docker.utils import parse_repository_tag

from inferoxy.settings import Settings
from task_manager.runtimes.base import (
    LABEL_INSTANCE,
    InstanceTaken,
    ReplicaPlan,
    Runtime,
    RuntimeStartError,
    replica_labels,
)
from task_manager.runtimes.docker_replica import (
    _ENGINE_ERRORS,
    DockerReplica,
    _EventFollower,
    _explain,
    _remove_quietly,
)
from task_manager.runtimes.ownership import Owner, own_container_id, owner_alive
from task_manager.runtimes.quantity import memory_bytes

log = logging.getLogger(__name__)

LABEL_CLAIM = "inferoxy.claim"  # on the volume that marks who owns an instance name (see claim_instance)
CLAIM_ATTEMPTS = 3

PULL_POLICIES = ("if-not-present", "always", "never")
# Waits hold a connection each: a pool this big keeps urllib3 from discarding connections.
MAX_POOL_SIZE = 64

# Docker's own network modes; any other name is a network to attach to.
_NETWORK_MODES = {"host", "none", "bridge"}
_CONTAINER_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]")



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
        labels = {**plan.labels, **replica_labels(self.instance, spec, plan.replica_id)}
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


# --- helpers ---------------------------------------------------------------------------------------


def container_name(replica_id: str) -> str:
    """The replica id as a valid container name ([a-zA-Z0-9][a-zA-Z0-9_.-]+)."""
    name = _CONTAINER_NAME_BAD.sub("-", replica_id)
    if not name[:1].isalnum():
        name = "r" + name
    return name if len(name) >= 2 else name + "-0"




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

