"""The Docker runtime when the task manager is killed under `inferoxy serve`: its containers are swept, then replaced.

Before: killing the task manager made `serve` exit. Now `serve` restarts it; the old task manager's
containers (its replicas, which exit once its heartbeats stop) are removed by the new one's orphan
sweep at start, and only then are replacements started.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from tests.support import wait_for
from tests.test_docker_end_to_end import (  # noqa: F401  (fixtures: images, instance)
    ECHO,
    containers_of,
    docker_proxy,
    images,
    instance,
    models_file,
    rest_infer,
)


def test_a_killed_task_manager_s_containers_are_swept_and_replaced(
    engine: Any, images: None, instance: str, tmp_path: Path, real_redis_url: str, redis_prefix: str  # noqa: F811
) -> None:
    models = models_file(tmp_path, ECHO)
    with docker_proxy(instance, models, real_redis_url, redis_prefix) as proxy:
        wait_for(lambda: rest_infer(proxy, "echo", [1.0], [1, 1]).status_code == 200, timeout=60, interval=0.5,
                 what="echo served from a container")
        old = {c.id for c in containers_of(engine, instance)}
        assert old
        task_manager = proxy.component_pids()["task_manager"]
        os.kill(task_manager, signal.SIGKILL)
        wait_for(lambda: proxy.component_pids()["task_manager"] != task_manager, timeout=30,
                 what="the task manager restarted")
        wait_for(lambda: rest_infer(proxy, "echo", [2.0], [1, 1]).status_code == 200, timeout=60, interval=0.5,
                 what="echo served by a replacement")
        current = {c.id for c in containers_of(engine, instance)}
        assert current and not old & current, "the old task manager's containers must be gone"
        assert "an earlier run left behind" in proxy.log(), "swept by the orphan cleanup at start"
    assert not containers_of(engine, instance)
