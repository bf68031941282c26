"""A software stand-in for the bank domain's PAN protection (kms.issuance.pans), for unit tests of the stores only.

It produces what the HSM path produces — a sealed blob, keyed indexes, the masked PAN — with a fixed test key in
software, so store-level tests can create batches without worker processes. The service always uses kms.issuance.pans
with the bank token; tests/test_pans.py checks that path against a real token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.audit.log import mask_pan
from kms.cards.cardid import CardIdentity, ProtectedPan

_KEY = hashlib.sha256(b"kms unit tests: not a key of any domain").digest()


class SoftwarePans:
    def protect(self, cards: Sequence[CardIdentity], batch_id: str = "") -> list[CardIdentity]:
        out = []
        for card in cards:
            if card.pan is None:
                out.append(card)
                continue
            iv = os.urandom(12)
            sealed = b"\x01\x00\x00\x00\x01" + iv + AESGCM(_KEY).encrypt(iv, card.pan.encode(), card.card_ref.encode())
            out.append(dataclasses.replace(card, pan=None, protected=ProtectedPan(
                sealed=sealed, index=index(card.pan), pan_psn_index=index(f"{card.pan}/{card.psn or ''}"),
                masked=mask_pan(card.pan))))
        return out


def index(value: str) -> str:
    return hmac.new(_KEY, value.encode(), hashlib.sha256).hexdigest()
