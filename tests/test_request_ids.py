"""Request ids end to end (docs/PROTOCOL.md, "Request ids") and INFEROXY_LOG_FORMAT=json.

Each request gets one id at its bridge (the client's own when usable, else a fresh one); it travels in
the ``infer`` header to the batch manager and in the ``batch`` items to the replica, whose log lines carry
it while the model runs, and comes back in the answer (REST: body ``id`` and ``X-Request-ID``; gRPC: the
response ``id`` and ``x-request-id`` metadata; ZeroMQ: ``request_id``). The end-to-end test runs
``inferoxy serve`` with JSON logs at DEBUG and follows each id through every component's lines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import msgspec
import numpy as np
import pytest
import zmq

from bridges import request_ids
from bridges.gateway import Gateway, Outcome
from bridges.proto import grpc_predict_v2_pb2 as pb
from inferoxy import logs, wire
from inferoxy import messages as m
from inferoxy.batches import answer_batch
from inferoxy.client import Client, InferenceError
from tests.models_for_tests import LoggingModel
from tests.support import REPO, ProxyProcess, wait_for
from tests.test_liveness import FakeBatchManager, poll, with_gateway

FRESH = re.compile(r"[0-9a-f]{32}")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
TOO_LONG = "x" * 129


# --- choosing the id --------------------------------------------------------------------------------


def test_the_first_usable_id_wins_in_order_own_header_traceparent() -> None:
    assert request_ids.choose("own-1", "header-2", TRACEPARENT) == "own-1"
    assert request_ids.choose(None, "header-2", TRACEPARENT) == "header-2"
    assert request_ids.choose(None, None, TRACEPARENT) == TRACE_ID
    first, second = request_ids.choose(), request_ids.choose()
    assert FRESH.fullmatch(first) and FRESH.fullmatch(second) and first != second
    assert request_ids.given(None, None, None) is None and request_ids.given(None, "h", None) == "h"


@pytest.mark.parametrize("garbage", ["", TOO_LONG, "a b", "new\nline", "tab\t", "bell\x07", "caf\u00e9", 7, ["a"]])
def test_an_unusable_client_id_is_passed_over_not_refused(garbage: Any) -> None:
    assert request_ids.usable(garbage) is None
    assert request_ids.choose(garbage, "header-2") == "header-2"
    assert FRESH.fullmatch(request_ids.choose(garbage))


def test_the_longest_usable_id_is_128_visible_characters() -> None:
    longest = "!" + "a" * 126 + "~"
    assert request_ids.usable(longest) == longest


@pytest.mark.parametrize("header", [
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is invalid
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # an all-zero trace id is invalid
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case is invalid
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # too short
    "garbage", "",
])
def test_a_malformed_traceparent_is_ignored(header: str) -> None:
    assert request_ids.from_traceparent(header) is None


# --- on the bus ---------------------------------------------------------------------------------------


def test_the_id_rides_in_infer_and_in_each_batch_item() -> None:
    infer = m.Infer(1, "m", None, 100, {}, [], "abc")
    assert m.BRIDGE_TO_BATCH_MANAGER.decode(m.encode(infer)) == infer
    batch = m.Batch("r", 1, "m", "1", [m.BatchItem(1, 1, rid="abc"), m.BatchItem(2, 1)])
    # A replica reads plain msgpack: the id is a field of its item, and an item without one has no such key.
    items = msgspec.msgpack.decode(m.encode(batch))["items"]
    assert items == [{"id": 1, "n": 1, "rid": "abc"}, {"id": 2, "n": 1}]


def test_the_bus_refuses_an_over_long_id() -> None:
    with pytest.raises(wire.WireError, match="rid"):
        m.BRIDGE_TO_BATCH_MANAGER.decode(m.encode(m.Infer(1, "m", None, 100, {}, [], TOO_LONG)))


def test_the_gateway_sends_the_id_and_names_it_when_an_answer_is_garbled(caplog: pytest.LogCaptureFixture) -> None:
    outcomes: list[Outcome] = []

    async def scenario(gateway: Gateway, batch_manager: FakeBatchManager) -> None:
        gateway.start_request("echo", None, [], [], 60.0, outcomes.append, request_id="gw-1")
        identity, sent = await poll(lambda: batch_manager.requests and batch_manager.requests[0], "the request")
        assert sent["rid"] == "gw-1"
        await batch_manager.sock.send_multipart([identity, wire.pack_header({"t": "reply", "id": sent["id"],
                                                                             "model": 5})])
        await poll(lambda: outcomes, "the outcome")

    with caplog.at_level(logging.ERROR, logger="bridges.gateway"):
        with_gateway(scenario)
    assert [getattr(record, "request_id", None) for record in caplog.records] == ["gw-1"]


# --- log lines ------------------------------------------------------------------------------------------


class Capture(logging.Handler):
    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def capture_json() -> Iterator[Capture]:
    handler = Capture(logs.JsonFormatter("replica", model="m", static={"replica": "r1"}))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_every_line_a_batch_logs_carries_its_request_ids(capture_json: Capture) -> None:
    header = {"t": "batch", "replica": "r1", "batch": 5,
              "items": [{"id": 1, "n": 1, "rid": "first"}, {"id": 2, "n": 1, "rid": "second"}]}
    x = np.ones((1, 2), np.float32)
    frames = answer_batch(LoggingModel(), "r1", header, [("x", x), ("x", x)])
    assert wire.unpack_header(frames[0])["t"] == "result"
    lines = [json.loads(line) for line in capture_json.lines]
    from_model = [line for line in lines if line["logger"] == "tests.logging_model"]
    assert from_model and from_model[0]["message"] == "predict on 2 rows"
    for line in lines:
        assert line["request_ids"] == ["first", "second"]
        assert (line["component"], line["model"], line["replica"]) == ("replica", "m", "r1")
    logging.getLogger("after").info("outside any batch")
    assert "request_ids" not in json.loads(capture_json.lines[-1])


def test_a_batch_from_a_proxy_without_ids_still_answers(capture_json: Capture) -> None:
    header = {"t": "batch", "replica": "r1", "batch": 5, "items": [{"id": 1, "n": 1}]}
    frames = answer_batch(LoggingModel(), "r1", header, [("x", np.ones((1, 2), np.float32))])
    assert wire.unpack_header(frames[0])["t"] == "result"
    assert all("request_id" not in json.loads(line) for line in capture_json.lines)


def test_a_json_line_has_the_documented_fields_and_the_exception() -> None:
    formatter = logs.JsonFormatter("batch_manager")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    record.request_id = "r-1"
    record.model = "m"
    line = json.loads(formatter.format(record))
    assert line["level"] == "ERROR" and line["component"] == "batch_manager" and line["model"] == "m"
    assert line["request_id"] == "r-1" and line["message"] == "failed here"
    assert "ValueError: boom" in line["exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])


def test_a_text_line_names_its_request_at_the_end() -> None:
    formatter = logs.TextFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "late", (), None)
    assert formatter.format(record) == "WARNING late"
    token = logs.REQUEST_IDS.set("r-9")
    try:
        assert formatter.format(record) == "WARNING late [request r-9]"
    finally:
        logs.REQUEST_IDS.reset(token)


def test_a_replica_cannot_pass_its_lines_off_as_a_component() -> None:
    # The task manager passes a replica's JSON line on; component and replica are its own, whatever the line says.
    line = json.dumps({"time": "t", "level": "ERROR", "component": "batch_manager", "replica": "other",
                       "message": "m" * 10_000, "request_ids": ["a", 1], "extra": "dropped"})
    fields = logs.forwarded_fields(line)
    assert fields is not None
    record = logging.LogRecord("task_manager.replica", logging.INFO, __file__, 1, "[r1] %s", (line,), None)
    record.forwarded = fields
    record.replica = "r1"
    out = json.loads(logs.JsonFormatter("task_manager").format(record))
    assert (out["component"], out["replica"], out["level"]) == ("replica", "r1", "ERROR")
    assert len(out["message"]) == logs.MAX_FIELD_CHARS and out["request_ids"] == ["a", "1"] and "extra" not in out
    assert logs.forwarded_fields("Traceback (most recent call last):") is None
    assert logs.forwarded_fields("[1, 2]") is None


def json_stderr(*argv: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run ``argv`` and read its stderr as JSON lines: each line must be one object."""
    ran = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    return [json.loads(line) for line in ran.stderr.splitlines()]


