"""The model spec: everything Inferoxy needs to know to batch for a model and run its replicas."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Open Inference Protocol datatypes and the wire dtype each travels as on the bus.
DATATYPE_TO_DTYPE: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
DTYPE_TO_DATATYPE = {dtype: datatype for datatype, dtype in DATATYPE_TO_DTYPE.items()}

Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                   "FP16", "FP32", "FP64", "BYTES"]

PullPolicy = Literal["if-not-present", "always", "never"]

# How a replica runs the model: "python", a Model subclass (``model_class``, in ``image``); "onnx", an ONNX
# graph (``model_uri``) under ONNX Runtime with no user code (docs/MODELS.md, "ONNX models").
ModelFormat = Literal["python", "onnx"]
# The Model subclass a replica of an ONNX model runs (the replica's INFEROXY_MODEL_CLASS).
ONNX_MODEL_CLASS = "inferoxy.onnx_model:OnnxModel"

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


def version_order(version: str) -> tuple[int, int | str]:
    """The sort key of model versions: numbered ones by number, after any named ones (so the newest is last)."""
    return (1, int(version)) if version.isdigit() else (0, version)


class TensorSpec(BaseModel):
    """One input or output. ``shape`` leaves out the batch dimension; -1 is a free dimension."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    datatype: Datatype
    shape: list[int] = Field(max_length=32)

    @model_validator(mode="after")
    def _dims(self) -> TensorSpec:
        if any(d < -1 for d in self.shape):
            raise ValueError(f"shape {self.shape}: dimensions are sizes >= 0, or -1 for any size")
        return self


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpus: float | None = Field(None, gt=0, description="CPU cores a replica may use.")
    memory: str | None = Field(None, description="Memory limit, as Docker or Kubernetes spell it (e.g. 2g).")


class WarmupInput(BaseModel):
    """One input of a warmup request: a tensor made in the replica, never sent over the network."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    datatype: Datatype
    shape: list[int] = Field(min_length=1, max_length=32, description="The whole shape, batch rows first.")
    fill: Literal["zeros", "random", "file"] = "zeros"
    file: str | None = Field(None, description="fill: file: a .npy file as the replica sees it (a path in its image).")

    @model_validator(mode="after")
    def _fill(self) -> WarmupInput:
        if self.datatype == "BYTES":
            raise ValueError(f"warmup input {self.name!r}: BYTES tensors cannot be made; use a numeric datatype")
        if any(d < 1 for d in self.shape):
            raise ValueError(f"warmup input {self.name!r}: shape {self.shape} must be sizes >= 1 (rows first)")
        if (self.fill == "file") != bool(self.file):
            raise ValueError(f"warmup input {self.name!r}: fill: file needs a file, and only it takes one")
        return self


class WarmupRequest(BaseModel):
    """A sample request each replica runs after ``load()`` and before it says ready (docs/MODELS.md, "Warmup")."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[WarmupInput] = Field(min_length=1, max_length=64)
    count: int = Field(1, ge=1, le=1000, description="Times it is run.")

    @model_validator(mode="after")
    def _rows(self) -> WarmupRequest:
        names = [i.name for i in self.inputs]
        if len(names) != len(set(names)):
            raise ValueError(f"warmup input names must be unique, got {names}")
        if len({i.shape[0] for i in self.inputs}) != 1:
            raise ValueError("every input of a warmup request needs the same number of rows (its first dimension)")
        return self


ServingState = Literal["starting", "ready", "degraded", "failed", "unschedulable", "stopped", "idle"]
# A replica as the status record shows it: the inferoxy_replicas metric's states. ``failed``: being ended
# because it died, fell silent or got stuck (replaced); ``draining``: being stopped on purpose.
ReplicaStateName = Literal["starting", "ready", "draining", "failed"]


class ReplicaStatus(BaseModel):
    """One replica in a model's status record (the dashboard and ``inferoxy status`` show these)."""

    id: str
    state: ReplicaStateName
    gpu: str | None = Field(None, description="The GPU it was placed on; None: a CPU slot.")
    pid: int | None = Field(None, description="Its process id as the replica reported it (in its own namespace).")
    started_at: float = Field(description="Unix time it was started (uptime: the reader's now minus this).")
    ready_at: float | None = Field(None, description="Unix time it first said ready; None while starting.")


class ModelStatus(BaseModel):
    """How a model version is being served, as the task manager last saw it (Redis ``P:status``).

    ``ready``: at least one replica takes batches. ``starting``: none yet, replicas on their
    way. ``degraded``: some replicas ready, some failing. ``failed``: replicas crash-loop or
    cannot start (``reason`` says why: missing image, load error with its last log lines).
    ``unschedulable``: no GPU or CPU slot is free for a replica. ``stopped``: no replica may run
    (``max_replicas`` 0: unloaded).
    ``idle``: scaled to zero (``min_replicas`` 0); the next request starts a replica and waits for it.
    """

    name: str
    version: str
    state: ServingState
    ready_replicas: int = 0
    desired_replicas: int = 0
    reason: str | None = None
    updated_at: float = Field(description="Unix time of this report.")
    restarts: int = Field(0, description="Replicas started to replace one that died, since the task manager started.")
    replicas: list[ReplicaStatus] = Field(default_factory=list)


