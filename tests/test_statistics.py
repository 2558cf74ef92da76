"""Triton's statistics and model configuration (bridges/statistics.py, bridges/model_config.py), over REST and
gRPC with the real ``tritonclient``, and the gRPC messages' field numbers against Triton's own.

The mapping tests record into the proxy's metrics themselves (the bridges of tests/bridge_harness.py run in
this process, so they read the same metrics); ``test_real_proxy_*`` sends requests through a whole
``inferoxy serve`` and reads the counts every component recorded.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.model_config_pb2 as triton_config_pb2
import tritonclient.grpc.service_pb2 as triton_service_pb2
import tritonclient.http as httpclient
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from bridges import statistics
from bridges.model_config import triton_config
from bridges.proto import grpc_predict_v2_pb2 as pb
from inferoxy import metrics
from model_manager.spec import ModelSpec, TensorSpec
from tests.bridge_harness import BridgeStack
from tests.support import ProxyProcess, wait_for
from tests.test_api_keys import create_key

PROTOCOLS = ["http", "grpc"]


def client_for(target: Any, protocol: str) -> Any:
    if protocol == "http":
        return httpclient.InferenceServerClient(target.rest_url.removeprefix("http://"))
    return grpcclient.InferenceServerClient(target.grpc_url)


def stats_of(client: Any, protocol: str, name: str = "", version: str = "", **kwargs: Any) -> list[dict[str, Any]]:
    """``model_stats`` as JSON whichever the protocol (gRPC's uint64 become numbers)."""
    if protocol == "http":
        return list(client.get_inference_statistics(name, version, **kwargs)["model_stats"])
    response = client.get_inference_statistics(name, version, **kwargs)
    return [_numbers(json_format.MessageToDict(stat, preserving_proto_field_name=True,
                                               always_print_fields_with_no_presence=True))
            for stat in response.model_stats]


_UINT64 = frozenset({"count", "ns", "last_inference", "inference_count", "execution_count", "batch_size"})


def _numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: int(item) if key in _UINT64 else _numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers(item) for item in value]
    return value


def one(stats: list[dict[str, Any]], name: str, version: str) -> dict[str, Any]:
    found = [stat for stat in stats if stat["name"] == name and stat["version"] == version]
    assert len(found) == 1, stats
    return found[0]


def spec(name: str, **fields: Any) -> ModelSpec:
    return ModelSpec(name=name, model_class="tests.fake:Model", **fields)


# -- the mapping ----------------------------------------------------------------------------------------


def test_each_field_is_its_metrics_sum() -> None:
    name = f"m{uuid.uuid4().hex[:8]}"  # a model no other test records for
    for bridge, count in (("rest", 3), ("grpc", 2)):
        metrics.REQUESTS.labels(bridge, name, "1", "ok").inc(count)
        for _ in range(count):
            metrics.REQUEST_SECONDS.labels(bridge, name, "1", "ok").observe(0.25)
    metrics.REQUESTS.labels("zmq", name, "1", "model_error").inc()
    metrics.REQUESTS.labels("rest", name, "1", "deadline").inc()
    metrics.REQUEST_SECONDS.labels("zmq", name, "1", "error").observe(0.5)
    metrics.REQUEST_SECONDS.labels("rest", name, "1", "error").observe(1.5)
    for wait_s in (0.001, 0.003):
        metrics.QUEUE_SECONDS.labels(name, "1").observe(wait_s)
    for size in (1, 2, 3, 3, 600):
        metrics.BATCH_SIZE.labels(name, "1").observe(size)
    for compute_s in (0.01, 0.02):
        metrics.BATCH_COMPUTE_SECONDS.labels(name, "1").observe(compute_s)
    metrics.LAST_INFERENCE.labels(name, "1").set(1_700_000_000.25)
    metrics.REQUESTS.labels("rest", name, "2", "ok").inc(7)  # another version: counted apart

    found = statistics.statistics([spec(name), spec(name, version="2"), spec(f"{name}-idle")])["model_stats"]
    assert [(s["name"], s["version"]) for s in found] == [(name, "1"), (name, "2"), (f"{name}-idle", "1")]
    first = found[0]
    assert first["last_inference"] == 1_700_000_000_250
    assert first["inference_count"] == 1 + 2 + 3 + 3 + 600 and first["execution_count"] == 5
    inference = first["inference_stats"]
    assert inference["success"] == {"count": 5, "ns": 1_250_000_000}
    assert inference["fail"] == {"count": 2, "ns": 2_000_000_000}
    assert inference["queue"] == {"count": 2, "ns": 4_000_000}
    assert inference["compute_infer"] == {"count": 2, "ns": 30_000_000}
    assert inference["compute_input"] == inference["compute_output"] == {"count": 0, "ns": 0}
    # Buckets 1, 2 and 4 (3 and 3), then 1024 (600); each size's compute time is not measured apart.
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in first["batch_stats"]] == [
        (1, 1), (2, 1), (4, 2), (1024, 1)]
    assert found[1]["inference_stats"]["success"]["count"] == 7
    idle = found[2]
    assert idle["inference_count"] == 0 and idle["batch_stats"] == [] and idle["last_inference"] == 0
    # Every document parses as Triton's own message, unchanged.
    json_format.ParseDict({"model_stats": found}, triton_service_pb2.ModelStatisticsResponse())


