"""A ``Predictor`` over a proxy's ZeroMQ bridge (``inferoxy.client.AsyncClient``): what ``inferoxy batch`` uses."""

from __future__ import annotations

from typing import Any

import numpy as np

from inferoxy.client import DEFAULT_URL, AsyncClient, InferenceError
from inferoxy.protocol import ErrorCode
from jobs.predictor import ModelInfo
from model_manager.spec import TensorSpec

# A batch request may wait behind many others in the proxy's queues: longer than an interactive call.
TIMEOUT_S = 120.0
# The first exchange: no answer this soon means no proxy there, not a busy one.
METADATA_TIMEOUT_S = 15.0


class ZmqPredictor:
    def __init__(self, url: str = DEFAULT_URL, *, api_key: str | None = None, server_key: str | None = None,
                 timeout_s: float = TIMEOUT_S) -> None:
        self.url = url
        self.client = AsyncClient(url, timeout_s, api_key=api_key, server_key=server_key)

    async def metadata(self, model: str, version: str | None) -> ModelInfo:
        try:
            meta = await self.client.metadata(model, version=version, timeout=METADATA_TIMEOUT_S)
        except InferenceError as exc:
            if exc.code != ErrorCode.DEADLINE.value:
                raise
            raise InferenceError(exc.code, f"no answer from {self.url} within {METADATA_TIMEOUT_S:g}s: is a proxy's "
                                 "ZeroMQ bridge there (--url)?") from None
        try:
            return ModelInfo(name=str(meta["name"]), version=str(meta["version"]),
                             inputs=[_tensor(t) for t in meta["inputs"]],
                             outputs=[_tensor(t) for t in meta["outputs"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise InferenceError(ErrorCode.INTERNAL.value, f"the bridge sent malformed metadata: {exc}") from None

    async def infer(self, model: str, version: str | None, inputs: dict[str, np.ndarray],
                    request_id: str | None = None) -> dict[str, np.ndarray]:
        return await self.client.infer(model, inputs, version=version, request_id=request_id)

    async def aclose(self) -> None:
        self.client.close()


def _tensor(data: dict[str, Any]) -> TensorSpec:
    # The metadata's shapes lead with -1 for the batch dimension (as REST's); a spec's leave it out.
    return TensorSpec(name=data["name"], datatype=data["datatype"], shape=list(data["shape"])[1:])
