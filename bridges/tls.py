"""TLS for the REST and gRPC bridges, from PEM files named by the settings (docs/SECURITY.md).

Both bridges read the same certificate and key; with ``tls_client_ca_file`` set, both require
a client certificate signed by that CA (mutual TLS). The files are read when a bridge starts,
so a missing or unreadable one stops it with a message naming the file and the setting.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import grpc

from inferoxy.settings import Settings


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read {setting}={path}: {exc.strerror or exc}") from None


def uvicorn_tls_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config's ssl_* arguments: none without TLS."""
    if not settings.tls:
        return {}
    assert settings.tls_cert_file and settings.tls_key_file  # the settings refuse one without the other
    # Read once here, so a bad path is this message and not a traceback from deep inside uvicorn.
    _read(settings.tls_cert_file, "INFEROXY_TLS_CERT_FILE")
    _read(settings.tls_key_file, "INFEROXY_TLS_KEY_FILE")
    options: dict[str, Any] = {"ssl_certfile": settings.tls_cert_file, "ssl_keyfile": settings.tls_key_file}
    if settings.tls_client_ca_file:
        _read(settings.tls_client_ca_file, "INFEROXY_TLS_CLIENT_CA_FILE")
        options |= {"ssl_ca_certs": settings.tls_client_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def grpc_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for ``add_secure_port``; None without TLS."""
    if not settings.tls:
        return None
    assert settings.tls_cert_file and settings.tls_key_file
    chain = _read(settings.tls_cert_file, "INFEROXY_TLS_CERT_FILE")
    key = _read(settings.tls_key_file, "INFEROXY_TLS_KEY_FILE")
    client_ca = (_read(settings.tls_client_ca_file, "INFEROXY_TLS_CLIENT_CA_FILE")
                 if settings.tls_client_ca_file else None)
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)
