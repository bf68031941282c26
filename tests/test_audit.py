"""The audit chain (kms.audit) and its offline verifier (kms.audit_verify): a tamper matrix on 10,000 records, each
attack named by its exact first bad sequence number; concurrent writers keep one gap-free chain."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import EngineFactory
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kms import store
from kms.audit import AuditLog, AuditUnavailable, Checkpoint, chain, checkpoint_message, export_lines, mask_pan
from kms.audit_verify import verify
from kms.clock import FixedClock

N = 10_000
EVERY = 1_000
START = dt.datetime(2026, 11, 27, 8, 0, tzinfo=dt.UTC)
KEY = ec.generate_private_key(ec.SECP256R1())


def _sign(log: AuditLog, clock: FixedClock) -> None:
    size, head = log.head()
    at = clock.now().strftime("%Y-%m-%dT%H:%M:%SZ")
    log.add_checkpoint(Checkpoint(size, head, at, "kms/audit/signing/audit/v1",
                                  KEY.sign(checkpoint_message(size, head, at), ec.ECDSA(hashes.SHA256()))))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    engine = store.make_engine(f"sqlite:///{tmp_path_factory.mktemp('audit') / 'kms.db'}")
    store.create_all(engine)
    clock = FixedClock(START)
    log = AuditLog(engine, clock)
    for start in range(0, N, EVERY):
        with engine.begin() as conn:
            for i in range(start, start + EVERY):
                clock.advance(dt.timedelta(seconds=1))
                log.append(conn, "issuance.issued", actor="urn:kms:station:bureau-a:station-a1",
                           domain=("hrss", "bank")[i % 2], subject=f"B-1/card-{i:05d}",
                           detail={"pan": mask_pan(f"62148300000{i:08d}"), "serial": f"{i:032X}"})
        _sign(log, clock)
    return list(export_lines(log, log.head()[0]))


def _records(lines: list[str]) -> dict[int, int]:
    """seq -> index of its line."""
    return {json.loads(line)["seq"]: i for i, line in enumerate(lines) if line.startswith('{"type":"record"')}


def test_an_untouched_export_verifies(exported: list[str]) -> None:
    verdict = verify(exported, KEY.public_key())
    assert verdict.ok, verdict.summary()
    assert (verdict.records, verdict.checkpoints, verdict.last_seq, verdict.covered) == (N, N // EVERY, N, N)
    assert not verify(exported, ec.generate_private_key(ec.SECP256R1()).public_key()).ok


def _edit(lines: list[str], at: dict[int, int], seq: int) -> list[str]:
    out = list(lines)
    out[at[seq]] = out[at[seq]].replace('"outcome":"ok"', '"outcome":"refused"')
    return out


def _edit_and_rehash_one(lines: list[str], at: dict[int, int], seq: int) -> list[str]:

    out = list(lines)
    doc = out[at[seq]]
    prefix, body = doc.split(',"body":', 1)
    body = body[:-1].replace('"outcome":"ok"', '"outcome":"refused"')
    prev = json.loads(prefix + "}")["prev"]
    new_hash = chain(bytes.fromhex(prev), body.encode()).hex()
    out[at[seq]] = f'{{"type":"record","seq":{seq},"prev":"{prev}","hash":"{new_hash}","body":{body}}}'
    return out


def _remove(lines: list[str], at: dict[int, int], seq: int) -> list[str]:
    return [line for i, line in enumerate(lines) if i != at[seq]]


def _insert(lines: list[str], at: dict[int, int], seq: int) -> list[str]:
    """A forged record that chains correctly to its predecessor (hashes need no secret), put before record seq."""

    prev = json.loads(lines[at[seq - 1]].split(',"body":', 1)[0] + "}")["hash"]
    body = ('{"actor":"urn:kms:station:bureau-a:station-a1","at":"2026-11-27T08:00:00Z","detail":{},"domain":"bank",'
            f'"kind":"issuance.issued","outcome":"ok","seq":{seq},"subject":"B-1/forged"}}')
    digest = chain(bytes.fromhex(prev), body.encode()).hex()
    out = list(lines)
    out.insert(at[seq], f'{{"type":"record","seq":{seq},"prev":"{prev}","hash":"{digest}","body":{body}}}')
    return out


def _reorder(lines: list[str], at: dict[int, int], seq: int) -> list[str]:
    out = list(lines)
    out[at[seq]], out[at[seq + 1]] = out[at[seq + 1]], out[at[seq]]
    return out


def _truncate(lines: list[str], at: dict[int, int], seq: int) -> list[str]:
    last_checkpoint = max(i for i, line in enumerate(lines) if line.startswith('{"type":"checkpoint"'))
    return [*lines[:at[seq]], lines[last_checkpoint]]  # records from seq on dropped, the checkpoint kept


def _forge_checkpoint(lines: list[str], at: dict[int, int], seq: int) -> list[str]:
    out = list(lines)
    i = next(i for i, line in enumerate(lines) if line.startswith('{"type":"checkpoint"') and
             json.loads(line)["size"] == seq)
    doc = json.loads(out[i])
    forger = ec.generate_private_key(ec.SECP256R1())
    doc["signature"] = forger.sign(checkpoint_message(doc["size"], doc["head"], doc["at"]),
                                   ec.ECDSA(hashes.SHA256())).hex()
    out[i] = json.dumps(doc, separators=(",", ":"))
    return out


@pytest.mark.parametrize(("attack", "seq", "problem", "bad"), [
    (_edit, 4_321, "edited", 4_321),
    (_edit_and_rehash_one, 4_321, "edited", 4_321),
    (_remove, 7_000, "removed", 7_000),
    (_insert, 2_500, "inserted", 2_500),
    (_reorder, 9_876, "reordered", 9_876),
    (_truncate, 9_990, "truncated", 9_990),
    (_forge_checkpoint, 6_000, "checkpoint forged", 6_000),
    (_edit, 1, "edited", 1),
    (_remove, N, "truncated", N),
])
def test_tamper_matrix_names_the_first_bad_sequence_number(
        exported: list[str], attack: object, seq: int, problem: str, bad: int) -> None:
    tampered = attack(exported, _records(exported), seq)  # type: ignore[operator]
    verdict = verify(tampered, KEY.public_key())
    assert not verdict.ok
    assert (verdict.bad_seq, verdict.problem) == (bad, problem), verdict.summary()
    assert f"record {bad}: {problem}" in verdict.summary()


def test_concurrent_writers_keep_one_gap_free_chain(backend: EngineFactory) -> None:
    clock = FixedClock(START)
    engines = [backend() for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(engines))  # all at once, the first appends included (the head row's creation)

    def write(engine: sa.Engine, who: int) -> None:
        log = AuditLog(engine, clock)
        start.wait()
        try:
            for i in range(50):
                with engine.begin() as conn:
                    log.append(conn, "test.event", actor=f"writer-{who}", subject=str(i))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(e, i)) for i, e in enumerate(engines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    log = AuditLog(engines[0], clock)
    records = list(log.records())
    assert [r.seq for r in records] == list(range(1, 201))
    _sign(log, clock)
    assert verify(export_lines(log, 200), KEY.public_key()).ok


def test_a_failed_append_rolls_back_the_change_it_describes(tmp_path: Path) -> None:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.create_all(engine)
    log = AuditLog(engine, FixedClock(START))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TRIGGER audit_full BEFORE INSERT ON audit_log WHEN NEW.seq > 2 "
                             "BEGIN SELECT RAISE(ABORT, 'audit store full'); END"))
    log.record("test.one")
    log.record("test.two")
    with pytest.raises(AuditUnavailable, match="nothing was done"), engine.begin() as conn:
        conn.execute(store.audit_head.update().values(seq=store.audit_head.c.seq))  # a change ...
        conn.execute(sa.text("CREATE TABLE changed (x INTEGER)"))
        log.append(conn, "test.three")  # ... whose record cannot be written
    with engine.connect() as conn:
        assert sa.inspect(conn).has_table("changed") is False
    assert [r.seq for r in log.records()] == [1, 2] and log.head()[0] == 2


def test_pans_are_masked() -> None:
    assert mask_pan("6214830000000000123") == "621483*********0123"
    assert mask_pan("12345") == "*****" and mask_pan(None) == ""


def test_append_many_continues_the_same_chain(tmp_path: Path) -> None:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.create_all(engine)
    clock = FixedClock(START)
    log = AuditLog(engine, clock)
    log.record("test.first")
    with engine.begin() as conn:
        assert log.append_many(conn, [{"kind": "issuance.issued", "subject": f"B/c{i}"} for i in range(5)]) == [
            2, 3, 4, 5, 6]
        assert log.append_many(conn, []) == []
    log.record("test.last")
    _sign(log, clock)
    assert [r.seq for r in log.records()] == list(range(1, 8))
    assert verify(export_lines(log, 7), KEY.public_key()).ok


def test_a_filtered_export_is_as_complete_and_verifiable_as_a_full_one(tmp_path: Path) -> None:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.create_all(engine)
    clock = FixedClock(START)
    log = AuditLog(engine, clock)
    for i in range(30):
        log.record("issuance.issued" if i % 3 else "request.refused", domain=("hrss", "bank")[i % 2], subject=str(i))
    _sign(log, clock)
    lines = list(export_lines(log, 30, kind="request"))
    shown = [line for line in lines if line.startswith('{"type":"record"')]
    assert len(shown) == 10 and all('"kind":"request.refused"' in line for line in shown)
    assert sum(line.startswith('{"type":"omitted"') for line in lines) == 20
    verdict = verify(lines, KEY.public_key())
    assert verdict.ok and verdict.filtered and (verdict.records, verdict.omitted) == (30, 20), verdict.summary()
    at = _records(lines) | {json.loads(line)["seq"]: i for i, line in enumerate(lines)
                            if line.startswith('{"type":"omitted"')}
    for attack, seq, problem in ((_edit_and_rehash_one, 4, "edited"), (_remove, 7, "removed"),
                                 (_remove, 8, "removed"), (_insert, 5, "inserted")):
        verdict = verify(attack(lines, at, seq), KEY.public_key())
        assert (verdict.ok, verdict.bad_seq, verdict.problem) == (False, seq, problem), (attack, verdict.summary())
    relabelled = [lines[0].replace('"filtered":true', '"filtered":false'), *lines[1:]]
    assert verify(relabelled, KEY.public_key()).ok  # the header only describes; the chain proves
    assert not verify([lines[0]], KEY.public_key()).ok  # an export with no signed checkpoint proves nothing
