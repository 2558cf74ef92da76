"""A replica's environment is an allow-list: none of the proxy's secrets reach a model (issue 10, item 5)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from model_manager.spec import ModelSpec
from task_manager.runtimes.base import ReplicaPlan, replica_environment
from task_manager.runtimes.docker import DockerRuntime
from task_manager.runtimes.process import ProcessRuntime
from tests.support import REPO

SECRETS = {
    "INFEROXY_ADMIN_KEY": "admin-key-0c1d",
    "INFEROXY_REGISTRY_PASSWORD": "registry-password-77aa",
    "INFEROXY_REDIS_URL": "redis://:redis-password-9f9f@127.0.0.1:6379/0",
    "INFEROXY_BUS_SECRET": "bus-secret-31e2",
    "INFEROXY_EMBEDDED_REDIS_PASSWORD": "embedded-password-5b5b",
    "DATABASE_URL": "postgres://app:db-password-4c4c@db/app",
}
PLAN_ENV = {"INFEROXY_REPLICA_URL": "tcp://127.0.0.1:1", "INFEROXY_REPLICA_ID": "echo-1-0-0123456789ab",
            "INFEROXY_BUS_SECRET_KEY": "k" * 40}


def plan(gpu: str | None = None, **spec_fields: object) -> ReplicaPlan:
    spec = ModelSpec(name="echo", env={"MODEL_SETTING": "from the spec", "PYTHONPATH": str(REPO)},
                     **spec_fields)
    return ReplicaPlan(replica_id=PLAN_ENV["INFEROXY_REPLICA_ID"], spec=spec, env=PLAN_ENV, gpu=gpu)


def proxy_environ() -> dict[str, str]:
    return {**SECRETS, "PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "VIRTUAL_ENV": "/opt/venv", "CUDA_VISIBLE_DEVICES": "0,1", "SOMETHING_ELSE": "x"}


def test_replica_environment_is_the_allow_list_then_the_spec_then_the_plan() -> None:
    env = replica_environment(plan(gpu="1", model_class="m:M"), proxy_environ())
    assert env == {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                   "VIRTUAL_ENV": "/opt/venv", "CUDA_VISIBLE_DEVICES": "1", "MODEL_SETTING": "from the spec",
                   "PYTHONPATH": str(REPO), **PLAN_ENV}


def test_a_process_replica_sees_none_of_the_proxys_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start a real replica while the proxy's environment holds its secrets; read /proc/PID/environ."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LC_ALL", "C.UTF-8")

    async def start_and_read() -> dict[str, str]:
        # A command that waits (the runtime itself would exit at once: nothing listens on its URL).
        handle = await ProcessRuntime().start(plan(command=["sleep", "60"]))
        try:
            raw = await asyncio.to_thread(Path(f"/proc/{handle.pid}/environ").read_bytes)
        finally:
            await handle.stop(grace_s=1)
        return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)

    env = asyncio.run(start_and_read())
    for name, value in SECRETS.items():
        assert name not in env
        assert not any(value in seen for seen in env.values()), f"the value of {name} reached the replica"
    assert {name: env[name] for name in PLAN_ENV} == PLAN_ENV  # where to dial, who it is, its own key
    assert env["MODEL_SETTING"] == "from the spec" and env["PYTHONPATH"] == str(REPO)
    assert env["LC_ALL"] == "C.UTF-8" and env["PATH"]


def test_a_container_gets_only_its_spec_and_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    options = DockerRuntime("prod", base_url="unix:///nonexistent/docker.sock").container_options(
        plan(gpu="2", image="acme/echo:1"))
    assert options["environment"] == {"MODEL_SETTING": "from the spec", "PYTHONPATH": str(REPO), **PLAN_ENV,
                                      "NVIDIA_VISIBLE_DEVICES": "2"}
