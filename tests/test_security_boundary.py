"""The attacks of issue 10 on Redis, the bus and replicas, tried against a whole proxy (`inferoxy serve`).

An attacker here is a local process: it can dial every loopback port, knows the protocols and
can guess replica ids, but holds none of the secrets `serve` made at start.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import zmq
import zmq.utils.monitor

from inferoxy import wire
from inferoxy.client import Client
from model_manager.spec import ModelSpec
from tests.support import ProxyProcess, wait_for

# Secrets in the proxy's environment that no replica may see (issue 10, item 5), and that no log may show.
PROXY_SECRETS = {
    "INFEROXY_ADMIN_KEY": "admin-key-7f3a9c",
    "INFEROXY_REGISTRY_USERNAME": "robot",
    "INFEROXY_REGISTRY_PASSWORD": "registry-password-51be0d",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-9d04e2",  # not ours at all: an allow-list, not a deny-list
}
# The clients' port is encrypted: clients need its public key.
PORT_PUBLIC, PORT_SECRET = (key.decode() for key in zmq.curve_keypair())
HANDSHAKE_REFUSED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED)
WAIT_S = 20.0


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    env = {**PROXY_SECRETS, "INFEROXY_ZMQ_CURVE_SECRET_KEY": PORT_SECRET, "LC_ALL": "C.UTF-8"}
    with ProxyProcess(env=env) as running:
        with Client(running.zmq_url, timeout=30, server_key=PORT_PUBLIC) as client:  # the echo replica is up
            client.infer("echo", {"x": np.zeros(1, np.float32)})
        yield running


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def find_process(proxy: ProxyProcess, matches: Callable[[int], bool], what: str) -> int:
    found = wait_for(lambda: next((pid for pid in proxy.pids() if matches(pid)), None), timeout=WAIT_S, what=what)
    assert found is not None
    return found


def task_manager_env(proxy: ProxyProcess) -> dict[str, str]:
    """What serve handed its components: where the secrets it made can be read (by the same user)."""
    return environ(find_process(proxy, lambda pid: "inferoxy run task_manager" in cmdline(pid), "the task manager"))


def echo_replica_pid(proxy: ProxyProcess) -> int:
    def is_echo_replica(pid: int) -> bool:
        return "inferoxy.runtime" in cmdline(pid) and environ(pid).get("INFEROXY_MODEL_NAME") == "echo"

    return find_process(proxy, is_echo_replica, "the echo replica")


def attacker(url: str, identity: bytes | None = None, keys: tuple[bytes, bytes, bytes] | None = None
             ) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if keys is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys
    return sock


def dial_and_send(sock: zmq.Socket[Any], url: str, frames: list[Any]) -> int:
    """Connect, queue ``frames``, and return how the handshake was refused; nothing may come back."""
    monitor_event: list[int] = []
    monitor: zmq.Socket[Any] = sock.get_monitor_socket(HANDSHAKE_REFUSED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(url)
        sock.send_multipart(frames)
        assert monitor.poll(int(WAIT_S * 1000)), "the connection was neither refused nor accepted"
        monitor_event.append(zmq.utils.monitor.recv_monitor_message(monitor)["event"])
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
    assert monitor_event[0] != zmq.EVENT_HANDSHAKE_SUCCEEDED, "a peer without the keys completed the handshake"
    assert sock.poll(0) == 0  # never connected, so nothing can have been delivered to it
    return monitor_event[0]


# --- item 3: no way in through Redis -------------------------------------------------------------


def test_the_banner_and_the_log_never_show_the_redis_password(proxy: ProxyProcess) -> None:
    redis_url = task_manager_env(proxy)["INFEROXY_REDIS_URL"]
    password = redis.connection.parse_url(redis_url)["password"]
    assert len(password) >= 32  # made by serve: 32 random bytes
    banner = next(line for line in proxy.output if line.startswith("  model registry"))
    assert re.search(r"redis://:\*\*\*\*@127\.0\.0\.1:\d+", banner), banner
    bus_secret = task_manager_env(proxy)["INFEROXY_BUS_SECRET"]
    for secret in (password, bus_secret, PORT_SECRET, *PROXY_SECRETS.values()):
        assert secret not in proxy.log(), f"{secret[:4]}... is in the log"


def test_a_local_process_without_the_password_can_neither_write_nor_read_a_spec(proxy: ProxyProcess,
                                                                                tmp_path: Path) -> None:
    """Attack: write a spec whose command runs a shell straight into the embedded Redis, bypassing the admin key."""
    port = int(proxy.env["INFEROXY_EMBEDDED_REDIS_PORT"])
    evil = ModelSpec(name="evil", command=["sh", "-c", f"touch {tmp_path}/owned"]).model_dump_json()
    intruder = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        intruder.hset("inferoxy:models", "evil/1", evil)
    with pytest.raises(redis.AuthenticationError):
        intruder.keys("*")
    with pytest.raises(redis.AuthenticationError):  # a wrong password is refused like none
        intruder.execute_command("AUTH", "guess")
    # With the password the same connection works, and shows that nothing was written.
    registry = redis.Redis.from_url(task_manager_env(proxy)["INFEROXY_REDIS_URL"], socket_timeout=5)
    assert registry.hexists("inferoxy:models", "echo/1")
    assert not registry.hexists("inferoxy:models", "evil/1")
    assert not (tmp_path / "owned").exists()


# --- item 4: no way in through the bus --------------------------------------------------------------


def test_a_socket_without_the_bus_keys_gets_nothing_from_the_batch_manager(proxy: ProxyProcess) -> None:
    """Attack: dial the batch manager like a bridge and submit a request (or read replies)."""
    url = proxy.env["INFEROXY_BATCH_MANAGER_URL"]
    request = wire.encode({"t": "infer", "id": 1, "model": "echo", "version": None, "timeout_ms": None,
                           "params": {}}, [("x", np.zeros(1, np.float32))])
    with attacker(url) as plain:
        dial_and_send(plain, url, request)
    server_guess = zmq.curve_keypair()[0]  # a CURVE peer that does not know the server's key either
    with attacker(url, keys=(server_guess, *zmq.curve_keypair())) as guessing:
        dial_and_send(guessing, url, request)
    with Client(proxy.zmq_url, timeout=30, server_key=PORT_PUBLIC) as client:  # the real path still works
        np.testing.assert_array_equal(client.infer("echo", {"x": np.ones(3, np.float32)})["x"], np.ones(3))


def test_a_socket_dialling_the_replica_port_as_a_replica_gets_no_batch(proxy: ProxyProcess) -> None:
    """Attack: dial the replica port with the real replica's id (and the old predictable ones), say
    `ready`, and wait for other clients' inputs."""
    url = proxy.env["INFEROXY_REPLICA_BIND_URL"]
    real_id = environ(echo_replica_pid(proxy))["INFEROXY_REPLICA_ID"]
    assert re.fullmatch(r".*-0-[0-9a-f]{12}", real_id), real_id  # unguessable: a random suffix
    guesses = [real_id, real_id.rsplit("-", 1)[0], re.sub(r"-0-[0-9a-f]{12}$", "-1", real_id)]
    for guess in guesses:
        ready = [wire.pack_header({"t": "ready", "replica": guess, "model": "echo", "version": "1",
                                   "capacity": 64, "pid": 1})]
        with attacker(url, identity=guess.encode()) as impostor:
            dial_and_send(impostor, url, ready)
    with Client(proxy.zmq_url, timeout=30, server_key=PORT_PUBLIC) as client:
        for i in range(50):
            x = np.full(4, i, np.float32)
            np.testing.assert_array_equal(client.infer("echo", {"x": x})["x"], x)


