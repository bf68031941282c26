"""The card lifecycle (挂失, 解挂, 补换, 销卡, 销户): the rules on every store backend (SQLite always, PostgreSQL when
KMS_TEST_POSTGRES_URL is set), then each rule through gRPC with the real server, mutual TLS and SoftHSM2 tokens."""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from helpers import EngineFactory, SoftwarePans, authorize_batch, service_client
from helpers import card as full_card

from kms.audit.log import AuditLog
from kms.cards.cardid import CardIdentity
from kms.cli import main as cli
from kms.client.service import Client
from kms.clock import FixedClock
from kms.dev.home import Home
from kms.errors import InvalidArgument, InvalidState, NotFound, PermissionDenied
from kms.identity import Principal
from kms.issuance.batches import BatchStore, CardState, EventKind
from kms.issuance.lifecycle import AppState, CardLifecycle, CardView, Event
from kms.server.serve import Service
from kms.store import batches, card_lifecycle_events

POSTGRES = os.environ.get("KMS_TEST_POSTGRES_URL")
START = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
ALICE = Principal("officer", "alice", domain="hrss")
BOB = Principal("officer", "bob", domain="hrss")
CAROL = Principal("officer", "carol", domain="bank")
ERIN = Principal("auditor", "erin")
STATION = Principal("station", "station-a1", bureau="bureau-a")


# --- the rules, on each store backend ---------------------------------------------------------------------------


@pytest.fixture
def engine(backend: EngineFactory) -> sa.Engine:
    return backend()


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(START)


@pytest.fixture
def life(engine: sa.Engine, clock: FixedClock) -> CardLifecycle:
    return CardLifecycle(engine, clock, pans=SoftwarePans())


@pytest.fixture
def bstore(engine: sa.Engine, clock: FixedClock) -> BatchStore:
    return BatchStore(engine, clock, pans=SoftwarePans())


def ident(i: int, card_ref: str | None = None, **overrides: str) -> CardIdentity:
    fields = {"card_ref": card_ref or f"c{i}", "city_code": "320200", "card_serial": f"{0x1000000000000000 + i:016X}",
              "pan": f"{6214830000000000000 + i}", "psn": "01", "kdd": f"{0x10000000000000000000 + i:020X}"}
    fields.update(overrides)
    return CardIdentity(**fields)


def batch(bstore: BatchStore, engine: sa.Engine, batch_id: str, cards: Sequence[CardIdentity]) -> None:
    """An open batch (opened directly: how batches get authorized is not what these tests are about)."""
    bstore.create_batch(batch_id, "bureau-a", "dual-app", cards, ALICE.uri())
    with engine.begin() as conn:
        conn.execute(batches.update().where(batches.c.batch_id == batch_id).values(state="open"))


def replaced(life: CardLifecycle, old: str, new: str, reason: str) -> CardView:
    """A replacement with both domains' consent: carol's (bank) first, then alice's (hrss) carries it out."""
    first = life.replace(old, new, reason, CAROL)
    assert first.awaiting_consent == ("hrss",)
    assert first.status.replaced_by is None  # nothing changed yet
    done = life.replace(old, new, reason, ALICE)
    assert done.awaiting_consent == ()
    return done


def states(life: CardLifecycle, card_ref: str) -> tuple[str, str]:
    status = life.view(card_ref).status
    return status.hrss.value, status.bank.value


def test_report_lost_blocks_issuance_and_cancelling_the_report_lifts_it(
    life: CardLifecycle, bstore: BatchStore, engine: sa.Engine, clock: FixedClock
) -> None:
    batch(bstore, engine, "B-1", [ident(1)])
    assert life.blocked([ident(1)]) == {}
    life.report_lost("c1", "hrss", "cardholder called the hotline", ALICE)
    assert states(life, "c1") == ("lost", "active")
    with pytest.raises(InvalidState, match=r"^card c1 is reported lost \(hrss\); cancel the report first$"):
        life.require_issuable(ident(1))
    clock.advance(dt.timedelta(hours=1))
    view = life.cancel_loss_report("c1", "hrss", "card found", BOB)
    assert (view.status.hrss, view.since["hrss"], view.since["bank"]) == (AppState.ACTIVE, "2026-03-04T06:06:07Z",
                                                                         None)
    life.require_issuable(ident(1))
    assert [(e.application, e.event, e.from_state, e.to_state, e.reason, e.at, e.by) for e in view.history] == [
        ("hrss", Event.REPORTED_LOST, "active", "lost", "cardholder called the hotline", "2026-03-04T05:06:07Z",
         ALICE.uri()),
        ("hrss", Event.LOSS_REPORT_CANCELLED, "lost", "active", "card found", "2026-03-04T06:06:07Z", BOB.uri()),
    ]
    life.report_lost("c1", "bank", "bank card lost", CAROL)  # each application on its own
    assert states(life, "c1") == ("active", "lost")
    with pytest.raises(InvalidState, match=r"reported lost \(bank\)"):
        life.require_issuable(ident(1))


