"""The pods of deploy/kubernetes, run as Docker containers the way the kubelet would run them: each container's
command, variables, volumes and security context (uid, read-only root filesystem, no capabilities, no privilege
escalation) from the manifests, then their probes asked and a request answered end to end.

No Kubernetes runs here, so some things stand in, and only these: every address is 127.0.0.1 on free ports
(containers share the host's network, as a pod's containers share one; Service names become 127.0.0.1); the
secrets get test values; the test's own Redis stands in for the bundled one (whose image cannot be pulled
here); replicas run as processes of the task manager's container (``INFEROXY_RUNTIME=process``: there is no
API server for the Kubernetes runtime), and the API token volume is left out. The code is this checkout's,
mounted read-only over the proxy image's packages, so the image (docker/build-images.sh) supplies only the
dependencies. Without a Docker engine or the image: a skip, or a failure in CI (INFEROXY_REQUIRE_DOCKER).
"""

from __future__ import annotations

import re
import secrets
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import REPO, free_port, require_service, wait_for
from tests.test_kubernetes_manifests import containers, env_values, one, render

docker = pytest.importorskip("docker")

IMAGE = "inferoxy/proxy:latest"
# The checkout's packages, mounted over the image's copies (pyproject.toml's packages).
PACKAGES = ("inferoxy", "bridges", "model_manager", "batch_manager", "task_manager", "jobs", "examples")
SITE = "/opt/inferoxy"
LABEL = "inferoxy.test"
PROXY_DEPLOYMENTS = ("inferoxy-task-manager", "inferoxy-frontend")
# The bridges' ports are their settings' defaults in the manifests; here they move to free ones.
BRIDGE_PORT_SETTINGS = {8698: "INFEROXY_REST_PORT", 50051: "INFEROXY_GRPC_PORT", 7787: "INFEROXY_ZMQ_PORT"}
START_TIMEOUT_S = 90.0


