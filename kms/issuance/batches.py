"""Issuance batches: the work orders officers create, and the record of every card issued from them.

A batch lists card identities for one bureau and one profile. A station of that bureau fetches the batch's cards;
each card is issued at most once, and a retried request with the same idempotency key gets the same sealed bundle.

Tables: ``batches``, ``batch_cards`` and ``card_events``, described with their schema in kms.store.

Operations (``BatchStore(engine, clock, audit)``); with an audit log (kms.audit.log), every change appends its audit
record in the same transaction, so a change whose record cannot be written does not happen (fail closed):
``batch.created`` (one per batch: card count and cards digest), ``batch.authorized``, ``card.chip-bound`` (which
fields, never their values), ``card.reissued`` and ``issuance.issued`` (one per card: bundle serial, station, masked
PAN).

- ``create_batch``: 1 to MAX_BATCH_CARDS cards, no card_ref twice; AlreadyExists if the batch exists; all or nothing
  in one transaction (a ``created`` event per card).
- ``get_batch`` (with the counts of cards and issued cards), ``card``, ``cards_after`` (ordered by sequence, for
  resumable streaming), ``events``.
- ``bind_chip``: chip data read at the station (card serial, KDD) may come with the request instead of the batch. The
  first call fills the fields the batch left empty; a value the batch (or an earlier binding) already has must match.
  The same data again is a no-op; different data is PermissionDenied ("card X is bound to another chip; an officer
  must re-issue it").
- ``reissue``: an officer revokes the chip binding and any issued bundle (a card spoiled in personalization): the card
  goes back to pending, the chip fields the batch did not supply are cleared, and so are serial, bundle and
  idempotency key; a ``reissue-revoked`` event names what was revoked.
- ``record_issued``: at most once per card. A conditional ``UPDATE ... WHERE state = 'pending'`` stores the bundle, so
  of two replicas racing for the same card exactly one wins; the loser (and any later call) gets AlreadyExists and
  reads the stored bundle with ``card()`` to answer a retry whose idempotency key matches.

Concurrency: every change is one conditional UPDATE whose WHERE clause states what the change assumed (the card's
state, its binding, the batch being open). Nothing relies on a read-then-write transaction, which SQLite's driver
would not isolate; a lost race is re-read and re-judged. A closed batch refuses every change (InvalidState).

Errors (kms.errors): InvalidArgument naming the field, NotFound, AlreadyExists, PermissionDenied, InvalidState.
Times come from the injected clock, as RFC 3339 (kms.clock.rfc3339).
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import sqlalchemy as sa

from kms import identity
from kms.audit.log import AuditLog
from kms.canonical import canonical
from kms.cards.cardid import CardIdentity, ProtectedPan
from kms.clock import Clock, rfc3339
from kms.errors import AlreadyExists, InvalidArgument, InvalidState, NotFound, PermissionDenied
from kms.issuance import consents
from kms.repository import ATTEMPTS, Repository
from kms.store import batch_authorizations, batch_cards, batches, card_events
from kms.validation import CARD_REF, NAME, chunks

#: The most cards one batch may list.
MAX_BATCH_CARDS = 100_000
#: The most cards one ``cards_after`` page may return.
MAX_PAGE = 10_000
#: Chip data a station may bind to a card record.
CHIP_FIELDS = ("card_serial", "kdd")
IDENTITY_FIELDS = ("city_code", "card_serial", "pan", "psn", "kdd")
#: The identity fields stored as they are; the PAN is stored only protected (kms.issuance.pans: pan_sealed, pan_index,
#: pan_psn_index, pan_masked).
CLEAR_FIELDS = ("city_code", "card_serial", "psn", "kdd")

_INSERT_CHUNK = 5_000
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


class BatchState(enum.StrEnum):
    AWAITING = "awaiting-authorization"  # created; not issuable until every domain of its profile authorized it
    OPEN = "open"
    CLOSED = "closed"


class CardState(enum.StrEnum):
    PENDING = "pending"
    ISSUED = "issued"
    REVOKED = "revoked"  # reserved for lifecycle steps (report lost, cancel); terminal here


class EventKind(enum.StrEnum):
    CREATED = "created"
    CHIP_BOUND = "chip-bound"
    ISSUED = "issued"
    REISSUE_REVOKED = "reissue-revoked"
    LIFECYCLE_REVOKED = "lifecycle-revoked"  # kms.issuance.lifecycle: the card was replaced or cancelled


@dataclass(frozen=True)
class Batch:
    batch_id: str
    bureau: str
    profile: str
    state: BatchState
    created_by: str
    created_at: str
    card_count: int
    issued_count: int
    cards_digest: str = ""
    authorized_by: tuple[str, ...] = ()  # domains whose authorize-batch ceremony has run
    key_versions: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # per domain: pinned versions


@dataclass(frozen=True)
class CardRecord:
    batch_id: str
    card_ref: str
    sequence: int
    identity: CardIdentity  # batch-supplied fields plus those bound from the chip
    bound_fields: frozenset[str]  # which identity fields came from chip binding
    chip_bound_at: str | None
    state: CardState
    serial: str | None
    bundle: bytes | None = field(repr=False)
    idempotency_key: str | None
    issued_at: str | None


@dataclass(frozen=True)
class CardEvent:
    id: int
    batch_id: str
    card_ref: str
    event: EventKind
    detail: str
    at: str
    by: str | None


def cards_digest(cards: Sequence[CardIdentity]) -> str:
    """SHA-256 (hex) over the canonical JSON list of the batch's card identities, in order: what an
    authorize-batch ceremony names, so approvers sign off exactly these cards. The PAN enters as its keyed index
    (kms.issuance.pans): it binds the bank's derivation input without a digest anyone could test guessed PANs
    against."""
    return hashlib.sha256(canonical([_digested(c) for c in cards])).hexdigest()


def _digested(card: CardIdentity) -> dict[str, str]:
    if card.pan is not None:
        raise InvalidArgument("pan", f"card {card.card_ref}: a PAN enters the batch digest only sealed")
    fields = card.as_dict()
    if card.protected is not None:
        fields["pan_index"] = card.protected.index
    return fields


class Protector(Protocol):
    """Protects clear PANs before they are stored (kms.issuance.pans.PanVault; a software stand-in in unit tests)."""

    def protect(self, cards: Sequence[CardIdentity], batch_id: str = "") -> list[CardIdentity]: ...


class BatchStore(Repository):
    def __init__(self, engine: sa.Engine, clock: Clock, audit: AuditLog | None = None,
                 pans: Protector | None = None) -> None:
        super().__init__(engine, clock, audit)
        self._pans = pans

    def create_batch(
        self, batch_id: str, bureau: str, profile: str, cards: Sequence[CardIdentity], created_by: str
    ) -> Batch:
        """Record a new batch with its cards, all pending, in one transaction. It awaits authorization: it opens
        once every domain of its profile has authorized it (``authorize``, run by an authorize-batch ceremony)."""
        _check_ref("batch_id", batch_id)
        _check_name("bureau", bureau)
        _check_name("profile", profile)
        _check_principal("created_by", created_by)
        if not 1 <= len(cards) <= MAX_BATCH_CARDS:
            raise InvalidArgument("cards", f"a batch lists 1 to {MAX_BATCH_CARDS} cards, not {len(cards)}")
        now = rfc3339(self._clock.now())
        if self._pans is not None and any(c.pan is not None for c in cards if isinstance(c, CardIdentity)):
            cards = self._pans.protect(cards, batch_id)
        seen: dict[str, int] = {}
        rows: list[dict[str, Any]] = []
        for sequence, card in enumerate(cards):
            if not isinstance(card, CardIdentity):
                raise InvalidArgument(f"cards[{sequence}]", "must be a card identity")
            if card.card_ref in seen:
                raise InvalidArgument(
                    f"cards[{sequence}].card_ref", f"{card.card_ref} is already card {seen[card.card_ref]} of the batch"
                )
            seen[card.card_ref] = sequence
            if card.pan is not None:
                raise InvalidArgument(f"cards[{sequence}].pan", "is stored only sealed, never in clear")
            rows.append({
                "batch_id": batch_id, "card_ref": card.card_ref, "sequence": sequence,
                **{name: getattr(card, name) for name in CLEAR_FIELDS}, **_pan_columns(card.protected),
                "bound_fields": None, "chip_bound_at": None, "state": CardState.PENDING.value, "serial": None,
                "bundle": None, "idempotency_key": None, "issued_at": None,
            })
        digest = cards_digest(cards)
        with self._engine.begin() as conn:
            try:
                conn.execute(batches.insert().values(
                    batch_id=batch_id, bureau=bureau, profile=profile, state=BatchState.AWAITING.value,
                    cards_digest=digest, created_by=created_by, created_at=now, card_count=len(rows),
                ))
            except sa.exc.IntegrityError:
                raise AlreadyExists(f"batch {batch_id} already exists") from None
            for chunk in chunks(rows, _INSERT_CHUNK):
                conn.execute(batch_cards.insert(), chunk)
                conn.execute(card_events.insert(), [
                    {"batch_id": batch_id, "card_ref": row["card_ref"], "event": EventKind.CREATED.value,
                     "detail": f"sequence {row['sequence']}", "at": now, "by": created_by}
                    for row in chunk
                ])
            if self._audit is not None:
                self._audit.append(conn, "batch.created", actor=created_by, subject=batch_id, detail={
                    "bureau": bureau, "profile": profile, "card_count": len(rows), "cards_digest": digest})
        return self.get_batch(batch_id)

    def get_batch(self, batch_id: str) -> Batch:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(batches).where(batches.c.batch_id == batch_id)).first()
            if row is None:
                raise NotFound(f"no batch {batch_id}")
            issued = conn.execute(
                sa.select(sa.func.count()).select_from(batch_cards).where(
                    batch_cards.c.batch_id == batch_id, batch_cards.c.state == CardState.ISSUED.value
                )
            ).scalar_one()
            authorized = conn.execute(
                sa.select(batch_authorizations.c.domain, batch_authorizations.c.key_versions)
                .where(batch_authorizations.c.batch_id == batch_id).order_by(batch_authorizations.c.domain)
            ).all()
        m = row._mapping
        return Batch(
            batch_id=m["batch_id"], bureau=m["bureau"], profile=m["profile"], state=BatchState(m["state"]),
            created_by=m["created_by"], created_at=m["created_at"], card_count=m["card_count"], issued_count=issued,
            cards_digest=m["cards_digest"], authorized_by=tuple(a.domain for a in authorized),
            key_versions={a.domain: json.loads(a.key_versions) for a in authorized},
        )

    def authorize(self, batch_id: str, domain: str, ceremony_id: str, digest: str,
                  required: Sequence[str], key_versions: Mapping[str, int] | None = None) -> Batch:
        """Record one domain's authorization of a batch (an executed authorize-batch ceremony) and open the batch
        once every domain in ``required`` (its profile's) has authorized it. The digest must be the batch's own:
        an authorization names exactly the cards it covers. ``key_versions`` pins the domain's master key
        versions the batch's cards are derived from, re-issues included (empty: the newest active ones)."""
        batch = self.get_batch(batch_id)
        if batch.cards_digest != digest:
            raise InvalidArgument("cards_digest", f"does not match the cards of batch {batch_id}")
        if batch.state is not BatchState.AWAITING:
            raise InvalidState(f"batch {batch_id} is {batch.state.value}, not awaiting authorization")
        if domain not in required:
            raise InvalidArgument("domain", f"batch {batch_id} has no {domain} keys")
        now = rfc3339(self._clock.now())
        with self._engine.begin() as conn:
            try:
                conn.execute(batch_authorizations.insert().values(
                    batch_id=batch_id, domain=domain, ceremony_id=ceremony_id, at=now,
                    key_versions=canonical(dict(key_versions or {})).decode()))
            except sa.exc.IntegrityError:
                raise AlreadyExists(f"batch {batch_id} is already authorized by the {domain} domain") from None
            done = set(conn.execute(sa.select(batch_authorizations.c.domain).where(
                batch_authorizations.c.batch_id == batch_id)).scalars())
            opened = done >= set(required) and conn.execute(batches.update().where(
                batches.c.batch_id == batch_id, batches.c.state == BatchState.AWAITING.value
            ).values(state=BatchState.OPEN.value)).rowcount == 1
            if self._audit is not None:
                self._audit.append(conn, "batch.authorized", domain=domain, subject=batch_id, detail={
                    "ceremony_id": ceremony_id, "cards_digest": digest,
                    "key_versions": dict(key_versions or {}),
                    "state": (BatchState.OPEN if opened else BatchState.AWAITING).value})
        return self.get_batch(batch_id)

    def card(self, batch_id: str, card_ref: str) -> CardRecord:
        return self._read(batch_id, card_ref)[0]

    def cards_after(self, batch_id: str, after_sequence: int, limit: int) -> list[CardRecord]:
        """Up to ``limit`` cards whose sequence is greater than ``after_sequence`` (-1: from the start), in order."""
        if isinstance(after_sequence, bool) or not isinstance(after_sequence, int) or after_sequence < -1:
            raise InvalidArgument("after_sequence", "must be -1 (from the start) or the sequence of a card")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument("limit", f"must be from 1 to {MAX_PAGE}")
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(batch_cards)
                .where(batch_cards.c.batch_id == batch_id, batch_cards.c.sequence > after_sequence)
                .order_by(batch_cards.c.sequence)
                .limit(limit)
            ).all()
            if not rows:
                _require_batch(conn, batch_id)
        return [_card(r._mapping) for r in rows]

    def events(self, batch_id: str, card_ref: str | None = None) -> list[CardEvent]:
        """The history of a batch (or of one of its cards), oldest first."""
        query = sa.select(card_events).where(card_events.c.batch_id == batch_id).order_by(card_events.c.id)
        if card_ref is not None:
            query = query.where(card_events.c.card_ref == card_ref)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
            if not rows:
                _require_batch(conn, batch_id)
        return [
            CardEvent(id=m["id"], batch_id=m["batch_id"], card_ref=m["card_ref"], event=EventKind(m["event"]),
                      detail=m["detail"], at=m["at"], by=m["by"])
            for m in (r._mapping for r in rows)
        ]

    def bind_chip(
        self, batch_id: str, card_ref: str, card_serial: str | None, kdd: str | None, *, by: str | None = None
    ) -> CardRecord:
        """Bind chip data read at the station to the card record; see the module docstring for the rules."""
        given = _chip_data(card_ref, card_serial, kdd)
        if by is not None:
            _check_principal("by", by)
        for _ in range(ATTEMPTS):
            record, batch_state = self._read(batch_id, card_ref)
            fill: dict[str, str] = {}
            for name, value in given.items():
                have = getattr(record.identity, name)
                if have is None:
                    fill[name] = value
                elif have != value:
                    if name in record.bound_fields:
                        raise PermissionDenied(
                            f"card {card_ref} is bound to another chip ({name} differs); an officer must re-issue it"
                        )
                    raise PermissionDenied(
                        f"card {card_ref} is not the card this chip belongs to: batch {batch_id} gives it another "
                        f"{name}; use the card the batch lists"
                    )
            if not fill:
                return record
            if batch_state is not BatchState.OPEN:
                raise InvalidState(f"batch {batch_id} is {batch_state.value}")
            if record.state is CardState.ISSUED:
                raise PermissionDenied(
                    f"card {card_ref} was issued without this chip's {' and '.join(sorted(fill))}; "
                    "an officer must re-issue it"
                )
            if record.state is not CardState.PENDING:
                raise InvalidState(f"card {card_ref} of batch {batch_id} is {record.state.value}")
            bound = _join(record.bound_fields | fill.keys())
            now = rfc3339(self._clock.now())
            with self._engine.begin() as conn:
                won = conn.execute(
                    batch_cards.update()
                    .where(
                        _is_card(batch_id, card_ref),
                        batch_cards.c.state == CardState.PENDING.value,
                        batch_cards.c.bound_fields.is_not_distinct_from(_join(record.bound_fields)),
                        *(batch_cards.c[name].is_(None) for name in fill),
                        _batch_is_open(batch_id),
                    )
                    .values(**fill, bound_fields=bound, chip_bound_at=now)
                ).rowcount == 1
                if won:
                    detail = ", ".join(f"{name}={value}" for name, value in sorted(fill.items()))
                    _event(conn, batch_id, card_ref, EventKind.CHIP_BOUND, detail, now, by)
                    if self._audit is not None:  # which fields were bound, never their values
                        self._audit.append(conn, "card.chip-bound", actor=by or "", subject=f"{batch_id}/{card_ref}",
                                           detail={"fields": sorted(fill)})
            if won:
                return self.card(batch_id, card_ref)
        raise self._kept_changing(f"card {card_ref} of batch {batch_id}")

    def reissue(self, batch_id: str, card_ref: str, by: str, *, domain: str, needs: Collection[str]
                ) -> tuple[CardRecord, tuple[str, ...]]:
        """One domain's consent (officer ``by`` of ``domain``) to revoke the card's chip binding and any issued
        bundle, so that it can be issued again with the same keys. The revocation happens, in the same transaction,
        once every domain in ``needs`` (the batch profile's domains) has consented (kms.issuance.consents); returns the
        card's record and the domains whose consent is still awaited (empty: re-issued)."""
        _check_principal("by", by)
        subject = f"{batch_id}/{card_ref}"
        for _ in range(ATTEMPTS):
            record, batch_state = self._read(batch_id, card_ref)
            if batch_state is not BatchState.OPEN:
                raise InvalidState(f"batch {batch_id} is {batch_state.value}")
            if record.state is CardState.REVOKED:
                raise InvalidState(f"card {card_ref} of batch {batch_id} is revoked")
            if record.state is CardState.PENDING and not record.bound_fields:
                raise InvalidState(f"card {card_ref} of batch {batch_id} has no chip binding or bundle to revoke")
            moment = self._clock.now()
            now = rfc3339(moment)
            # What this consent is to: the record as read now (another state, bundle or binding needs new consents).
            basis = f"{record.state.value}|{record.serial or ''}|{_join(record.bound_fields) or ''}"
            with self._engine.begin() as conn:
                # Consents of one card are counted one at a time (replicas, PostgreSQL): the card's row first.
                locked = conn.execute(sa.select(batch_cards.c.state, batch_cards.c.serial, batch_cards.c.bound_fields)
                                      .where(_is_card(batch_id, card_ref)).with_for_update()).one()
                if (locked.state, locked.serial, locked.bound_fields) != (
                        record.state.value, record.serial, _join(record.bound_fields)):
                    continue  # changed since it was read: judge it again
                given = consents.give(conn, "reissue", subject, domain, by, "re-issue", moment, basis)
                awaiting = tuple(sorted(set(needs) - set(given)))
                if awaiting:
                    if self._audit is not None:
                        self._audit.append(conn, "card.reissue-consented", actor=by, domain=domain, subject=subject,
                                           detail={"awaiting": list(awaiting)})
                    return record, awaiting
                won = conn.execute(
                    batch_cards.update()
                    .where(
                        _is_card(batch_id, card_ref),
                        batch_cards.c.state == record.state.value,
                        batch_cards.c.bound_fields.is_not_distinct_from(_join(record.bound_fields)),
                        batch_cards.c.serial.is_not_distinct_from(record.serial),
                        _batch_is_open(batch_id),
                    )
                    .values(
                        **dict.fromkeys(record.bound_fields), bound_fields=None, chip_bound_at=None,
                        state=CardState.PENDING.value, serial=None, bundle=None, idempotency_key=None,
                        issued_at=None,
                    )
                ).rowcount == 1
                if won:
                    consents.clear(conn, "reissue", subject)
                    _event(conn, batch_id, card_ref, EventKind.REISSUE_REVOKED, _revoked(record), now, by)
                    if self._audit is not None:
                        self._audit.append(conn, "card.reissued", actor=by, subject=subject, detail={
                            "previous_state": record.state.value, "revoked_binding": sorted(record.bound_fields),
                            "revoked_bundle": record.serial or "",
                            "consented_by": {d: c.by for d, c in sorted(given.items())}})
            if won:
                return self.card(batch_id, card_ref), ()
        raise self._kept_changing(f"card {card_ref} of batch {batch_id}")

    def record_issued(
        self,
        batch_id: str,
        card_ref: str,
        serial: str,
        bundle: bytes,
        idempotency_key: str | None,
        *,
        by: str | None = None,
        sealed_for: CardIdentity | None = None,
    ) -> CardRecord:
        """Store the sealed bundle of a pending card, at most once: AlreadyExists if the card is already issued.

        ``sealed_for``, when given, is the identity the bundle was sealed for: if the record no longer says the same
        (an officer re-issued the card and another chip was bound meanwhile), nothing is stored (InvalidState).
        """
        _check_ref("serial", serial)
        if not isinstance(bundle, bytes) or not bundle:
            raise InvalidArgument("bundle", "must be non-empty bytes")
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not IDEMPOTENCY_KEY.fullmatch(idempotency_key)
        ):
            raise InvalidArgument("idempotency_key", "must be 1 to 128 printable ASCII characters without spaces")
        if by is not None:
            _check_principal("by", by)
        if sealed_for is not None and sealed_for.card_ref != card_ref:
            raise InvalidArgument("sealed_for", f"names card {sealed_for.card_ref}, not {card_ref}")
        now = rfc3339(self._clock.now())
        with self._engine.begin() as conn:
            won = _store_issued(conn, batch_id, card_ref, serial, bundle, idempotency_key, sealed_for, now, by)
            if won and self._audit is not None:
                masked = conn.execute(sa.select(batch_cards.c.pan_masked).where(_is_card(batch_id, card_ref))).scalar()
                self._audit.append_many(conn, [_issued_record(batch_id, card_ref, serial, masked, by)])
        record, batch_state = self._read(batch_id, card_ref)
        if won:
            return record
        if record.state is CardState.ISSUED:
            raise AlreadyExists(f"card {card_ref} of batch {batch_id} is already issued (bundle {record.serial})")
        if batch_state is not BatchState.OPEN:
            raise InvalidState(f"batch {batch_id} is {batch_state.value}")
        if record.state is CardState.PENDING:
            raise InvalidState(f"card {card_ref} of batch {batch_id} changed while it was sealed; seal it again")
        raise InvalidState(f"card {card_ref} of batch {batch_id} is {record.state.value}")

    def record_redelivered(self, batch_id: str, sent: Sequence[tuple[str, str]], by: str) -> None:
        """Bundles issued earlier and sent again (an idempotent retry, a stream read again from an earlier cursor):
        one ``issuance.redelivered`` record per (card_ref, bundle serial), written before they are sent, so a
        station cannot fetch a batch again unnoticed. Raises AuditUnavailable (nothing is sent) if it cannot."""
        if self._audit is None or not sent:
            return
        with self._engine.begin() as conn:
            self._audit.append_many(conn, [
                {"kind": "issuance.redelivered", "actor": by, "subject": f"{batch_id}/{card_ref}",
                 "detail": {"serial": serial, "by": by}} for card_ref, serial in sent])

    def record_issued_many(
        self, batch_id: str, issued: Sequence[tuple[CardIdentity, str, bytes]], *, by: str | None = None
    ) -> list[bool]:
        """Store several sealed bundles (identity sealed for, serial, bundle) in one transaction, each at most
        once and only if its card still has that identity; returns, per item, whether it was stored (False: the
        card was issued or changed meanwhile; the caller reads the record). For streams: one commit per message."""
        if by is not None:
            _check_principal("by", by)
        for card, serial, bundle in issued:
            _check_ref("serial", serial)
            if not isinstance(bundle, bytes) or not bundle:
                raise InvalidArgument("bundle", f"{card.card_ref}: must be non-empty bytes")
        now = rfc3339(self._clock.now())
        with self._engine.begin() as conn:
            won = _store_issued_many(conn, batch_id, issued, now, by)
            # The records after the changes: the audit head is locked last, for as short a time as possible.
            if self._audit is not None:
                self._audit.append_many(conn, [
                    _issued_record(batch_id, card.card_ref, serial, card.protected.masked if card.protected else None,
                                   by)
                    for (card, serial, _), stored in zip(issued, won, strict=True) if stored])
        return won

    def _read(self, batch_id: str, card_ref: str) -> tuple[CardRecord, BatchState]:
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(batch_cards, batches.c.state.label("batch_state"))
                .select_from(batch_cards.join(batches, batches.c.batch_id == batch_cards.c.batch_id))
                .where(_is_card(batch_id, card_ref))
            ).first()
            if row is None:
                _require_batch(conn, batch_id)
                raise NotFound(f"no card {card_ref} in batch {batch_id}")
        return _card(row._mapping), BatchState(row._mapping["batch_state"])


