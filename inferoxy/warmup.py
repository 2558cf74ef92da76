"""Warmup: the spec's sample requests, run in the replica after ``load()`` and before it says ready.

Each request of ``spec["warmup"]`` (model_manager/spec.py ``WarmupRequest``) is made here, never sent over the
network: zeros, random values or a ``.npy`` file, then answered ``count`` times by ``inferoxy.batches.answer_batch``,
the very path a real batch takes, so the model sees exactly what a batch of that shape would give it (and its
outputs are checked the same way). The first failure ends the warmup with a ``WarmupError`` whose text names the
request; the runtime then exits as when ``load()`` fails, so the model's status shows it.

Runs inside model images: standard library, numpy and ``inferoxy.{wire,protocol,model,batches}`` only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from inferoxy import protocol, wire
from inferoxy.batches import SessionStore, answer_batch
from inferoxy.model import Model, StatefulModel

log = logging.getLogger("inferoxy.runtime")

# The spec's datatypes (Open Inference Protocol names) as numpy dtypes; model_manager/spec.py's DATATYPE_TO_DTYPE,
# which a replica cannot import (it needs pydantic). BYTES has no fixed-size dtype: the spec refuses it in warmup.
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
             "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
             "FP32": "float32", "FP64": "float64"}
# Random integers stay small (0..RANDOM_INT_END-1): valid as indices or token ids for most models.
RANDOM_INT_END = 10
# Batch ids of warmup batches are negative, so a log line can never be confused with a real batch's.
FIRST_BATCH_ID = -1


class WarmupError(Exception):
    """A warmup request could not be made or answered; the text says which and why."""


def make_input(spec: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    """One warmup tensor as ``spec`` (a ``WarmupInput`` as JSON) describes it."""
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    dtype = DATATYPES.get(str(datatype))
    if dtype is None or not isinstance(shape, list) or not shape or not all(
            isinstance(d, int) and d >= 1 for d in shape):
        raise WarmupError(f"input {name!r}: needs a datatype of {sorted(DATATYPES)} and a shape of sizes >= 1, "
                          f"got {datatype!r} {shape!r}")
    fill = spec.get("fill", "zeros")
    if fill == "zeros":
        return np.zeros(shape, dtype=dtype)
    if fill == "random":
        if dtype == "bool":
            return rng.integers(0, 2, size=shape).astype(bool)
        if dtype.startswith("float"):
            return rng.random(size=shape).astype(dtype)
        return rng.integers(0, RANDOM_INT_END, size=shape).astype(dtype)
    if fill == "file":
        path = spec.get("file")
        try:
            array = np.load(str(path), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise WarmupError(f"input {name!r}: cannot read {path!r}: {exc}") from None
        if not isinstance(array, np.ndarray) or array.dtype != np.dtype(dtype) or list(array.shape) != shape:
            found = f"{array.dtype}{list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
            raise WarmupError(f"input {name!r}: {path} holds {found}, the spec says {dtype}{shape}")
        return array
    raise WarmupError(f"input {name!r}: fill must be zeros, random or file, got {fill!r}")


def run_warmup(model: Model, replica_id: str, requests: Sequence[Mapping[str, Any]],
               with_params: bool = False) -> float:
    """Answer every warmup request ``count`` times; the seconds it took. Raises WarmupError on the first failure."""
    started = time.perf_counter()
    rng = np.random.default_rng(0)  # the same values on every replica: a failure reproduces
    sessions = SessionStore(model) if isinstance(model, StatefulModel) else None
    batch_id = FIRST_BATCH_ID
    for index, request in enumerate(requests):
        inputs = request.get("inputs") or []
        try:
            tensors = [(str(spec.get("name")), make_input(spec, rng)) for spec in inputs]
        except WarmupError as exc:
            raise WarmupError(f"warmup request {index}: {exc}") from None
        item: dict[str, Any] = {"id": 0, "n": len(tensors)}
        for run in range(int(request.get("count", 1))):
            if sessions is not None:
                # One whole session per run: started and ended, so no state outlives the warmup.
                item.update(session=f"warmup-{index}-{run}", start=True, end=True)
            header = {"t": protocol.BATCH, "batch": batch_id, "items": [item],
                      "ragged": model.spec.get("ragged_batches") is True}
            answer = answer_batch(model, replica_id, header, tensors, sessions, with_params)
            _check(answer, index, run)
            batch_id -= 1
    return time.perf_counter() - started


def _check(answer: Sequence[wire.Frame], index: int, run: int) -> None:
    reply = wire.unpack_header(answer[0])
    if reply.get("t") == protocol.FAILED:
        raise WarmupError(f"warmup request {index} (run {run + 1}) failed: {reply.get('message')}")
    for item in reply.get("items") or ():
        if item.get("code"):
            raise WarmupError(f"warmup request {index} (run {run + 1}) failed: {item.get('message')}")
