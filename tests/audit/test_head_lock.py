"""kms_audit_head_lock_seconds: the part of an append spent taking the audit chain's head row, i.e. waiting for the
other writers' transactions (what replicas on one database contend for; scripts/cluster.py --bench reads it)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import EngineFactory
from prometheus_client import REGISTRY

from kms.audit.log import AuditLog
from kms.clock import SystemClock

HOLD = 0.3  # seconds the first writer keeps its transaction open once the second is seen waiting


def _sum(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_each_append_observes_its_head_lock_time_within_its_append_time(backend: EngineFactory) -> None:
    log = AuditLog(backend(), SystemClock())
    count, head, append = (_sum("kms_audit_head_lock_seconds_count"), _sum("kms_audit_head_lock_seconds_sum"),
                           _sum("kms_audit_append_seconds_sum"))
    for i in range(5):
        log.record("test.head", subject=f"s-{i}")
    assert _sum("kms_audit_head_lock_seconds_count") == count + 5
    head_spent = _sum("kms_audit_head_lock_seconds_sum") - head
    assert 0 < head_spent <= _sum("kms_audit_append_seconds_sum") - append


def test_a_writer_blocked_by_another_transaction_counts_the_wait_as_head_lock_time(backend: EngineFactory) -> None:
    engine = backend()
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: the second waits in BEGIN, not at the head row")
    holder, waiter = AuditLog(engine, SystemClock()), AuditLog(backend(), SystemClock())
    holder.record("test.first")  # the head row exists
    before = _sum("kms_audit_head_lock_seconds_sum")
    with engine.connect() as conn:
        transaction = conn.begin()
        holder.append(conn, "test.holding")  # the head row is locked until this transaction ends
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        errors: list[BaseException] = []

        def wait() -> None:
            try:
                waiter.record("test.waiting")
            except BaseException as error:  # e.g. the server out of connections: shown by the assertion below
                errors.append(error)

        thread = threading.Thread(target=wait)
        thread.start()
        with engine.connect() as look:  # the waiter is seen blocked by the holder before the clock below starts
            for _ in range(600):
                waiting = look.execute(sa.text(  # other sessions' tests share the server: only who this one blocks
                    "SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
                    {"pid": pid}).scalar_one()
                if waiting:
                    break
                look.rollback()  # a new transaction: pg_stat_activity is read once per transaction
                time.sleep(0.05)
        assert waiting == 1, (errors, pid, _activity(engine))
        time.sleep(HOLD)
        transaction.commit()
    thread.join(60)
    assert not errors
    # this process observed both appends: the holder's (no wait) and the waiter's (at least HOLD)
    assert _sum("kms_audit_head_lock_seconds_sum") - before >= HOLD
    assert waiter.head()[0] == 3


def _activity(engine: sa.Engine) -> list[Any]:
    """What the server's sessions on the audit tables are doing (shown when the waiter is not seen blocked)."""
    with engine.connect() as conn:
        return list(conn.execute(sa.text(
            "SELECT pid, state, wait_event_type, wait_event, left(query, 60), pg_blocking_pids(pid) "
            "FROM pg_stat_activity WHERE query LIKE '%audit_head%'")).all())
