"""Cardholder data at rest: PANs are never stored in clear (PCI DSS requirement 3.5; docs/architecture.md, 2.4).

The PAN belongs to the bank application, so its protection is the bank domain's, in the bank token:

- ``kms/bank/data/pan/v<n>`` (AES-256, encrypt/decrypt, never extractable) encrypts each PAN with AES-GCM, bound to
  its batch, card_ref and PSN (the GCM additional data), so a sealed PAN moved to another record does not open;
- ``kms/bank/data/pan-index/v<n>`` (256-bit generic secret, sign only) makes keyed look-up indexes,
  HMAC-SHA256 of the PAN and of "<pan>/<psn>", for what the coordinator must compare: the same PAN on an old and a
  replacement card, and retired identities. Without the token, an index cannot be computed for a guessed PAN.

The coordinator (``kms serve``) holds neither key. It hands the clear PANs of a new batch to a bank worker once
(``protect``, at most ``MAX_PANS_PER_CALL`` a call), stores what comes back, and forgets the clear values; from then
on only the bank domain's workers open a PAN (``open_card``), inside the process that derives the card's bank keys
from it, and no worker call returns a clear PAN. The masked PAN (first 6 and last 4 digits, which PCI DSS allows to
be shown) is kept for records, messages and audit.

What the index does not do: it is no secret from whoever may call ``protect``. The cards table keeps the index
beside the masked PAN, which leaves about 10^5 Luhn-valid candidates for a 16-digit PAN; a front end that was taken
over can have the bank worker index each candidate and find the one whose index is stored. The keyed index only
means that this search needs the bank worker; what bounds it is the bank worker service's quota of PANs per hour
(``worker.pan_quota_per_hour``, kms.server.worker.PanQuota: beyond it the call is refused and a security alarm
logged), i.e. a handful of PANs an hour at the default, and the alarm that tells someone to look.

A sealed PAN is ``01 ‖ key version (4 bytes, big-endian) ‖ IV (12) ‖ ciphertext ‖ tag (16)``; its additional data
is the canonical JSON ``["kms-pan/v1", key version, batch_id, card_ref, psn]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from kms.audit.log import mask_pan
from kms.canonical import canonical
from kms.cards.cardid import CardIdentity, ProtectedPan
from kms.errors import InvalidArgument, InvalidState
from kms.registry import KeyKind, KeyRegistry, KeyState

DOMAIN = "bank"
DATA_KEY = "pan"
INDEX_KEY = "pan-index"
FORMAT = 1
MAX_PANS_PER_CALL = 1024  # PANs in one protect_pans call: a chunk of a batch, as SealChunk's (kms.server.worker)
#: The batch id of PANs protected for a look-up only (no batch): their sealed forms are dropped.
LOOKUP_BATCH = "pan-lookup"


class Worker(Protocol):
    """What runs in a domain worker (kms.issuance.workers._Worker): its domain, token session and key registry."""

    domain: str
    session: Any
    registry: KeyRegistry


# -- in the bank domain's workers ---------------------------------------------------------------------------------


def protect_pans(w: Worker, batch_id: str, items: Sequence[tuple[str, str, str]]) -> list[tuple[bytes, str, str]]:
    """For each (card_ref, pan, psn) of a batch: the sealed PAN and its two indexes (hex). Runs in a bank worker."""
    if w.domain != DOMAIN:
        raise InvalidState(f"PANs are protected by the {DOMAIN} domain, not {w.domain}")
    data = w.registry.active(DOMAIN, KeyKind.DATA, DATA_KEY)
    index = w.registry.active(DOMAIN, KeyKind.DATA, INDEX_KEY)
    header = bytes([FORMAT]) + data.version.to_bytes(4, "big")
    out = []
    for card_ref, pan, psn in items:
        sealed = header + w.session.encrypt_data(data.label, pan.encode("ascii"),
                                                 _aad(batch_id, card_ref, psn, data.version))
        out.append((sealed, w.session.hmac_sha256(index.label, pan.encode("ascii")).hex(),
                    w.session.hmac_sha256(index.label, f"{pan}/{psn}".encode("ascii")).hex()))
    return out


def open_card(w: Worker, card: CardIdentity, batch_id: str, labels: dict[int, str]) -> CardIdentity:
    """The card of a batch with its protected PAN opened, for deriving its keys in this (bank) worker; ``labels``
    caches the data key label per version across calls. A PAN that does not open (altered, moved to another record
    or batch, its PSN changed) is InvalidArgument ``pan``."""
    if card.pan is not None or card.protected is None:
        return card
    sealed = card.protected.sealed
    if len(sealed) < 5 or sealed[0] != FORMAT:
        raise InvalidArgument("pan", f"card {card.card_ref}: the stored PAN is not in a known format")
    version = int.from_bytes(sealed[1:5], "big")
    label = labels.get(version)
    if label is None:
        record = w.registry.get(DOMAIN, KeyKind.DATA, DATA_KEY, version)
        if record.state not in (KeyState.ACTIVE, KeyState.SUSPENDED, KeyState.DEACTIVATED):
            raise InvalidState(f"{record.label} is {record.state.value}: the PANs sealed under it cannot be read")
        label = labels[version] = record.label
    pan = w.session.decrypt_data(label, sealed[5:], _aad(batch_id, card.card_ref, card.psn or "", version),
                                 "pan").decode("ascii")
    return dataclasses.replace(card, pan=pan)


def _aad(batch_id: str, card_ref: str, psn: str, version: int) -> bytes:
    """What a sealed PAN is bound to: its key version, batch, card and PSN (the GCM additional data)."""
    return canonical([f"kms-pan/v{FORMAT}", version, batch_id, card_ref, psn])


# -- in the coordinator ---------------------------------------------------------------------------------------------

#: A call into the bank domain's workers: ``call(function, *args)`` (kms.issuance.workers.DomainPool.call).
BankCall = Callable[..., Any]


class PanVault:
    """The coordinator's side: protects the PANs of new cards through the bank domain's workers."""

    def __init__(self, call: BankCall) -> None:
        self._call = call

    def protect(self, cards: Sequence[CardIdentity], batch_id: str = "") -> list[CardIdentity]:
        """The cards of a batch with each clear PAN replaced by its protected form (the same cards where there is
        none), ``MAX_PANS_PER_CALL`` a call. Without ``batch_id`` (a look-up only) the sealed PANs made are of no use
        and are dropped."""
        todo = [(i, c) for i, c in enumerate(cards) if c.pan is not None]
        if not todo:
            return list(cards)
        items = [(c.card_ref, c.pan, c.psn or "") for _, c in todo]
        made = []
        for start in range(0, len(items), MAX_PANS_PER_CALL):
            made.extend(self._call(protect_pans, batch_id or LOOKUP_BATCH, items[start:start + MAX_PANS_PER_CALL]))
        out = list(cards)
        for (i, card), (sealed, index, pan_psn_index) in zip(todo, made, strict=True):
            assert card.pan is not None
            out[i] = dataclasses.replace(card, pan=None, protected=ProtectedPan(
                sealed=bytes(sealed), index=index, pan_psn_index=pan_psn_index, masked=mask_pan(card.pan)))
        return out
