"""``inferoxy status`` (inferoxy/status_cli.py): the text picture as a pure function, and the command against a
running proxy (``--json``, the tables, ``--watch``, a refused key)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from inferoxy import status_cli
from inferoxy.admin_cli import REFUSED, UNREACHABLE, USAGE
from inferoxy.cli import main as cli_main
from inferoxy.status_cli import CLEAR, render
from tests.support import REPO, ProxyProcess, free_port

STATE: dict[str, Any] = {
    "time": 1_700_000_000.0,
    "window_s": 10.0,
    "registry_revision": 3,
    "totals": {"requests": 130, "errors": 5, "request_rate": 12.5, "error_rate": 0.5},
    "components": {"batch_manager": True, "task_manager": False},
    "models": [
        {"name": "echo", "version": "1", "default": True, "loaded": True, "state": "ready", "reason": None,
         "ready_replicas": 2, "desired_replicas": 2, "restarts": 1,
         "replicas": [{"id": "p-echo-1-0-aa", "state": "ready", "gpu": "0", "pid": 42, "uptime_s": 3725.0,
                       "ready_for_s": 3700.0},
                      {"id": "p-echo-1-1-bb", "state": "starting", "gpu": None, "pid": None, "uptime_s": 4.2,
                       "ready_for_s": None}],
         "queue_depth": 7, "batches_in_flight": 1, "sessions_open": 0, "requests": 130, "errors": 5,
         "requests_by_bridge": {"rest": 100, "zmq": 30}, "request_rate": 12.5, "error_rate": 0.5,
         "latency_p50_s": 0.00042, "latency_p99_s": 0.0375, "batch_size_mean": 3.25},
        {"name": "digits", "version": "2", "default": False, "loaded": True, "state": "failed",
         "reason": "image inferoxy/digits not found\nsecond line", "ready_replicas": 0, "desired_replicas": 1,
         "restarts": 0, "replicas": [], "queue_depth": 0, "batches_in_flight": 0, "sessions_open": 0,
         "requests": 0, "errors": 0, "requests_by_bridge": {}, "request_rate": 0.0, "error_rate": 0.0,
         "latency_p50_s": None, "latency_p99_s": None, "batch_size_mean": None},
    ],
    "problems": ["the serving statuses cannot be read from Redis: ConnectionError"],
}


def test_render_shows_models_replicas_rates_latency_and_why_not_ready() -> None:
    text = render(STATE, "http://127.0.0.1:8698")
    lines = text.splitlines()
    assert lines[0] == ("Inferoxy at http://127.0.0.1:8698 · 2 model versions, 1 ready · 130 requests, 5 errors · "
                        "12.5 req/s (last 10.0 s)")
    assert "batch_manager up" in lines[1] and "task_manager DOWN" in lines[1]
    echo = next(line for line in lines if line.startswith("echo "))
    assert echo.split() == ["echo", "1*", "ready", "2/2", "7", "1", "130", "5", "12.5", "420", "µs", "37.5", "ms",
                            "3.2"]
    digits = next(line for line in lines if line.startswith("digits "))
    assert digits.split()[:4] == ["digits", "2", "failed", "0/1"] and digits.split()[-3:] == ["-", "-", "-"]
    replica = next(line for line in lines if line.startswith("p-echo-1-0-aa"))
    assert replica.split() == ["p-echo-1-0-aa", "echo/1", "ready", "GPU", "0", "42", "1h02m", "1"]
    starting = next(line for line in lines if line.startswith("p-echo-1-1-bb"))
    assert starting.split() == ["p-echo-1-1-bb", "echo/1", "starting", "CPU", "-", "4s", "1"]
    # The reason's first line only: a failed model's log tail would flood the screen.
    assert "  digits/2 failed: image inferoxy/digits not found" in lines and "second line" not in text
    assert lines[-1] == "problem: the serving statuses cannot be read from Redis: ConnectionError"


def test_an_idle_model_is_not_listed_as_not_ready() -> None:
    # Scaled to zero is a normal state (its next request starts a replica): its reason is no problem to show.
    idle = {**STATE["models"][1], "name": "lazy", "state": "idle", "desired_replicas": 0,
            "reason": "scaled to zero (min_replicas is 0 and no request came for scale_down_delay_s)"}
    text = render({**STATE, "models": [STATE["models"][0], idle]}, "http://127.0.0.1:8698")
    assert "lazy " in text and "scaled to zero" not in text and "not ready:" not in text


def test_render_with_nothing_yet() -> None:
    text = render({"window_s": None, "totals": {"requests": 0, "errors": 0, "request_rate": None},
                   "components": {}, "models": [], "problems": []})
    assert "no rate yet" in text and "no model is registered" in text and "no replica is running" in text


class Answers:
    """An AdminClient stand-in that answers each GET with the next document."""

    url = "http://proxy"

    def __init__(self, *documents: dict[str, Any]) -> None:
        self.documents = list(documents)
        self.calls = 0

    def call(self, method: str, path: str) -> dict[str, Any]:
        assert (method, path) == ("GET", "/dashboard/state")
        self.calls += 1
        return self.documents.pop(0) if len(self.documents) > 1 else self.documents[0]


def test_a_one_off_look_waits_for_the_rates(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The bridge's first sample has no rates; the bridge may space samples out, so the CLI asks a few times."""
    monkeypatch.setattr(status_cli, "SECOND_LOOK_S", 0.0)
    first = {**STATE, "window_s": None}
    client = Answers(first, first, STATE)
    assert status_cli.show_status(client, argparse.Namespace(json=True, watch=None, count=None)) == 0  # type: ignore[arg-type]
    assert client.calls == 3 and json.loads(capsys.readouterr().out)["window_s"] == 10.0

    monkeypatch.setattr(status_cli, "RATES_WAIT_S", 0.0)
    client = Answers(first)
    assert status_cli.show_status(client, argparse.Namespace(json=False, watch=None, count=None)) == 0  # type: ignore[arg-type]
    assert client.calls == 1 and "no rate yet" in capsys.readouterr().out


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert cli_main(["status", "--url", url, "--watch", "0"]) == USAGE
    assert cli_main(["status", "--url", url, "--count", "2"]) == USAGE
    assert cli_main(["status", "--url", url, "--timeout", "2"]) == UNREACHABLE
    assert "cannot reach the proxy" in capsys.readouterr().err