def test_the_clients_port_is_encrypted_and_refuses_a_client_without_its_key(proxy: ProxyProcess) -> None:
    with Client(proxy.zmq_url, timeout=30, server_key=PORT_PUBLIC) as client:
        np.testing.assert_array_equal(client.infer("echo", {"x": np.arange(3.0)})["x"], np.arange(3.0))
    request = wire.encode({"t": "infer", "id": 1, "model": "echo"}, [("x", np.zeros(1))])
    with attacker(proxy.zmq_url) as plain:  # a client that does not know the port is encrypted
        dial_and_send(plain, proxy.zmq_url, request)
    wrong_server_key = zmq.curve_keypair()[0]
    with attacker(proxy.zmq_url, keys=(wrong_server_key, *zmq.curve_keypair())) as wrong:
        dial_and_send(wrong, proxy.zmq_url, request)
    banner = next(line for line in proxy.output if "ZeroMQ clients" in line)
    assert PORT_PUBLIC in banner  # what clients need; the secret key is never shown


# --- item 5: replicas get only what they need -----------------------------------------------------------


def test_a_replica_sees_none_of_the_proxys_secrets(proxy: ProxyProcess) -> None:
    components = task_manager_env(proxy)
    replica = environ(echo_replica_pid(proxy))
    secrets = {
        **PROXY_SECRETS,
        "INFEROXY_REDIS_URL": components["INFEROXY_REDIS_URL"],
        "INFEROXY_BUS_SECRET": components["INFEROXY_BUS_SECRET"],
        "INFEROXY_EMBEDDED_REDIS_PASSWORD": components["INFEROXY_EMBEDDED_REDIS_PASSWORD"],
        "INFEROXY_ZMQ_CURVE_SECRET_KEY": PORT_SECRET,
    }
    for name, value in secrets.items():
        assert name not in replica, f"{name} reached the replica"
        assert not any(value in seen for seen in replica.values()), f"the value of {name} reached the replica"
    assert not any(name.startswith("INFEROXY_") and name not in ALLOWED_INFEROXY for name in replica), replica
    # What it needs: where to dial, who it is, its own keys, and what runs Python here.
    assert replica["INFEROXY_REPLICA_URL"] == proxy.env["INFEROXY_REPLICA_BIND_URL"]
    assert replica["INFEROXY_REPLICA_ID"] and replica["INFEROXY_MODEL_CLASS"]
    spec = json.loads(replica["INFEROXY_MODEL_SPEC"])
    assert "env" not in spec and "command" not in spec, spec
    assert all(len(replica[name]) == 40 for name in ("INFEROXY_BUS_SERVER_KEY", "INFEROXY_BUS_PUBLIC_KEY",
                                                     "INFEROXY_BUS_SECRET_KEY"))
    assert replica["PATH"] == proxy.env["PATH"] and replica["LC_ALL"] == "C.UTF-8"
    if "PYTHONPATH" in proxy.env:
        assert replica["PYTHONPATH"] == proxy.env["PYTHONPATH"]


ALLOWED_INFEROXY = {
    "INFEROXY_REPLICA_URL", "INFEROXY_REPLICA_ID", "INFEROXY_MODEL_NAME", "INFEROXY_MODEL_VERSION",
    "INFEROXY_MODEL_CLASS", "INFEROXY_HEARTBEAT_INTERVAL_S", "INFEROXY_HEARTBEAT_LIVENESS", "INFEROXY_LOG_LEVEL",
    "INFEROXY_LOG_FORMAT", "INFEROXY_BUS_SERVER_KEY", "INFEROXY_BUS_PUBLIC_KEY", "INFEROXY_BUS_SECRET_KEY",
    # The spec less env and command (Model.spec): checked above to carry neither.
    "INFEROXY_MODEL_SPEC",
}
