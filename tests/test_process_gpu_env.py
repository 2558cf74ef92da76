"""The process runtime gives each GPU replica the GPU it was allotted (issue 12, part 3).

Found while auditing: two GPU replicas allotted GPUs 0 and 1 both started with no ``CUDA_VISIBLE_DEVICES`` and
saw every GPU. With a fake inventory (INFEROXY_GPUS), each replica process must answer its own GPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from tests.support import tcp_fakeredis
from tests.test_task_manager import Harness, run, spec

PROBE = "tests.models_for_tests:EnvProbeModel"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A fakeredis over TCP of this module's own (tests.support.tcp_fakeredis)."""
    with tcp_fakeredis() as url:
        yield url


def test_each_gpu_replica_process_sees_only_its_own_gpu(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The proxy itself may see every GPU; a replica must not inherit that.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")

    async def scenario(h: Harness) -> None:
        await h.store.put(spec("g", PROBE, run_on_gpu=True, min_replicas=2, max_replicas=2))
        ups = [(await h.expect("replica_up"))[0]["replica"] for _ in range(2)]
        allotted = {r["id"]: r["gpu"] for r in h.replicas("g/1")}
        assert sorted(allotted.values()) == ["0", "1"]
        name = np.frombuffer(b"CUDA_VISIBLE_DEVICES", dtype=np.uint8).reshape(1, -1)
        seen = {}
        for batch, replica in enumerate(ups):
            await h.send_batch(replica, batch, [("name", name)])
            result, tensors = await h.expect("result", batch=batch)
            seen[replica] = bytes(dict(tensors)["value"][0]).decode()
        assert seen == allotted, "each replica process sees exactly the GPU it was allotted"

    run(redis_url, scenario, gpus="0,1")
