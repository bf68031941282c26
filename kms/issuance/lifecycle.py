"""The card lifecycle: 挂失 report lost, 解挂 cancel the loss report, 补换 replace, 销卡 cancel card, 销户 close
account.

A card is its ``card_ref``, across all batches: its lifecycle applies to every batch record with that card_ref. Each
application of the chip (``hrss``, ``bank``) has its own state:

- ``active`` → ``lost`` (report lost) → ``active`` (cancel the loss report);
- ``active`` or ``lost`` → ``cancelled`` (销卡) or ``closed`` (销户), final; the bank application only once the hrss
  application is cancelled or closed (the bank cancels on HRSS's clearance);
- both applications ``active`` or ``lost`` → ``replaced`` (补换), final for both: the new card (another card record,
  with a new card serial, PAN and KDD, hence new keys) is linked to the old one, the old card's batch records that
  are pending or issued are revoked, and its identities (card serial, PAN+PSN, KDD) are retired for good.
 An officer acts only on the application of their own domain; a replacement, which ends both applications, needs an
officer of each domain (kms.issuance.consents: each consents, the last consent carries it out). Every change is one
conditional UPDATE on the card's row (``version``) plus an append-only event (who, when, what, why), in one transaction;
a lost
race is re-read and re-judged, as in kms.issuance.batches.

Issuance asks ``blocked`` / ``require_issuable``: a card with an application lost, cancelled or closed, a replaced
card, or a card carrying a retired identity is not issued. ``check_new_batch`` refuses a batch listing a retired
identity or a card whose lifecycle has ended.

Tables (kms.store): ``card_lifecycle``, ``card_lifecycle_events``, ``retired_identities``.

With an audit log (kms.audit.log) every event also appends ``lifecycle.<event>`` in the same transaction (fail closed):
the card_ref, application, states, reason and revoked batch records; retired identities by field name only, never
their values.
"""

from __future__ import annotations

import dataclasses
import enum
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from kms.audit.log import AuditLog
from kms.cards.cardid import CardIdentity
from kms.clock import Clock, rfc3339
from kms.errors import InvalidArgument, InvalidState, NotFound, PermissionDenied
from kms.identity import Principal
from kms.issuance import consents
from kms.issuance.batches import CardState, EventKind, Protector
from kms.repository import ATTEMPTS, Repository
from kms.store import batch_cards, card_events, card_lifecycle, card_lifecycle_events, retired_identities
from kms.validation import chunks

APPLICATIONS = ("hrss", "bank")
MAX_REASON = 500
_CHUNK = 500
#: Retired identity fields, how a batch card field maps onto them, and how messages name them.
_RETIRED_FIELDS = {"card_serial": "card_serial", "pan_psn": "pan", "kdd": "kdd"}
_LABELS = {"card_serial": "card serial", "pan": "PAN", "pan_psn": "PAN/PSN", "kdd": "KDD"}


class AppState(enum.StrEnum):
    ACTIVE = "active"
    LOST = "lost"
    CANCELLED = "cancelled"  # 销卡
    CLOSED = "closed"  # 销户
    REPLACED = "replaced"  # 补换


FINAL = frozenset({AppState.CANCELLED, AppState.CLOSED, AppState.REPLACED})


class CancelKind(enum.StrEnum):
    CANCEL_CARD = "cancel-card"  # 销卡
    CLOSE_ACCOUNT = "close-account"  # 销户

    @property
    def state(self) -> AppState:
        return AppState.CANCELLED if self is CancelKind.CANCEL_CARD else AppState.CLOSED


class Event(enum.StrEnum):
    REPORTED_LOST = "reported-lost"
    LOSS_REPORT_CANCELLED = "loss-report-cancelled"
    CANCELLED = "cancelled"
    CLOSED = "closed"
    REPLACED = "replaced"
    REPLACES = "replaces"


