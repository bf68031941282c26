"""Review revD: an SM4 transport key at the station enforces its unwrap template (no card key unwrapped readable)."""

from __future__ import annotations

import secrets
from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute, ObjectClass
from test_sm import _label, _master, issuer, requires_sm, sm_tokens, station  # noqa: F401

from kms.cards import reference
from kms.hsm.session import TokenSession
from kms.hsm.types import Algorithm, DeriveStep


@requires_sm
def test_an_sm4_station_transport_key_unwraps_no_card_key_as_readable(issuer: TokenSession,  # noqa: F811
                                                                       station: TokenSession) -> None:  # noqa: F811
    unwrap = _label("unwrap")
    transport = _label("transport")
    wrapped, kcv = issuer.generate_transport_key_for(transport, station.generate_unwrap_keypair(unwrap),
                                                     algorithm=Algorithm.SM4)
    assert station.accept_transport_key(unwrap, wrapped, transport, algorithm=Algorithm.SM4) == kcv
    master = _master(issuer, Algorithm.SM4, secrets.token_bytes(16))
    factor = secrets.token_bytes(8)
    try:
        card = issuer.derive_wrap(master, ((DeriveStep.SM4_ECB, factor + reference.complement(factor)),), transport)
    finally:
        issuer.destroy(master)
    raw: Any = station._session
    key = raw.get_key(object_class=ObjectClass.SECRET_KEY, label=transport)
    sm4 = station._vendor["SM4_ECB"]
    try:
        for template in ({Attribute.TOKEN: False, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
                         {Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True},
                         {Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.DECRYPT: True}):
            with pytest.raises(pkcs11.PKCS11Error):
                got = key.unwrap_key(ObjectClass.SECRET_KEY, station._ckk_sm4, card.wrapped, mechanism=sm4,
                                     capabilities=0, template=template)
                got.destroy()
        assert not key[Attribute.DECRYPT] and not key[Attribute.ENCRYPT]  # no decryption oracle either
    finally:
        issuer.destroy(transport)
        station.destroy(transport)
