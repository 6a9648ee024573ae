"""TLS misconfiguration said in one sentence: the server checks its files before binding, the client
its own files before connecting, and a failed handshake names its likely cause without retrying."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from services.client import ClientTLS, GrpcRewardClient, RetryPolicy, RewardError
from services.core.server import RewardServer, ServerConfig, TLSConfig
from services.core.tls import TLSFileError
from tests.conftest import MeanPixelScorer
from tests.test_security import _cert, _key, _write

ROOT = Path(__file__).resolve().parents[1]


def _server_cert(key, ca_key, *, names: list[x509.GeneralName], days: tuple[int, int] = (-1, 1)):
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tls")
    ca_key, other_key, server_key = _key(), _key(), _key()
    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    paths: dict[str, Path] = {}
    paths["ca"], _ = _write(root / "ca", _cert("test-ca", ca_key, "test-ca", ca_key, ca=True), ca_key)
    paths["other_ca"], _ = _write(
        root / "other", _cert("other", other_key, "other", other_key, ca=True), other_key
    )
    paths["cert"], paths["key"] = _write(
        root / "server", _server_cert(server_key, ca_key, names=loopback), server_key
    )
    paths["expired"], _ = _write(
        root / "expired", _server_cert(server_key, ca_key, names=loopback, days=(-3, -1)), server_key
    )
    paths["wrong_name"], _ = _write(
        root / "wrong-name", _server_cert(server_key, ca_key, names=[x509.DNSName("example.com")]), server_key
    )
    _, paths["other_key"] = _write(
        root / "unrelated", _cert("x", other_key, "x", other_key, ca=False), other_key
    )
    paths["garbage"] = root / "garbage.pem"
    paths["garbage"].write_text("this is not a certificate\n")
    paths["empty"] = root / "empty.pem"
    paths["empty"].write_text("")
    return paths


SERVER_CASES = {
    "garbage certificate": (("garbage", "key", None), "server certificate {garbage}: not a PEM certificate"),
    "empty certificate": (("empty", "key", None), "server certificate {empty}: the file is empty"),
    "missing certificate": (("missing", "key", None), "server certificate {missing}: cannot be read"),
    "key of another certificate": (("cert", "other_key", None), "server key {other_key}: does not match"),
    "cert and key swapped": (("key", "cert", None), "server certificate {key}: holds a private key"),
    "expired certificate": (("expired", "key", None), "server certificate {expired}: expired on"),
    "garbage client CA": (("cert", "key", "garbage"), "client CA {garbage}: not a PEM certificate"),
}


@pytest.mark.parametrize("case", sorted(SERVER_CASES))
def test_the_server_names_the_bad_tls_file_before_binding(case: str, files: dict[str, Path]) -> None:
    (cert, key, client_ca), message = SERVER_CASES[case]
    paths = {**files, "missing": files["ca"].with_name("missing.pem")}
    tls = TLSConfig(cert=paths[cert], key=paths[key], client_ca=paths[client_ca] if client_ca else None)
    server = RewardServer(MeanPixelScorer, "meanpixel", ServerConfig(port=0, tls=tls))
    with pytest.raises(TLSFileError) as info:
        asyncio.run(server.start())
    assert str(info.value).startswith(message.format(**paths)), str(info.value)


def test_serve_ends_a_tls_mistake_with_one_sentence(files: dict[str, Path]) -> None:
    cmd = [sys.executable, "-m", "services.serve", "compressibility", "--port", "0",
           "--tls-cert", str(files["key"]), "--tls-key", str(files["cert"])]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: server certificate {files['key']}: holds a private key, not a certificate (files swapped?)"
    ]


async def _serve_raw(cert: Path | None, key: Path) -> tuple[grpc.aio.Server, int]:
    """A bare gRPC server (health only) with these files as given: the cases our server refuses."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    if cert is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, port


CLIENT_CASES = {
    "expired server certificate": ("expired", "ca", "the server's certificate has expired"),
    "certificate for another name": ("wrong_name", "ca", "does not name the host connected to"),
    "CA that did not sign it": ("cert", "other_ca", "not signed by the trusted CA"),
    "TLS client, plaintext server": (None, "ca", "the server speaks plaintext, not TLS"),
}


@pytest.mark.parametrize("case", sorted(CLIENT_CASES))
def test_a_failed_handshake_names_its_cause_at_once(case: str, files: dict[str, Path]) -> None:
    cert, ca, cause = CLIENT_CASES[case]

    async def main() -> None:
        server, port = await _serve_raw(files[cert] if cert else None, files["key"])
        try:
            started = time.perf_counter()
            async with GrpcRewardClient(
                f"127.0.0.1:{port}", tls=ClientTLS(ca=files[ca]), timeout_s=30
            ) as client:
                with pytest.raises(RewardError) as info:
                    await client.score(np.zeros((1, 4, 4, 3), np.uint8), "p")
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert (
                info.value.message
                == f"TLS handshake with 127.0.0.1:{port} failed: "
                + info.value.message.split("failed: ", 1)[1]
            )
            assert cause in info.value.message, info.value.message
            assert time.perf_counter() - started < 10  # not retried: no retry can fix a certificate
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_a_plaintext_client_to_a_tls_server_is_told_to_pass_the_ca(files: dict[str, Path]) -> None:
    async def main() -> None:
        server, port = await _serve_raw(files["cert"], files["key"])
        try:
            retry = RetryPolicy(max_attempts=2, initial_backoff_s=0.01)
            async with GrpcRewardClient(f"127.0.0.1:{port}", timeout_s=30, retry=retry) as client:
                with pytest.raises(RewardError) as info:
                    await client.score(np.zeros((1, 4, 4, 3), np.uint8), "p")
            assert "if it serves TLS, pass its CA" in info.value.message, info.value.message
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_the_client_checks_its_own_files(files: dict[str, Path]) -> None:
    with pytest.raises(TLSFileError, match=re.escape(f"CA {files['garbage']}: not a PEM certificate")):
        ClientTLS(ca=files["garbage"]).credentials()
    with pytest.raises(TLSFileError, match=r"client key .* does not match the certificate"):
        ClientTLS(ca=files["ca"], cert=files["cert"], key=files["other_key"]).credentials()
    with pytest.raises(ValueError, match="go together"):
        ClientTLS(ca=files["ca"], cert=files["cert"])