def test_an_officer_acts_only_on_the_application_of_their_domain(
    life: CardLifecycle, bstore: BatchStore, engine: sa.Engine
) -> None:
    batch(bstore, engine, "B-1", [ident(1), ident(2)])
    with pytest.raises(PermissionDenied, match=r"officer bank/carol cannot act on the hrss application of card c1"):
        life.report_lost("c1", "hrss", "x", CAROL)
    with pytest.raises(PermissionDenied, match="cannot act on the bank application"):
        life.cancel_application("c1", "bank", "close-account", "x", ALICE)
    for who in (ERIN, STATION):
        with pytest.raises(PermissionDenied, match="is not a security officer"):
            life.report_lost("c1", "hrss", "x", who)
    # A replacement ends both applications: one domain's officer only consents; nothing changes until the other does.
    assert life.replace("c1", "c2", "x", CAROL).awaiting_consent == ("hrss",)
    assert life.replace("c1", "c2", "x", CAROL).awaiting_consent == ("hrss",)  # a second bank consent adds nothing
    assert states(life, "c1") == ("active", "active") and life.view("c1").history == []



def test_each_lifecycle_event_appends_its_audit_record_without_card_identities(
    bstore: BatchStore, engine: sa.Engine, clock: FixedClock
) -> None:
    log = AuditLog(engine, clock)
    life = CardLifecycle(engine, clock, log, pans=SoftwarePans())
    batch(bstore, engine, "B-1", [ident(1), ident(2), ident(3)])
    life.report_lost("c1", "hrss", "hotline", ALICE)
    with pytest.raises(InvalidState):
        life.report_lost("c1", "hrss", "again", ALICE)
    life.cancel_loss_report("c1", "hrss", "found", BOB)
    life.cancel_application("c1", "hrss", "cancel-card", "deceased", ALICE)
    life.cancel_application("c1", "bank", "close-account", "cleared", CAROL)
    replaced(life, "c2", "c3", "damaged")
    bodies = [json.loads(r.body) for r in log.records()]
    assert [(b["kind"], b["domain"], b["subject"], b["actor"]) for b in bodies] == [
        ("lifecycle.reported-lost", "hrss", "c1", ALICE.uri()),
        ("lifecycle.loss-report-cancelled", "hrss", "c1", BOB.uri()),
        ("lifecycle.cancelled", "hrss", "c1", ALICE.uri()),
        ("lifecycle.closed", "bank", "c1", CAROL.uri()),
        ("lifecycle.replace-consented", "bank", "c2", CAROL.uri()),
        ("lifecycle.replaced", "hrss", "c2", ALICE.uri()), ("lifecycle.replaced", "bank", "c2", ALICE.uri()),
        ("lifecycle.replaces", "", "c3", ALICE.uri())]
    assert bodies[0]["detail"] == {"application": "hrss", "from": "active", "to": "lost", "reason": "hotline"}
    assert bodies[2]["detail"]["revoked"] == "B-1 (not issued)"
    assert bodies[4]["detail"] == {"replaced_by": "c3", "reason": "damaged", "awaiting": ["hrss"]}
    assert bodies[5]["detail"] == {"application": "hrss", "from": "active", "to": "replaced", "reason": "damaged",
                                   "replaced_by": "c3", "retired": ["card_serial", "kdd", "pan_psn"],
                                   "revoked": "B-1 (not issued)",
                                   "consented_by": {"bank": CAROL.uri(), "hrss": ALICE.uri()}}
    everything = repr(bodies)
    for c in (ident(1), ident(2), ident(3)):
        assert all(v not in everything for v in (c.pan, c.card_serial, c.kdd) if v)


