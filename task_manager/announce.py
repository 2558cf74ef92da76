"""What batch managers are told: this run's epoch, replicas up, draining and down, each model's serving state.

Serving states are announced after the handler that changed them (``call_soon``), so each change goes
out once, in its final form (``_ended`` sets a failure after the change that ended the replica), and
only real changes go out: batch managers log each one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

from inferoxy import messages as m
from model_manager.spec import ServingState
from task_manager.relay import Relay
from task_manager.replicas import ModelGroup, Replica, ReplicaState
from task_manager.status import clip_reason


class Announcer:
    def __init__(self, relay: Relay, groups: Mapping[str, ModelGroup], replicas: Mapping[bytes, Replica]) -> None:
        self.relay = relay
        self.groups = groups
        self.replicas = replicas
        # Fresh each run and sent in every ``hb`` to batch managers: a new one tells them this task manager
        # restarted, so the replicas the old one announced (and the batches they held) are gone.
        self.epoch = os.urandom(8).hex()
        self._pending: dict[str, ModelGroup] = {}  # serving states to announce, by spec key
        self._scheduled = False
        self._announced: dict[str, tuple[ServingState, str | None]] = {}  # what batch managers were told

    def heartbeat(self) -> m.Heartbeat:
        return m.Heartbeat(epoch=self.epoch)

    def to(self, sender: bytes) -> None:
        """A new, restarted or resyncing batch manager learns every replica it can use."""
        self.relay.send_batch_manager(sender, self.heartbeat())  # first: our epoch, before what it announces
        for replica in self.replicas.values():
            if replica.announced and replica.state is ReplicaState.READY:
                self.relay.send_batch_manager(sender, _replica_up(replica))
        for group in self.groups.values():
            self.relay.send_batch_manager(sender, _model_status(group, *_serving_state(group)))

    def replica_up(self, replica: Replica) -> None:
        replica.announced = True
        self.relay.to_batch_managers(_replica_up(replica))

    def replica_draining(self, replica: Replica, reason: str, sessions_grace_s: float | None = None) -> None:
        if replica.announced:
            self.relay.to_batch_managers(m.ReplicaDraining(replica.id, reason, sessions_grace_s))

    def replica_down(self, replica: Replica, reason: str) -> None:
        if replica.announced:
            replica.announced = False
            self.relay.to_batch_managers(m.ReplicaDown(replica.id, reason))

    def state_changed(self, group: ModelGroup) -> None:
        self._pending[group.spec.key] = group
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._announce_states)

    def _announce_states(self) -> None:
        """Tell every batch manager of each changed serving state (only real changes: they log each one)."""
        self._scheduled = False
        pending, self._pending = self._pending, {}
        if not self.relay.is_open:
            return  # scheduled as the task manager stopped: no one left to tell
        for key, group in pending.items():
            if self.groups.get(key) is not group:
                self._announced.pop(key, None)  # removed: a model added again under the key is news
                continue
            state = _serving_state(group)
            if self._announced.get(key) != state:
                self._announced[key] = state
                self.relay.to_batch_managers(_model_status(group, *state))


def _replica_up(replica: Replica) -> m.ReplicaUp:
    return m.ReplicaUp(replica.id, replica.spec.name, replica.spec.version, replica.capacity)


def _model_status(group: ModelGroup, state: ServingState, reason: str | None) -> m.ModelStatus:
    return m.ModelStatus(group.spec.name, group.spec.version, state, reason)


def _serving_state(group: ModelGroup) -> tuple[ServingState, str | None]:
    state, reason = group.serving_state()
    return state, clip_reason(reason) if reason else None