def test_model_config_is_a_triton_configuration() -> None:
    stateless = spec("det", version="3", max_batch_size=16, max_batch_delay_ms=2.5, max_queue_size=50,
                     run_on_gpu=True, min_replicas=1, max_replicas=4, ragged_batches=True,
                     inputs=[TensorSpec(name="image", datatype="UINT8", shape=[-1, -1, 3])],
                     outputs=[TensorSpec(name="label", datatype="BYTES", shape=[1])])
    config = triton_config(stateless, max_queue_size=10_000, request_timeout_s=30.0)
    parsed = json_format.ParseDict(config, triton_config_pb2.ModelConfig())  # Triton's full message accepts it
    assert parsed.name == "det" and parsed.max_batch_size == 16 and parsed.platform == "inferoxy"
    assert list(parsed.version_policy.specific.versions) == [3]
    assert [(i.name, triton_config_pb2.DataType.Name(i.data_type), list(i.dims), i.allow_ragged_batch)
            for i in parsed.input] == [("image", "TYPE_UINT8", [-1, -1, 3], True)]
    assert [(o.name, triton_config_pb2.DataType.Name(o.data_type)) for o in parsed.output] == [("label", "TYPE_STRING")]
    assert parsed.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 2500
    assert list(parsed.dynamic_batching.preferred_batch_size) == [16]
    assert parsed.dynamic_batching.default_queue_policy.max_queue_size == 50
    assert parsed.dynamic_batching.default_queue_policy.default_timeout_microseconds == 30_000_000
    group = parsed.instance_group[0]
    assert group.count == 4 and triton_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU"
    assert parsed.parameters["min_replicas"].string_value == "1"

    stateful = spec("tracker", stateful=True, session_idle_timeout_s=7.5, max_sessions_per_replica=4,
                    max_replicas=2, default_timeout_s=3.0)
    config = triton_config(stateful, max_queue_size=10_000, request_timeout_s=30.0)
    parsed = json_format.ParseDict(config, triton_config_pb2.ModelConfig())
    assert parsed.WhichOneof("scheduling_choice") == "sequence_batching"
    assert parsed.sequence_batching.max_sequence_idle_microseconds == 7_500_000
    assert parsed.sequence_batching.oldest.max_candidate_sequences == 8
    assert parsed.sequence_batching.oldest.max_queue_delay_microseconds == 2000
    assert triton_config_pb2.ModelInstanceGroup.Kind.Name(parsed.instance_group[0].kind) == "KIND_CPU"


def _fields(descriptor: Descriptor) -> dict[str, tuple[int, int, bool]]:
    return {f.name: (f.number, f.type, f.is_repeated) for f in descriptor.fields}


@pytest.mark.parametrize("message", [
    "ModelConfigRequest", "ModelConfigResponse", "ModelStatisticsRequest", "ModelStatisticsResponse",
    "ModelStatistics", "InferStatistics", "StatisticDuration", "InferBatchStatistics", "MemoryUsage",
    "RepositoryIndexRequest", "RepositoryIndexResponse", "RepositoryModelLoadRequest", "RepositoryModelUnloadRequest",
    "ModelRepositoryParameter", "ModelConfig", "ModelInput", "ModelOutput", "ModelInstanceGroup",
    "ModelDynamicBatching", "ModelSequenceBatching", "ModelQueuePolicy", "ModelVersionPolicy", "ModelParameter",
])
def test_grpc_messages_have_tritons_field_numbers(message: str) -> None:
    ours = pb.DESCRIPTOR.message_types_by_name[message]
    theirs = (triton_service_pb2.DESCRIPTOR.message_types_by_name.get(message)
              or triton_config_pb2.DESCRIPTOR.message_types_by_name[message])

    def compare(ours: Descriptor, theirs: Descriptor) -> None:
        their_fields = _fields(theirs)
        for name, numbered in _fields(ours).items():
            assert their_fields.get(name) == numbered, f"{ours.full_name}.{name}"
        for nested in ours.nested_types:
            compare(nested, theirs.nested_types_by_name[nested.name])
        for enum in ours.enum_types:
            their_values = {v.name: v.number for v in theirs.enum_types_by_name[enum.name].values}
            assert {v.name: v.number for v in enum.values} == their_values

    compare(ours, theirs)


