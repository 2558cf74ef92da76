"""The compose stack in deploy/compose: its Prometheus config, checked by promtool and run for real against a
live proxy; its Grafana dashboard, checked to chart only metrics that exist; the compose file's wiring.

Prometheus is Debian's (`prometheus`, which has `promtool`); compose is `docker compose` or Debian's
`docker-compose`. Missing, they fail the test under CI (or INFEROXY_REQUIRE_PROMETHEUS /
INFEROXY_REQUIRE_COMPOSE) and skip it elsewhere. Grafana is not packaged here: its files are parsed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from inferoxy import metrics
from inferoxy.protocol import ErrorCode
from inferoxy.settings import Settings
from tests.support import REPO, ProxyProcess, free_port, require_program, require_service, wait_for

COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
PROMETHEUS_YML = COMPOSE_DIR / "prometheus" / "prometheus.yml"
GRAFANA = COMPOSE_DIR / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "inferoxy.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "inferoxy.yml"
REQUIRE_PROMETHEUS = "INFEROXY_REQUIRE_PROMETHEUS"
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# What Grafana puts in an expression before it reaches Prometheus, as a query over the last minutes would.
GRAFANA_VARIABLES = {"$model": ".*", "$__rate_interval": "1m", "$__range": "5m"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


# --- a) promtool -----------------------------------------------------------------------------------


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = require_program("promtool", REQUIRE_PROMETHEUS)
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_refuses_a_broken_config(tmp_path: Path) -> None:
    # The check above means something only if promtool fails configs it should: a misspelt key here.
    promtool = require_program("promtool", REQUIRE_PROMETHEUS)
    broken = tmp_path / "prometheus.yml"
    broken.write_text(PROMETHEUS_YML.read_text().replace("scrape_configs:", "scrape_config:"))
    result = subprocess.run([promtool, "check", "config", str(broken)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stdout + result.stderr


# --- c) the Grafana dashboard and its provisioning -----------------------------------------------------


def documented_metrics() -> dict[str, str]:
    """docs/METRICS.md's table: metric name -> type."""
    rows = re.findall(r"^\| `(inferoxy_[a-z_]+)` \| (\w+) \|", (REPO / "docs" / "METRICS.md").read_text(), re.M)
    return dict(rows)


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels_of(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def expressions(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression the dashboard sends: panel targets and template variable queries."""
    found = [target["expr"] for panel in panels_of(board) for target in panel.get("targets", [])]
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        found.append(query["query"] if isinstance(query, dict) else str(query or ""))
    return found


def unknown_metrics(expression: str, known: dict[str, str]) -> set[str]:
    """Names in ``expression`` that are not metrics in ``known`` (a histogram's _bucket/_sum/_count are)."""
    unknown = set()
    for name in re.findall(r"\binferoxy_[a-z_]+", expression):
        family = name
        for suffix in HISTOGRAM_SERIES:
            if name.endswith(suffix) and known.get(name[: -len(suffix)]) == "histogram":
                family = name[: -len(suffix)]
        if family not in known:
            unknown.add(name)
    return unknown


def families(expression: str) -> set[str]:
    names = set(re.findall(r"\binferoxy_[a-z_]+", expression))
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}


def test_the_metric_check_catches_names_that_do_not_exist() -> None:
    known = {"inferoxy_requests_total": "counter", "inferoxy_batch_size": "histogram", "inferoxy_queue_depth": "gauge"}
    assert unknown_metrics('rate(inferoxy_requests_total{code!="ok"}[1m])', known) == set()
    assert unknown_metrics("rate(inferoxy_batch_size_bucket[1m])", known) == set()
    assert unknown_metrics("inferoxy_request_total", known) == {"inferoxy_request_total"}
    # _sum exists for histograms only.
    assert unknown_metrics("inferoxy_queue_depth_sum", known) == {"inferoxy_queue_depth_sum"}


def test_the_dashboard_charts_only_metrics_that_exist() -> None:
    documented = documented_metrics()
    exported = set(metrics.exported_names())
    assert documented.keys() == exported, "docs/METRICS.md and inferoxy/metrics.py disagree"
    exprs = expressions(dashboard())
    assert exprs and all(exprs)
    for expr in exprs:
        assert not unknown_metrics(expr, documented), f"{expr!r} uses metrics docs/METRICS.md does not list"


def test_the_dashboard_shows_what_an_operator_needs() -> None:
    board = dashboard()
    used = set().union(*(families(expr) for expr in expressions(board)))
    # Request rate and errors, latency, queue depth, batch size, replicas by state.
    for family in ("inferoxy_requests_total", "inferoxy_request_duration_seconds", "inferoxy_queue_depth",
                   "inferoxy_batch_size", "inferoxy_replicas"):
        assert family in used, f"the dashboard charts no {family}"
    exprs = expressions(board)
    assert any("histogram_quantile" in expr and "inferoxy_request_duration_seconds_bucket" in expr for expr in exprs)
    assert any('code!="ok"' in expr for expr in exprs), "no panel shows errors"
    assert any("inferoxy_replicas" in expr and "state" in expr for expr in exprs), "replicas not split by state"
    assert board["uid"] and board["title"]


def test_grafana_provisioning_points_at_the_dashboard_and_the_prometheus_of_the_stack() -> None:
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus"
    services = compose()["services"]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services
    # Every panel and variable queries that datasource, by its uid.
    board = dashboard()
    for item in [*panels_of(board), *board["templating"]["list"]]:
        if item.get("type") == "row":
            continue
        assert item["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, item.get("title")
        for target in item.get("targets", []):
            assert target["datasource"]["uid"] == datasource["uid"]
    # The provider reads the folder docker-compose.yml mounts grafana/dashboards at, and the JSON is in it.
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    mounts = dict(bind_mounts(services["grafana"]))
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == DATASOURCES.parent.parent


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses a rule's expression with Prometheus's own parser: one recording rule per expression.
    promtool = require_program("promtool", REQUIRE_PROMETHEUS)
    exprs = expressions(dashboard())
    rules = [{"record": f"dashboard:expr{i}", "expr": as_promql(expr)} for i, expr in enumerate(exprs)]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # And a broken one is refused, so the check can fail.
    broken = {"record": "dashboard:broken", "expr": "sum(rate(x[1m])"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [broken]}]}))
    assert subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, timeout=60).returncode != 0


