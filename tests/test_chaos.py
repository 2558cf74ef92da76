"""Chaos: load through REST, gRPC and ZeroMQ while parts of a real `inferoxy serve` are killed (kill -9).

One proxy (process runtime, two echo replicas) serves a steady load from every bridge while the
test kills, in turn, a replica, the batch manager, the task manager and the REST bridge, each by
the PID `serve` reports. What must hold (issue 9, docs/ARCHITECTURE.md "When a component dies"):

- every request gets exactly one reply: a result or an error, never silence (a client timeout)
  and never a second reply;
- errors only for requests the dead part held: on ZeroMQ the codes are ``replica_lost`` or
  ``unavailable``; REST and gRPC carry no code, so there it is HTTP 503 / gRPC UNAVAILABLE (which
  is what those two codes map to); a connection error only through the killed REST bridge, only
  between its kill and its return;
- the proxy serves again through every bridge without a restart by hand. The time from each
  kill to the first success of a request sent after it is printed per bridge (docs/PERFORMANCE.md);
  the test asserts only that it comes within RECOVERY_WAIT_S, not how fast.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import zmq

from bridges.proto import grpc_predict_v2_pb2 as pb
from bridges.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from inferoxy.wire import encode, unpack_header
from tests.support import ProxyProcess, wait_for

MODELS = """
models:
  echo:
    model_class: examples.models.echo.model:EchoModel
    max_batch_size: 64
    max_batch_delay_ms: 0
    min_replicas: 2
    max_replicas: 2
"""
CLIENT_TIMEOUT_S = 20.0  # past the proxy's own request timeout below: a client timeout means no reply came
WORKERS_PER_BRIDGE = 2
RECOVERY_WAIT_S = 20.0  # the test fails past this; the figures (about a second) are printed, not asserted
ALLOWED_ZMQ = {"replica_lost", "unavailable"}


@dataclass
class Outcome:
    bridge: str
    sent: float
    done: float
    result: str  # "ok", a ZeroMQ error code, "http 503", "grpc UNAVAILABLE", "connection", "no reply", ...
    detail: str = ""


class Load:
    """Sequential requests from a few workers per bridge until stopped; every outcome is kept."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=worker, daemon=True, name=f"load-{worker.__name__}-{n}")
            for worker in (self._rest, self._grpc, self._zmq) for n in range(WORKERS_PER_BRIDGE)
        ]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT_S + 5)
        assert not any(t.is_alive() for t in self.threads), "a load worker hung"

    def _record(self, bridge: str, sent: float, result: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes.append(Outcome(bridge, sent, time.monotonic(), result, detail))

    def since(self, when: float) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if o.sent >= when]

    def _rest(self) -> None:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        url = f"{self.proxy.rest_url}/v2/models/echo/infer"
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as http:
            while not self.stopping.is_set():
                sent = time.monotonic()
                try:
                    response = http.post(url, json=body)
                except httpx.TimeoutException as exc:
                    self._record("rest", sent, "no reply", repr(exc))
                except httpx.TransportError as exc:
                    self._record("rest", sent, "connection", repr(exc))
                    self.stopping.wait(0.05)  # the bridge is down: do not spin on refused connections
                else:
                    ok = response.status_code == 200 and response.json()["outputs"][0]["data"] == [1, 2, 3, 4]
                    self._record("rest", sent, "ok" if ok else f"http {response.status_code}", response.text[:200])

    def _grpc(self) -> None:
        request = pb.ModelInferRequest(model_name="echo")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
        with grpc.insecure_channel(f"127.0.0.1:{self.proxy.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not self.stopping.is_set():
                sent = time.monotonic()
                try:
                    response = stub.ModelInfer(request, timeout=CLIENT_TIMEOUT_S)
                except grpc.RpcError as exc:
                    # DEADLINE_EXCEEDED is the proxy's own deadline too (10 s); only the client's (20 s) is silence.
                    timed_out = time.monotonic() - sent >= CLIENT_TIMEOUT_S
                    result = "no reply" if timed_out else f"grpc {exc.code().name}"
                    self._record("grpc", sent, result, str(exc.details()))
                else:
                    same = response.raw_output_contents[0] == request.raw_input_contents[0]
                    self._record("grpc", sent, "ok" if same else "wrong answer")

    def _zmq(self) -> None:
        # A raw DEALER, one request at a time: any reply that is not for the request in flight is a second reply.
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.proxy.zmq_url)
        ids = itertools.count(1)
        try:
            while not self.stopping.is_set():
                rid = next(ids)
                sent = time.monotonic()
                sock.send_multipart(encode({"id": rid, "model": "echo"}, [("x", np.ones((1, 4), np.float32))]))
                if not sock.poll(int(CLIENT_TIMEOUT_S * 1000)):
                    self._record("zmq", sent, "no reply")
                    continue
                header = unpack_header(sock.recv_multipart()[0])
                if header.get("id") != rid:
                    self._record("zmq", sent, "second reply", repr(header))
                elif header.get("ok"):
                    self._record("zmq", sent, "ok")
                else:
                    self._record("zmq", sent, header["error"]["code"], header["error"]["message"])
        finally:
            sock.close()
            ctx.term()


