"""A private CA, made fresh for one demo run, and a certificate for the API host it stands in for.

The Polygon stand-in serves https with a certificate naming ``api.polygon.io``
that no public CA issued; the sidecar trusts it only through the upstream's
``ca_file``. The CA and the certificate are made by the sidecar's own
interception-CA code (sidecar/mitm.py), so the demo needs no test-only package
such as trustme.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.mitm import new_ca, sign_server_certificate

# Long enough for any demo run; a fresh pair is made at every start.
VALIDITY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class StandInTLS:
    ca_cert: Path  # the private CA's certificate: the sidecar's ca_file
    cert_chain: Path  # the stand-in's certificate, then the CA's
    key: Path  # the stand-in's private key


def make_stand_in_tls(directory: Path, hostname: str) -> StandInTLS:
    """Write a new CA and a server certificate for hostname signed by it into directory."""
    not_after = datetime.datetime.now(datetime.UTC) + VALIDITY
    ca_key, ca = new_ca("demo stand-in CA (made at demo start)", not_after, "mcp-credential-sidecar demo")
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    # Only the API's name: no 127.0.0.1. The sidecar dials the stand-in's address
    # (connect_to) and must still check the certificate for this name.
    leaf = sign_server_certificate(ca_key, ca, hostname, leaf_key.public_key(), not_after)

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
