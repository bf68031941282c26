"""Batch store conformance: the same tests on every store backend (SQLite always; PostgreSQL when
KMS_TEST_POSTGRES_URL is set, skipped otherwise)."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import EngineFactory, SoftwarePans, pan_index

from kms import store
from kms.audit.log import AuditLog, AuditUnavailable
from kms.cards.cardid import CardIdentity
from kms.clock import FixedClock
from kms.errors import AlreadyExists, InvalidArgument, InvalidState, NotFound, PermissionDenied
from kms.issuance import batches as batches_module
from kms.issuance.batches import BatchState, BatchStore, CardState, EventKind

POSTGRES = os.environ.get("KMS_TEST_POSTGRES_URL")
START = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
OFFICER = "urn:kms:officer:hrss:alice"
OTHER_OFFICER = "urn:kms:officer:bank:bob"
STATION = "urn:kms:station:bureau-a:station-a1"
SERIAL_A = "86843202AD932A48"
SERIAL_B = "86843202AD932A49"
KDD_A = "00010203040506070809"
KDD_B = "000102030405060708FF"


@pytest.fixture
def engine(backend: EngineFactory) -> sa.Engine:
    return backend()


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(START)


@pytest.fixture
def bstore(engine: sa.Engine, clock: FixedClock) -> BatchStore:
    return BatchStore(engine, clock, pans=SoftwarePans())


def card(i: int, **overrides: str) -> CardIdentity:
    """A card whose chip data (card serial, KDD) is left to binding unless given."""
    fields = {"card_ref": f"card-{i:04d}", "city_code": "320200", "pan": f"{6214830000000000000 + i}", "psn": "01"}
    fields.update(overrides)
    return CardIdentity(**fields)


def make_batch(bstore: BatchStore, n: int = 3, batch_id: str = "B-1", **overrides: str) -> list[CardIdentity]:
    cards = [card(i, **overrides) for i in range(n)]
    bstore.create_batch(batch_id, "bureau-a", "dual-app", cards, OFFICER)
    authorize(bstore, batch_id)
    return cards


def authorize(bstore: BatchStore, batch_id: str) -> None:
    """Both domains' authorize-batch ceremonies, as executing them records it."""
    digest = bstore.get_batch(batch_id).cards_digest
    for domain in ("hrss", "bank"):
        bstore.authorize(batch_id, domain, f"C-{domain}", digest, ("hrss", "bank"))


def count_rows(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


# --- creation ---------------------------------------------------------------------------------------------------


def test_create_batch_records_cards_in_order_with_counts(bstore: BatchStore) -> None:
    cards = [card(0), card(1, card_serial=SERIAL_A), card(2, kdd=KDD_A)]
    created = bstore.create_batch("B-2026.01:x", "bureau-a", "dual-app", cards, OFFICER)
    assert created == bstore.get_batch("B-2026.01:x")
    assert (created.bureau, created.profile, created.state, created.created_by, created.created_at) == (
        "bureau-a", "dual-app", BatchState.AWAITING, OFFICER, "2026-01-02T03:04:05Z")
    assert created.cards_digest == batches_module.cards_digest(SoftwarePans().protect(cards))
    assert created.authorized_by == ()
    with pytest.raises(InvalidState, match="awaiting-authorization"):
        bstore.record_issued("B-2026.01:x", "card-0001", "S1", b"bundle-1", "idem-1")
    authorize(bstore, "B-2026.01:x")
    assert bstore.get_batch("B-2026.01:x").state is BatchState.OPEN
    assert (created.card_count, created.issued_count) == (3, 0)
    for i, given in enumerate(cards):
        record = bstore.card("B-2026.01:x", given.card_ref)
        # the PAN is kept only protected (kms.issuance.pans): masked for people, sealed for the bank's workers
        assert (record.sequence, record.identity, record.state) == (i, replace(given, pan=None), CardState.PENDING)
        assert record.identity.protected is not None and given.pan is not None
        assert record.identity.protected.masked == given.pan[:6] + "*" * (len(given.pan) - 10) + given.pan[-4:]
        assert given.pan.encode() not in record.identity.protected.sealed
        assert (record.bound_fields, record.chip_bound_at) == (frozenset(), None)
        assert (record.serial, record.bundle, record.idempotency_key) == (None, None, None)
    bstore.record_issued("B-2026.01:x", "card-0001", "S1", b"bundle-1", "idem-1")
    assert bstore.get_batch("B-2026.01:x").issued_count == 1


def test_the_digest_binds_each_cards_pan_but_not_by_a_plain_hash(bstore: BatchStore) -> None:
    """The finding: with PANs protected before the digest, two batches differing only in a PAN had one digest,
    so the bank's approvers did not sign its derivation input. The PAN enters as its keyed index."""
    one = bstore.create_batch("B-d1", "bureau-a", "dual-app", [card(1)], OFFICER).cards_digest
    other = bstore.create_batch("B-d2", "bureau-a", "dual-app", [card(1, pan="6214830000000009992")],
                                OFFICER).cards_digest
    assert one != other
    with pytest.raises(InvalidArgument, match="enters the batch digest only sealed"):
        batches_module.cards_digest([card(1)])


def test_a_batch_is_created_once(bstore: BatchStore, engine: sa.Engine) -> None:
    make_batch(bstore, 2)
    with pytest.raises(AlreadyExists, match="batch B-1 already exists"):
        bstore.create_batch("B-1", "bureau-b", "bank-only", [card(7)], OTHER_OFFICER)
    batch = bstore.get_batch("B-1")
    assert (batch.bureau, batch.card_count, batch.created_by) == ("bureau-a", 2, OFFICER)
    with pytest.raises(NotFound):
        bstore.card("B-1", "card-0007")
    assert count_rows(engine, store.batch_cards) == 2


def test_a_card_listed_twice_is_refused_and_nothing_is_written(bstore: BatchStore, engine: sa.Engine) -> None:
    with pytest.raises(InvalidArgument) as raised:
        bstore.create_batch("B-1", "bureau-a", "dual-app", [card(0), card(1), card(0, pan="6214830000000000099")],
                            OFFICER)
    assert raised.value.field == "cards[2].card_ref"
    assert "already card 0" in raised.value.reason
    with pytest.raises(NotFound):
        bstore.get_batch("B-1")
    assert count_rows(engine, store.batch_cards) == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("batch_id", ""), ("batch_id", "-leading-dash"), ("batch_id", "has space"), ("batch_id", "x" * 65),
        ("batch_id", "批次1"), ("batch_id", "b/1"), ("bureau", "Bureau-A"), ("bureau", ""), ("profile", "dual app"),
        ("created_by", "alice"), ("created_by", "urn:kms:officer:nowhere:alice"),
    ],
)
def test_bad_batch_fields_are_refused_by_name(bstore: BatchStore, name: str, value: str) -> None:
    args = {"batch_id": "B-1", "bureau": "bureau-a", "profile": "dual-app", "created_by": OFFICER, name: value}
    with pytest.raises(InvalidArgument) as raised:
        bstore.create_batch(cards=[card(0)], **args)
    assert raised.value.field == name
    with pytest.raises(NotFound):
        bstore.get_batch(args["batch_id"])


