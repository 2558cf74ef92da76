"""Prometheus metrics (issue 11): what each bridge counts, what GET /metrics shows, who may read it, the
catalogue against docs/METRICS.md, and `inferoxy run COMPONENT --metrics-port N`.

Counts are read the way Prometheus reads them: GET /metrics, parsed by prometheus-client's own parser.
The in-process bridges (tests/bridge_harness.py) record into this test process's registry, which other
tests may have moved before, so those tests compare before and after.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from bridges.catalog import Catalog
from bridges.metering import Meter, clock
from bridges.proto import grpc_predict_v2_pb2 as pb
from inferoxy import metrics
from inferoxy.client import Client, InferenceError
from inferoxy.protocol import ErrorCode
from model_manager.spec import ModelSpec
from model_manager.store import Registry
from tests.bridge_harness import WAIT_S, BridgeStack
from tests.models_for_tests import SLOW_MODEL_SLEEPING
from tests.support import REPO, ProxyProcess, free_port, wait_for
from tests.test_api_keys import create_key

Key = tuple[str, str, str, str]  # bridge, model, version, code (or outcome)
BRIDGES = ("rest", "grpc", "zmq")
ROW = np.arange(3, dtype=np.float32)[None]


# -- reading GET /metrics ------------------------------------------------------------------------


def scrape(rest_url: str, key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{rest_url}/metrics", headers=headers, timeout=WAIT_S)
    assert response.status_code == 200, response.text
    return response.text


def requests_counted(text: str) -> collections.Counter[Key]:
    """``inferoxy_requests_total`` by (bridge, model, version, code)."""
    found: collections.Counter[Key] = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "inferoxy_requests_total":
                labels = sample.labels
                found[(labels["bridge"], labels["model"], labels["version"], labels["code"])] += int(sample.value)
    return found


def latencies_counted(text: str) -> collections.Counter[Key]:
    """How many latencies ``inferoxy_request_duration_seconds`` holds, by (bridge, model, version, outcome)."""
    found: collections.Counter[Key] = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "inferoxy_request_duration_seconds_count":
                labels = sample.labels
                found[(labels["bridge"], labels["model"], labels["version"], labels["outcome"])] += int(sample.value)
    return found


def moved(before: collections.Counter[Key], after: collections.Counter[Key]) -> dict[Key, int]:
    return {key: after[key] - before[key] for key in after if after[key] != before[key]}


def settled(rest_url: str, before: str, expected: dict[Key, int]) -> str:
    """The scrape once ``inferoxy_requests_total`` moved by ``expected`` since ``before`` (polled: other
    processes flush every metrics.FLUSH_S); a timeout shows what moved instead."""
    counted_before = requests_counted(before)
    deadline = time.monotonic() + 10 * metrics.FLUSH_S + 5
    while True:
        after = scrape(rest_url)
        if moved(counted_before, requests_counted(after)) == expected or time.monotonic() > deadline:
            break
        time.sleep(metrics.FLUSH_S / 5)
    assert moved(counted_before, requests_counted(after)) == expected
    return after


# -- one request through a bridge -------------------------------------------------------------------


def call(urls: Any, bridge: str, model: str, *, version: str | None = None, inputs: dict[str, np.ndarray] | None = None,
         params: dict[str, Any] | None = None, key: str | None = None) -> str:
    """One request; 'ok' or what the client was told (an error code, an HTTP status, a gRPC status)."""
    inputs = {"x": ROW} if inputs is None else inputs
    if bridge == "zmq":
        with Client(urls.zmq_url, timeout=WAIT_S, api_key=key) as client:
            try:
                client.infer(model, inputs, version=version, parameters=params)
            except InferenceError as exc:
                return exc.code
        return "ok"
    if bridge == "rest":
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        body: dict[str, Any] = {"inputs": [
            {"name": name, "datatype": "BOOL" if array.dtype == bool else "FP32", "shape": list(array.shape),
             "data": array.ravel().tolist()} for name, array in inputs.items()]}
        if params:
            body["parameters"] = params
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.post(urls.rest_url + path, json=body, headers=headers, timeout=WAIT_S)
        return "ok" if response.status_code == 200 else str(response.status_code)
    request = pb.ModelInferRequest(model_name=model, model_version=version or "", id="m")
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype="BOOL" if array.dtype == bool else "FP32", shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    for name, value in (params or {}).items():
        if isinstance(value, str):
            request.parameters[name].string_param = value
        else:
            request.parameters[name].int64_param = value
    metadata = (("authorization", f"Bearer {key}"),) if key else None
    grpc_url = urls.grpc_url if hasattr(urls, "grpc_url") else f"127.0.0.1:{urls.grpc_port}"
    with grpc.insecure_channel(grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        try:
            infer(request, timeout=WAIT_S, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code().name  # type: ignore[attr-defined]
    return "ok"


# -- every error code, on every bridge (in-process bridges against a fake batch manager) -------------------------


@pytest.fixture(scope="module")
def plain() -> Iterator[BridgeStack]:
    stack = BridgeStack().start()
    try:
        yield stack
    finally:
        stack.stop()


# code -> (model, version, inputs, params) that produce it, and the labels it is counted under. What produces each:
# bad_input: x of 4 values where echo declares 3; unknown_model: a name nobody registered (counted as model "",
# version ""), or a version echo does not have (version ""); deadline: a 50 ms timeout on a model the fake batch
# manager never answers; overloaded and model_error: models the fake answers so; internal: a reply whose frames
# do not match its header; the rest: the batch manager answering with that code (the fake, told by a parameter).
ECHO_BAD = {"x": np.zeros((1, 4), np.float32), "mask": np.ones((1, 2), bool)}
FROM_THE_BUS = ("not_ready", "replica_lost", "session_lost", "unavailable")
CASES: dict[str, tuple[str, str | None, dict[str, np.ndarray] | None, dict[str, Any] | None, tuple[str, str]]] = {
    "bad_input": ("echo", None, ECHO_BAD, None, ("echo", "1")),
    "unknown_model": ("no-such-model", None, None, None, ("", "")),
    "unknown_version": ("echo", "9", None, None, ("echo", "")),
    "deadline": ("slow", None, None, {"timeout": 50_000}, ("slow", "1")),
    "overloaded": ("busy", None, None, None, ("busy", "1")),
    "model_error": ("fail", None, None, None, ("fail", "1")),
    "internal": ("garbled", None, None, None, ("garbled", "1")),
    **{code: ("any", None, None, {"fake_error": code}, ("any", "1")) for code in FROM_THE_BUS},
}


@pytest.mark.parametrize("bridge", BRIDGES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_error_moves_its_own_counter_on_each_bridge(plain: BridgeStack, bridge: str, case: str) -> None:
    model, version, inputs, params, (model_label, version_label) = CASES[case]
    code = "unknown_model" if case == "unknown_version" else case
    before = scrape(plain.rest_url)
    told = call(plain, bridge, model, version=version, inputs=inputs, params=params)
    assert told != "ok"
    after = scrape(plain.rest_url)
    assert moved(requests_counted(before), requests_counted(after)) == {(bridge, model_label, version_label, code): 1}
    assert moved(latencies_counted(before), latencies_counted(after)) == {
        (bridge, model_label, version_label, "error"): 1}


def test_a_code_a_replica_made_up_is_counted_as_internal(plain: BridgeStack) -> None:
    # Codes from the bus reach the client unchanged, but a replica could send any string: the labels stay bounded.
    before = requests_counted(scrape(plain.rest_url))
    assert call(plain, "zmq", "any", params={"fake_error": "made_up_by_a_replica"}) == "made_up_by_a_replica"
    assert moved(before, requests_counted(scrape(plain.rest_url))) == {("zmq", "any", "1", "internal"): 1}


def test_random_model_names_add_no_label_sets(plain: BridgeStack) -> None:
    before = scrape(plain.rest_url)
    for _ in range(5):
        assert call(plain, "rest", f"random-{uuid.uuid4().hex}") == "404"
    after = scrape(plain.rest_url)
    assert moved(requests_counted(before), requests_counted(after)) == {("rest", "", "", "unknown_model"): 5}
    assert "random-" not in after


def test_grpc_stream_counts_each_message(plain: BridgeStack) -> None:
    def message(model: str, rid: str) -> bytes:
        request = pb.ModelInferRequest(model_name=model, id=rid)
        request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
        request.raw_input_contents.append(ROW.tobytes())
        return request.SerializeToString()

    before = scrape(plain.rest_url)
    with grpc.insecure_channel(plain.grpc_url) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        answers = list(stream(iter([message("any", "1"), message("any", "2"), message("fail", "3"),
                                    b"\xff not a message"]), timeout=WAIT_S))
    assert len(answers) == 4
    after = scrape(plain.rest_url)
    assert moved(requests_counted(before), requests_counted(after)) == {
        ("grpc", "any", "1", "ok"): 2, ("grpc", "fail", "1", "model_error"): 1, ("grpc", "", "", "bad_input"): 1}


def test_grpc_stream_refusals_past_the_bound_are_counted_under_their_model() -> None:
    # 12 requests for "slow" (never answered; 1 s timeout) on one stream whose bound is 4: 4 run out their
    # deadline, 8 are refused before they are read, and are counted under the model they named all the same.
    tight = BridgeStack(client_max_outstanding=4).start()
    try:
        def requests() -> Iterator[bytes]:
            for index in range(12):
                request = pb.ModelInferRequest(model_name="slow", id=str(index))
                request.parameters["timeout"].int64_param = 1_000_000
                request.inputs.add(name="a", datatype="UINT8", shape=[1])
                request.raw_input_contents.append(b"\0")
                yield request.SerializeToString()

        before = requests_counted(scrape(tight.rest_url))
        with grpc.insecure_channel(tight.grpc_url) as channel:
            stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                           response_deserializer=pb.ModelStreamInferResponse.FromString)
            assert len(list(stream(requests(), timeout=WAIT_S))) == 12
        assert moved(before, requests_counted(scrape(tight.rest_url))) == {
            ("grpc", "slow", "1", "deadline"): 4, ("grpc", "slow", "1", "overloaded"): 8}
    finally:
        tight.stop()


# -- API keys: the codes they add, and who may read GET /metrics ---------------------------------------------------

ADMIN_KEY = "metrics-test-admin-key"


@pytest.fixture(scope="module")
def keyed() -> Iterator[BridgeStack]:
    stack = BridgeStack(auth="required", auth_metadata=True, admin_key=ADMIN_KEY).start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.mark.parametrize("bridge", BRIDGES)
def test_refusals_by_key_move_their_own_counters(keyed: BridgeStack, bridge: str) -> None:
    # unauthenticated: no key; forbidden: a key for another model; rate_limited: a second request within 100 s
    # on a key allowed one a 100 s (buckets are per bridge, so each bridge gets its own first request).
    only_echo = create_key(keyed, f"only-echo-{bridge}", models=["echo"])
    slow = create_key(keyed, f"slow-{bridge}", rate=0.01, burst=1)
    before = requests_counted(scrape(keyed.rest_url, ADMIN_KEY))
    assert call(keyed, bridge, "any") != "ok"
    assert call(keyed, bridge, "any", key=only_echo) != "ok"
    assert call(keyed, bridge, "any", key=slow) == "ok"
    assert call(keyed, bridge, "any", key=slow) != "ok"
    assert moved(before, requests_counted(scrape(keyed.rest_url, ADMIN_KEY))) == {
        (bridge, "any", "1", "unauthenticated"): 1, (bridge, "any", "1", "forbidden"): 1,
        (bridge, "any", "1", "ok"): 1, (bridge, "any", "1", "rate_limited"): 1}


def test_metrics_endpoint_needs_a_key_that_sees_every_model(keyed: BridgeStack) -> None:
    url = f"{keyed.rest_url}/metrics"
    assert httpx.get(url, timeout=WAIT_S).status_code == 401
    one_model = create_key(keyed, "one-model", models=["echo"])
    assert httpx.get(url, headers={"Authorization": f"Bearer {one_model}"}, timeout=WAIT_S).status_code == 403
    admin = httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=WAIT_S)
    assert admin.status_code == 200 and "inferoxy_requests_total" in admin.text


# -- the whole proxy: `inferoxy serve`, every component writing to one samples directory ----------------------------

SERVED_MODELS = """
models:
  - {name: echo, model_class: "examples.models.echo.model:EchoModel", max_batch_size: 8, max_batch_delay_ms: 0}
  - {name: raiser, model_class: "tests.models_for_tests:RaisingModel", max_batch_size: 8, max_batch_delay_ms: 0}
  - {name: slow, model_class: "tests.models_for_tests:SlowModel", max_batch_size: 4, max_batch_delay_ms: 0,
     env: {SLOW_MODEL_SECONDS: "30"}}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    models = tmp_path_factory.mktemp("metrics") / "models.yaml"
    models.write_text(SERVED_MODELS)
    with ProxyProcess(env={"INFEROXY_MODELS_FILE": str(models)}) as proxy:
        for model in ("echo", "raiser"):  # each replica is up before the counting starts
            wait_for(lambda m=model: call(proxy, "zmq", m, inputs={"fail": np.zeros(1, np.float32)}) == "ok",
                     timeout=60, interval=0.2, what=f"{model} to serve")

        def warm_up_counted() -> bool:
            # The ZeroMQ bridge flushes all it gathered at once: its last answers showing means all of them do.
            counted = requests_counted(scrape(proxy.rest_url))
            return bool(counted[("zmq", "echo", "1", "ok")] and counted[("zmq", "raiser", "1", "ok")])

        wait_for(warm_up_counted, timeout=10, what="the warm-up's requests to be counted")
        yield proxy


