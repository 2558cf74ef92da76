"""ONNX models with no user code: the Model a replica of a ``format: onnx`` spec runs.

The task manager starts such a replica with ``INFEROXY_MODEL_CLASS=inferoxy.onnx_model:OnnxModel`` and the
spec in ``INFEROXY_MODEL_SPEC`` (``Model.spec``). ``load()`` fetches ``model_uri`` (a local path, or an
``s3://``/``https://`` URI copied once into a cache), opens an ONNX Runtime session, and checks the spec's
declared inputs and outputs against the graph; a mismatch fails ``load()``, so the replica exits with the
reason as its last log line and the model's status says ``failed`` with it (docs/MODELS.md, "ONNX models").

The batch axis is the graph's first axis: every input and output must have a dynamic first dimension,
and shapes here (as in the spec) leave it out. onnxruntime and fsspec are imported inside ``load()`` only,
so ``inferoxy.runtime`` and this module import without them (the model-base image has neither).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferoxy.model import Model
from inferoxy.warmup import DATATYPES as WARMUP_DATATYPES

# Where fetched model files are kept, in the replica's environment (spec ``env``); one file per URI.
CACHE_DIR_VARIABLE = "INFEROXY_MODEL_CACHE_DIR"
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "inferoxy-models"

# ONNX Runtime's element types (NodeArg.type) and the wire datatypes they travel as (model_manager/spec.py).
# Strings are left out: ONNX Runtime takes them as object arrays, which the wire does not carry.
DATATYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
}
# The wire dtype of each spec datatype (the one table a replica has: inferoxy/warmup.py), little-endian as on the bus.
NUMPY_DTYPES = {datatype: np.dtype(name).newbyteorder("<") for datatype, name in WARMUP_DATATYPES.items()}
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


class OnnxModelError(Exception):
    """The ONNX model cannot be served as the spec describes it (the reason is the message)."""


@dataclass(frozen=True)
class Tensor:
    """One input or output as the spec spells it: shape without the batch axis, -1 for a dynamic axis."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_spec(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


# ---------------------------------------------------------------------------------------------
# Fetching the file.


def cache_path(uri: str, cache_dir: Path) -> Path:
    """Where ``uri``'s file is cached: named by the URI's digest, so each URI is fetched once."""
    return cache_dir / f"{hashlib.sha256(uri.encode()).hexdigest()[:32]}.onnx"


def is_remote(uri: str) -> bool:
    scheme, sep, _ = uri.partition("://")
    return bool(sep) and scheme != "file"


def fetch(uri: str, cache_dir: Path) -> Path:
    """The local file for ``uri``: itself when it is a path, else its cached copy (fetched when absent).

    The copy is written beside its final name and renamed into place, so replicas starting together never
    read half a file: the loser of a race renames the same bytes over the winner's.
    """
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://"))
        if not path.is_file():
            raise OnnxModelError(f"model_uri {uri!r}: no such file (from {Path.cwd()})")
        return path
    target = cache_path(uri, cache_dir)
    if target.is_file():
        return target
    import fsspec  # only replicas that fetch need it

    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=cache_dir, prefix=target.name, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, fsspec.open(uri, "rb") as source:
            while chunk := source.read(1 << 20):
                out.write(chunk)
        os.replace(partial, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        if isinstance(exc, Exception):
            raise OnnxModelError(f"model_uri {uri!r}: cannot fetch it: {type(exc).__name__}: {exc}") from exc
        raise
    return target


# ---------------------------------------------------------------------------------------------
# The graph's tensors and the spec's.


def graph_tensors(args: Sequence[Any], kind: str) -> list[Tensor]:
    """``session.get_inputs()``/``get_outputs()`` as spec tensors: batch axis dropped, named axes -> -1."""
    tensors = []
    for arg in args:
        datatype = DATATYPES.get(arg.type)
        if datatype is None:
            raise OnnxModelError(f"{kind} {arg.name!r} is a {arg.type}; Inferoxy serves numeric and bool tensors")
        shape = list(arg.shape or [])
        if not shape:
            raise OnnxModelError(f"{kind} {arg.name!r} has no axes; its first axis must be the batch (rows)")
        if isinstance(shape[0], int) and shape[0] > 0:
            raise OnnxModelError(f"{kind} {arg.name!r} has a fixed first axis of {shape[0]}; Inferoxy batches "
                                 "rows along the first axis, so it must be dynamic")
        tensors.append(Tensor(arg.name, datatype,
                              tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape[1:])))
    return tensors


def declared_tensors(declared: Sequence[Mapping[str, Any]]) -> list[Tensor]:
    return [Tensor(str(t["name"]), str(t["datatype"]), tuple(int(d) for d in t["shape"])) for t in declared]


