"""CURVE on the internal bus: who may dial which socket (docs/SECURITY.md, "The bus").

Every binding component (batch manager, task manager's two ROUTERs) has a server keypair;
the proxy's own components share one client keypair; each replica gets a client keypair
of its own, accepted only while the task manager runs that replica. All the proxy's keys
derive from one secret, ``INFEROXY_BUS_SECRET``, which ``inferoxy serve`` makes at start
and hands its components through their environment, so a restarted component still
talks to its siblings. Replicas never see that secret, only their own keypair and the
public key of the socket they dial.

Who is let in is decided by a ZAP handler (``ZapHandler``): one per ZeroMQ context,
since libzmq asks whatever answers ``inproc://zeromq.zap.01`` on the socket's context.
Each binding socket names a ZAP domain; the handler asks that domain's check with the
client's public key. inproc:// links are inside one process and need none of this, and
neither do the components' ipc:// links when their socket files sit in a directory only this
uid may enter (``private_ipc``; ``inferoxy serve`` makes one): the kernel then admits only
processes of this uid, which can read the bus secret from the components' environment anyway,
so CURVE would cost its encryption and keep no one out (docs/SECURITY.md). The replica link follows
the same rule: on tcp:// (Docker replicas, or a URL the operator set) each replica's own key is how the
task manager knows which replica it is; on an ipc:// socket in serve's private directory (replicas that
are local processes of this uid, which could read the bus secret anyway) the ROUTER identity the
replica dials with names it, and a second connection cannot take a live replica's id (no ROUTER_HANDOVER).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"

# ZAP domains of the binding sockets.
COMPONENTS = "components"  # bridges -> batch manager, batch manager -> task manager
REPLICAS = "replicas"  # replicas -> task manager
CLIENTS = "clients"  # the external ZeroMQ port when it is encrypted: any client (API keys guard it)

# Names of the server keypairs derived from the bus secret.
BATCH_MANAGER = "batch_manager"
TASK_MANAGER = "task_manager"
REPLICA_PORT = "replica_port"
COMPONENT_CLIENT = "component_client"


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85, 40 characters
    secret: bytes


@dataclass(frozen=True)
class CurveServer:
    """A binding socket: its secret key, its ZAP domain, and the check that admits a client by public key."""

    secret: bytes
    domain: str
    check: Callable[[bytes], bool]


@dataclass(frozen=True)
class CurveClient:
    server_public: bytes
    keys: KeyPair


def derive(bus_secret: str, name: str) -> KeyPair:
    """The keypair called ``name``, the same in every process that holds ``bus_secret``."""
    seed = hashlib.sha256(f"inferoxy-bus-curve/{name}/".encode() + bus_secret.encode()).digest()
    secret = z85.encode(seed)
    return KeyPair(public=zmq.curve_public(secret), secret=secret)


def new_keypair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public=public, secret=secret)


def needs_curve(url: str) -> bool:
    """Whether a link between the proxy's components needs CURVE: not inside one process, nor in a private dir."""
    if url.startswith("inproc://"):
        return False
    return not (url.startswith("ipc://") and private_ipc(url.removeprefix("ipc://")))


def private_ipc(path: str) -> bool:
    """An ipc:// socket file only this uid (and root) can reach: its directory is ours, with no group/other bits.

    A relative path or an abstract socket (``@name``) is not private: any local process may dial it.
    """
    if not os.path.isabs(path):
        return False
    try:
        info = os.stat(os.path.dirname(path))
    except OSError:
        return False
    return info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077 == 0


def server_for(bus_secret: str | None, name: str, url: str) -> CurveServer | None:
    """The CURVE server settings of a socket that admits only the proxy's own components; None when plain."""
    if not bus_secret or not needs_curve(url):
        return None
    allowed = derive(bus_secret, COMPONENT_CLIENT).public
    return CurveServer(secret=derive(bus_secret, name).secret, domain=COMPONENTS,
                       check=lambda public: z85.encode(public) == allowed)


def client_for(bus_secret: str | None, server_name: str, url: str) -> CurveClient | None:
    """The CURVE client settings for one of the proxy's components dialling ``server_name`` at ``url``."""
    if not bus_secret or not needs_curve(url):
        return None
    return CurveClient(server_public=derive(bus_secret, server_name).public,
                       keys=derive(bus_secret, COMPONENT_CLIENT))


def apply(sock: zmq.Socket[Any], server: CurveServer | None, client: CurveClient | None) -> None:
    """Set a socket's CURVE options (before bind/connect); a server's check goes to its context's ZAP handler."""
    if server is not None:
        zap_handler(sock.context).set_check(server.domain, server.check)
        sock.curve_server = True
        sock.curve_secretkey = server.secret
        sock.zap_domain = server.domain.encode()
    if client is not None:
        sock.curve_serverkey = client.server_public
        sock.curve_publickey = client.keys.public
        sock.curve_secretkey = client.keys.secret


