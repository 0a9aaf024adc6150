"""Certificates for the DOUBLE's tunnels: one CA per state dir, and one server certificate
(IP 127.0.0.1, DNS localhost) signed by it, which every sandbox's TLS proxy presents.

Modal's edge presents a certificate that the system's CAs trust; here a test trusts the
double's CA instead, by pointing `SSL_CERT_FILE` (or `cafile=`) at `bundle.pem`. Several
processes may share a state dir, so the files are made once, under a lock."""
from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LIFETIME = datetime.timedelta(days=7)  # a test run is far shorter; a short life limits a leaked key


def paths(state_dir: Path) -> dict[str, Path]:
    folder = Path(state_dir) / "tls"
    return {"folder": folder, "ca": folder / "ca.pem", "bundle": folder / "bundle.pem",
            "cert": folder / "server.pem", "key": folder / "server.key"}


def ensure(state_dir: Path) -> dict[str, Path]:
    """Make the CA, the server certificate and the bundle if this state dir has none yet."""
    files = paths(state_dir)
    files["folder"].mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(files["folder"] / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not files["bundle"].exists():
            _make(files)
    return files


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _make(files: dict[str, Path]) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + LIFETIME

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Modal double test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    ca_pem = ca.public_bytes(pem)
    _write(files["key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), 0o600)
    _write(files["cert"], cert.public_bytes(pem))
    _write(files["ca"], ca_pem)
    # The bundle is the double's CA plus the system's, so that SSL_CERT_FILE=bundle.pem
    # adds trust in the tunnels without taking it from anything else the process talks to.
    system = ssl.get_default_verify_paths().cafile
    extra = Path(system).read_bytes() if system and Path(system).is_file() else b""
    _write(files["bundle"], ca_pem + b"\n" + extra)  # last: its presence means "all made"
