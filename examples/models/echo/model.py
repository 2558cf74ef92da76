"""Echo: answers every request with its own inputs. Handy for checking a deployment end to end."""

from __future__ import annotations

import numpy as np

from inferoxy.model import Model


class EchoModel(Model):
    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # The inputs are read-only views of the received frames; they can travel back as they are.
        return dict(batch)
