"""Process helpers shared by the supervisor and the process runtime."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for children that must not outlive their parent, even one killed with SIGKILL.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere orphans are left to the parent's own cleanup.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
