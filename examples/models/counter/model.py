"""Counter: a stateful example. Each session (stream) keeps a running count and sum of what it was sent.

Every request carries rows of ``x`` (FP32, any width); for each row the answer is how many rows the
session has seen so far (``count``) and the running sum of all values it was sent (``total``). Two
streams never see each other's numbers, and a stream whose replica died gets ``session_lost``
rather than a count that silently starts again from zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inferoxy.model import Session, SessionId, StatefulModel


@dataclass
class Tally:
    count: int = 0
    total: float = 0.0


class CounterModel(StatefulModel):
    def start_session(self, session_id: SessionId) -> Tally:
        return Tally()

    def end_session(self, session_id: SessionId, state: Tally) -> None:
        # Nothing to release here; a real model would free per-stream buffers (tracker state, GPU memory).
        pass

    def predict(self, batch: dict[str, np.ndarray], sessions: Sequence[Session] = ()) -> dict[str, np.ndarray]:
        x = batch["x"].reshape(len(batch["x"]), -1).astype(np.float64)
        rows = len(x)
        count = np.zeros(rows, np.int64)
        total = np.zeros(rows, np.float64)
        for session in sessions:
            tally: Tally = session.state
            for row in range(session.rows.start, session.rows.stop):
                tally.count += 1
                tally.total += float(x[row].sum())
                count[row] = tally.count
                total[row] = tally.total
        return {"count": count, "total": total}