def as_promql(expr: str) -> str:
    """What Prometheus gets for ``expr``: Grafana's variables filled in; for ``label_values(SELECTOR, label)``
    (Grafana's own function, for a variable's choices) the selector it reads."""
    found = re.fullmatch(r"label_values\((.+), *\w+\)", expr)
    if found:
        expr = found.group(1)
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


# --- d) the compose file -----------------------------------------------------------------------------


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, Path]]:
    """(target, host path) of a service's bind mounts of repository files (relative sources)."""
    found = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            found.append((target, (COMPOSE_DIR / source).resolve()))
    return found


def interpolated(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))


def test_the_compose_file_wires_the_stack_together() -> None:
    stack = compose()
    services = stack["services"]
    assert set(services) == {"proxy", "redis", "prometheus", "grafana"}
    proxy = services["proxy"]
    assert proxy["image"] == "inferoxy/proxy"
    assert (COMPOSE_DIR / proxy["build"]["context"] / proxy["build"]["dockerfile"]).resolve() == \
        REPO / "docker" / "Dockerfile"
    # Every file the services mount from the repository exists.
    for name, service in services.items():
        for target, source in bind_mounts(service):
            assert source.exists(), f"{name} mounts {source} at {target}, and it is not in the repository"
    assert dict(bind_mounts(services["prometheus"]))["/etc/prometheus/prometheus.yml"] == PROMETHEUS_YML
    assert dict(bind_mounts(proxy))["/etc/inferoxy/models.yaml"] == REPO / "models.yaml"
    # The Docker socket (root on the host) goes to the proxy alone.
    for name, service in services.items():
        socket = any(volume.startswith("/var/run/docker.sock:") for volume in service.get("volumes", []))
        assert socket == (name == "proxy"), name


def test_the_compose_stack_publishes_on_loopback_and_hard_codes_no_password() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("${INFEROXY_PUBLISH_HOST:-127.0.0.1}:"), f"{name} publishes {port}"
    # Redis holds the registry (writing a spec runs code): reachable from the stack only, with a password.
    assert "ports" not in services["redis"]
    assert "--requirepass" in services["redis"]["command"]
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", password), password
    # Every variable the compose file reads is in env.example, for the operator to set.
    listed = set(re.findall(r"^#? ?([A-Z_][A-Z0-9_]*)=", (COMPOSE_DIR / "env.example").read_text(), re.M))
    missing = interpolated(COMPOSE_FILE.read_text()) - listed
    assert not missing, f"env.example does not list {sorted(missing)}"


