"""The model runtime: the process inside every replica (``python -m inferoxy.runtime``).

It imports the model class named by ``INFEROXY_MODEL_CLASS``, calls ``load()``, dials the
task manager with a DEALER whose identity is the replica id, says ``ready``, and then
serves batches until it is told to stop (docs/PROTOCOL.md, "Task manager ⇄ replica").

Threads follow the ZeroMQ Guide's Paranoid Pirate worker: the main thread owns the DEALER
(ZeroMQ sockets are not thread-safe) and keeps heartbeats flowing both ways, while
``predict`` runs in one worker thread, which hands each finished answer back over an
inproc PAIR socket. A long ``predict`` therefore never looks like a dead replica, and a
dead task manager is noticed even while the model is busy.

Exit status: 0 after ``stop`` or SIGTERM (held batches are answered first), 2 when the
configuration or ``load()`` fails (traceback on stderr), 3 when the task manager falls
silent, 4 when the worker thread dies.

This module runs inside model images, so it depends on the standard library, pyzmq,
numpy, msgpack and ``inferoxy.{wire,protocol,model}`` only.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import zmq

from inferoxy import protocol, wire
from inferoxy.model import Model, Session, SessionId, StatefulModel
from inferoxy.protocol import ErrorCode

log = logging.getLogger("inferoxy.runtime")

EXIT_STOPPED = 0
EXIT_CONFIG = 2
EXIT_LOST_TASK_MANAGER = 3
EXIT_WORKER_DIED = 4

# Long enough for the last results to leave after `stop`; a dead peer cannot hold the exit longer.
FINAL_LINGER_MS = 2000
# Messages queued each way on the DEALER (docs/BATCHING.md): credit keeps batches and results to a few, so
# this is only reached when the task manager stopped reading; sends then drop (never block the heartbeat loop).
REPLICA_HWM = 1000


class ConfigError(Exception):
    """The replica was started with settings it cannot run with."""


@dataclass(frozen=True)
class ReplicaConfig:
    """What a replica reads from its environment (the variables at the end of docs/PROTOCOL.md)."""

    replica_url: str
    replica_id: str
    model_class: str
    model_name: str
    model_version: str = "1"
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3
    curve_keys: tuple[str, str, str] | None = None
    """(task manager's public key, ours, our secret), when the bus is authenticated with CURVE."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ReplicaConfig:
        required = {
            "replica_url": "INFEROXY_REPLICA_URL",
            "replica_id": "INFEROXY_REPLICA_ID",
            "model_class": "INFEROXY_MODEL_CLASS",
            "model_name": "INFEROXY_MODEL_NAME",
        }
        missing = [var for var in required.values() if not environ.get(var)]
        if missing:
            raise ConfigError(f"missing environment variables: {', '.join(missing)}")
        try:
            interval = float(environ.get("INFEROXY_HEARTBEAT_INTERVAL_S", "1.0"))
            liveness = int(environ.get("INFEROXY_HEARTBEAT_LIVENESS", "3"))
        except ValueError as exc:
            raise ConfigError(f"bad heartbeat setting: {exc}") from None
        if interval <= 0 or liveness < 1:
            raise ConfigError("INFEROXY_HEARTBEAT_INTERVAL_S must be > 0 and INFEROXY_HEARTBEAT_LIVENESS >= 1")
        return cls(
            **{field: environ[var] for field, var in required.items()},
            model_version=environ.get("INFEROXY_MODEL_VERSION") or "1",
            heartbeat_interval_s=interval,
            heartbeat_liveness=liveness,
            curve_keys=_curve_keys(environ),
        )


CURVE_VARIABLES = ("INFEROXY_BUS_SERVER_KEY", "INFEROXY_BUS_PUBLIC_KEY", "INFEROXY_BUS_SECRET_KEY")


def _curve_keys(environ: Mapping[str, str]) -> tuple[str, str, str] | None:
    keys = [environ.get(var, "") for var in CURVE_VARIABLES]
    if not any(keys):
        return None
    if not all(len(key) == 40 for key in keys):
        raise ConfigError(f"{', '.join(CURVE_VARIABLES)} must all be set, each a 40-character z85 CURVE key")
    server, public, secret = keys
    return server, public, secret


def import_model_class(target: str) -> type[Model]:
    """The class ``module:Class`` names; ConfigError unless it is a Model subclass."""
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError(f"INFEROXY_MODEL_CLASS must look like 'package.module:ClassName', got {target!r}")
    module = importlib.import_module(module_name)
    found: Any = module
    for part in class_name.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise ConfigError(f"module {module_name!r} has no attribute {class_name!r}")
    if not (isinstance(found, type) and issubclass(found, Model)):
        raise ConfigError(f"{target} is not a subclass of inferoxy.model.Model")
    capacity = getattr(found, "capacity", None)
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise ConfigError(f"{target}.capacity must be an int >= 1, got {capacity!r}")
    return found


# ---------------------------------------------------------------------------------------------
# Batches: joining the items' inputs, splitting the model's outputs.


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


def answer_batch(model: Model, replica_id: str, header: Mapping[str, Any],
                 tensors: Sequence[tuple[str, np.ndarray]], sessions: SessionStore | None = None) -> list[wire.Frame]:
    """The `result` or `failed` message for one batch. Never raises: the replica must outlive any batch."""
    batch_id = header.get("batch")
    try:
        if isinstance(model, StatefulModel):
            return answer_session_batch(model, sessions if sessions is not None else SessionStore(model), replica_id,
                                        header, tensors)
        inputs, rows = gather_inputs(header, tensors)
        try:
            outputs = model.predict(inputs)
        except Exception as exc:
            log.exception("predict raised on batch %s", batch_id)
            raise BatchError(ErrorCode.MODEL_ERROR, f"{type(exc).__name__}: {exc}") from None
        result = split_ragged_outputs(outputs, len(rows)) if header.get("ragged") is True else split_outputs(
            outputs, rows)
        items = [{"n": len(outputs)} for _ in rows]
        return wire.encode({"t": protocol.RESULT, "replica": replica_id, "batch": batch_id, "items": items}, result)
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
                         tensors: Sequence[tuple[str, np.ndarray]]) -> list[wire.Frame]:
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
            try:
                outputs = model.predict(inputs, sessions)
            except Exception as exc:
                log.exception("predict raised on batch %s", batch_id)
                raise BatchError(ErrorCode.MODEL_ERROR, f"{type(exc).__name__}: {exc}") from None
            finally:
                for session in sessions:
                    store.states[session.id] = session.state
            result = split_ragged_outputs(outputs, len(rows)) if header.get("ragged") is True else split_outputs(
                outputs, rows)
            for i in kept:
                answers[i] = {"n": len(outputs)}
    finally:
        # The batch manager considers these sessions over whatever happened to the batch.
        for item in items:
            if item.get("end") is True:
                store.end(item.get("session"))
    return wire.encode({"t": protocol.RESULT, "replica": replica_id, "batch": batch_id, "items": answers}, result)


