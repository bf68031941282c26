"""Key registry conformance: the same tests on every store backend (SQLite always; PostgreSQL when
KMS_TEST_POSTGRES_URL is set, skipped otherwise)."""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import EngineFactory

from kms import store
from kms.audit.log import AuditLog
from kms.clock import FixedClock
from kms.errors import AlreadyExists, InvalidArgument, InvalidState, NotFound, StorageUnavailable
from kms.hsm.labels import key_label
from kms.registry import KeyKind, KeyRegistry, KeyState

POSTGRES = os.environ.get("KMS_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        eng = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
        store.upgrade(eng)
        yield eng
        eng.dispose()
        return
    if not POSTGRES:
        pytest.skip("KMS_TEST_POSTGRES_URL is not set")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    eng = sa.create_engine(POSTGRES, connect_args={"options": f"-csearch_path={schema}"})
    store.upgrade(eng)
    yield eng
    eng.dispose()
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def registry(engine: sa.Engine) -> KeyRegistry:
    return KeyRegistry(engine, FixedClock(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)))


def test_versions_count_up_per_name_and_label_follows(registry: KeyRegistry) -> None:
    first = registry.add("bank", KeyKind.MASTER, "bank-imk-ac", "DES2", kcv="ABCDEF", kcv_method="m")
    second = registry.add("bank", KeyKind.MASTER, "bank-imk-ac", "DES2")
    other = registry.add("hrss", KeyKind.MASTER, "bank-imk-ac", "DES2")
    assert (first.version, second.version, other.version) == (1, 2, 1)
    assert first.label == key_label("bank", KeyKind.MASTER, "bank-imk-ac", 1) == "kms/bank/master/bank-imk-ac/v1"
    assert first.created_at == "2026-01-02T03:04:05Z"
    assert registry.get("bank", KeyKind.MASTER, "bank-imk-ac", 1).kcv == "ABCDEF"
    assert registry.active("bank", KeyKind.MASTER, "bank-imk-ac").version == 2
    assert [r.version for r in registry.versions("bank", KeyKind.MASTER, "bank-imk-ac")] == [1, 2]
    assert registry.names("bank", KeyKind.MASTER) == {"bank-imk-ac"}
    assert [r.domain for r in registry.all("hrss")] == ["hrss"]


def test_a_row_whose_label_was_changed_outside_kms_is_refused(registry: KeyRegistry, engine: sa.Engine) -> None:
    """The token label is derived from the row's domain, kind, name and version: another user of a shared database
    who points the bank's PAN key row at the index key does not make a worker use the index key."""
    registry.add("bank", KeyKind.DATA, "pan", "AES256", state=KeyState.ACTIVE)
    registry.add("bank", KeyKind.DATA, "pan-index", "HMAC256", state=KeyState.ACTIVE)
    with engine.begin() as conn:
        conn.execute(store.keys.update().where(store.keys.c.label == "kms/bank/data/pan/v1")
                     .values(label="kms/bank/data/pan-index/v1x"))
    with pytest.raises(InvalidState, match=r"kms/bank/data/pan/v1 names another token label"):
        registry.active("bank", KeyKind.DATA, "pan")
    assert registry.active("bank", KeyKind.DATA, "pan-index").label == "kms/bank/data/pan-index/v1"


def test_active_ignores_keys_that_are_not_active(registry: KeyRegistry) -> None:
    registry.add("bank", KeyKind.MASTER, "k", "DES2")
    registry.add("bank", KeyKind.MASTER, "k", "DES2", state=KeyState.PRE_ACTIVATION)
    assert registry.active("bank", KeyKind.MASTER, "k").version == 1
    registry.add("bank", KeyKind.MASTER, "only-pending", "DES2", state=KeyState.PRE_ACTIVATION)
    with pytest.raises(InvalidState, match="has no active version"):
        registry.active("bank", KeyKind.MASTER, "only-pending")
    with pytest.raises(NotFound, match="no bank master key named missing"):
        registry.active("bank", KeyKind.MASTER, "missing")


def test_duplicates_and_unknown_domains_are_refused(registry: KeyRegistry) -> None:
    registry.add("bank", KeyKind.TRANSPORT, "bureau-a", "AES256", version=3)
    with pytest.raises(AlreadyExists):
        registry.add("bank", KeyKind.TRANSPORT, "bureau-a", "AES256", version=3)
    with pytest.raises(InvalidArgument) as raised:
        registry.add("both", KeyKind.MASTER, "x", "DES2")
    assert raised.value.field == "domain"