@pytest.mark.parametrize("bridge", BRIDGES)
def test_n_requests_through_a_bridge_show_as_n_more_under_serve(served: ProxyProcess, bridge: str) -> None:
    n = 7
    before = scrape(served.rest_url)
    for _ in range(n):
        assert call(served, bridge, "echo") == "ok"
    assert call(served, bridge, "raiser", inputs={"fail": np.ones(1, np.float32)}) != "ok"  # predict raises
    assert call(served, bridge, "nope") != "ok"
    counted = {(bridge, "echo", "1", "ok"): n, (bridge, "raiser", "1", "model_error"): 1,
               (bridge, "", "", "unknown_model"): 1}
    timed = {(bridge, "echo", "1", "ok"): n, (bridge, "raiser", "1", "error"): 1, (bridge, "", "", "error"): 1}
    # Another process's bridge hands its counts to the shared samples within metrics.FLUSH_S (bridges/metering.py).
    after = settled(served.rest_url, before, counted)
    assert moved(latencies_counted(before), latencies_counted(after)) == timed


def test_a_replica_killed_with_a_request_counts_replica_lost_under_serve(served: ProxyProcess) -> None:
    # One request the slow replica holds (it logs when it starts sleeping on the batch); the replica is killed.
    (victim,) = wait_for(lambda: served.replica_pids("slow"), timeout=30, what="the slow replica")
    before = scrape(served.rest_url)
    told: list[str] = []
    caller = threading.Thread(target=lambda: told.append(call(served, "zmq", "slow")))
    caller.start()
    served.wait_for_line(SLOW_MODEL_SLEEPING, 30)
    os.kill(victim, signal.SIGKILL)
    caller.join(WAIT_S)
    assert told == ["replica_lost"]
    settled(served.rest_url, before, {("zmq", "slow", "1", "replica_lost"): 1})


