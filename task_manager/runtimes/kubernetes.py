"""Replicas as Kubernetes pods (``INFEROXY_RUNTIME=kubernetes``), through the official ``kubernetes`` client.

One pod per replica in ``INFEROXY_KUBE_NAMESPACE``, labelled like the Docker containers, with restartPolicy
Never (the task manager owns restarts). The replica's CURVE secret key goes into a Secret of its own, owned by
its pod, never into the pod spec. The cluster places replicas (``places_replicas``): a ``run_on_gpu`` pod asks
for ``nvidia.com/gpu: 1``.

The client is blocking HTTP: every call runs in a worker thread (``asyncio.to_thread``), and one thread
(``kube_watch.PodWatcher``) follows the instance's pods. What it sees ends a replica's ``wait()``: a pod that
cannot start (image pull failure: never started, the model fails with the cluster's words), a pod whose
container ended (its exit code and last log lines), a pod deleted behind the proxy's back; or tells the task
manager that the scheduler cannot place a pod (``events.replica_unschedulable``). Pod manifests and the reading
of a pod's status are pure, in ``kube_pod.py``; one pod's handle is ``kube_replica.py``; the claim on the
instance name is ``kube_claim.py``. docs/KUBERNETES.md says what is created and which API verbs this needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration, CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from inferoxy.settings import Settings
from task_manager.runtimes import kube_claim
from task_manager.runtimes.base import (
    InstanceTaken,
    ReplicaPlan,
    Runtime,
    RuntimeStartError,
    replica_environment,
)
from task_manager.runtimes.kube_pod import (
    PodOptions,
    instance_selector,
    needs_secret,
    owner_reference,
    pod_manifest,
    read_pod,
    secret_manifest,
    secret_name,
)
from task_manager.runtimes.kube_replica import KubeReplica
from task_manager.runtimes.kube_watch import PodWatcher, call_json, call_quietly

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 50
LOG_TAIL_MAX_CHARS = 8000
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubernetesRuntime(Runtime):
    name = "kubernetes"
    places_replicas = True

    def __init__(self, options: PodOptions, connect: Callable[[], ApiClient]) -> None:
        """options: what every pod gets (namespace, instance label, pulls, owner). connect: makes the API
        client (reads a kubeconfig or the service account; called once, in a worker thread)."""
        if not options.instance:
            raise ValueError("a KubernetesRuntime needs an instance name: it labels and finds its pods")
        self.options = options
        self._connect = connect
        self._api: ApiClient | None = None
        self._core: CoreV1Api | None = None
        self._api_lock = asyncio.Lock()
        self._lock = threading.Lock()
        self._replicas: dict[str, KubeReplica] = {}  # by pod name (= replica id)
        self._created: set[str] = set()  # pods whose create call has returned
        self._watcher: PodWatcher | None = None
        self._claim: str | None = None  # the uid of this proxy's claim on the instance name, once claimed

    # --- the Runtime interface -------------------------------------------------------------------------

    async def start(self, plan: ReplicaPlan) -> KubeReplica:
        spec = plan.spec
        if not spec.image:
            raise RuntimeStartError(f"model {spec.key} has no image; the kubernetes runtime runs replicas from "
                                    "images")
        env = replica_environment(plan)
        try:
            pod = pod_manifest(plan, self.options, env)
        except ValueError as exc:  # a spec the API server could not take (an unreadable memory size)
            raise RuntimeStartError(f"model {spec.key}: {exc}") from exc
        core = await self._client()
        replica = KubeReplica(plan.replica_id, self, asyncio.get_running_loop())
        # Known before it exists, so the watch cannot report it before anyone listens.
        with self._lock:
            self._replicas[plan.replica_id] = replica
        made_pod = False
        try:
            created = await asyncio.to_thread(self._create, core, "pod", pod)
            made_pod = True
            with self._lock:
                self._created.add(plan.replica_id)
            if needs_secret(env):
                uid = str(created["metadata"]["uid"])
                await asyncio.to_thread(self._create, core, "secret",
                                        secret_manifest(plan, self.options, env, uid))
        except BaseException as exc:
            if made_pod:  # only what this call made: a name taken already is someone else's (its Secret goes too)
                await asyncio.shield(asyncio.to_thread(self._delete_replica_objects, core, plan.replica_id, 0))
            self.forget(plan.replica_id)
            if isinstance(exc, ApiException):
                raise RuntimeStartError(f"the Kubernetes API refused the replica of {spec.key}: "
                                        f"{_explain(exc)}") from None
            if isinstance(exc, Exception):  # the API server did not answer (urllib3's errors, a timeout)
                raise RuntimeStartError(f"cannot reach the Kubernetes API to start a replica of {spec.key}: "
                                        f"{_explain(exc)}") from exc
            raise
        log.info("replica %s: pod %s created in %s from %s", plan.replica_id, plan.replica_id,
                 self.options.namespace, spec.image)
        self._watch(core)
        return replica

    async def claim_instance(self) -> None:
        if self.options.owner is None:
            log.info("the proxy does not know its own pod (INFEROXY_KUBE_POD_NAME, _UID): instance %r is not "
                     "claimed; run one proxy per instance name in namespace %s", self.options.instance,
                     self.options.namespace)
            return
        core = await self._client()
        try:
            self._claim = await asyncio.to_thread(kube_claim.claim, core, self.options.namespace,
                                                  self.options.instance, self.options.owner)
        except InstanceTaken:
            raise
        except Exception as exc:  # refused (RBAC: secrets create/get/delete, pods get) or no answer
            raise RuntimeStartError(f"cannot claim instance {self.options.instance!r} in namespace "
                                    f"{self.options.namespace!r}: {_explain(exc)}") from exc

    async def remove_orphans(self) -> int:
        """Delete every pod and Secret labelled with this instance (leftovers of an earlier run, or of a stop
        that did not finish). Removed, not adopted: a leftover replica holds a bus key this run never issued."""
        core = await self._client()
        return await asyncio.to_thread(self._remove_orphans, core)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
        if self._claim is not None and self._core is not None:
            claim, self._claim = self._claim, None
            await asyncio.to_thread(kube_claim.release, self._core, self.options.namespace, self.options.instance,
                                    claim)
        if self._api is not None:
            api, self._api = self._api, None
            await asyncio.to_thread(api.close)

    # --- for KubeReplica ---------------------------------------------------------------------------------

    def forget(self, name: str) -> None:
        with self._lock:
            self._replicas.pop(name, None)
            self._created.discard(name)

    def delete_blocking(self, name: str, grace_s: float) -> None:
        assert self._core is not None
        self._delete_replica_objects(self._core, name, max(0, math.ceil(grace_s)))

    def log_tail_blocking(self, name: str) -> str:
        assert self._core is not None
        try:
            text = self._core.read_namespaced_pod_log(name, self.options.namespace, container="replica",
                                                      tail_lines=LOG_TAIL_LINES, _request_timeout=10)
        except Exception as exc:  # gone already, or a kubelet that cannot serve logs
            log.debug("replica %s: no log tail (%s)", name, exc)
            return ""
        return str(text).rstrip()[-LOG_TAIL_MAX_CHARS:]

    def watcher_lists(self) -> int:
        return self._watcher.lists if self._watcher is not None else 0

    # --- blocking ----------------------------------------------------------------------------------------

    async def _client(self) -> CoreV1Api:
        async with self._api_lock:
            if self._core is None:
                try:
                    self._api = await asyncio.to_thread(self._connect)
                except (ConfigException, OSError) as exc:
                    raise RuntimeStartError(f"cannot reach the Kubernetes API: {exc} (INFEROXY_KUBE_KUBECONFIG)") \
                        from exc
                self._core = CoreV1Api(self._api)
            return self._core

    def _create(self, core: CoreV1Api, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        create = core.create_namespaced_pod if kind == "pod" else core.create_namespaced_secret
        return call_json(create, self.options.namespace, body)

    def _delete_replica_objects(self, core: CoreV1Api, name: str, grace_s: int) -> None:
        """Delete a replica's pod (SIGTERM, then SIGKILL after ``grace_s``) and its Secret; gone already is fine."""
        namespace = self.options.namespace
        deletes = ((name, partial(core.delete_namespaced_pod, grace_period_seconds=grace_s)),
                   (secret_name(name), core.delete_namespaced_secret))
        for what, delete in deletes:
            try:
                call_quietly(delete, what, namespace)
            except Exception as exc:  # the API's refusal, or no answer: left for the sweep at shutdown or start
                if not (isinstance(exc, ApiException) and exc.status == 404):
                    log.warning("could not delete %s: %s", what, _explain(exc))

    def _remove_orphans(self, core: CoreV1Api) -> int:
        namespace, selector = self.options.namespace, instance_selector(self.options.instance)
        removed = 0
        for pod in call_json(core.list_namespaced_pod, namespace, label_selector=selector).get("items") or []:
            name = str(pod["metadata"]["name"])
            try:
                call_quietly(core.delete_namespaced_pod, name, namespace, grace_period_seconds=0)
                removed += 1
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("could not delete leftover pod %s: %s", name, _explain(exc))
        for secret in call_json(core.list_namespaced_secret, namespace, label_selector=selector).get("items") or []:
            with contextlib.suppress(ApiException):  # most went with their pods (owner references)
                call_quietly(core.delete_namespaced_secret, str(secret["metadata"]["name"]), namespace)
        return removed

    # --- the watch -----------------------------------------------------------------------------------------

    def _watch(self, core: CoreV1Api) -> None:
        if self._watcher is None:
            self._watcher = PodWatcher(core, self.options.namespace, instance_selector(self.options.instance),
                                       on_event=self._on_event, on_list=self._on_list, known=self._known)
        self._watcher.start()

    def _known(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._created)

    def _on_event(self, kind: str, pod: dict[str, Any]) -> None:
        name = str((pod.get("metadata") or {}).get("name", ""))
        with self._lock:
            replica = self._replicas.get(name)
        if replica is None:
            return
        if kind == "DELETED":
            replica.gone()
        else:
            replica.observe(read_pod(pod))

    def _on_list(self, pods: list[dict[str, Any]], known: frozenset[str]) -> None:
        listed = {str((pod.get("metadata") or {}).get("name", "")): pod for pod in pods}
        for name in known:
            if name not in listed:
                with self._lock:
                    replica = self._replicas.get(name)
                if replica is not None:
                    replica.gone()  # deleted while nobody watched
        for pod in listed.values():
            self._on_event("MODIFIED", pod)