def test_what_python_prints_itself_is_json_too() -> None:
    script = ("import threading, warnings; from inferoxy.logs import setup_logging; "
              "setup_logging('INFO', 'task_manager', 'json'); warnings.warn('old'); "
              "thread = threading.Thread(target=lambda: 1 / 0, name='worker'); thread.start(); thread.join(); "
              "raise ValueError('boom')")
    lines = json_stderr(sys.executable, "-c", script)
    assert [line["level"] for line in lines] == ["WARNING", "CRITICAL", "CRITICAL"]
    assert "old" in lines[0]["message"] and "ZeroDivisionError" in lines[1]["exception"]
    assert "ValueError: boom" in lines[2]["exception"] and lines[2]["component"] == "task_manager"


def test_a_replica_that_cannot_load_says_why_in_json() -> None:
    env = {"INFEROXY_LOG_FORMAT": "json", "INFEROXY_REPLICA_URL": "tcp://127.0.0.1:9", "INFEROXY_REPLICA_ID": "r1",
           "INFEROXY_MODEL_CLASS": "tests.models_for_tests:FailingLoadModel", "INFEROXY_MODEL_NAME": "broken"}
    lines = json_stderr(sys.executable, "-m", "inferoxy.runtime", env=env)
    failed = [line for line in lines if line["level"] == "ERROR"]
    assert failed and "weights missing" in failed[0]["exception"]
    assert (failed[0]["component"], failed[0]["model"], failed[0]["replica"]) == ("replica", "broken", "r1")