def test_longest_batch_id_is_accepted(bstore: BatchStore) -> None:
    batch_id = "B" + "x" * 63
    bstore.create_batch(batch_id, "bureau-a", "dual-app", [card(0)], OFFICER)
    assert bstore.get_batch(batch_id).batch_id == batch_id


def test_batch_size_limits(bstore: BatchStore, monkeypatch: pytest.MonkeyPatch) -> None:
    assert batches_module.MAX_BATCH_CARDS == 100_000
    with pytest.raises(InvalidArgument) as raised:
        bstore.create_batch("B-empty", "bureau-a", "dual-app", [], OFFICER)
    assert raised.value.field == "cards"
    monkeypatch.setattr(batches_module, "MAX_BATCH_CARDS", 3)
    with pytest.raises(InvalidArgument) as raised:
        bstore.create_batch("B-big", "bureau-a", "dual-app", [card(i) for i in range(4)], OFFICER)
    assert raised.value.field == "cards"
    assert "1 to 3 cards, not 4" in raised.value.reason
    with pytest.raises(NotFound):
        bstore.get_batch("B-big")
    assert bstore.create_batch("B-full", "bureau-a", "dual-app", [card(i) for i in range(3)], OFFICER).card_count == 3


def test_creation_is_all_or_nothing(bstore: BatchStore, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # The events go to a table that does not exist: the failure comes after the batch and its cards were inserted.
    missing = sa.Table(
        "no_such_events", sa.MetaData(),
        *(sa.Column(c.name, c.type) for c in store.card_events.columns if c.name != "id"),
    )
    monkeypatch.setattr(batches_module, "card_events", missing)
    with pytest.raises(sa.exc.DBAPIError):
        make_batch(bstore, 3)
    monkeypatch.undo()
    with pytest.raises(NotFound):
        bstore.get_batch("B-1")
    assert count_rows(engine, store.batches) == count_rows(engine, store.batch_cards) == 0
    make_batch(bstore, 3)
    assert bstore.get_batch("B-1").card_count == 3


def test_unknown_batches_and_cards(bstore: BatchStore) -> None:
    make_batch(bstore, 1)
    with pytest.raises(NotFound, match="no batch B-2"):
        bstore.get_batch("B-2")
    with pytest.raises(NotFound, match="no batch B-2"):
        bstore.card("B-2", "card-0000")
    with pytest.raises(NotFound, match="no card card-0009 in batch B-1"):
        bstore.card("B-1", "card-0009")
    with pytest.raises(NotFound):
        bstore.bind_chip("B-1", "card-0009", SERIAL_A, None)
    with pytest.raises(NotFound):
        bstore.record_issued("B-2", "card-0000", "S1", b"x", None)


# --- chip binding -----------------------------------------------------------------------------------------------


def test_first_bind_fills_the_chip_data_and_the_same_again_is_a_no_op(bstore: BatchStore, clock: FixedClock) -> None:
    make_batch(bstore)
    bound = bstore.bind_chip("B-1", "card-0001", SERIAL_A, KDD_A.lower(), by=STATION)
    assert (bound.identity.card_serial, bound.identity.kdd) == (SERIAL_A, KDD_A)
    assert bound.bound_fields == {"card_serial", "kdd"}
    assert bound.chip_bound_at == "2026-01-02T03:04:05Z"
    assert bound.identity.protected is not None  # batch fields untouched
    assert bound.identity.protected.index == pan_index("6214830000000000001")
    clock.advance(dt.timedelta(minutes=5))
    again = bstore.bind_chip("B-1", "card-0001", SERIAL_A, KDD_A, by=STATION)
    assert again == bound
    assert bstore.bind_chip("B-1", "card-0001", None, None) == bound
    events = [e.event for e in bstore.events("B-1", "card-0001")]
    assert events == [EventKind.CREATED, EventKind.CHIP_BOUND]
    assert bstore.card("B-1", "card-0000").bound_fields == frozenset()  # other cards untouched


def test_another_chip_for_a_bound_card_is_refused(bstore: BatchStore) -> None:
    make_batch(bstore)
    bound = bstore.bind_chip("B-1", "card-0000", SERIAL_A, KDD_A)
    with pytest.raises(PermissionDenied, match=r"card card-0000 is bound to another chip .* an officer must re-issue"):
        bstore.bind_chip("B-1", "card-0000", SERIAL_B, KDD_A)
    with pytest.raises(PermissionDenied, match="bound to another chip"):
        bstore.bind_chip("B-1", "card-0000", None, KDD_B)
    assert bstore.card("B-1", "card-0000") == bound


def test_chip_data_must_match_what_the_batch_supplied(bstore: BatchStore) -> None:
    make_batch(bstore, card_serial=SERIAL_A)
    with pytest.raises(PermissionDenied, match="batch B-1 gives it another card_serial"):
        bstore.bind_chip("B-1", "card-0000", SERIAL_B, KDD_A)
    untouched = bstore.card("B-1", "card-0000")
    assert (untouched.identity.card_serial, untouched.identity.kdd) == (SERIAL_A, None)
    assert untouched.bound_fields == frozenset()
    # The batch's serial plus a KDD read from the chip: only the empty field is filled.
    bound = bstore.bind_chip("B-1", "card-0000", SERIAL_A, KDD_A)
    assert (bound.identity.card_serial, bound.identity.kdd, bound.bound_fields) == (SERIAL_A, KDD_A, frozenset({"kdd"}))


def test_a_binding_may_be_completed_later(bstore: BatchStore) -> None:
    make_batch(bstore)
    bstore.bind_chip("B-1", "card-0000", SERIAL_A, None)
    completed = bstore.bind_chip("B-1", "card-0000", SERIAL_A, KDD_A)
    assert (completed.identity.card_serial, completed.identity.kdd) == (SERIAL_A, KDD_A)
    assert completed.bound_fields == {"card_serial", "kdd"}
    assert [e.detail for e in bstore.events("B-1", "card-0000")][1:] == [
        f"card_serial={SERIAL_A}", f"kdd={KDD_A}"]


@pytest.mark.parametrize(
    ("serial", "kdd", "name"),
    [("XYZ", None, "card_serial"), (SERIAL_A + "00", None, "card_serial"), (None, "0102", "kdd"),
     (None, "G" * 20, "kdd")],
)
def test_bad_chip_data_is_refused_by_name(bstore: BatchStore, serial: str | None, kdd: str | None, name: str) -> None:
    make_batch(bstore, 1)
    with pytest.raises(InvalidArgument) as raised:
        bstore.bind_chip("B-1", "card-0000", serial, kdd)
    assert raised.value.field == name
    assert bstore.card("B-1", "card-0000").bound_fields == frozenset()


def test_an_issued_card_cannot_take_new_chip_data(bstore: BatchStore) -> None:
    make_batch(bstore, 1)
    bstore.bind_chip("B-1", "card-0000", SERIAL_A, None)
    issued = bstore.record_issued("B-1", "card-0000", "S1", b"sealed", "k1")
    with pytest.raises(PermissionDenied, match="issued without this chip's kdd; an officer must re-issue it"):
        bstore.bind_chip("B-1", "card-0000", SERIAL_A, KDD_A)
    assert bstore.bind_chip("B-1", "card-0000", SERIAL_A, None) == issued
    assert bstore.card("B-1", "card-0000").identity.kdd is None


# --- re-issue ---------------------------------------------------------------------------------------------------


def test_reissue_revokes_binding_and_bundle_and_keeps_the_batch_data(bstore: BatchStore, clock: FixedClock) -> None:
    make_batch(bstore, 2, card_serial=SERIAL_A)
    bstore.bind_chip("B-1", "card-0000", SERIAL_A, KDD_A, by=STATION)
    bstore.record_issued("B-1", "card-0000", "S1", b"first bundle", "k1", by=STATION)
    assert bstore.get_batch("B-1").issued_count == 1
    clock.advance(dt.timedelta(hours=1))
    reset = bstore.reissue("B-1", "card-0000", OTHER_OFFICER, domain="bank", needs=("bank",))[0]
    assert reset.state is CardState.PENDING
    assert (reset.identity.card_serial, reset.identity.kdd) == (SERIAL_A, None)  # batch-supplied serial kept
    assert (reset.bound_fields, reset.chip_bound_at) == (frozenset(), None)
    assert (reset.serial, reset.bundle, reset.idempotency_key, reset.issued_at) == (None, None, None, None)
    assert bstore.get_batch("B-1").issued_count == 0
    last = bstore.events("B-1", "card-0000")[-1]
    assert (last.event, last.by, last.at) == (EventKind.REISSUE_REVOKED, OTHER_OFFICER, "2026-01-02T04:04:05Z")
    assert last.detail == f"revoked chip binding kdd={KDD_A}; bundle S1"
    # A new chip may now be bound and the card issued again.
    bstore.bind_chip("B-1", "card-0000", SERIAL_A, KDD_B)
    again = bstore.record_issued("B-1", "card-0000", "S2", b"second bundle", "k2")
    assert (again.identity.kdd, again.serial, again.bundle) == (KDD_B, "S2", b"second bundle")


def test_reissue_of_a_dual_application_card_needs_each_domains_consent(
        bstore: BatchStore, engine: sa.Engine, clock: FixedClock) -> None:
    make_batch(bstore, 1)
    bstore.bind_chip("B-1", "card-0000", SERIAL_A, KDD_A, by=STATION)
    bstore.record_issued("B-1", "card-0000", "S1", b"first bundle", "k1", by=STATION)
    both = ("hrss", "bank")
    record, awaiting = bstore.reissue("B-1", "card-0000", OFFICER, domain="hrss", needs=both)
    assert awaiting == ("bank",) and record.state is CardState.ISSUED and record.serial == "S1"
    # the same domain again (another hrss officer) does not stand in for the bank
    assert bstore.reissue("B-1", "card-0000", "urn:kms:officer:hrss:bob", domain="hrss", needs=both)[1] == ("bank",)
    assert bstore.card("B-1", "card-0000").state is CardState.ISSUED
    # a consent counts for a day only
    clock.advance(dt.timedelta(hours=25))
    assert bstore.reissue("B-1", "card-0000", OTHER_OFFICER, domain="bank", needs=both)[1] == ("hrss",)
    record, awaiting = bstore.reissue("B-1", "card-0000", OFFICER, domain="hrss", needs=both)
    assert awaiting == () and record.state is CardState.PENDING and record.bundle is None
    assert count_rows(engine, store.consents) == 0  # used up
    # the next re-issue needs both again
    bstore.bind_chip("B-1", "card-0000", SERIAL_A, KDD_B)
    assert bstore.reissue("B-1", "card-0000", OTHER_OFFICER, domain="bank", needs=both)[1] == ("hrss",)


def test_reissue_of_a_bound_but_unissued_card(bstore: BatchStore) -> None:
    make_batch(bstore, 1)
    bstore.bind_chip("B-1", "card-0000", SERIAL_A, KDD_A)
    reset = bstore.reissue("B-1", "card-0000", OFFICER, domain="hrss", needs=("hrss",))[0]
    assert (reset.identity.card_serial, reset.identity.kdd, reset.state) == (None, None, CardState.PENDING)
    assert bstore.events("B-1", "card-0000")[-1].detail == (
        f"revoked chip binding card_serial={SERIAL_A}, kdd={KDD_A}")
    assert bstore.bind_chip("B-1", "card-0000", SERIAL_B, KDD_B).identity.card_serial == SERIAL_B


def test_reissue_needs_something_to_revoke_and_a_principal(bstore: BatchStore) -> None:
    make_batch(bstore, 1)
    with pytest.raises(InvalidState, match="no chip binding or bundle to revoke"):
        bstore.reissue("B-1", "card-0000", OFFICER, domain="hrss", needs=("hrss",))[0]
    bstore.bind_chip("B-1", "card-0000", SERIAL_A, None)
    with pytest.raises(InvalidArgument) as raised:
        bstore.reissue("B-1", "card-0000", "officer alice", domain="hrss", needs=("hrss",))[0]
    assert raised.value.field == "by"
    assert bstore.card("B-1", "card-0000").identity.card_serial == SERIAL_A
    assert [e.event for e in bstore.events("B-1", "card-0000")] == [EventKind.CREATED, EventKind.CHIP_BOUND]


# --- issuance ---------------------------------------------------------------------------------------------------


def test_a_card_is_issued_at_most_once(bstore: BatchStore, clock: FixedClock) -> None:
    make_batch(bstore, 2)
    first = bstore.record_issued("B-1", "card-0000", "S1", b"\x00sealed-1\xff", "idem-1", by=STATION)
    assert (first.state, first.serial, first.bundle, first.idempotency_key, first.issued_at) == (
        CardState.ISSUED, "S1", b"\x00sealed-1\xff", "idem-1", "2026-01-02T03:04:05Z")
    clock.advance(dt.timedelta(seconds=30))
    with pytest.raises(AlreadyExists, match=r"card card-0000 of batch B-1 is already issued \(bundle S1\)"):
        bstore.record_issued("B-1", "card-0000", "S2", b"sealed-2", "idem-2")
    with pytest.raises(AlreadyExists):  # a retry with the same key is also refused: the caller reads the card
        bstore.record_issued("B-1", "card-0000", "S3", b"sealed-3", "idem-1")
    stored = bstore.card("B-1", "card-0000")
    assert stored == first
    assert bstore.card("B-1", "card-0001").state is CardState.PENDING
    assert [e.event for e in bstore.events("B-1", "card-0000")].count(EventKind.ISSUED) == 1
    assert bstore.get_batch("B-1").issued_count == 1


@pytest.mark.parametrize(
    ("serial", "bundle", "key", "name"),
    [("", b"x", None, "serial"), ("S 1", b"x", None, "serial"), ("S1", b"", None, "bundle"),
     ("S1", b"x", "has space", "idempotency_key"), ("S1", b"x", "k" * 129, "idempotency_key")],
)
def test_bad_issue_records_are_refused_by_name(
    bstore: BatchStore, serial: str, bundle: bytes, key: str | None, name: str
) -> None:
    make_batch(bstore, 1)
    with pytest.raises(InvalidArgument) as raised:
        bstore.record_issued("B-1", "card-0000", serial, bundle, key)
    assert raised.value.field == name
    assert bstore.card("B-1", "card-0000").state is CardState.PENDING


def test_a_bundle_sealed_for_a_revoked_binding_is_not_recorded(bstore: BatchStore) -> None:
    make_batch(bstore, 1)
    sealed_for = bstore.bind_chip("B-1", "card-0000", SERIAL_A, KDD_A).identity
    bstore.reissue("B-1", "card-0000", OFFICER, domain="hrss", needs=("hrss",))[0]
    current = bstore.bind_chip("B-1", "card-0000", SERIAL_B, KDD_B).identity
    with pytest.raises(InvalidState, match="changed while it was sealed"):
        bstore.record_issued("B-1", "card-0000", "S1", b"old chip", "k1", sealed_for=sealed_for)
    assert bstore.card("B-1", "card-0000").state is CardState.PENDING
    issued = bstore.record_issued("B-1", "card-0000", "S2", b"new chip", "k2", sealed_for=current)
    assert (issued.serial, issued.identity.card_serial) == ("S2", SERIAL_B)


def test_a_streams_message_stores_each_bundle_only_for_the_identity_it_was_sealed_for(
        bstore: BatchStore, engine: sa.Engine) -> None:
    """record_issued_many (one prepared UPDATE per card, one insert of the events): per card, stored only if it is
    pending, its batch open and its identity — clear fields and PAN index — the one it was sealed for."""
    make_batch(bstore, 5)
    sealed = [bstore.card("B-1", f"card-{i:04d}").identity for i in range(5)]
    bstore.record_issued("B-1", "card-0001", "S-early", b"issued before", None)  # issued meanwhile
    bstore.bind_chip("B-1", "card-0002", SERIAL_A, KDD_A)  # chip bound after sealing: another identity
    assert sealed[3].protected is not None
    other_pan = replace(sealed[3], protected=replace(sealed[3].protected, index="0" * 64))  # sealed for another PAN
    won = bstore.record_issued_many("B-1", [(sealed[0], "S-0", b"b0"), (sealed[1], "S-1", b"b1"),
                                            (sealed[2], "S-2", b"b2"), (other_pan, "S-3", b"b3"),
                                            (sealed[4], "S-4", b"b4")], by=STATION)
    assert won == [True, False, False, False, True]
    records = {i: bstore.card("B-1", f"card-{i:04d}") for i in range(5)}
    assert (records[0].state, records[0].serial, records[0].bundle) == (CardState.ISSUED, "S-0", b"b0")
    assert (records[1].serial, records[1].bundle) == ("S-early", b"issued before")
    assert records[2].state is CardState.PENDING and records[2].identity.card_serial == SERIAL_A
    assert records[4].serial == "S-4" and records[4].issued_at == "2026-01-02T03:04:05Z"
    issued = [(e.card_ref, e.detail) for e in bstore.events("B-1") if e.event is EventKind.ISSUED]
    assert issued == [("card-0001", "bundle S-early"), ("card-0000", "bundle S-0"), ("card-0004", "bundle S-4")]
    assert records[3].state is CardState.PENDING
    with engine.begin() as conn:
        conn.execute(store.batches.update().values(state=BatchState.CLOSED.value))
    assert bstore.record_issued_many("B-1", [(sealed[2], "S-5", b"b5")], by=STATION) == [False]


def test_a_message_all_stored_and_a_card_given_twice_stored_once(bstore: BatchStore) -> None:
    """record_issued_many: every card of a message stored; and in another, a card given twice is stored once (the
    first entry), and a card stored already is not stored again, even under the serial it holds."""
    make_batch(bstore, 6)
    sealed = [bstore.card("B-1", f"card-{i:04d}").identity for i in range(6)]
    assert bstore.record_issued_many("B-1", [(c, f"S-{i}", b"b") for i, c in enumerate(sealed[:4])],
                                     by=STATION) == [True] * 4
    assert [bstore.card("B-1", f"card-{i:04d}").serial for i in range(4)] == ["S-0", "S-1", "S-2", "S-3"]
    won = bstore.record_issued_many("B-1", [(sealed[4], "S-4a", b"first"), (sealed[5], "S-5", b"b"),
                                            (sealed[4], "S-4b", b"second"), (sealed[0], "S-0", b"again")],
                                    by=STATION)
    assert won == [True, True, False, False]
    assert (bstore.card("B-1", "card-0004").serial, bstore.card("B-1", "card-0004").bundle) == ("S-4a", b"first")
    issued = [e.detail for e in bstore.events("B-1") if e.event is EventKind.ISSUED]
    assert sorted(issued) == sorted(["bundle S-0", "bundle S-1", "bundle S-2", "bundle S-3", "bundle S-4a",
                                     "bundle S-5"])


def test_a_closed_batch_refuses_every_change(bstore: BatchStore, engine: sa.Engine) -> None:
    make_batch(bstore, 2)
    bstore.bind_chip("B-1", "card-0001", SERIAL_A, None)
    with engine.begin() as conn:
        conn.execute(store.batches.update().values(state=BatchState.CLOSED.value))
    assert bstore.get_batch("B-1").state is BatchState.CLOSED
    with pytest.raises(InvalidState, match="batch B-1 is closed"):
        bstore.record_issued("B-1", "card-0000", "S1", b"x", None)
    with pytest.raises(InvalidState, match="batch B-1 is closed"):
        bstore.bind_chip("B-1", "card-0000", SERIAL_B, None)
    with pytest.raises(InvalidState, match="batch B-1 is closed"):
        bstore.reissue("B-1", "card-0001", OFFICER, domain="hrss", needs=("hrss",))[0]
    assert bstore.card("B-1", "card-0000").state is CardState.PENDING
    assert bstore.card("B-1", "card-0001").identity.card_serial == SERIAL_A


# --- races ------------------------------------------------------------------------------------------------------


def race(backend: EngineFactory, clock: FixedClock, contenders: int, call: Callable[[BatchStore, int], object]
         ) -> list[object]:
    """Run call(store, i) in ``contenders`` threads at once, each with its own engine; outcomes in order of i."""
    stores = [BatchStore(backend(), clock, pans=SoftwarePans()) for _ in range(contenders)]
    for s in stores:  # connect before the start line, so the calls themselves line up
        s.get_batch("B-1")
    start = threading.Barrier(contenders)

    def run(i: int) -> object:
        start.wait()
        try:
            return call(stores[i], i)
        except (AlreadyExists, PermissionDenied) as error:
            return error

    with ThreadPoolExecutor(contenders) as pool:
        return list(pool.map(run, range(contenders)))


@pytest.mark.parametrize("round_", range(5))
def test_consents_given_at_once_by_both_domains_re_issue_the_card(
        bstore: BatchStore, backend: EngineFactory, clock: FixedClock, round_: int) -> None:
    """The review's race: hrss and bank officers consenting at the same moment on two replicas both saw "waiting
    for the other" and the card was never re-issued; two officers of one domain hit a duplicate key. With the
    card's row locked first, the consents are counted one after the other."""
    make_batch(bstore, 1)
    bstore.bind_chip("B-1", "card-0000", SERIAL_A, KDD_A, by=STATION)
    bstore.record_issued("B-1", "card-0000", "S1", b"first bundle", "k1", by=STATION)
    same = [(OFFICER, "hrss"), ("urn:kms:officer:hrss:bob", "hrss")]
    outcomes = race(backend, clock, 2, lambda s, i: s.reissue("B-1", "card-0000", same[i][0], domain=same[i][1],
                                                              needs=("hrss", "bank"))[1])
    assert outcomes == [("bank",), ("bank",)]  # one domain's two officers: still one consent, no duplicate key
    make_batch(bstore, 1, batch_id="B-2")
    bstore.bind_chip("B-2", "card-0000", SERIAL_A, KDD_A, by=STATION)
    bstore.record_issued("B-2", "card-0000", "S2", b"first bundle", "k2", by=STATION)
    who = [(OFFICER, "hrss"), (OTHER_OFFICER, "bank")]
    outcomes = race(backend, clock, 2, lambda s, i: s.reissue("B-2", "card-0000", who[i][0], domain=who[i][1],
                                                              needs=("hrss", "bank"))[1])
    assert sorted(outcomes) in ([(), ("hrss",)], [(), ("bank",)]), outcomes  # the second one completed it
    assert bstore.card("B-2", "card-0000").state is CardState.PENDING


def test_a_consent_counts_only_for_the_record_it_was_given_on(bstore: BatchStore) -> None:
    """The bank consents while the card is bound but not issued; the station then issues it: the bank's consent
    was not to re-send that bundle, so an hrss consent alone does not revoke it."""
    make_batch(bstore, 1)
    bstore.bind_chip("B-1", "card-0000", SERIAL_A, KDD_A, by=STATION)
    both = ("hrss", "bank")
    assert bstore.reissue("B-1", "card-0000", OTHER_OFFICER, domain="bank", needs=both)[1] == ("hrss",)
    bstore.record_issued("B-1", "card-0000", "S1", b"bundle", "k1", by=STATION)
    record, awaiting = bstore.reissue("B-1", "card-0000", OFFICER, domain="hrss", needs=both)
    assert awaiting == ("bank",) and record.state is CardState.ISSUED and record.serial == "S1"


def test_racing_replicas_issue_a_card_exactly_once(bstore: BatchStore, backend: EngineFactory,
                                                    clock: FixedClock) -> None:
    make_batch(bstore, 5)
    for c in range(5):
        ref = f"card-{c:04d}"

        def issue(s: BatchStore, i: int, ref: str = ref) -> object:
            return s.record_issued("B-1", ref, f"S{i}", f"bundle of replica {i}".encode(), f"k{i}")

        outcomes = race(backend, clock, 4, issue)
        winners = [i for i, o in enumerate(outcomes) if not isinstance(o, Exception)]
        assert len(winners) == 1, outcomes
        assert all(isinstance(o, AlreadyExists) for i, o in enumerate(outcomes) if i != winners[0])
        stored = bstore.card("B-1", ref)
        assert (stored.serial, stored.bundle) == (f"S{winners[0]}", f"bundle of replica {winners[0]}".encode())
        assert [e.event for e in bstore.events("B-1", ref)].count(EventKind.ISSUED) == 1
    assert bstore.get_batch("B-1").issued_count == 5


def test_racing_stations_bind_a_card_to_one_chip(bstore: BatchStore, backend: EngineFactory,
                                                 clock: FixedClock) -> None:
    make_batch(bstore, 1)
    serials = [f"{0x86843202AD932A40 + i:016X}" for i in range(4)]
    outcomes = race(backend, clock, 4, lambda s, i: s.bind_chip("B-1", "card-0000", serials[i], None))
    winners = [i for i, o in enumerate(outcomes) if not isinstance(o, Exception)]
    assert len(winners) == 1, outcomes
    assert all(isinstance(o, PermissionDenied) for i, o in enumerate(outcomes) if i != winners[0])
    assert bstore.card("B-1", "card-0000").identity.card_serial == serials[winners[0]]
    assert [e.event for e in bstore.events("B-1", "card-0000")].count(EventKind.CHIP_BOUND) == 1


def test_a_batch_opens_only_when_every_domain_authorized_exactly_its_cards(bstore: BatchStore) -> None:
    cards = [card(0), card(1)]
    bstore.create_batch("B-1", "bureau-a", "dual-app", cards, OFFICER)
    digest = bstore.get_batch("B-1").cards_digest
    other = batches_module.cards_digest(SoftwarePans().protect([card(0), card(2)]))
    assert digest != other
    with pytest.raises(InvalidArgument, match="cards_digest"):
        bstore.authorize("B-1", "hrss", "C-1", other, ("hrss", "bank"))
    with pytest.raises(InvalidArgument, match="domain"):
        bstore.authorize("B-1", "bank", "C-1", digest, ("hrss",))
    half = bstore.authorize("B-1", "hrss", "C-1", digest, ("hrss", "bank"))
    assert (half.state, half.authorized_by) == (BatchState.AWAITING, ("hrss",))
    with pytest.raises(AlreadyExists, match="already authorized by the hrss domain"):
        bstore.authorize("B-1", "hrss", "C-2", digest, ("hrss", "bank"))
    full = bstore.authorize("B-1", "bank", "C-3", digest, ("hrss", "bank"))
    assert (full.state, full.authorized_by) == (BatchState.OPEN, ("bank", "hrss"))
    with pytest.raises(InvalidState, match="not awaiting authorization"):
        bstore.authorize("B-1", "bank", "C-4", digest, ("hrss", "bank"))


# --- reading ----------------------------------------------------------------------------------------------------


def test_cards_after_pages_in_batch_order(bstore: BatchStore) -> None:
    # card_refs deliberately in reverse alphabetical order: pages follow the batch, not the names
    cards = [card(i, card_ref=f"z-{9 - i}") for i in range(7)]
    bstore.create_batch("B-1", "bureau-a", "dual-app", cards, OFFICER)
    authorize(bstore, "B-1")
    pages, cursor = [], -1
    while page := bstore.cards_after("B-1", cursor, 3):
        pages.append([r.card_ref for r in page])
        cursor = page[-1].sequence
    assert pages == [["z-9", "z-8", "z-7"], ["z-6", "z-5", "z-4"], ["z-3"]]
    resumed = bstore.cards_after("B-1", 4, 100)
    assert [(r.sequence, r.card_ref) for r in resumed] == [(5, "z-4"), (6, "z-3")]
    assert resumed[0].identity == replace(cards[5], pan=None)
    assert bstore.cards_after("B-1", 6, 10) == []


def test_cards_after_refuses_bad_cursors_and_unknown_batches(bstore: BatchStore) -> None:
    make_batch(bstore, 1)
    for after, limit, name in [(-2, 1, "after_sequence"), (0, 0, "limit"),
                               (0, batches_module.MAX_PAGE + 1, "limit")]:
        with pytest.raises(InvalidArgument) as raised:
            bstore.cards_after("B-1", after, limit)
        assert raised.value.field == name
    assert len(bstore.cards_after("B-1", -1, batches_module.MAX_PAGE)) == 1
    with pytest.raises(NotFound, match="no batch B-9"):
        bstore.cards_after("B-9", -1, 10)


def test_events_tell_each_cards_history_in_order(bstore: BatchStore, clock: FixedClock) -> None:
    make_batch(bstore, 2)
    steps: list[Callable[[], object]] = [
        lambda: bstore.bind_chip("B-1", "card-0001", SERIAL_A, KDD_A, by=STATION),
        lambda: bstore.record_issued("B-1", "card-0001", "S1", b"one", "k1", by=STATION),
        lambda: bstore.reissue("B-1", "card-0001", OFFICER, domain="hrss", needs=("hrss",))[0],
        lambda: bstore.bind_chip("B-1", "card-0001", SERIAL_B, KDD_B, by=STATION),
        lambda: bstore.record_issued("B-1", "card-0001", "S2", b"two", "k2"),
    ]
    for step in steps:
        clock.advance(dt.timedelta(minutes=1))
        step()
    history = bstore.events("B-1", "card-0001")
    assert [(e.event, e.at[11:16], e.by) for e in history] == [
        (EventKind.CREATED, "03:04", OFFICER),
        (EventKind.CHIP_BOUND, "03:05", STATION),
        (EventKind.ISSUED, "03:06", STATION),
        (EventKind.REISSUE_REVOKED, "03:07", OFFICER),
        (EventKind.CHIP_BOUND, "03:08", STATION),
        (EventKind.ISSUED, "03:09", None),
    ]
    assert history[0].detail == "sequence 1"
    assert history[2].detail == "bundle S1"
    assert [e.id for e in history] == sorted(e.id for e in history)
    everything = bstore.events("B-1")
    assert [(e.card_ref, e.event) for e in everything[:2]] == [
        ("card-0000", EventKind.CREATED), ("card-0001", EventKind.CREATED)]
    assert len(everything) == 7
    assert bstore.events("B-1", "card-0000")[0].event is EventKind.CREATED
    with pytest.raises(NotFound):
        bstore.events("B-9")


# -- audit records (kms.audit.log): in the change's transaction, only for changes that happened ------------------------


def _audit_bodies(log: AuditLog) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in log.records()]


