"""How a batch job reaches a model: the one interface the job runner needs, whatever carries its requests.

``inferoxy batch --url`` sends through a proxy's ZeroMQ bridge; the ``job_worker`` component sends over the
bus, as a bridge does. The runner sees only this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from model_manager.spec import TensorSpec


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the runner must know of a model version before it reads a row: the tensors it declares."""

    name: str
    version: str
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)


class Predictor(Protocol):
    async def metadata(self, model: str, version: str | None) -> ModelInfo:
        """The model version's declared tensors; raises ``inferoxy.client.InferenceError`` (``unknown_model``)."""

    async def infer(self, model: str, version: str | None, inputs: dict[str, np.ndarray],
                    request_id: str | None = None) -> dict[str, np.ndarray]:
        """One request's outputs; raises ``inferoxy.client.InferenceError`` when it fails (that row's error)."""

    async def aclose(self) -> None:
        """Release sockets; the predictor is not used after."""
