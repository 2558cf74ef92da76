"""Answering one batch inside a replica: join the items' inputs, call ``predict``, split its outputs.

Pure functions of a model and a decoded batch (no sockets, no threads), used by the runtime's
predict thread (``inferoxy.runtime``). Every answer is a ``result`` or a ``failed`` message;
nothing here raises past ``answer_batch``, since a replica must outlive any batch.

Runs inside model images: standard library, numpy and ``inferoxy.{wire,protocol,model,logs}`` only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from inferoxy import protocol, wire
from inferoxy.logs import REQUEST_IDS, BatchIds
from inferoxy.model import Model, Session, SessionId, StatefulModel
from inferoxy.protocol import ErrorCode

log = logging.getLogger("inferoxy.runtime")


class BatchError(Exception):
    """A batch that cannot be answered with a result; its text goes back to the batch manager."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def gather_inputs(
    header: Mapping[str, Any], tensors: Sequence[tuple[str, np.ndarray]]
) -> tuple[dict[str, Any], list[int]]:
    """Each input concatenated along axis 0 over the batch's items, and each item's row count.

    With ``ragged: true`` in the header each input is instead a list of the items' arrays, which may
    differ in every dimension.
    """
    ragged = header.get("ragged") is True
    items = header.get("items")
    if not isinstance(items, list) or not items:
        raise BatchError(ErrorCode.BAD_INPUT, "'items' must be a non-empty list")
    counts = []
    for index, item in enumerate(items):
        count = item.get("n") if isinstance(item, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise BatchError(ErrorCode.BAD_INPUT, f"item {index}: 'n' must be an int >= 1")
        counts.append(count)
    if sum(counts) != len(tensors):
        raise BatchError(ErrorCode.BAD_INPUT, f"items own {sum(counts)} tensors but the batch has {len(tensors)}")

    per_item: list[dict[str, np.ndarray]] = []
    rows: list[int] = []
    start = 0
    for index, count in enumerate(counts):
        named = dict(tensors[start : start + count])
        start += count
        if len(named) != count:
            raise BatchError(ErrorCode.BAD_INPUT, f"item {index}: tensor names repeat")
        shapes = [array.shape for array in named.values()]
        if not all(shapes) or len({shape[0] for shape in shapes}) != 1:
            raise BatchError(ErrorCode.BAD_INPUT, f"item {index}: every input needs the same leading dimension")
        per_item.append(named)
        rows.append(shapes[0][0])

    first = per_item[0]
    for index, named in enumerate(per_item[1:], start=1):
        if named.keys() != first.keys():
            raise BatchError(ErrorCode.BAD_INPUT,
                             f"item {index} has inputs {sorted(named)}, item 0 has {sorted(first)}")
        for name, array in named.items():
            # np.concatenate would silently promote mixed dtypes; the model must see what was sent.
            if array.dtype != first[name].dtype or (not ragged and array.shape[1:] != first[name].shape[1:]):
                raise BatchError(
                    ErrorCode.BAD_INPUT,
                    f"input {name!r}: item {index} is {array.dtype}{list(array.shape)}, "
                    f"item 0 is {first[name].dtype}{list(first[name].shape)}",
                )
    if ragged:
        return {name: [named[name] for named in per_item] for name in first}, rows
    if len(per_item) == 1:
        return dict(first), rows  # one request: hand the model the received views, no copy
    return {name: np.concatenate([named[name] for named in per_item], axis=0) for name in first}, rows


def split_ragged_outputs(outputs: object, items: int) -> list[tuple[str, np.ndarray]]:
    """A ragged batch's result: every output is a list with one array per item."""
    if not isinstance(outputs, dict) or not outputs:
        raise BatchError(ErrorCode.MODEL_ERROR,
                         f"predict must return a non-empty dict of lists, got {type(outputs).__name__}")
    for name, arrays in outputs.items():
        if not isinstance(arrays, (list, tuple)) or len(arrays) != items:
            raise BatchError(ErrorCode.MODEL_ERROR,
                             f"output {name!r} of a ragged batch must be a list of {items} arrays, one per item")
        for array in arrays:
            if not isinstance(array, np.ndarray) or array.ndim == 0:
                raise BatchError(ErrorCode.MODEL_ERROR, f"output {name!r}: every item must be an array of rank >= 1")
            try:
                wire.dtype_name(array.dtype)
            except wire.WireError as exc:
                raise BatchError(ErrorCode.MODEL_ERROR, f"output {name!r}: {exc}") from None
    return [(name, arrays[index]) for index in range(items) for name, arrays in outputs.items()]


def split_outputs(outputs: object, rows: Sequence[int]) -> list[tuple[str, np.ndarray]]:
    """The result's tensors: for each item in order, its rows of every output.

    Raises BatchError(model_error) when ``outputs`` is not what ``Model.predict`` promises.
    """
    if not isinstance(outputs, dict) or not outputs:
        raise BatchError(ErrorCode.MODEL_ERROR,
                         f"predict must return a non-empty dict of arrays, got {type(outputs).__name__}")
    total = sum(rows)
    for name, array in outputs.items():
        if not isinstance(name, str) or not name:
            raise BatchError(ErrorCode.MODEL_ERROR, f"output names must be non-empty strings, got {name!r}")
        if not isinstance(array, np.ndarray):
            raise BatchError(ErrorCode.MODEL_ERROR, f"output {name!r} is a {type(array).__name__}, not a numpy array")
        try:
            wire.dtype_name(array.dtype)
        except wire.WireError as exc:
            raise BatchError(ErrorCode.MODEL_ERROR, f"output {name!r}: {exc}") from None
        if array.ndim == 0 or array.shape[0] != total:
            raise BatchError(
                ErrorCode.MODEL_ERROR,
                f"output {name!r} has shape {list(array.shape)}; "
                f"its leading dimension must be the batch's {total} rows",
            )
    tensors: list[tuple[str, np.ndarray]] = []
    start = 0
    for count in rows:
        tensors.extend((name, array[start : start + count]) for name, array in outputs.items())
        start += count
    return tensors


def row_params(items: Sequence[Mapping[str, Any]], rows: Sequence[int], ragged: bool) -> list[Mapping[str, Any]]:
    """``predict``'s ``params``: one read-only map per row of the batch (ragged: per item), each row the
    parameters of the request it came from (``{}`` when it sent none); a request's rows share one map."""
    result: list[Mapping[str, Any]] = []
    for item, count in zip(items, rows, strict=True):
        given = item.get("params")
        shared = MappingProxyType(given) if isinstance(given, dict) else EMPTY_PARAMS
        result.extend([shared] * (1 if ragged else count))
    return result


EMPTY_PARAMS: Mapping[str, Any] = MappingProxyType({})


def answer_batch(model: Model, replica_id: str, header: Mapping[str, Any],
                 tensors: Sequence[tuple[str, np.ndarray]], sessions: SessionStore | None = None,
                 with_params: bool = False) -> list[wire.Frame]:
    """The `result` or `failed` message for one batch. Never raises: the replica must outlive any batch.

    ``with_params``: ``predict`` takes a ``params`` argument (``inferoxy.model.accepts_params``), given per row.
    While it runs, every log line (the model's own too) carries the batch's request ids (``logs.REQUEST_IDS``)."""
    # One id per item that has one (``rid``: a proxy older than request ids sends none), read if a line is logged.
    token = REQUEST_IDS.set(BatchIds(header.get("items")))
    try:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch %s: %d item(s)", header.get("batch"), len(header.get("items") or ()))
        return _answer_batch(model, replica_id, header, tensors, sessions, with_params)
    finally:
        REQUEST_IDS.reset(token)


def _answer_batch(model: Model, replica_id: str, header: Mapping[str, Any],
                  tensors: Sequence[tuple[str, np.ndarray]], sessions: SessionStore | None,
                  with_params: bool) -> list[wire.Frame]:
    batch_id = header.get("batch")
    try:
        if isinstance(model, StatefulModel):
            return answer_session_batch(model, sessions if sessions is not None else SessionStore(model), replica_id,
                                        header, tensors, with_params)
        inputs, rows = gather_inputs(header, tensors)
        started = time.perf_counter_ns()
        try:
            if with_params:
                outputs = model.predict(inputs, params=row_params(header["items"], rows,  # type: ignore[call-arg]
                                                                  header.get("ragged") is True))
            else:
                outputs = model.predict(inputs)
        except Exception as exc:
            log.exception("predict raised on batch %s", batch_id)
            raise BatchError(ErrorCode.MODEL_ERROR, f"{type(exc).__name__}: {exc}") from None
        compute_ns = time.perf_counter_ns() - started
        result = split_ragged_outputs(outputs, len(rows)) if header.get("ragged") is True else split_outputs(
            outputs, rows)
        items = [{"n": len(outputs)} for _ in rows]
        return wire.encode({"t": protocol.RESULT, "replica": replica_id, "batch": batch_id, "items": items,
                            "compute_ns": compute_ns}, result)
    except BatchError as exc:
        if exc.code is ErrorCode.MODEL_ERROR:
            log.error("batch %s: %s", batch_id, exc)
        return failed_message(replica_id, batch_id, exc.code, str(exc))
    except Exception as exc:  # a bug here must cost one batch, not the replica
        log.exception("cannot answer batch %s", batch_id)
        return failed_message(replica_id, batch_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class SessionStore:
    """The states of a stateful model's open sessions in this replica, and the calls to its hooks."""

    def __init__(self, model: StatefulModel) -> None:
        self.model = model
        self.states: dict[SessionId, Any] = {}

    def start(self, session_id: SessionId) -> None:
        if session_id in self.states:
            self.end(session_id)  # a restart (sequence_start on an open session): the old state ends first
        self.states[session_id] = self.model.start_session(session_id)

    def end(self, session_id: SessionId) -> None:
        if session_id not in self.states:
            return
        state = self.states.pop(session_id)
        try:
            self.model.end_session(session_id, state)
        except Exception:
            log.exception("end_session raised for session %r", session_id)


def answer_session_batch(model: StatefulModel, store: SessionStore, replica_id: str, header: Mapping[str, Any],
                         tensors: Sequence[tuple[str, np.ndarray]], with_params: bool = False) -> list[wire.Frame]:
    """A stateful model's batch: start sessions, predict with their states, keep the new states, end sessions.

    Items are ``{"id", "n", "session", "start", "end"}``. An item of a session this replica does not
    hold (and that does not start it) is answered ``session_lost`` alone: never a silent fresh state.
    A batch with no items and ``end_sessions`` only runs those sessions' end hooks.
    """
    batch_id = header.get("batch")
    for session_id in header.get("end_sessions") or ():
        store.end(session_id)
    items = header.get("items")
    if items == []:
        return wire.encode({"t": protocol.RESULT, "replica": replica_id, "batch": batch_id, "items": []}, [])
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise BatchError(ErrorCode.BAD_INPUT, "'items' must be a list of maps")
    # Which tensors each item owns, so items of lost sessions can be left out of the batch.
    owned: list[list[tuple[str, np.ndarray]]] = []
    start = 0
    for item in items:
        count = item.get("n")
        if not isinstance(count, int) or count < 1:
            raise BatchError(ErrorCode.BAD_INPUT, "every item needs an int 'n' >= 1")
        owned.append(list(tensors[start : start + count]))
        start += count
    kept: list[int] = []
    for index, item in enumerate(items):
        session_id = item.get("session")
        if item.get("start") is True:
            try:
                store.start(session_id)
            except Exception as exc:
                log.exception("start_session raised for session %r", session_id)
                raise BatchError(ErrorCode.MODEL_ERROR, f"start_session: {type(exc).__name__}: {exc}") from None
        if session_id in store.states:
            kept.append(index)
    answers: list[dict[str, Any]] = [
        {"n": 0, "code": ErrorCode.SESSION_LOST.value,
         "message": f"replica {replica_id} holds no session {item.get('session')!r}; its state is gone"}
        for item in items
    ]
    result: list[tuple[str, np.ndarray]] = []
    compute_ns: int | None = None  # no predict ran: every item's session was lost
    try:
        if kept:
            sub_header = {"items": [items[i] for i in kept], "ragged": header.get("ragged")}
            inputs, rows = gather_inputs(sub_header, [t for i in kept for t in owned[i]])
            sessions: list[Session] = []
            offset = 0
            for i, count in zip(kept, rows, strict=True):
                span = slice(len(sessions), len(sessions) + 1) if header.get("ragged") is True else slice(
                    offset, offset + count)
                session_id = items[i]["session"]
                sessions.append(Session(session_id, store.states[session_id], span, items[i].get("start") is True,
                                        items[i].get("end") is True))
                offset += count
            started = time.perf_counter_ns()
            try:
                if with_params:
                    outputs = model.predict(inputs, sessions, params=row_params(  # type: ignore[call-arg]
                        [items[i] for i in kept], rows, header.get("ragged") is True))
                else:
                    outputs = model.predict(inputs, sessions)
            except Exception as exc:
                log.exception("predict raised on batch %s", batch_id)
                raise BatchError(ErrorCode.MODEL_ERROR, f"{type(exc).__name__}: {exc}") from None
            finally:
                for session in sessions:
                    store.states[session.id] = session.state
            compute_ns = time.perf_counter_ns() - started
            result = split_ragged_outputs(outputs, len(rows)) if header.get("ragged") is True else split_outputs(
                outputs, rows)
            for i in kept:
                answers[i] = {"n": len(outputs)}
    finally:
        # The batch manager considers these sessions over whatever happened to the batch.
        for item in items:
            if item.get("end") is True:
                store.end(item.get("session"))
    header_out: dict[str, Any] = {"t": protocol.RESULT, "replica": replica_id, "batch": batch_id, "items": answers}
    if compute_ns is not None:
        header_out["compute_ns"] = compute_ns
    return wire.encode(header_out, result)


def failed_message(replica_id: str, batch_id: Any, code: ErrorCode, message: str) -> list[wire.Frame]:
    header = {"t": protocol.FAILED, "replica": replica_id, "batch": batch_id, "code": code.value, "message": message}
    return [wire.pack_header(header)]
