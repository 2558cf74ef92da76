"""Small models that misbehave on demand, for the runtime, task manager and end-to-end tests.

Replicas import them as ``tests.models_for_tests:ClassName`` (the repository root on PYTHONPATH).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from inferoxy.model import Model


class BatchProbeModel(Model):
    """Shows what one ``predict`` call saw: ``y = 2x``, each row's index in the batch, and the batch's size."""

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["x"])
        return {
            "y": batch["x"] * 2,
            "row": np.arange(rows, dtype=np.int64),
            "batch_rows": np.full(rows, rows, dtype=np.int64),
        }


class LoggingModel(Model):
    """Logs one line from inside ``predict`` (which carries the batch's request ids) and echoes ``x`` as ``y``."""

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logging.getLogger("tests.logging_model").info("predict on %d rows", len(batch["x"]))
        return {"y": batch["x"]}


class RaisingModel(Model):
    """Raises ValueError when any value of the input ``fail`` is non-zero; otherwise echoes."""

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if np.any(batch["fail"]):
            raise ValueError("asked to fail")
        return dict(batch)


class BadOutputModel(Model):
    """Returns a broken output, chosen by the name of its one input."""

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (name, array), = batch.items()
        rows = len(array)
        broken: dict[str, object] = {
            "shape": {"y": np.zeros(rows + 1, np.float32)},
            "scalar": {"y": np.array(1.0, np.float32)},
            "dtype": {"y": np.zeros(rows, dtype="datetime64[s]")},
            "complex": {"y": np.zeros(rows, np.complex64)},
            "list": {"y": [0.0] * rows},
            "not_a_dict": [np.zeros(rows, np.float32)],
            "empty": {},
        }
        return broken.get(name, dict(batch))  # type: ignore[return-value]


SLOW_MODEL_SLEEPING = "slow model: sleeping"


class SlowModel(Model):
    """Sleeps, then echoes: for the largest value of the input ``sleep_s`` if there is one, else for
    ``SLOW_MODEL_SECONDS`` (default 1) seconds."""

    def load(self) -> None:
        self.seconds = float(os.environ.get("SLOW_MODEL_SECONDS", "1"))

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seconds = float(batch["sleep_s"].max()) if "sleep_s" in batch else self.seconds
        print(f"{SLOW_MODEL_SLEEPING} {seconds}s", flush=True)  # tests wait for this line: the replica holds a batch
        time.sleep(seconds)
        return dict(batch)


class FailingLoadModel(Model):
    def load(self) -> None:
        raise RuntimeError("weights missing")

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return batch


class HangingLoadModel(Model):
    """Never finishes loading, so its replica never says ready."""

    def load(self) -> None:
        time.sleep(3600)

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return batch


class NotAModel:
    """Not a subclass of Model: the runtime must refuse it."""


class CostModel(Model):
    """Costs a fixed time per batch plus a time per row (``COST_BATCH_MS``, ``COST_ROW_MS``; default 5 and 0.1),
    then echoes and adds ``batch_rows`` (the rows of the batch each row ran in): the benchmark's model, whose
    ideal throughput is known (bench/bench_batching.py)."""

    capacity = 2

    def load(self) -> None:
        self.batch_s = float(os.environ.get("COST_BATCH_MS", "5")) / 1000.0
        self.row_s = float(os.environ.get("COST_ROW_MS", "0.1")) / 1000.0

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(next(iter(batch.values())))
        # Sleep, not spin: the machine's cores are shared with the proxy being measured.
        time.sleep(self.batch_s + self.row_s * rows)
        return {**batch, "batch_rows": np.full(rows, rows, dtype=np.int64)}


class EnvProbeModel(Model):
    """Answers the value of the environment variable its input names (utf-8 bytes), so a test sees what a
    replica process was started with (``CUDA_VISIBLE_DEVICES`` on the GPU it was allotted, say)."""

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = bytes(batch["name"][0]).decode()
        value = os.environ.get(name, "<unset>").encode()
        return {"value": np.frombuffer(value, dtype=np.uint8).reshape(1, -1).repeat(len(batch["name"]), axis=0)}


class WarmupRecorderModel(Model):
    """Appends one line per ``predict`` (its input names, shapes and dtypes) to the file ``WARMUP_RECORD`` names,
    so a test sees what the warmup gave the model, and when (a replica that gets no request after ready makes
    no more lines). Echoes its inputs."""

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        line = " ".join(f"{name}:{array.dtype}{list(array.shape)}" for name, array in sorted(batch.items()))
        with open(os.environ["WARMUP_RECORD"], "a") as record:
            record.write(line + "\n")
        return dict(batch)


class ParamsProbeModel(Model):
    """Answers, per row, the request parameter ``scale`` (default 1) times ``x``, whether the row's parameters
    held any name the proxy reads (they must not), and the rows of the batch it ran in: ``predict`` declares
    ``params``."""

    def predict(self, batch: dict[str, np.ndarray], params: Sequence[Mapping[str, Any]] = ()) -> dict[str, np.ndarray]:
        scale = np.array([float(p.get("scale", 1)) for p in params], dtype=np.float32)
        leaked = np.array([bool({"priority", "timeout", "sequence_id"} & set(p)) for p in params])
        rows = len(batch["x"])
        return {"y": batch["x"] * scale.reshape(-1, *([1] * (batch["x"].ndim - 1))), "leaked": leaked,
                "batch_rows": np.full(rows, rows, dtype=np.int64)}
