"""The ONNX replica model (inferoxy/onnx_model.py) in-process: the digits export, graph-derived tensors, the
check of declared tensors, providers and threads, and model_uri fetched from S3 (moto's server) once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from examples.models.digits.model import DigitsModel
from examples.train_digits import ONNX_FILE, WEIGHTS, held_out_split, onnx_graph
from inferoxy.onnx_model import (
    CACHE_DIR_VARIABLE,
    CPU_PROVIDER,
    CUDA_PROVIDER,
    OnnxModel,
    OnnxModelError,
    Tensor,
    cache_path,
    choose_providers,
    intra_op_threads,
)

REPO = Path(__file__).resolve().parent.parent
DIGITS_INPUTS = [{"name": "image", "datatype": "FP32", "shape": [64]}]
DIGITS_OUTPUTS = [{"name": "label", "datatype": "INT64", "shape": []},
                  {"name": "probabilities", "datatype": "FP32", "shape": [10]}]


def onnx_model(**spec: Any) -> OnnxModel:
    model = OnnxModel()
    model.spec = {"format": "onnx", "model_uri": str(ONNX_FILE), **spec}
    model.load()
    return model


def test_the_committed_onnx_file_is_the_saved_weights() -> None:
    with np.load(WEIGHTS, allow_pickle=False) as saved:
        weights = {name: saved[name] for name in ("w1", "b1", "w2", "b2")}
    assert ONNX_FILE.read_bytes() == onnx_graph(weights)


def test_onnx_digits_gives_the_numpy_digits_labels_on_the_held_out_split() -> None:
    images, labels = held_out_split()
    batch = {"image": images.astype(np.float32)}
    numpy_model = DigitsModel()
    numpy_model.load()
    expected = numpy_model.predict(batch)
    got = onnx_model(inputs=DIGITS_INPUTS, outputs=DIGITS_OUTPUTS).predict(batch)
    np.testing.assert_array_equal(got["label"], expected["label"])
    assert got["label"].dtype == np.int64 and got["probabilities"].dtype == np.float32
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=1e-5)
    assert float(np.mean(got["label"] == labels)) > 0.95


def test_undeclared_tensors_come_from_the_graph_without_the_batch_axis() -> None:
    model = onnx_model()
    assert model.inputs == [Tensor("image", "FP32", (64,))]
    assert model.outputs == [Tensor("label", "INT64", ()), Tensor("probabilities", "FP32", (10,))]
    assert [t.as_spec() for t in model.inputs] == DIGITS_INPUTS


def test_declared_outputs_are_the_ones_served() -> None:
    model = onnx_model(outputs=DIGITS_OUTPUTS[:1])
    out = model.predict({"image": np.zeros((3, 64), np.float32)})
    assert list(out) == ["label"] and out["label"].shape == (3,)


@pytest.mark.parametrize(("inputs", "outputs", "reason"), [
    ([{"name": "image", "datatype": "FP32", "shape": [32]}], DIGITS_OUTPUTS,
     "input 'image' is declared with shape [32] but the graph's is [64]"),
    ([{"name": "image", "datatype": "FP64", "shape": [64]}], DIGITS_OUTPUTS,
     "input 'image' is declared FP64 but the graph's is FP32"),
    ([{"name": "pixels", "datatype": "FP32", "shape": [64]}], DIGITS_OUTPUTS,
     "input 'pixels' is declared but the graph has no such input"),
    (DIGITS_INPUTS, [{"name": "logits", "datatype": "FP32", "shape": [10]}],
     "output 'logits' is declared but the graph has no such output"),
])
def test_declared_tensors_that_disagree_with_the_graph_fail_load(inputs: list, outputs: list, reason: str) -> None:
    with pytest.raises(OnnxModelError, match="the spec disagrees with") as failure:
        onnx_model(inputs=inputs, outputs=outputs)
    assert reason in str(failure.value)


def test_a_missing_file_and_a_wrong_dtype_are_explained() -> None:
    with pytest.raises(OnnxModelError, match="no such file"):
        onnx_model(model_uri=str(REPO / "nothing.onnx"))
    with pytest.raises(ValueError, match="'image' must be FP32, got float64"):
        onnx_model().predict({"image": np.zeros((1, 64))})


def test_providers_follow_the_spec_else_the_gpu_else_the_cpu() -> None:
    both = [CUDA_PROVIDER, CPU_PROVIDER]
    assert choose_providers({}, {}, both) == [CPU_PROVIDER]
    # A GPU replica: the spec asks for one and the task manager made one visible.
    assert choose_providers({"run_on_gpu": True}, {"CUDA_VISIBLE_DEVICES": "3"}, both) == both
    assert choose_providers({"run_on_gpu": True}, {}, both) == [CPU_PROVIDER]
    assert choose_providers({"execution_providers": [CPU_PROVIDER]}, {"CUDA_VISIBLE_DEVICES": "0"}, both) == [
        CPU_PROVIDER]
    with pytest.raises(OnnxModelError, match="not in this onnxruntime"):
        choose_providers({"run_on_gpu": True}, {"CUDA_VISIBLE_DEVICES": "0"}, [CPU_PROVIDER])


def test_intra_op_threads_follow_the_cpu_share() -> None:
    assert intra_op_threads({"resources": {"cpus": 2.5}}) == 2
    assert intra_op_threads({"resources": {"cpus": 0.5}}) == 1
    assert intra_op_threads({"resources": {}}) >= 1


def test_the_runtime_module_imports_without_onnxruntime() -> None:
    # Model images of Python models have no onnxruntime: nothing on the runtime's import path may need it.
    code = ("import sys; sys.modules['onnxruntime'] = None; sys.modules['fsspec'] = None; "
            "import inferoxy.runtime, inferoxy.onnx_model")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# -- model_uri on S3 (moto's server, on 127.0.0.1) --------------------------------------------------------------


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            monkeypatch.setenv(name, value)
        yield server
    finally:
        server.stop()


def test_a_model_uri_on_s3_is_fetched_once_into_the_cache(s3_endpoint: Any, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    boto3.client("s3").create_bucket(Bucket="models")
    boto3.client("s3").put_object(Bucket="models", Key="digits/1/digits.onnx", Body=ONNX_FILE.read_bytes())
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path))
    uri = "s3://models/digits/1/digits.onnx"

    first = onnx_model(model_uri=uri)
    assert first.path == cache_path(uri, tmp_path) and first.path.read_bytes() == ONNX_FILE.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no partial file left behind

    # The store is gone: a second replica still loads, from the cache.
    s3_endpoint.stop()
    second = onnx_model(model_uri=uri)
    assert second.path == first.path
    assert second.predict({"image": np.zeros((2, 64), np.float32)})["label"].shape == (2,)

    with pytest.raises(OnnxModelError, match="cannot fetch it"):
        onnx_model(model_uri="s3://models/elsewhere.onnx")
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]


def test_every_onnx_model_of_models_yaml_declares_its_tensors_as_its_graph_has_them() -> None:
    # The proxy never opens model files, so metadata is what the spec declares: served ONNX models declare it all.
    from model_manager.models_file import load_models_file

    onnx_specs = [s for s in load_models_file(REPO / "models.yaml") if s.format == "onnx"]
    assert [s.name for s in onnx_specs] == ["digits-onnx"]
    for spec in onnx_specs:
        assert spec.inputs and spec.outputs, spec.name
        model = OnnxModel()
        model.spec = spec.model_dump(mode="json")
        assert spec.model_uri is not None and not Path(spec.model_uri).is_absolute()
        model.spec = {**model.spec, "model_uri": str(REPO / spec.model_uri)}
        model.load()  # raises on any disagreement
        assert [t.as_spec() for t in model.outputs] == [t.model_dump() for t in spec.outputs]


def test_an_onnx_spec_without_an_image_gets_the_onnx_image_and_the_onnx_model_class() -> None:
    from inferoxy.settings import Settings
    from model_manager.spec import ONNX_MODEL_CLASS, ModelSpec
    from task_manager.placement import replica_plan
    from task_manager.replicas import ModelGroup, Replica
    from task_manager.runtimes.process import ProcessRuntime

    for image, expected in ((None, "registry.example/onnx:7"), ("inferoxy/digits-onnx", "inferoxy/digits-onnx")):
        spec = ModelSpec(name="m", format="onnx", model_uri="m.onnx", image=image)
        plan = replica_plan(Settings(onnx_image="registry.example/onnx:7"), Replica("m-1-a", spec, ModelGroup(spec),
                                                                                    started_at=0.0), None)
        assert plan.spec.image == expected and plan.env["INFEROXY_MODEL_CLASS"] == ONNX_MODEL_CLASS
        assert ProcessRuntime().command(plan)[1:] == ["-m", "inferoxy.runtime"]
