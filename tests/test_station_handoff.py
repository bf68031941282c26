"""Review finding F1 (high): the station's PIN and a saved transport-key hand-off must not give card keys in clear.

A station operator can keep the wrapped bytes FetchTransportKey returned. With the station's PIN and a raw PKCS#11
client (python-pkcs11 through the port's session here), they try to unwrap those bytes again with every RSA private
key of the station's token that may unwrap, into a session key that may unwrap and has no CKA_UNWRAP_TEMPLATE, and
with it unwrap a card key sealed under the transport key as extractable and read it. Every attempt must fail.
"""

from __future__ import annotations

import secrets
from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from kms.cards import reference
from kms.errors import HsmError, NotFound
from kms.hsm.labels import key_label, unwrap_key_label
from kms.hsm.session import TokenSession
from kms.hsm.types import Algorithm, DeriveStep
from kms.station import accept_transport_key, new_unwrap_key, pem_spki, spki_sha256, unwrap_key_for

_OAEP_SHA1 = (Mechanism.SHA_1, pkcs11.MGF.SHA1, None)


def _attack(station: TokenSession, wrapped_transport: bytes, wrapped_card_key: bytes) -> bytes | None:
    """What a PIN holder with the saved hand-off bytes can do: the card key's clear value, or None."""
    raw: Any = station._session  # the attacker's own PKCS#11 client on the station's token
    for private in raw.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
        try:
            transport = private.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.AES, wrapped_transport, mechanism=Mechanism.RSA_PKCS_OAEP,
                mechanism_param=_OAEP_SHA1, capabilities=0,
                # what the station's unwrap template (if any) pins, and nothing of it for the new key
                template={Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.DECRYPT: False, Attribute.ENCRYPT: False, Attribute.WRAP: False,
                          Attribute.SIGN: False, Attribute.VERIFY: False, Attribute.DERIVE: False,
                          Attribute.UNWRAP: True, Attribute.MODIFIABLE: False})
        except pkcs11.PKCS11Error:
            continue
        try:
            card_key = transport.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.DES2, wrapped_card_key, mechanism=Mechanism.AES_KEY_WRAP_PAD,
                capabilities=0, template={Attribute.TOKEN: False, Attribute.SENSITIVE: False,
                                          Attribute.EXTRACTABLE: True})
            try:
                return bytes(card_key[Attribute.VALUE])
            finally:
                card_key.destroy()
        except pkcs11.PKCS11Error:
            continue
        finally:
            transport.destroy()
    return None


def _card_key(issuer: TokenSession, transport: str) -> bytes:
    """A card key (DES2) derived in the issuer's token and wrapped under ``transport``, as a bundle carries it."""
    master = f"kms/test/f1/{secrets.token_hex(4)}"
    issuer.import_master_key(master, Algorithm.DES2, bytearray(reference.odd_parity(secrets.token_bytes(16))),
                             token=False)
    factor = secrets.token_bytes(8)
    try:
        return issuer.derive_wrap(master, ((DeriveStep.DES3_ECB, factor + reference.complement(factor)),),
                                  transport).wrapped
    finally:
        issuer.destroy(master)


def _handoff(issuer: TokenSession, spki: bytes) -> tuple[str, bytes, bytes]:
    label = key_label("hrss", "transport", f"f1-{secrets.token_hex(4)}", 1)
    wrapped, kcv = issuer.generate_transport_key_for(label, spki)
    return label, wrapped, kcv


def test_the_station_pin_and_a_saved_handoff_do_not_give_card_keys_in_clear(
        sessions: dict[str, TokenSession], station_session: TokenSession) -> None:
    issuer, station = sessions["hrss"], station_session
    made = new_unwrap_key(station, "station-a1", "hrss")  # `kms station unwrap-key`
    assert made.label.startswith(unwrap_key_label("station-a1", "hrss") + "/")
    assert made.sha256 == spki_sha256(pem_spki(made.pem.encode(), "made"))
    label, wrapped, kcv = _handoff(issuer, pem_spki(made.pem.encode(), "made"))
    # the station accepts it as `kms station accept-transport-key` does; the operator kept `wrapped`
    accept_transport_key(station, "station-a1", "hrss", label, wrapped, kcv.hex(), unwrap_key_sha256=made.sha256)
    try:
        assert not station.has_public_key(made.label)  # the pair is destroyed: both halves
        assert made.label not in station.unwrap_keys(unwrap_key_label("station-a1", "hrss"))
        assert _attack(station, wrapped, _card_key(issuer, label)) is None
        with pytest.raises(NotFound, match="used once"):  # the same bytes offered again
            accept_transport_key(station, "station-a1", "hrss", label + "-again", wrapped, kcv.hex(),
                                 unwrap_key_sha256=made.sha256)
    finally:
        issuer.destroy(label)
        station.destroy(label)


