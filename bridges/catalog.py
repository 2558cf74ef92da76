"""What a bridge knows of the model registry: every model version's spec and input rules, and its status.

The gateway (bridges/gateway.py) follows the registry in Redis and hands each snapshot to ``apply``;
requests are then resolved to a model version without a round trip, with the checks its spec implies
worked out once per snapshot (``InputRules``). Readiness is read from the status the task manager
writes to Redis, so any bridge on any machine reports the same.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from bridges.errors import RequestError
from bridges.model_config import PLATFORM
from bridges.validation import InputRules, check_name
from inferoxy.protocol import ErrorCode
from model_manager.spec import ModelSpec, ModelStatus, TensorSpec, version_order
from model_manager.store import Registry, SpecStore

# Serving states in which a model takes requests (model_manager.spec.ModelStatus). ``idle`` (scaled to zero) does:
# its next request starts a replica and is answered, and a load balancer that skipped it would never send that one.
_SERVING_STATES = ("ready", "degraded", "idle")


class ResolvedModel(NamedTuple):
    spec: ModelSpec
    rules: InputRules


class Readiness(NamedTuple):
    """Whether a model version takes requests now, and if not, why (for a 503's message)."""

    ready: bool
    reason: str
    state: str = "unknown"
    """The task manager's serving state (``ModelStatus.state``), or ``unknown`` when none is recorded."""
    status: ModelStatus | None = None
    """The status record it was read from (replicas ready, the autoscaler's target), if there is one."""


class Catalog:
    """The latest registry snapshot, resolved for requests."""

    def __init__(self) -> None:
        self.registry: Registry | None = None
        self._models: dict[str, ResolvedModel] = {}

    def apply(self, registry: Registry) -> None:
        self._models = {spec.key: ResolvedModel(spec, InputRules(spec)) for spec in registry}
        self.registry = registry

    def resolve(self, name: str, version: str | None = None) -> ResolvedModel:
        """The model a request for ``name`` (at ``version``, else the default) goes to."""
        check_name(name, "the model name")
        if version is not None:
            check_name(version, "the model version")
        registry = self.registry
        if registry is None:
            raise RequestError(ErrorCode.NOT_READY, "the model registry has not been read yet; retry shortly")
        spec = registry.get(name, version)
        if spec is None:
            versions = self.versions(name)
            if version is not None and versions:
                raise RequestError(
                    ErrorCode.UNKNOWN_MODEL,
                    f"model {name!r} has no version {version!r}; it has {', '.join(versions)}",
                )
            raise RequestError(ErrorCode.UNKNOWN_MODEL, f"unknown model {name!r}")
        return self._models[spec.key]

    async def readiness(self, store: SpecStore | None, name: str, version: str | None = None) -> Readiness:
        """A model version's readiness, from the status the task manager writes to Redis (``store``).

        Raises RequestError (``unknown_model``) when there is no such model or version."""
        spec = self.resolve(name, version).spec
        if store is None:
            return Readiness(False, "the bridge is not connected to the model registry")
        try:
            status = await store.status(spec.name, spec.version)
        except Exception as exc:  # Redis unreachable or a garbled status: not ready, and say why
            return Readiness(False, f"the serving status of {spec.key} cannot be read: {type(exc).__name__}")
        if status is None:
            # Statuses expire unless the task manager keeps writing them: none means it is not (or no longer) running.
            return Readiness(False, f"model {spec.key} has no serving status (no task manager has reported it "
                                    "recently)")
        if status.state in _SERVING_STATES:
            return Readiness(True, f"model {spec.key} is {status.state}", status.state, status)
        detail = f": {status.reason}" if status.reason else ""
        return Readiness(False, f"model {spec.key} is {status.state}{detail}", status.state, status)

    def versions(self, name: str) -> list[str]:
        """Every registered version of ``name``, in version order."""
        if self.registry is None:
            return []
        found = [spec.version for spec in self.registry if spec.name == name]
        return sorted(found, key=version_order)


def metadata(spec: ModelSpec, versions: list[str]) -> dict[str, Any]:
    """Model metadata as the Open Inference Protocol and Triton give it: -1 leads for the batch dimension.

    The spec's ``description``, ``framework`` and ``labels`` follow when set (the protocol allows extra fields)."""
    document: dict[str, Any] = {
        "name": spec.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [_tensor_metadata(t) for t in spec.inputs],
        "outputs": [_tensor_metadata(t) for t in spec.outputs],
    }
    for field, value in (("description", spec.description), ("framework", spec.framework), ("labels", spec.labels)):
        if value:
            document[field] = value
    return document


def _tensor_metadata(tensor: TensorSpec) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": [-1, *tensor.shape]}
