"""Specs: validation, models.yaml parsing, and the Redis store against a real Redis and the embedded one."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
from pydantic import ValidationError

from model_manager.models_file import ModelsFileError, load_models_file, parse_models
from model_manager.service import EmbeddedRedis
from model_manager.spec import ModelSpec
from model_manager.store import Registry, SpecStore
from tests.support import REPO, free_port


def spec(**fields) -> ModelSpec:
    return ModelSpec.model_validate({"name": "m", "model_class": "pkg.mod:Cls", **fields})


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"name": "bad name!"}, "name"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ({"model_class": None}, "image, a model_class or a command"),
        ({"inputs": [{"name": "x", "datatype": "FP33", "shape": [3]}]}, "datatype"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-2]}]}, "-1"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}] * 2}, "unique"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(fields: dict, complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        spec(**fields)


def test_repository_models_file_parses() -> None:
    specs = {s.name: s for s in load_models_file(REPO / "models.yaml")}
    assert set(specs) == {"echo", "digits"}
    assert specs["digits"].inputs[0].datatype == "FP32"


def test_legacy_models_file_style_is_translated() -> None:
    (stub,) = parse_models({"stub": {"address": "registry/stub:v5", "batch_size": 256, "run_on_gpu": False,
                                     "stateless": False}})
    assert (stub.image, stub.max_batch_size, stub.stateful, stub.run_on_gpu) == ("registry/stub:v5", 256, True, False)


def test_models_file_errors_name_the_model() -> None:
    with pytest.raises(ModelsFileError, match="'broken'"):
        parse_models({"models": {"broken": {"model_class": "a:B", "max_batch_size": -1}}})
    with pytest.raises(ModelsFileError, match="mapping"):
        parse_models(["not", "a", "mapping"])


async def _exercise_store(store: SpecStore) -> None:
    changes: list[Registry] = []
    changed = asyncio.Event()

    def on_change(registry: Registry) -> None:
        changes.append(registry)
        changed.set()

    watcher = asyncio.create_task(store.watch(on_change, resync_interval_s=5.0))
    try:
        await asyncio.wait_for(changed.wait(), 5)  # the first snapshot arrives at once
        assert len(changes[-1]) == 0

        changed.clear()
        await store.put(spec(version="1", max_batch_size=4))
        await asyncio.wait_for(changed.wait(), 2)  # pub/sub, not the 5 s resync
        assert changes[-1].get("m").max_batch_size == 4  # type: ignore[union-attr]

        await store.put(spec(version="2", max_batch_size=8))
        registry = await store.snapshot()
        assert registry.get("m").version == "1", "the first version stays the default"  # type: ignore[union-attr]
        assert registry.get("m", "2").max_batch_size == 8  # type: ignore[union-attr]

        assert await store.seed([spec(version="1", max_batch_size=99)]) == []  # seeding never overwrites
        assert await store.seed([spec(version="1", max_batch_size=99)], overwrite=True) == ["m/1"]

        assert await store.delete("m", "1")
        registry = await store.snapshot()
        assert registry.get("m").version == "2", "the remaining version becomes the default"  # type: ignore[union-attr]
        assert await store.delete("m")
        assert not await store.delete("m")
        assert len(await store.snapshot()) == 0
    finally:
        watcher.cancel()
        await store.close()


def test_store_against_real_redis(real_redis_url: str, redis_prefix: str) -> None:
    asyncio.run(_exercise_store(SpecStore.from_url(real_redis_url, redis_prefix)))


def test_store_against_embedded_redis() -> None:
    server = EmbeddedRedis(free_port())
    server.start()
    try:
        asyncio.run(_exercise_store(SpecStore.from_url(server.url, "embedded")))
    finally:
        server.stop()


def test_invalid_spec_in_redis_is_skipped_not_fatal(real_redis_url: str, redis_prefix: str) -> None:
    client = redis.Redis.from_url(real_redis_url)
    client.hset(f"{redis_prefix}:models", "bad/1", json.dumps({"name": "bad", "max_batch_size": -5}))

    async def scenario() -> Registry:
        store = SpecStore.from_url(real_redis_url, redis_prefix)
        await store.put(spec())
        registry = await store.snapshot()
        await store.close()
        return registry

    registry = asyncio.run(scenario())
    assert registry.names() == ["m"]
