"""The task manager's data path: two ROUTER sockets, and batches and answers moved between them.

Batch managers dial ``task_manager_url``; replicas dial ``replica_bind_url`` (tcp:// with a CURVE key
per replica, or, for local process replicas under ``serve``, ipc:// in its private directory). A batch
(``[envelope, header, *tensors]``) goes to the replica its routing envelope names, and the
answer comes back behind the same envelope to the batch manager that sent it. Only the
envelope is read (``inferoxy.envelope``): header and tensor frames pass through as opaque
ZeroMQ frames, so a batch costs the same to relay whatever it holds. What the relay still
owns, since only it sees every batch: which replica holds which batch for whom (``in_flight``),
the credit check, and an answer for anything it cannot deliver (``failed``, never a drop).

Both sockets are plain ones drained by ``inferoxy.reactor.Reactor`` on the event loop, as in the
batch manager and the bridges (one I/O model on the data path; no future per message). The
lifecycle decisions (a replica is ready, unreachable; a batch manager to tell everything) go to
the ``Lifecycle`` it is given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import zmq
import zmq.asyncio

from inferoxy import bus, curve, envelope, wire
from inferoxy import messages as m
from inferoxy.protocol import ErrorCode
from inferoxy.reactor import Reactor, send_nowait
from inferoxy.settings import Settings
from task_manager.replicas import Replica, ReplicaState

log = logging.getLogger(__name__)

class Lifecycle(Protocol):
    """What the relay tells the rest of the task manager."""

    def announce_to(self, sender: bytes) -> None:
        """A new, restarted or resyncing batch manager: tell it every replica and model state."""

    def model_drained(self, sender: bytes, msg: m.ModelDrained) -> None: ...

    def load_reported(self, sender: bytes, msg: m.Load) -> None: ...

    def credit_acked(self, sender: bytes, msg: m.Credit) -> None:
        """A batch manager echoed a ``credit``: it applied it (``task_manager.credit``)."""

    def credit_freed(self, replica: Replica) -> None:
        """A batch left a replica where a batch manager's share waits for room."""

    def batch_manager_gone(self, sender: bytes, why: str) -> None:
        """Forget a batch manager (silent, or disconnected): its load, its credit, its part in a retirement."""

    def replica_ready(self, replica: Replica, msg: m.Ready) -> None: ...

    def replica_unreachable(self, replica: Replica) -> None:
        """A batch could not be delivered to it: it is replaced (so ``replica_lost`` always means gone)."""


