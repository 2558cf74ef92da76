"""Tests that need a missing service skip with a reason on a developer's machine and fail in CI.

Each case runs one real test in a subprocess with the service taken away (a PATH without
redis-server, a Docker host that does not exist) and reads its outcome from pytest's report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

REQUIRE_VARIABLES = ("CI", "INFEROXY_REQUIRE_REDIS", "INFEROXY_REQUIRE_DOCKER", "INFEROXY_REQUIRE_PROMETHEUS",
                     "INFEROXY_REQUIRE_COMPOSE", "INFEROXY_REQUIRE_CHROMIUM", "INFEROXY_REQUIRE_KUBERNETES_VALIDATE")


def run_test(node: str, tmp_path: Path, *, ci: bool, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in REQUIRE_VARIABLES}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", node],
        cwd=REPO, env={**base, **env, **({"CI": "true"} if ci else {})}, capture_output=True, text=True,
        timeout=120,
    )


def path_without(tmp_path: Path, *programs: str) -> str:
    """A PATH with every directory of this one, less any that holds one of ``programs``."""
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any((Path(d) / program).exists() for program in programs)]
    return os.pathsep.join(keep) or str(tmp_path)


CASES = {
    # Missing: the redis-server binary this test restarts on purpose (it used to raise FileNotFoundError).
    "redis-server": ("tests/test_registry_live.py::test_serving_survives_a_redis_restart", "redis-server"),
    # Missing: the Docker engine (this file used to skip even in CI).
    "dockerd": ("tests/test_docker_runtime.py::test_stop_ends_and_removes_the_container", "Docker engine"),
    "dockerd-e2e": ("tests/test_docker_end_to_end.py::test_a_sigkilled_proxy_leaves_no_container_after_its_restart",
                    "Docker engine"),
    # Missing: Debian's prometheus package (promtool and the server), and compose.
    "promtool": ("tests/test_deploy_stack.py::test_promtool_accepts_the_prometheus_config", "promtool"),
    "prometheus": ("tests/test_deploy_stack.py::test_a_real_prometheus_scrapes_the_proxy", "prometheus"),
    "docker-compose": ("tests/test_deploy_stack.py::test_compose_accepts_the_stack", "docker compose"),
    # Missing: Debian's chromium (the dashboard's browser test).
    "chromium": ("tests/test_dashboard_browser.py::test_the_models_appear_and_the_request_counter_rises", "chromium"),
    # Missing: the Kubernetes schemas (pip's kubernetes-validate) the manifests in deploy/kubernetes are checked with.
    "kubernetes-validate": ("tests/test_kubernetes_manifests.py::test_every_document_validates_against_the_kubernetes_"
                            "schemas", "kubernetes-validate"),
}


def environment_without(service: str, tmp_path: Path) -> dict[str, str]:
    if service == "docker-compose":  # and `docker compose`, where the CLI has the plugin
        return {"PATH": path_without(tmp_path, "docker-compose", "docker")}
    if service in ("redis-server", "promtool", "prometheus"):
        return {"PATH": path_without(tmp_path, service)}
    if service == "chromium":
        return {"PATH": path_without(tmp_path, "chromium", "chromium-browser", "chromedriver")}
    if service == "kubernetes-validate":  # a module of that name first on the path, which fails to import
        shadow = tmp_path / "shadow"
        shadow.mkdir()
        (shadow / "kubernetes_validate.py").write_text("raise ImportError('hidden by tests/test_skips.py')\n")
        return {"PYTHONPATH": os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")]))}
    return {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}


@pytest.mark.parametrize("service", sorted(CASES))
def test_a_missing_service_skips_with_a_reason_outside_ci(service: str, tmp_path: Path) -> None:
    node, named = CASES[service]
    result = run_test(node, tmp_path, ci=False, **environment_without(service, tmp_path))
    assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout + result.stderr
    assert "SKIPPED" in result.stdout and named in result.stdout, result.stdout


@pytest.mark.parametrize("service", sorted(CASES))
def test_a_missing_service_fails_in_ci(service: str, tmp_path: Path) -> None:
    node, named = CASES[service]
    result = run_test(node, tmp_path, ci=True, **environment_without(service, tmp_path))
    assert result.returncode == 1 and ("1 failed" in result.stdout or "1 error" in result.stdout), result.stdout
    assert named in result.stdout and "CI is set" in result.stdout, result.stdout
