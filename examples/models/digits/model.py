"""Digits: classifies scikit-learn's 8×8 handwritten digits with a small MLP, in numpy alone.

Input ``image``: FP32 ``[-1, 64]``, one flattened 8×8 image per row with pixel values 0..16
as ``sklearn.datasets.load_digits`` gives them (``[-1, 8, 8]`` is accepted too).
Outputs ``label``: INT64 ``[-1]``, the digit; ``probabilities``: FP32 ``[-1, 10]``.

The weights come from ``python -m examples.train_digits``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inferoxy.model import Model

WEIGHTS = Path(__file__).resolve().parent / "weights.npz"
PIXELS = 64
MAX_PIXEL = 16.0


class DigitsModel(Model):
    def __init__(self, weights: str | Path = WEIGHTS) -> None:
        self.weights_path = Path(weights)
        self.layers: list[tuple[np.ndarray, np.ndarray]] = []

    def load(self) -> None:
        with np.load(self.weights_path, allow_pickle=False) as saved:
            self.layers = [(saved["w1"], saved["b1"]), (saved["w2"], saved["b2"])]

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        rows = images.reshape(len(images), -1) if images.ndim else images
        if rows.ndim != 2 or rows.shape[1] != PIXELS:
            raise ValueError(f"'image' must be [-1, {PIXELS}] (8×8 pixels, values 0..16), got {list(images.shape)}")
        (w1, b1), (w2, b2) = self.layers
        hidden = np.maximum(rows.astype(np.float32) / np.float32(MAX_PIXEL) @ w1 + b1, 0)
        logits = hidden @ w2 + b2
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
        return {"label": probabilities.argmax(axis=1).astype(np.int64), "probabilities": probabilities}
