"""The class a model author subclasses to be served by Inferoxy.

A replica (``python -m inferoxy.runtime``) imports the subclass named by
``INFEROXY_MODEL_CLASS``, constructs it with no arguments, calls ``load()`` once, and then
calls ``predict()`` for every batch it is given. This module is imported inside replica
images, so it depends on numpy only.

Example::

    class Doubler(Model):
        capacity = 2

        def load(self) -> None:
            self.factor = np.float32(2)

        def predict(self, batch):
            return {"y": batch["x"] * self.factor}
"""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np


class Model(abc.ABC):
    """A model served by one replica.

    ``predict`` is called from one worker thread, one batch at a time, so a model needs no
    locking of its own. A batch holds the rows of several requests concatenated along
    axis 0; the runtime splits the outputs back by row, so every output must keep the
    leading dimension of the inputs.
    """

    capacity: ClassVar[int] = 2
    """Batches a replica may hold at once: one running plus the rest queued, so the next batch
    is already waiting when ``predict`` returns. The batch manager never sends more."""

    def load(self) -> None:  # noqa: B027 (optional hook: a model with nothing to load skips it)
        """Read weights and warm up. Called once before the replica reports itself ready;
        an exception here ends the replica (its traceback goes to the replica's log)."""

    @abc.abstractmethod
    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for one batch.

        ``batch`` maps each input name to an array of shape ``[rows, ...]`` (read-only: copy
        before changing it in place). The result maps each output name to an array of shape
        ``[rows, ...]`` whose dtype is one of the wire dtypes (bool, (u)int8..64, float16..64).
        """