START_STATES = ("active", "lost", "cancelled", "closed", "replaced")
OPERATIONS = ("lost", "unlost", "cancel-card", "close-account")
#: The hrss application's transitions, cell by cell: the state reached, or the refusal.
TABLE = {
    ("active", "lost"): "lost", ("active", "unlost"): "is not reported lost",
    ("active", "cancel-card"): "cancelled", ("active", "close-account"): "closed",
    ("lost", "lost"): "is already reported lost", ("lost", "unlost"): "active",
    ("lost", "cancel-card"): "cancelled", ("lost", "close-account"): "closed",
    **{(s, op): "that is final" for s in ("cancelled", "closed") for op in OPERATIONS},
    **{("replaced", op): "was replaced by card c9; it can no longer change" for op in OPERATIONS},
}


@pytest.mark.parametrize(("start", "operation"), [(s, o) for s in START_STATES for o in OPERATIONS])
def test_transition_table_of_an_application(
    life: CardLifecycle, bstore: BatchStore, engine: sa.Engine, start: str, operation: str
) -> None:
    batch(bstore, engine, "B-1", [ident(1), ident(9)])
    if start == "lost":
        life.report_lost("c1", "hrss", "setup", ALICE)
    elif start in ("cancelled", "closed"):
        life.cancel_application("c1", "hrss", "cancel-card" if start == "cancelled" else "close-account", "setup",
                                ALICE)
    elif start == "replaced":
        replaced(life, "c1", "c9", "setup")
    assert life.view("c1").status.hrss.value == start
    expected = TABLE[(start, operation)]
    run = {
        "lost": lambda: life.report_lost("c1", "hrss", "why", BOB),
        "unlost": lambda: life.cancel_loss_report("c1", "hrss", "why", BOB),
        "cancel-card": lambda: life.cancel_application("c1", "hrss", "cancel-card", "why", BOB),
        "close-account": lambda: life.cancel_application("c1", "hrss", "close-account", "why", BOB),
    }[operation]
    before = life.view("c1").history
    if expected in START_STATES:
        assert run().status.hrss.value == expected
        assert life.view("c1").history[-1].by == BOB.uri()
    else:
        with pytest.raises(InvalidState, match=expected):
            run()
        assert life.view("c1").history == before  # a refusal records nothing


def test_the_bank_application_is_cancelled_only_after_the_hrss_application(
    life: CardLifecycle, bstore: BatchStore, engine: sa.Engine
) -> None:
    batch(bstore, engine, "B-1", [ident(1)])
    life.report_lost("c1", "hrss", "lost", ALICE)
    with pytest.raises(InvalidState, match=r"bank application of card c1 can be closed only after the hrss "
                                           r"application is cancelled \(HRSS cancels first\); the hrss application "
                                           r"is lost"):
        life.cancel_application("c1", "bank", "close-account", "customer request", CAROL)
    life.cancel_application("c1", "hrss", "cancel-card", "销卡 at the service hall", ALICE)
    view = life.cancel_application("c1", "bank", "close-account", "HRSS clearance received", CAROL)
    assert (view.status.hrss, view.status.bank) == (AppState.CANCELLED, AppState.CLOSED)
    with pytest.raises(InvalidState, match=r"^card c1 is cancelled \(hrss\); it is never issued again$"):
        life.require_issuable(ident(1))
    with pytest.raises(InvalidArgument, match=r"^kind: must be cancel-card"):
        life.cancel_application("c1", "bank", "destroy", "x", CAROL)


def test_cancelling_revokes_the_cards_records(
    life: CardLifecycle, bstore: BatchStore, engine: sa.Engine
) -> None:
    batch(bstore, engine, "B-1", [ident(1)])
    batch(bstore, engine, "B-2", [ident(1)])
    bstore.record_issued("B-1", "c1", "S-1", b"bundle", None)
    view = life.cancel_application("c1", "hrss", "cancel-card", "deceased", ALICE)
    assert [(r.batch_id, r.state, r.serial) for r in view.records] == [
        ("B-1", CardState.REVOKED, "S-1"), ("B-2", CardState.REVOKED, None)]
    assert bstore.card("B-1", "c1").bundle is None  # never sent again
    assert view.history[-1].detail == "revoked records: B-1 (bundle S-1), B-2 (not issued)"
    event = bstore.events("B-1", "c1")[-1]
    assert (event.event, event.detail, event.by) == (
        EventKind.LIFECYCLE_REVOKED, "revoked (bundle S-1): hrss application cancelled", ALICE.uri())
    with pytest.raises(InvalidState, match="is revoked"):
        bstore.reissue("B-1", "c1", ALICE.uri(), domain="hrss", needs=("hrss", "bank"))