def test_the_proxy_reaches_redis_and_its_replicas_reach_the_proxy() -> None:
    stack = compose()
    services = stack["services"]
    env = services["proxy"]["environment"]
    assert re.fullmatch(r"redis://:\$\{INFEROXY_REDIS_PASSWORD:\?[^}]+\}@redis:6379/0", env["INFEROXY_REDIS_URL"])
    # Replicas join the network named in INFEROXY_DOCKER_NETWORK and dial the proxy's service name there.
    replica_networks = [key for key, net in stack["networks"].items()
                        if (net or {}).get("name") == env["INFEROXY_DOCKER_NETWORK"]]
    assert replica_networks and replica_networks[0] in services["proxy"]["networks"]
    for other in ("redis", "prometheus", "grafana"):
        assert replica_networks[0] not in services[other]["networks"], f"model containers reach {other}"
    bind_port = env["INFEROXY_REPLICA_BIND_URL"].rsplit(":", 1)[1]
    assert env["INFEROXY_REPLICA_CONNECT_URL"] == f"tcp://proxy:{bind_port}"
    # Prometheus scrapes the proxy's REST port, on a network they share.
    (job,) = load_yaml(PROMETHEUS_YML)["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"proxy:{Settings.model_fields['rest_port'].default}"]
    assert set(services["prometheus"]["networks"]) & set(services["proxy"]["networks"])


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    require_service("docker compose (or docker-compose)", "INFEROXY_REQUIRE_COMPOSE", "is not installed")
    raise AssertionError("unreachable")


def run_compose_config(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    # An empty env file and none of the stack's variables inherited: only what the test passes counts.
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {key: value for key, value in os.environ.items() if key not in interpolated(COMPOSE_FILE.read_text())}
    return subprocess.run([*compose_command(), "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config"],
                          cwd=COMPOSE_DIR, env={**env, **variables}, capture_output=True, text=True, timeout=120)


def test_compose_accepts_the_stack(tmp_path: Path) -> None:
    result = run_compose_config(tmp_path, INFEROXY_REDIS_PASSWORD="redis-secret", GRAFANA_ADMIN_PASSWORD="graf-secret")
    assert result.returncode == 0, result.stdout + result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "graf-secret"
    assert "redis-secret@redis:6379" in resolved["services"]["proxy"]["environment"]["INFEROXY_REDIS_URL"]


def test_compose_refuses_to_start_without_the_passwords(tmp_path: Path) -> None:
    result = run_compose_config(tmp_path, INFEROXY_REDIS_PASSWORD="redis-secret")
    assert result.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in result.stdout + result.stderr
    result = run_compose_config(tmp_path, GRAFANA_ADMIN_PASSWORD="graf-secret")
    assert result.returncode != 0 and "INFEROXY_REDIS_PASSWORD" in result.stdout + result.stderr


# --- b) a real Prometheus scraping a running proxy -------------------------------------------------


def scrape_config(target: str, key_file: Path | None = None) -> dict[str, Any]:
    """The repository's prometheus.yml aimed at ``target`` every second; with ``key_file``, its commented
    ``authorization`` block switched on and pointed at that file, as its comment tells an operator to."""
    text = PROMETHEUS_YML.read_text()
    if key_file is not None:
        commented = "    # authorization:\n    #   credentials_file: /etc/prometheus/inferoxy-key\n"
        assert commented in text, "prometheus.yml no longer has the authorization block its README describes"
        text = text.replace(commented, f"    authorization:\n      credentials_file: {key_file}\n")
    config = yaml.safe_load(text)
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    # The repository's inferoxy job, scraping the test's proxy; no other job, so nothing leaves loopback.
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "inferoxy"]
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]
    return config


class Prometheus:
    """Debian's Prometheus on a loopback port, running ``config``, its data in a directory of its own."""

    def __init__(self, program: str, config: dict[str, Any]) -> None:
        self.program = program
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.directory = Path(tempfile.mkdtemp(prefix="inferoxy-prometheus-"))
        self.config = self.directory / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = self.directory / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [self.program, f"--config.file={self.config}", f"--storage.tsdb.path={self.directory / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        wait_for(self._ready, timeout=60, what=f"Prometheus to be ready at {self.url}")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited ({self.process.returncode}):\n{self.log.read_text()}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value ``expr`` answers, or None while it answers nothing."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, Prometheus]]:
    program = require_program("prometheus", REQUIRE_PROMETHEUS)
    models = tmp_path_factory.mktemp("models") / "models.yaml"
    models.write_text(yaml.safe_dump({"models": {"echo": {"model_class": "examples.models.echo.model:EchoModel",
                                                          "max_batch_size": 8, "min_replicas": 1}}}))
    proxy = ProxyProcess(env={"INFEROXY_MODELS_FILE": str(models)}).start()
    prometheus = Prometheus(program, scrape_config(f"127.0.0.1:{proxy.rest_port}"))
    try:
        prometheus.start()
        yield proxy, prometheus
    finally:
        prometheus.stop()
        proxy.stop()