@dataclass(frozen=True)
class CardStatus:
    card_ref: str
    hrss: AppState
    bank: AppState
    replaced_by: str | None
    replaces: str | None
    version: int  # 0: no row yet

    def state(self, application: str) -> AppState:
        return self.hrss if application == "hrss" else self.bank


@dataclass(frozen=True)
class LifecycleEvent:
    id: int
    card_ref: str
    application: str | None
    event: Event
    from_state: str | None
    to_state: str | None
    reason: str
    detail: str
    at: str
    by: str


@dataclass(frozen=True)
class RecordState:
    batch_id: str
    state: CardState
    serial: str | None


@dataclass(frozen=True)
class CardView:
    status: CardStatus
    since: dict[str, str | None]  # per application: time of its last change
    records: list[RecordState]
    history: list[LifecycleEvent]
    awaiting_consent: tuple[str, ...] = ()  # a replacement's answer: domains whose officers must still consent


class _Lost(Exception):
    """A conditional UPDATE found the row changed: re-read and re-judge."""


class CardLifecycle(Repository):
    def __init__(self, engine: sa.Engine, clock: Clock, audit: AuditLog | None = None,
                 pans: Protector | None = None) -> None:
        super().__init__(engine, clock, audit)
        self._pans = pans  # for cards given with a clear PAN (the service protects them before asking)

    # -- changes ----------------------------------------------------------------------------------------------------

    def report_lost(self, card_ref: str, application: str, reason: str, by: Principal) -> CardView:
        """挂失: block one application of the card until the report is cancelled."""
        def judge(status: CardStatus) -> AppState:
            _require_open(status, application)
            if status.state(application) is AppState.LOST:
                raise InvalidState(f"the {application} application of card {card_ref} is already reported lost")
            return AppState.LOST
        return self._change(card_ref, application, reason, by, judge, Event.REPORTED_LOST)

    def cancel_loss_report(self, card_ref: str, application: str, reason: str, by: Principal) -> CardView:
        """解挂: lift the loss report of one application."""
        def judge(status: CardStatus) -> AppState:
            _require_open(status, application)
            if status.state(application) is not AppState.LOST:
                raise InvalidState(f"the {application} application of card {card_ref} is not reported lost "
                                   f"(it is {status.state(application).value})")
            return AppState.ACTIVE
        return self._change(card_ref, application, reason, by, judge, Event.LOSS_REPORT_CANCELLED)

    def cancel_application(self, card_ref: str, application: str, kind: str, reason: str, by: Principal
                           ) -> CardView:
        """销卡 / 销户: end one application for good; the bank application only after the hrss one."""
        if kind not in set(CancelKind):
            raise InvalidArgument("kind", "must be cancel-card (销卡) or close-account (销户)")
        target = CancelKind(kind).state

        def judge(status: CardStatus) -> AppState:
            _require_open(status, application)
            if application == "bank" and status.hrss not in (AppState.CANCELLED, AppState.CLOSED):
                raise InvalidState(
                    f"the bank application of card {card_ref} can be {target.value} only after the hrss application "
                    f"is cancelled (HRSS cancels first); the hrss application is {status.hrss.value}")
            return target
        event = Event.CANCELLED if target is AppState.CANCELLED else Event.CLOSED
        return self._change(card_ref, application, reason, by, judge, event)

    def replace(self, old_card_ref: str, new_card_ref: str, reason: str, by: Principal) -> CardView:
        """补换: one domain's consent (officer ``by``) to the new card replacing the old one. A replacement ends both
        applications, so it happens, in the same transaction as the last consent, once an officer of each domain
        consented (kms.issuance.consents). Returns the old card's view, with the domains still to consent."""
        _check_ref("old_card_ref", old_card_ref)
        _check_ref("new_card_ref", new_card_ref)
        if new_card_ref == old_card_ref:
            raise InvalidArgument("new_card_ref", "must name another card than old_card_ref")
        reason = _check_reason(reason)
        _require_officer(by)
        assert by.domain is not None
        subject = f"{old_card_ref}>{new_card_ref}"
        for _ in range(ATTEMPTS):
            with self._engine.connect() as conn:
                old = _status(conn, old_card_ref)
                new = _status(conn, new_card_ref)
                old_ids, old_shown = _identities(conn, old_card_ref)
                new_ids, new_shown = _identities(conn, new_card_ref)
                retired = _retired(conn, [(f, v) for f in _RETIRED_FIELDS for v in new_ids[f]])
            for application in APPLICATIONS:
                _require_open(old, application)
            if new.replaced_by is not None or new.replaces is not None or new.hrss is not AppState.ACTIVE \
                    or new.bank is not AppState.ACTIVE:
                raise InvalidState(f"card {new_card_ref} cannot be a replacement card: {_describe(new)}")
            for name in ("card_serial", "pan", "kdd"):
                same = sorted(old_ids[name] & new_ids[name])
                if same:
                    raise InvalidArgument("new_card_ref", f"card {new_card_ref} has the same {_LABELS[name]} as card "
                                          f"{old_card_ref} ({old_shown.get(same[0], same[0])}); a replacement card "
                                          "needs a new card serial, "
                                          "PAN and KDD, hence new keys")
            if retired:
                (name, value), owner = min(retired.items())
                raise InvalidArgument("new_card_ref", f"card {new_card_ref} has the {_LABELS[name]} "
                                      f"{new_shown.get(value, value)} of card "
                                      f"{owner}, which was replaced; it is retired")
            moment = self._clock.now()
            now = rfc3339(moment)
            to_retire = [(f, v) for f in _RETIRED_FIELDS for v in sorted(old_ids[f])]
            try:
                with self._engine.begin() as conn:
                    # Consents for one old card are counted one at a time (replicas, PostgreSQL): its rows first.
                    conn.execute(sa.select(batch_cards.c.card_ref).where(batch_cards.c.card_ref == old_card_ref)
                                 .with_for_update())
                    given = consents.give(conn, "replace", subject, by.domain, by.uri(), reason, moment)
                    awaiting = tuple(sorted(set(APPLICATIONS) - set(given)))
                    if awaiting:
                        if self._audit is not None:
                            self._audit.append(conn, "lifecycle.replace-consented", actor=by.uri(), domain=by.domain,
                                               subject=old_card_ref, detail={"replaced_by": new_card_ref,
                                                                             "reason": reason,
                                                                             "awaiting": list(awaiting)})
                    else:
                        consents.clear(conn, "replace", subject)
                        _write(conn, old, {"hrss_state": AppState.REPLACED.value,
                                           "bank_state": AppState.REPLACED.value, "replaced_by": new_card_ref}, now)
                        _write(conn, new, {"replaces": old_card_ref}, now)
                        already = _retired(conn, to_retire)  # e.g. a value two cards shared
                        fresh = [{"field": f, "value": v, "shown": old_shown.get(v, v), "card_ref": old_card_ref,
                                  "retired_at": now, "retired_by": by.uri()}
                                 for f, v in to_retire if (f, v) not in already]
                        if fresh:
                            conn.execute(retired_identities.insert(), fresh)
                        revoked = _revoke_records(conn, old_card_ref, f"card replaced by {new_card_ref}", now,
                                                  by.uri())
                        retired_text = ", ".join(f"{_LABELS[f]} {old_shown.get(v, v)}" for f, v in to_retire) \
                            or "none known"
                        consented = ", ".join(f"{d} {c.by}" for d, c in sorted(given.items()))
                        detail = (f"replaced by card {new_card_ref}; retired identities: {retired_text}; revoked "
                                  f"records: {revoked or 'none'}; consented: {consented}")
                        for application in APPLICATIONS:
                            _event(conn, old_card_ref, application, Event.REPLACED, old.state(application),
                                   AppState.REPLACED, reason, detail, now, by)
                        _event(conn, new_card_ref, None, Event.REPLACES, None, None, reason,
                               f"replaces card {old_card_ref}", now, by)
                        if self._audit is not None:
                            retired_fields = sorted({f for f, _ in to_retire})
                            for application in APPLICATIONS:
                                self._record(conn, Event.REPLACED, old_card_ref, application, old.state(application),
                                             AppState.REPLACED, reason, by, {
                                                 "replaced_by": new_card_ref, "retired": retired_fields,
                                                 "revoked": revoked,
                                                 "consented_by": {d: c.by for d, c in sorted(given.items())}})
                            self._record(conn, Event.REPLACES, new_card_ref, None, None, None, reason, by,
                                         {"replaces": old_card_ref})
            except (_Lost, sa.exc.IntegrityError):
                continue
            return dataclasses.replace(self.view(old_card_ref), awaiting_consent=awaiting)
        raise self._kept_changing(f"card {old_card_ref}")

    # -- reading ----------------------------------------------------------------------------------------------------

    def view(self, card_ref: str) -> CardView:
        """The card's state per application, its batch records and its history (oldest first)."""
        _check_ref("card_ref", card_ref)
        with self._engine.connect() as conn:
            status = _status(conn, card_ref)
            records = [RecordState(r.batch_id, CardState(r.state), r.serial) for r in conn.execute(
                sa.select(batch_cards.c.batch_id, batch_cards.c.state, batch_cards.c.serial)
                .where(batch_cards.c.card_ref == card_ref).order_by(batch_cards.c.batch_id))]
            history = [LifecycleEvent(
                id=m["id"], card_ref=m["card_ref"], application=m["application"], event=Event(m["event"]),
                from_state=m["from_state"], to_state=m["to_state"], reason=m["reason"], detail=m["detail"],
                at=m["at"], by=m["by"]) for m in (r._mapping for r in conn.execute(
                    sa.select(card_lifecycle_events).where(card_lifecycle_events.c.card_ref == card_ref)
                    .order_by(card_lifecycle_events.c.id)))]
        since: dict[str, str | None] = {a: None for a in APPLICATIONS}
        for event in history:
            if event.application is not None:
                since[event.application] = event.at
        return CardView(status, since, records, history)

    def blocked(self, cards: Sequence[CardIdentity]) -> dict[str, str]:
        """For the cards that must not be issued: card_ref → the reason, naming the card."""
        cards = self._protected(cards)
        states, retired = self._lookup(cards)
        reasons: dict[str, str] = {}
        for card in cards:
            status = states.get(card.card_ref)
            reason = _state_reason(status) if status is not None else None
            if reason is None:
                for name, value in _card_values(card):
                    if (name, value) in retired:
                        reason = (f"card {card.card_ref} has the {_LABELS[name]} {_shown(card, value)} of card "
                                  f"{retired[(name, value)]}, which was replaced: its keys are never derived again")
                        break
            if reason is not None:
                reasons[card.card_ref] = reason
        return reasons

    def require_issuable(self, card: CardIdentity) -> None:
        """InvalidState naming the card and the reason, if the card is in a blocking state."""
        reason = self.blocked([card]).get(card.card_ref)
        if reason is not None:
            raise InvalidState(reason)

    def check_new_batch(self, cards: Sequence[CardIdentity]) -> None:
        """InvalidArgument naming ``cards[<i>].<field>`` for the first card of a new batch that lists a retired
        identity or a card whose lifecycle has ended (replaced, cancelled, closed). A lost card may be listed: it
        is refused at issuance while the report stands."""
        cards = self._protected(cards)
        states, retired = self._lookup(cards)
        for i, card in enumerate(cards):
            status = states.get(card.card_ref)
            if status is not None and (status.replaced_by is not None or status.hrss in FINAL or status.bank in FINAL):
                raise InvalidArgument(f"cards[{i}].card_ref", f"card {card.card_ref} can never be issued again: "
                                      f"{_describe(status)}")
            for name, value in _card_values(card):
                if (name, value) in retired:
                    raise InvalidArgument(f"cards[{i}].{_RETIRED_FIELDS[name]}",
                                          f"{_LABELS[name]} {_shown(card, value)} was retired when card "
                                          f"{retired[(name, value)]} "
                                          "was replaced; a replaced card's keys are never derived again")

    # -- internals --------------------------------------------------------------------------------------------------

    def _change(self, card_ref: str, application: str, reason: str, by: Principal,
                judge: Callable[[CardStatus], AppState], event: Event) -> CardView:
        _check_ref("card_ref", card_ref)
        if application not in APPLICATIONS:
            raise InvalidArgument("application", "must be hrss or bank")
        reason = _check_reason(reason)
        _require_officer(by)
        if by.domain != application:
            raise PermissionDenied(f"{by} cannot act on the {application} application of card {card_ref}: an "
                                   f"officer acts only on the application of their own domain ({by.domain})")
        for _ in range(ATTEMPTS):
            with self._engine.connect() as conn:
                status = _status(conn, card_ref)
            target = judge(status)
            now = rfc3339(self._clock.now())
            try:
                with self._engine.begin() as conn:
                    _write(conn, status, {f"{application}_state": target.value}, now)
                    detail, revoked = "", ""
                    if target in (AppState.CANCELLED, AppState.CLOSED):
                        revoked = _revoke_records(conn, card_ref, f"{application} application {target.value}", now,
                                                  by.uri())
                        detail = f"revoked records: {revoked}" if revoked else ""
                    _event(conn, card_ref, application, event, status.state(application), target, reason, detail,
                           now, by)
                    if self._audit is not None:
                        self._record(conn, event, card_ref, application, status.state(application), target, reason,
                                     by, {"revoked": revoked} if revoked else {})
            except (_Lost, sa.exc.IntegrityError):
                continue
            return self.view(card_ref)
        raise self._kept_changing(f"card {card_ref}")

    def _record(self, conn: sa.Connection, event: Event, card_ref: str, application: str | None,
                from_state: AppState | None, to_state: AppState | None, reason: str, by: Principal,
                detail: dict[str, Any]) -> None:
        """The audit record of one lifecycle event (card_ref, never a card identity value)."""
        assert self._audit is not None
        self._audit.append(conn, f"lifecycle.{event.value}", actor=by.uri(), domain=application or "",
                           subject=card_ref, detail={
                               "application": application or "", "from": "" if from_state is None else from_state.value,
                               "to": "" if to_state is None else to_state.value, "reason": reason, **detail})

    def _protected(self, cards: Sequence[CardIdentity]) -> Sequence[CardIdentity]:
        if self._pans is not None and any(c.pan is not None for c in cards):
            return self._pans.protect(cards)
        return cards

    def _lookup(self, cards: Sequence[CardIdentity]
                ) -> tuple[dict[str, CardStatus], dict[tuple[str, str], str]]:
        refs = sorted({c.card_ref for c in cards})
        pairs = sorted({pair for c in cards for pair in _card_values(c)})
        states: dict[str, CardStatus] = {}
        with self._engine.connect() as conn:
            for chunk in chunks(refs, _CHUNK):
                for row in conn.execute(sa.select(card_lifecycle).where(card_lifecycle.c.card_ref.in_(chunk))):
                    states[row.card_ref] = _row_status(row._mapping)
            retired = _retired(conn, pairs)
        return states, retired