def _is_card(batch_id: str, card_ref: str) -> sa.ColumnElement[bool]:
    return sa.and_(batch_cards.c.batch_id == batch_id, batch_cards.c.card_ref == card_ref)


def _batch_is_open(batch_id: str) -> sa.ColumnElement[bool]:
    return sa.exists().where(batches.c.batch_id == batch_id, batches.c.state == BatchState.OPEN.value)


def _require_batch(conn: sa.Connection, batch_id: str) -> None:
    if conn.execute(sa.select(batches.c.batch_id).where(batches.c.batch_id == batch_id)).first() is None:
        raise NotFound(f"no batch {batch_id}")


def _store_issued(conn: sa.Connection, batch_id: str, card_ref: str, serial: str, bundle: bytes,
                  idempotency_key: str | None, sealed_for: CardIdentity | None, now: str, by: str | None) -> bool:
    """The at-most-once store of one card's bundle: a conditional UPDATE (pending, batch open and, with
    ``sealed_for``, the identity it was sealed for) plus its event. Returns whether this call won."""
    conditions = [
        _is_card(batch_id, card_ref), batch_cards.c.state == CardState.PENDING.value, _batch_is_open(batch_id),
    ]
    if sealed_for is not None:
        conditions += [batch_cards.c[name].is_not_distinct_from(getattr(sealed_for, name)) for name in CLEAR_FIELDS]
        conditions.append(batch_cards.c.pan_index.is_not_distinct_from(
            sealed_for.protected.index if sealed_for.protected else None))
    won: bool = conn.execute(
        batch_cards.update()
        .where(*conditions)
        .values(state=CardState.ISSUED.value, serial=serial, bundle=bundle, idempotency_key=idempotency_key,
                issued_at=now)
    ).rowcount == 1
    if won:
        _event(conn, batch_id, card_ref, EventKind.ISSUED, f"bundle {serial}", now, by)
    return won


