"""Train the digits example model and write ``examples/models/digits/weights.npz``.

The data is scikit-learn's 8×8 handwritten digits (``sklearn.datasets.load_digits``: 1797
images, 64 pixels each with values 0..16, labels 0..9), split once and for all as::

    train_test_split(images, labels, test_size=0.25, random_state=0, stratify=labels)

Tests and benchmarks reuse that held-out quarter through ``held_out_split()``, so a score
measured anywhere is a score on images the model never saw.

The model is a small multilayer perceptron (64 -> 64 ReLU -> 10 softmax) trained with
scikit-learn; only its weight matrices are saved, as plain float32 arrays, so the served
model (``examples/models/digits/model.py``) needs numpy alone.

    python -m examples.train_digits          # trains, prints held-out accuracy, writes weights.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

WEIGHTS = Path(__file__).resolve().parent / "models" / "digits" / "weights.npz"
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


def main() -> int:
    from examples.models.digits.model import DigitsModel

    train_x, test_x, train_y, test_y = load_split()
    weights = train(train_x, train_y)
    np.savez(WEIGHTS, w1=weights["w1"], b1=weights["b1"], w2=weights["w2"], b2=weights["b2"])

    model = DigitsModel(WEIGHTS)
    model.load()
    predicted = model.predict({"image": test_x.astype(np.float32)})["label"]
    accuracy = float(np.mean(predicted == test_y))
    print(f"held-out accuracy {accuracy:.4f} on {len(test_y)} images; wrote {WEIGHTS} "
          f"({WEIGHTS.stat().st_size} bytes)")
    if accuracy < MIN_ACCURACY:
        print(f"accuracy is below {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
