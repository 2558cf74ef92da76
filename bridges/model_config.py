"""A model spec as Triton's model configuration (``GET /v2/models/{name}/config``, gRPC ``ModelConfig``).

The JSON is what Triton's REST API answers (its ``model_config.proto`` fields, snake_case, enums by
name); the gRPC bridge parses the same document into its ``ModelConfig`` message, so both say the same.
docs/MODELS.md ("As a Triton model configuration") maps each field.
"""

from __future__ import annotations

from typing import Any

from model_manager.spec import ModelSpec, TensorSpec

PLATFORM = "inferoxy"  # what model metadata says too
# Inferoxy's BYTES is Triton's STRING type in a model configuration.
_DATA_TYPE = {"BYTES": "TYPE_STRING"}


def data_type(datatype: str) -> str:
    """``FP32`` -> ``TYPE_FP32``: the configuration's name for a protocol datatype."""
    return _DATA_TYPE.get(datatype, f"TYPE_{datatype}")


def _tensor(tensor: TensorSpec, ragged: bool, *, is_input: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": tensor.name, "data_type": data_type(tensor.datatype), "dims": list(tensor.shape)}
    if is_input and ragged:
        entry["allow_ragged_batch"] = True
    return entry


def _microseconds(seconds: float) -> int:
    return int(round(seconds * 1_000_000))


def triton_config(spec: ModelSpec, *, max_queue_size: int, request_timeout_s: float) -> dict[str, Any]:
    """The spec as a Triton model configuration. ``max_queue_size`` and ``request_timeout_s`` are the server's
    settings that apply when the spec sets none."""
    queue_policy = {
        # Triton's REJECT: a request past its deadline is answered with an error, never run late.
        "timeout_action": "REJECT",
        "default_timeout_microseconds": _microseconds(min(spec.default_timeout_s or request_timeout_s,
                                                          request_timeout_s)),
        "allow_timeout_override": True,
        "max_queue_size": spec.max_queue_size or max_queue_size,
    }
    delay_us = _microseconds(spec.max_batch_delay_ms / 1000)
    config: dict[str, Any] = {
        "name": spec.name,
        "platform": PLATFORM,
        "backend": PLATFORM,
        "version_policy": {"specific": {"versions": [int(spec.version)]}} if spec.version.isdigit() else {},
        "max_batch_size": spec.max_batch_size,
        "input": [_tensor(t, spec.ragged_batches, is_input=True) for t in spec.inputs],
        "output": [_tensor(t, spec.ragged_batches, is_input=False) for t in spec.outputs],
        # One group: the replicas, on GPUs or CPUs; count is the most the autoscaler runs (parameters say the least).
        "instance_group": [{
            "name": spec.name,
            "kind": "KIND_GPU" if spec.run_on_gpu else "KIND_CPU",
            "count": spec.max_replicas,
        }],
        "parameters": {
            "min_replicas": {"string_value": str(spec.min_replicas)},
            "max_replicas": {"string_value": str(spec.max_replicas)},
            "version": {"string_value": spec.version},
        },
    }
    if not config["version_policy"]:
        del config["version_policy"]  # a version that is not a number has no Triton policy
    if spec.stateful:
        # A batch holds at most one request of each session and mixes sessions: Triton's "oldest" strategy.
        config["sequence_batching"] = {
            "max_sequence_idle_microseconds": _microseconds(spec.session_idle_timeout_s),
            "oldest": {
                "max_candidate_sequences": spec.max_sessions_per_replica * spec.max_replicas,
                "preferred_batch_size": [spec.max_batch_size],
                "max_queue_delay_microseconds": delay_us,
            },
        }
    else:
        # The batch manager sends a batch once it is full or its first request waited max_batch_delay_ms.
        config["dynamic_batching"] = {
            "preferred_batch_size": [spec.max_batch_size],
            "max_queue_delay_microseconds": delay_us,
            "default_queue_policy": queue_policy,
        }
    return config
