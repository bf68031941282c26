"""Fail closed: the audit store becomes unwritable in the middle of a streamed batch (a real server, real workers
and tokens, the service's own SQLite database; no fakes). Every bundle the station received has its issuance record,
nothing was issued without one, the stream ends with a clear error, and once the store is writable again the stream
resumes where it stopped and completes."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from helpers import card, open_batch, service_client

from kms import config, store
from kms.audit.log import AuditLog, chain
from kms.cards.cardid import CardIdentity
from kms.clock import SystemClock
from kms.dev.home import Home
from kms.errors import Unavailable
from kms.identity import Principal
from kms.server.serve import Service

ALICE = Principal("officer", "alice", domain="hrss")
CARDS = 40
PER_MESSAGE = 4
ALLOWED = 10  # audit records that can still be written once the trap is set: two messages of four, not a third
TRIGGER = "test_audit_unwritable"


@pytest.fixture(scope="module")
def engine(home: Home) -> sa.Engine:
    return store.make_engine(config.load(home.config).database)


def _issued_records(log: AuditLog, batch_id: str) -> dict[str, dict[str, str]]:
    """card_ref -> detail of its issuance.issued records for the batch (asserting there is at most one per card)."""
    found: dict[str, dict[str, str]] = {}
    for record in log.records(kind="issuance.issued"):
        body = json.loads(record.body)
        batch, _, card_ref = body["subject"].partition("/")
        if batch == batch_id:
            assert card_ref not in found, f"{card_ref} has two issuance records"
            found[card_ref] = body["detail"]
    return found


@pytest.fixture
def trap(engine: sa.Engine) -> Iterator[Callable[[int], None]]:
    """Arms a trigger that refuses every audit record after the next ``allowed`` ones (the store 'fills up'); it
    is dropped after the test whatever happens."""
    def arm(allowed: int) -> None:
        size, _ = AuditLog(engine, SystemClock()).head()
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE TRIGGER {TRIGGER} BEFORE INSERT ON audit_log WHEN NEW.seq > "
                                 f"{size + allowed} BEGIN SELECT RAISE(ABORT, 'audit store is full'); END"))
    try:
        yield arm
    finally:
        disarm(engine)


def disarm(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TRIGGER IF EXISTS {TRIGGER}"))


def test_a_stream_stops_when_the_audit_log_cannot_be_written_and_every_bundle_sent_was_recorded(
    home: Home, service: Service, engine: sa.Engine, trap: Callable[[int], None]
) -> None:
    batch_id = f"B-{secrets.token_hex(4)}"
    cards = [card(400_000 + i, card_ref=f"afc-{i:04d}") for i in range(CARDS)]
    with service_client(home, service, ALICE) as alice:
        open_batch(home, service.port, alice, batch_id, "bureau-a", "dual-app-v1", cards)
    log = AuditLog(engine, SystemClock())
    trap(ALLOWED)

    received = []
    with service_client(home, service, "station-a1") as st:
        with pytest.raises(Unavailable, match="the audit log cannot be written; nothing was done") as stopped:
            for bundle in st.stream_batch(batch_id, per_message=PER_MESSAGE, retries=0):
                received.append(bundle)
        assert stopped.value.retryable  # UNAVAILABLE: the station may resume once the log is writable again
        issued_then = st.batch_status(batch_id).issued

        # Exactly as many bundles delivered as issuance records written, and as cards recorded issued.
        records = _issued_records(log, batch_id)
        assert 0 < len(received) < CARDS
        assert len(received) == len(records) == issued_then
        assert len(received) % PER_MESSAGE == 0  # whole messages: the one whose records failed was not sent
        assert {b.card_ref: b.serial for b in received} == {ref: d["serial"] for ref, d in records.items()}

        # Writable again: the stream resumes after the last bundle received and completes.
        disarm(engine)
        received += st.stream_batch(batch_id, cursor=str(received[-1].sequence), per_message=PER_MESSAGE,
                                    retries=0)
        assert st.batch_status(batch_id).issued == CARDS
    assert [b.card_ref for b in received] == [c.card_ref for c in cards]  # nothing lost, nothing twice
    records = _issued_records(log, batch_id)
    assert {b.card_ref: b.serial for b in received} == {ref: d["serial"] for ref, d in records.items()}
    assert all(d["pan"] == _masked(c) and d["by"] == "urn:kms:station:bureau-a:station-a1"
               for c, d in ((c, records[c.card_ref]) for c in cards))
    _assert_chain_intact(log)


def _masked(c: CardIdentity) -> str:
    assert c.pan is not None
    return c.pan[:6] + "*" * (len(c.pan) - 10) + c.pan[-4:]


def _assert_chain_intact(log: AuditLog) -> None:
    """The refused transactions left no gap and no stray record: sequence numbers 1..n, each hash chained."""

    prev, expected = bytes(32).hex(), 1
    for record in log.records():
        assert record.seq == expected and record.prev == prev
        assert chain(bytes.fromhex(prev), record.body.encode()).hex() == record.hash
        prev, expected = record.hash, expected + 1
    assert log.head() == (expected - 1, prev)
