"""The example models, called directly (no proxy)."""

from __future__ import annotations

import numpy as np
import pytest

from examples.models.digits.model import WEIGHTS, DigitsModel
from examples.models.echo.model import EchoModel
from examples.train_digits import MIN_ACCURACY, held_out_split


@pytest.fixture(scope="module")
def digits() -> DigitsModel:
    model = DigitsModel()
    model.load()
    return model


def test_digits_is_accurate_on_the_held_out_split(digits: DigitsModel) -> None:
    images, labels = held_out_split()
    assert len(labels) == 450
    outputs = digits.predict({"image": images.astype(np.float32)})
    assert outputs["label"].dtype == np.int64 and outputs["label"].shape == (450,)
    assert outputs["probabilities"].dtype == np.float32 and outputs["probabilities"].shape == (450, 10)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(outputs["label"], outputs["probabilities"].argmax(axis=1))
    accuracy = float(np.mean(outputs["label"] == labels))
    assert accuracy >= MIN_ACCURACY >= 0.95, accuracy


def test_digits_takes_8x8_images_too_and_refuses_other_widths(digits: DigitsModel) -> None:
    images, _ = held_out_split()
    flat = digits.predict({"image": images[:5].astype(np.float32)})["label"]
    square = digits.predict({"image": images[:5].reshape(5, 8, 8).astype(np.float32)})["label"]
    np.testing.assert_array_equal(flat, square)
    with pytest.raises(ValueError, match="64"):
        digits.predict({"image": np.zeros((2, 3), np.float32)})


def test_digits_weights_are_plain_arrays() -> None:
    with np.load(WEIGHTS, allow_pickle=False) as saved:
        assert sorted(saved.files) == ["b1", "b2", "w1", "w2"]
        assert all(saved[name].dtype == np.float32 for name in saved.files)
    assert WEIGHTS.stat().st_size < 100_000


def test_echo_returns_its_inputs() -> None:
    batch = {"x": np.arange(6, dtype=np.float32).reshape(3, 2), "mask": np.array([True, False, True])}
    outputs = EchoModel().predict(batch)
    assert outputs.keys() == batch.keys()
    for name, array in batch.items():
        np.testing.assert_array_equal(outputs[name], array)
        assert outputs[name].dtype == array.dtype