def test_a_kcv_mismatch_destroys_the_unwrap_key_too_and_bytes_that_do_not_unwrap_leave_it(
        sessions: dict[str, TokenSession], station_session: TokenSession) -> None:
    issuer, station = sessions["hrss"], station_session
    made = new_unwrap_key(station, "station-a1", "hrss")
    label, wrapped, _ = _handoff(issuer, pem_spki(made.pem.encode(), "made"))
    try:
        with pytest.raises(HsmError):  # not an RSA-OAEP ciphertext under the key: nothing unwrapped, key kept
            accept_transport_key(station, "station-a1", "hrss", label, b"\x01" * 256, "000000",
                                 unwrap_key_sha256=made.sha256)
        assert station.has_public_key(made.label)
        with pytest.raises(HsmError, match="differs from the issuer's; key removed"):
            accept_transport_key(station, "station-a1", "hrss", label, wrapped, "000000",
                                 unwrap_key_sha256=made.sha256)
        assert not station.has_key(label) and not station.has_public_key(made.label)
        assert _attack(station, wrapped, _card_key(issuer, label)) is None
    finally:
        issuer.destroy(label)


def test_a_handoff_to_the_long_lived_key_of_an_older_station_is_accepted_once(
        sessions: dict[str, TokenSession], station_session: TokenSession) -> None:
    """A hand-off made before single-use keys: wrapped under the station's one key per domain (no SHA-256 in the
    hand-off, or the SHA-256 of that key); accepting it destroys that key as well."""
    issuer, station = sessions["hrss"], station_session
    legacy = unwrap_key_label("station-a1", "bank")
    spki = station.generate_unwrap_keypair(legacy)
    label, wrapped, kcv = _handoff(issuer, spki)
    try:
        assert unwrap_key_for(station, "station-a1", "bank", spki_sha256(spki)) == legacy
        accept_transport_key(station, "station-a1", "bank", label, wrapped, kcv.hex())
        assert not station.has_public_key(legacy)
        with pytest.raises(NotFound):
            unwrap_key_for(station, "station-a1", "bank", "")
        assert _attack(station, wrapped, _card_key(issuer, label)) is None
    finally:
        issuer.destroy(label)
        station.destroy(label)


def test_the_unwrap_keys_template_pins_what_softhsm_can_pin_and_not_the_nested_one(
        sessions: dict[str, TokenSession], station_session: TokenSession) -> None:
    """Measured, not relied on: SoftHSM 2.6 enforces the hand-off key's CKA_UNWRAP_TEMPLATE for flat attributes (a
    copy that may derive, or wrap, is refused) but cannot make the new key carry an unwrap
    template of its own; only the key pair being single use closes F1."""
    issuer, station = sessions["hrss"], station_session
    made = new_unwrap_key(station, "station-a1", "hrss")
    label, wrapped, _ = _handoff(issuer, pem_spki(made.pem.encode(), "made"))
    raw: Any = station._session
    private = raw.get_key(object_class=ObjectClass.PRIVATE_KEY, label=made.label)
    pinned = {Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
              Attribute.DECRYPT: False, Attribute.ENCRYPT: False, Attribute.WRAP: False, Attribute.SIGN: False,
              Attribute.VERIFY: False, Attribute.DERIVE: False, Attribute.UNWRAP: True,
              Attribute.MODIFIABLE: False}

    def unwrap(template: dict[Attribute, Any]) -> Any:
        return private.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=Mechanism.RSA_PKCS_OAEP,
                                  mechanism_param=_OAEP_SHA1, capabilities=0, template=template)

    try:
        with pytest.raises(pkcs11.exceptions.TemplateInconsistent):
            unwrap({**pinned, Attribute.DERIVE: True})
        with pytest.raises(pkcs11.exceptions.TemplateInconsistent):
            unwrap({**pinned, Attribute.WRAP: True})
        copy = unwrap(pinned)  # may unwrap, with no unwrap template: what the pins cannot stop
        copy.destroy()
    finally:
        station.destroy(made.label, "private")
        station.destroy(made.label, "public")
        issuer.destroy(label)
