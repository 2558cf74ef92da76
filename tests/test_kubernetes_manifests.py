"""deploy/kubernetes: rendered offline, every document validated against the Kubernetes schemas, and the
promises its README and comments make checked against the manifests and the code.

No API server runs here, so nothing is applied. The schemas are kubernetes-validate's (a dev dependency,
bundling Kubernetes' OpenAPI schemas): missing, it fails the test under CI (or
INFEROXY_REQUIRE_KUBERNETES_VALIDATE) and skips it elsewhere. The kustomization is rendered by ``render``
below, which knows the two things the base uses (resources, namespace) and refuses any other; where
``kubectl`` exists, a test checks that ``kubectl kustomize`` renders the same.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq.asyncio

from inferoxy.settings import Settings
from model_manager.models_file import parse_models
from model_manager.spec import ModelSpec
from tests.support import REPO, require_service

BASE = REPO / "deploy" / "kubernetes"
README = BASE / "README.md"
REQUIRE_VALIDATOR = "INFEROXY_REQUIRE_KUBERNETES_VALIDATE"
# The oldest Kubernetes the manifests are for (gRPC probes are GA from 1.27) and the newest the validator knows.
OLDEST_VERSION = "1.27.0"
# What the Kubernetes runtime calls (docs/KUBERNETES.md), and so all the Role may grant.
RUNTIME_RULES = {
    ("", "pods"): {"create", "get", "list", "watch", "delete"},
    ("", "pods/log"): {"get"},
    ("", "secrets"): {"create", "get", "list", "delete"},
}
KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources"}
PROXY_IMAGE = "inferoxy/proxy"
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
# Variables of containers that are not Inferoxy's (the Redis image's own).
FOREIGN_ENV = {"redis": {"REDIS_PASSWORD", "REDISCLI_AUTH"}}


# --- rendering ---------------------------------------------------------------------------------------


def render(directory: Path = BASE, namespace: str | None = None) -> list[dict[str, Any]]:
    """The documents ``kubectl kustomize directory`` gives, for kustomizations of resources and a namespace."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZE_KEYS
    assert not unknown, f"{directory}: this renderer knows only {sorted(KUSTOMIZE_KEYS)}, not {sorted(unknown)}"
    namespace = namespace or kustomization.get("namespace")
    documents: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = directory / resource
        if path.is_dir():
            documents += render(path, namespace)
        else:
            documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    if namespace:
        for doc in documents:
            set_namespace(doc, namespace)
    return documents


def set_namespace(doc: dict[str, Any], namespace: str) -> None:
    """kustomize's namespace transformer, for the kinds the base has."""
    if doc["kind"] == "Namespace":
        doc["metadata"]["name"] = namespace
        return
    doc["metadata"]["namespace"] = namespace
    if doc["kind"] == "RoleBinding":
        for subject in doc["subjects"]:
            if subject["kind"] == "ServiceAccount":
                subject["namespace"] = namespace


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render()


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for deployment in find(docs, "Deployment"):
        yield deployment["metadata"]["name"], deployment["spec"]["template"]


def containers(pod: dict[str, Any], *, init: bool = True) -> list[dict[str, Any]]:
    return [*(pod["spec"].get("initContainers", []) if init else []), *pod["spec"]["containers"]]


def container(docs: list[dict[str, Any]], deployment: str, name: str) -> dict[str, Any]:
    pod = one(docs, "Deployment", deployment)["spec"]["template"]
    [found] = [c for c in containers(pod) if c["name"] == name]
    return found


def env_values(c: dict[str, Any]) -> dict[str, str]:
    """The variables set to a literal value (not from a Secret or the downward API)."""
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def matches(label_selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels, and matchExpressions with In) against a pod's labels."""
    if not selects(label_selector.get("matchLabels", {}), labels):
        return False
    for expression in label_selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


# --- a) schemas ----------------------------------------------------------------------------------------


def validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        require_service("kubernetes-validate", REQUIRE_VALIDATOR, "is not installed (pip install -e .[dev])")
    return kubernetes_validate


def schema_errors(kv: Any, doc: dict[str, Any], version: str) -> str | None:
    try:
        kv.validate(doc, version, strict=True)  # strict: a field the schema does not have is an error
    except (kv.ValidationError, kv.SchemaNotFoundError, kv.InvalidSchemaError) as exc:
        return f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {str(exc)[:600]}"
    return None


def test_every_document_validates_against_the_kubernetes_schemas(docs: list[dict[str, Any]]) -> None:
    kv = validator()
    versions = [OLDEST_VERSION, kv.utils.latest_version()]
    errors = [e for doc in docs for version in versions if (e := schema_errors(kv, doc, version))]
    assert not errors, "\n\n".join(errors)
    assert {d["kind"] for d in docs} >= {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                                         "Deployment", "Service"}


@pytest.mark.parametrize("breakage", ["misspelt field", "wrong type", "unknown kind"])
def test_the_validator_refuses_a_broken_manifest(docs: list[dict[str, Any]], breakage: str) -> None:
    # The check above means something only if a manifest with a typo fails it.
    kv = validator()
    broken = copy.deepcopy(one(docs, "Deployment", "inferoxy-frontend"))
    rest = broken["spec"]["template"]["spec"]["containers"][1]
    if breakage == "misspelt field":
        rest["readinesProbe"] = rest.pop("readinessProbe")
    elif breakage == "wrong type":
        rest["ports"][0]["containerPort"] = "eighty"
    else:
        broken["kind"] = "Deployments"
    assert schema_errors(kv, broken, OLDEST_VERSION) is not None


def test_kubectl_kustomize_renders_the_same() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the renderer above is not cross-checked against kustomize")
    for directory, namespace in ((BASE, None), (BASE / "proxy", None), (BASE, "elsewhere")):
        target = directory
        if namespace:  # an overlay that moves everything to another namespace, as the README shows
            overlay = REPO / "build" / "kustomize-overlay-test"
            overlay.mkdir(parents=True, exist_ok=True)
            (overlay / "kustomization.yaml").write_text(
                f"namespace: {namespace}\nresources:\n  - {Path('..', '..', directory.relative_to(REPO))}\n")
            target = overlay
        result = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        theirs = [d for d in yaml.safe_load_all(result.stdout) if d]
        ours = render(directory, namespace)

        def key(d: dict[str, Any]) -> tuple[str, str]:
            return d["kind"], d["metadata"]["name"]

        assert sorted(theirs, key=key) == sorted(ours, key=key)


# --- b) who may use the Kubernetes API ------------------------------------------------------------------


def test_the_role_grants_exactly_the_verbs_the_runtime_uses(docs: list[dict[str, Any]]) -> None:
    role = one(docs, "Role", "inferoxy-task-manager")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames, no nonResourceURLs
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == RUNTIME_RULES
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding"), "nothing cluster-wide"
    [binding] = find(docs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "inferoxy-task-manager"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "inferoxy-task-manager",
                                    "namespace": "inferoxy"}]


def test_only_the_task_managers_container_holds_an_api_token(docs: list[dict[str, Any]]) -> None:
    for account in find(docs, "ServiceAccount"):
        assert account.get("automountServiceAccountToken") is False, account["metadata"]["name"]
    holders = []
    for deployment, pod in pod_templates(docs):
        spec = pod["spec"]
        assert spec.get("automountServiceAccountToken") is False, deployment
        token_volumes = {v["name"] for v in spec.get("volumes", [])
                         if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))}
        for c in containers(pod):
            for mount in c.get("volumeMounts", []):
                if mount["name"] in token_volumes or mount["mountPath"].startswith(TOKEN_PATH):
                    holders.append((deployment, c["name"], spec.get("serviceAccountName")))
    assert holders == [("inferoxy-task-manager", "task-manager", "inferoxy-task-manager")]
    frontend = one(docs, "Deployment", "inferoxy-frontend")["spec"]["template"]["spec"]
    assert frontend["serviceAccountName"] == "inferoxy-frontend"
    bound = {s["name"] for b in find(docs, "RoleBinding") for s in b["subjects"]}
    assert "inferoxy-frontend" not in bound


