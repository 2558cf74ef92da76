"""The load each batch manager last reported (``m.Load``), per model version: what the autoscaler scales on and
what each replica's credit is split by. Pure bookkeeping: the task manager feeds it and reads it."""

from __future__ import annotations

from dataclasses import dataclass

from inferoxy import messages as m


@dataclass(frozen=True)
class ModelLoad:
    queued: int = 0
    """Requests waiting in batch managers for a batch."""
    in_flight: int = 0
    """Batches at the model version's replicas."""

    def __add__(self, other: ModelLoad) -> ModelLoad:
        return ModelLoad(self.queued + other.queued, self.in_flight + other.in_flight)


IDLE = ModelLoad()


class LoadBook:
    def __init__(self) -> None:
        self._by_batch_manager: dict[bytes, dict[str, ModelLoad]] = {}

    def report(self, sender: bytes, msg: m.Load) -> set[str]:
        """Take a batch manager's report; returns the model versions (spec keys) whose load it changed."""
        book = self._by_batch_manager.setdefault(sender, {})
        changed: set[str] = set()
        for entry in msg.models:
            key = f"{entry.model}/{entry.version}"
            load = ModelLoad(entry.queued, entry.in_flight)
            if book.get(key, IDLE) != load:
                changed.add(key)
            if load == IDLE:
                book.pop(key, None)
            else:
                book[key] = load
        return changed

    def forget(self, sender: bytes) -> set[str]:
        """A batch manager that went away: its load goes with it. Returns the model versions that had some."""
        return set(self._by_batch_manager.pop(sender, {}))

    def total(self, key: str) -> ModelLoad:
        """A model version's load over every batch manager."""
        total = IDLE
        for book in self._by_batch_manager.values():
            total = total + book.get(key, IDLE)
        return total

    def by_batch_manager(self, key: str) -> dict[bytes, ModelLoad]:
        """A model version's load at each batch manager that has some."""
        return {sender: book[key] for sender, book in self._by_batch_manager.items() if key in book}