def test_metrics_off_records_nothing(tmp_path: Path) -> None:
    with ProxyProcess(env={"INFEROXY_METRICS": "false"}) as proxy:
        wait_for(lambda: call(proxy, "zmq", "echo") == "ok", timeout=60, interval=0.2, what="echo to serve")
        for bridge in BRIDGES:
            assert call(proxy, bridge, "echo") == "ok"
        text = scrape(proxy.rest_url)
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("inferoxy_")]
    assert samples == []


# -- one component alone: `inferoxy run COMPONENT --metrics-port N` ------------------------------------------------


def test_run_one_component_serves_its_own_metrics(real_redis_url: str, redis_prefix: str) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "INFEROXY_BIND_HOST": "127.0.0.1",
           "INFEROXY_REDIS_URL": real_redis_url, "INFEROXY_REDIS_PREFIX": redis_prefix, "INFEROXY_BUS_CURVE": "false",
           "INFEROXY_BATCH_MANAGER_URL": f"tcp://127.0.0.1:{free_port()}",
           "INFEROXY_TASK_MANAGER_URL": f"tcp://127.0.0.1:{free_port()}"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    process = subprocess.Popen([sys.executable, "-m", "inferoxy", "run", "batch_manager", "--metrics-port", str(port)],
                               env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def scraped() -> str | None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                return None
            return response.text if response.status_code == 200 else None

        text = wait_for(scraped, timeout=30, interval=0.1, what="the batch manager's metrics port")
        names = {family.name for family in text_string_to_metric_families(text)}
        # The catalogue (counters by their family name, without _total) and prometheus-client's process metrics.
        assert {"inferoxy_queue_depth", "inferoxy_batch_size", "inferoxy_redis_up", "process_cpu_seconds"} <= names
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_run_refuses_a_metrics_port_it_cannot_take() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO), "INFEROXY_BIND_HOST": "127.0.0.1", "INFEROXY_BUS_CURVE": "false"}
        done = subprocess.run([sys.executable, "-m", "inferoxy", "run", "batch_manager", "--metrics-port", str(port)],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"metrics port {port}" in done.stderr, done.stderr


# -- the catalogue against docs/METRICS.md -----------------------------------------------------------------------


def documented_metrics(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, labels) from the table rows of docs/METRICS.md."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"^\|\s*`(inferoxy_\w+)`\s*\|\s*(\w+)\s*\|([^|]*)\|", line)
        if match:
            labels = tuple(label.strip() for label in match.group(3).split(",") if label.strip())
            found[match.group(1)] = (match.group(2), labels)
    return found


def coded_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    kinds = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}
    return {name: (kinds[type(metric)], tuple(metric._labelnames))
            for name, metric in zip(metrics.exported_names(), metrics.ALL, strict=True)}