def test_replacement_revokes_the_old_card_and_retires_its_identities(
    life: CardLifecycle, bstore: BatchStore, engine: sa.Engine
) -> None:
    old, new = ident(1), ident(4)
    same_pan, same_serial = ident(2, pan=old.pan), ident(3, card_serial=old.card_serial)
    batch(bstore, engine, "B-1", [old, same_pan, same_serial])
    batch(bstore, engine, "B-2", [new])
    bstore.record_issued("B-1", "c1", "S-1", b"bundle", None)
    life.report_lost("c1", "bank", "lost", CAROL)
    with pytest.raises(InvalidArgument, match=r"^new_card_ref: card c2 has the same PAN as card c1 "
                                              r"\(621483\*{9}0001\); a replacement card needs a new card "
                                              r"serial, PAN and KDD"):
        replaced(life, "c1", "c2", "lost card")
    with pytest.raises(InvalidArgument, match="card c3 has the same card serial as card c1"):
        replaced(life, "c1", "c3", "lost card")
    with pytest.raises(InvalidArgument, match="new_card_ref: must name another card"):
        replaced(life, "c1", "c1", "lost card")
    with pytest.raises(NotFound, match="no card c77 in any batch"):
        replaced(life, "c1", "c77", "lost card")

    view = replaced(life, "c1", "c4", "lost card")
    assert (view.status.hrss, view.status.bank, view.status.replaced_by) == (
        AppState.REPLACED, AppState.REPLACED, "c4")
    assert [(r.batch_id, r.state) for r in view.records] == [("B-1", CardState.REVOKED)]
    assert [(e.application, e.event, e.from_state, e.to_state) for e in view.history[-2:]] == [
        ("hrss", Event.REPLACED, "active", "replaced"), ("bank", Event.REPLACED, "lost", "replaced")]
    assert view.history[-1].detail == (
        "replaced by card c4; retired identities: card serial 1000000000000001, PAN/PSN 621483*********0001/01, "
        "KDD 10000000000000000001; revoked records: B-1 (bundle S-1); consented: bank urn:kms:officer:bank:carol, "
        "hrss urn:kms:officer:hrss:alice")
    assert life.view("c4").status.replaces == "c1"
    assert life.view("c4").history[-1].event is Event.REPLACES
    with pytest.raises(InvalidState, match=r"^card c1 was replaced by card c4: its keys are never derived again$"):
        life.require_issuable(old)
    life.require_issuable(new)
    # another card record carrying a retired identity is never issued either (here: the PAN/PSN)
    assert life.blocked([ident(5, pan=old.pan)]) == {
        "c5": "card c5 has the PAN/PSN 621483*********0001/01 of card c1, which was replaced: its keys are never "
              "derived again"}
    assert life.blocked([ident(5, pan=old.pan, psn="02")]) == {}  # another PSN: other keys
    assert life.blocked([ident(6, kdd=old.kdd), ident(7)]) == {
        "c6": "card c6 has the KDD 10000000000000000001 of card c1, which was replaced: its keys are never derived "
              "again"}
    with pytest.raises(InvalidState, match="was replaced by card c4; it can no longer change"):
        replaced(life, "c1", "c3", "again")
    with pytest.raises(InvalidState, match="card c4 cannot be a replacement card: it already replaces card c1"):
        replaced(life, "c2", "c4", "again")


