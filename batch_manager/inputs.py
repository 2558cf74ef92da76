"""Whether a request's tensors can go to a model, and what a request adds to a batch header.

Stateless checks on the request path: they read tensor descriptions only, never array bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from batch_manager.actions import Request
from batch_manager.messages import TensorMeta
from batch_manager.state import Signature
from inferoxy.wire import pack_header
from model_manager.spec import DATATYPE_TO_DTYPE, ModelSpec

# Upper bounds of what a batch header spends besides its items' tensor descriptions: its fixed keys and
# values (``t``, ``batch``, ``ragged``, map and list headers), and each item's entry (``id``, ``n``; a
# session's ``session``, ``start``, ``end`` plus its id).
BATCH_HEADER_FIXED_BYTES = 160
ITEM_HEADER_BYTES = 32
SESSION_ITEM_HEADER_BYTES = 48
# Replica ids are the task manager's (at most 63 characters); a longer one only makes its batches smaller.
MAX_REPLICA_ID_BYTES = 64


def header_room(max_header_bytes: int, model: str, version: str, replica_id_bytes: int) -> int:
    """How many bytes of a batch header its items may take: the bus's limit less the fixed part."""
    fixed = BATCH_HEADER_FIXED_BYTES + len(model.encode()) + len(version.encode()) + replica_id_bytes
    return max_header_bytes - fixed


def item_header_bytes(request: Request) -> int:
    """At most how many bytes ``request`` adds to a batch header: its entry in ``items`` and its tensor
    descriptions and parameters, bounded by the size of the ``infer`` header they came in (measured once
    otherwise). The batch closes before a request whose share no longer fits, so many requests with large
    parameters make smaller batches, never a header over the bus's limit."""
    described = request.header_bytes or len(pack_header({"tensors": request.metas, "params": request.params.passed}))
    session = request.params.session
    if session is None:
        return described + ITEM_HEADER_BYTES
    return described + SESSION_ITEM_HEADER_BYTES + len(str(session.id).encode())


def signature(metas: Sequence[TensorMeta], ragged: bool) -> Signature:
    if len(metas) == 1 and not ragged:  # the common case, on the request path: no generator
        meta = metas[0]
        return ((meta["name"], meta["dtype"], tuple(meta["shape"][1:])),)
    if ragged:
        # Items travel as a list per input: only names, dtypes and ranks must agree.
        return tuple((meta["name"], meta["dtype"], (-1,) * (len(meta["shape"]) - 1)) for meta in metas)
    return tuple((meta["name"], meta["dtype"], tuple(meta["shape"][1:])) for meta in metas)


def check_inputs(spec: ModelSpec, request: Request) -> tuple[int, Signature] | str:
    """(rows, signature) of a request, or why it cannot go to ``spec``'s model.

    Puts the request's tensors in name order, so every request of a group lists them alike and a
    replica may concatenate them by position.
    """
    metas = request.metas
    if not metas:
        return "a request needs at least one tensor"
    if len(metas) != len(request.frames):
        return f"{len(metas)} tensors described but {len(request.frames)} frames given"
    if len(metas) > 1:
        names = [meta["name"] for meta in metas]
        if any(a >= b for a, b in zip(names[:-1], names[1:], strict=True)):
            if len(set(names)) != len(names):
                return f"tensor names must be unique, got {names}"
            order = sorted(range(len(metas)), key=names.__getitem__)
            request.metas = metas = [metas[i] for i in order]
            request.frames = [request.frames[i] for i in order]
    rows = -1
    for meta in metas:
        shape = meta["shape"]
        if not shape or shape[0] < 1:
            return f"tensor {meta['name']!r} has shape {shape}; its leading (batch) dimension must be at least 1"
        if rows == -1:
            rows = shape[0]
        elif shape[0] != rows:
            return f"tensors disagree on the batch dimension: {[meta['shape'][0] for meta in metas]}"
    if spec.inputs:
        problem = match_spec(spec, metas)
        if problem:
            return problem
    return rows, signature(metas, spec.ragged_batches)


def match_spec(spec: ModelSpec, metas: Sequence[TensorMeta]) -> str | None:
    """Why the tensors do not fit the inputs the spec declares (shapes there leave out the batch dimension)."""
    declared = {tensor.name: tensor for tensor in spec.inputs}
    names = {meta["name"] for meta in metas}
    if names != declared.keys():
        return f"inputs are {sorted(declared)}, the request has {sorted(names)}"
    for meta in metas:
        tensor = declared[meta["name"]]
        dtype = DATATYPE_TO_DTYPE.get(tensor.datatype)
        if dtype is not None and meta["dtype"] != dtype:
            return f"input {tensor.name!r} is {dtype}, the request sent {meta['dtype']}"
        dims = meta["shape"][1:]
        if len(dims) != len(tensor.shape) or any(
            want not in (-1, got) for want, got in zip(tensor.shape, dims, strict=True)
        ):
            declared_shape = ", ".join(map(str, ["batch", *tensor.shape]))
            return f"input {tensor.name!r} has shape [{declared_shape}], the request sent {meta['shape']}"
    return None
