"""Review revD (item 2): what the single-use hand-off key (review F1) leaves open.

revD-2: a station killed between unwrapping the transport key into its token and destroying the hand-off key pair
(power loss, OOM kill, SIGKILL) keeps the pair; running accept-transport-key again stops at the existing label
before it reaches the destruction, so the pair stays for good and the saved hand-off bytes give card keys in clear
(F1 again).

revD-3: before the station accepts, the PIN holder who fetches the hand-off can unwrap the bytes into a *token*
object that may unwrap and has no unwrap template (CKA_TOKEN is not pinned by the hand-off key's unwrap template,
and the nested template cannot be): the station then accepts normally (the KCV matches, the key becomes active) and
the rogue copy reads every card key sealed under the transport key afterwards. Measured: a design limit on SoftHSM.
"""

from __future__ import annotations

from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass
from test_station_handoff import _OAEP_SHA1, _attack, _card_key, _handoff

from kms.errors import HsmError
from kms.hsm.labels import unwrap_key_label
from kms.hsm.session import TokenSession
from kms.station import accept_transport_key, new_unwrap_key, pem_spki


class _Killed(BaseException):
    """Stands for the process dying at this point (no finally of the port's runs after it)."""


def test_a_station_killed_before_the_unwrap_key_is_destroyed_does_not_keep_it(
        sessions: dict[str, TokenSession], station_session: TokenSession, monkeypatch: pytest.MonkeyPatch) -> None:
    issuer, station = sessions["hrss"], station_session
    made = new_unwrap_key(station, "station-a1", "hrss")
    label, wrapped, kcv = _handoff(issuer, pem_spki(made.pem.encode(), "made"))
    try:
        with monkeypatch.context() as m:
            def killed(self: TokenSession, unwrap_label: str) -> None:
                raise _Killed
            m.setattr(TokenSession, "_destroy_unwrap_pair", killed)
            with pytest.raises(_Killed):
                accept_transport_key(station, "station-a1", "hrss", label, wrapped, kcv.hex(),
                                     unwrap_key_sha256=made.sha256)
        # the operator runs accept-transport-key again, as the hand-off is still pending
        with pytest.raises(HsmError, match="already holds"):
            accept_transport_key(station, "station-a1", "hrss", label, wrapped, kcv.hex(),
                                 unwrap_key_sha256=made.sha256)
        assert not station.has_public_key(made.label), "the single-use unwrap key outlived its hand-off"
        assert _attack(station, wrapped, _card_key(issuer, label)) is None
    finally:
        for half in ("private", "public"):
            if station._has(made.label, ObjectClass.PRIVATE_KEY if half == "private" else ObjectClass.PUBLIC_KEY):
                station.destroy(made.label, half)
        issuer.destroy(label)
        if station.has_key(label):
            station.destroy(label)


@pytest.mark.xfail(strict=True, reason="revD-3: a token copy unwrapped before acceptance survives it (SoftHSM cannot "
                                       "pin the nested unwrap template; CKA_TOKEN is not pinned)")
def test_a_copy_unwrapped_before_acceptance_does_not_survive_it(
        sessions: dict[str, TokenSession], station_session: TokenSession) -> None:
    issuer, station = sessions["hrss"], station_session
    made = new_unwrap_key(station, "station-a1", "hrss")
    label, wrapped, kcv = _handoff(issuer, pem_spki(made.pem.encode(), "made"))
    raw: Any = station._session
    private = raw.get_key(object_class=ObjectClass.PRIVATE_KEY, label=made.label)
    rogue = private.unwrap_key(  # the PIN holder, after FetchTransportKey and before accept-transport-key
        ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=pkcs11.Mechanism.RSA_PKCS_OAEP,
        mechanism_param=_OAEP_SHA1, capabilities=0,
        template={Attribute.TOKEN: True, Attribute.LABEL: "innocuous", Attribute.SENSITIVE: True,
                  Attribute.EXTRACTABLE: False, Attribute.DECRYPT: False, Attribute.ENCRYPT: False,
                  Attribute.WRAP: False, Attribute.SIGN: False, Attribute.VERIFY: False, Attribute.DERIVE: False,
                  Attribute.UNWRAP: True, Attribute.MODIFIABLE: False})
    try:
        accept_transport_key(station, "station-a1", "hrss", label, wrapped, kcv.hex(), unwrap_key_sha256=made.sha256)
        assert not station.has_public_key(made.label)  # the key pair is gone, as designed
        card_key = rogue.unwrap_key(  # later: any card key sealed under the (now active) transport key
            ObjectClass.SECRET_KEY, KeyType.DES2, _card_key(issuer, label),
            mechanism=pkcs11.Mechanism.AES_KEY_WRAP_PAD, capabilities=0,
            template={Attribute.TOKEN: False, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})
        clear = bytes(card_key[Attribute.VALUE])
        card_key.destroy()
        assert len(clear) != 16, "a card key in clear through a copy made before acceptance"
    finally:
        rogue.destroy()
        issuer.destroy(label)
        station.destroy(label)


def test_a_hand_off_accepted_before_the_upgrade_gives_nothing_after_it(
        sessions: dict[str, TokenSession], station_session: TokenSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """revD-4, F1 on every station that accepted its transport keys before single-use keys: the long-lived pair was
    kept, and the service refuses any new hand-off to a key that received one, so no acceptance would destroy it.
    The upgraded station's first `kms station unwrap-key` (new_unwrap_key) retires it: the saved bytes of the old
    hand-off then give nothing."""
    issuer, station = sessions["hrss"], station_session
    legacy = unwrap_key_label("station-a1", "bank")
    spki = station.generate_unwrap_keypair(legacy)
    label, wrapped, kcv = _handoff(issuer, spki)
    try:
        with monkeypatch.context() as m:  # accepted by the kms before single-use keys: the pair was kept
            m.setattr(TokenSession, "_destroy_unwrap_pair", lambda self, unwrap_label: None)
            accept_transport_key(station, "station-a1", "bank", label, wrapped, kcv.hex())
        # upgraded: the runbook's next step at the station is a new single-use key for the next hand-off
        made = new_unwrap_key(station, "station-a1", "bank")
        assert made.retired == legacy
        assert legacy not in station.unwrap_keys(legacy) and not station.has_public_key(legacy)
        assert _attack(station, wrapped, _card_key(issuer, label)) is None
        assert new_unwrap_key(station, "station-a1", "bank").retired == ""  # retired once, nothing more
    finally:
        for cls, half in ((ObjectClass.PRIVATE_KEY, "private"), (ObjectClass.PUBLIC_KEY, "public")):
            for found in [legacy, *station.unwrap_keys(legacy)]:
                if station._has(found, cls):
                    station.destroy(found, half)
        issuer.destroy(label)
        station.destroy(label)