def test_docs_list_exactly_the_metrics_the_code_exports() -> None:
    documented = documented_metrics((REPO / "docs" / "METRICS.md").read_text())
    assert documented == coded_metrics()


def test_the_docs_check_fails_when_either_side_gains_a_metric() -> None:
    text = (REPO / "docs" / "METRICS.md").read_text()
    extra_row = text + "\n| `inferoxy_only_in_docs_total` | counter | model | Nothing. |\n"
    assert documented_metrics(extra_row) != coded_metrics()
    missing_row = "\n".join(line for line in text.splitlines() if "`inferoxy_batch_size`" not in line)
    assert documented_metrics(missing_row) != coded_metrics()
    row = "| `inferoxy_queue_depth` | gauge | model, version |"
    relabelled = text.replace(row, row.replace("model, version", "model"))
    assert relabelled != text and documented_metrics(relabelled) != coded_metrics()


def test_every_error_code_has_its_case_above() -> None:
    # Each of the protocol's codes is produced on each bridge by a test above; a new code needs a case there.
    assert {c.value for c in ErrorCode} == {*CASES, "unauthenticated", "forbidden", "rate_limited"} - {
        "unknown_version"}


# -- the meter alone: what its tallies hand to prometheus-client ---------------------------------------------------


def test_tallied_latencies_land_in_the_buckets_observe_would_use() -> None:
    # The meter adds up latencies itself and writes buckets at flush (bridges/metering.py); prometheus-client's
    # own observe() must agree on every bucket, the count and the sum.
    spec = ModelSpec(name="echo", model_class="examples.models.echo.model:EchoModel")
    catalog = Catalog()
    catalog.apply(Registry({spec.key: spec}, {"echo": "1"}, 1))
    bridge = f"unit-{uuid.uuid4().hex[:8]}"
    meter = Meter(bridge, catalog)
    reference = Histogram("reference_seconds", "the same values, observed", registry=CollectorRegistry(),
                          buckets=metrics.LATENCY_BUCKETS_S)
    for seconds in (0.0003, 0.003, 0.003, 0.2, 100.0):
        meter.record("echo", None, metrics.OK, clock() - seconds)  # outside a loop: flushed at once
        reference.observe(seconds)
    meter.record("echo", "1", "made_up", clock() - 0.003)  # an unknown code: counted as internal

    def samples(metric: Any, suffix: str, **labels: str) -> dict[str, float]:
        return {s.labels.get("le", ""): s.value for family in metric.collect() for s in family.samples
                if s.name.endswith(suffix) and all(s.labels.get(k) == v for k, v in labels.items())}

    ours = {"bridge": bridge, "model": "echo", "version": "1", "outcome": "ok"}
    assert samples(metrics.REQUEST_SECONDS, "_bucket", **ours) == samples(reference, "_bucket")
    assert samples(metrics.REQUEST_SECONDS, "_count", **ours) == {"": 5.0}
    assert samples(metrics.REQUEST_SECONDS, "_sum", **ours)[""] == pytest.approx(100.2063, abs=0.01)
    assert samples(metrics.REQUESTS, "_total", bridge=bridge, code="ok") == {"": 5.0}
    assert samples(metrics.REQUESTS, "_total", bridge=bridge, code="internal") == {"": 1.0}