def test_the_task_manager_is_one_pod_replaced_not_rolled(docs: list[dict[str, Any]]) -> None:
    # Two task managers of one instance would each remove the other's replica pods as leftovers.
    spec = one(docs, "Deployment", "inferoxy-task-manager")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert container(docs, "inferoxy-task-manager", "task-manager")["command"][:3] == ["inferoxy", "run",
                                                                                     "task_manager"]
    frontend = [c["command"][2] for c in containers(one(docs, "Deployment", "inferoxy-frontend")["spec"]["template"],
                                                    init=False)]
    assert "task_manager" not in frontend and "model_manager" not in frontend


# --- c) wiring: Services, ports, URLs --------------------------------------------------------------------


def test_every_service_selects_pods_that_serve_its_ports(docs: list[dict[str, Any]]) -> None:
    templates = dict(pod_templates(docs))
    for service in find(docs, "Service"):
        name = service["metadata"]["name"]
        pods = [p for p in templates.values() if selects(service["spec"]["selector"], p["metadata"]["labels"])]
        assert pods, f"Service {name} selects no pod of the manifests"
        for pod in pods:
            named = {port["name"]: port["containerPort"] for c in containers(pod, init=False)
                     for port in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert target in named or target in named.values(), f"Service {name} port {port} has no container"
    for kind in ("NetworkPolicy", "PodDisruptionBudget"):
        for doc in find(docs, kind):
            selector = doc["spec"]["podSelector" if kind == "NetworkPolicy" else "selector"]
            pods = [p for p in templates.values() if matches(selector, p["metadata"]["labels"])]
            assert pods, f"{kind} {doc['metadata']['name']} selects no pod of the manifests"
            # A policy's ports are ports its pods serve (a typo there would silently shut one).
            served = {port["containerPort"] for pod in pods for c in containers(pod, init=False)
                      for port in c.get("ports", [])}
            for rule in doc["spec"].get("ingress", []):
                assert {port["port"] for port in rule["ports"]} <= served, doc["metadata"]["name"]
    for deployment in find(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels), deployment["metadata"]["name"]


def service_port(docs: list[dict[str, Any]], url: str) -> tuple[str, int]:
    host, port = re.fullmatch(r"tcp://([^:/]+):(\d+)", url).groups()  # type: ignore[union-attr]
    service = one(docs, "Service", host)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}, f"{url}: the Service has no such port"
    return host, int(port)


def test_the_bus_urls_meet(docs: list[dict[str, Any]]) -> None:
    task_manager = env_values(container(docs, "inferoxy-task-manager", "task-manager"))
    batch_manager = env_values(container(docs, "inferoxy-frontend", "batch-manager"))
    tm_ports = {p["containerPort"] for p in container(docs, "inferoxy-task-manager", "task-manager")["ports"]}
    # The task manager binds both of its sockets on every address of its pod, on ports its container declares.
    for variable in ("INFEROXY_TASK_MANAGER_URL", "INFEROXY_REPLICA_BIND_URL"):
        assert task_manager[variable].startswith("tcp://0.0.0.0:")
        assert int(task_manager[variable].rsplit(":", 1)[1]) in tm_ports
    # Batch managers and replicas dial them through the task manager's Service, on the same ports.
    assert service_port(docs, batch_manager["INFEROXY_TASK_MANAGER_URL"]) == (
        "inferoxy-task-manager", int(task_manager["INFEROXY_TASK_MANAGER_URL"].rsplit(":", 1)[1]))
    assert service_port(docs, task_manager["INFEROXY_REPLICA_CONNECT_URL"]) == (
        "inferoxy-task-manager", int(task_manager["INFEROXY_REPLICA_BIND_URL"].rsplit(":", 1)[1]))
    # Every component of a frontend pod names the same ipc:// socket, in the directory its init container
    # makes private (0700) on a volume they all mount.
    pod = one(docs, "Deployment", "inferoxy-frontend")["spec"]["template"]
    urls = {env_values(c).get("INFEROXY_BATCH_MANAGER_URL", "unset") for c in containers(pod, init=False)}
    [url] = urls
    assert url.startswith("ipc:///"), url
    directory = str(Path(url.removeprefix("ipc://")).parent)
    [init] = pod["spec"]["initContainers"]
    assert init["command"] == ["mkdir", "-p", "-m", "0700", directory]
    for c in containers(pod):
        assert any(directory.startswith(m["mountPath"] + "/") for m in c["volumeMounts"]), c["name"]