def _issue_statement() -> sa.Update:
    """``_store_issued``'s conditional UPDATE for a card sealed for a known identity, with every value a bound
    parameter: built (and its cache key computed) once, executed once per card of a stream's message."""
    def bound(name: str) -> sa.BindParameter[Any]:
        return sa.bindparam(f"p_{name}", type_=batch_cards.c[name].type)

    return batch_cards.update().where(
        batch_cards.c.batch_id == sa.bindparam("p_batch_id"), batch_cards.c.card_ref == sa.bindparam("p_card_ref"),
        batch_cards.c.state == CardState.PENDING.value,
        sa.exists().where(batches.c.batch_id == sa.bindparam("p_batch_id"),
                          batches.c.state == BatchState.OPEN.value),
        *[batch_cards.c[name].is_not_distinct_from(bound(name)) for name in (*CLEAR_FIELDS, "pan_index")],
    ).values(state=CardState.ISSUED.value, serial=bound("serial"), bundle=bound("bundle"), idempotency_key=None,
             issued_at=bound("issued_at"))


_ISSUE = _issue_statement()


def _store_issued_many(conn: sa.Connection, batch_id: str, issued: Sequence[tuple[CardIdentity, str, bytes]],
                       now: str, by: str | None) -> list[bool]:
    """``_store_issued`` for several cards, each sealed for its identity (no idempotency key): the same conditional
    UPDATE per card, from one prepared statement, and one multi-row insert of the events of the cards it stored.
    Returns, per card, whether it was stored."""
    won = [conn.execute(_ISSUE, {
        "p_batch_id": batch_id, "p_card_ref": card.card_ref, "p_serial": serial, "p_bundle": bundle,
        "p_issued_at": now, "p_pan_index": card.protected.index if card.protected else None,
        **{f"p_{name}": getattr(card, name) for name in CLEAR_FIELDS},
    }).rowcount == 1 for card, serial, bundle in issued]
    events = [{"batch_id": batch_id, "card_ref": card.card_ref, "event": EventKind.ISSUED.value,
               "detail": f"bundle {serial}", "at": now, "by": by}
              for (card, serial, _), stored in zip(issued, won, strict=True) if stored]
    if events:
        conn.execute(card_events.insert(), events)
    return won