@dataclass
class Cluster:
    """What one test run made: the port map, the containers (by pod and name), and where files went."""

    engine: Any
    name: str
    workdir: Path
    redis_url: str
    prefix: str
    secrets: dict[tuple[str, str], str]
    ports: dict[int, int] = field(default_factory=dict)
    started: dict[tuple[str, str], Any] = field(default_factory=dict)

    def port(self, number: int) -> int:
        if number not in self.ports:
            self.ports[number] = free_port()
        return self.ports[number]

    def address(self, text: str) -> str:
        """A value with its pod and Service addresses moved to 127.0.0.1 and its ports to free ones."""
        def move(match: re.Match[str]) -> str:
            return f"tcp://127.0.0.1:{self.port(int(match.group(2)))}"

        text = re.sub(r"tcp://([a-z0-9.-]+):(\d+)", move, text)
        return "127.0.0.1" if text == "0.0.0.0" else text

    def environment(self, pod: dict[str, Any], c: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for variable in c.get("env", []):
            if "value" in variable:
                env[variable["name"]] = self.address(variable["value"])
                continue
            source = variable["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[variable["name"]] = self.secrets[ref["name"], ref["key"]]
            else:  # the downward API
                path = source["fieldRef"]["fieldPath"]
                env[variable["name"]] = {"metadata.namespace": "inferoxy", "metadata.name": f"{self.name}-pod",
                                         "metadata.uid": str(uuid.uuid4())}[path]
        if "INFEROXY_RUNTIME" in env:  # no API server here: replicas run as processes of this container
            env["INFEROXY_RUNTIME"] = "process"
        env["INFEROXY_REDIS_PREFIX"] = self.prefix
        env["INFEROXY_INSTANCE"] = self.name
        for port in c.get("ports", []):
            if port["containerPort"] in BRIDGE_PORT_SETTINGS:
                env[BRIDGE_PORT_SETTINGS[port["containerPort"]]] = str(self.port(port["containerPort"]))
        return env

    def volumes(self, deployment: str, pod: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
        """Docker bind mounts for the container's volume mounts (a host directory per pod and volume)."""
        by_name = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        binds: dict[str, Any] = {}
        for mount in c.get("volumeMounts", []):
            volume = by_name[mount["name"]]
            if "projected" in volume:
                continue  # the API token: no API server here
            host = self.workdir / deployment / mount["name"]
            if not host.exists():
                host.mkdir(parents=True)
                if "configMap" in volume:
                    config_map = one(render(), "ConfigMap", volume["configMap"]["name"])
                    for key, text in config_map["data"].items():
                        (host / key).write_text(text)
                        (host / key).chmod(0o644)
                host.chmod(0o777 if "emptyDir" in volume else 0o755)  # an emptyDir is root's and 0777
            binds[str(host)] = {"bind": mount["mountPath"], "mode": "ro" if mount.get("readOnly") else "rw"}
        for package in PACKAGES:
            binds[str(REPO / package)] = {"bind": f"{SITE}/{package}", "mode": "ro"}
        return binds

    def command(self, c: dict[str, Any]) -> list[str]:
        command = [self.address(part) for part in c["command"]]
        if "--metrics-port" in command:
            at = command.index("--metrics-port") + 1
            command[at] = str(self.port(int(command[at])))
        return command

    def run(self, deployment: str, pod: dict[str, Any], c: dict[str, Any], *, detach: bool) -> Any:
        spec_security = pod["spec"]["securityContext"]
        security = c["securityContext"]
        assert spec_security["runAsNonRoot"] and spec_security["runAsUser"] > 0
        container = self.engine.containers.run(
            IMAGE, self.command(c), detach=True, name=f"{self.name}-{c['name']}", network_mode="host",
            environment=self.environment(pod, c), volumes=self.volumes(deployment, pod, c),
            user=f"{spec_security['runAsUser']}:{spec_security.get('runAsGroup', spec_security['runAsUser'])}",
            read_only=security["readOnlyRootFilesystem"], cap_drop=security["capabilities"]["drop"],
            security_opt=["no-new-privileges"] if security["allowPrivilegeEscalation"] is False else [],
            labels={LABEL: self.name},
        )
        self.started[deployment, c["name"]] = container
        if not detach:
            status = container.wait(timeout=60)
            assert status["StatusCode"] == 0, container.logs().decode(errors="replace")
        return container


@pytest.fixture(scope="module")
def proxy_image(engine: Any) -> str:
    """The proxy image, built by docker/build-images.sh where missing (its packages are replaced by the mounts)."""
    try:
        engine.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        built = subprocess.run(["bash", str(REPO / "docker/build-images.sh")], cwd=REPO, capture_output=True,
                               text=True)
        if built.returncode != 0:
            require_service(f"the image {IMAGE}", "INFEROXY_REQUIRE_DOCKER",
                            f"could not be built by docker/build-images.sh:\n{built.stderr[-2000:]}")
    return IMAGE


@pytest.fixture
def cluster(engine: Any, proxy_image: str, real_redis_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    name = f"k8s{uuid.uuid4().hex[:8]}"
    for package in PACKAGES:  # the containers' uid reads the checkout through the mounts
        assert (REPO / package).stat().st_mode & 0o005 == 0o005, f"{REPO / package} is not readable by others"
    workdir = tmp_path / "volumes"
    workdir.mkdir()
    values = {("inferoxy", "redis-url"): real_redis_url, ("inferoxy", "bus-secret"): secrets.token_urlsafe(32),
              ("inferoxy", "admin-key"): secrets.token_urlsafe(32)}
    made = Cluster(engine, name, workdir, real_redis_url, redis_prefix, values)
    try:
        yield made
    finally:
        for container in engine.containers.list(all=True, filters={"label": f"{LABEL}={name}"}):
            container.remove(force=True)
        # The containers' uid wrote into the volumes' host directories; pytest's cleanup runs as us.
        shutil.rmtree(workdir, ignore_errors=True)


def start_pods(cluster: Cluster) -> dict[str, dict[str, Any]]:
    docs = render()
    pods = {name: one(docs, "Deployment", name)["spec"]["template"] for name in PROXY_DEPLOYMENTS}
    for deployment, pod in pods.items():
        for c in pod["spec"].get("initContainers", []):
            cluster.run(deployment, pod, c, detach=False)
        for c in containers(pod, init=False):
            cluster.run(deployment, pod, c, detach=True)
    return pods


def probe_passes(cluster: Cluster, probe: dict[str, Any], c: dict[str, Any]) -> bool:
    named = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    [(kind, action)] = [(k, v) for k, v in probe.items() if k in ("httpGet", "grpc", "tcpSocket")]
    port = cluster.port(named.get(action["port"], action["port"]))
    try:
        if kind == "httpGet":
            return httpx.get(f"http://127.0.0.1:{port}{action['path']}", timeout=2).status_code == 200
        if kind == "tcpSocket":
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return True
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)
    except (OSError, httpx.HTTPError, grpc.RpcError):
        return False


def logs(cluster: Cluster) -> str:
    return "\n".join(f"--- {name}:\n{container.logs(tail=15).decode(errors='replace')}"
                     for (_, name), container in cluster.started.items())


def wait_showing_logs(cluster: Cluster, check: Any, what: str, **options: Any) -> Any:
    """wait_for, with the containers' last log lines in the failure."""
    try:
        return wait_for(check, timeout=START_TIMEOUT_S, what=what, **options)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs(cluster)}") from None


def test_the_pods_run_hardened_answer_their_probes_and_serve_a_request(cluster: Cluster) -> None:
    pods = start_pods(cluster)
    # Every probe the manifests declare passes once the pod is up.
    for pod in pods.values():
        for c in containers(pod, init=False):
            for kind in ("readinessProbe", "livenessProbe"):
                if kind in c:
                    wait_showing_logs(cluster, lambda c=c, kind=kind: probe_passes(cluster, c[kind], c),
                                      f"{c['name']}'s {kind}")
    rest = f"http://127.0.0.1:{cluster.port(8698)}"
    # INFEROXY_AUTH=required: nothing without a key, then a key from the admin API (the Secret's admin key).
    admin = {"x-inferoxy-admin-key": cluster.secrets["inferoxy", "admin-key"]}
    created = httpx.post(f"{rest}/v2/admin/keys", headers=admin, json={"name": "app", "scopes": ["infer"]}, timeout=10)
    assert created.status_code in (200, 201), created.text
    key = created.json()["key"]
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.0, 3.0]}]}
    refused = httpx.post(f"{rest}/v2/models/echo/infer", json=body, timeout=10)
    assert refused.status_code == 401, refused.text

    def answered() -> httpx.Response | None:
        reply = httpx.post(f"{rest}/v2/models/echo/infer", json=body, headers={"authorization": f"Bearer {key}"},
                           timeout=10)
        return reply if reply.status_code == 200 else None

    reply = wait_showing_logs(cluster, answered, "an echo answer", interval=0.5)
    assert reply.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0]
    # Inside the frontend pod the bus is the private ipc:// socket (no CURVE); between pods it is tcp:// (CURVE).
    batch_manager = cluster.started["inferoxy-frontend", "batch-manager"]
    [bm_spec] = [c for c in containers(pods["inferoxy-frontend"]) if c["name"] == "batch-manager"]
    url = env_values(bm_spec)["INFEROXY_BATCH_MANAGER_URL"]
    checked = batch_manager.exec_run(["python3", "-c", f"from inferoxy.curve import needs_curve; "
                                      f"print(needs_curve({url!r}), needs_curve('tcp://127.0.0.1:1'))"])
    assert checked.output.decode().split() == ["False", "True"], checked.output
    # The hardening held: each container is its uid, on a read-only root, and none has died.
    for (deployment, name), container in cluster.started.items():
        container.reload()
        if (deployment, name) == ("inferoxy-frontend", "bus-directory"):
            continue
        assert container.status == "running", f"{deployment}/{name}\n{logs(cluster)}"
        assert container.attrs["HostConfig"]["ReadonlyRootfs"] is True
        who = container.exec_run(["sh", "-c", "id -u; touch /probe-write 2>/dev/null && echo wrote || echo refused"])
        assert who.output.decode().split() == ["10001", "refused"], (name, who.output)
