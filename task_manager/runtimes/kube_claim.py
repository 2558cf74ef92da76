"""Who owns an instance name in a namespace: a claim Secret naming the proxy pod that holds it.

Two task managers with one ``INFEROXY_INSTANCE`` in one namespace would delete each other's replica pods as
leftovers (a rolling update of the proxy's Deployment starts the new pod while the old one still runs). So,
as the docker runtime does with a volume (``ownership.py``), the kubernetes runtime claims the name before it
sweeps: it creates the Secret ``inferoxy-claim-<instance>``, owned by its own pod and naming it. A claim whose
pod is gone, finished, being deleted or replaced by another of the same name (another uid) is stale and taken
over; a claim by a live pod other than ours is refused (``InstanceTaken``). The same pod after a restart of
its container (same uid) holds its own claim. The cluster deletes the claim with its pod (owner reference);
``close`` deletes it earlier.

Only a proxy that knows its own pod (``INFEROXY_KUBE_POD_NAME`` and ``_UID``) can claim: outside a cluster
there is no pod whose liveness another proxy could check, and no claim is made (docs/KUBERNETES.md).
The claim carries no ``inferoxy.instance`` label, so sweeping leftovers never removes it.
"""

from __future__ import annotations

import logging
from typing import Any

from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from task_manager.replicas import sanitize
from task_manager.runtimes.base import InstanceTaken
from task_manager.runtimes.kube_pod import label_value
from task_manager.runtimes.kube_watch import call_json, call_quietly

log = logging.getLogger(__name__)

LABEL_CLAIM = "inferoxy.claim"
ATTEMPTS = 3


def claim_name(instance: str) -> str:
    return f"inferoxy-claim-{sanitize(instance)}"[:253]


def claim(core: CoreV1Api, namespace: str, instance: str, owner: dict[str, Any]) -> str:
    """Claim ``instance`` in ``namespace`` for the pod ``owner`` (an ownerReference); blocking. Returns the claim's
    uid, which ``release`` needs."""
    name = claim_name(instance)
    body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "labels": {LABEL_CLAIM: label_value(instance)},
                         "annotations": {"inferoxy.instance": instance}, "ownerReferences": [owner]}}
    for _ in range(ATTEMPTS):
        try:
            return str(call_json(core.create_namespaced_secret, namespace, body)["metadata"]["uid"])
        except ApiException as exc:
            if exc.status != 409:
                raise
        holder = _holder(core, namespace, name)
        if holder is None:
            continue  # deleted meanwhile: try again
        if holder.get("uid") == owner["uid"]:
            return str(holder["claim_uid"])  # ours: this pod's task manager restarted
        if _alive(core, namespace, holder):
            raise InstanceTaken(
                f"instance {instance!r} is owned by the proxy pod {holder.get('name')!r} in namespace {namespace!r}, "
                "which still runs. Set INFEROXY_INSTANCE to give this proxy a name of its own, or stop that one "
                "first (a Deployment of the proxy wants the Recreate strategy)")
        log.info("instance %r was claimed by pod %s, which is gone; taking it over", instance, holder.get("name"))
        try:
            call_quietly(core.delete_namespaced_secret, name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
    raise InstanceTaken(f"could not claim instance {instance!r} in namespace {namespace!r}: another proxy "
                        "claims it at the same moment")


def release(core: CoreV1Api, namespace: str, instance: str, uid: str) -> None:
    """Delete the claim, if it still is the one this proxy made (``uid``): a later holder's stays."""
    try:
        call_quietly(core.delete_namespaced_secret, claim_name(instance), namespace,
                     body={"preconditions": {"uid": uid}})
    except Exception as exc:  # the cluster deletes it with this pod anyway; a later proxy sees a dead holder
        if not (isinstance(exc, ApiException) and exc.status in (404, 409)):
            log.warning("could not release the claim of instance %r: %s", instance, exc)


def _holder(core: CoreV1Api, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        secret = call_json(core.read_namespaced_secret, name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    metadata = secret.get("metadata") or {}
    for ref in metadata.get("ownerReferences") or []:
        if ref.get("kind") == "Pod":
            return {**ref, "claim_uid": metadata.get("uid")}
    return {}  # a claim without an owner: nobody could be alive behind it


def _alive(core: CoreV1Api, namespace: str, holder: dict[str, Any]) -> bool:
    if not holder.get("name"):
        return False
    try:
        pod = call_json(core.read_namespaced_pod, holder["name"], namespace)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
    return (metadata.get("uid") == holder.get("uid") and not metadata.get("deletionTimestamp")
            and status.get("phase") not in ("Succeeded", "Failed"))