# -- over REST and gRPC --------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_statistics_over_each_protocol(stack: BridgeStack, protocol: str) -> None:
    client = client_for(stack, protocol)
    before = one(stats_of(client, protocol, "echo", "1"), "echo", "1")
    metrics.REQUESTS.labels("rest", "echo", "1", "ok").inc(4)
    metrics.BATCH_SIZE.labels("echo", "1").observe(4)
    after = one(stats_of(client, protocol, "echo", "1"), "echo", "1")
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 4
    assert after["inference_count"] == before["inference_count"] + 4
    assert after["execution_count"] == before["execution_count"] + 1

    assert [s["version"] for s in stats_of(client, protocol, "echo")] == ["1", "2"], "a model: all its versions"
    every = stats_of(client, protocol)
    registered = stack.rest_bridge.gateway.registry
    assert {(s["name"], s["version"]) for s in every} == {(s.name, s.version) for s in registered}
    for name, version in (("nope", ""), ("echo", "9")):
        with pytest.raises(InferenceServerException) as unknown:
            stats_of(client, protocol, name, version)
        assert str(unknown.value.status()) in ("404", "StatusCode.NOT_FOUND")


def test_last_inference_moves_with_a_request(stack: BridgeStack) -> None:
    client = client_for(stack, "http")
    before = one(stats_of(client, "http", "any"), "any", "1")["last_inference"]
    tensor = httpclient.InferInput("t", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 2), np.float32))
    client.infer("any", [tensor])
    after = one(stats_of(client, "http", "any"), "any", "1")["last_inference"]
    assert after > before and after > 1_600_000_000_000


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_model_config_over_each_protocol(stack: BridgeStack, protocol: str) -> None:
    client = client_for(stack, protocol)
    if protocol == "http":
        config = client.get_model_config("echo")
        version2 = client.get_model_config("echo", "2")
    else:
        config = json_format.MessageToDict(client.get_model_config("echo").config, preserving_proto_field_name=True)
        version2 = json_format.MessageToDict(client.get_model_config("echo", "2").config,
                                             preserving_proto_field_name=True)
    assert config["name"] == "echo" and int(config["max_batch_size"]) == 8
    assert [(i["name"], i["data_type"], [int(d) for d in i["dims"]]) for i in config["input"]] == [
        ("x", "TYPE_FP32", [3]), ("mask", "TYPE_BOOL", [-1])]
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 2000
    assert [(i["name"], i["data_type"]) for i in version2["input"]] == [("x", "TYPE_INT64")]
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_config("nope")
    assert str(unknown.value.status()) in ("404", "StatusCode.NOT_FOUND")


# -- who may read them -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def closed_stack() -> Iterator[BridgeStack]:
    """Keys required, metadata closed: statistics of one model follow metadata, of every model the observer rule."""
    stack = BridgeStack(auth="required", auth_metadata=True).start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_who_may_read_statistics_and_config(closed_stack: BridgeStack, protocol: str) -> None:
    stack = closed_stack
    echo_only = create_key(stack, f"echo-only-{protocol}", models=["echo"])
    everything = create_key(stack, f"everything-{protocol}")
    client = client_for(stack, protocol)

    def status(key: str | None, call: str, *args: str) -> str:
        headers = {"authorization": f"Bearer {key}"} if key else None
        try:
            if call == "stats":
                stats_of(client, protocol, *args, headers=headers)
            else:
                client.get_model_config(*args, headers=headers)
        except InferenceServerException as exc:
            return str(exc.status()).removeprefix("StatusCode.")
        return "ok"

    refused = {"http": ("401", "403"), "grpc": ("UNAUTHENTICATED", "PERMISSION_DENIED")}[protocol]
    assert status(None, "stats", "echo") == refused[0]
    assert status(echo_only, "stats", "echo") == "ok"
    assert status(echo_only, "stats", "any") == refused[1], "a key limited to echo sees no other model"
    assert status(echo_only, "stats") == refused[1], "nor every model's statistics"
    assert status(everything, "stats") == "ok"
    assert status(None, "config", "echo") == refused[0]
    assert status(echo_only, "config", "echo") == "ok"
    assert status(echo_only, "config", "any") == refused[1]