REQUESTS = 5


def test_a_real_prometheus_scrapes_the_proxy(scraped: tuple[ProxyProcess, Prometheus]) -> None:
    proxy, prometheus = scraped
    with httpx.Client(base_url=proxy.rest_url, timeout=30) as http:
        wait_for(lambda: http.get("/v2/models/echo/ready").status_code == 200, timeout=60, interval=0.2,
                 what="echo to be ready")
        body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}
        for _ in range(REQUESTS):
            assert http.post("/v2/models/echo/infer", json=body).status_code == 200
    assert wait_for(lambda: prometheus.value('up{job="inferoxy"}') == 1.0, timeout=30, interval=0.25,
                    what="Prometheus to scrape the proxy")
    components = proxy.component_pids()
    assert len(components) >= 4, proxy.log()  # model manager, batch manager, task manager, bridges
    wait_for(lambda: prometheus.value("sum(inferoxy_component_up)") == len(components), timeout=30, interval=0.25,
             what=f"sum(inferoxy_component_up) == {len(components)} ({sorted(components)})")
    names = {series["metric"]["component"] for series in prometheus.query("inferoxy_component_up == 1")}
    assert names == set(components)
    # The requests above, and one for a model that does not exist, counted by bridge, model and code.
    assert httpx.post(f"{proxy.rest_url}/v2/models/no-such-model/infer", json=body, timeout=30).status_code == 404
    unknown = ErrorCode.UNKNOWN_MODEL.value
    wait_for(lambda: prometheus.value('sum(inferoxy_requests_total{bridge="rest",model="echo",code="ok"})') == REQUESTS
             and prometheus.value(f'sum(inferoxy_requests_total{{bridge="rest",code="{unknown}"}})') == 1.0,
             timeout=30, interval=0.25, what=f"Prometheus to count {REQUESTS} echo requests and 1 {unknown}")


def test_every_dashboard_expression_runs_on_the_scraped_proxy(scraped: tuple[ProxyProcess, Prometheus]) -> None:
    _, prometheus = scraped
    for expr in expressions(dashboard()):
        prometheus.query(as_promql(expr))


def test_prometheus_scrapes_a_proxy_that_requires_keys_with_the_key_file_its_config_describes(tmp_path: Path) -> None:
    # docs/METRICS.md: with keys required and metadata closed, /metrics needs a key that may call every model.
    program = require_program("prometheus", REQUIRE_PROMETHEUS)
    admin_key = "deploy-test-admin-key"
    proxy = ProxyProcess(env={"INFEROXY_MODELS_FILE": "", "INFEROXY_AUTH": "required",
                              "INFEROXY_AUTH_METADATA": "true", "INFEROXY_ADMIN_KEY": admin_key}).start()
    prometheus: Prometheus | None = None
    try:
        created = httpx.post(f"{proxy.rest_url}/v2/admin/keys", json={"name": "prometheus", "scopes": ["infer"]},
                             headers={"X-Inferoxy-Admin-Key": admin_key}, timeout=10)
        assert created.status_code == 201, created.text
        key_file = tmp_path / "inferoxy-key"
        key_file.write_text(created.json()["key"])
        target = f"127.0.0.1:{proxy.rest_port}"
        config = scrape_config(target, key_file)
        # The same job without the key, to see that the proxy does refuse an anonymous scrape.
        anonymous = {**scrape_config(target)["scrape_configs"][0], "job_name": "anonymous"}
        config["scrape_configs"].append(anonymous)
        prometheus = running = Prometheus(program, config)
        running.start()  # assigned first, so a start that fails is still stopped and cleaned below
        wait_for(lambda: running.value('up{job="inferoxy"}') == 1.0 and running.value('up{job="anonymous"}') == 0.0,
                 timeout=30, interval=0.25, what="the keyed scrape to succeed and the anonymous one to fail")
        assert running.value('sum(inferoxy_component_up{job="inferoxy"})') == len(proxy.component_pids())
    finally:
        if prometheus is not None:
            prometheus.stop()
        proxy.stop()
