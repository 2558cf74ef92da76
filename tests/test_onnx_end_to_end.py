"""digits-onnx served by `inferoxy serve` (process runtime, the repository's models.yaml): the same labels as the
numpy digits over REST, gRPC and ZeroMQ; and an ONNX spec whose declared input disagrees with its graph fails
the model with a reason that names the mismatch."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from bridges.proto import grpc_predict_v2_pb2 as pb
from bridges.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from examples.train_digits import ONNX_FILE, held_out_split
from inferoxy.client import AsyncClient
from tests.support import ProxyProcess, wait_for


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyProcess]:
    with ProxyProcess() as running:
        yield running


def labels_over_zmq(proxy: ProxyProcess, model: str, images: np.ndarray) -> np.ndarray:
    async def run() -> list[dict[str, np.ndarray]]:
        async with AsyncClient(proxy.zmq_url, timeout=60) as client:
            # One image per request, all at once: the batch manager forms the batches.
            return await asyncio.gather(*(client.infer(model, {"image": image[None]}) for image in images))

    return np.concatenate([r["label"] for r in asyncio.run(run())])


def labels_over_rest(proxy: ProxyProcess, model: str, images: np.ndarray) -> np.ndarray:
    labels: list[int] = []
    with httpx.Client(base_url=proxy.rest_url, timeout=60) as http:
        for start in range(0, len(images), 32):
            chunk = images[start:start + 32]
            body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(chunk.shape),
                                "data": chunk.ravel().tolist()}]}
            response = http.post(f"/v2/models/{model}/infer", json=body)
            assert response.status_code == 200, response.text
            outputs = {o["name"]: o for o in response.json()["outputs"]}
            assert outputs["label"]["datatype"] == "INT64" and outputs["probabilities"]["shape"] == [len(chunk), 10]
            labels.extend(outputs["label"]["data"])
    return np.array(labels)


def labels_over_grpc(proxy: ProxyProcess, model: str, images: np.ndarray) -> np.ndarray:
    labels = []
    with grpc.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for start in range(0, len(images), 32):
            chunk = np.ascontiguousarray(images[start:start + 32])
            request = pb.ModelInferRequest(model_name=model)
            request.inputs.add(name="image", datatype="FP32", shape=list(chunk.shape))
            request.raw_input_contents.append(chunk.tobytes())
            reply = stub.ModelInfer(request, timeout=60)
            names = [o.name for o in reply.outputs]
            raw = reply.raw_output_contents[names.index("label")]
            labels.append(np.frombuffer(raw, dtype="<i8"))
    return np.concatenate(labels)


def test_digits_onnx_and_digits_give_the_same_labels_over_every_bridge(proxy: ProxyProcess) -> None:
    images, truth = held_out_split()
    images = images.astype(np.float32)
    for over in (labels_over_rest, labels_over_grpc, labels_over_zmq):
        numpy_labels = over(proxy, "digits", images)
        onnx_labels = over(proxy, "digits-onnx", images)
        np.testing.assert_array_equal(onnx_labels, numpy_labels, err_msg=over.__name__)
        assert float(np.mean(onnx_labels == truth)) > 0.95, over.__name__


def test_digits_onnx_metadata_is_its_declared_graph(proxy: ProxyProcess) -> None:
    metadata = httpx.get(f"{proxy.rest_url}/v2/models/digits-onnx", timeout=30).json()
    assert {i["name"]: (i["datatype"], i["shape"]) for i in metadata["inputs"]} == {"image": ("FP32", [-1, 64])}
    assert {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]} == {
        "label": ("INT64", [-1]), "probabilities": ("FP32", [-1, 10])}


MISMATCHED = f"""
models:
  wrong-width:
    format: onnx
    model_uri: {ONNX_FILE}
    max_batch_size: 8
    inputs:
      - {{name: image, datatype: FP32, shape: [32]}}
    outputs:
      - {{name: label, datatype: INT64, shape: []}}
"""


def test_declared_inputs_that_disagree_with_the_graph_fail_the_model_with_the_reason(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(MISMATCHED)
    with ProxyProcess(env={"INFEROXY_MODELS_FILE": str(models), "INFEROXY_BRIDGES": "rest"}) as proxy:

        def failed() -> dict[str, Any] | None:
            state = httpx.get(f"{proxy.rest_url}/dashboard/state", timeout=10).json()
            row = next((m for m in state["models"] if m["name"] == "wrong-width"), None)
            return row if row and row["state"] == "failed" else None

        row = wait_for(failed, timeout=60, interval=0.2, what="wrong-width to fail")
        assert "input 'image' is declared with shape [32] but the graph's is [64]" in row["reason"], row["reason"]