def test_a_new_batch_listing_a_retired_identity_or_an_ended_card_is_refused_naming_the_field(
    life: CardLifecycle, bstore: BatchStore, engine: sa.Engine
) -> None:
    batch(bstore, engine, "B-1", [ident(1), ident(2), ident(3)])
    replaced(life, "c1", "c2", "damaged")
    life.cancel_application("c3", "hrss", "cancel-card", "deceased", ALICE)
    life.check_new_batch([ident(10), ident(11, pan=ident(1).pan, psn="02")])
    old = ident(1)
    for field, card in [("pan", ident(11, pan=old.pan)), ("card_serial", ident(11, card_serial=old.card_serial)),
                        ("kdd", ident(11, kdd=old.kdd)), ("card_ref", ident(12, card_ref="c1")),
                        ("card_ref", ident(12, card_ref="c3"))]:
        with pytest.raises(InvalidArgument) as raised:
            life.check_new_batch([ident(10), card])
        assert raised.value.field == f"cards[1].{field}"
    with pytest.raises(InvalidArgument, match=r"^cards\[0\]\.pan: PAN/PSN 621483\*{9}0001/01 was retired when "
                                              r"card c1 was replaced"):
        life.check_new_batch([ident(11, pan=ident(1).pan)])
    life.report_lost("c2", "hrss", "lost", ALICE)
    life.check_new_batch([ident(2, card_ref="c2")])  # a loss report can be lifted: refused at issuance only


def test_a_replacement_needs_open_cards(life: CardLifecycle, bstore: BatchStore, engine: sa.Engine) -> None:
    batch(bstore, engine, "B-1", [ident(i) for i in range(1, 5)])
    life.cancel_application("c1", "hrss", "cancel-card", "deceased", ALICE)
    with pytest.raises(InvalidState, match="the hrss application of card c1 is cancelled; that is final"):
        replaced(life, "c1", "c2", "x")
    life.report_lost("c3", "hrss", "x", ALICE)
    with pytest.raises(InvalidState, match="card c3 cannot be a replacement card: its hrss application is lost"):
        replaced(life, "c2", "c3", "x")
    replaced(life, "c2", "c4", "x")
    with pytest.raises(InvalidState, match="card c2 cannot be a replacement card: it was replaced by card c4"):
        replaced(life, "c3", "c2", "x")


