"""Principals from verified certificates, and the development PKI that issues them."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from kms.dev.pki import DevPki
from kms.errors import PermissionDenied
from kms.identity import Principal, from_certificate, from_pem, parse_uri


@pytest.mark.parametrize(
    ("uri", "principal"),
    [
        ("urn:kms:station:bureau-a:station-a1", Principal("station", "station-a1", bureau="bureau-a")),
        ("urn:kms:officer:hrss:alice", Principal("officer", "alice", domain="hrss")),
        ("urn:kms:officer:bank:bob", Principal("officer", "bob", domain="bank")),
        ("urn:kms:auditor:carol", Principal("auditor", "carol")),
    ],
)
def test_uris_round_trip(uri: str, principal: Principal) -> None:
    assert parse_uri(uri) == principal
    assert principal.uri() == uri


@pytest.mark.parametrize("uri", [
    "urn:kms:officer:both:alice", "urn:kms:station:bureau-a", "urn:kms:root:x", "urn:kms:auditor:Carol",
    "urn:kms:auditor:carol:extra", "https://example.test/x", "urn:kms:station:bureau-a:st\n", "urn:kms:officer:hrss:",
])
def test_malformed_principals_are_denied(uri: str) -> None:
    with pytest.raises(PermissionDenied):
        parse_uri(uri)


def test_dev_pki_issues_client_certificates_that_name_the_principal(tmp_path: Path) -> None:
    pki = DevPki(tmp_path)
    alice = Principal("officer", "alice", domain="hrss")
    cred = pki.client(alice)
    assert from_pem(cred.cert.read_bytes()) == alice
    assert stat.S_IMODE(cred.key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cred.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    again = DevPki(tmp_path).client(alice)  # idempotent: the same certificate
    assert again.cert.read_bytes() == cred.cert.read_bytes()
    server = x509.load_pem_x509_certificate(pki.server().cert.read_bytes())
    with pytest.raises(PermissionDenied, match="exactly one kms principal"):
        from_certificate(server)
