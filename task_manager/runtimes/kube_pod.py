"""One replica as Kubernetes objects, and what a pod's status means for it. Pure: no client, no I/O.

``pod_manifest`` and ``secret_manifest`` build what the kubernetes runtime creates for a replica (plain dicts,
the API's own JSON); ``read_pod`` turns a pod the API server reports into what the task manager cares about
(placed or not, could not start, ended with a code). Kept apart from the runtime so both are tested alone.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from task_manager.runtimes.base import LABEL_INSTANCE, ReplicaPlan, replica_labels
from task_manager.runtimes.quantity import memory_bytes

CONTAINER = "replica"
GPU_RESOURCE = "nvidia.com/gpu"
# The plan's variables that are secrets: the replica's own CURVE secret key. They go into a Secret of the
# replica's own, not into the pod spec, which anyone who may `get pods` reads.
SECRET_VARIABLES = frozenset({"INFEROXY_BUS_SECRET_KEY"})
PULL_POLICIES = {"if-not-present": "IfNotPresent", "always": "Always", "never": "Never"}

# Waiting reasons that mean the container will not run without someone changing the spec or the cluster: the
# replica ends at once as never started (the model is `failed` with the cluster's words). CrashLoopBackOff is not
# among them: pods run with restartPolicy Never, so a crash is a terminated container, handled as an exit.
NEVER_STARTS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
                          "CreateContainerError", "ErrImageNeverPull"})

_LABEL_VALUE_BAD = re.compile(r"[^A-Za-z0-9_.-]")
MAX_LABEL_VALUE = 63


def label_value(text: str) -> str:
    """``text`` as a valid label value (at most 63 of [A-Za-z0-9_.-], alphanumeric at both ends); a text that had
    to change gets a short hash of itself, so two names that clean up the same stay apart."""
    clean = _LABEL_VALUE_BAD.sub("-", text).strip("-_.")
    if clean == text and len(text) <= MAX_LABEL_VALUE:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{clean[:MAX_LABEL_VALUE - 9].rstrip('-_.')}-{digest}".lstrip("-_.")


def instance_selector(instance: str) -> str:
    return f"{LABEL_INSTANCE}={label_value(instance)}"


def secret_name(pod_name: str) -> str:
    return f"{pod_name}-bus"


@dataclass(frozen=True)
class PodOptions:
    """What settings add to every replica pod (``INFEROXY_KUBE_*``)."""

    namespace: str
    instance: str
    pull_policy: str = "if-not-present"
    image_pull_secrets: tuple[str, ...] = ()
    owner: dict[str, Any] | None = None
    """An ownerReference to the proxy's own pod: deleting the proxy deletes its replicas (garbage collection)."""


def owner_reference(kind: str, name: str, uid: str) -> dict[str, Any]:
    # No blockOwnerDeletion: setting it needs rights on the owner beyond the runtime's Role, and nothing here
    # needs the owner's deletion to wait for its dependents.
    return {"apiVersion": "v1", "kind": kind, "name": name, "uid": uid}


def labels(plan: ReplicaPlan, instance: str) -> dict[str, str]:
    """The plan's labels, then ours (last: a plan cannot relabel a pod out of this instance's reach)."""
    raw = {**plan.labels, **replica_labels(instance, plan.spec, plan.replica_id)}
    return {key: label_value(value) for key, value in raw.items()}


