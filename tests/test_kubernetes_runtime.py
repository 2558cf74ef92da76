"""The kubernetes runtime (INFEROXY_RUNTIME=kubernetes), issue 12 parts 3 and 4.

No Kubernetes API server can run on these machines, so the runtime, with the real ``kubernetes`` client, talks to
``tests/kube_api_double.py`` through an ordinary kubeconfig. The double's fake kubelet runs each pod's container
as a local process with the pod's env (the replica's CURVE secret key from its Secret), so a replica really dials
the task manager and says ``ready``: the scenarios below go through the TaskManager itself.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inferoxy.settings import Settings
from model_manager.spec import ModelSpec
from task_manager.runtimes.base import ReplicaPlan
from task_manager.runtimes.kube_pod import PodOptions, label_value, pod_manifest, read_pod, secret_manifest
from task_manager.runtimes.kubernetes import KubernetesRuntime, create_runtime, pod_options
from tests.kube_api_double import FakeKubelet, KubeApiDouble
from tests.support import REPO, alive, tcp_fakeredis
from tests.test_bus_curve import SECRET, KeyedHarness
from tests.test_task_manager import ECHO, eventually

NAMESPACE = "inferoxy-test"
IMAGE = "registry.example/inferoxy-echo:1"  # the fake kubelet "has" this image: it runs the model runtime
SELECTOR = "inferoxy.instance=Test"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A fakeredis over TCP of this module's own (tests.support.tcp_fakeredis)."""
    with tcp_fakeredis() as url:
        yield url


@pytest.fixture
def api() -> Iterator[KubeApiDouble]:
    kubelet = FakeKubelet(images={IMAGE: [sys.executable, "-m", "inferoxy.runtime"]},
                          image_env={"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONUNBUFFERED": "1"})
    double = KubeApiDouble(kubelet).start()
    yield double
    double.stop()
    assert not [pid for pid in kubelet.pids() if alive(pid)], "every replica process ended"


def echo_spec(name: str = "echo", **fields: Any) -> ModelSpec:
    return ModelSpec(**{"name": name, "image": IMAGE, "model_class": ECHO, "env": {"PYTHONPATH": str(REPO)},
                        **fields})


def run(api: KubeApiDouble, tmp_path: Path, redis_url: str, scenario: Any, **settings: Any) -> None:
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")

    async def main() -> None:
        async with KeyedHarness(redis_url, runtime="kubernetes", kube_kubeconfig=str(kubeconfig),
                                kube_namespace=NAMESPACE, bus_secret=SECRET, **settings) as harness:
            await scenario(harness)

    asyncio.run(main())


def runtime_of(h: KeyedHarness) -> KubernetesRuntime:
    runtime = h.tm.runtime
    assert isinstance(runtime, KubernetesRuntime)
    return runtime


# --- what a replica's pod and Secret look like (pure) -------------------------------------------------------


PLAN_ENV = {"INFEROXY_REPLICA_ID": "test-m-1-0-0123456789ab", "INFEROXY_BUS_SECRET_KEY": "k" * 40,
            "INFEROXY_BUS_PUBLIC_KEY": "p" * 40}


def plan(**spec_fields: Any) -> ReplicaPlan:
    spec = ModelSpec(**{"name": "m", "image": IMAGE, **spec_fields})
    return ReplicaPlan(replica_id="test-m-1-0-0123456789ab", spec=spec, env=PLAN_ENV)


def test_a_gpu_pod_asks_for_one_gpu_and_its_resources_with_the_settings_pulls_and_owner() -> None:
    options = pod_options(Settings(runtime="kubernetes", instance="Test", kube_namespace=NAMESPACE,
                                   kube_image_pull_secrets="regcred, other", kube_pull_policy="always",
                                   kube_pod_name="proxy-7d9f", kube_pod_uid="0000-1111"))
    pod = pod_manifest(plan(run_on_gpu=True, resources={"cpus": 1.5, "memory": "2g"}), options, PLAN_ENV)
    (container,) = pod["spec"]["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "1500m", "memory": str(2 * 2**30)},
        "limits": {"cpu": "1500m", "memory": str(2 * 2**30), "nvidia.com/gpu": "1"}}
    assert container["imagePullPolicy"] == "Always" and container["image"] == IMAGE
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "other"}]
    assert pod["spec"]["restartPolicy"] == "Never", "the task manager owns restarts"
    assert pod["spec"]["automountServiceAccountToken"] is False, "a model gets no API credentials"
    assert pod["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "proxy-7d9f",
                                                   "uid": "0000-1111"}]
    assert pod["metadata"]["namespace"] == NAMESPACE and pod["metadata"]["name"] == "test-m-1-0-0123456789ab"
    assert pod["metadata"]["labels"] == {"inferoxy.instance": "Test", "inferoxy.model": "m", "inferoxy.version": "1",
                                         "inferoxy.replica": "test-m-1-0-0123456789ab"}
    # The spec's pull policy wins over the setting's; a CPU model asks for no GPU.
    pod = pod_manifest(plan(pull_policy="never"), options, PLAN_ENV)
    assert pod["spec"]["containers"][0]["imagePullPolicy"] == "Never"
    assert "resources" not in pod["spec"]["containers"][0]