class ModelSpec(BaseModel):
    """A model as stored in Redis and seeded from models.yaml."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field("1", pattern=NAME_PATTERN)

    # Metadata: shown by GET /v2/models/{name}, `inferoxy models` and the dashboard; nothing reads it to serve.
    description: str | None = Field(None, max_length=4096)
    framework: str | None = Field(None, max_length=64, description="What the model was made with (onnx, pytorch, "
                                  "sklearn, ...); free text.")
    labels: dict[str, str] = Field(default_factory=dict, max_length=64, description="Free key/value metadata.")

    # How a replica starts. The process runtime runs ``command`` if set, else the model
    # runtime with ``model_class``; container runtimes run ``image`` (with ``command`` if set).
    image: str | None = None
    model_class: str | None = Field(None, description="'package.module:ClassName' of the Model subclass.")
    command: list[str] | None = None
    format: ModelFormat = "python"
    model_uri: str | None = Field(None, max_length=2048, description="format: onnx: the .onnx file: a path in the "
                                  "image (a local path for the process runtime), or an s3:// or https:// URI "
                                  "fetched once into a cache when a replica starts.")
    execution_providers: list[str] | None = Field(None, max_length=8, description="format: onnx: ONNX Runtime's "
                                                  "providers in order; unset: CUDA on a GPU replica, else CPU.")
    warmup: list[WarmupRequest] = Field(default_factory=list, max_length=64, description="Sample requests run on "
                                        "every replica after load() and before it is ready.")
    env: dict[str, str] = Field(default_factory=dict)
    pull_policy: PullPolicy | None = Field(
        None, description="When a container runtime pulls the image; unset: INFEROXY_DOCKER_PULL_POLICY (docker) or "
        "INFEROXY_KUBE_PULL_POLICY (kubernetes)."
    )

    # Batching.
    max_batch_size: int = Field(8, ge=1, le=65536, description="Rows per batch, over all requests in it.")
    max_batch_delay_ms: float = Field(2.0, ge=0, le=60_000)
    ragged_batches: bool = Field(False, description="predict takes lists of per-request arrays, so requests of "
                                 "any shapes share a batch (docs/BATCHING.md).")

    # Queueing and deadlines (docs/BATCHING.md).
    max_queue_size: int | None = Field(None, ge=1, description="Requests queued at most; unset: the server's "
                                       "INFEROXY_MAX_QUEUE_SIZE. Beyond it a request is refused `overloaded`.")
    default_timeout_s: float | None = Field(None, gt=0, description="Deadline of requests that name no `timeout` "
                                            "parameter; never longer than INFEROXY_REQUEST_TIMEOUT_S.")

    # Sessions: the spec decides whether a model is stateful, never the client.
    stateful: bool = False
    max_sessions_per_replica: int = Field(16, ge=1)
    session_idle_timeout_s: float = Field(60.0, gt=0)

    # Placement and scaling.
    run_on_gpu: bool = False
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=0, description="The most replicas that may run; 0: none may (the model is "
                              "unloaded: it refuses requests instead of starting a replica for them).")
    resources: Resources = Field(default_factory=Resources)

    # Autoscaling between min_replicas and max_replicas (docs/MODELS.md, "Scaling").
    target_in_flight_per_replica: float | None = Field(
        None, gt=0, description="Batches each replica should hold at once on average; the autoscaler adds replicas "
        "while they hold this many with requests waiting. Unset: each replica's capacity (scale when saturated).")
    scale_up_delay_s: float = Field(2.0, ge=0, le=3600, description="How long replicas stay over the target, with "
                                    "requests waiting, before one more starts.")
    scale_down_delay_s: float = Field(60.0, ge=0, le=86400, description="How long the load must fit in one "
                                      "replica fewer before one is drained (min_replicas 0: idle before none runs).")

    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.format == "onnx":
            if not self.model_uri:
                raise ValueError("format: onnx needs model_uri, the ONNX file to serve")
            if self.model_class or self.command:
                raise ValueError("format: onnx runs Inferoxy's ONNX Runtime model: leave model_class and command unset")
        elif self.model_uri or self.execution_providers:
            raise ValueError("model_uri and execution_providers are for format: onnx")
        if not (self.image or self.model_class or self.command or self.format == "onnx"):
            raise ValueError("a model needs an image, a model_class or a command to start its replicas")
        for key, value in self.labels.items():
            if not 1 <= len(key) <= 63 or len(value) > 256:
                raise ValueError(f"label {key[:63]!r}: keys are 1 to 63 characters, values at most 256")
        declared = {t.name for t in self.inputs}
        for request in self.warmup:
            unknown = sorted({i.name for i in request.inputs} - declared) if declared else []
            if unknown:
                raise ValueError(f"warmup inputs {unknown} are not among the declared inputs {sorted(declared)}")
        for kind, tensors in (("input", self.inputs), ("output", self.outputs)):
            names = [t.name for t in tensors]
            if len(names) != len(set(names)):
                raise ValueError(f"{kind} names must be unique, got {names}")
        return self

    @property
    def key(self) -> str:
        """``name/version``: how the registry and the managers tell model versions apart."""
        return f"{self.name}/{self.version}"
