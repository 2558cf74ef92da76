"""What batch managers are told: this run's epoch, replicas up, draining and down, their credit, each model's
serving state.

Each batch manager is told its own share of a replica's capacity (``credit.CreditLedger`` decides): in its
``replica_up``, then in ``credit`` whenever the share moves. Shares are split again when a model version's load
moves, when its replicas come and go, and when batch managers come and go.

Serving states are announced after the handler that changed them (``call_soon``), so each change goes
out once, in its final form (``_ended`` sets a failure after the change that ended the replica), and
only real changes go out: batch managers log each one.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Mapping

from inferoxy import messages as m
from model_manager.spec import ServingState
from task_manager.credit import CreditLedger
from task_manager.load import LoadBook
from task_manager.relay import Relay
from task_manager.replicas import ModelGroup, Replica, ReplicaState
from task_manager.status import clip_reason


class Announcer:
    def __init__(self, relay: Relay, groups: Mapping[str, ModelGroup], replicas: Mapping[bytes, Replica],
                 loads: LoadBook) -> None:
        self.relay = relay
        self.groups = groups
        self.replicas = replicas
        self.loads = loads
        self.credit = CreditLedger()
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
        self.rebalance_all()  # it is among ``relay.batch_managers`` already: its shares ride on its replica_ups
        for replica in self.replicas.values():
            if replica.announced and replica.state is ReplicaState.READY:
                self.relay.send_batch_manager(sender, _replica_up(replica, self.credit.announce(replica.id, sender)))
        for group in self.groups.values():
            self.relay.send_batch_manager(sender, _model_status(group, *_serving_state(group)))

    def replica_up(self, replica: Replica) -> None:
        replica.announced = True
        self.rebalance(replica.spec.key)
        for sender in list(self.relay.batch_managers):
            self.relay.send_batch_manager(sender, _replica_up(replica, self.credit.announce(replica.id, sender)))

    def replica_draining(self, replica: Replica, reason: str, sessions_grace_s: float | None = None) -> None:
        if replica.announced:
            self.relay.to_batch_managers(m.ReplicaDraining(replica.id, reason, sessions_grace_s))
            self._replica_gone(replica)

    def replica_down(self, replica: Replica, reason: str) -> None:
        if replica.announced:
            replica.announced = False
            self.relay.to_batch_managers(m.ReplicaDown(replica.id, reason))
            self._replica_gone(replica)

    # --- credit --------------------------------------------------------------------------------------------

    def rebalance(self, key: str) -> None:
        """Split the credit of a model version's ready replicas again, from each batch manager's load."""
        group = self.groups.get(key)
        # A removed model's replicas (retiring, no longer in ``groups``) still serve what batch managers queued.
        candidates = group.replicas.values() if group is not None else self.replicas.values()
        ready = [r for r in candidates if r.announced and r.state is ReplicaState.READY and r.spec.key == key]
        if not ready:
            return
        demand = {bm: load.queued + load.in_flight for bm, load in self.loads.by_batch_manager(key).items()}
        self.credit.plan({r.id: r.capacity for r in ready}, self.relay.batch_managers.keys(), demand)
        for replica in ready:
            self.settle(replica)

    def rebalance_all(self) -> None:
        for key in {r.spec.key for r in self.replicas.values() if r.announced and r.state is ReplicaState.READY}:
            self.rebalance(key)

    def settle(self, replica: Replica) -> None:
        """Send the replica's credit changes that room allows now; the relay calls back when room frees."""
        for grant in self.credit.settle(replica.id, Counter(replica.in_flight.values())):
            self.relay.send_batch_manager(grant.batch_manager, m.Credit(grant.replica, grant.capacity))
        replica.credit_waiting = self.credit.waiting(replica.id)

    def credit_acked(self, sender: bytes, msg: m.Credit) -> None:
        """A batch manager applied a ``credit``: batches it sent before are all here now."""
        replica = self.replicas.get(msg.replica.encode())
        if self.credit.acked(msg.replica, sender) and replica is not None:
            self.settle(replica)

    def batch_manager_gone(self, sender: bytes) -> None:
        """Its credit is reclaimed: the others' shares grow as the batches it left are answered."""
        self.credit.forget_batch_manager(sender)
        self.rebalance_all()

    def _replica_gone(self, replica: Replica) -> None:
        self.credit.forget_replica(replica.id)
        replica.credit_waiting = False
        self.rebalance(replica.spec.key)

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


def _replica_up(replica: Replica, capacity: int) -> m.ReplicaUp:
    return m.ReplicaUp(replica.id, replica.spec.name, replica.spec.version, capacity)


def _model_status(group: ModelGroup, state: ServingState, reason: str | None) -> m.ModelStatus:
    return m.ModelStatus(group.spec.name, group.spec.version, state, reason)


def _serving_state(group: ModelGroup) -> tuple[ServingState, str | None]:
    state, reason = group.serving_state()
    return state, clip_reason(reason) if reason else None
