"""Whether a bus peer is alive, judged by heartbeats: the one rule every link shares.

A peer is silent once nothing was heard from it for ``heartbeat_interval_s x heartbeat_liveness``
(any message counts, not only ``hb``). The owner calls ``heard`` on every message and ``check``
from its heartbeat loop, sleeping ``next_check_s`` between checks so a silent peer is noticed
within the limit rather than up to one interval after it.

A process that was itself frozen (SIGSTOP, an event loop blocked for seconds) wakes to find
every peer "silent" while their messages wait unread in its sockets: owners read their sockets
right before they ``check``, so what arrived meanwhile counts.
"""

from __future__ import annotations


class PeerLiveness:
    """One peer's last sign of life and whether it is taken as lost."""

    def __init__(self, interval_s: float, liveness: int, now: float) -> None:
        self.interval_s = interval_s
        self.limit_s = interval_s * liveness
        self.last_heard = now
        self.lost = False

    def heard(self, now: float) -> bool:
        """Record a message; True when the peer had been taken as lost and is back."""
        self.last_heard = now
        back, self.lost = self.lost, False
        return back

    def check(self, now: float) -> bool:
        """True exactly once when the peer has just passed the silence limit."""
        if self.lost or now - self.last_heard <= self.limit_s:
            return False
        self.lost = True
        return True

    def silent_for(self, now: float) -> float:
        return now - self.last_heard

    def next_check_s(self, now: float) -> float:
        """How long the heartbeat loop may sleep: the next beat, or just past the silence limit if sooner."""
        until_limit = self.last_heard + self.limit_s - now
        if self.lost or until_limit < 0:
            return self.interval_s
        return min(self.interval_s, until_limit + 0.001)