def _issued_record(batch_id: str, card_ref: str, serial: str, masked: str | None, by: str | None
                   ) -> dict[str, Any]:
    """The audit record of one issued card: the bundle serial, the station and the PAN masked as it was stored
    (kms.issuance.pans); no other card identity value."""
    return {"kind": "issuance.issued", "actor": by or "", "subject": f"{batch_id}/{card_ref}",
            "detail": {"serial": serial, "by": by or "", "pan": masked or ""}}


def _pan_columns(protected: ProtectedPan | None) -> dict[str, Any]:
    if protected is None:
        return {"pan_sealed": None, "pan_index": None, "pan_psn_index": None, "pan_masked": None}
    return {"pan_sealed": protected.sealed, "pan_index": protected.index, "pan_psn_index": protected.pan_psn_index,
            "pan_masked": protected.masked}


def protected_pan(m: Any) -> ProtectedPan | None:
    """The protected PAN of a batch_cards row (None: the card has no PAN)."""
    if m["pan_sealed"] is None:
        return None
    return ProtectedPan(sealed=bytes(m["pan_sealed"]), index=m["pan_index"], pan_psn_index=m["pan_psn_index"],
                        masked=m["pan_masked"])


def _event(
    conn: sa.Connection, batch_id: str, card_ref: str, kind: EventKind, detail: str, at: str, by: str | None
) -> None:
    conn.execute(card_events.insert().values(
        batch_id=batch_id, card_ref=card_ref, event=kind.value, detail=detail, at=at, by=by,
    ))


