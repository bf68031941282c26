"""The audit chain (kms.audit.log) and its offline verifier (kms.audit.verify): a tamper matrix on 10,000 records, each
attack named by its exact first bad sequence number; concurrent writers keep one gap-free chain."""

from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import EngineFactory

from kms import store
from kms.audit.log import (
    GENESIS,
    AuditLog,
    Checkpoint,
    Seal,
    chain,
    checkpoint_message,
    export_lines,
    mask_pan,
    seal_message,
)
from kms.audit.verify import NOT_THIS_REQUEST, verify
from kms.clock import FixedClock
from kms.errors import AuditUnavailable, StorageUnavailable

N = 10_000
EVERY = 1_000
START = dt.datetime(2026, 11, 27, 8, 0, tzinfo=dt.UTC)
KEY = ec.generate_private_key(ec.SECP256R1())
NONCE = "a1" * 16


def _sign(log: AuditLog, clock: FixedClock) -> None:
    size, head = log.head()
    at = clock.now().strftime("%Y-%m-%dT%H:%M:%SZ")
    log.add_checkpoint(Checkpoint(size, head, at, "kms/audit/signing/audit/v1",
                                  KEY.sign(checkpoint_message(size, head, at), ec.ECDSA(hashes.SHA256()))))


def _seal(log: AuditLog, clock: FixedClock, *, size: int | None = None, nonce: str = NONCE,
          key: ec.EllipticCurvePrivateKey = KEY, **filters: str) -> Seal:
    """What the audit signer makes for one export request (kms.audit.signer.Checkpointer.seal), by a software key."""
    size = log.head()[0] if size is None else size
    head = next(r.hash for r in log.records(size - 1, size))
    at = clock.now().strftime("%Y-%m-%dT%H:%M:%SZ")
    return Seal(size, head, at, nonce, filters, "kms/audit/signing/audit/v1",
                key.sign(seal_message(size, head, at, nonce, filters), ec.ECDSA(hashes.SHA256())))


@pytest.fixture(scope="module")
def chain_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[AuditLog, FixedClock]:
    engine = store.make_engine(f"sqlite:///{tmp_path_factory.mktemp('audit') / 'kms.db'}")
    store.upgrade(engine)
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
    return log, clock


@pytest.fixture(scope="module")
def exported(chain_log: tuple[AuditLog, FixedClock]) -> list[str]:
    return list(export_lines(*_sealed(chain_log)))


def _sealed(chain_log: tuple[AuditLog, FixedClock], **kwargs: str | int) -> tuple[AuditLog, Seal]:
    log, clock = chain_log
    return log, _seal(log, clock, **kwargs)  # type: ignore[arg-type]


def _records(lines: list[str]) -> dict[int, int]:
    """seq -> index of its line."""
    return {json.loads(line)["seq"]: i for i, line in enumerate(lines) if line.startswith('{"type":"record"')}


def test_an_untouched_export_verifies(exported: list[str]) -> None:
    verdict = verify(exported, KEY.public_key())
    assert verdict.ok, verdict.summary()
    assert (verdict.records, verdict.checkpoints, verdict.last_seq, verdict.covered) == (N, N // EVERY, N, N)
    assert (verdict.nonce, verdict.nonce_expected) == (NONCE, False)
    assert verify(exported, KEY.public_key(), nonce=NONCE).nonce_expected
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


def _swap_far(lines: list[str], at: dict[int, int], seq: int) -> list[str]:
    out = list(lines)
    out[at[seq]], out[at[seq + 500]] = out[at[seq + 500]], out[at[seq]]
    return out


def _move_to_end(lines: list[str], at: dict[int, int], seq: int) -> list[str]:
    """Record ``seq`` taken out of its place and put after the last record (before the checkpoint and the seal)."""
    out = _remove(lines, at, seq)
    out.insert(len(out) - 2, lines[at[seq]])
    return out


def _cut_at_checkpoint(lines: list[str], at: dict[int, int], seq: int) -> list[str]:
    """The finding: everything after the checkpoint at ``seq`` dropped (the seal with it); the header kept."""
    return lines[:at[seq] + 2]


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
    (_swap_far, 3_000, "reordered", 3_000),
    (_move_to_end, 4_444, "reordered", 4_444),
    (_cut_at_checkpoint, 9_000, "truncated", 9_001),
])
def test_tamper_matrix_names_the_first_bad_sequence_number(
        exported: list[str], attack: object, seq: int, problem: str, bad: int) -> None:
    tampered = attack(exported, _records(exported), seq)  # type: ignore[operator]
    verdict = verify(tampered, KEY.public_key())
    assert not verdict.ok
    assert (verdict.bad_seq, verdict.problem) == (bad, problem), verdict.summary()
    assert f"record {bad}: {problem}" in verdict.summary()