def test_remove_and_set_kcv(registry: KeyRegistry) -> None:
    record = registry.add("hrss", KeyKind.SIGNING, "issuance", "ECDSA-P256")
    registry.set_kcv(record, "", "", public_key=b"\x30\x59")
    assert registry.get("hrss", KeyKind.SIGNING, "issuance", 1).public_key == b"\x30\x59"
    registry.remove(record)
    with pytest.raises(NotFound):
        registry.get("hrss", KeyKind.SIGNING, "issuance", 1)


def test_state_transitions_follow_nist_sp_800_57(engine: sa.Engine) -> None:
    from kms.registry import TRANSITIONS

    clock = FixedClock(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    registry = KeyRegistry(engine, clock)
    record = registry.add("hrss", KeyKind.MASTER, "mk", "DES2", state=KeyState.PRE_ACTIVATION)
    clock.advance(dt.timedelta(hours=1))
    active = registry.transition(record, KeyState.ACTIVE)
    assert active.state is KeyState.ACTIVE and active.state_changed_at == "2026-01-02T04:04:05Z"
    assert registry.active("hrss", KeyKind.MASTER, "mk").version == 1
    suspended = registry.transition(active, KeyState.SUSPENDED)
    with pytest.raises(InvalidState, match="has no active version"):  # a suspended key serves no new card
        registry.active("hrss", KeyKind.MASTER, "mk")
    with pytest.raises(InvalidState, match="cannot go from suspended to destroyed"):
        registry.transition(suspended, KeyState.DESTROYED)
    with pytest.raises(InvalidState, match="changed state meanwhile"):
        registry.transition(active, KeyState.DEACTIVATED)  # a stale record: the key is suspended now
    deactivated = registry.transition(suspended, KeyState.DEACTIVATED)
    destroyed = registry.transition(deactivated, KeyState.DESTROYED)
    assert TRANSITIONS[destroyed.state] == frozenset()
    with pytest.raises(InvalidState, match="allowed: none"):
        registry.transition(destroyed, KeyState.ACTIVE)


def test_every_state_can_reach_destroyed_except_through_reactivation() -> None:
    from kms.registry import TRANSITIONS

    for state in KeyState:
        seen, todo = {state}, [state]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert KeyState.DESTROYED in seen
        if state in (KeyState.DEACTIVATED, KeyState.COMPROMISED, KeyState.DESTROYED):
            assert KeyState.ACTIVE not in seen  # no way back to serving cards


# The transition table written out cell by cell (NIST SP 800-57 Part 1 Rev. 5, section 7), independently of
# kms.registry.TRANSITIONS: row = from, column = to; "x" allowed, "." refused.
_STATES = ["pre-activation", "active", "suspended", "deactivated", "compromised", "destroyed"]
_TABLE = """
                pre act sus dea com des
pre-activation   .   x   .   .   x   x
active           .   .   x   x   x   .
suspended        .   x   .   x   x   .
deactivated      .   .   .   .   x   x
compromised      .   .   .   .   .   x
destroyed        .   .   .   .   .   .
"""
_ALLOWED = {
    (row.split()[0], _STATES[i])
    for row in _TABLE.strip().splitlines()[1:]
    for i, mark in enumerate(row.split()[1:]) if mark == "x"
}


@pytest.mark.parametrize("to", _STATES)
@pytest.mark.parametrize("start", _STATES)
def test_transition_table_cell_by_cell(engine: sa.Engine, start: str, to: str) -> None:
    clock = FixedClock(dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC))
    registry = KeyRegistry(engine, clock)
    record = registry.add("bank", KeyKind.MASTER, "imk", "DES2", state=KeyState(start))
    clock.advance(dt.timedelta(minutes=5))
    if (start, to) in _ALLOWED:
        moved = registry.transition(record, KeyState(to))
        assert (moved.state.value, moved.state_changed_at) == (to, "2026-03-04T05:11:07Z")
    else:
        with pytest.raises(InvalidState, match=f"cannot go from {start} to {to}"):
            registry.transition(record, KeyState(to))
        unchanged = registry.get("bank", KeyKind.MASTER, "imk", 1)
        assert (unchanged.state.value, unchanged.state_changed_at) == (start, "2026-03-04T05:06:07Z")
    # Only an active key serves new cards.
    now = registry.get("bank", KeyKind.MASTER, "imk", 1)
    if now.state is KeyState.ACTIVE:
        assert registry.active("bank", KeyKind.MASTER, "imk") == now
    else:
        with pytest.raises(InvalidState, match="no active version"):
            registry.active("bank", KeyKind.MASTER, "imk")