def recovered(load: Load, killed_at: float) -> dict[str, float] | None:
    """Per bridge, seconds from the kill to the first success of a request sent after it; None until all three."""
    firsts: dict[str, float] = {}
    for outcome in load.since(killed_at):
        if outcome.result == "ok":
            firsts[outcome.bridge] = min(firsts.get(outcome.bridge, float("inf")), outcome.done - killed_at)
    return firsts if len(firsts) == 3 else None


def kill_and_recover(proxy: ProxyProcess, load: Load, what: str, pid_of: Callable[[], int]) -> dict[str, float]:
    pid = pid_of()
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    times = wait_for(lambda: recovered(load, killed_at), timeout=RECOVERY_WAIT_S, interval=0.05,
                     what=f"every bridge to serve again after killing the {what}")
    # Let what the kill set in motion settle (replacement replicas, restarted components) before the next one.
    wait_for(lambda: len(proxy.replica_pids("echo")) == 2, timeout=RECOVERY_WAIT_S, what="two echo replicas")
    settle = time.monotonic()
    wait_for(lambda: recovered(load, settle), timeout=RECOVERY_WAIT_S, what="steady serving")
    return times


def test_chaos_kill_each_part_under_load(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    env = {"INFEROXY_MODELS_FILE": str(models), "INFEROXY_REQUEST_TIMEOUT_S": "10"}
    with ProxyProcess(env=env) as proxy:
        wait_for(lambda: len(proxy.replica_pids("echo")) == 2, timeout=30, what="two echo replicas")
        start = time.monotonic()
        with Load(proxy) as load:
            wait_for(lambda: recovered(load, start), timeout=30, what="load served through every bridge")
            kills: list[tuple[str, float, float, dict[str, float]]] = []
            for what, pid_of in (
                ("replica", lambda: proxy.replica_pids("echo")[0]),
                ("batch_manager", lambda: proxy.component_pids()["batch_manager"]),
                ("task_manager", lambda: proxy.component_pids()["task_manager"]),
                ("rest_bridge", lambda: proxy.component_pids()["rest_bridge"]),
            ):
                before = time.monotonic()
                times = kill_and_recover(proxy, load, what, pid_of)
                kills.append((what, before, time.monotonic(), times))
        assert proxy.process is not None and proxy.process.poll() is None, "serve itself must keep running"
        assert "rest_bridge is back" in "".join(proxy.output)
        if os.environ.get("CHAOS_LOG"):
            Path(os.environ["CHAOS_LOG"]).write_text("".join(proxy.output))

    outcomes = load.outcomes
    for what, _, _, times in kills:
        print(f"chaos recovery after killing the {what}: "
              + ", ".join(f"{bridge} {seconds:.2f}s" for bridge, seconds in sorted(times.items())))
    by_result: dict[str, int] = {}
    for outcome in outcomes:
        by_result[f"{outcome.bridge} {outcome.result}"] = by_result.get(f"{outcome.bridge} {outcome.result}", 0) + 1
    print(f"chaos outcomes: {dict(sorted(by_result.items()))}")
    for detail in sorted({f"{o.bridge} {o.result}: {o.detail[:150]}" for o in outcomes if o.result != "ok"}):
        print(f"chaos error: {detail}")

    assert sum(o.result == "ok" for o in outcomes) > 100, by_result
    rest_kill_window = next((start, end) for what, start, end, _ in kills if what == "rest_bridge")
    for outcome in outcomes:
        if outcome.result == "ok":
            continue
        assert outcome.result not in ("no reply", "second reply", "wrong answer"), outcome
        if outcome.bridge == "zmq":
            assert outcome.result in ALLOWED_ZMQ, outcome
        elif outcome.bridge == "grpc":
            assert outcome.result == "grpc UNAVAILABLE", outcome
        elif outcome.result == "connection":  # only the killed REST bridge, and only around its kill
            assert rest_kill_window[0] <= outcome.done <= rest_kill_window[1], outcome
        else:
            assert outcome.result == "http 503", outcome