def test_a_distant_swap_is_called_reordered_and_a_removal_still_removed(exported: list[str]) -> None:
    at = _records(exported)
    verdict = verify(_swap_far(exported, at, 3_000), KEY.public_key())
    assert verdict.detail == "record 3000 comes after record 3500"
    verdict = verify(_remove(exported, at, 3_000), KEY.public_key())  # gone for good: not found further on
    assert (verdict.bad_seq, verdict.problem, verdict.detail) == (3_000, "removed", "record 3000 is missing (next is "
                                                                                     "3001)")


def test_an_export_cut_back_to_an_older_checkpoint_does_not_verify(
        chain_log: tuple[AuditLog, FixedClock], exported: list[str]) -> None:
    """The finding, on the chain: the export cut right after the checkpoint at 9,000 is a complete, correctly signed
    log up to 9,000; only the missing seal for this request tells it apart, and the verdict names it."""
    cut = _cut_at_checkpoint(exported, _records(exported), 9_000)
    assert cut[-1].startswith('{"type":"checkpoint"') and '"size":9000,' in cut[-1]
    verdict = verify(cut, KEY.public_key())
    assert (verdict.ok, verdict.bad_seq, verdict.problem) == (False, 9_001, "truncated")
    assert verdict.summary() == (f"audit log NOT verified: record 9001: truncated: {NOT_THIS_REQUEST} (it has no "
                                 "export seal)")

    # An attacker who also holds an older export (sealed at 9,000 for another nonce) splices its seal on: the
    # header still names this request's nonce.
    older = list(export_lines(*_sealed(chain_log, size=9_000, nonce="b2" * 16)))
    spliced = [*cut, older[-1]]
    verdict = verify(spliced, KEY.public_key())
    assert (verdict.bad_seq, verdict.problem) == (9_001, "truncated")
    assert verdict.detail == f"{NOT_THIS_REQUEST} (it is sealed for nonce {'b2' * 16}, not the header's {NONCE})"
    # ... and the header's size gives it away even with the nonce rewritten to the older one.
    renonced = [cut[0].replace(NONCE, "b2" * 16), *spliced[1:]]
    verdict = verify(renonced, KEY.public_key())
    assert (verdict.bad_seq, verdict.problem, verdict.detail) == (
        9_001, "truncated", "the header announces 10000 records; the export is sealed at 9000")
    # The older export whole (or the cut with the older header) is a true export of an older request: only the
    # nonce the auditor kept apart tells it from this one (docs/audit.md, section 4).
    assert verify(older, KEY.public_key()).ok
    verdict = verify(older, KEY.public_key(), nonce=NONCE)
    assert (verdict.ok, verdict.bad_seq, verdict.problem) == (False, 9_001, "truncated")
    assert verdict.detail == f"{NOT_THIS_REQUEST} (it is sealed for nonce {'b2' * 16}, not the expected {NONCE})"


def test_the_header_and_the_seal_must_agree(chain_log: tuple[AuditLog, FixedClock], exported: list[str]) -> None:
    header = exported[0]
    assert f'"size":{N},' in header and f'"nonce":"{NONCE}"' in header
    for size, bad, problem, detail in (
            (N - 1, None, "edited", f"its size {N - 1} is not the sealed size {N}"),
            (N + 1, N + 1, "truncated", f"the header announces {N + 1} records; the export is sealed at {N}")):
        verdict = verify([header.replace(f'"size":{N},', f'"size":{size},'), *exported[1:]], KEY.public_key())
        assert (verdict.ok, verdict.bad_seq, verdict.problem, verdict.detail) == (False, bad, problem, detail)
    assert verify([header.replace(f'"size":{N},', '"size":"10000",'), *exported[1:]], KEY.public_key()).problem == (
        "edited")
    no_nonce = verify([header.replace(f'"nonce":"{NONCE}",', ""), *exported[1:]], KEY.public_key())
    assert (no_nonce.ok, no_nonce.problem) == (False, "truncated")
    assert no_nonce.detail.endswith("and the header names none)")
    filtered = verify([header.replace('"filters":{}', '"filters":{"kind":"issuance"}'), *exported[1:]],
                      KEY.public_key())
    assert (filtered.ok, filtered.bad_seq, filtered.problem) == (False, None, "edited")
    assert filtered.summary() == "audit log NOT verified: header: edited: its filters are not the sealed ones"
    old_format = verify([header.replace('"version":2', '"version":1'), *exported[1:]], KEY.public_key())
    assert (old_format.ok, old_format.problem) == (False, "unreadable")
    assert verify(exported[1:], KEY.public_key()).detail == "the export does not start with its header"


