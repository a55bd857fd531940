"""A private CA, made fresh for one demo run, and a certificate for the API host it stands in for.

The Polygon stand-in serves https with a certificate naming ``api.polygon.io``
that no public CA issued; the sidecar trusts it only through the upstream's
``ca_file``. Made with ``cryptography`` (already installed with the sidecar, by
PyJWT[crypto]), so the demo needs no test-only package such as trustme.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Long enough for any demo run; a fresh pair is made at every start.
VALIDITY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class StandInTLS:
    ca_cert: Path  # the private CA's certificate: the sidecar's ca_file
    cert_chain: Path  # the stand-in's certificate, then the CA's
    key: Path  # the stand-in's private key


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mcp-credential-sidecar demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_stand_in_tls(directory: Path, hostname: str) -> StandInTLS:
    """Write a new CA and a server certificate for hostname signed by it into directory."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("demo stand-in CA (made at demo start)")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(hostname))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        # Only the API's name: no 127.0.0.1. The sidecar dials the stand-in's
        # address (connect_to) and must still check the certificate for this name.
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    tls = StandInTLS(
        ca_cert=directory / "stand-in-ca.pem",
        cert_chain=directory / f"{hostname}.pem",
        key=directory / f"{hostname}.key",
    )
    tls.ca_cert.write_bytes(ca_pem)
    tls.cert_chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + ca_pem)
    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(tls.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    return tls
