"""TLS between clients and a job's node servers, pinned to the job's own certificate.

At submit, each job gets a key pair and a self-signed certificate (kept 0600 in its
job folder beside the token). Its node servers serve HTTPS with them; a client
trusts that one certificate and nothing else (no CA, and no host name check: nodes
have many names, and the pin is what proves identity). So a client learns that it
talks to the job's own server before the bearer token leaves it: whatever listens on
a dead server's port (a co-tenant's process, say) fails the handshake and never sees
the token.

Making a certificate needs `cryptography` (on the login node, at submit); serving
and pinning need only the standard library's `ssl`.
"""
from __future__ import annotations

import datetime
import functools
import os
import ssl
from pathlib import Path

# A pinned self-signed certificate is its own trust anchor, and OpenSSL checks its
# dates: valid from a day back (clock skew between login and compute nodes) for
# longer than any job runs.
VALID_DAYS = 3650


def make_self_signed(common_name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for one job: an EC P-256 key (fast handshakes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


@functools.lru_cache(maxsize=256)
def pinned_context(cert_pem: str) -> ssl.SSLContext:
    """A client context that trusts exactly this certificate (built once per job:
    loading a trust store costs far more than a request)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the pin proves identity; nodes answer to many names
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=cert_pem)
    return context


def system_context() -> ssl.SSLContext:
    """A client context that trusts the system's CAs and checks the host name: for a
    server whose certificate a public CA vouches for (a cloud tunnel's). OpenSSL's
    SSL_CERT_FILE/SSL_CERT_DIR are honoured as they are when this is called."""
    return _system_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.lru_cache(maxsize=8)
def _system_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
