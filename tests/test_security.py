"""Bearer tokens, TLS and mTLS with certificates generated in the test."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import ClientTLS, GrpcRewardClient, RewardError
from services.core.auth import TokenAuthenticator
from services.core.server import ServerConfig, TLSConfig
from tests.conftest import MeanPixelScorer, running_server, solid_images

TOKEN_A = "token-of-team-a-0123456789abcdef"
TOKEN_B = "token-of-team-b-fedcba9876543210"


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _write_token_file(path: Path) -> Path:
    path.write_text(f"# name:token[:models]\nteam-a:{TOKEN_A}\n\nteam-b:{TOKEN_B}:pickscore,geneval\n")
    return path


async def _score(port: int, **client_kw) -> object:
    async with GrpcRewardClient(f"127.0.0.1:{port}", timeout_s=10, **client_kw) as client:
        return await client.score(solid_images([7]), "p")


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("wrong-token-0123456789abcdef0000", grpc.StatusCode.UNAUTHENTICATED),
        (TOKEN_A[:-1], grpc.StatusCode.UNAUTHENTICATED),
        (TOKEN_B, grpc.StatusCode.PERMISSION_DENIED),  # valid, but restricted to other models
    ],
)
def test_tokens_are_enforced(tmp_path: Path, token: str | None, code: grpc.StatusCode) -> None:
    async def main() -> None:
        config = ServerConfig(port=0, token_file=_write_token_file(tmp_path / "tokens"))
        async with running_server(MeanPixelScorer(), config) as server:
            with pytest.raises(RewardError) as info:
                await _score(server.port, token=token)
            assert info.value.code == code
            assert TOKEN_A not in str(info.value) and TOKEN_B not in str(info.value)
            scores = await _score(server.port, token=TOKEN_A)
            assert scores.values["meanpixel"].tolist() == pytest.approx([7 / 255])
            # Health stays reachable without a token (probes carry none).
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

    run(main())


def test_token_file_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("just-a-token\n")
    with pytest.raises(ValueError, match="expected 'name:token'"):
        TokenAuthenticator.from_file(bad)
    with pytest.raises(ValueError, match="at least 16"):
        TokenAuthenticator([("team", "short", None)])
    with pytest.raises(ValueError, match="duplicate"):
        TokenAuthenticator([("a", TOKEN_A, None), ("b", TOKEN_A, None)])


# -- TLS -------------------------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str, key, issuer_name: str, issuer_key, *, ca: bool, server: bool = False
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key) -> tuple[Path, Path]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, a client signed by the CA and one signed by a stranger."""
    root = tmp_path_factory.mktemp("pki")
    ca_key, rogue_key = _key(), _key()
    ca = _cert("test-ca", ca_key, "test-ca", ca_key, ca=True)
    server_key, client_key, rogue_client_key = _key(), _key(), _key()
    paths = {}
    paths["ca"], _ = _write(root / "ca", ca, ca_key)
    paths["server_cert"], paths["server_key"] = _write(
        root / "server", _cert("127.0.0.1", server_key, "test-ca", ca_key, ca=False, server=True), server_key
    )
    paths["client_cert"], paths["client_key"] = _write(
        root / "client", _cert("trainer", client_key, "test-ca", ca_key, ca=False), client_key
    )
    paths["rogue_cert"], paths["rogue_key"] = _write(
        root / "rogue", _cert("intruder", rogue_client_key, "rogue-ca", rogue_key, ca=False), rogue_client_key
    )
    return paths


def test_tls_server_serves_tls_and_refuses_plaintext(pki: dict[str, Path]) -> None:
    async def main() -> None:
        config = ServerConfig(port=0, tls=TLSConfig(cert=pki["server_cert"], key=pki["server_key"]))
        async with running_server(MeanPixelScorer(), config) as server:
            scores = await _score(server.port, tls=ClientTLS(ca=pki["ca"]))
            assert scores.values["meanpixel"].tolist() == pytest.approx([7 / 255])
            with pytest.raises(RewardError) as info:
                await _score(server.port, retry=_no_retry())
            assert info.value.code == grpc.StatusCode.UNAVAILABLE

    run(main())


def test_mtls_requires_a_client_certificate_from_the_trusted_ca(pki: dict[str, Path]) -> None:
    async def main() -> None:
        tls = TLSConfig(cert=pki["server_cert"], key=pki["server_key"], client_ca=pki["ca"])
        async with running_server(MeanPixelScorer(), ServerConfig(port=0, tls=tls)) as server:
            good = ClientTLS(ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"])
            scores = await _score(server.port, tls=good)
            assert scores.values["meanpixel"].tolist() == pytest.approx([7 / 255])
            for refused in (
                ClientTLS(ca=pki["ca"]),  # no client certificate
                ClientTLS(ca=pki["ca"], cert=pki["rogue_cert"], key=pki["rogue_key"]),  # untrusted issuer
            ):
                with pytest.raises(RewardError) as info:
                    await _score(server.port, tls=refused, retry=_no_retry())
                assert info.value.code == grpc.StatusCode.UNAVAILABLE

    run(main())


def _no_retry():
    from services.client import RetryPolicy

    return RetryPolicy(max_attempts=1)