def _status(conn: sa.Connection, card_ref: str) -> CardStatus:
    row = conn.execute(sa.select(card_lifecycle).where(card_lifecycle.c.card_ref == card_ref)).first()
    if row is not None:
        return _row_status(row._mapping)
    if conn.execute(sa.select(batch_cards.c.batch_id).where(batch_cards.c.card_ref == card_ref).limit(1)).first() \
            is None:
        raise NotFound(f"no card {card_ref} in any batch")
    return CardStatus(card_ref, AppState.ACTIVE, AppState.ACTIVE, None, None, 0)


def _row_status(m: sa.RowMapping) -> CardStatus:
    return CardStatus(m["card_ref"], AppState(m["hrss_state"]), AppState(m["bank_state"]), m["replaced_by"],
                      m["replaces"], m["version"])


def _write(conn: sa.Connection, status: CardStatus, values: dict[str, Any], now: str) -> None:
    """The conditional change of a card's row (inserted on its first change); _Lost if it changed meanwhile."""
    if status.version == 0:
        row = {"card_ref": status.card_ref, "hrss_state": status.hrss.value, "bank_state": status.bank.value,
               "replaced_by": None, "replaces": None}
        conn.execute(card_lifecycle.insert().values(**{**row, **values}, version=1, changed_at=now))
        return
    changed = conn.execute(
        card_lifecycle.update()
        .where(card_lifecycle.c.card_ref == status.card_ref, card_lifecycle.c.version == status.version)
        .values(**values, version=status.version + 1, changed_at=now)
    ).rowcount
    if changed != 1:
        raise _Lost


