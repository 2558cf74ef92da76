"""`inferoxy serve` brings its components back: each one killed (kill -9, by the PID serve prints) or stopped.

Before: a dead component made `serve` exit with status 1, and a SIGSTOPped one went unnoticed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from bridges.proto import grpc_predict_v2_pb2 as pb
from bridges.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from inferoxy.client import Client, InferenceError
from inferoxy.settings import Settings
from inferoxy.supervisor import COMPONENT_CRASH_LOOP, Child, Supervisor, restart_delay
from tests.support import ProxyProcess, alive, wait_for

MODELS = """
models:
  echo:
    model_class: examples.models.echo.model:EchoModel
    max_batch_size: 8
    max_batch_delay_ms: 0
"""


def serves_everywhere(proxy: ProxyProcess) -> bool:
    """One request through each bridge; False on any error (the caller polls)."""
    try:
        response = httpx.post(f"{proxy.rest_url}/v2/models/echo/infer", timeout=5, json={
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]})
        if response.status_code != 200:
            return False
        with grpc.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
            request = pb.ModelInferRequest(model_name="echo")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
            request.raw_input_contents.append(np.ones(2, np.float32).tobytes())
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
        with Client(proxy.zmq_url, timeout=5) as client:
            client.infer("echo", {"x": np.ones((1, 2), np.float32)})
    except Exception:
        return False
    return True


def echo_ready(proxy: ProxyProcess) -> bool:
    try:
        return httpx.get(f"{proxy.rest_url}/v2/models/echo/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_every_component_killed_or_stopped_comes_back_and_serving_resumes(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    # Port 0: the embedded Redis picks a free port, and must come back on that same one.
    env = {"INFEROXY_MODELS_FILE": str(models), "INFEROXY_EMBEDDED_REDIS_PORT": "0"}
    with ProxyProcess(env=env) as proxy:
        wait_for(lambda: serves_everywhere(proxy), timeout=30, interval=0.1, what="first answers")
        pids = proxy.component_pids()
        assert set(pids) == {"model_manager", "task_manager", "batch_manager", "job_worker", "rest_bridge",
                             "zmq_bridge", "grpc_bridge"}, pids

        # A stopped task manager is noticed by its peers: its status expires, so /ready stops saying ready.
        task_manager = pids["task_manager"]
        os.kill(task_manager, signal.SIGSTOP)
        try:
            wait_for(lambda: not echo_ready(proxy), timeout=15, interval=0.1, what="/ready to turn false")
        finally:
            os.kill(task_manager, signal.SIGCONT)
        wait_for(lambda: echo_ready(proxy) and serves_everywhere(proxy), timeout=30, interval=0.1,
                 what="serving once the task manager is continued")

        # A stopped batch manager: bridges notice its silence and answer `unavailable` instead of waiting 30 s.
        batch_manager = pids["batch_manager"]
        os.kill(batch_manager, signal.SIGSTOP)
        try:
            with Client(proxy.zmq_url, timeout=20) as client, pytest.raises(InferenceError) as refused:
                client.infer("echo", {"x": np.ones((1, 2), np.float32)})
            assert refused.value.code == "unavailable", refused.value
        finally:
            os.kill(batch_manager, signal.SIGCONT)
        wait_for(lambda: serves_everywhere(proxy), timeout=30, interval=0.1,
                 what="serving once the batch manager is continued")

        for name in ("model_manager", "task_manager", "batch_manager", "rest_bridge", "grpc_bridge", "zmq_bridge"):
            old = proxy.component_pids()[name]
            os.kill(old, signal.SIGKILL)
            new = wait_for(lambda name=name, old=old: proxy.component_pids()[name] != old
                           and proxy.component_pids()[name], timeout=30, what=f"{name} back")
            assert alive(new) and not alive(old)
            wait_for(lambda: serves_everywhere(proxy), timeout=30, interval=0.1, what=f"serving after {name}")
            if name == "model_manager":
                # Same Redis port, re-seeded; the task manager's next refresh writes the status into it.
                environ = Path(f"/proc/{new}/environ").read_bytes().split(b"\0")
                port = [v for v in environ if v.startswith(b"INFEROXY_EMBEDDED_REDIS_PORT=")]
                assert port and port[0] != b"INFEROXY_EMBEDDED_REDIS_PORT=0", port
                wait_for(lambda: echo_ready(proxy), timeout=15, interval=0.1, what="/ready after the registry's return")

        assert proxy.process is not None and proxy.process.poll() is None, "serve keeps running"
        assert proxy.stop() == 0


def test_a_component_that_keeps_dying_is_a_crash_loop_and_stops_serve(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(restart_backoff_s=0.5, restart_backoff_max_s=30.0)
    supervisor = Supervisor(settings)
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    child = Child("batch_manager", process, None, started_at=time.monotonic())
    for _ in range(COMPONENT_CRASH_LOOP - 1):
        assert supervisor._schedule_restart(child), "restarted while not yet a crash loop"
        child.restart_at = None
    assert not supervisor._schedule_restart(child), "the crash loop must stop serve"
    assert "batch_manager" in caplog.records[-1].getMessage() and "crash loop" in caplog.records[-1].getMessage()


def test_a_component_that_served_a_while_is_not_a_crash_loop() -> None:
    supervisor = Supervisor(Settings(restart_backoff_max_s=1.0))
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    child = Child("rest_bridge", process, None, started_at=time.monotonic() - 5.0)
    for _ in range(COMPONENT_CRASH_LOOP + 2):
        assert supervisor._schedule_restart(child)
        assert child.deaths == 1 and child.restart_at is not None and child.restart_at <= time.monotonic()


@pytest.mark.parametrize(("deaths", "delay"), [(1, 0.0), (2, 0.5), (3, 1.0), (4, 2.0), (20, 30.0)])
def test_restart_backoff(deaths: int, delay: float) -> None:
    assert restart_delay(deaths, 0.5, 30.0) == delay
