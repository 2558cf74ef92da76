"""``inferoxy models ...`` as a subprocess against a running proxy on a real Redis: CRUD, tables, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inferoxy import admin_cli
from tests.support import REPO, ProxyProcess, delete_redis_prefix, free_port, wait_for

KEY = "cli-key"
ECHO_YAML = """\
name: echo
model_class: examples.models.echo.model:EchoModel
max_batch_size: 8
max_batch_delay_ms: 0
"""


@pytest.fixture(scope="module")
def proxy(real_redis_url: str) -> Iterator[ProxyProcess]:
    prefix = f"inferoxy-test-cli-{os.getpid()}"
    env = {"INFEROXY_REDIS_URL": real_redis_url, "INFEROXY_REDIS_PREFIX": prefix, "INFEROXY_MODELS_FILE": "",
           "INFEROXY_ADMIN_KEY": KEY, "INFEROXY_BRIDGES": "rest"}
    with ProxyProcess(env=env) as running:
        yield running
    delete_redis_prefix(real_redis_url, prefix)


def cli(proxy: ProxyProcess | None, *args: str, key: str | None = KEY, url: str | None = None,
        editor: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFEROXY_")}
    if editor:
        env["EDITOR"] = editor
    options = ["--url", url or (proxy.rest_url if proxy else "")]
    if key:
        options += ["--key", key]
    return subprocess.run([sys.executable, "-m", "inferoxy", "models", *options, *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def infer(proxy: ProxyProcess, model: str, version: str | None = None) -> httpx.Response:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]}
    return httpx.post(proxy.rest_url + path, json=body, timeout=30)


def test_register_change_and_remove_through_the_cli(proxy: ProxyProcess, tmp_path: Path) -> None:
    spec_file = tmp_path / "echo.yaml"
    spec_file.write_text(ECHO_YAML)

    added = cli(proxy, "add", "-f", str(spec_file))
    assert added.returncode == 0, added.stderr
    assert cli(proxy, "add", "-f", str(spec_file)).returncode == admin_cli.INVALID, "it exists already"

    # Registered through the CLI, served without a restart.
    wait_for(lambda: infer(proxy, "echo").status_code == 200, timeout=30, interval=0.2, what="echo to serve")

    listed = cli(proxy, "list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "VERSION", "DEFAULT", "LOADED"]
    assert row.split()[:4] == ["echo", "1", "*", "yes"]
    assert row.split()[-2:] == ["-", "-"], "no framework, no description"

    edited = cli(proxy, "edit", "echo", "--set", "max_batch_size=4", "--set", "env.MODE=fast",
                 "--set", "framework=numpy", "--set", "description=Returns its inputs unchanged.")
    assert edited.returncode == 0, edited.stderr
    # The spec's metadata in the list: the framework, and the description at the end of the row.
    row = cli(proxy, "list").stdout.splitlines()[1]
    assert row.split()[-5:] == ["numpy", "Returns", "its", "inputs", "unchanged."], row
    shown = cli(proxy, "show", "echo", "--version", "1")
    assert "max_batch_size: 4" in shown.stdout and "MODE: fast" in shown.stdout

    bad = cli(proxy, "edit", "echo", "--set", "max_batch_size=0")
    assert bad.returncode == admin_cli.INVALID and "max_batch_size" in bad.stderr

    # $EDITOR: a script that rewrites the file stands in for a person.
    editor = tmp_path / "editor.sh"
    editor.write_text("#!/bin/sh\nsed -i 's/max_batch_size: 4/max_batch_size: 6/' \"$1\"\n")
    editor.chmod(0o755)
    assert cli(proxy, "edit", "echo", editor=str(editor)).returncode == 0
    assert "max_batch_size: 6" in cli(proxy, "show", "echo").stdout

    assert cli(proxy, "unload", "echo").returncode == 0
    assert "no" in cli(proxy, "list").stdout.splitlines()[1].split()[3]
    assert cli(proxy, "load", "echo").returncode == 0

    removed = cli(proxy, "rm", "echo")
    assert removed.returncode == 0, removed.stderr
    wait_for(lambda: infer(proxy, "echo").status_code == 404, timeout=5, what="echo to be gone")
    assert cli(proxy, "rm", "echo").returncode == admin_cli.NOT_FOUND


def test_two_versions_serve_side_by_side_and_the_default_moves(proxy: ProxyProcess, tmp_path: Path) -> None:
    spec_file = tmp_path / "versions.yaml"
    # Version 1 echoes; version 2 doubles (and answers with y): which replica served is visible.
    spec_file.write_text("""\
models:
  - {name: twins, version: "1", model_class: "examples.models.echo.model:EchoModel"}
  - {name: twins, version: "2", model_class: "tests.models_for_tests:BatchProbeModel"}
""")
    assert cli(proxy, "add", "-f", str(spec_file)).returncode == 0
    one = wait_for(lambda: (r := infer(proxy, "twins", "1")).status_code == 200 and r, timeout=30, interval=0.2,
                   what="version 1")
    two = wait_for(lambda: (r := infer(proxy, "twins", "2")).status_code == 200 and r, timeout=30, interval=0.2,
                   what="version 2")
    assert [o["name"] for o in one.json()["outputs"]] == ["x"]
    assert {o["name"] for o in two.json()["outputs"]} == {"y", "row", "batch_rows"}
    assert infer(proxy, "twins").json()["model_version"] == "1"

    assert cli(proxy, "default", "twins", "2").returncode == 0
    wait_for(lambda: infer(proxy, "twins").json().get("model_version") == "2", timeout=5, what="the new default")
    # Both versions still serve at once.
    assert infer(proxy, "twins", "1").status_code == 200 and infer(proxy, "twins", "2").status_code == 200
    assert cli(proxy, "rm", "twins").returncode == 0


def test_exit_codes(proxy: ProxyProcess, tmp_path: Path) -> None:
    assert cli(proxy, "show", "nope").returncode == admin_cli.NOT_FOUND
    assert cli(proxy, "list", key=None).returncode == admin_cli.REFUSED
    assert cli(proxy, "list", key="wrong").returncode == admin_cli.REFUSED
    unreachable = cli(None, "list", url=f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == admin_cli.UNREACHABLE and "cannot reach" in unreachable.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmax_batch_size: -1\n")
    refused = cli(proxy, "add", "-f", str(bad))
    assert refused.returncode == admin_cli.INVALID and "max_batch_size" in refused.stderr
    assert cli(proxy, "add", "-f", str(tmp_path / "missing.yaml")).returncode == admin_cli.USAGE
