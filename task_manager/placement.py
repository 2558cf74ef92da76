"""Where a replica runs and what it is given: a GPU or a CPU slot, and its environment and labels.

Local runtimes (process, docker) place here: a ``run_on_gpu`` replica gets a GPU from the
``GpuAllocator`` (one per model per GPU unless sharing is on), any other replica one of
``cpu_slots``. A cluster runtime would place for itself; the task manager only asks ``place``.
"""

from __future__ import annotations

from inferoxy import curve
from inferoxy.runtime import MODEL_SPEC_VARIABLE
from inferoxy.settings import Settings
from model_manager.spec import ONNX_MODEL_CLASS
from task_manager.gpus import GpuAllocator
from task_manager.replicas import Replica
from task_manager.runtimes.base import ReplicaPlan, replica_labels


class Placement:
    def __init__(self, settings: Settings, gpus: GpuAllocator | None = None) -> None:
        self.cpu_slots = settings.cpu_slots
        # The inventory is read when the task manager runs (nvidia-smi may take seconds).
        self.gpus = gpus or GpuAllocator([], allow_sharing=settings.gpu_sharing)

    def place(self, model_key: str, run_on_gpu: bool, new_id: str, *, on_cpu: int) -> tuple[str | None, str | None]:
        """(GPU or None, None) when the replica fits; (None, why not) when it does not.

        ``on_cpu``: replicas holding a CPU slot now (draining ones hold theirs until gone)."""
        if run_on_gpu:
            gpu = self.gpus.allocate(model_key, new_id)
            if gpu is not None:
                return gpu, None
            if not self.gpus.gpus:
                return None, "it runs on a GPU and this machine has none (INFEROXY_GPUS, nvidia-smi)"
            sharing = "" if self.gpus.allow_sharing else " or by another model (INFEROXY_GPU_SHARING is off)"
            return None, (f"no GPU free: each of {', '.join(self.gpus.gpus)} is taken by a replica of this "
                          f"model{sharing}")
        if on_cpu >= self.cpu_slots:
            return None, f"all {self.cpu_slots} CPU slots are taken (INFEROXY_CPU_SLOTS)"
        return None, None

    def release(self, replica_id: str) -> None:
        self.gpus.release(replica_id)


def replica_plan(settings: Settings, replica: Replica, keys: curve.ReplicaKeys | None) -> ReplicaPlan:
    """What the runtime starts for ``replica``: the variables docs/PROTOCOL.md lists, and the labels that
    let a later run find (and sweep) what this instance started."""
    spec = replica.spec
    if spec.format == "onnx" and not spec.image:
        # An ONNX model needs no code of its own: container runtimes run it from the ONNX image.
        spec = spec.model_copy(update={"image": settings.onnx_image})
    env = {
        "INFEROXY_REPLICA_URL": settings.replica_url,
        "INFEROXY_REPLICA_ID": replica.id,
        "INFEROXY_MODEL_NAME": spec.name,
        "INFEROXY_MODEL_VERSION": spec.version,
        "INFEROXY_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
        "INFEROXY_HEARTBEAT_LIVENESS": str(settings.heartbeat_liveness),
        "INFEROXY_LOG_LEVEL": settings.log_level,
        "INFEROXY_LOG_FORMAT": settings.log_format,
    }
    if spec.model_class:
        env["INFEROXY_MODEL_CLASS"] = spec.model_class
    elif spec.format == "onnx":
        env["INFEROXY_MODEL_CLASS"] = ONNX_MODEL_CLASS
    # The spec as the replica sees it (Model.spec): ONNX models, warmup and declared tensors are read from it.
    # Not env (already the replica's environment) nor command (already how it was started).
    env[MODEL_SPEC_VARIABLE] = spec.model_dump_json(exclude={"env", "command"})
    if keys is not None:
        env.update(keys.issue(replica.id))
    labels = replica_labels(settings.instance, spec, replica.id)
    return ReplicaPlan(replica_id=replica.id, spec=spec, env=env, gpu=replica.gpu, labels=labels)
