"""The model-author SDK (``inferoxy.model``, the replica runtime) needs only numpy, pyzmq and msgpack.

A model image installs nothing else (docs/MODELS.md), so the test builds a virtual environment
without the system's site-packages, installs those three into it and nothing more, imports the SDK
from the source tree, and serves a tiny model through the runtime's entry point
(``python -m inferoxy.runtime``) against a stand-in task manager here. The stand-in speaks with
``inferoxy.messages`` (msgspec), so this also shows that a replica reading and writing headers with
plain msgpack understands the proxy's structs and is understood by them.

Wheels come from ``INFEROXY_SDK_WHEELHOUSE`` when set, else ``build/docker-wheelhouse`` (made by
docker/build-images.sh), else ``pip download`` of this environment's versions (pip's cache, or the
index). With none of these it skips on a developer's machine and fails in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from inferoxy import envelope, wire
from inferoxy import messages as m
from tests.support import REPO, free_port, require_service

DOUBLE_CAPACITY = 3  # tiny_model.Double.capacity
SDK_DEPENDENCIES = ("numpy", "pyzmq", "msgpack")
# The modules a replica may load beyond the standard library.
ALLOWED_TOP_LEVEL = {"numpy", "zmq", "msgpack", "inferoxy", "tiny_model"}

TINY_MODEL = """
import numpy as np

from inferoxy.model import Model


class Double(Model):
    capacity = 3

    def predict(self, batch):
        return {"y": batch["x"] * np.float32(2)}
"""

IMPORTS = """
import sys

import inferoxy.model
import inferoxy.runtime