def _event(conn: sa.Connection, card_ref: str, application: str | None, event: Event, from_state: AppState | None,
           to_state: AppState | None, reason: str, detail: str, at: str, by: Principal) -> None:
    conn.execute(card_lifecycle_events.insert().values(
        card_ref=card_ref, application=application, event=event.value,
        from_state=None if from_state is None else from_state.value,
        to_state=None if to_state is None else to_state.value, reason=reason, detail=detail, at=at, by=by.uri()))


def _revoke_records(conn: sa.Connection, card_ref: str, why: str, now: str, by: str) -> str:
    """Revoke every pending or issued batch record of the card (its stored bundle is dropped, so it is never sent
    again), each with a card event; returns what was revoked, e.g. "B1 (bundle S1), B2"."""
    revoked = []
    batch_ids = conn.execute(sa.select(batch_cards.c.batch_id).where(batch_cards.c.card_ref == card_ref)
                             .order_by(batch_cards.c.batch_id)).scalars().all()
    for batch_id in batch_ids:
        live = sa.and_(batch_cards.c.batch_id == batch_id, batch_cards.c.card_ref == card_ref,
                       batch_cards.c.state.in_([CardState.PENDING.value, CardState.ISSUED.value]))
        if conn.execute(batch_cards.update().where(live).values(state=CardState.REVOKED.value, bundle=None)
                        ).rowcount != 1:
            continue
        serial = conn.execute(sa.select(batch_cards.c.serial).where(
            batch_cards.c.batch_id == batch_id, batch_cards.c.card_ref == card_ref)).scalar()
        what = f"bundle {serial}" if serial else "not issued"
        conn.execute(card_events.insert().values(
            batch_id=batch_id, card_ref=card_ref, event=EventKind.LIFECYCLE_REVOKED.value,
            detail=f"revoked ({what}): {why}", at=now, by=by))
        revoked.append(f"{batch_id} ({what})")
    return ", ".join(revoked)