def test_the_seal_is_signed_by_the_audit_key_and_closes_the_export(
        chain_log: tuple[AuditLog, FixedClock], exported: list[str]) -> None:
    forged = list(export_lines(*_sealed(chain_log, key=ec.generate_private_key(ec.SECP256R1()))))
    verdict = verify(forged, KEY.public_key())
    assert (verdict.ok, verdict.bad_seq, verdict.problem) == (False, N, "checkpoint forged")
    doc = json.loads(exported[-1])
    doc["nonce"] = "c3" * 16  # the seal's own nonce changed, the header's to match: the signature breaks
    renonced = [exported[0].replace(NONCE, "c3" * 16), *exported[1:-1], json.dumps(doc, separators=(",", ":"))]
    assert verify(renonced, KEY.public_key()).problem == "checkpoint forged"
    trailing = verify([*exported, exported[-3]], KEY.public_key())
    assert (trailing.ok, trailing.problem, trailing.detail) == (False, "inserted", "a line follows the export seal")


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
    assert verify(export_lines(log, _seal(log, clock)), KEY.public_key()).ok


def test_the_checkpoint_lock_stops_no_append_and_stores_the_replica(backend: EngineFactory) -> None:
    """Replicas sign checkpoints one at a time (AuditLog.checkpoint_lock), but a replica holding that lock (its
    signer slow, or hung) keeps no other from appending: issuance goes on, only checkpoints wait. Each checkpoint
    stored names the replica that had it signed; its export line says so, outside what is signed."""
    clock = FixedClock(START)
    log, other = AuditLog(backend(), clock), AuditLog(backend(), clock)
    with log.checkpoint_lock() as locked:
        seq = other.record("test.event")  # another replica appends while the lock is held
        assert locked.head()[0] == seq == 1 and locked.last_checkpoint() is None
        size, head = locked.head()
        stored = locked.add_checkpoint(Checkpoint(size, head, "2026-12-01T23:00:00Z", "k", b"sig"), replica="kms-2")
    assert stored.replica == "kms-2" and other.last_checkpoint() == stored
    assert other.last_checkpoint().replica == "kms-2"  # type: ignore[union-attr]
    assert json.loads(stored.line())["replica"] == "kms-2"
    assert "replica" not in json.loads(replace(stored, replica=None).line())


def test_a_failed_append_rolls_back_the_change_it_describes(tmp_path: Path) -> None:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.upgrade(engine)
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
    assert mask_pan("6214830000001234") == "621483******1234"  # 16 digits: first 6 and last 4
    # Shorter PANs (the validator takes 12 to 19 digits) show only their last 4, their length kept: 6 and 4 of 12
    # would leave 2 digits hidden.
    assert mask_pan("621483001234") == "********1234"
    assert mask_pan("621483000001234") == "***********1234"
    assert mask_pan("62148301234") == "*" * 11 and mask_pan("12345") == "*****" and mask_pan(None) == ""
    for length in range(12, 20):
        pan = "".join(str(i % 10) for i in range(length))
        masked = mask_pan(pan)
        assert len(masked) == length and masked.endswith(pan[-4:])
        assert masked.count("*") == (length - 10 if length >= 16 else length - 4), masked


def test_append_many_continues_the_same_chain(tmp_path: Path) -> None:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.upgrade(engine)
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
    assert verify(export_lines(log, _seal(log, clock)), KEY.public_key()).ok


def test_a_filtered_export_is_as_complete_and_verifiable_as_a_full_one(tmp_path: Path) -> None:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.upgrade(engine)
    clock = FixedClock(START)
    log = AuditLog(engine, clock)
    for i in range(30):
        log.record("issuance.issued" if i % 3 else "request.refused", domain=("hrss", "bank")[i % 2], subject=str(i))
    _sign(log, clock)
    lines = list(export_lines(log, _seal(log, clock, kind="request")))
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
    verdict = verify(relabelled, KEY.public_key())  # the header must say what the seal signed
    assert (verdict.ok, verdict.bad_seq, verdict.problem) == (False, None, "edited"), verdict.summary()
    assert not verify([lines[0]], KEY.public_key()).ok  # an export with no signed checkpoint proves nothing


def test_a_replica_waits_for_the_checkpoint_lock_only_so_long(backend: EngineFactory,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen holder of the checkpoint lock (its signer hung, its process stopped) must not block every other
    replica's checkpoints, exports and shutdown for ever: after store.LOCK_WAIT the wait ends StorageUnavailable."""
    monkeypatch.setattr(store, "LOCK_WAIT", 0.2)
    clock = FixedClock(START)
    log, other = (AuditLog(store.translate_storage_faults(backend()), clock) for _ in range(2))
    with (log.checkpoint_lock(), pytest.raises(StorageUnavailable, match="lock not available"),
          other.checkpoint_lock()):
        pass
    with other.checkpoint_lock() as locked:  # free again; and the wait left no lock_timeout behind
        assert locked.head() == (0, GENESIS.hex())