def test_the_model_base_image_holds_every_module_the_runtime_imports() -> None:
    # The replica's logging (inferoxy.logs) is new to the runtime: a model image without it would not start.
    script = "import sys, inferoxy.runtime; print(*(n for n in sys.modules if n.startswith('inferoxy.')))"
    listed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True,
                            timeout=60)
    needed = {f"inferoxy/{name.split('.', 1)[1]}.py" for name in listed.stdout.split()}
    copied = set(re.findall(r"inferoxy/\w+\.py", (REPO / "docker/model-base/Dockerfile").read_text()))
    assert "inferoxy/logs.py" in needed and needed <= copied, needed - copied


# --- end to end ------------------------------------------------------------------------------------------

MODELS = """
models:
  logged:
    model_class: tests.models_for_tests:LoggingModel
    max_batch_size: 8
    max_batch_delay_ms: 0
    min_replicas: 1
    max_replicas: 1
"""


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    models = Path(tmp_path_factory.mktemp("ids")) / "models.yaml"
    models.write_text(MODELS)
    with ProxyProcess(env={"INFEROXY_MODELS_FILE": str(models), "INFEROXY_LOG_FORMAT": "json",
                           "INFEROXY_LOG_LEVEL": "DEBUG"}) as running:
        wait_for(lambda: httpx.get(f"{running.rest_url}/v2/models/logged/ready").status_code == 200, timeout=60,
                 what="the model to be ready")
        yield running


def json_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in list(proxy.output) if line.startswith("{")]


def lines_of(proxy: ProxyProcess, request_id: str) -> list[dict[str, Any]]:
    return [line for line in json_lines(proxy)
            if line.get("request_id") == request_id or request_id in line.get("request_ids", ())]


def wait_for_components(proxy: ProxyProcess, request_id: str, components: set[str]) -> list[dict[str, Any]]:
    def seen() -> list[dict[str, Any]] | None:
        found = lines_of(proxy, request_id)
        return found if components <= {line["component"] for line in found} else None

    try:
        return wait_for(seen, timeout=10, what=f"log lines of {sorted(components)} naming {request_id}")
    except AssertionError:
        raise AssertionError(f"lines naming {request_id}: {lines_of(proxy, request_id)}\n{proxy.log()}") from None