def test_each_change_appends_its_audit_record_and_a_refused_one_none(engine: sa.Engine, clock: FixedClock) -> None:
    log = AuditLog(engine, clock)
    audited = BatchStore(engine, clock, log, pans=SoftwarePans())
    cards = make_batch(audited, 3)
    audited.bind_chip("B-1", "card-0000", SERIAL_A, KDD_A, by=STATION)
    audited.bind_chip("B-1", "card-0000", SERIAL_A, KDD_A, by=STATION)  # the same data again: no change
    audited.record_issued("B-1", "card-0000", "S-0", b"bundle 0", "k-0", by=STATION)
    with pytest.raises(AlreadyExists):
        audited.record_issued("B-1", "card-0000", "S-0b", b"bundle 0b", "k-0b", by=STATION)
    stored = [audited.card("B-1", c.card_ref).identity for c in cards]
    assert audited.record_issued_many("B-1", [(stored[1], "S-1", b"bundle 1"), (stored[0], "S-x", b"x")],
                                      by=STATION) == [True, False]
    audited.reissue("B-1", "card-0000", OFFICER, domain="hrss", needs=("hrss",))[0]
    bodies = _audit_bodies(log)
    assert [(b["kind"], b["subject"]) for b in bodies] == [
        ("batch.created", "B-1"), ("batch.authorized", "B-1"), ("batch.authorized", "B-1"),
        ("card.chip-bound", "B-1/card-0000"), ("issuance.issued", "B-1/card-0000"),
        ("issuance.issued", "B-1/card-0001"), ("card.reissued", "B-1/card-0000")]
    created, first, second = bodies[0]["detail"], bodies[1]["detail"], bodies[2]["detail"]
    assert created == {"bureau": "bureau-a", "profile": "dual-app", "card_count": 3,
                       "cards_digest": audited.get_batch("B-1").cards_digest}
    assert (first["state"], second["state"]) == ("awaiting-authorization", "open")
    assert bodies[3]["detail"] == {"fields": ["card_serial", "kdd"]} and bodies[3]["actor"] == STATION
    assert bodies[4]["detail"] == {"serial": "S-0", "by": STATION, "pan": "621483*********0000"}
    assert bodies[6]["detail"] == {"previous_state": "issued", "revoked_binding": ["card_serial", "kdd"],
                                   "revoked_bundle": "S-0", "consented_by": {"hrss": OFFICER}}
    everything = repr(bodies)
    assert all(value not in everything for value in (SERIAL_A, KDD_A, cards[0].pan, cards[1].pan))


def test_an_unwritable_audit_log_stops_the_change(engine: sa.Engine, clock: FixedClock) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("the trap is a SQLite trigger")
    audited = BatchStore(engine, clock, AuditLog(engine, clock), pans=SoftwarePans())
    cards = make_batch(audited, 2)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TRIGGER full BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'full'); END"))
    with pytest.raises(AuditUnavailable, match="audit log cannot be written"):
        audited.record_issued_many("B-1", [(audited.card("B-1", c.card_ref).identity, f"S-{i}", b"bundle")
                                           for i, c in enumerate(cards)], by=STATION)
    with pytest.raises(AuditUnavailable):
        audited.bind_chip("B-1", "card-0000", SERIAL_A, KDD_A, by=STATION)
    assert all(audited.card("B-1", c.card_ref).state is CardState.PENDING for c in cards)
    assert audited.card("B-1", "card-0000").identity.card_serial is None
    assert [e.event for e in audited.events("B-1")] == [EventKind.CREATED] * 2
