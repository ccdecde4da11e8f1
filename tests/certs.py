"""A throwaway CA, server and client certificates for TLS tests (generated, never committed)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, issuer: x509.Name, issuer_key, key, *, ca: bool = False, usage=None, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(out: Path) -> Pki:
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("loraserve test CA", _name("loraserve test CA"), ca_key, ca_key, ca=True)
    files = {"ca": ca}
    for role, usage, sans in (
            ("server", ExtendedKeyUsageOID.SERVER_AUTH,
             (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))),
            ("client", ExtendedKeyUsageOID.CLIENT_AUTH, ())):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{role}_cert"] = _issue(f"loraserve test {role}", ca.subject, ca_key, key, usage=usage, sans=sans)
        (out / f"{role}_key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    for name, cert in files.items():
        (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Pki(out / "ca.pem", out / "server_cert.pem", out / "server_key.pem", out / "client_cert.pem",
               out / "client_key.pem")