class Relay:
    def __init__(self, settings: Settings, replicas: Mapping[bytes, Replica], lifecycle: Lifecycle,
                 replica_keys: curve.ReplicaKeys | None) -> None:
        self.settings = settings
        self.replicas = replicas  # by ZeroMQ identity (the replica id); the lifecycle owns the table
        self.lifecycle = lifecycle
        self.replica_keys = replica_keys
        self.batch_managers: dict[bytes, float] = {}  # identity -> when last heard
        self._disconnected: set[bytes] = set()  # batch managers a send found gone, forgotten soon after
        self.bm_sock: zmq.Socket[Any] | None = None
        self.replica_sock: zmq.Socket[Any] | None = None
        self._reactor: Reactor | None = None

    # --- sockets -------------------------------------------------------------------------------

    def open(self, ctx: zmq.asyncio.Context) -> None:
        settings = self.settings
        self.bm_sock = bus.plain_socket(
            ctx, zmq.ROUTER, bind=settings.task_manager_url, max_message_bytes=settings.max_message_bytes,
            curve_server=curve.server_for(settings.bus_key_secret, curve.TASK_MANAGER, settings.task_manager_url))
        # No ROUTER_HANDOVER: a second connection with a live replica's id must not take its batches over.
        # Replica ids never repeat (random nonce), so a restarted replica never needs to replace an old one.
        self.replica_sock = bus.plain_socket(
            ctx, zmq.ROUTER, bind=settings.replica_bind_url, max_message_bytes=settings.max_message_bytes,
            curve_server=self.replica_keys.server if self.replica_keys is not None else None)
        self._reactor = Reactor()
        self._reactor.add(self.bm_sock, self.on_batch_manager_message)
        self._reactor.add(self.replica_sock, self.on_replica_message)

    def refusal_logger(self, ctx: zmq.asyncio.Context) -> list[asyncio.Task[None]]:
        if self.replica_keys is None or self.replica_sock is None:
            return []
        hint = ("a model image built before the bus was authenticated does not speak CURVE: rebuild it FROM the "
                "current inferoxy/model-base (docs/DOCKER.md)")
        return [asyncio.create_task(curve.log_refusals(self.replica_sock, hint, ctx), name="tm refusals")]

    @property
    def is_open(self) -> bool:
        return self.bm_sock is not None and not self.bm_sock.closed

    def close(self) -> None:
        if self._reactor is not None:
            self._reactor.close()
            self._reactor = None
        for sock in (self.bm_sock, self.replica_sock):
            if sock is not None:
                sock.close(linger=0)

    # --- batch managers ------------------------------------------------------------------------

    def on_batch_manager_message(self, frames: list[Any]) -> None:
        if len(frames) < 2:
            log.warning("dropping an empty message from a batch manager")
            return
        sender = frames[0].bytes
        new = self._heard_batch_manager(sender)
        if envelope.is_envelope(frames[1]):
            self.forward_batch(sender, frames)
            return
        try:
            msg = m.BATCH_MANAGER_TO_TASK_MANAGER.decode(frames[1])
        except wire.WireError as exc:
            log.error("dropping an unreadable message from batch manager %s: %s", sender.hex(), exc)
            ref = m.peek_batch(frames[1])
            if ref is not None:  # a batch without its envelope that still names itself: its requests hear now
                self.send_batch_manager(sender, failed(ref.replica, ref.batch, ErrorCode.INTERNAL,
                                                       f"a batch needs its routing envelope frame (and this one's "
                                                       f"header could not be read: {exc})"))
            return
        if isinstance(msg, m.Heartbeat):
            if msg.resync and not new:
                self.lifecycle.announce_to(sender)  # it gave us up for lost and dropped our replicas; we never noticed
        elif isinstance(msg, m.ModelDrained):
            self.lifecycle.model_drained(sender, msg)
        elif isinstance(msg, m.Load):
            self.lifecycle.load_reported(sender, msg)
        elif isinstance(msg, m.Credit):
            self.lifecycle.credit_acked(sender, msg)
        else:
            log.error("batch %r from batch manager %s has no routing envelope; answered failed", msg.batch,
                      sender.hex())
            self.send_batch_manager(sender, failed(msg.replica, msg.batch, ErrorCode.INTERNAL,
                                                   "a batch needs its routing envelope frame"))

    def _heard_batch_manager(self, sender: bytes) -> bool:
        """Record a sign of life; True (after announcing everything to it) when the batch manager is new."""
        new = sender not in self.batch_managers
        self.batch_managers[sender] = time.monotonic()  # first: its share of each replica is counted in
        if new:
            log.info("batch manager %s connected", sender.hex())
            self.lifecycle.announce_to(sender)
        return new

    def forward_batch(self, sender: bytes, frames: list[Any]) -> None:
        """``[sender, envelope, header, *tensors]``: to the replica the envelope names, or answered ``failed``."""
        try:
            target, batch_id = envelope.unpack(frames[1])
        except envelope.EnvelopeError as exc:
            log.error("dropping a batch from batch manager %s whose envelope names no batch: %s", sender.hex(), exc)
            return
        replica = self.replicas.get(target.encode())
        unreadable = _unreadable_header(frames)
        if unreadable is not None:
            # Never decoded here; a header over the bus's limit is refused before a replica spends time on it.
            log.error("batch %r for replica %r from batch manager %s is unreadable; answered failed: %s",
                      batch_id, target, sender.hex(), unreadable)
            problem = (ErrorCode.INTERNAL, f"the task manager could not read the batch: {unreadable}")
        elif replica is not None and replica.state is ReplicaState.STOPPING and replica.wanted_gone \
                and not replica.retiring:  # a retiring one still takes its sessions' batches
            # Sent before the batch manager heard `replica_draining`.
            problem = (ErrorCode.REPLICA_LOST, f"replica {target} is draining: {replica.end_reason}")
        elif replica is None or (replica.state is not ReplicaState.READY and not replica.retiring):
            problem = (ErrorCode.REPLICA_LOST, f"replica {target!r} is not serving")
        elif batch_id in replica.in_flight:
            problem = (ErrorCode.INTERNAL, f"batch {batch_id} is already at replica {target}")
        elif len(replica.in_flight) >= replica.capacity:
            problem = (ErrorCode.OVERLOADED, f"replica {target} already holds {replica.capacity} batches")
        elif not self.send_replica(replica, frames[1:]):
            problem = (ErrorCode.REPLICA_LOST, f"replica {target} is not connected")
            # A batch manager stops using a replica that lost a batch: one that cannot be reached is
            # replaced, so `replica_lost` always means gone (and `replica_down` goes out before the `failed`).
            self.lifecycle.replica_unreachable(replica)
        else:
            if not replica.in_flight:
                replica.progress_at = time.monotonic()  # the wait for its next answer starts now
            replica.in_flight[batch_id] = sender
            return
        code, message = problem
        self.send_batch_manager(sender, failed(target, batch_id, code, message))

    # --- replicas ------------------------------------------------------------------------------

    def on_replica_message(self, frames: list[Any]) -> None:
        if len(frames) < 2:
            return
        replica = self.replicas.get(frames[0].bytes)
        routed = envelope.is_envelope(frames[1])
        if replica is None:
            # Not a replica we started, or one we already gave up on (its batches were answered then).
            if routed:
                log.warning("replica %r, which is not one of ours (any more), answered a batch; dropped",
                            frames[0].bytes.decode(errors="replace"))
            return
        replica.last_seen = time.monotonic()
        if routed:
            self._on_answer(replica, frames)
            return
        try:
            msg = m.REPLICA_TO_TASK_MANAGER.decode(frames[1])
        except wire.WireError as exc:
            log.error("dropping an unreadable message from replica %s: %s", replica.id, exc)
            return
        if isinstance(msg, m.Ready):
            if self._dialled_with_its_key(replica, frames[1]):
                self.lifecycle.replica_ready(replica, msg)
        elif isinstance(msg, (m.Result, m.Failed)):
            log.warning("replica %s answered batch %r without its routing envelope (an image older than this "
                        "proxy?); dropped", replica.id, msg.batch)

    def _on_answer(self, replica: Replica, frames: list[Any]) -> None:
        try:
            answered_as, batch_id = envelope.unpack(frames[1])
        except envelope.EnvelopeError as exc:
            log.error("dropping an answer from replica %s whose envelope names no batch: %s", replica.id, exc)
            return
        if answered_as != replica.id:
            log.warning("replica %s answered as %r; dropped", replica.id, answered_as)
            return
        sender = replica.in_flight.pop(batch_id, None)
        if sender is None:
            log.warning("replica %s answered batch %r, which it does not hold; dropped", replica.id, batch_id)
            return
        replica.progress_at = time.monotonic()
        unreadable = _unreadable_header(frames)
        if unreadable is not None:
            # The batch fails now, so its requests hear and the batch manager gets the replica's credit back.
            log.error("replica %s answered batch %r unreadably; the batch fails: %s", replica.id, batch_id,
                      unreadable)
            message = f"replica {replica.id} answered with a message the task manager could not read: {unreadable}"
            self.send_batch_manager(sender, failed(replica.id, batch_id, ErrorCode.INTERNAL, message))
        elif not self._send(self.bm_sock, [sender, *frames[1:]]):
            log.warning("the batch manager that sent batch %r is gone; its answer is dropped", batch_id)
            self._unreachable(sender)
        if replica.credit_waiting:  # after the answer: the room it left may be another batch manager's share
            self.lifecycle.credit_freed(replica)

    def _dialled_with_its_key(self, replica: Replica, frame: Any) -> bool:
        """A replica's id is accepted only from the connection that holds the key issued for it: another
        replica (or anything else holding some replica's key) cannot take over an id not yet ready."""
        if self.replica_keys is None:
            # A plain replica link (a private ipc:// socket, or the bus's CURVE off): the ROUTER identity the
            # replica dialled with is its name, and libzmq gives a live id to no second connection.
            return True
        try:
            user_id = frame.get("User-Id")
        except zmq.ZMQError:  # no metadata: not a CURVE connection
            user_id = None
        if self.replica_keys.issued_to(replica.id, user_id):
            return True
        log.warning("a peer said `ready` as replica %s without that replica's key; ignored", replica.id)
        return False

    # --- sending -------------------------------------------------------------------------------

    def fail_in_flight(self, replica: Replica, reason: str) -> None:
        for batch_id, sender in replica.in_flight.items():
            message = f"replica {replica.id} was lost: {reason}"
            self.send_batch_manager(sender, failed(replica.id, batch_id, ErrorCode.REPLICA_LOST, message))
        replica.in_flight.clear()

    def to_batch_managers(self, header: m.Message) -> None:
        frame = m.encode(header)  # once for all of them
        for sender in self.batch_managers:
            self.send_batch_manager(sender, [frame])

    def send_batch_manager(self, identity: bytes, message: m.Message | Sequence[Any]) -> None:
        frames = [m.encode(message)] if isinstance(message, m.Message) else list(message)
        if not self._send(self.bm_sock, [identity, *frames]):
            self._unreachable(identity)

    def _unreachable(self, identity: bytes) -> None:
        """A send to a batch manager failed: its connection is gone (ROUTER_MANDATORY says so at once; a full
        queue, 100,000 messages unread, is as good as gone). Forgotten now rather than after the silence limit,
        so its credit goes to the others (a batch manager restarted under ``serve`` is a new identity, and
        would wait for the old one's share). After the caller's handler: it may be looping over them."""
        if identity not in self.batch_managers or identity in self._disconnected:
            return
        self._disconnected.add(identity)
        try:
            asyncio.get_running_loop().call_soon(self._forget_disconnected)
        except RuntimeError:  # no loop (a test driving the relay by hand): the silence limit still applies
            self._disconnected.discard(identity)

    def _forget_disconnected(self) -> None:
        gone, self._disconnected = self._disconnected, set()
        for identity in gone:
            if self.is_open and identity in self.batch_managers:
                self.lifecycle.batch_manager_gone(identity, "is no longer connected")

    def send_replica(self, replica: Replica, frames: Sequence[Any]) -> bool:
        return self._send(self.replica_sock, [replica.identity, *frames])

    def _send(self, sock: zmq.Socket[Any] | None, frames: list[Any]) -> bool:
        if sock is None or sock.closed:
            return False
        sent = send_nowait(sock, frames)
        if self._reactor is not None:
            # A send may swallow the socket's read edge (inferoxy.reactor); inside a drain this is a flag.
            self._reactor.wake_soon()
        return sent


def failed(replica: str, batch_id: envelope.BatchId, code: ErrorCode, message: str) -> m.Failed:
    """The ``failed`` that settles a batch the task manager could not deliver or get answered."""
    # A batch id is the batch manager's int; one an envelope spelled otherwise is echoed back as it came.
    return m.Failed(replica, batch_id, code, message)  # type: ignore[arg-type]


def _unreadable_header(frames: Sequence[Any]) -> str | None:
    """Why the header frame behind an envelope cannot be read, judged by its size alone (never decoded)."""
    if len(frames) < 3:
        return "no header frame follows the routing envelope"
    size = len(frames[2])
    if size > wire.MAX_HEADER_BYTES:
        return f"header of {size} bytes is larger than {wire.MAX_HEADER_BYTES}"
    return None