def failed_message(replica_id: str, batch_id: Any, code: ErrorCode, message: str) -> list[wire.Frame]:
    header = {"t": protocol.FAILED, "replica": replica_id, "batch": batch_id, "code": code.value, "message": message}
    return [wire.pack_header(header)]


# ---------------------------------------------------------------------------------------------
# Threads and sockets.


class PredictWorker(threading.Thread):
    """Runs ``predict`` for queued batches, one at a time, and sends each answer over a PAIR socket.

    Daemon, so that a replica that lost its task manager can exit even while a ``predict``
    never returns.
    """

    def __init__(self, model: Model, replica_id: str, ctx: zmq.Context[Any], results_url: str) -> None:
        super().__init__(name="predict", daemon=True)
        self.model = model
        self.replica_id = replica_id
        self.ctx = ctx
        self.results_url = results_url
        self.jobs: queue.Queue[tuple[dict[str, Any], list[tuple[str, np.ndarray]]] | None] = queue.Queue()
        # Session states live in this thread only: predict and the hooks run here, one batch at a time.
        self.sessions = SessionStore(model) if isinstance(model, StatefulModel) else None

    def run(self) -> None:
        results = self.ctx.socket(zmq.PAIR)
        results.setsockopt(zmq.LINGER, 0)
        results.connect(self.results_url)
        try:
            while (job := self.jobs.get()) is not None:
                results.send_multipart(answer_batch(self.model, self.replica_id, *job, self.sessions), copy=False)
        finally:
            results.close()