def _explain(exc: Exception) -> str:
    if not isinstance(exc, ApiException):
        return str(exc) or type(exc).__name__
    try:
        message = json.loads(exc.body or "").get("message")
    except (TypeError, ValueError, AttributeError):
        message = None
    return f"{exc.status} {exc.reason}: {message}" if message else f"{exc.status} {exc.reason}"


# --- from settings ------------------------------------------------------------------------------------------


def connector(settings: Settings) -> Callable[[], ApiClient]:
    """How to reach the API server: the kubeconfig named, else the pod's service account, else ~/.kube/config."""

    def connect() -> ApiClient:
        if settings.kube_kubeconfig:
            return kube_config.new_client_from_config(config_file=settings.kube_kubeconfig,
                                                      context=settings.kube_context, persist_config=False)
        try:
            configuration = Configuration()
            kube_config.load_incluster_config(client_configuration=configuration)
            return ApiClient(configuration)
        except ConfigException:
            return kube_config.new_client_from_config(context=settings.kube_context, persist_config=False)

    return connect


def pod_options(settings: Settings) -> PodOptions:
    if bool(settings.kube_pod_name) != bool(settings.kube_pod_uid):
        raise RuntimeStartError("set both INFEROXY_KUBE_POD_NAME and INFEROXY_KUBE_POD_UID (the downward API's "
                                "metadata.name and metadata.uid), or neither")
    try:
        own_namespace: str | None = IN_CLUSTER_NAMESPACE.read_text().strip() or None
    except OSError:
        own_namespace = None
    namespace = settings.kube_namespace or own_namespace or "default"
    owner = None
    if settings.kube_pod_name and settings.kube_pod_uid:
        if own_namespace is not None and namespace != own_namespace:
            # An owner in another namespace counts as absent: the garbage collector would delete every pod at once.
            log.warning("replica pods go to namespace %s, the proxy runs in %s: owner references cannot cross "
                        "namespaces, so the replicas are not owned by the proxy's pod and the instance is not "
                        "claimed", namespace, own_namespace)
        else:
            owner = owner_reference("Pod", settings.kube_pod_name, settings.kube_pod_uid)
    secrets = tuple(name.strip() for name in settings.kube_image_pull_secrets.split(",") if name.strip())
    return PodOptions(namespace=namespace, instance=settings.instance, pull_policy=settings.kube_pull_policy,
                      image_pull_secrets=secrets, owner=owner)


def create_runtime(settings: Settings) -> KubernetesRuntime:
    """The runtime for ``INFEROXY_RUNTIME=kubernetes`` (see task_manager.runtimes.factory)."""
    host = urlsplit(settings.replica_url).hostname or ""
    if settings.replica_connect_url is None and (host in ("0.0.0.0", "localhost", "*", "::1")
                                                 or host.startswith("127.")):
        log.warning("replica pods dial %s, which is this pod's own address: set INFEROXY_REPLICA_CONNECT_URL to "
                    "the task manager's replica Service (docs/KUBERNETES.md)", settings.replica_url)
    return KubernetesRuntime(pod_options(settings), connector(settings))
