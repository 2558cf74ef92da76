"""What a new operator meets first: .env.example, the models file, and where the registry lives.

Each test plays one trap found by following docs/DOCKER.md as a new user.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from inferoxy.settings import Settings
from model_manager.models_file import ModelsFileError, models_file_to_seed
from tests.support import REPO, ProxyProcess

IN_MEMORY_WARNING = "the embedded Redis keeps the model registry in memory"


def active_env_lines(path: Path) -> dict[str, str]:
    """What ``docker run --env-file`` sets from a file: every non-blank line not starting with #."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return {name: value for name, value in pairs}


def image_env(dockerfile: Path) -> set[str]:
    """The variables a Dockerfile's ENV instructions set (``ENV A=1 \\`` continued lines included)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    names: set[str] = set()
    for instruction in re.findall(r"^ENV\s+(.*)$", text, flags=re.M):
        names.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", instruction))
    return names


def test_a_copy_of_env_example_overrides_nothing_the_proxy_image_sets() -> None:
    # The trap: `cp .env.example .env; docker run --env-file .env inferoxy/proxy` used to set runtime=process
    # and a relative models file over the image's own, so the container served nothing.
    set_by_image = image_env(REPO / "docker/Dockerfile")
    assert {"INFEROXY_RUNTIME", "INFEROXY_MODELS_FILE"} <= set_by_image
    overridden = set_by_image & active_env_lines(REPO / ".env.example").keys()
    assert not overridden, f".env.example overrides what the image sets: {sorted(overridden)}"


def test_a_configured_models_file_that_is_missing_is_an_error(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere" / "models.yaml"
    monkeypatch.setenv("INFEROXY_MODELS_FILE", str(missing))
    with pytest.raises(ModelsFileError, match=re.escape(str(missing))):
        models_file_to_seed(Settings())
    # Unset, the default models.yaml is optional: a fresh directory without one starts empty.
    monkeypatch.delenv("INFEROXY_MODELS_FILE")
    monkeypatch.chdir(tmp_path)
    assert models_file_to_seed(Settings()) is None
    (tmp_path / "models.yaml").write_text("models: {}\n")
    assert models_file_to_seed(Settings()) == Path("models.yaml")
    monkeypatch.setenv("INFEROXY_MODELS_FILE", "")  # explicitly none
    assert models_file_to_seed(Settings()) is None


def test_serve_refuses_to_start_with_a_missing_models_file(tmp_path: Path) -> None:
    # The trap: a models file path that is not there (a mount forgotten, a typo) used to be a warning, and the
    # proxy came up serving nothing.
    missing = tmp_path / "models.yaml"
    proxy = ProxyProcess(env={"INFEROXY_MODELS_FILE": str(missing), "INFEROXY_BRIDGES": "rest"})
    try:
        with pytest.raises(AssertionError, match="exited before printing"):
            proxy.start(timeout=60)
        assert proxy.process is not None and proxy.process.wait(timeout=30) != 0
        assert str(missing) in proxy.log() and "INFEROXY_MODELS_FILE" in proxy.log(), proxy.log()
    finally:
        if proxy.process is not None and proxy.process.poll() is None:
            proxy.stop()


def test_serve_without_a_models_file_starts_and_warns_that_the_embedded_registry_is_in_memory(
    tmp_path: Path,
) -> None:
    # A fresh directory with no models.yaml and nothing configured: it serves (empty), and says that what the
    # admin API adds is lost at the next start unless INFEROXY_REDIS_URL names a real Redis.
    proxy = ProxyProcess(env={"INFEROXY_BRIDGES": "rest", "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    del proxy.env["INFEROXY_MODELS_FILE"]
    proxy.env.pop("INFEROXY_REDIS_URL", None)
    with proxy:
        assert IN_MEMORY_WARNING in proxy.log() and "INFEROXY_REDIS_URL" in proxy.log(), proxy.log()


def test_serve_with_a_real_redis_does_not_warn(real_redis_url: str, redis_prefix: str) -> None:
    env = {"INFEROXY_BRIDGES": "rest", "INFEROXY_MODELS_FILE": "", "INFEROXY_REDIS_URL": real_redis_url,
           "INFEROXY_REDIS_PREFIX": redis_prefix}
    with ProxyProcess(env=env) as proxy:
        assert IN_MEMORY_WARNING not in proxy.log()
