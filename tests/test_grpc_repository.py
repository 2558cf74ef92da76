"""gRPC ``RepositoryIndex``, ``RepositoryModelLoad`` and ``RepositoryModelUnload`` through the real
``tritonclient.grpc``, under the admin API's rules (bridges/grpc_repository.py, docs/ADMIN.md)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import orjson
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from bridges.admin import AdminApi
from bridges.admin_access import AdminError, Caller
from bridges.grpc_repository import peer_host
from bridges.proto import grpc_predict_v2_pb2 as pb
from bridges.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from inferoxy.settings import Settings
from tests.bridge_harness import BridgeStack
from tests.support import wait_for

ADMIN_KEY = "repository-admin-key"


def index(client: Any, **kwargs: Any) -> dict[str, tuple[str, str]]:
    models = client.get_model_repository_index(as_json=True, **kwargs).get("models", [])
    return {f"{m['name']}/{m.get('version', '')}": (m.get("state", ""), m.get("reason", "")) for m in models}


def code_of(call: Any) -> str:
    try:
        call()
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode.")
    return "OK"


@pytest.fixture(scope="module")
def open_stack() -> Iterator[BridgeStack]:
    """No admin key and no admin-scoped API key: loopback callers that are not browsers may administer."""
    stack = BridgeStack().start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def keyed_stack() -> Iterator[BridgeStack]:
    stack = BridgeStack(admin_key=ADMIN_KEY).start()
    try:
        yield stack
    finally:
        stack.stop()


def test_index_unload_and_load_from_loopback(open_stack: BridgeStack) -> None:
    client = grpcclient.InferenceServerClient(open_stack.grpc_url)
    found = index(client)
    assert found["echo/1"] == ("READY", "") and found["fail/1"][0] == "UNAVAILABLE"
    assert found["any/1"] == ("UNKNOWN", "no status reported yet")
    assert set(index(client)) >= {"echo/1", "echo/2", "any/1"}
    ready = client.get_model_repository_index(as_json=True)
    only_ready = grpcclient.InferenceServerClient(open_stack.grpc_url)
    stub_ready = _stub(open_stack).RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert {(m.name, m.version) for m in stub_ready.models} == {("echo", "1"), ("echo", "2")}
    assert len(ready["models"]) > len(stub_ready.models)

    client.unload_model("echo")
    after = index(only_ready)
    assert after["echo/1"] == ("UNAVAILABLE", "unloaded") and after["echo/2"] == ("UNAVAILABLE", "unloaded")
    client.load_model("echo")
    assert index(client)["echo/1"] == ("READY", "")

    # One version, named as a string or an int64 parameter.
    _stub(open_stack).RepositoryModelUnload(pb.RepositoryModelUnloadRequest(
        model_name="echo", parameters={"version": pb.ModelRepositoryParameter(int64_param=2)}))
    after = index(client)
    assert after["echo/2"][1] == "unloaded" and after["echo/1"] == ("READY", "")
    _stub(open_stack).RepositoryModelLoad(pb.RepositoryModelLoadRequest(
        model_name="echo", parameters={"version": pb.ModelRepositoryParameter(string_param="2")}))
    assert index(client)["echo/2"][1] != "unloaded"


def test_load_with_a_config_registers_the_spec(open_stack: BridgeStack) -> None:
    client = grpcclient.InferenceServerClient(open_stack.grpc_url)
    spec = {"version": "1", "model_class": "tests.fake:Model", "max_batch_size": 4}
    client.load_model("fresh", config=orjson.dumps(spec).decode())
    assert "fresh/1" in index(client)
    # The bridge serves the new spec once the registry's change event reaches it.
    wait_for(lambda: code_of(lambda: client.get_model_config("fresh")) == "OK", what="the bridge to know 'fresh'")
    config = client.get_model_config("fresh", as_json=True)["config"]
    assert config["name"] == "fresh" and int(config["max_batch_size"]) == 4


def test_refusals_say_why(open_stack: BridgeStack) -> None:
    client = grpcclient.InferenceServerClient(open_stack.grpc_url)
    assert code_of(lambda: client.unload_model("nope")) == "NOT_FOUND"
    assert code_of(lambda: client.load_model("bad", config="{not json")) == "INVALID_ARGUMENT"
    assert code_of(lambda: client.load_model("bad", config='{"max_batch_size": 0}')) == "INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as files:
        client.load_model("echo", files={"file:1/model.onnx": b"\x00"})
    assert str(files.value.status()) == "StatusCode.INVALID_ARGUMENT" and "file parameters" in files.value.message()
    # A call relayed from a browser (gRPC-Web passes its headers on as metadata) is refused even from loopback.
    assert code_of(lambda: client.get_model_repository_index(headers={"origin": "http://evil.example"})) \
        == "PERMISSION_DENIED"


def test_the_admin_key_decides_when_set(keyed_stack: BridgeStack) -> None:
    client = grpcclient.InferenceServerClient(keyed_stack.grpc_url)
    assert code_of(lambda: client.get_model_repository_index()) == "UNAUTHENTICATED", "loopback alone is not enough"
    wrong = {"authorization": "Bearer wrong"}
    assert code_of(lambda: client.get_model_repository_index(headers=wrong)) == "PERMISSION_DENIED"
    assert code_of(lambda: client.unload_model("echo", headers=wrong)) == "PERMISSION_DENIED"
    assert index(client, headers={"authorization": f"Bearer {ADMIN_KEY}"})["echo/1"][0] == "READY"
    client.unload_model("echo", headers={"x-inferoxy-admin-key": ADMIN_KEY})
    assert index(client, headers={"x-inferoxy-admin-key": ADMIN_KEY})["echo/1"] == ("UNAVAILABLE", "unloaded")
    client.load_model("echo", headers={"x-inferoxy-admin-key": ADMIN_KEY})


def test_peer_addresses_and_the_loopback_rule() -> None:
    assert peer_host("ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:5000") == "::1"
    assert peer_host("unix:/tmp/socket") == "" and peer_host("") == ""
    api = AdminApi(Settings())
    api.check_access(Caller(None, "127.0.0.1", False))
    with pytest.raises(AdminError) as remote:
        api.check_access(Caller(None, "203.0.113.7", False))
    assert remote.value.status == 403, "without a key only loopback may administer, over gRPC as over REST"
    with pytest.raises(AdminError):
        api.check_access(Caller(None, "", False))  # a unix socket peer is not taken for loopback


_channels: list[grpc.Channel] = []


@pytest.fixture(autouse=True)
def _close_channels() -> Iterator[None]:
    yield
    while _channels:
        _channels.pop().close()


def _stub(stack: BridgeStack) -> Any:
    _channels.append(grpc.insecure_channel(stack.grpc_url))
    return pb_grpc.GRPCInferenceServiceStub(_channels[-1])