# Modules loaded from a file, less the standard library's (Cython's runtime modules have no file).
loaded = {name.split(".")[0] for name, module in list(sys.modules.items()) if getattr(module, "__file__", None)}
third_party = sorted(loaded - set(sys.stdlib_module_names) - {"__main__"})
print(" ".join(third_party))
"""

pytestmark = pytest.mark.timeout(300)


def run(*command: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=240, **kwargs)


def wheel_sources(tmp_path: Path) -> list[tuple[str, Path | None]]:
    sources: list[tuple[str, Path | None]] = []
    if os.environ.get("INFEROXY_SDK_WHEELHOUSE"):
        sources.append(("INFEROXY_SDK_WHEELHOUSE", Path(os.environ["INFEROXY_SDK_WHEELHOUSE"])))
    if (REPO / "build" / "docker-wheelhouse").is_dir():
        sources.append(("build/docker-wheelhouse", REPO / "build" / "docker-wheelhouse"))
    sources.append(("pip download", None))
    return sources


def install_sdk_dependencies(python: Path, tmp_path: Path) -> None:
    """numpy, pyzmq and msgpack into the environment of ``python``, from the first source that has them."""
    tried = []
    for name, wheelhouse in wheel_sources(tmp_path):
        if wheelhouse is None:
            wheelhouse = tmp_path / "wheels"
            pinned = [f"{package}=={metadata.version(package)}" for package in SDK_DEPENDENCIES]
            download = run(sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest",
                           wheelhouse, *pinned)
            if download.returncode != 0:
                tried.append(f"{name}: {download.stderr.strip()[-300:]}")
                continue
        # The outer pip installs into the venv (--python): the venv itself needs no pip.
        install = run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-index",
                      "--find-links", wheelhouse, *SDK_DEPENDENCIES)
        if install.returncode == 0:
            return
        tried.append(f"{name}: {install.stderr.strip()[-300:]}")
    require_service("wheels of numpy, pyzmq and msgpack", "INFEROXY_REQUIRE_WHEELS",
                    "could not be installed (" + "; ".join(tried) + ")")


@pytest.fixture(scope="module")
def clean_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sdk")
    venv = root / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv)  # --system-site-packages stays off
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    install_sdk_dependencies(python, root)
    (root / "tiny_model.py").write_text(TINY_MODEL)
    return python


def clean_env(python: Path) -> dict[str, str]:
    """Only what a replica gets: the source tree (and the tiny model) on the path, nothing of this environment."""
    keep = {name: value for name, value in os.environ.items() if name in ("PATH", "HOME", "LANG", "TMPDIR")}
    return {**keep, "PYTHONPATH": f"{REPO}{os.pathsep}{python.parent.parent.parent}", "PYTHONNOUSERSITE": "1"}


def test_the_clean_environment_has_only_the_three_packages(clean_python: Path) -> None:
    # The venv alone, away from the source tree (on the path or as the working directory):
    # a checkout that was `pip install -e`d holds inferoxy.egg-info.
    venv_only = {name: value for name, value in clean_env(clean_python).items() if name != "PYTHONPATH"}
    listed = run(clean_python, "-c", "import importlib.metadata as m; print(sorted(d.metadata['Name'].lower() "
                                     "for d in m.distributions()))", env=venv_only, cwd=clean_python.parent)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == str(sorted(SDK_DEPENDENCIES))
    for absent in ("msgspec", "pydantic"):
        found = run(clean_python, "-c", f"import {absent}", env=clean_env(clean_python))
        assert found.returncode != 0, f"{absent} must not be importable in the clean environment"


def test_the_sdk_imports_with_numpy_pyzmq_and_msgpack_only(clean_python: Path) -> None:
    done = run(clean_python, "-c", textwrap.dedent(IMPORTS), env=clean_env(clean_python), cwd=clean_python.parent)
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) <= ALLOWED_TOP_LEVEL, done.stdout


def test_a_tiny_model_serves_a_batch_through_the_runtime_entry_point(clean_python: Path) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    replica_id = "sdk-tiny-1-0-abcdef"
    ctx: zmq.Context[Any] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(url)
    env = {**clean_env(clean_python), "INFEROXY_REPLICA_URL": url, "INFEROXY_REPLICA_ID": replica_id,
           "INFEROXY_MODEL_CLASS": "tiny_model:Double", "INFEROXY_MODEL_NAME": "tiny",
           "INFEROXY_HEARTBEAT_INTERVAL_S": "1", "INFEROXY_HEARTBEAT_LIVENESS": "60"}
    replica = subprocess.Popen([str(clean_python), "-m", "inferoxy.runtime"], env=env, cwd=clean_python.parent,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def receive(kind: type[m.Message]) -> tuple[m.Message, list[Any]]:
            while True:
                assert router.poll(60_000), f"no {kind.__name__} from the replica within 60 s"
                identity, header, *frames = router.recv_multipart()
                assert identity == replica_id.encode()
                route = None
                if envelope.is_envelope(header):  # an answer, behind the envelope of the batch it answers
                    route = envelope.unpack(header)
                    header, *frames = frames
                message = m.REPLICA_TO_TASK_MANAGER.decode(header)
                assert (route is not None) == isinstance(message, (m.Result, m.Failed)), message
                assert route is None or route == (message.replica, message.batch), (route, message)
                if isinstance(message, kind):
                    return message, frames

        ready, _ = receive(m.Ready)
        assert ready == m.Ready(replica=replica_id, model="tiny", version="1", capacity=DOUBLE_CAPACITY,
                               pid=replica.pid)
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        batch = m.Batch(replica=replica_id, batch=1, model="tiny", version="1",
                        items=[m.BatchItem(id=1, n=1), m.BatchItem(id=2, n=1)],
                        tensors=[wire.tensor_meta("x", x[:1]), wire.tensor_meta("x", x[1:])])
        router.send_multipart([replica_id.encode(), envelope.pack(replica_id, 1), m.encode(batch), x[:1].tobytes(),
                               x[1:].tobytes()])
        result, frames = receive(m.Result)
        assert isinstance(result, m.Result) and result.batch == 1 and result.items == [m.ResultItem(1)] * 2
        outputs = [wire.as_array(meta, frame) for meta, frame in zip(result.tensors, frames, strict=True)]
        np.testing.assert_array_equal(np.concatenate(outputs), x * 2)
        router.send_multipart([replica_id.encode(), m.encode(m.Stop())])
        assert replica.wait(timeout=60) == 0
    finally:
        if replica.poll() is None:
            replica.kill()
            replica.wait()
        router.close()
        ctx.term()
    output = replica.stdout.read() if replica.stdout else ""
    assert "Traceback" not in output, output
