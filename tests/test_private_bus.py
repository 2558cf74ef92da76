"""`inferoxy serve` puts its components' own links on ipc:// in a private directory, unless the URLs were set.

Before: the links defaulted to tcp://127.0.0.1 with CURVE, so every request crossed the TCP stack and
was encrypted twice more on one host. The replica link joins them when replicas are local processes
(before: it stayed tcp:// + CURVE, so a 6 MB tensor was encrypted and decrypted on that hop both ways).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq.asyncio

from inferoxy import curve
from inferoxy.client import Client
from inferoxy.settings import Settings
from inferoxy.supervisor import BUS_DIR_PREFIX, MAX_IPC_PATH, private_bus, remove_stale_bus_dirs
from model_manager.spec import ModelSpec
from task_manager.placement import replica_plan
from task_manager.replicas import ModelGroup, Replica
from task_manager.service import TaskManager
from tests.support import ProxyProcess, free_port, wait_for
from tests.test_supervisor import MODELS

SECRET = "s" * 43


def test_an_ipc_socket_in_a_directory_only_this_uid_enters_needs_no_curve(tmp_path: Path) -> None:
    private, shared = tmp_path / "private", tmp_path / "shared"
    private.mkdir(mode=0o700)
    shared.mkdir()
    shared.chmod(0o755)
    assert curve.private_ipc(f"{private}/bm") and not curve.private_ipc(f"{shared}/bm")
    assert not curve.private_ipc("bm") and not curve.private_ipc("@bm")  # relative, abstract: anyone dials
    assert not curve.private_ipc(f"{tmp_path}/missing/bm")
    assert curve.server_for(SECRET, curve.BATCH_MANAGER, f"ipc://{private}/bm") is None
    assert curve.client_for(SECRET, curve.BATCH_MANAGER, f"ipc://{private}/bm") is None
    assert curve.server_for(SECRET, curve.BATCH_MANAGER, f"ipc://{shared}/bm") is not None
    assert curve.server_for(SECRET, curve.BATCH_MANAGER, "tcp://127.0.0.1:1") is not None


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a socket path holds 107 bytes; pytest's tmp_path can be longer)."""
    directory = Path(tempfile.mkdtemp(prefix="ixb", dir="/tmp"))
    yield directory
    shutil.rmtree(directory)


def test_private_bus_covers_only_the_links_left_unset(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_dir))
    monkeypatch.delenv("INFEROXY_BATCH_MANAGER_URL", raising=False)
    monkeypatch.delenv("INFEROXY_TASK_MANAGER_URL", raising=False)
    for name in ("INFEROXY_REPLICA_BIND_URL", "INFEROXY_REPLICA_CONNECT_URL", "INFEROXY_RUNTIME"):
        monkeypatch.delenv(name, raising=False)
    directory, env = private_bus(Settings())
    assert directory is not None and Path(directory).parent == short_dir
    info = os.stat(directory)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert env == {"INFEROXY_BATCH_MANAGER_URL": f"ipc://{directory}/batch_manager",
                   "INFEROXY_TASK_MANAGER_URL": f"ipc://{directory}/task_manager",
                   "INFEROXY_REPLICA_BIND_URL": f"ipc://{directory}/replicas"}
    directory, env = private_bus(Settings(batch_manager_url="tcp://127.0.0.1:1"))
    assert directory is not None and list(env) == ["INFEROXY_TASK_MANAGER_URL", "INFEROXY_REPLICA_BIND_URL"]
    links = {"batch_manager_url": "tcp://127.0.0.1:1", "task_manager_url": "tcp://127.0.0.1:2"}
    assert private_bus(Settings(**links, replica_bind_url="tcp://127.0.0.1:3")) == (None, {})
    # Docker replicas dial from their own namespaces, and a replica_connect_url says replicas dial from elsewhere:
    # either way the replica link stays where it was (tcp://, with a CURVE key per replica).
    assert private_bus(Settings(**links, runtime="docker")) == (None, {})
    assert private_bus(Settings(**links, replica_connect_url="tcp://127.0.0.1:7792")) == (None, {})
    directory, env = private_bus(Settings(runtime="docker"))
    assert directory is not None and "INFEROXY_REPLICA_BIND_URL" not in env


def test_replicas_on_a_private_ipc_link_get_no_curve_keys_and_on_tcp_their_own(short_dir: Path) -> None:
    private, shared = short_dir / "private", short_dir / "shared"
    private.mkdir(mode=0o700)
    shared.mkdir()
    shared.chmod(0o755)
    model = ModelSpec(name="echo", model_class="examples.models.echo.model:EchoModel")
    replica = Replica("echo-1-abc", model, ModelGroup(model), started_at=0.0)
    # Only a socket in a directory no other uid can enter goes without CURVE (curve.needs_curve).
    for url, keyed in ((f"ipc://{private}/replicas", False), ("tcp://127.0.0.1:7792", True),
                       (f"ipc://{shared}/replicas", True)):
        settings = Settings(bus_secret=SECRET, replica_bind_url=url)
        tm = TaskManager(settings, zmq.asyncio.Context.instance())
        plan = replica_plan(settings, replica, tm._replica_keys)
        assert (tm._replica_keys is not None) is keyed, url
        assert plan.env["INFEROXY_REPLICA_URL"] == url
        assert ("INFEROXY_BUS_SECRET_KEY" in plan.env) is keyed, url