def rest_infer(proxy: ProxyProcess, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
               model: str = "logged") -> httpx.Response:
    document = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}], **(body or {})}
    return httpx.post(f"{proxy.rest_url}/v2/models/{model}/infer", json=document, headers=headers, timeout=30)


def test_a_rest_request_id_is_in_every_components_lines_and_the_answer(proxy: ProxyProcess) -> None:
    response = rest_infer(proxy, headers={"X-Request-ID": "rest-abc-123"})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "rest-abc-123" and response.json()["id"] == "rest-abc-123"
    lines = wait_for_components(proxy, "rest-abc-123", {"rest_bridge", "batch_manager", "replica"})
    from_model = [line for line in lines if line["component"] == "replica" and line["logger"] == "tests.logging_model"]
    assert from_model and from_model[0]["message"] == "predict on 1 rows" and from_model[0]["model"] == "logged"
    assert from_model[0]["replica"].startswith(proxy.env["INFEROXY_INSTANCE"])


def test_every_line_of_every_component_is_json(proxy: ProxyProcess) -> None:
    assert rest_infer(proxy).status_code == 200
    components = {line["component"] for line in json_lines(proxy)}
    assert {"serve", "rest_bridge", "grpc_bridge", "zmq_bridge", "batch_manager", "task_manager", "model_manager",
            "replica"} <= components
    for line in json_lines(proxy):
        assert {"time", "level", "component", "message"} <= line.keys(), line
    # Only the banner `serve` prints for people is not a log line.
    others = [line for line in proxy.output if not line.startswith("{")]
    assert all(line.startswith(("Inferoxy is serving:", "  ")) for line in others), others


