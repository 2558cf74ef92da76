"""Specs: validation, models.yaml parsing, and the Redis store against a real Redis and the embedded one."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
import redis
from pydantic import ValidationError

from model_manager.models_file import ModelsFileError, load_models_file, parse_models
from model_manager.service import PUSH_POLL_INTERVAL_S, EmbeddedRedis
from model_manager.spec import ModelSpec, ModelStatus
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
        ({"warmup": [{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "fill": "file"}]}]}, "needs a file"),
        ({"warmup": [{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "file": "/x.npy"}]}]}, "needs a file"),
        ({"warmup": [{"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2]}]}]}, "BYTES"),
        ({"warmup": [{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 0]}]}]}, "sizes >= 1"),
        ({"warmup": [{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]},
                                 {"name": "y", "datatype": "FP32", "shape": [3]}]}]}, "same number of rows"),
        ({"warmup": [{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}] * 2}]}, "unique"),
        ({"warmup": [{"inputs": [{"name": "y", "datatype": "FP32", "shape": [2, 3]}]}],
          "inputs": [{"name": "x", "datatype": "FP32", "shape": [3]}]}, "not among the declared inputs"),
        ({"warmup": [{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}], "count": 0}]}, "count"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(fields: dict, complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        spec(**fields)


def test_a_warmup_with_random_and_file_inputs_is_accepted() -> None:
    warmup = [{"inputs": [{"name": "x", "datatype": "INT64", "shape": [4, 3], "fill": "random"},
                          {"name": "m", "datatype": "BOOL", "shape": [4], "fill": "file", "file": "/m.npy"}],
               "count": 5}]
    parsed = spec(warmup=warmup).warmup[0]
    assert (parsed.count, [i.fill for i in parsed.inputs]) == (5, ["random", "file"])


def test_docs_describe_every_spec_field() -> None:
    """docs/MODELS.md names each field a spec may hold (a field added to the code and not to the docs fails)."""
    models_doc = (REPO / "docs" / "MODELS.md").read_text()
    undocumented = [name for name in ModelSpec.model_fields if f"`{name}`" not in models_doc]
    assert not undocumented, f"fields of ModelSpec missing from docs/MODELS.md: {undocumented}"


def test_repository_models_file_parses() -> None:
    specs = {s.name: s for s in load_models_file(REPO / "models.yaml")}
    assert {"echo", "digits"} <= set(specs)
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


def test_unload_lets_no_replica_run_and_load_restores_both_bounds(real_redis_url: str, redis_prefix: str) -> None:
    # Unload is not scale to zero: min_replicas 0 alone now means "start a replica on demand", so an unloaded
    # version's max_replicas must be 0 too, or its next request would start it again.
    async def main() -> None:
        store = SpecStore.from_url(real_redis_url, redis_prefix)
        try:
            await store.put(spec(min_replicas=0, max_replicas=3))
            await store.unload((await store.snapshot()).specs["m/1"])
            unloaded = (await store.snapshot()).specs["m/1"]
            assert (unloaded.min_replicas, unloaded.max_replicas) == (0, 0)
            assert await store.unloaded() == {"m/1"}
            await store.load(unloaded)
            loaded = (await store.snapshot()).specs["m/1"]
            assert (loaded.min_replicas, loaded.max_replicas) == (0, 3), "it scales from zero again, up to 3"
            assert await store.unloaded() == set()

            # A record from before scale to zero: the min_replicas alone (0 then meant unloaded).
            await store.put(spec(version="2", min_replicas=0, max_replicas=2))
            await store.client.hset(store.unloaded_key, "m/2", "0")
            await store.load((await store.snapshot()).specs["m/2"])
            old = (await store.snapshot()).specs["m/2"]
            assert (old.min_replicas, old.max_replicas) == (1, 2), "loaded as before: at least one replica"

            # The model manager upgrades such records at its start: unloaded they stay (max_replicas 0), where
            # min_replicas 0 alone would now start a replica for the next request.
            await store.put(spec(version="3", min_replicas=0, max_replicas=2))
            await store.client.hset(store.unloaded_key, "m/3", "1")
            assert await store.upgrade_unloaded() == ["m/3"]
            assert await store.upgrade_unloaded() == [], "once"
            kept = (await store.snapshot()).specs["m/3"]
            assert (kept.min_replicas, kept.max_replicas) == (0, 0)
            await store.load(kept)
            back = (await store.snapshot()).specs["m/3"]
            assert (back.min_replicas, back.max_replicas) == (1, 2)
        finally:
            await store.close()

    asyncio.run(main())


def test_store_against_embedded_redis() -> None:
    server = EmbeddedRedis(free_port(), "a password")  # the store authenticates with the URL it is given
    server.start()
    try:
        asyncio.run(_exercise_store(SpecStore.from_url(server.url, "embedded")))
    finally:
        server.stop()


def test_embedded_redis_polls_for_pushed_replies_less_often_and_still_delivers_them() -> None:
    # fakeredis's own 10 ms poll kept 13% of a core busy in an idle proxy; the slower one must still deliver.
    from fakeredis._clients import _tcp_server

    server = EmbeddedRedis(free_port(), "a password")
    server.start()
    try:
        assert _tcp_server._POLL_INTERVAL >= PUSH_POLL_INTERVAL_S
        client = redis.Redis.from_url(server.url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe("changes")
        assert client.publish("changes", b"revision 2") == 1
        deadline = time.monotonic() + 10 * PUSH_POLL_INTERVAL_S + 2
        message = None
        while message is None and time.monotonic() < deadline:  # an ignored subscribe confirmation reads as None
            message = pubsub.get_message(timeout=0.5)
        assert message is not None and message["data"] == b"revision 2"
        pubsub.close()
        client.close()
    finally:
        server.stop()


def test_a_cancelled_watcher_ends_even_when_the_cancel_lands_in_its_pubsub_read(
        real_redis_url: str, redis_prefix: str) -> None:
    """redis-py's pub/sub read swallowed a cancel about once in 20 tries under load, and the watcher polled on
    (seen as a CI test hung for 180 s). Cancels land at random points of the watch loop here."""

    async def scenario() -> None:
        store = SpecStore.from_url(real_redis_url, redis_prefix)
        await store.put(spec())
        chance = random.Random(7)  # the cancel's moment, not a wait for anything
        try:
            for attempt in range(80):
                applied = asyncio.Event()
                watcher = asyncio.create_task(store.watch(lambda _, ready=applied: ready.set(), resync_interval_s=0.01))
                await asyncio.wait_for(applied.wait(), 10)
                await asyncio.sleep(chance.uniform(0, 0.03))
                watcher.cancel()
                done, _ = await asyncio.wait([watcher], timeout=5)
                assert done, f"attempt {attempt}: the cancelled watcher kept running"
        finally:
            await store.close()

    asyncio.run(scenario())


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


def test_seeding_is_idempotent_and_overwrite_is_opt_in(real_redis_url: str, redis_prefix: str, tmp_path) -> None:
    import zmq.asyncio

    from inferoxy.settings import Settings
    from model_manager.service import ModelManager

    models = tmp_path / "models.yaml"
    models.write_text("models:\n  m: {model_class: 'pkg.mod:Cls', max_batch_size: 4}\n")

    async def scenario() -> tuple[int, int, int]:
        store = SpecStore.from_url(real_redis_url, redis_prefix)
        settings = Settings(redis_url=real_redis_url, redis_prefix=redis_prefix, models_file=str(models))
        manager = ModelManager(settings, zmq.asyncio.Context.instance())
        await manager.seed(store)
        await store.put(spec(max_batch_size=16))  # an operator's change
        await manager.seed(store)  # a restart: the file must not undo it
        kept = (await store.snapshot()).get("m").max_batch_size  # type: ignore[union-attr]
        revision = await store.revision()
        await manager.seed(store)
        unchanged = await store.revision() - revision
        overwriting_settings = settings.model_copy(update={"models_overwrite": True})
        overwriting = ModelManager(overwriting_settings, zmq.asyncio.Context.instance())
        await overwriting.seed(store)
        overwritten = (await store.snapshot()).get("m").max_batch_size  # type: ignore[union-attr]
        await store.close()
        return kept, unchanged, overwritten

    assert asyncio.run(scenario()) == (16, 0, 4)


def test_watchers_keep_their_snapshot_when_redis_comes_back_empty(real_redis_url: str, redis_prefix: str) -> None:
    """A Redis restarted without persistence must not look like 'every model was deleted'."""

    async def scenario() -> None:
        store = SpecStore.from_url(real_redis_url, redis_prefix)
        await store.put(spec())
        await store.put(spec(name="n"))
        seen: list[Registry] = []
        resets: list[int] = []
        restored = SpecStore.from_url(real_redis_url, redis_prefix)
        last: dict[str, Registry] = {}

        async def on_reset(revision: int) -> None:
            resets.append(revision)
            await restored.restore(last["registry"], min_revision=revision + 1)

        def on_change(registry: Registry) -> None:
            seen.append(registry)
            last["registry"] = registry

        watcher = asyncio.create_task(store.watch(on_change, resync_interval_s=0.1, on_reset=on_reset))
        try:
            for _ in range(250):
                if seen:
                    break
                await asyncio.sleep(0.02)
            before = seen[-1].revision
            # What a restarted, empty Redis looks like to the watcher.
            await store.client.delete(store.models_key, store.defaults_key, store.revision_key)
            for _ in range(100):
                if resets and len(seen) > 1:
                    break
                await asyncio.sleep(0.05)
            assert resets == [before]
            assert all(len(r) == 2 for r in seen), "no empty snapshot was ever handed on"
            assert seen[-1].revision > before and seen[-1].names() == ["m", "n"]
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await store.close()
            await restored.close()

    asyncio.run(scenario())


def test_patches_and_assignments() -> None:
    from model_manager.editing import SpecError, apply_patch, assignments_to_patch

    base = spec(env={"A": "1"}, resources={"cpus": 2})
    changed = apply_patch(base, {"env": {"B": "2"}, "resources": {"cpus": None}, "max_batch_size": 3})
    assert (changed.env, changed.resources.cpus, changed.max_batch_size) == ({"A": "1", "B": "2"}, None, 3)
    assert assignments_to_patch(["max_batch_size=16", "env.MODE=1", "command=[python, -m, x]", "image=null"]) == {
        "max_batch_size": 16, "env": {"MODE": "1"}, "command": ["python", "-m", "x"], "image": None}
    with pytest.raises(SpecError) as refused:
        apply_patch(base, {"max_batch_size": "many"})
    assert refused.value.fields[0]["field"] == "max_batch_size"
    with pytest.raises(SpecError):
        assignments_to_patch(["no-equals-sign"])


def _status(name: str, state: str = "ready") -> ModelStatus:
    return ModelStatus(name=name, version="1", state=state, ready_replicas=1, desired_replicas=1, updated_at=0)


def test_a_status_written_with_a_ttl_vanishes_when_not_refreshed(real_redis_url: str, redis_prefix: str) -> None:
    """The task manager is gone (killed, SIGSTOPped): its last "ready" must not stay readable for ever."""
    async def body() -> None:
        store = SpecStore.from_url(real_redis_url, redis_prefix)
        try:
            await store.put_status(_status("gone"), ttl_s=0.3)
            await store.put_statuses([_status("kept")], ttl_s=60)
            await store.put_status(_status("final", "stopped"))  # no TTL: a shutdown's last word stays
            assert set(await store.statuses()) == {"gone/1", "kept/1", "final/1"}
            deadline = asyncio.get_running_loop().time() + 10
            while await store.status("gone", "1") is not None:
                assert asyncio.get_running_loop().time() < deadline, "the status never expired"
                await asyncio.sleep(0.05)
            assert set(await store.statuses()) == {"kept/1", "final/1"}
            await store.delete_status("kept", "1")
            assert set(await store.statuses()) == {"final/1"}
        finally:
            await store.close()

    asyncio.run(body())
