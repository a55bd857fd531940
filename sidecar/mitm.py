"""The interception CA: load or generate it, and mint a leaf certificate per upstream host.

Only hosts that are configured upstreams are ever intercepted, so only their
names are ever signed. A generated CA's key lives in memory and in a private
temporary folder that is removed at exit; only its certificate is written to
``ca_cert_out`` for the app to trust (``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE``).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import shutil
import ssl
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("sidecar.mitm")

#: Leaf certificates are valid this long and re-minted a day before they expire.
LEAF_VALIDITY = datetime.timedelta(days=7)
LEAF_RENEW_BEFORE = datetime.timedelta(days=1)
#: A generated CA outlives any sensible pod.
CA_VALIDITY = datetime.timedelta(days=365)
MAX_CACHED_LEAVES = 1024


class MitmError(Exception):
    """The CA could not be loaded, generated or written."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class CertificateAuthority:
    """Signs leaf certificates for intercepted hosts; ``context_for`` is what the proxy uses."""

    def __init__(
        self,
        ca_cert: Path | None = None,
        ca_key: Path | None = None,
        ca_cert_out: Path | None = None,
    ) -> None:
        if ca_cert is not None and ca_key is not None:
            try:
                self.cert = x509.load_pem_x509_certificate(ca_cert.read_bytes())
                key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
            except (OSError, ValueError, TypeError) as exc:
                raise MitmError(f"cannot load the interception CA: {type(exc).__name__}") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
                raise MitmError("the interception CA key must be an EC or RSA key")
            self.key: CertificateIssuerPrivateKeyTypes = key
            self.generated = False
        else:
            self.key, self.cert = _generate_ca()
            self.generated = True
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        if ca_cert_out is not None:
            try:
                ca_cert_out.parent.mkdir(parents=True, exist_ok=True)
                # SSL_CERT_FILE replaces the app's whole trust store: without the public
                # roots next to ours, passthrough hosts would stop verifying.
                ca_cert_out.write_bytes(self.cert_pem + b"\n" + system_roots())
            except OSError as exc:
                raise MitmError(f"cannot write ca_cert_out {ca_cert_out}: {exc.strerror}") from None
        # One key for all leaves: minting a certificate is then a signature, not a keygen.
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._dir = Path(tempfile.mkdtemp(prefix="sidecar-mitm-"))
        os.chmod(self._dir, 0o700)
        key_path = self._dir / "leaf.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                self._leaf_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        self._key_path = key_path
        self._contexts: OrderedDict[str, tuple[ssl.SSLContext, datetime.datetime]] = OrderedDict()
        self._lock = threading.Lock()
        self.minted = 0

    def context_for(self, host: str) -> ssl.SSLContext:
        """A server-side TLS context presenting a certificate for ``host`` (cached)."""
        with self._lock:
            cached = self._contexts.get(host)
            if cached is not None and cached[1] - LEAF_RENEW_BEFORE > _now():
                self._contexts.move_to_end(host)
                return cached[0]
            context, not_after = self._mint(host)
            self._contexts[host] = (context, not_after)
            while len(self._contexts) > MAX_CACHED_LEAVES:
                self._contexts.popitem(last=False)
            return context

    def _mint(self, host: str) -> tuple[ssl.SSLContext, datetime.datetime]:
        not_after = _now() + LEAF_VALIDITY
        cert = sign_server_certificate(self.key, self.cert, host, self._leaf_key.public_key(), not_after)
        chain = self._dir / f"leaf-{self.minted}.pem"
        self.minted += 1
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        context.load_cert_chain(str(chain), str(self._key_path))
        chain.unlink()
        log.info("minted interception certificate", extra={"host": host})
        return context, not_after

    def export(self) -> tuple[Path, Path]:
        """Write the CA certificate and key into the private folder (for worker processes)."""
        cert_path = self._dir / "ca.pem"
        key_path = self._dir / "ca.key"
        cert_path.write_bytes(self.cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                self.key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        return cert_path, key_path

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


def system_roots() -> bytes:
    """The platform's CA bundle (empty when none is found)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            try:
                return Path(candidate).read_bytes()
            except OSError:
                continue
    try:
        import certifi  # type: ignore[import-not-found, unused-ignore]

        return Path(certifi.where()).read_bytes()
    except (ImportError, OSError):
        return b""


def _generate_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return new_ca(f"credential-sidecar interception CA {os.getpid()}", _now() + CA_VALIDITY)


def new_ca(
    common_name: str, not_after: datetime.datetime, organization: str = "mcp-credential-sidecar"
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh self-signed CA (P-256) that may sign server certificates only, valid until ``not_after``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(hours=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def sign_server_certificate(
    ca_key: CertificateIssuerPrivateKeyTypes,
    ca_cert: x509.Certificate,
    host: str,
    public_key: ec.EllipticCurvePublicKey,
    not_after: datetime.datetime,
) -> x509.Certificate:
    """A server certificate for ``host`` alone (a DNS name, or an IP address), signed by the CA."""
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(hours=1))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
