"""The job worker's ``Predictor``: requests go over the bus to the batch manager, as a bridge sends them.

It runs the bridges' own pipeline (bridges/pipeline.py) minus the API key (the key was checked when the
job was submitted): the model resolved from the gateway's registry view, the inputs checked against its
declared tensors, the server's deadline. Each failure is the ``InferenceError`` the runner expects, with
the same code a bridge would answer (one row's error, never the job's end).
"""

from __future__ import annotations

import numpy as np

from bridges.errors import RequestError
from bridges.gateway import Gateway
from bridges.pipeline import Pipeline
from bridges.tensors import from_wire, to_wire
from inferoxy.client import InferenceError
from inferoxy.protocol import ErrorCode, InferoxyError
from jobs.predictor import ModelInfo

BRIDGE_LABEL = "job_worker"


class BusPredictor:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._pipeline = Pipeline(gateway, BRIDGE_LABEL)

    async def metadata(self, model: str, version: str | None) -> ModelInfo:
        try:
            spec = self.gateway.resolve(model, version).spec
        except InferoxyError as exc:
            raise InferenceError(_code(exc), exc.message) from None
        return ModelInfo(spec.name, spec.version, list(spec.inputs), list(spec.outputs))

    async def infer(self, model: str, version: str | None, inputs: dict[str, np.ndarray],
                    request_id: str | None = None) -> dict[str, np.ndarray]:
        try:
            resolved = self.gateway.resolve(model, version)
            metas, frames = to_wire([(name, np.ascontiguousarray(array)) for name, array in inputs.items()])
            prepared = self._pipeline.prepare(resolved, metas, frames, None, request_id=request_id)
            answer = await self._pipeline.run(prepared)
        except RequestError as exc:
            raise InferenceError(_code(exc), exc.message, exc.retry_after_s, request_id) from None
        except InferoxyError as exc:
            raise InferenceError(_code(exc), exc.message, None, request_id) from None
        # Copies: the reply's frames are ZeroMQ buffers, and the runner keeps rows until it writes a part.
        return {name: np.array(array) for name, array in from_wire(answer.metas, answer.frames)}

    async def aclose(self) -> None:
        """The gateway belongs to the worker, which closes it."""


def _code(error: InferoxyError) -> str:
    code = error.code
    return code.value if isinstance(code, ErrorCode) else str(code)