class ReplicaServer:
    """The main thread: the DEALER to the task manager, heartbeats, and the credit the model allows."""

    def __init__(self, config: ReplicaConfig, model: Model, ctx: zmq.Context[Any]) -> None:
        self.config = config
        self.capacity = type(model).capacity
        self.ctx = ctx
        self.identity = config.replica_id

        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.IDENTITY, config.replica_id.encode())
        self.dealer.setsockopt(zmq.LINGER, FINAL_LINGER_MS)
        self.dealer.setsockopt(zmq.SNDHWM, REPLICA_HWM)
        self.dealer.setsockopt(zmq.RCVHWM, REPLICA_HWM)
        if config.curve_keys is not None:
            server, public, secret = config.curve_keys
            self.dealer.curve_serverkey = server.encode()
            self.dealer.curve_publickey = public.encode()
            self.dealer.curve_secretkey = secret.encode()
        self.dealer.connect(config.replica_url)

        results_url = f"inproc://inferoxy-results-{id(self)}"
        self.results = ctx.socket(zmq.PAIR)
        self.results.setsockopt(zmq.LINGER, 0)
        self.results.bind(results_url)
        self.worker = PredictWorker(model, config.replica_id, ctx, results_url)

        self.held = 0  # batches accepted and not yet answered
        self.stopping = False
        self.last_heard = time.monotonic()
        self._wakeup_r, self._wakeup_w = socket.socketpair()

    def run(self) -> int:
        """Serve until stopped (returns 0) or until the task manager or the worker is lost (exits at once)."""
        self._handle_signals()
        self.worker.start()
        poller = zmq.Poller()
        poller.register(self.dealer, zmq.POLLIN)
        poller.register(self.results, zmq.POLLIN)
        poller.register(self._wakeup_r, zmq.POLLIN)

        interval = self.config.heartbeat_interval_s
        silence_limit = interval * self.config.heartbeat_liveness
        self._send({"t": protocol.READY, "replica": self.identity, "model": self.config.model_name,
                    "version": self.config.model_version, "capacity": self.capacity, "pid": os.getpid()})
        log.info("ready: serving %s/%s with capacity %d", self.config.model_name, self.config.model_version,
                 self.capacity)
        next_heartbeat = time.monotonic() + interval
        while not (self.stopping and self.held == 0):
            events = dict(poller.poll(max(0, int((next_heartbeat - time.monotonic()) * 1000))))
            if self._wakeup_r in events:
                self._wakeup_r.recv(64)
            if self.results in events:
                self._forward_results()
            if self.dealer in events:
                self._read_task_manager()

            now = time.monotonic()
            if now >= next_heartbeat:
                self._send({"t": protocol.HEARTBEAT})
                next_heartbeat = now + interval
            if now - self.last_heard > silence_limit:
                log.error("no word from the task manager for %.1fs; exiting", now - self.last_heard)
                exit_now(EXIT_LOST_TASK_MANAGER)
            if not self.worker.is_alive():
                log.error("the predict thread ended unexpectedly; exiting")
                exit_now(EXIT_WORKER_DIED)

        log.info("stopped after answering every batch it held")
        self.close()
        return EXIT_STOPPED

    def close(self) -> None:
        self.worker.jobs.put(None)
        self.worker.join()
        self.results.close()
        self.dealer.close()  # lingers so the last results still leave
        signal.set_wakeup_fd(-1)
        self._wakeup_r.close()
        self._wakeup_w.close()

    def _handle_signals(self) -> None:
        # The wakeup fd makes a signal end the poll at once; the handler itself only sets a flag.
        self._wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._begin_stop(signal.Signals(signum).name)

    def _begin_stop(self, why: str) -> None:
        if not self.stopping:
            log.info("stopping (%s); answering %d held batches first", why, self.held)
        self.stopping = True

    def _forward_results(self) -> None:
        while True:
            try:
                frames = self.results.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            # The slot is free before the answer leaves, so the batch manager's next batch always fits.
            self.held -= 1
            self._send_frames(frames)

    def _read_task_manager(self) -> None:
        while True:
            try:
                frames = self.dealer.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.last_heard = time.monotonic()
            try:
                header, tensors = wire.decode(frames)
            except wire.WireError as exc:
                self._reject_unreadable(frames, exc)
                continue
            kind = header.get("t")
            if kind == protocol.BATCH:
                self._accept_batch(header, tensors)
            elif kind == protocol.STOP:
                self._begin_stop("told to stop")
            elif kind != protocol.HEARTBEAT:
                log.warning("ignoring a message of unknown type %r", kind)

    def _accept_batch(self, header: dict[str, Any], tensors: list[tuple[str, np.ndarray]]) -> None:
        batch_id = header.get("batch")
        if self.stopping:
            self._send_frames(failed_message(self.identity, batch_id, ErrorCode.REPLICA_LOST,
                                             "the replica is stopping"))
        elif self.held >= self.capacity:
            self._send_frames(failed_message(self.identity, batch_id, ErrorCode.OVERLOADED,
                                     f"the replica already holds {self.held} batches (capacity {self.capacity})"))
        else:
            self.held += 1
            self.worker.jobs.put((header, tensors))

    def _reject_unreadable(self, frames: Sequence[Any], exc: wire.WireError) -> None:
        try:
            batch_id = wire.unpack_header(frames[0]).get("batch")
        except wire.WireError:
            batch_id = None
        log.warning("dropping a malformed message (batch %s): %s", batch_id, exc)
        if batch_id is not None:
            self._send_frames(failed_message(self.identity, batch_id, ErrorCode.BAD_INPUT, str(exc)))

    def _send(self, header: Mapping[str, Any]) -> None:
        self._send_frames([wire.pack_header(header)])

    def _send_frames(self, frames: Sequence[Any]) -> None:
        # Never block the heartbeat loop: a full queue means the task manager is gone, and
        # the silence check will end this replica shortly.
        try:
            self.dealer.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("the task manager is not taking messages; dropped one")


def exit_now(code: int) -> NoReturn:
    """Leave without waiting for a ``predict`` that may never return (or for ZeroMQ to flush)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> int:
    replica_id = os.environ.get("INFEROXY_REPLICA_ID", "replica")
    level = os.environ.get("INFEROXY_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        stream=sys.stderr,
        level=level if isinstance(logging.getLevelName(level), int) else logging.INFO,
        format=f"%(asctime)s %(levelname)s {replica_id} %(name)s: %(message)s",
    )
    try:
        config = ReplicaConfig.from_env(os.environ)
        model = import_model_class(config.model_class)()
        model.load()
    except Exception:
        traceback.print_exc()
        log.error("the model could not be loaded; exiting")
        return EXIT_CONFIG

    ctx: zmq.Context[Any] = zmq.Context()
    code = ReplicaServer(config, model, ctx).run()
    ctx.term()
    return code


if __name__ == "__main__":
    sys.exit(main())
