"""Digits with a confidence threshold chosen by each request: an example of request parameters reaching a model.

The request parameter ``threshold`` (a number in [0, 1], default 0) is the least probability a digit needs to be
answered; a row whose best digit is less sure gets label -1 ("not sure"). Requests with different thresholds may
share a batch: ``predict`` gets one parameter map per row (docs/MODELS.md, "Request parameters").
Same tensors as ``DigitsModel``; it runs in the digits image (``inferoxy/digits``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from examples.models.digits.model import DigitsModel

NOT_SURE = -1
log = logging.getLogger("examples.threshold")


class ThresholdDigitsModel(DigitsModel):
    def predict(self, batch: dict[str, np.ndarray],
                params: Sequence[Mapping[str, Any]] = ()) -> dict[str, np.ndarray]:
        outputs = super().predict(batch)
        thresholds = np.array([threshold(row) for row in params] or 0.0, dtype=np.float32)
        sure = outputs["probabilities"].max(axis=1) >= thresholds
        outputs["label"] = np.where(sure, outputs["label"], NOT_SURE).astype(np.int64)
        return outputs


def threshold(params: Mapping[str, Any]) -> float:
    value = params.get("threshold", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        # Raising would fail the whole batch, other clients' rows too: an unreadable value counts as none,
        # and the line logged carries the batch's request ids.
        log.warning("ignoring parameter 'threshold' %r: it must be a number in [0, 1]", value)
        return 0.0
    return float(value)