def mismatches(kind: str, declared: Sequence[Tensor], graph: Sequence[Tensor], *, all_needed: bool) -> list[str]:
    """What in ``declared`` the graph disagrees with. ``all_needed``: every graph tensor must be declared
    (inputs: the graph cannot run without them); outputs may be a subset."""
    found = {t.name: t for t in graph}
    problems = []
    for tensor in declared:
        real = found.get(tensor.name)
        if real is None:
            problems.append(f"{kind} {tensor.name!r} is declared but the graph has no such {kind} "
                            f"(it has {sorted(found)})")
            continue
        if tensor.datatype != real.datatype:
            problems.append(f"{kind} {tensor.name!r} is declared {tensor.datatype} but the graph's is {real.datatype}")
        if not _shapes_agree(tensor.shape, real.shape):
            problems.append(f"{kind} {tensor.name!r} is declared with shape {list(tensor.shape)} but the graph's "
                            f"is {list(real.shape)} (batch axis left out, -1 dynamic)")
    if all_needed:
        names = {t.name for t in declared}
        problems += [f"the graph's {kind} {t.name!r} is not declared" for t in graph if t.name not in names]
    return problems


def _shapes_agree(declared: Sequence[int], graph: Sequence[int]) -> bool:
    # A dynamic graph axis takes any declared size; a fixed one must be declared as that size.
    return len(declared) == len(graph) and all(g == -1 or d == g for d, g in zip(declared, graph, strict=True))


# ---------------------------------------------------------------------------------------------
# Session options.


def has_gpu(spec: Mapping[str, Any], environ: Mapping[str, str]) -> bool:
    """The replica was given a GPU: the spec asks for one and the task manager set the visible device."""
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return bool(spec.get("run_on_gpu")) and visible not in ("", "-1")


def choose_providers(spec: Mapping[str, Any], environ: Mapping[str, str], available: Sequence[str]) -> list[str]:
    """The spec's providers, else CUDA when the replica has a GPU, else CPU; each must be installed."""
    wanted = list(spec.get("execution_providers") or [])
    if not wanted:
        wanted = [CUDA_PROVIDER, CPU_PROVIDER] if has_gpu(spec, environ) else [CPU_PROVIDER]
    missing = [p for p in wanted if p not in available]
    if missing:
        # A GPU replica on a CPU-only onnxruntime fails rather than hold a GPU it would leave idle.
        hint = (" (install onnxruntime-gpu in the image, or set execution_providers: [CPUExecutionProvider])"
                if CUDA_PROVIDER in missing else "")
        raise OnnxModelError(f"execution providers {missing} are not in this onnxruntime (it has "
                             f"{list(available)}){hint}")
    return wanted


def intra_op_threads(spec: Mapping[str, Any]) -> int:
    """Threads for one operator: the replica's CPU share (``resources.cpus``), else the machine's cores."""
    cpus = (spec.get("resources") or {}).get("cpus")
    if cpus:
        return max(1, math.floor(float(cpus)))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------
# The model.


class OnnxModel(Model):
    """Serves the ONNX graph at ``spec["model_uri"]`` with ONNX Runtime."""

    def __init__(self) -> None:
        self.session: Any = None
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.providers: list[str] = []
        self.path: Path | None = None

    def load(self) -> None:
        spec = self.spec
        uri = spec.get("model_uri")
        if not uri:
            raise OnnxModelError("the spec has no model_uri (INFEROXY_MODEL_SPEC missing or not an ONNX model)")
        cache_dir = Path(os.environ.get(CACHE_DIR_VARIABLE) or DEFAULT_CACHE_DIR)
        self.path = fetch(str(uri), cache_dir)

        import onnxruntime as ort  # a replica of a Python model never needs it

        self.providers = choose_providers(spec, os.environ, ort.get_available_providers())
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads(spec)
        # Batches reach predict one at a time; parallel branches would only contend with the intra-op pool.
        options.inter_op_num_threads = 1
        # Idle pool threads would spin after every batch, taking the CPU the replica shares with the proxy
        # (and other replicas) between batches; they sleep instead (docs/PERFORMANCE.md, "ONNX digits").
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types for a file it cannot read
            raise OnnxModelError(f"model_uri {uri!r}: ONNX Runtime cannot load it: {exc}") from exc

        graph_inputs = graph_tensors(self.session.get_inputs(), "input")
        graph_outputs = graph_tensors(self.session.get_outputs(), "output")
        declared_inputs = declared_tensors(spec.get("inputs") or [])
        declared_outputs = declared_tensors(spec.get("outputs") or [])
        problems = []
        if declared_inputs:
            problems += mismatches("input", declared_inputs, graph_inputs, all_needed=True)
        if declared_outputs:
            problems += mismatches("output", declared_outputs, graph_outputs, all_needed=False)
        if problems:
            raise OnnxModelError(f"the spec disagrees with {uri}: " + "; ".join(problems))
        self.inputs = graph_inputs
        # Declared outputs are the ones served (a subset of the graph's); none declared: all of them.
        served = {t.name for t in declared_outputs}
        self.outputs = [t for t in graph_outputs if not served or t.name in served]

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for tensor in self.inputs:
            if tensor.name not in batch:
                raise ValueError(f"input {tensor.name!r} is missing (the model takes {[t.name for t in self.inputs]})")
            array = batch[tensor.name]
            expected = NUMPY_DTYPES[tensor.datatype]
            if array.dtype != expected:
                raise ValueError(f"input {tensor.name!r} must be {tensor.datatype}, got {array.dtype}")
            feed[tensor.name] = np.ascontiguousarray(array)
        names = [t.name for t in self.outputs]
        results = self.session.run(names, feed)
        # Native byte order, as the wire expects (ONNX Runtime's arrays already are on every platform it runs).
        return {name: np.asarray(result) for name, result in zip(names, results, strict=True)}