def _revoked(record: CardRecord) -> str:
    parts = []
    if record.bound_fields:
        chip = ", ".join(f"{name}={getattr(record.identity, name)}" for name in sorted(record.bound_fields))
        parts.append(f"chip binding {chip}")
    if record.serial is not None:
        parts.append(f"bundle {record.serial}")
    return "revoked " + "; ".join(parts)


def _card(m: sa.RowMapping) -> CardRecord:
    bundle = m["bundle"]
    return CardRecord(
        batch_id=m["batch_id"], card_ref=m["card_ref"], sequence=m["sequence"],
        identity=CardIdentity(card_ref=m["card_ref"], **{name: m[name] for name in CLEAR_FIELDS},
                              protected=protected_pan(m)),
        bound_fields=frozenset((m["bound_fields"] or "").split()), chip_bound_at=m["chip_bound_at"],
        state=CardState(m["state"]), serial=m["serial"], bundle=None if bundle is None else bytes(bundle),
        idempotency_key=m["idempotency_key"], issued_at=m["issued_at"],
    )


def _join(names: frozenset[str] | set[str]) -> str | None:
    return " ".join(sorted(names)) or None


def _chip_data(card_ref: str, card_serial: str | None, kdd: str | None) -> dict[str, str]:
    given: dict[str, str] = {}
    for name, value in (("card_serial", card_serial), ("kdd", kdd)):
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidArgument(name, "must be a string")
        given[name] = value.upper()
    CardIdentity(card_ref=card_ref, card_serial=given.get("card_serial"), kdd=given.get("kdd"))  # names a bad field
    return given


def _check_ref(field_name: str, value: str) -> None:
    if not isinstance(value, str) or not CARD_REF.fullmatch(value):  # batch ids and bundle serials
        raise InvalidArgument(field_name, "must be 1-64 characters of letters, digits and . _ : -")


def _check_name(field_name: str, value: str) -> None:
    if not isinstance(value, str) or not NAME.fullmatch(value):  # bureau and profile names
        raise InvalidArgument(field_name, "must be 1-64 characters of lower-case letters, digits and . _ -")


def _check_principal(field_name: str, uri: str) -> None:
    if not isinstance(uri, str) or len(uri) > 200:
        raise InvalidArgument(field_name, "must be a kms principal URI (urn:kms:...)")
    try:
        identity.parse_uri(uri)
    except PermissionDenied:
        raise InvalidArgument(field_name, "must be a kms principal URI (urn:kms:...)") from None
