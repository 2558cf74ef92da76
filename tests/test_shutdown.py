"""Stopping the proxy while a replica holds a long batch: it must be over well inside `docker stop`'s 10 s.

The Docker runtime's version of this test is in tests/test_docker_end_to_end.py.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import httpx

from tests.models_for_tests import SLOW_MODEL_SLEEPING
from tests.support import ProxyProcess, wait_for

DOCKER_STOP_DEFAULT_S = 10.0
SLOW = """models:
  slow: {model_class: 'tests.models_for_tests:SlowModel', max_batch_size: 1, max_batch_delay_ms: 0,
         env: {SLOW_MODEL_SECONDS: '60'}}
"""


def hold_a_batch(rest_url: str) -> threading.Thread:
    """A request the slow model sleeps 60 s on; its reply (an error, once the proxy stops) is not the point."""
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}

    def call() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the proxy went away under it
            httpx.post(f"{rest_url}/v2/models/slow/infer", json=body, timeout=90)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def test_sigterm_with_a_replica_holding_a_long_batch_stops_everything_within_10_s(tmp_path: Path) -> None:
    # The failure: the task manager gave a replica holding a batch 5 s, after the bridges' own 5 s, so a proxy
    # under `docker stop` (SIGTERM, SIGKILL 10 s later) died before it had stopped its replicas.
    models = tmp_path / "models.yaml"
    models.write_text(SLOW)
    proxy = ProxyProcess(env={"INFEROXY_MODELS_FILE": str(models), "INFEROXY_BRIDGES": "rest"}).start()
    try:
        wait_for(lambda: httpx.get(f"{proxy.rest_url}/v2/models/slow/ready").status_code == 200, timeout=30,
                 interval=0.1, what="slow ready")
        caller = hold_a_batch(proxy.rest_url)
        proxy.wait_for_line(SLOW_MODEL_SLEEPING, timeout=30)
    finally:
        # SIGTERM; fails unless serve, and so every component and replica below it, is gone within the limit.
        code = proxy.stop(timeout=DOCKER_STOP_DEFAULT_S)
    assert code == 0, proxy.log()
    assert "killing it" in proxy.log(), "the replica was stopped hard once the drain budget was spent"
    caller.join(timeout=30)