def test_the_replicas_bus_secret_key_is_in_its_own_secret_never_in_the_pod_spec() -> None:
    options = PodOptions(namespace=NAMESPACE, instance="Test")
    pod = pod_manifest(plan(), options, PLAN_ENV)
    assert "k" * 40 not in str(pod)
    env = {variable["name"]: variable for variable in pod["spec"]["containers"][0]["env"]}
    assert env["INFEROXY_BUS_SECRET_KEY"] == {"name": "INFEROXY_BUS_SECRET_KEY", "valueFrom": {
        "secretKeyRef": {"name": "test-m-1-0-0123456789ab-bus", "key": "INFEROXY_BUS_SECRET_KEY"}}}
    assert env["INFEROXY_BUS_PUBLIC_KEY"]["value"] == "p" * 40  # public: no secret
    secret = secret_manifest(plan(), options, PLAN_ENV, pod_uid="pod-uid-1")
    assert secret["stringData"] == {"INFEROXY_BUS_SECRET_KEY": "k" * 40}
    assert secret["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod",
                                                      "name": "test-m-1-0-0123456789ab", "uid": "pod-uid-1"}]


def test_label_values_are_valid_and_names_that_clean_up_alike_stay_apart() -> None:
    assert label_value("resnet50") == "resnet50"
    long, odd = label_value("m" * 80), label_value("My Model/v2")
    assert len(long) <= 63 and long != label_value("m" * 81)
    assert odd.startswith("My-Model-v2-") and odd != label_value("My Model v2")
    assert label_value("_x_") != "_x_" and label_value("_x_")[0].isalnum()


def container(**state: Any) -> dict[str, Any]:
    return {"containerStatuses": [{"name": "replica", "state": state}]}


