"""The officer client's own check of what it is shown before approving (kms.client.ceremony.checked_proposal)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kms.canonical import canonical
from kms.client.ceremony import checked_proposal
from kms.errors import InvalidArgument
from kms.v1 import ceremony_pb2 as pb


def _ceremony(params: dict[str, str]) -> pb.Ceremony:
    encoding = canonical({"ceremony_id": "C-1", "domain": "bank", "operation": "register-transport-key",
                          "params": params})
    return pb.Ceremony(ceremony_id="C-1", domain="bank", operation="register-transport-key", encoding=encoding,
                       digest=hashlib.sha256(encoding).hexdigest())


def _key() -> tuple[str, str]:
    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return (public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode(),
            hashlib.sha256(public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest())


def test_a_hand_off_proposal_whose_sha256_is_not_its_public_keys_is_refused_before_approval() -> None:
    """Review revD-1: the SHA-256 an approver compares with the station's must be the one of the key used."""
    station_pem, station_sha = _key()
    rogue_pem, _ = _key()
    params = {"bureau": "b1", "method": "rsa-oaep", "station": "urn:kms:station:b1:s1", "algorithm": "AES256"}
    checked_proposal(_ceremony({**params, "public_key": station_pem, "public_key_sha256": station_sha}), "C-1")
    with pytest.raises(InvalidArgument, match="public_key_sha256"):
        checked_proposal(_ceremony({**params, "public_key": rogue_pem, "public_key_sha256": station_sha}), "C-1")