def test_each_change_appends_its_audit_record_never_a_key_value(engine: sa.Engine) -> None:
    clock = FixedClock(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    log = AuditLog(engine, clock)
    registry = KeyRegistry(engine, clock, log)
    made = registry.add("hrss", KeyKind.MASTER, "hrss-mk", "DES2", state=KeyState.PRE_ACTIVATION)
    registry.set_kcv(made, "ABCDEF", "des-ecb-zero")
    active = registry.transition(registry.get("hrss", KeyKind.MASTER, "hrss-mk", 1), KeyState.ACTIVE)
    with pytest.raises(InvalidState):
        registry.transition(made, KeyState.ACTIVE)  # stale: it is active meanwhile
    with pytest.raises(InvalidState):
        registry.transition(active, KeyState.DESTROYED)  # not allowed from active
    signing = registry.add("hrss", KeyKind.SIGNING, "issuance", "EC-P256", public_key=b"spki")
    registry.remove(signing)
    bodies = [json.loads(r.body) for r in log.records()]
    assert [(b["kind"], b["domain"], b["subject"]) for b in bodies] == [
        ("key.added", "hrss", "kms/hrss/master/hrss-mk/v1"), ("key.kcv", "hrss", "kms/hrss/master/hrss-mk/v1"),
        ("key.state", "hrss", "kms/hrss/master/hrss-mk/v1"), ("key.added", "hrss", "kms/hrss/signing/issuance/v1"),
        ("key.removed", "hrss", "kms/hrss/signing/issuance/v1")]
    assert bodies[2]["detail"] == {"kind": "master", "name": "hrss-mk", "version": 1, "from": "pre-activation",
                                   "to": "active", "kcv": "ABCDEF"}
    assert "public_key_sha256" in bodies[3]["detail"] and "spki" not in repr(bodies)


def test_keep_one_active_refuses_to_retire_the_last_active_version(registry: KeyRegistry) -> None:
    one = registry.add("bank", KeyKind.SIGNING, "issuance", "ecdsa-p256", public_key=b"1", state=KeyState.ACTIVE)
    two = registry.add("bank", KeyKind.SIGNING, "issuance", "ecdsa-p256", public_key=b"2", state=KeyState.ACTIVE)
    assert registry.transition(one, KeyState.DEACTIVATED, keep_one_active=True).state is KeyState.DEACTIVATED
    with pytest.raises(InvalidState, match="only active version"):
        registry.transition(two, KeyState.SUSPENDED, keep_one_active=True)
    assert registry.get("bank", KeyKind.SIGNING, "issuance", two.version).state is KeyState.ACTIVE
    assert registry.transition(two, KeyState.COMPROMISED).state is KeyState.COMPROMISED  # not kept: allowed


def test_two_retirements_at_once_keep_one_version_active(backend: EngineFactory) -> None:
    """Two replicas (an engine each) retire the two active versions of a key at the same moment, many times: one of
    the two is refused every time (each version's row locked first on PostgreSQL; SQLite's one writer)."""
    import threading

    clock = FixedClock(dt.datetime(2026, 12, 2, tzinfo=dt.UTC))
    replicas = [KeyRegistry(backend(), clock), KeyRegistry(backend(), clock)]
    for round_ in range(15):
        name = f"issuance-{round_}"
        pair = [replicas[0].add("bank", KeyKind.SIGNING, name, "ecdsa-p256", public_key=b"k", state=KeyState.ACTIVE)
                for _ in range(2)]
        start = threading.Barrier(2)
        outcomes: list[str] = []

        def retire(replica: KeyRegistry, record: Any, start: threading.Barrier, outcomes: list[str]) -> None:
            start.wait()
            try:
                replica.transition(record, KeyState.DEACTIVATED, keep_one_active=True)
                outcomes.append("retired")
            except (InvalidState, StorageUnavailable):
                outcomes.append("refused")

        threads = [threading.Thread(target=retire, args=(replicas[i], pair[i], start, outcomes)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        active = [r for r in replicas[0].versions("bank", KeyKind.SIGNING, name) if r.state is KeyState.ACTIVE]
        assert len(active) == 1 and sorted(outcomes) == ["refused", "retired"], (round_, outcomes)