def _identities(conn: sa.Connection, card_ref: str) -> tuple[dict[str, set[str]], dict[str, str]]:
    """Every identity value the card's records carry: card_serial, pan and pan_psn (their keyed indexes,
    kms.issuance.pans), kdd; and how messages show each (a PAN masked)."""
    found: dict[str, set[str]] = {"card_serial": set(), "pan": set(), "pan_psn": set(), "kdd": set()}
    shown: dict[str, str] = {}
    rows = conn.execute(sa.select(batch_cards.c.card_serial, batch_cards.c.pan_index, batch_cards.c.pan_psn_index,
                                  batch_cards.c.pan_masked, batch_cards.c.psn, batch_cards.c.kdd)
                        .where(batch_cards.c.card_ref == card_ref))
    for row in rows:
        for name, value in _values(row.card_serial, row.pan_psn_index, row.kdd):
            found[name].add(value)
        if row.pan_index is not None:
            found["pan"].add(row.pan_index)
            shown[row.pan_index] = row.pan_masked
            shown[row.pan_psn_index] = f"{row.pan_masked}/{row.psn or ''}"
    return found, shown


def _card_values(card: CardIdentity) -> list[tuple[str, str]]:
    if card.pan is not None:
        raise InvalidState(f"card {card.card_ref}: its PAN must be sealed by the bank domain before it is looked up")
    return _values(card.card_serial, card.protected.pan_psn_index if card.protected else None, card.kdd)


