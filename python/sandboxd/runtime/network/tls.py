"""The runtime's egress CA: what lets the egress proxy add headers to a sandbox's HTTPS requests.

For a host with header rules, the egress proxy terminates the sandbox's TLS itself, with a
certificate for that host signed by this CA, and opens its own verified TLS connection to the real
host. Sandboxes trust the CA because the runtime installs its certificate in each sandbox's trust
store (``caBundle`` of envd's ``/init``, as E2B's orchestrator does). The private key stays in the
data dir (mode 0600) and in the network helper's memory; nothing of it enters a sandbox, and neither
do the header values, which the proxy adds on the host.

The CA is made once per data dir (ECDSA P-256, 10 years, ``pathLenConstraint=0``: it can sign leaf
certificates only). Leaf certificates are made on demand, one per host name, cached in memory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=30)
"""Leaves live in memory only; a month outlasts any sandbox the proxy serves, and they are remade
after a helper restart anyway."""

BACKDATE = datetime.timedelta(hours=1)
"""Certificates start an hour in the past, so a sandbox whose clock lags a little accepts them."""

LEAF_CACHE = 256
"""Leaf contexts kept (one per host name with header rules that sandboxes used recently)."""


def ensure_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """The CA's certificate and key files in ``directory``, made on first use."""
    cert_path, key_path = directory / "egress-ca.pem", directory / "egress-ca.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


class LeafContexts:
    """Server-side TLS contexts for host names, with leaves signed by the CA."""

    def __init__(self, cert_path: Path, key_path: Path, scratch: Path) -> None:
        self._ca = x509.load_pem_x509_certificate(cert_path.read_bytes())
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: the egress CA key must be an EC key")
        self._ca_key = loaded
        self._scratch = scratch
        scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._cache: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    def context_for(self, host: str) -> ssl.SSLContext:
        context = self._cache.get(host)
        if context is not None:
            self._cache.move_to_end(host)
            return context
        context = self._make(host)
        self._cache[host] = context
        if len(self._cache) > LEAF_CACHE:
            self._cache.popitem(last=False)
        return context

    def _make(self, host: str) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self._ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + LEAF_VALIDITY)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()), critical=False
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])  # the proxy rewrites HTTP/1.1 requests only
        # ssl loads chains from files only: a private scratch file, removed at once.
        with tempfile.NamedTemporaryFile(dir=self._scratch, suffix=".pem") as f:
            f.write(pem)
            f.flush()
            context.load_cert_chain(f.name)
        return context


def upstream_context(extra_trust: Path | None) -> ssl.SSLContext:
    """How the proxy verifies the real hosts: the host's trust store, plus ``--egress-trust``."""
    context = ssl.create_default_context()
    if extra_trust is not None:
        context.load_verify_locations(cafile=str(extra_trust))
    context.set_alpn_protocols(["http/1.1"])
    return context