# -- against a running proxy --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    # The README's models, echo placed on a GPU: INFEROXY_GPUS declares one (the process runtime only hands the
    # replica its id), so the GPU column is checked end to end on a machine without one.
    models = yaml.safe_load((REPO / "models.yaml").read_text())
    models["models"]["echo"]["run_on_gpu"] = True
    models_file = tmp_path_factory.mktemp("status") / "models.yaml"
    models_file.write_text(yaml.safe_dump(models))
    env = {"INFEROXY_AUTH_METADATA": "true", "INFEROXY_GPUS": "7", "INFEROXY_MODELS_FILE": str(models_file)}
    with ProxyProcess(env=env) as running:
        yield running


def status(proxy: ProxyProcess, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "INFEROXY_ADMIN_KEY"}
    if key is not None:
        env["INFEROXY_ADMIN_KEY"] = key
    return subprocess.run([sys.executable, "-m", "inferoxy", "status", "--url", proxy.rest_url, *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)


def wait_ready(proxy: ProxyProcess) -> dict[str, Any]:
    """The state once every model of models.yaml has its replica ready (the JSON is polled, with a deadline)."""
    from tests.support import wait_for

    def ready() -> dict[str, Any] | None:
        state = httpx.get(f"{proxy.rest_url}/dashboard/state", timeout=10).json()
        rows = {m["name"]: m for m in state["models"]}
        if all(rows.get(n, {}).get("ready_replicas") == 1 for n in ("echo", "digits", "digits-onnx", "counter")):
            return dict(state)
        return None

    return wait_for(ready, timeout=60, interval=0.2, what="every model's replica to be ready")


def test_json_prints_the_state_with_rates(proxy: ProxyProcess) -> None:
    wait_ready(proxy)
    for _ in range(5):
        body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
        assert httpx.post(f"{proxy.rest_url}/v2/models/echo/infer", json=body, timeout=30).status_code == 200
    result = status(proxy, "--json")
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    rows = {f"{m['name']}/{m['version']}": m for m in state["models"]}
    assert set(rows) == {"echo/1", "digits/1", "digits-onnx/1", "counter/1"}
    echo = rows["echo/1"]
    assert echo["state"] == "ready" and len(echo["replicas"]) == 1 and echo["replicas"][0]["state"] == "ready"
    assert echo["replicas"][0]["uptime_s"] > 0
    assert echo["replicas"][0]["gpu"] == "7" and rows["digits/1"]["replicas"][0]["gpu"] is None
    # A one-off look waits for a second sample, so the rates are there.
    assert state["window_s"] is not None and echo["request_rate"] is not None
    assert state["components"]["rest_bridge"] is True


def test_the_tables_and_watch(proxy: ProxyProcess) -> None:
    wait_ready(proxy)
    table = status(proxy)
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith(f"Inferoxy at {proxy.rest_url}")
    assert any(line.split()[:3] == ["echo", "1*", "ready"] for line in table.stdout.splitlines()), table.stdout
    replica = next(line for line in table.stdout.splitlines() if " echo/1 " in line)
    assert replica.split()[2:5] == ["ready", "GPU", "7"], replica

    watched = status(proxy, "--watch", "0.2", "--count", "3")
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.count(CLEAR) == 3 and watched.stdout.count("Inferoxy at ") == 3

    watched_json = status(proxy, "--json", "--watch", "0.2", "--count", "2")
    assert watched_json.returncode == 0 and CLEAR not in watched_json.stdout


def test_a_key_is_needed_once_keys_are_on(proxy: ProxyProcess) -> None:
    created = httpx.post(f"{proxy.rest_url}/v2/admin/keys", json={"name": "status-reader", "scopes": ["infer"]},
                         timeout=30)
    assert created.status_code in (200, 201), created.text
    refused = status(proxy, "--json")
    assert refused.returncode == REFUSED and "HTTP 401" in refused.stderr
    wrong = status(proxy, "--json", key="ixk_" + "A" * 43)
    assert wrong.returncode == REFUSED
    # An infer key on every model may see every model's traffic.
    allowed = status(proxy, "--json", key=created.json()["key"])
    assert allowed.returncode == 0, allowed.stderr
    assert {m["name"] for m in json.loads(allowed.stdout)["models"]} == {"echo", "digits", "digits-onnx", "counter"}
