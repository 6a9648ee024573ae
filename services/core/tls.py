"""TLS files checked before they are used, each problem said in one sentence naming the file.

gRPC takes PEM bytes as they are: a garbage certificate, a key that does not match it, swapped files
or a bad CA all end in ``RuntimeError: Failed to bind to address`` on the server, and in
``UNAVAILABLE: failed to connect to all addresses`` on a client. Reading them with ``cryptography``
first turns each into its cause: unreadable, not PEM, the other kind of file, not matching, expired.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

_KEY_MARKERS = (b"PRIVATE KEY-----",)


class TLSFileError(ValueError):
    """A TLS file cannot be used; the message names the file and the problem."""


def _read(path: Path, role: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSFileError(f"{role} {path}: cannot be read ({exc.strerror or exc})") from None
    if not data.strip():
        raise TLSFileError(f"{role} {path}: the file is empty")
    return data


def load_certificates(path: Path, role: str) -> tuple[bytes, list[x509.Certificate]]:
    """A PEM file of one or more certificates: its bytes and the parsed chain (leaf first)."""
    data = _read(path, role)
    if any(marker in data for marker in _KEY_MARKERS) and b"CERTIFICATE-----" not in data:
        raise TLSFileError(f"{role} {path}: holds a private key, not a certificate (files swapped?)")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSFileError(f"{role} {path}: not a PEM certificate ('-----BEGIN CERTIFICATE-----')") from None
    return data, chain


def load_private_key(path: Path, role: str) -> tuple[bytes, object]:
    """An unencrypted PEM private key: its bytes and the parsed key."""
    data = _read(path, role)
    if b"CERTIFICATE-----" in data and not any(marker in data for marker in _KEY_MARKERS):
        raise TLSFileError(f"{role} {path}: holds a certificate, not a private key (files swapped?)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSFileError(f"{role} {path}: the key is encrypted; gRPC needs it unencrypted") from None
    except ValueError:
        raise TLSFileError(f"{role} {path}: not a PEM private key") from None
    return data, key


def check_validity(cert: x509.Certificate, path: Path, role: str) -> None:
    """Refuse a certificate outside its validity period (clients would refuse it at every handshake)."""
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        raise TLSFileError(f"{role} {path}: expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > now:
        raise TLSFileError(f"{role} {path}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


def load_key_pair(cert_path: Path, key_path: Path, role: str) -> tuple[bytes, bytes]:
    """(key PEM, certificate chain PEM) of a matching, currently valid pair."""
    cert_pem, chain = load_certificates(cert_path, f"{role} certificate")
    key_pem, key = load_private_key(key_path, f"{role} key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    leaf_public = chain[0].public_key().public_bytes(serialization.Encoding.DER, spki)
    key_public = key.public_key().public_bytes(serialization.Encoding.DER, spki)  # type: ignore[attr-defined]
    if leaf_public != key_public:
        raise TLSFileError(f"{role} key {key_path}: does not match the certificate {cert_path}")
    check_validity(chain[0], cert_path, f"{role} certificate")
    return key_pem, cert_pem


def load_ca(path: Path, role: str) -> bytes:
    """PEM bytes of a CA bundle, every certificate in it parsed."""
    data, _ = load_certificates(path, role)
    return data


_HANDSHAKE_CAUSES = (
    ("certificate has expired", "the server's certificate has expired"),
    ("certificate is not yet valid", "the server's certificate is not valid yet (check both clocks)"),
    (
        "Hostname Verification Check failed",
        "the server's certificate does not name the host connected to (connect by a name it lists)",
    ),
    (
        "unable to get local issuer certificate",
        "the server's certificate is not signed by the trusted CA (--tls-ca)",
    ),
    ("self signed certificate", "the server's certificate is not signed by the trusted CA (--tls-ca)"),
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the server's certificate failed verification against the trusted CA (--tls-ca)",
    ),
    ("WRONG_VERSION_NUMBER", "the server speaks plaintext, not TLS (connect without --tls-ca)"),
    ("CERTIFICATE_REQUIRED", "the server requires a client certificate (mTLS: --tls-cert and --tls-key)"),
    ("TLSV1_ALERT_UNKNOWN_CA", "the server does not trust the client certificate's CA (mTLS)"),
    ("SSLV3_ALERT_BAD_CERTIFICATE", "the server refused the client certificate (mTLS)"),
)


def handshake_failure(details: str) -> str | None:
    """The cause of a TLS handshake failure in an UNAVAILABLE status's details, as a sentence; None
    when the details show no certificate problem (a server down or restarting, which retrying fixes)."""
    for marker, cause in _HANDSHAKE_CAUSES:
        if marker in details:
            return cause
    return None
