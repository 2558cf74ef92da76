"""Train the digits example model and write ``examples/models/digits/weights.npz``.

The data is scikit-learn's 8×8 handwritten digits (``sklearn.datasets.load_digits``: 1797
images, 64 pixels each with values 0..16, labels 0..9), split once and for all as::

    train_test_split(images, labels, test_size=0.25, random_state=0, stratify=labels)

Tests and benchmarks reuse that held-out quarter through ``held_out_split()``, so a score
measured anywhere is a score on images the model never saw.

The model is a small multilayer perceptron (64 -> 64 ReLU -> 10 softmax) trained with
scikit-learn; only its weight matrices are saved, as plain float32 arrays, so the served
model (``examples/models/digits/model.py``) needs numpy alone.

The same weights are also written as an ONNX graph (``digits.onnx``, built with ``onnx.helper``: the
division by 16, MatMul/Add/Relu, MatMul/Add, Softmax, and ArgMax for the label), which the ``digits-onnx``
model serves with ONNX Runtime and no code. ``export_onnx`` alone rewrites it from the saved weights.

    python -m examples.train_digits          # trains, prints held-out accuracy, writes weights.npz and digits.onnx
    python -m examples.train_digits --onnx   # only rewrites digits.onnx from weights.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

WEIGHTS = Path(__file__).resolve().parent / "models" / "digits" / "weights.npz"
ONNX_FILE = WEIGHTS.with_name("digits.onnx")
MAX_PIXEL = 16.0
# ai.onnx opset 17 and IR version 8: old enough for every onnxruntime from 1.13 on.
ONNX_OPSET = 17
ONNX_IR_VERSION = 8
MIN_ACCURACY = 0.95


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_images, test_images, train_labels, test_labels)``; images are float64 [n, 64] in 0..16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    return train_x, test_x, train_y, test_y


def held_out_split() -> tuple[np.ndarray, np.ndarray]:
    """The test quarter: ``(images [450, 64] float64 in 0..16, labels [450] int)``."""
    _, test_x, _, test_y = load_split()
    return test_x, test_y


def train(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Weights of an MLP fitted to ``images`` (0..16), as the arrays DigitsModel loads."""
    from sklearn.neural_network import MLPClassifier

    mlp = MLPClassifier(hidden_layer_sizes=(64,), activation="relu", max_iter=2000, random_state=0)
    mlp.fit(images / 16.0, labels)
    if list(mlp.classes_) != list(range(10)):
        raise RuntimeError(f"expected classes 0..9, got {mlp.classes_}")
    (w1, w2), (b1, b2) = mlp.coefs_, mlp.intercepts_
    return {name: np.asarray(array, dtype=np.float32) for name, array in
            {"w1": w1, "b1": b1, "w2": w2, "b2": b2}.items()}


def onnx_graph(weights: dict[str, np.ndarray]) -> bytes:
    """The classifier as a serialized ONNX model: input ``image`` FP32 [N, 64] (0..16), outputs ``label``
    INT64 [N] and ``probabilities`` FP32 [N, 10]; the computation DigitsModel.predict does, step for step."""
    from onnx import TensorProto, checker, helper, numpy_helper

    batch = "N"
    constants = [numpy_helper.from_array(np.asarray(weights[name], dtype=np.float32), name)
                 for name in ("w1", "b1", "w2", "b2")]
    constants.append(numpy_helper.from_array(np.array(MAX_PIXEL, dtype=np.float32), "max_pixel"))
    nodes = [
        helper.make_node("Div", ["image", "max_pixel"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "w1"], ["hidden_in"]),
        helper.make_node("Add", ["hidden_in", "b1"], ["hidden_pre"]),
        helper.make_node("Relu", ["hidden_pre"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["logits_in"]),
        helper.make_node("Add", ["logits_in", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "digits",
        inputs=[helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 64])],
        outputs=[helper.make_tensor_value_info("label", TensorProto.INT64, [batch]),
                 helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, 10])],
        initializer=constants,
    )
    model = helper.make_model(graph, producer_name="inferoxy examples.train_digits",
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def export_onnx(weights_path: Path = WEIGHTS, onnx_path: Path = ONNX_FILE) -> Path:
    """Write ``onnx_path`` from the weights saved at ``weights_path``."""
    with np.load(weights_path, allow_pickle=False) as saved:
        weights = {name: saved[name] for name in ("w1", "b1", "w2", "b2")}
    onnx_path.write_bytes(onnx_graph(weights))
    return onnx_path


def main(argv: list[str] | None = None) -> int:
    from examples.models.digits.model import DigitsModel

    if "--onnx" in (sys.argv[1:] if argv is None else argv):
        path = export_onnx()
        print(f"wrote {path} ({path.stat().st_size} bytes) from {WEIGHTS}")
        return 0
    train_x, test_x, train_y, test_y = load_split()
    weights = train(train_x, train_y)
    np.savez(WEIGHTS, w1=weights["w1"], b1=weights["b1"], w2=weights["w2"], b2=weights["b2"])
    export_onnx()

    model = DigitsModel(WEIGHTS)
    model.load()
    predicted = model.predict({"image": test_x.astype(np.float32)})["label"]
    accuracy = float(np.mean(predicted == test_y))
    print(f"held-out accuracy {accuracy:.4f} on {len(test_y)} images; wrote {WEIGHTS} "
          f"({WEIGHTS.stat().st_size} bytes) and {ONNX_FILE} ({ONNX_FILE.stat().st_size} bytes)")
    if accuracy < MIN_ACCURACY:
        print(f"accuracy is below {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