def test_the_body_id_wins_and_is_echoed(proxy: ProxyProcess) -> None:
    response = rest_infer(proxy, {"id": "body-1"}, headers={"X-Request-ID": "header-1"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "body-1" and response.json()["id"] == "body-1"
    wait_for_components(proxy, "body-1", {"rest_bridge", "batch_manager", "replica"})


def test_a_traceparent_names_the_request_when_nothing_else_does(proxy: ProxyProcess) -> None:
    response = rest_infer(proxy, headers={"traceparent": TRACEPARENT})
    assert response.headers["x-request-id"] == TRACE_ID and response.json()["id"] == TRACE_ID


def test_without_any_id_the_bridge_makes_one(proxy: ProxyProcess) -> None:
    response = rest_infer(proxy)
    made = response.headers["x-request-id"]
    # The answer's body stays as it was for a client that named nothing (Triton's too): the header names it.
    assert FRESH.fullmatch(made) and "id" not in response.json()
    wait_for_components(proxy, made, {"rest_bridge", "batch_manager", "replica"})


@pytest.mark.parametrize("garbage", [TOO_LONG, "line\nbreak", "bell\u0007", "caf\u00e9"])
def test_a_garbage_body_id_is_echoed_but_never_logged(proxy: ProxyProcess, garbage: str) -> None:
    response = rest_infer(proxy, {"id": garbage})
    assert response.status_code == 200
    made = response.headers["x-request-id"]
    assert FRESH.fullmatch(made)
    assert response.json()["id"] == garbage  # the Open Inference Protocol's echo is the client's own
    wait_for_components(proxy, made, {"rest_bridge", "batch_manager", "replica"})
    assert not any(garbage in line for line in proxy.output)


def test_a_garbage_header_id_is_replaced(proxy: ProxyProcess) -> None:
    response = rest_infer(proxy, headers={"X-Request-ID": "has space"})
    assert FRESH.fullmatch(response.headers["x-request-id"])


def test_error_and_binary_answers_carry_the_header(proxy: ProxyProcess) -> None:
    unknown = rest_infer(proxy, headers={"X-Request-ID": "err-1"}, model="no-such-model")
    assert unknown.status_code == 404 and unknown.headers["x-request-id"] == "err-1"
    bad = httpx.post(f"{proxy.rest_url}/v2/models/logged/infer", content=b"{not json",
                     headers={"X-Request-ID": "err-2"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "err-2"
    binary = rest_infer(proxy, {"parameters": {"binary_data_output": True}}, headers={"X-Request-ID": "bin-1"})
    assert binary.status_code == 200 and binary.headers["x-request-id"] == "bin-1"
    length = int(binary.headers["inference-header-content-length"])
    assert json.loads(binary.content[:length])["id"] == "bin-1"


def grpc_infer(proxy: ProxyProcess, request_id: str = "", metadata: tuple[tuple[str, str], ...] = ()
               ) -> tuple[pb.ModelInferResponse, dict[str, str]]:
    request = pb.ModelInferRequest(model_name="logged", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.array([[1.0, 2.0]], np.float32).tobytes())
    with grpc.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        response, outcome = call.with_call(request, metadata=metadata, timeout=30)
        return response, dict(outcome.trailing_metadata())


def test_grpc_gets_its_id_back(proxy: ProxyProcess) -> None:
    response, trailing = grpc_infer(proxy, "grpc-own-1")
    assert response.id == "grpc-own-1" and trailing["x-request-id"] == "grpc-own-1"
    wait_for_components(proxy, "grpc-own-1", {"grpc_bridge", "batch_manager", "replica"})
    response, trailing = grpc_infer(proxy, metadata=(("x-request-id", "grpc-md-2"),))
    assert response.id == "grpc-md-2" and trailing["x-request-id"] == "grpc-md-2"
    response, trailing = grpc_infer(proxy)
    assert FRESH.fullmatch(trailing["x-request-id"]) and response.id == ""


def test_a_grpc_error_carries_the_id(proxy: ProxyProcess) -> None:
    request = pb.ModelInferRequest(model_name="no-such-model", id="grpc-err-1")
    with grpc.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert dict(raised.value.trailing_metadata())["x-request-id"] == "grpc-err-1"  # type: ignore[attr-defined]


def zmq_infer(proxy: ProxyProcess, header: dict[str, Any]) -> dict[str, Any]:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(proxy.zmq_url)
        sock.send_multipart(wire.encode({"model": "logged", **header}, [("x", np.ones((1, 2), np.float32))]))
        assert sock.poll(30_000), "no ZeroMQ reply"
        reply = wire.unpack_header(sock.recv_multipart()[0])
        sock.close(linger=0)
        return reply
    finally:
        ctx.term()


def test_zeromq_gets_its_id_back(proxy: ProxyProcess) -> None:
    reply = zmq_infer(proxy, {"id": 1, "request_id": "zmq-own-7"})
    assert reply["ok"] is True and (reply["id"], reply["request_id"]) == (1, "zmq-own-7")
    wait_for_components(proxy, "zmq-own-7", {"zmq_bridge", "batch_manager", "replica"})
    made = zmq_infer(proxy, {"id": 2})
    assert made["ok"] is True and FRESH.fullmatch(made["request_id"])
    garbage = zmq_infer(proxy, {"id": 3, "request_id": TOO_LONG})
    assert garbage["ok"] is True and FRESH.fullmatch(garbage["request_id"])
    refused = zmq_infer(proxy, {"id": 4, "request_id": "zmq-err-1", "model": "no-such-model"})
    assert refused["ok"] is False and refused["request_id"] == "zmq-err-1"


def test_the_zeromq_client_names_its_requests(proxy: ProxyProcess) -> None:
    with Client(proxy.zmq_url) as client:
        outputs = client.infer("logged", {"x": np.ones((1, 2), np.float32)}, request_id="client-1")
        assert outputs["y"].shape == (1, 2)
        with pytest.raises(InferenceError) as raised:
            client.infer("no-such-model", {"x": np.ones((1, 2), np.float32)}, request_id="client-2")
    assert (raised.value.code, raised.value.request_id) == ("unknown_model", "client-2")
    wait_for_components(proxy, "client-1", {"zmq_bridge", "batch_manager", "replica"})