def test_bridges_listen_where_their_ports_and_probes_point(docs: list[dict[str, Any]]) -> None:
    defaults = Settings()
    expected = {"rest-bridge": ("rest", defaults.rest_port), "grpc-bridge": ("grpc", defaults.grpc_port),
                "zmq-bridge": ("zmq", defaults.zmq_port)}
    for name, (port_name, number) in expected.items():
        c = container(docs, "inferoxy-frontend", name)
        assert {"name": port_name, "containerPort": number} in c["ports"]
        assert env_values(c)["INFEROXY_BIND_HOST"] == "0.0.0.0"
        for probe in ("readinessProbe", "livenessProbe"):
            action = c[probe]
            port = next(a["port"] for k, a in action.items() if k in ("httpGet", "grpc", "tcpSocket"))
            assert port in (port_name, number), (name, probe)
    assert {p["port"] for p in one(docs, "Service", "inferoxy")["spec"]["ports"]} == {
        defaults.rest_port, defaults.grpc_port, defaults.zmq_port}


def test_http_probes_ask_routes_the_rest_bridge_serves(docs: list[dict[str, Any]]) -> None:
    from bridges.rest import RestBridge

    ctx = zmq.asyncio.Context()
    try:
        routes = {getattr(route, "path", None) for route in RestBridge(Settings(), ctx).app.routes}
    finally:
        ctx.destroy(linger=0)
    rest = container(docs, "inferoxy-frontend", "rest-bridge")
    assert rest["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert rest["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("readinessProbe", "livenessProbe"):
        assert rest[probe]["httpGet"]["path"] in routes


def pre_stop_sleep(c: dict[str, Any]) -> int:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


def test_a_stopping_frontend_pod_stops_its_bridges_before_its_batch_manager(docs: list[dict[str, Any]]) -> None:
    # The kubelet sends SIGTERM to every container of a pod at once; the bridges' answers in flight come from
    # the batch manager, which must still run while they wait for them (GRACEFUL_SHUTDOWN_S, +1 for REST's).
    from bridges.gateway import GRACEFUL_SHUTDOWN_S

    pod = one(docs, "Deployment", "inferoxy-frontend")["spec"]["template"]
    bridges = [c for c in containers(pod, init=False) if c["name"].endswith("-bridge")]
    [batch_manager] = [c for c in containers(pod, init=False) if c["name"] == "batch-manager"]
    bridges_done = max(pre_stop_sleep(c) for c in bridges) + GRACEFUL_SHUTDOWN_S + 1
    assert pre_stop_sleep(batch_manager) >= bridges_done
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop_sleep(batch_manager) + 10


# --- d) settings, secrets, models.yaml ------------------------------------------------------------------


def test_every_variable_the_manifests_set_is_a_real_setting(docs: list[dict[str, Any]],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fields = set(Settings.model_fields)
    for deployment, pod in pod_templates(docs):
        # Nor any the cluster would add: a Service named inferoxy gives its namespace's pods INFEROXY_PORT etc.
        assert pod["spec"]["enableServiceLinks"] is False, deployment
    for name in [n for n in os.environ if n.startswith("INFEROXY_")]:  # this run's own settings stay out
        monkeypatch.delenv(name)
    for deployment, pod in pod_templates(docs):
        for c in containers(pod):
            names = {e["name"] for e in c.get("env", [])}
            if not c["image"].startswith(PROXY_IMAGE + ":"):
                assert names <= FOREIGN_ENV.get(c["name"], set()), (deployment, c["name"])
                continue
            for name in names:
                assert name.startswith("INFEROXY_"), (deployment, c["name"], name)
                assert name.removeprefix("INFEROXY_").lower() in fields, f"{deployment}/{c['name']}: {name} is " \
                    "not a setting of inferoxy/settings.py"
            # The literal values are valid settings, read from the environment as the component reads them.
            with monkeypatch.context() as env:
                for name, value in env_values(c).items():
                    env.setenv(name, value)
                Settings()


def secret_keys(docs: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Every key of every Secret the pods read, by Secret name."""
    used: dict[str, set[str]] = {}
    for _, pod in pod_templates(docs):
        for c in containers(pod):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.setdefault(ref["name"], set()).add(ref["key"])
    return used


def test_secrets_are_referenced_never_committed_and_the_readme_creates_them(docs: list[dict[str, Any]]) -> None:
    assert not find(docs, "Secret"), "secret values are created by the operator (README.md), never committed"
    readme = README.read_text()
    created: dict[str, set[str]] = {}
    # A command goes on while its lines end in a backslash.
    for name, options in re.findall(r"kubectl -n inferoxy create secret generic (\S+)((?:[^\n]*\\\n)*[^\n]*)", readme):
        created.setdefault(name, set()).update(re.findall(r"--from-literal=([a-z-]+)=", options))
    assert created == secret_keys(docs)


def test_models_yaml_is_mounted_where_the_model_manager_reads_it(docs: list[dict[str, Any]]) -> None:
    config_map = one(docs, "ConfigMap", "inferoxy-models")
    specs = {spec.name: spec for spec in parse_models(yaml.safe_load(config_map["data"]["models.yaml"]))}
    gpu = [spec for spec in specs.values() if spec.run_on_gpu]
    assert gpu and all(spec.resources.cpus and spec.resources.memory and spec.image for spec in gpu)
    assert all(spec.image for spec in specs.values()), "every replica is a pod: every model needs an image"
    pod = one(docs, "Deployment", "inferoxy-task-manager")["spec"]["template"]
    model_manager = container(docs, "inferoxy-task-manager", "model-manager")
    path = Path(env_values(model_manager)["INFEROXY_MODELS_FILE"])
    [volume] = [v for v in pod["spec"]["volumes"] if v.get("configMap", {}).get("name") == "inferoxy-models"]
    [mount] = [m for m in model_manager["volumeMounts"] if m["name"] == volume["name"]]
    assert Path(mount["mountPath"]) / "models.yaml" == path
    # The README's example of registering a model is a valid spec too.
    [example] = re.findall(r"cat > \S+\.yaml <<'EOF'\n(.*?)\nEOF\n", README.read_text(), re.S)
    assert ModelSpec(**yaml.safe_load(example)).run_on_gpu


# --- e) hardening -------------------------------------------------------------------------------------------


def test_every_container_is_non_root_read_only_and_bounded(docs: list[dict[str, Any]]) -> None:
    for deployment, pod in pod_templates(docs):
        security = pod["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] > 0, deployment
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, deployment
        for c in containers(pod):
            where = f"{deployment}/{c['name']}"
            assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}, where
            assert set(c["resources"]) == {"requests", "limits"}, where
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) == {"cpu", "memory"}, where
            assert ":" in c["image"], f"{where}: name the tag"
