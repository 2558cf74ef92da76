from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from inferoxy.settings import Settings
from tests.support import REPO


def test_env_example_lists_every_setting_with_its_default() -> None:
    text = (REPO / ".env.example").read_text()
    listed = dict(re.findall(r"^#? ?INFEROXY_([A-Z_]+)=(.*)$", text, flags=re.M))
    for name, field in Settings.model_fields.items():
        assert name.upper() in listed, f"INFEROXY_{name.upper()} is missing from .env.example"
        default = "" if field.default is None else str(field.default)
        assert listed[name.upper()] == default, f"INFEROXY_{name.upper()}: .env.example says {listed[name.upper()]!r}"


def test_yaml_file_then_environment(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "inferoxy.yaml"
    config.write_text("rest_port: 9000\nzmq_port: 9001\nruntime: docker\n")
    monkeypatch.setenv("INFEROXY_CONFIG", str(config))
    monkeypatch.setenv("INFEROXY_ZMQ_PORT", "9100")
    settings = Settings()
    assert (settings.rest_port, settings.zmq_port, settings.runtime) == (9000, 9100, "docker")


def test_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFEROXY_CONFIG", "/nonexistent/inferoxy.yaml")
    with pytest.raises(FileNotFoundError, match="/nonexistent/inferoxy.yaml"):
        Settings()


def test_replicas_cannot_use_inproc() -> None:
    # Replicas are always other processes, which an inproc:// endpoint cannot reach.
    with pytest.raises(ValidationError, match="inproc"):
        Settings(replica_bind_url="inproc://replicas")


def test_bad_runtime_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFEROXY_RUNTIME", "vmware")
    with pytest.raises(ValidationError, match="runtime"):
        Settings()
