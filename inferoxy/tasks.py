"""Stopping asyncio tasks for certain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], *, retry_s: float = 0.5) -> None:
    """Cancel worker loops and return once every one has ended; their results and errors are dropped.

    Python 3.11's ``asyncio.wait_for``, which redis-py's asyncio client runs every command under,
    drops a cancellation that lands just as the command completes: the task then carries on as if
    never cancelled (fixed in 3.12). Cancelling again until the task ends makes a component's
    shutdown certain instead of a hang.

    Only for tasks with no cleanup of their own to finish: a repeated cancellation would also cut
    short a ``finally`` that stops replicas or writes a last status. Stop those with one
    ``cancel()`` and wait.
    """
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_s)
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()