def test_rest_statistics_route_is_not_a_model_name(stack: BridgeStack) -> None:
    with httpx.Client(base_url=stack.rest_url) as http:
        answer = http.get("/v2/models/stats")
        assert answer.status_code == 200 and "model_stats" in answer.json()
        assert http.get("/v2/models/echo/versions/2/stats").json()["model_stats"][0]["version"] == "2"


# -- a whole proxy ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    proxy = ProxyProcess(env={"INFEROXY_BRIDGES": "rest,zmq,grpc"})
    proxy.grpc_url = f"127.0.0.1:{proxy.grpc_port}"  # type: ignore[attr-defined]
    with proxy:
        yield proxy


def _send(client: Any, protocol: str, n: int) -> None:
    module = httpclient if protocol == "http" else grpcclient
    for _ in range(n):
        tensor = module.InferInput("x", [1, 2], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 2), np.float32))
        client.infer("echo", [tensor])


def _echo_when(client: Any, protocol: str, done: Any, what: str) -> dict[str, Any]:
    """echo/1's statistics once ``done`` says they moved (a bridge hands its counts on within 0.5 s)."""
    found: list[dict[str, Any]] = []

    def moved() -> bool:
        found[:] = [one(stats_of(client, protocol, "echo"), "echo", "1")]
        return bool(done(found[0]))

    wait_for(moved, timeout=10, interval=0.1, what=what)
    return found[0]


def _settled(client: Any, protocol: str) -> dict[str, Any]:
    """echo/1's statistics once nothing earlier is still on its way: components hand their counts on at most
    metrics.FLUSH_S late, so a count read too soon could still move by an earlier test's requests. Two reads
    more than a flush interval apart that agree settle it."""
    found: list[dict[str, Any]] = []

    def unchanged() -> bool:
        now = {k: v for k, v in one(stats_of(client, protocol, "echo"), "echo", "1").items()}
        same = bool(found) and {k: v for k, v in now.items() if k != "last_inference"} == {
            k: v for k, v in found[0].items() if k != "last_inference"}
        found[:] = [now]
        return same

    wait_for(unchanged, timeout=30, interval=2 * metrics.FLUSH_S, what="echo's statistics to settle")
    return found[0]


def test_real_proxy_counts_every_request_of_each_bridge(proxy: ProxyProcess) -> None:
    """N requests through each bridge: the statistics (read over both protocols) count N more successes, and
    say what /metrics says."""
    http = client_for(proxy, "http")
    wait_for(lambda: http.is_model_ready("echo"), timeout=60, interval=0.2, what="echo to be ready")
    n = 5
    for protocol in PROTOCOLS:
        client = client_for(proxy, protocol)
        before = _settled(client, protocol)
        _send(client, protocol, n)
        success = before["inference_stats"]["success"]
        after = _echo_when(client, protocol, lambda s, success=success: s["inference_stats"]["success"]["count"]
                           == success["count"] + n, f"{protocol} statistics to count {n} requests")
        assert after["inference_stats"]["success"]["ns"] > success["ns"]
        assert after["inference_stats"]["fail"] == before["inference_stats"]["fail"]
        assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 0

    # The statistics and a scrape read the same samples: they agree.
    scraped = httpx.get(f"{proxy.rest_url}/metrics", timeout=10).text
    ok = sum(sample.value for family in text_string_to_metric_families(scraped) for sample in family.samples
             if sample.name == "inferoxy_requests_total" and sample.labels.get("model") == "echo"
             and sample.labels.get("version") == "1" and sample.labels.get("code") == "ok")
    assert one(stats_of(http, "http", "echo"), "echo", "1")["inference_stats"]["success"]["count"] == ok >= 2 * n


def test_real_proxy_counts_batches_and_their_times(proxy: ProxyProcess) -> None:
    """N requests: inference_count N more, at least one more execution, N more queue waits, compute time spent."""
    client = client_for(proxy, "grpc")
    wait_for(lambda: client.is_model_ready("echo"), timeout=60, interval=0.2, what="echo to be ready")
    n = 5
    before = _settled(client, "grpc")
    _send(client, "grpc", n)
    after = _echo_when(client, "grpc", lambda s: s["inference_count"] == before["inference_count"] + n,
                       f"inference_count to count {n} requests")
    assert after["execution_count"] > before["execution_count"]
    assert after["inference_stats"]["queue"]["count"] == before["inference_stats"]["queue"]["count"] + n
    assert after["inference_stats"]["compute_infer"]["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
