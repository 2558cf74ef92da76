"""The batch manager's service when answers from the task manager match nothing it sent (issue 9)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tests.test_batch_manager_service import poll, redis_url, run, running_batch_manager

__all__ = ["redis_url"]  # the fixture, shared with tests/test_batch_manager_service.py


def unmatched(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "matches no batch" in
            r.getMessage()]


def test_an_answer_for_a_batch_never_sent_is_logged_loudly_and_a_late_one_quietly(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # The failure: an answer nobody can match (a mix-up of ids, a peer's bug) vanished without a word, while
    # a request or a replica's credit may wait for the answer that went astray.
    async def body() -> None:
        async with running_batch_manager(redis_url) as running:
            task_manager, bridge = running.task_manager, running.bridge()
            task_manager.hold = True
            await task_manager.replica_up("r1", capacity=1)
            await bridge.infer(1, np.zeros((1, 3), dtype=np.float32))
            await poll(lambda: len(task_manager.held) == 1, "a batch on replica r1")
            header, *_ = task_manager.held.pop()

            # The task manager's order on a death: replica_down, then `failed` for each batch it held.
            await task_manager.send({"t": "replica_down", "replica": "r1", "reason": "killed by signal -9"})
            reply, _ = await bridge.receive()
            assert (reply["id"], reply["code"]) == (1, "replica_lost")
            await task_manager.send({"t": "failed", "replica": "r1", "batch": header["batch"],
                                     "code": "replica_lost", "message": "replica r1 was lost"})
            # Then one nobody sent; messages are handled in order, so once it is logged the late one was seen.
            await task_manager.send({"t": "result", "replica": "r1", "batch": 424242, "items": [], "tensors": []})
            await poll(lambda: unmatched(caplog), "the unmatched result to be logged")
            [message] = unmatched(caplog)
            assert "424242" in message and "'r1'" in message, message
            bridge.sock.close()

    run(body())