class ZapHandler(threading.Thread):
    """Answers libzmq's authentication requests for one context: CURVE only, per domain.

    Its socket is made on a shadow of the context, so ``ctx.destroy()`` (which closes only the
    sockets of the context object it is called on) does not close it under this thread;
    the terminating context wakes it with ETERM instead, and it closes its socket itself.
    """

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        super().__init__(name="zap", daemon=True)
        self._key = ctx.underlying
        self._checks: dict[str, Callable[[bytes], bool]] = {}
        self._sock: zmq.Socket[Any] = zmq.Context.shadow(ctx.underlying).socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)

    def set_check(self, domain: str, check: Callable[[bytes], bool]) -> None:
        self._checks[domain] = check

    def run(self) -> None:
        try:
            while True:
                request = self._sock.recv_multipart()
                self._sock.send_multipart(self.answer(request))
        except zmq.ContextTerminated:
            pass
        finally:
            # Forgotten before the socket closes, which is what lets the context's termination finish: a
            # new context at the same address never finds this dead handler.
            with _handlers_lock:
                if _handlers.get(self._key) is self:
                    del _handlers[self._key]
            self._sock.close(linger=0)

    def answer(self, request: list[bytes]) -> list[bytes]:
        """ZAP (RFC 27): version, request id, domain, address, identity, mechanism, credentials."""
        if len(request) < 6:
            return [b"1.0", b"", b"500", b"malformed request", b"", b""]
        version, request_id, domain, _address, _identity, mechanism, *credentials = request
        check = self._checks.get(domain.decode(errors="replace"))
        allowed = False
        if mechanism == b"CURVE" and len(credentials) == 1 and check is not None:
            try:
                allowed = bool(check(credentials[0]))
            except Exception:  # a failing check must refuse, not kill the handler
                log.exception("CURVE check for domain %r failed", domain)
        if not allowed:  # debug only: anyone can knock, and the task manager logs refusals (rate-limited)
            log.debug("bus: refused a %s peer on domain %r (unknown key)", mechanism.decode(errors="replace"),
                      domain.decode(errors="replace"))
            return [version, request_id, b"400", b"unknown key", b"", b""]
        # The User-Id each message then carries: the client's public key, which the task manager
        # matches against the replica id it was issued for.
        return [version, request_id, b"200", b"OK", z85.encode(credentials[0]), b""]


_handlers: dict[int, ZapHandler] = {}
_handlers_lock = threading.Lock()


def zap_handler(ctx: zmq.Context[Any]) -> ZapHandler:
    """The context's ZAP handler, started on first use."""
    with _handlers_lock:
        handler = _handlers.get(ctx.underlying)
        if handler is None or not handler.is_alive():
            handler = ZapHandler(ctx)
            handler.start()
            _handlers[ctx.underlying] = handler
        return handler


class ReplicaKeys:
    """The client keypairs issued to the replicas a task manager is running: one each, revoked when it ends.

    ``admits`` runs on the ZAP handler's thread; it reads a set, whose membership test the GIL makes atomic.
    """

    def __init__(self, bus_secret: str) -> None:
        self.server = CurveServer(secret=derive(bus_secret, REPLICA_PORT).secret, domain=REPLICAS, check=self.admits)
        self.server_public = derive(bus_secret, REPLICA_PORT).public
        self._by_replica: dict[str, KeyPair] = {}
        self._admitted: set[bytes] = set()

    def issue(self, replica_id: str) -> dict[str, str]:
        """A fresh keypair for ``replica_id``, as the environment variables the replica runtime reads."""
        keys = self._by_replica[replica_id] = new_keypair()
        self._admitted.add(keys.public)
        return {"INFEROXY_BUS_SERVER_KEY": self.server_public.decode(),
                "INFEROXY_BUS_PUBLIC_KEY": keys.public.decode(),
                "INFEROXY_BUS_SECRET_KEY": keys.secret.decode()}

    def revoke(self, replica_id: str) -> None:
        keys = self._by_replica.pop(replica_id, None)
        if keys is not None:
            self._admitted.discard(keys.public)

    def admits(self, public: bytes) -> bool:
        return z85.encode(public) in self._admitted

    def issued_to(self, replica_id: str, user_id: str | None) -> bool:
        """Whether a message whose ZAP User-Id is ``user_id`` came over the connection of ``replica_id``'s key."""
        keys = self._by_replica.get(replica_id)
        return keys is not None and user_id is not None and keys.public.decode() == user_id


REFUSALS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
REFUSAL_LOG_INTERVAL_S = 10.0


async def log_refusals(sock: zmq.Socket[Any], hint: str, ctx: zmq.asyncio.Context | None = None) -> None:
    """Log (at most once per REFUSAL_LOG_INTERVAL_S, so a flood cannot fill the log) each peer that this
    CURVE server refused during the handshake; ``hint`` says what the usual cause is.

    ``ctx``: for a plain (reactor-driven) socket, the asyncio context it was made on, so the monitor
    socket can be awaited."""
    monitor: zmq.asyncio.Socket
    if ctx is None:
        monitor = sock.get_monitor_socket(REFUSALS)  # type: ignore[assignment]  # an asyncio socket's own
    else:
        address = f"inproc://inferoxy-refusals-{id(sock)}"
        sock.monitor(address, REFUSALS)
        monitor = ctx.socket(zmq.PAIR)
        monitor.connect(address)
    last = -REFUSAL_LOG_INTERVAL_S
    refused = 0
    try:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            refused += 1
            if time.monotonic() - last >= REFUSAL_LOG_INTERVAL_S:
                last = time.monotonic()
                log.warning("refused %d peer(s) without the bus keys at %s (last: %s); %s", refused,
                            event["endpoint"].decode(errors="replace"), zmq.Event(event["event"]).name, hint)
                refused = 0
    finally:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        monitor.close(linger=0)
