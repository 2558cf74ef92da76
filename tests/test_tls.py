"""TLS on the REST and gRPC bridges (issue 10, item 6), with certificates made here for 127.0.0.1.

The bridges run in-process against the fake batch manager (tests/bridge_harness.py); the clients are
the real tritonclient (HTTP and gRPC), httpx, grpcio and the `inferoxy models` CLI. What each test
tries: a client that trusts the CA gets answers; one that does not, or that speaks cleartext, gets
none; with a client CA set, a client without a certificate is refused by both bridges.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gevent.ssl
import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from bridges.proto import grpc_predict_v2_pb2 as pb
from inferoxy import admin_cli
from inferoxy.settings import Settings
from tests.bridge_harness import WAIT_S, BridgeStack
from tests.support import REPO
from tests.test_triton_clients import make_input


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting only it must fail


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey],
                 *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer[0]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer[1], hashes.SHA256())


def _write(path: Path, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, other_key, server_key, client_key = _key(), _key(), _key(), _key()
    ca = ("Inferoxy test CA", ca_key)
    _write(folder / "ca.pem", _certificate(ca[0], ca_key, ca, ca=True))
    _write(folder / "other-ca.pem", _certificate("Someone else", other_key, ("Someone else", other_key), ca=True))
    _write(folder / "server.pem", _certificate("127.0.0.1", server_key, ca, server=True), server_key)
    _write(folder / "client.pem", _certificate("a client", client_key, ca), client_key)
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
               folder / "client.key", folder / "other-ca.pem")


@pytest.fixture(scope="module")
def tls_stack(pki: Pki) -> Iterator[BridgeStack]:
    stack = BridgeStack(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key),
                        http_header_timeout_s=1.0).start()
    try:
        yield stack
    finally:
        stack.stop()


def https_url(stack: BridgeStack) -> str:
    return stack.rest_url.replace("http://", "https://")


ECHO_X = np.arange(6, dtype=np.float32).reshape(2, 3)


def echo_inputs(protocol: str) -> list[object]:
    return [make_input(protocol, "x", ECHO_X), make_input(protocol, "mask", np.ones((2, 2), bool))]


def test_tritonclient_http_over_https(tls_stack: BridgeStack, pki: Pki) -> None:
    client = httpclient.InferenceServerClient(
        tls_stack.rest_url.removeprefix("http://"), ssl=True, ssl_options={"ca_certs": str(pki.ca)},
        ssl_context_factory=gevent.ssl.create_default_context,
    )
    try:
        assert client.is_server_live() and client.is_server_ready()
        result = client.infer("echo", echo_inputs("http"))
        np.testing.assert_array_equal(result.as_numpy("x"), ECHO_X)
    finally:
        client.close()


def test_tritonclient_grpc_over_tls(tls_stack: BridgeStack, pki: Pki) -> None:
    client = grpcclient.InferenceServerClient(tls_stack.grpc_url, ssl=True, root_certificates=str(pki.ca))
    try:
        assert client.is_server_live() and client.is_server_ready()
        result = client.infer("echo", echo_inputs("grpc"))
        np.testing.assert_array_equal(result.as_numpy("x"), ECHO_X)
    finally:
        client.close()


def test_clients_that_do_not_trust_the_certificate_or_speak_cleartext_get_nothing(
    tls_stack: BridgeStack, pki: Pki
) -> None:
    # Bad input: a client trusting another CA (a man in the middle would look like this), and cleartext.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(https_url(tls_stack) + "/v2/health/live", verify=ssl.create_default_context(cafile=pki.other_ca))
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_stack.rest_url + "/v2/health/live", timeout=5)  # http:// to the TLS port: no answer
    plain = grpcclient.InferenceServerClient(tls_stack.grpc_url)
    try:
        with pytest.raises(Exception, match="UNAVAILABLE|unavailable|failed to connect"):
            plain.is_server_live(client_timeout=5)
    finally:
        plain.close()


def test_a_tls_connection_that_sends_no_request_is_closed(tls_stack: BridgeStack, pki: Pki) -> None:
    # Bad input: a client that completes the handshake and then sends nothing. The REST bridge's head
    # deadline (a custom uvicorn protocol) must hold over TLS too, or each such client holds a socket for ever.
    context = ssl.create_default_context(cafile=pki.ca)
    port = int(tls_stack.rest_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        try:
            closed = conn.recv(1024) == b""
        except (ssl.SSLError, ConnectionError):
            closed = True
        except TimeoutError:
            closed = False
    assert closed, "the bridge kept an idle TLS connection past its head deadline"


def test_the_admin_cli_talks_https_with_cacert(tls_stack: BridgeStack, pki: Pki) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFEROXY_")}

    def cli(*options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "inferoxy", "models", "--url", https_url(tls_stack), *options,
                               "list"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    listed = cli("--cacert", str(pki.ca))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split()[:2] == ["NAME", "VERSION"] and "echo" in listed.stdout
    unverified = cli()  # the system's CAs do not know this one
    assert unverified.returncode == admin_cli.UNREACHABLE, unverified.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in unverified.stderr
    env["INFEROXY_CA_FILE"] = str(pki.ca)
    assert cli().returncode == 0

    # `inferoxy keys` reaches the proxy the same way (the two commands share their connection options).
    keys = [sys.executable, "-m", "inferoxy", "keys", "--url", https_url(tls_stack)]
    listed_keys = subprocess.run([*keys, "--cacert", str(pki.ca), "list"], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=60)
    assert listed_keys.returncode == 0, listed_keys.stderr
    del env["INFEROXY_CA_FILE"]
    refused = subprocess.run([*keys, "list"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == admin_cli.UNREACHABLE and "CERTIFICATE_VERIFY_FAILED" in refused.stderr, refused.stderr


def test_a_client_ca_makes_both_bridges_require_a_client_certificate(pki: Pki) -> None:
    stack = BridgeStack(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key),
                        tls_client_ca_file=str(pki.ca)).start()
    try:
        trusting = ssl.create_default_context(cafile=pki.ca)
        # Bad input: a client with no certificate.
        with pytest.raises(httpx.HTTPError):
            httpx.get(https_url(stack) + "/v2/health/live", verify=trusting, timeout=5)
        with_cert = ssl.create_default_context(cafile=pki.ca)
        with_cert.load_cert_chain(pki.client_cert, pki.client_key)
        assert httpx.get(https_url(stack) + "/v2/health/live", verify=with_cert, timeout=5).status_code == 200

        def grpc_live(credentials: grpc.ChannelCredentials) -> bool:
            with grpc.secure_channel(stack.grpc_url, credentials) as channel:
                call = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                           request_serializer=pb.ServerLiveRequest.SerializeToString,
                                           response_deserializer=pb.ServerLiveResponse.FromString)
                return bool(call(pb.ServerLiveRequest(), timeout=5).live)

        with pytest.raises(grpc.RpcError) as refused:
            grpc_live(grpc.ssl_channel_credentials(pki.ca.read_bytes()))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert grpc_live(grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.client_key.read_bytes(),
                                                      pki.client_cert.read_bytes()))

        # The CLI presents its certificate with --cert/--cert-key; without one it is refused (unreachable).
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFEROXY_")}
        base = [sys.executable, "-m", "inferoxy", "models", "--url", https_url(stack), "--cacert", str(pki.ca)]
        with_client_cert = subprocess.run([*base, "--cert", str(pki.client_cert), "--cert-key", str(pki.client_key),
                                           "list"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert with_client_cert.returncode == 0, with_client_cert.stderr
        without = subprocess.run([*base, "list"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert without.returncode == admin_cli.UNREACHABLE, without.stderr
    finally:
        stack.stop()


def test_tls_settings_come_in_pairs(pki: Pki) -> None:
    # Bad input: a certificate without its key, and a client CA without TLS.
    with pytest.raises(ValidationError, match="INFEROXY_TLS_KEY_FILE"):
        Settings(tls_cert_file=str(pki.server_cert))
    with pytest.raises(ValidationError, match="INFEROXY_TLS_CERT_FILE"):
        Settings(tls_client_ca_file=str(pki.ca))