def pod_manifest(plan: ReplicaPlan, options: PodOptions, env: dict[str, str]) -> dict[str, Any]:
    """The pod for ``plan``; ``env`` is the replica's whole environment (``replica_environment``). Raises
    ValueError for a spec the API server would refuse (a memory size it cannot read)."""
    spec = plan.spec
    name = plan.replica_id  # already a DNS-1123 label (replicas.replica_id)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": PULL_POLICIES[spec.pull_policy or options.pull_policy],
        "env": [_env_var(key, value, name) for key, value in sorted(env.items())],
    }
    if spec.command:
        # args, not command: as with Docker (where it replaces CMD), the image's ENTRYPOINT stays.
        container["args"] = list(spec.command)
    resources = _resources(plan)
    if resources:
        container["resources"] = resources
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": options.namespace,
        "labels": labels(plan, options.instance),
        # Label values are cleaned up; the exact names stay readable here.
        "annotations": {"inferoxy.model-key": spec.key, "inferoxy.replica-id": plan.replica_id},
    }
    if options.owner is not None:
        metadata["ownerReferences"] = [options.owner]
    pod_spec: dict[str, Any] = {
        "containers": [container],
        # The task manager owns restarts (backoff, crash loops, a fresh bus key per replica), as with Docker.
        "restartPolicy": "Never",
        # A model needs no API credentials, nor the Service variables of everything in the namespace.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
    }
    if options.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": secret} for secret in options.image_pull_secrets]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def secret_manifest(plan: ReplicaPlan, options: PodOptions, env: dict[str, str], pod_uid: str) -> dict[str, Any]:
    """The replica's own Secret (its CURVE secret key), owned by its pod: the cluster deletes it with the pod."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(plan.replica_id),
            "namespace": options.namespace,
            "labels": labels(plan, options.instance),
            "ownerReferences": [owner_reference("Pod", plan.replica_id, pod_uid)],
        },
        "stringData": {key: value for key, value in env.items() if key in SECRET_VARIABLES},
    }


def needs_secret(env: dict[str, str]) -> bool:
    return any(key in SECRET_VARIABLES for key in env)


def _env_var(key: str, value: str, pod_name: str) -> dict[str, Any]:
    if key in SECRET_VARIABLES:
        return {"name": key, "valueFrom": {"secretKeyRef": {"name": secret_name(pod_name), "key": key}}}
    return {"name": key, "value": value}


def _resources(plan: ReplicaPlan) -> dict[str, dict[str, str]]:
    """Requests equal to limits: the spec gives one figure per resource, and the scheduler should place by what
    the replica may really use. ``nvidia.com/gpu: 1`` lets the cluster place GPU replicas one per GPU."""
    wanted: dict[str, str] = {}
    resources = plan.spec.resources
    if resources.cpus is not None:
        wanted["cpu"] = f"{round(resources.cpus * 1000)}m"
    if resources.memory is not None:
        wanted["memory"] = str(memory_bytes(resources.memory))
    limits = dict(wanted)
    if plan.spec.run_on_gpu:
        limits[GPU_RESOURCE] = "1"  # extended resources are limits only; the request follows
    if not limits:
        return {}
    return {"requests": wanted, "limits": limits} if wanted else {"limits": limits}


# --- reading a pod ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodState:
    """What one observation of a replica's pod says."""

    unschedulable: str | None = None
    """The scheduler cannot place it (PodScheduled False, reason Unschedulable): its message."""
    scheduled: bool = False
    never_started: str | None = None
    """Its container will not run (``NEVER_STARTS``): the reason and the cluster's message."""
    ended: bool = False
    """Phase Failed or Succeeded: the replica's process is over."""
    exit_code: int | None = None
    reason: str = ""
    """For an end: the pod's or the container's reason and message (Evicted, OOMKilled, ...)."""
    terminating: bool = False
    """Someone asked the API server to delete it (deletionTimestamp)."""


def read_pod(pod: dict[str, Any]) -> PodState:
    status = pod.get("status") or {}
    terminating = bool((pod.get("metadata") or {}).get("deletionTimestamp"))
    unschedulable, scheduled = None, False
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled":
            scheduled = condition.get("status") == "True"
            if condition.get("status") == "False" and condition.get("reason") == "Unschedulable":
                unschedulable = condition.get("message") or "Unschedulable"
    container = _container_status(status)
    state = container.get("state") or {}
    phase = status.get("phase")
    if phase in ("Failed", "Succeeded"):
        terminated = state.get("terminated") or {}
        code = terminated.get("exitCode")
        # "Error" and "Completed" say no more than the exit code; OOMKilled, Evicted and the like do.
        said = terminated.get("reason") if terminated.get("reason") not in ("Error", "Completed") else None
        reason = _words(said, terminated.get("message")) or _words(status.get("reason"), status.get("message"))
        return PodState(scheduled=scheduled, ended=True, exit_code=code if isinstance(code, int) else None,
                        reason=reason, terminating=terminating)
    waiting = state.get("waiting") or {}
    own_secret = secret_name(str((pod.get("metadata") or {}).get("name", "")))
    if waiting.get("reason") == "CreateContainerConfigError" and own_secret in str(waiting.get("message", "")):
        # The runtime creates the replica's Secret just after its pod (it is owned by the pod, so it needs the
        # pod's uid): a kubelet that looked in between retries, so this is no reason to give up.
        return PodState(scheduled=scheduled, terminating=terminating)
    if waiting.get("reason") in NEVER_STARTS:
        return PodState(scheduled=scheduled, never_started=_words(waiting.get("reason"), waiting.get("message")),
                        terminating=terminating)
    return PodState(unschedulable=unschedulable, scheduled=scheduled, terminating=terminating)


def _container_status(status: dict[str, Any]) -> dict[str, Any]:
    for container in status.get("containerStatuses") or []:
        if container.get("name") == CONTAINER:
            return dict(container)
    return {}


def _words(reason: Any, message: Any) -> str:
    return ": ".join(str(part) for part in (reason, message) if part)
