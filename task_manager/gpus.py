"""Which GPUs this machine has, and which replica runs on which.

The inventory comes from configuration (``INFEROXY_GPUS``-style "0,1,3"), else from
``nvidia-smi``, else it is empty. ``GpuAllocator`` is pure bookkeeping: it never touches a device,
so the task manager can ask it before starting a replica and tell it when a replica ends.

Placement rules (the design's "one replica per GPU per model"):
- two replicas of one model never share a GPU, since a second copy on the same device adds memory
  pressure and no throughput;
- replicas of different models share a GPU only when ``allow_sharing`` is on;
- among the GPUs that qualify, the least loaded one is taken (ties: inventory order), so load spreads.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

# What NVIDIA_VISIBLE_DEVICES and Docker's device requests accept: an index ("0") or a UUID ("GPU-5f3c...").
_GPU_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:_\-]*$")
_NONE_WORDS = {"", "none"}


def parse_gpus(text: str) -> list[str]:
    """Parse "0,1,3" (indices or UUIDs, comma-separated). "" and "none" mean no GPU."""
    if text.strip().lower() in _NONE_WORDS:
        return []
    gpus = [part.strip() for part in text.split(",")]
    for gpu in gpus:
        if not _GPU_ID.match(gpu):
            raise ValueError(f"GPU list {text!r}: {gpu!r} is not a GPU index or UUID")
    duplicates = sorted({gpu for gpu in gpus if gpus.count(gpu) > 1})
    if duplicates:
        raise ValueError(f"GPU list {text!r} names {', '.join(duplicates)} more than once")
    return gpus


def detect_gpus(nvidia_smi: str = "nvidia-smi", timeout_s: float = 10.0) -> list[str]:
    """The indices ``nvidia-smi`` reports, or [] when it is absent or fails (a warning says why)."""
    binary = shutil.which(nvidia_smi)
    if binary is None:
        return []
    try:
        done = subprocess.run(
            [binary, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi could not list GPUs (%s); running without GPUs", exc)
        return []
    if done.returncode != 0:
        log.warning("nvidia-smi exited with status %d (%s); running without GPUs",
                    done.returncode, done.stderr.strip()[-300:])
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def gpu_inventory(configured: str | None) -> list[str]:
    """The GPUs to place replicas on: ``configured`` when set (see parse_gpus), else detected."""
    if configured is not None:
        return parse_gpus(configured)
    return detect_gpus()


@dataclass(frozen=True)
class GpuAssignment:
    gpu: str
    model_key: str
    replica_id: str


class GpuAllocator:
    """Assigns GPUs to (model key, replica id) pairs under the placement rules above."""

    def __init__(self, gpus: Iterable[str], *, allow_sharing: bool = False) -> None:
        self._gpus: tuple[str, ...] = tuple(gpus)
        if len(set(self._gpus)) != len(self._gpus):
            raise ValueError(f"GPU inventory {list(self._gpus)} names a GPU more than once")
        self.allow_sharing = allow_sharing
        self._by_replica: dict[str, GpuAssignment] = {}
        self._by_gpu: dict[str, dict[str, GpuAssignment]] = {gpu: {} for gpu in self._gpus}

    @property
    def gpus(self) -> tuple[str, ...]:
        return self._gpus

    def allocate(self, model_key: str, replica_id: str) -> str | None:
        """A GPU for this replica, or None when none qualifies (the caller reports it).

        Asking again for a replica that already holds a GPU returns that GPU.
        """
        held = self._by_replica.get(replica_id)
        if held is not None:
            if held.model_key != model_key:
                raise ValueError(
                    f"replica {replica_id} already holds GPU {held.gpu} for model {held.model_key}, "
                    f"not {model_key}"
                )
            return held.gpu
        candidates = self.eligible(model_key)
        if not candidates:
            return None
        # Least loaded first; min() keeps inventory order among equals.
        gpu = min(candidates, key=lambda g: len(self._by_gpu[g]))
        assignment = GpuAssignment(gpu, model_key, replica_id)
        self._by_replica[replica_id] = assignment
        self._by_gpu[gpu][replica_id] = assignment
        return gpu

    def release(self, replica_id: str) -> str | None:
        """Free the replica's GPU (when its replica ends); returns it. Unknown ids are ignored."""
        assignment = self._by_replica.pop(replica_id, None)
        if assignment is None:
            return None
        del self._by_gpu[assignment.gpu][replica_id]
        return assignment.gpu

    def eligible(self, model_key: str) -> list[str]:
        """The GPUs a new replica of ``model_key`` could take now, in inventory order."""
        return [gpu for gpu in self._gpus if self._fits(gpu, model_key)]

    def gpu_of(self, replica_id: str) -> str | None:
        held = self._by_replica.get(replica_id)
        return held.gpu if held else None

    def replicas_on(self, gpu: str) -> Sequence[GpuAssignment]:
        """Who runs on ``gpu`` (for status pages and logs)."""
        if gpu not in self._by_gpu:
            raise KeyError(f"unknown GPU {gpu!r}; this machine has {list(self._gpus)}")
        return tuple(self._by_gpu[gpu].values())

    def _fits(self, gpu: str, model_key: str) -> bool:
        occupants = self._by_gpu[gpu].values()
        if any(a.model_key == model_key for a in occupants):
            return False
        return self.allow_sharing or not occupants