def test_a_run_dir_too_long_for_a_socket_path_falls_back_to_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/" + "d" * 80)
    directory, env = private_bus(Settings())
    try:
        assert directory is not None and Path(directory).parent == Path("/tmp")
        assert all(len(url.removeprefix("ipc://")) <= MAX_IPC_PATH for url in env.values())
    finally:
        shutil.rmtree(directory or "/nonexistent", ignore_errors=True)


def test_a_directory_left_by_a_killed_serve_is_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    dead_pid = subprocess.Popen(["true"])  # noqa: S607
    dead_pid.wait()
    dead = tmp_path / f"{BUS_DIR_PREFIX}{dead_pid.pid}-abc"
    live = tmp_path / f"{BUS_DIR_PREFIX}{os.getpid()}-def"
    other = tmp_path / "inferoxy-bus-notapid"
    for directory in (dead, live, other):
        directory.mkdir()
    (dead / "batch_manager").write_text("")
    remove_stale_bus_dirs(str(tmp_path))
    assert not dead.exists() and live.exists() and other.exists()


def bus_urls(proxy: ProxyProcess) -> tuple[str, str, str]:
    text = proxy.log()
    bm = re.search(r"bridges -> batch manager\s+(\S+.*)", text)
    tm = re.search(r"batch manager -> task manager\s+(\S+.*)", text)
    replicas = re.search(r"replicas -> task manager\s+(\S+.*)", text)
    assert bm and tm and replicas, text
    return bm[1].strip(), tm[1].strip(), replicas[1].strip()


def infer_once(proxy: ProxyProcess) -> bool:
    try:
        with Client(proxy.zmq_url, timeout=5) as client:
            out = client.infer("echo", {"x": np.ones((1, 2), np.float32)})
    except Exception:
        return False
    return bool(np.array_equal(out["x"], np.ones((1, 2), np.float32)))


def test_serve_uses_a_private_ipc_directory_by_default_and_removes_it_at_exit(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    proxy = ProxyProcess({"INFEROXY_MODELS_FILE": str(models)})
    for name in ("INFEROXY_BATCH_MANAGER_URL", "INFEROXY_TASK_MANAGER_URL", "INFEROXY_REPLICA_BIND_URL"):
        proxy.env.pop(name)
    with proxy:
        bm, tm, replicas = bus_urls(proxy)
        found = re.fullmatch(r"ipc://(/\S+)/batch_manager \(private directory\)", bm)
        assert found, bm
        directory = Path(found[1])
        assert tm == f"ipc://{directory}/task_manager (private directory)"
        assert replicas == f"ipc://{directory}/replicas (private directory)"
        assert directory.name.startswith(f"{BUS_DIR_PREFIX}{proxy.process.pid if proxy.process else 0}-")
        info = directory.stat()
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
        assert (directory / "batch_manager").is_socket() and (directory / "task_manager").is_socket()
        wait_for(lambda: infer_once(proxy), timeout=60, interval=0.2, what="an answer over the ipc:// bus")
        assert (directory / "replicas").is_socket()  # the replica answered over it: the TM binds nothing else
        # A restarted component binds the same socket file again (the dead one left it behind).
        os.kill(proxy.component_pids()["batch_manager"], signal.SIGKILL)
        proxy.wait_for_line("batch_manager is back", timeout=60)
        wait_for(lambda: infer_once(proxy), timeout=60, interval=0.2, what="an answer after the restart")
        assert proxy.stop() == 0
    assert not directory.exists()


def test_links_given_as_tcp_urls_stay_tcp_with_curve(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    bm_url = f"tcp://127.0.0.1:{free_port()}"
    proxy = ProxyProcess({"INFEROXY_MODELS_FILE": str(models), "INFEROXY_BATCH_MANAGER_URL": bm_url})
    proxy.env.pop("INFEROXY_TASK_MANAGER_URL")
    with proxy:
        bm, tm, replicas = bus_urls(proxy)
        assert bm == f"{bm_url} (CURVE)"
        assert replicas == f"{proxy.env['INFEROXY_REPLICA_BIND_URL']} (CURVE)"  # set by the operator: tcp + CURVE
        assert tm.startswith("ipc://") and tm.endswith("/task_manager (private directory)")
        wait_for(lambda: infer_once(proxy), timeout=60, interval=0.2, what="an answer over tcp:// and ipc://")