def test_reading_a_pod() -> None:
    pending = read_pod({"metadata": {"name": "p"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}})
    assert pending.unschedulable == "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    pull = read_pod({"metadata": {"name": "p"}, "status": {"phase": "Pending", **container(
        waiting={"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'})}})
    assert pull.never_started == 'ImagePullBackOff: Back-off pulling image "x"'
    # Its own Secret not there yet: the runtime creates it just after the pod, and the kubelet retries.
    own = read_pod({"metadata": {"name": "p"}, "status": {"phase": "Pending", **container(
        waiting={"reason": "CreateContainerConfigError", "message": 'secret "p-bus" not found'})}})
    assert own.never_started is None
    other = read_pod({"metadata": {"name": "p"}, "status": {"phase": "Pending", **container(
        waiting={"reason": "CreateContainerConfigError", "message": 'configmap "cfg" not found'})}})
    assert other.never_started == 'CreateContainerConfigError: configmap "cfg" not found'
    ended = read_pod({"metadata": {"name": "p"}, "status": {"phase": "Failed", **container(
        terminated={"exitCode": 137, "reason": "OOMKilled"})}})
    assert (ended.ended, ended.exit_code, ended.reason) == (True, 137, "OOMKilled")
    evicted = read_pod({"metadata": {"name": "p"}, "status": {"phase": "Failed", "reason": "Evicted",
                                                              "message": "The node was low on resource: memory."}})
    assert evicted.ended and evicted.reason == "Evicted: The node was low on resource: memory."


# --- through the task manager, against the API server double -----------------------------------------------


def test_start_running_ready_then_batches_and_shutdown_deletes_every_pod_and_secret(
        api: KubeApiDouble, tmp_path: Path, redis_url: str) -> None:
    async def scenario(h: KeyedHarness) -> None:
        await h.store.put(echo_spec())
        up, _ = await h.expect("replica_up")
        name = up["replica"]
        pod = api.pods(NAMESPACE)[name]
        assert pod["status"]["phase"] == "Running"
        assert pod["metadata"]["labels"]["inferoxy.replica"] == name
        assert pod["metadata"]["ownerReferences"][0]["uid"] == "proxy-uid"
        # The replica dialled with the key from its Secret, which is nowhere in the pod.
        secret = api.secrets(NAMESPACE)[f"{name}-bus"]
        assert secret["stringData"]["INFEROXY_BUS_SECRET_KEY"] not in str(pod)
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        await h.send_batch(name, 1, [("x", x)])
        _, tensors = await h.expect("result", batch=1)
        np.testing.assert_array_equal(dict(tensors)["x"], x)
        await h.status_eventually("echo", "ready")

    run(api, tmp_path, redis_url, scenario, kube_pod_name="proxy", kube_pod_uid="proxy-uid")
    assert api.pods(NAMESPACE) == {} and api.secrets(NAMESPACE) == {}
    deletes = [query for method, path, query in api.requests if method == "DELETE" and "/pods/" in path]
    assert deletes and all("gracePeriodSeconds" in query for query in deletes)


def test_an_image_that_cannot_be_pulled_fails_the_model_with_the_clusters_reason(
        api: KubeApiDouble, tmp_path: Path, redis_url: str) -> None:
    async def scenario(h: KeyedHarness) -> None:
        await h.store.put(echo_spec(image="registry.example/missing:1"))
        status = await h.status_eventually("echo", "failed")
        assert status.reason.startswith('could not start: ErrImagePull: failed to pull and unpack image '
                                        '"registry.example/missing:1"'), status.reason
        assert h.tm.status()["echo/1"]["restarts"] == 1, "failed at its first pod, not after a crash loop of them"

    # A long backoff: no second pod starts while the test looks.
    run(api, tmp_path, redis_url, scenario, restart_backoff_s=30.0, restart_backoff_max_s=60.0)


def test_an_unschedulable_pod_shows_the_clusters_message_until_it_is_placed(
        api: KubeApiDouble, tmp_path: Path, redis_url: str) -> None:
    api.kubelet.unschedulable = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."

    async def scenario(h: KeyedHarness) -> None:
        await h.store.put(echo_spec(run_on_gpu=True))
        status = await h.status_eventually("echo", "unschedulable")
        assert status.reason == "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
        (name,) = api.pods(NAMESPACE)
        limits = api.pods(NAMESPACE)[name]["spec"]["containers"][0]["resources"]["limits"]
        assert limits == {"nvidia.com/gpu": "1"}
        api.kubelet.unschedulable = None
        api.kubelet.schedule(name, NAMESPACE)  # a GPU node joined
        up, _ = await h.expect("replica_up")
        assert up["replica"] == name, "the same replica, not ended for waiting"
        await h.status_eventually("echo", "ready")

    run(api, tmp_path, redis_url, scenario)


def test_a_pod_deleted_behind_the_proxys_back_is_replaced(api: KubeApiDouble, tmp_path: Path,
                                                          redis_url: str) -> None:
    async def scenario(h: KeyedHarness) -> None:
        await h.store.put(echo_spec())
        up, _ = await h.expect("replica_up")
        api.delete_behind_the_back(up["replica"], NAMESPACE)
        down, _ = await h.expect("replica_down", replica=up["replica"])
        assert "deleted" in down["reason"], down["reason"]
        again, _ = await h.expect("replica_up")
        assert again["replica"] != up["replica"]
        assert set(api.pods(NAMESPACE)) == {again["replica"]}

    run(api, tmp_path, redis_url, scenario)


def test_a_dropped_watch_resumes_from_its_resource_version(api: KubeApiDouble, tmp_path: Path,
                                                           redis_url: str) -> None:
    async def scenario(h: KeyedHarness) -> None:
        await h.store.put(echo_spec())
        up, _ = await h.expect("replica_up")
        assert runtime_of(h).watcher_lists() == 1
        api.drop_watches()
        api.delete_behind_the_back(up["replica"], NAMESPACE)  # while no stream is open, most likely
        await h.expect("replica_down", replica=up["replica"])
        await h.expect("replica_up")
        assert runtime_of(h).watcher_lists() == 1, "resumed from where it was, without listing again"

    run(api, tmp_path, redis_url, scenario)


def test_an_expired_resource_version_410_lists_again_and_finds_what_went(api: KubeApiDouble, tmp_path: Path,
                                                                         redis_url: str) -> None:
    async def scenario(h: KeyedHarness) -> None:
        await h.store.put(echo_spec())
        up, _ = await h.expect("replica_up")
        api.expire()
        api.drop_watches()
        api.delete_behind_the_back(up["replica"], NAMESPACE)
        await h.expect("replica_down", replica=up["replica"])
        await h.expect("replica_up")
        assert runtime_of(h).watcher_lists() >= 2, "a 410 Gone makes it list again"

    run(api, tmp_path, redis_url, scenario)


def test_leftovers_of_this_instance_are_removed_at_start_and_others_kept(api: KubeApiDouble, tmp_path: Path,
                                                                         redis_url: str) -> None:
    def leftover(name: str, instance: str) -> None:
        labels = {"inferoxy.instance": instance, "inferoxy.replica": name}
        api.put_object("pods", NAMESPACE, {"metadata": {"name": name, "labels": labels}, "spec": {
            "containers": [{"name": "replica", "image": "registry.example/gone:1"}]}})
        api.put_object("secrets", NAMESPACE, {"metadata": {"name": f"{name}-bus", "labels": labels},
                                              "stringData": {"INFEROXY_BUS_SECRET_KEY": "old"}})

    leftover("test-old-1-0-aaaaaaaaaaaa", "Test")
    leftover("other-old-1-0-bbbbbbbbbbbb", "Other")

    async def scenario(h: KeyedHarness) -> None:
        assert set(api.pods(NAMESPACE)) == {"other-old-1-0-bbbbbbbbbbbb"}
        assert set(api.secrets(NAMESPACE)) == {"other-old-1-0-bbbbbbbbbbbb-bus"}

    run(api, tmp_path, redis_url, scenario)


def test_a_replica_that_exits_ends_with_its_exit_code_and_last_log_lines(api: KubeApiDouble, tmp_path: Path,
                                                                          redis_url: str) -> None:
    async def scenario(h: KeyedHarness) -> None:
        await h.store.put(echo_spec(model_class="tests.models_for_tests:FailingLoadModel"))
        status = await h.status_eventually("echo", "failed")
        assert "exited with status 2" in (status.reason or "") and "weights missing" in (status.reason or ""), \
            status.reason
        # An exit is not a pod that could not start: the model fails only after a crash loop.
        assert h.tm.status()["echo/1"]["restarts"] >= h.settings.crash_loop_failures

    run(api, tmp_path, redis_url, scenario)


def test_the_runtime_is_chosen_by_setting_and_an_unreachable_cluster_is_a_start_error(tmp_path: Path) -> None:
    from task_manager.runtimes.base import RuntimeStartError
    from task_manager.runtimes.factory import make_runtime

    missing = tmp_path / "no-kubeconfig"
    runtime = make_runtime(Settings(runtime="kubernetes", kube_kubeconfig=str(missing), instance="Test"))
    assert isinstance(runtime, KubernetesRuntime) and runtime.places_replicas

    async def start() -> None:
        await runtime.start(plan())

    with pytest.raises(RuntimeStartError, match="cannot reach the Kubernetes API"):
        asyncio.run(start())
    with pytest.raises(RuntimeStartError, match="KUBE_POD_UID"):
        make_runtime(Settings(runtime="kubernetes", kube_pod_name="proxy", instance="Test"))


def test_a_refusal_by_the_api_server_is_a_start_error_with_its_message(api: KubeApiDouble, tmp_path: Path) -> None:
    from task_manager.runtimes.base import RuntimeStartError
    from task_manager.runtimes.factory import make_runtime

    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    runtime = make_runtime(Settings(runtime="kubernetes", kube_kubeconfig=str(kubeconfig), instance="Test",
                                    kube_namespace=NAMESPACE))
    api.put_object("pods", NAMESPACE, {"metadata": {"name": plan().replica_id}, "spec": {
        "containers": [{"name": "replica", "image": "registry.example/someone-elses:1"}]}})

    async def start() -> None:
        try:
            await runtime.start(plan())
        finally:
            await runtime.close()

    with pytest.raises(RuntimeStartError, match=r"409 .*already exists"):
        asyncio.run(start())
    # What it started before the refusal is gone again; the pod it did not create is left alone.
    assert set(api.pods(NAMESPACE)) == {plan().replica_id} and api.secrets(NAMESPACE) == {}


def test_a_specs_command_is_the_containers_args_as_dockers_cmd() -> None:
    pod = pod_manifest(plan(command=["--threads", "2"]), PodOptions(namespace=NAMESPACE, instance="Test"), {})
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["--threads", "2"] and "command" not in container, "the image's ENTRYPOINT stays"


def test_an_api_server_that_does_not_answer_is_a_start_error(tmp_path: Path) -> None:
    from task_manager.runtimes.base import RuntimeStartError

    double = KubeApiDouble()  # never started: its port refuses connections
    kubeconfig = double.kubeconfig(tmp_path / "kubeconfig")
    double.server.server_close()
    runtime = create_runtime(Settings(runtime="kubernetes", kube_kubeconfig=str(kubeconfig), instance="Test",
                                      kube_namespace=NAMESPACE))

    async def start() -> None:
        await runtime.start(plan())

    with pytest.raises(RuntimeStartError, match="cannot reach the Kubernetes API to start a replica of m/1"):
        asyncio.run(start())


def test_an_instance_is_claimed_by_one_live_proxy_pod_at_a_time(api: KubeApiDouble, tmp_path: Path) -> None:
    from task_manager.runtimes.base import InstanceTaken
    from task_manager.runtimes.kube_claim import claim_name

    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")

    def proxy(name: str) -> KubernetesRuntime:
        pod = api.put_object("pods", NAMESPACE, {"metadata": {"name": name}, "spec": {
            "containers": [{"name": "proxy", "image": "registry.example/inferoxy:1"}]}})
        return create_runtime(Settings(runtime="kubernetes", kube_kubeconfig=str(kubeconfig), instance="Test",
                                       kube_namespace=NAMESPACE, kube_pod_name=name,
                                       kube_pod_uid=pod["metadata"]["uid"]))

    first, second, third = proxy("proxy-a"), proxy("proxy-b"), proxy("proxy-c")
    claim = claim_name("Test")

    async def scenario() -> None:
        await first.claim_instance()
        with pytest.raises(InstanceTaken, match="proxy-a"):
            await second.claim_instance()
        # The same pod again (its task manager restarted) holds its own claim; sweeping leftovers keeps it.
        again = create_runtime(Settings(runtime="kubernetes", kube_kubeconfig=str(kubeconfig), instance="Test",
                                        kube_namespace=NAMESPACE, kube_pod_name="proxy-a",
                                        kube_pod_uid=api.pods(NAMESPACE)["proxy-a"]["metadata"]["uid"]))
        await again.claim_instance()
        await again.remove_orphans()
        assert claim in api.secrets(NAMESPACE)
        await first.close()  # gives the name back
        assert claim not in api.secrets(NAMESPACE)
        await second.claim_instance()
        # A holder whose pod has finished is no owner any more: its claim is taken over.
        api.set_pod_status("proxy-b", NAMESPACE, phase="Failed")
        await third.claim_instance()
        assert api.secrets(NAMESPACE)[claim]["metadata"]["ownerReferences"][0]["name"] == "proxy-c"
        for runtime in (second, again):
            await runtime.close()
        assert claim in api.secrets(NAMESPACE), "an earlier holder's close leaves the new holder's claim"
        await third.close()
        assert claim not in api.secrets(NAMESPACE)

    asyncio.run(scenario())


def test_no_owner_reference_across_namespaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import task_manager.runtimes.kubernetes as kube

    own = tmp_path / "namespace"
    own.write_text("inferoxy\n")
    monkeypatch.setattr(kube, "IN_CLUSTER_NAMESPACE", own)
    identity = {"kube_pod_name": "proxy", "kube_pod_uid": "uid-1", "instance": "Test"}
    same = pod_options(Settings(**identity))
    assert same.namespace == "inferoxy" and same.owner is not None, "unset: the proxy's own namespace, owned"
    other = pod_options(Settings(kube_namespace="models", **identity))
    assert other.namespace == "models" and other.owner is None, "the collector would delete pods owned across"


def test_a_spec_without_an_image_is_refused_on_a_kubernetes_proxy() -> None:
    from model_manager.editing import SpecError, check_runnable

    spec = ModelSpec(name="m", model_class=ECHO)
    with pytest.raises(SpecError, match="INFEROXY_RUNTIME=kubernetes"):
        check_runnable(spec, "kubernetes")
    assert check_runnable(spec, "process") is spec


def test_watches_the_server_ends_in_order_are_resumed_without_listing(api: KubeApiDouble, tmp_path: Path,
                                                                     redis_url: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import task_manager.runtimes.kube_watch as kube_watch

    monkeypatch.setattr(kube_watch, "WATCH_TIMEOUT_S", 1)  # the server ends each watch after a second

    def watches() -> int:
        return sum(1 for method, path, query in api.requests if method == "GET" and path.endswith("/pods")
                   and query.get("watch") == ["true"])

    async def scenario(h: KeyedHarness) -> None:
        await h.store.put(echo_spec())
        up, _ = await h.expect("replica_up")
        await eventually(lambda: watches() >= 3, what="the watch resumed after the server ended it")
        api.delete_behind_the_back(up["replica"], NAMESPACE)
        await h.expect("replica_down", replica=up["replica"])
        await h.expect("replica_up")
        assert runtime_of(h).watcher_lists() == 1

    run(api, tmp_path, redis_url, scenario)