@pytest.mark.parametrize(("call", "field"), [
    (lambda life: life.report_lost("", "hrss", "x", ALICE), "card_ref"),
    (lambda life: life.report_lost("bad ref", "hrss", "x", ALICE), "card_ref"),
    (lambda life: life.report_lost("c1", "HRSS", "x", ALICE), "application"),
    (lambda life: life.report_lost("c1", "hrss", "  ", ALICE), "reason"),
    (lambda life: life.report_lost("c1", "hrss", "a\nb", ALICE), "reason"),
    (lambda life: life.report_lost("c1", "hrss", "x" * 501, ALICE), "reason"),
    (lambda life: life.cancel_application("c1", "hrss", "", "x", ALICE), "kind"),
    (lambda life: life.replace("", "c2", "x", ALICE), "old_card_ref"),
    (lambda life: life.replace("c1", "", "x", ALICE), "new_card_ref"),
    (lambda life: life.view(""), "card_ref"),
])
def test_every_field_is_validated(life: CardLifecycle, call: Callable[[CardLifecycle], Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        call(life)
    assert raised.value.field == field


def test_unknown_cards_are_not_found(life: CardLifecycle) -> None:
    with pytest.raises(NotFound, match="no card nowhere in any batch"):
        life.report_lost("nowhere", "hrss", "x", ALICE)
    with pytest.raises(NotFound):
        life.view("nowhere")


def test_racing_officers_change_a_card_once(
    backend: EngineFactory, bstore: BatchStore, engine: sa.Engine, clock: FixedClock
) -> None:
    batch(bstore, engine, "B-1", [ident(1)])
    contenders = [CardLifecycle(backend(), clock, pans=SoftwarePans()) for _ in range(6)]

    def attempt(life: CardLifecycle) -> str:
        try:
            life.report_lost("c1", "hrss", "race", ALICE)
            return "won"
        except InvalidState as error:
            return str(error)

    with ThreadPoolExecutor(len(contenders)) as pool:
        results = list(pool.map(attempt, contenders))
    assert results.count("won") == 1
    assert set(results) - {"won"} == {"the hrss application of card c1 is already reported lost"}
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(card_lifecycle_events)).scalar_one() == 1


# --- through gRPC: a real server, real certificates, real workers and tokens ------------------------------------


def _batch(client: Client, batch_id: str, bureau: str, profile: str, cards: Sequence[CardIdentity]) -> Any:
    """CreateBatch, then both domains' authorize-batch ceremonies (officers signing with their approval keys)."""
    client.create_batch(batch_id, bureau, profile, cards)
    home, port = _SERVICE[0]
    authorize_batch(home, port, batch_id)
    return client.batch_status(batch_id)


_SERVICE: list[tuple[Home, int]] = []


@pytest.fixture(scope="module", autouse=True)
def _service_address(home: Home, service: Service) -> Iterator[None]:
    _SERVICE.append((home, service.port))
    yield
    _SERVICE.clear()


def _cards(start: int, n: int, tag: str) -> list[CardIdentity]:
    """Cards whose identities no other test uses (conftest.card numbering from 900,000)."""
    return [full_card(900_000 + start + i, card_ref=f"lc-{tag}-{i}") for i in range(n)]


def _bid() -> str:
    return f"LC-{secrets.token_hex(4)}"


def test_grpc_a_lost_card_is_refused_with_the_reason_and_issuable_after_the_report_is_cancelled(
    home: Home, service: Service
) -> None:
    batch_id, cards = _bid(), _cards(0, 3, "lost")
    with service_client(home, service, ALICE) as alice, service_client(home, service, CAROL) as carol, \
            service_client(home, service, "station-a1") as st:
        _batch(alice, batch_id, "bureau-a", "dual-app-v1", cards)
        card = alice.report_lost("lc-lost-0", "hrss", "cardholder reported it")
        assert [(a.application, a.state) for a in card.applications] == [("hrss", "lost"), ("bank", "active")]
        with pytest.raises(PermissionDenied, match="officer bank/carol cannot act on the hrss application"):
            carol.cancel_loss_report("lc-lost-0", "hrss", "not mine")
        with pytest.raises(InvalidState, match=r"^card lc-lost-0 is reported lost \(hrss\); cancel the report first$"):
            st.issue_card(batch_id, "lc-lost-0")
        with pytest.raises(InvalidState, match=r"card lc-lost-0 is reported lost \(hrss\)"):
            list(st.stream_batch(batch_id))  # the stream ends at the lost card
        assert st.batch_status(batch_id).issued == 0

        alice.cancel_loss_report("lc-lost-0", "hrss", "found it")
        st.issue_card(batch_id, "lc-lost-0")
        carol.report_lost("lc-lost-1", "bank", "bank card lost")
        with pytest.raises(InvalidState, match=r"reported lost \(bank\)"):
            st.issue_card(batch_id, "lc-lost-1")
        carol.cancel_loss_report("lc-lost-1", "bank", "found it")
        assert [b.card_ref for b in st.stream_batch(batch_id)] == ["lc-lost-0", "lc-lost-1", "lc-lost-2"]

        # Issued, then reported lost: its bundle is not sent again (not even to the same idempotency key), and
        # the stream goes on with the other cards.
        alice.report_lost("lc-lost-1", "hrss", "lost after issuance")
        assert [b.card_ref for b in st.stream_batch(batch_id)] == ["lc-lost-0", "lc-lost-2"]
        with pytest.raises(InvalidState, match="lc-lost-1 is reported lost"):
            st.issue_card(batch_id, "lc-lost-1")


def test_grpc_the_bank_application_is_cancelled_only_after_the_hrss_application(
    home: Home, service: Service
) -> None:
    batch_id = _bid()
    with service_client(home, service, ALICE) as alice, service_client(home, service, CAROL) as carol, \
            service_client(home, service, "station-a1") as st:
        _batch(alice, batch_id, "bureau-a", "dual-app-v1", _cards(10, 1, "cancel"))
        with pytest.raises(InvalidState, match="can be cancelled only after the hrss application is cancelled"):
            carol.cancel_application("lc-cancel-0", "bank", "cancel-card", "customer request")
        with pytest.raises(PermissionDenied, match="cannot act on the hrss application"):
            carol.cancel_application("lc-cancel-0", "hrss", "cancel-card", "customer request")
        alice.cancel_application("lc-cancel-0", "hrss", "cancel-card", "销卡")
        card = carol.cancel_application("lc-cancel-0", "bank", "close-account", "HRSS clearance received")
        assert [(a.application, a.state) for a in card.applications] == [("hrss", "cancelled"), ("bank", "closed")]
        assert [r.state for r in card.records] == ["revoked"]
        with pytest.raises(InvalidState, match=r"card lc-cancel-0 is cancelled \(hrss\)"):
            st.issue_card(batch_id, "lc-cancel-0")
        assert list(st.stream_batch(batch_id)) == []  # its revoked record is passed over
        with pytest.raises(InvalidState, match="that is final"):
            alice.report_lost("lc-cancel-0", "hrss", "too late")


def test_grpc_replacement(home: Home, service: Service) -> None:
    old, same_pan, new, blank = _cards(20, 4, "repl")
    same_pan = CardIdentity(**{**same_pan.as_dict(), "pan": old.pan})
    blank = CardIdentity(card_ref=blank.card_ref, city_code="320200", pan=blank.pan, psn="01")  # chip read later
    batch_id, earlier, later = _bid(), _bid(), _bid()
    stranger = full_card(900_030, card_ref="lc-repl-stranger", pan=old.pan)  # bad data: another card, same PAN
    with service_client(home, service, ALICE) as alice, service_client(home, service, CAROL) as carol, \
            service_client(home, service, "station-a1") as st:
        _batch(alice, batch_id, "bureau-a", "dual-app-v1", [old, same_pan, new, blank])
        _batch(alice, earlier, "bureau-a", "dual-app-v1", [stranger])
        first = st.issue_card(batch_id, old.card_ref)
        with pytest.raises(InvalidArgument) as raised:
            alice.replace_card(old.card_ref, same_pan.card_ref, "lost")
        assert raised.value.field == "new_card_ref" and "same PAN" in raised.value.reason
        # One domain's officer alone only consents (the finding: an hrss officer ended the bank application alone).
        pending = alice.replace_card(old.card_ref, new.card_ref, "lost card, 补换")
        assert list(pending.awaiting_consent) == ["bank"] and not pending.replaced_by
        assert [a.state for a in pending.applications] == ["active", "active"]
        assert [(r.state, r.serial) for r in alice.get_card(old.card_ref).records] == [("issued", first.serial)]
        card = carol.replace_card(old.card_ref, new.card_ref, "lost card, 补换")
        assert (card.replaced_by, [a.state for a in card.applications]) == (new.card_ref, ["replaced", "replaced"])
        assert [(r.state, r.serial) for r in card.records] == [("revoked", first.serial)]

        # the old card is never issued again, in any form
        with pytest.raises(InvalidState, match=f"card {old.card_ref} was replaced by card {new.card_ref}"):
            st.issue_card(batch_id, old.card_ref)
        with service_client(home, service, BOB) as bob, pytest.raises(InvalidState, match="is revoked"):
            bob.reissue(batch_id, old.card_ref)
        with pytest.raises(InvalidState, match=r"has the PAN/PSN 621483\*+\d{4}/01 of card lc-repl-0, which was "
                                               "replaced"):
            st.issue_card(earlier, stranger.card_ref)
        with pytest.raises(InvalidState, match=r"has the card serial \w+ of card lc-repl-0"):
            st.issue_card(batch_id, blank.card_ref, card_serial=old.card_serial or "", kdd="000102030405060708AA")
        assert st.issue_card(batch_id, new.card_ref).card_ref == new.card_ref

        # a batch listing a retired identity is refused at creation, naming the field
        with pytest.raises(grpc.RpcError) as refused:
            alice.batches.CreateBatch(_create_request(later, [full_card(900_040, card_ref="lc-ok"),
                                                              full_card(900_041, card_ref="lc-x", pan=old.pan)]),
                                      timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith("cards[1].pan: PAN/PSN ")
        with pytest.raises(InvalidArgument) as again:
            _batch(alice, later, "bureau-a", "dual-app-v1", [old])
        assert again.value.field == "cards[0].card_ref"


def _create_request(batch_id: str, cards: Sequence[CardIdentity]) -> Any:
    from kms.v1 import issuance_pb2 as pb

    return pb.CreateBatchRequest(batch_id=batch_id, bureau="bureau-a", profile="dual-app-v1",
                                 cards=[pb.CardIdentity(**c.as_dict()) for c in cards])


def test_grpc_auditors_read_stations_cannot_call_and_fields_are_validated(home: Home, service: Service) -> None:
    batch_id = _bid()
    with service_client(home, service, ALICE) as alice:
        _batch(alice, batch_id, "bureau-a", "dual-app-v1", _cards(50, 1, "audit"))
        alice.report_lost("lc-audit-0", "hrss", "reported at the counter")
        for call, field in [(lambda: alice.report_lost("lc-audit-0", "hrss", ""), "reason"),
                            (lambda: alice.report_lost("lc-audit-0", "", "x"), "application"),
                            (lambda: alice.cancel_application("lc-audit-0", "hrss", "burn", "x"), "kind"),
                            (lambda: alice.replace_card("lc-audit-0", "", "x"), "new_card_ref"),
                            (lambda: alice.get_card(""), "card_ref")]:
            with pytest.raises(InvalidArgument) as raised:
                call()
            assert raised.value.field == field
        with pytest.raises(NotFound, match="no card lc-none in any batch"):
            alice.get_card("lc-none")
    with service_client(home, service, ERIN) as erin:
        card = erin.get_card("lc-audit-0")
        assert [(e.event, e.application, e.by, e.reason) for e in card.history] == [
            ("reported-lost", "hrss", ALICE.uri(), "reported at the counter")]
        assert card.records[0].batch_id == batch_id and card.records[0].state == "pending"
        with pytest.raises(PermissionDenied, match=r"auditor erin may not call /kms\.v1\.CardService/CancelLossReport"):
            erin.cancel_loss_report("lc-audit-0", "hrss", "x")
    with service_client(home, service, "station-a1") as st:
        for call in (lambda: st.get_card("lc-audit-0"), lambda: st.report_lost("lc-audit-0", "hrss", "x")):
            with pytest.raises(PermissionDenied,
                               match=r"station bureau-a/station-a1 may not call /kms\.v1\.CardService/"):
                call()


def test_cli_card_commands(home: Home, service: Service, capsys: pytest.CaptureFixture[str]) -> None:
    batch_id = _bid()
    with service_client(home, service, ALICE) as alice:
        _batch(alice, batch_id, "bureau-a", "dual-app-v1", _cards(60, 2, "cli"))
    server = f"localhost:{service.port}"
    alice_cfg, carol_cfg = str(home.client_config(ALICE)), str(home.client_config(CAROL))
    common = ["--server", server, "--card-ref", "lc-cli-0"]
    assert cli.main(["card", "lost", "--client", alice_cfg, *common, "--application", "hrss", "--reason", "lost"]) == 0
    assert capsys.readouterr().out.strip() == "card lc-cli-0: hrss lost, bank active"
    assert cli.main(["card", "unlost", "--client", alice_cfg, *common, "--application", "hrss", "--reason", "found"]) \
        == 0
    assert cli.main(["card", "cancel", "--client", carol_cfg, *common, "--application", "bank", "--kind",
                     "close-account", "--reason", "x"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kms: error: the bank application of card lc-cli-0 can be closed only")
    assert cli.main(["card", "replace", "--client", alice_cfg, *common, "--new-card-ref", "lc-cli-1", "--reason",
                     "damaged"]) == 0
    assert capsys.readouterr().out.strip() == ("card lc-cli-0: hrss active, bank active; replacement awaiting the "
                                               "bank domain's consent")
    assert cli.main(["card", "replace", "--client", carol_cfg, *common, "--new-card-ref", "lc-cli-1", "--reason",
                     "damaged"]) == 0
    assert capsys.readouterr().out.strip() == "card lc-cli-0: hrss replaced, bank replaced; replaced by lc-cli-1"
    assert cli.main(["card", "show", "--client", str(home.client_config(ERIN)), *common, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["replaced_by"] == "lc-cli-1" and shown["applications"]["hrss"]["state"] == "replaced"
    assert [e["event"] for e in shown["history"]] == ["reported-lost", "loss-report-cancelled", "replaced", "replaced"]
    assert cli.main(["card", "lost", "--client", carol_cfg, *common, "--application", "hrss", "--reason", "x"]) == 5
    assert "cannot act on the hrss application" in capsys.readouterr().err
