"""The model runtime: the process inside every replica (``python -m inferoxy.runtime``).

It imports the model class named by ``INFEROXY_MODEL_CLASS``, calls ``load()``, dials the
task manager with a DEALER whose identity is the replica id, says ``ready``, and then
serves batches until it is told to stop (docs/PROTOCOL.md, "Task manager ⇄ replica").

Threads follow the ZeroMQ Guide's Paranoid Pirate worker: the main thread owns the DEALER
(ZeroMQ sockets are not thread-safe) and keeps heartbeats flowing both ways, while
``predict`` runs in one worker thread, which hands each finished answer back over an
inproc PAIR socket. A long ``predict`` therefore never looks like a dead replica, and a
dead task manager is noticed even while the model is busy.

Between ``load()`` and ``ready`` it runs the spec's warmup requests (``inferoxy.warmup``).

Exit status: 0 after ``stop`` or SIGTERM (held batches are answered first), 2 when the
configuration, ``load()`` or the warmup fails (traceback on stderr), 3 when the task manager falls
silent, 4 when the worker thread dies.

Each batch arrives behind its routing envelope (``inferoxy.envelope``), and its answer goes back
behind the same envelope frame: the task manager routes by it without reading either header.

This module runs inside model images, so it depends on the standard library, pyzmq,
numpy, msgpack and ``inferoxy.{wire,protocol,model,envelope,batches,logs,warmup}`` only.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import zmq

from inferoxy import envelope, protocol, wire
from inferoxy.batches import SessionStore, answer_batch, failed_message
from inferoxy.logs import setup_logging
from inferoxy.model import Model, StatefulModel, accepts_params
from inferoxy.protocol import ErrorCode
from inferoxy.warmup import WarmupError, run_warmup

# Re-exported: what a replica answers lives in inferoxy.batches, and tests and images import it from here.
__all__ = ["SessionStore", "answer_batch", "failed_message"]

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


# The replica's spec, as JSON (task_manager/placement.py writes it; Model.spec is its parsed value).
MODEL_SPEC_VARIABLE = "INFEROXY_MODEL_SPEC"


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
    spec: Mapping[str, Any] = field(default_factory=dict)
    """``INFEROXY_MODEL_SPEC`` parsed (empty when it is not set)."""

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
            spec=_spec(environ),
        )


CURVE_VARIABLES = ("INFEROXY_BUS_SERVER_KEY", "INFEROXY_BUS_PUBLIC_KEY", "INFEROXY_BUS_SECRET_KEY")


def _spec(environ: Mapping[str, str]) -> dict[str, Any]:
    text = environ.get(MODEL_SPEC_VARIABLE)
    if not text:
        return {}
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{MODEL_SPEC_VARIABLE} is not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{MODEL_SPEC_VARIABLE} must be a JSON object")
    return spec


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
        # (envelope frame, header, tensors): the answer goes back behind the batch's own envelope.
        self.jobs: queue.Queue[tuple[Any, dict[str, Any], list[tuple[str, np.ndarray]]] | None] = queue.Queue()
        # Session states live in this thread only: predict and the hooks run here, one batch at a time.
        self.sessions = SessionStore(model) if isinstance(model, StatefulModel) else None
        self.with_params = accepts_params(model)  # decided once: predict's signature does not change

    def run(self) -> None:
        results = self.ctx.socket(zmq.PAIR)
        results.setsockopt(zmq.LINGER, 0)
        results.connect(self.results_url)
        try:
            while (job := self.jobs.get()) is not None:
                route, header, tensors = job
                answer = answer_batch(self.model, self.replica_id, header, tensors, self.sessions,
                                      self.with_params)
                results.send_multipart([route, *answer], copy=False)
        finally:
            results.close()


class ReplicaServer:
    """The main thread: the DEALER to the task manager, heartbeats, and the credit the model allows."""

    def __init__(self, config: ReplicaConfig, model: Model, ctx: zmq.Context[Any],
                 warmup_s: float | None = None) -> None:
        self.config = config
        self.warmup_s = warmup_s  # how long the spec's warmup took; None: it had none
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
        ready: dict[str, Any] = {"t": protocol.READY, "replica": self.identity, "model": self.config.model_name,
                                 "version": self.config.model_version, "capacity": self.capacity, "pid": os.getpid()}
        if self.warmup_s is not None:
            ready["warmup_s"] = self.warmup_s
        self._send(ready)
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
            if envelope.is_envelope(frames[0]):
                self._read_batch(frames)
                continue
            try:
                header = wire.unpack_header(frames[0])
            except wire.WireError as exc:
                log.warning("dropping a malformed message: %s", exc)
                continue
            kind = header.get("t")
            if kind == protocol.STOP:
                self._begin_stop("told to stop")
            elif kind == protocol.BATCH:
                log.warning("dropping a batch without a routing envelope (batch %r)", header.get("batch"))
            elif kind != protocol.HEARTBEAT:
                log.warning("ignoring a message of unknown type %r", kind)

    def _read_batch(self, frames: Sequence[Any]) -> None:
        """``[envelope, header, *tensors]``: a batch to answer, whatever it holds, behind the same envelope."""
        route = frames[0]
        try:
            _replica, batch_id = envelope.unpack(route)
        except envelope.EnvelopeError as exc:
            log.warning("dropping a batch whose envelope is unreadable: %s", exc)
            return
        try:
            header, tensors = wire.decode(frames[1:])
            if header.get("t") != protocol.BATCH:
                raise wire.WireError(f"a routed message must be a batch, not {header.get('t')!r}")
        except wire.WireError as exc:
            log.warning("dropping a malformed batch %r: %s", batch_id, exc)
            self._answer(route, failed_message(self.identity, batch_id, ErrorCode.BAD_INPUT, str(exc)))
            return
        if self.stopping:
            self._answer(route, failed_message(self.identity, batch_id, ErrorCode.REPLICA_LOST,
                                               "the replica is stopping"))
        elif self.held >= self.capacity:
            self._answer(route, failed_message(self.identity, batch_id, ErrorCode.OVERLOADED,
                                               f"the replica already holds {self.held} batches (capacity "
                                               f"{self.capacity})"))
        else:
            self.held += 1
            self.worker.jobs.put((route, header, tensors))

    def _answer(self, route: Any, frames: Sequence[Any]) -> None:
        self._send_frames([route, *frames])

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
    setup_logging(level if isinstance(logging.getLevelName(level), int) else "INFO", "replica",
                  os.environ.get("INFEROXY_LOG_FORMAT", "text"),
                  text_format=f"%(asctime)s %(levelname)s {replica_id} %(name)s: %(message)s",
                  model=os.environ.get("INFEROXY_MODEL_NAME"), static={"replica": replica_id})
    try:
        config = ReplicaConfig.from_env(os.environ)
        model = import_model_class(config.model_class)()
        model.spec = config.spec
        model.load()
    except Exception:
        log.exception("the model could not be loaded; exiting")  # with its traceback, a JSON line's too
        return EXIT_CONFIG
    warmup_s = None
    requests = config.spec.get("warmup")
    if requests:
        try:
            warmup_s = run_warmup(model, config.replica_id, requests, accepts_params(model))
        except WarmupError as exc:
            # The model's status quotes the replica's last lines: this one says what failed.
            log.error("warmup failed; exiting: %s", exc)
            return EXIT_CONFIG
        except Exception:  # an unreadable file numpy reports oddly: still the replica's reason, with its traceback
            log.exception("warmup failed; exiting")
            return EXIT_CONFIG
        log.info("warmup: %d request(s) answered in %.3fs", len(requests), warmup_s)

    ctx: zmq.Context[Any] = zmq.Context()
    code = ReplicaServer(config, model, ctx, warmup_s).run()
    ctx.term()
    return code


if __name__ == "__main__":
    sys.exit(main())