def _shown(card: CardIdentity, value: str) -> str:
    """How a message names one of the card's identity values: a PAN/PSN index as the PAN masked, with its PSN."""
    if card.protected is not None and value == card.protected.pan_psn_index:
        return f"{card.protected.masked}/{card.psn or ''}"
    return value


def _values(card_serial: str | None, pan_psn_index: str | None, kdd: str | None) -> list[tuple[str, str]]:
    """The retirable identity values: card serial (hrss), PAN+PSN (bank; its keyed index), KDD."""
    values = []
    if card_serial is not None:
        values.append(("card_serial", card_serial))
    if pan_psn_index is not None:
        values.append(("pan_psn", pan_psn_index))
    if kdd is not None:
        values.append(("kdd", kdd))
    return values


def _retired(conn: sa.Connection, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Which of these (field, value) pairs are retired: pair → the replaced card that carried it."""
    wanted = set(pairs)
    found: dict[tuple[str, str], str] = {}
    for chunk in chunks(sorted({v for _, v in wanted}), _CHUNK):
        for row in conn.execute(sa.select(retired_identities).where(retired_identities.c.value.in_(chunk))):
            if (row.field, row.value) in wanted:
                found[(row.field, row.value)] = row.card_ref
    return found


def _state_reason(status: CardStatus) -> str | None:
    if status.replaced_by is not None:
        return f"card {status.card_ref} was replaced by card {status.replaced_by}: its keys are never derived again"
    for application in APPLICATIONS:
        state = status.state(application)
        if state in FINAL:
            return f"card {status.card_ref} is {state.value} ({application}); it is never issued again"
    for application in APPLICATIONS:
        if status.state(application) is AppState.LOST:
            return f"card {status.card_ref} is reported lost ({application}); cancel the report first"
    return None


def _describe(status: CardStatus) -> str:
    if status.replaced_by is not None:
        return f"it was replaced by card {status.replaced_by}"
    if status.replaces is not None:
        return f"it already replaces card {status.replaces}"
    return f"its hrss application is {status.hrss.value} and its bank application {status.bank.value}"


def _require_open(status: CardStatus, application: str) -> None:
    """InvalidState if the application can no longer change (replaced, cancelled, closed)."""
    if status.replaced_by is not None:
        raise InvalidState(f"card {status.card_ref} was replaced by card {status.replaced_by}; it can no longer "
                           "change")
    state = status.state(application)
    if state in FINAL:
        raise InvalidState(f"the {application} application of card {status.card_ref} is {state.value}; that is final")


def _require_officer(by: Principal) -> None:
    if not isinstance(by, Principal) or by.role != "officer" or by.domain not in APPLICATIONS:
        raise PermissionDenied(f"{by} is not a security officer")


def _check_ref(field_name: str, value: str) -> None:
    if not value:
        raise InvalidArgument(field_name, "is required")
    try:
        CardIdentity(card_ref=value)
    except InvalidArgument as error:
        raise InvalidArgument(field_name, error.reason) from None


def _check_reason(reason: str) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidArgument("reason", "is required: say why (it is recorded with the change)")
    reason = reason.strip()
    if len(reason) > MAX_REASON:
        raise InvalidArgument("reason", f"must be at most {MAX_REASON} characters")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in reason):
        raise InvalidArgument("reason", "must be one line of text without control characters")
    return reason
