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
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

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

    spec: Mapping[str, Any] = MappingProxyType({})
    """The model's spec as the registry holds it (the JSON of model_manager/spec.py's ModelSpec, less ``env``
    and ``command``), set by the runtime before ``load()``: declared inputs and outputs, ``model_uri``,
    ``warmup``. Empty when the replica was started by a proxy that does not send it."""

    def load(self) -> None:  # noqa: B027 (optional hook: a model with nothing to load skips it)
        """Read weights and warm up. Called once before the replica reports itself ready (the spec's
        ``warmup`` requests, if any, run after it); an exception here ends the replica (its traceback goes to
        the replica's log)."""

    @abc.abstractmethod
    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for one batch.

        ``batch`` maps each input name to an array of shape ``[rows, ...]`` (read-only: copy
        before changing it in place). The result maps each output name to an array of shape
        ``[rows, ...]`` whose dtype is one of the wire dtypes (bool, (u)int8..64, float16..64).

        A model that declares a ``params`` argument (``def predict(self, batch, params)``) is also given the
        requests' parameters: a sequence of read-only maps, one per row, each the parameters of the request
        the row came from, less the ones the proxy reads (priority, sequence_*, timeout); ``{}`` when a
        request sent none. A ragged batch has one map per item. Models without it are called as before.
        """


def accepts_params(model: Model) -> bool:
    """Whether ``model.predict`` names a ``params`` argument (then the runtime passes each row's parameters)."""
    try:
        return "params" in inspect.signature(model.predict).parameters
    except (TypeError, ValueError):  # a predict without a signature (a C callable) takes what it always took
        return False


SessionId = int | str


@dataclass(slots=True)
class Session:
    """One item of a stateful model's batch: whose session it belongs to and where its rows are.

    ``state`` is what ``start_session`` returned; ``predict`` may change it in place or replace it
    (assign ``session.state``), and the runtime keeps the new one for the session's next request.
    """

    id: SessionId
    state: Any
    rows: slice  # this item's rows of the batch (ragged batches: its index in each input's list)
    start: bool  # the session started with this request
    end: bool  # the session ends after this request (``end_session`` follows ``predict``)


class StatefulModel(Model):
    """A model that keeps state per session (the spec says ``stateful: true``): video trackers, streams.

    A session is a client's ``sequence_id``. The batch manager pins it to one replica, so its state
    lives in this process; a batch may hold items of several sessions, at most one of each, and a
    session's requests arrive in the order they were sent. ``predict`` gets the concatenated batch as
    usual plus one ``Session`` per item, in item order.
    """

    def start_session(self, session_id: SessionId) -> Any:
        """The state of a new session (called before its first ``predict``)."""
        return None

    def end_session(self, session_id: SessionId, state: Any) -> None:  # noqa: B027 (optional hook)
        """The session ended: on ``sequence_end``, after it was idle too long, or when it was restarted."""

    @abc.abstractmethod
    def predict(self, batch: dict[str, np.ndarray], sessions: Sequence[Session] = ()) -> dict[str, np.ndarray]:
        """Outputs for one batch, as ``Model.predict``; ``sessions[i]`` describes item ``i``. A ``params``
        argument, if declared, is given by keyword as for ``Model.predict``."""
