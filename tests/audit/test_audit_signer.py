"""Checkpoints signed in the audit token of a development home (its own token and PIN, its own process)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import EngineFactory

from kms import config, store
from kms.audit.log import AuditLog, export_lines
from kms.audit.signer import AuditSigner, Checkpointer
from kms.audit.verify import verify
from kms.clock import FixedClock
from kms.dev.home import Home
from kms.hsm.labels import AUDIT_KEY
from kms.hsm.session import TokenSession

NONCE, OTHER = "5e" * 16, "7f" * 32


@pytest.fixture(autouse=True)
def fresh_signed_head(home: Home) -> Iterator[None]:
    """These tests sign chains of their own databases with the session home's audit token: the signer's remembered
    head is reset to the genesis before and after, which is always safe (the next checkpoint of any log is then
    checked from its first record)."""
    cfg = config.load(home.config)
    with runtime_session(cfg) as session:
        session.write_data("kms/audit/signed-head", b"0:" + b"0" * 64)
    yield
    with runtime_session(cfg) as session:
        session.write_data("kms/audit/signed-head", b"0:" + b"0" * 64)


def test_checkpoints_are_signed_in_the_audit_token_and_verify_offline(home: Home, tmp_path: Path) -> None:
    cfg = config.load(home.config)
    assert cfg.audit is not None and cfg.audit.token == "kms-audit" and cfg.audit.token not in {
        d.token for d in cfg.domains.values()}
    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.upgrade(engine)
    clock = FixedClock(dt.datetime(2026, 11, 27, 9, 0, tzinfo=dt.UTC))
    log = AuditLog(engine, clock)
    signer = AuditSigner(home.config)
    checkpointer = Checkpointer(log, signer, clock, every_records=5, every_seconds=3600)
    try:
        assert checkpointer.checkpoint_now() is None  # nothing to sign yet
        for i in range(12):
            log.record("test.event", subject=str(i))
            if i == 6:
                first = checkpointer.checkpoint_now()
                assert first is not None and (first.size, first.key) == (7, AUDIT_KEY)
                assert checkpointer.checkpoint_now() == first  # the head has not moved: no new checkpoint
        last = checkpointer.checkpoint_now()
        assert last is not None and last.size == 12
        seal = checkpointer.seal(NONCE, {"kind": "test"})  # nothing new: sealed at the last checkpoint
        assert (seal.size, seal.head, seal.nonce, seal.key) == (12, last.head, NONCE, AUDIT_KEY)
        log.record("test.event", subject="12")
        later = checkpointer.seal(OTHER, {})  # a new record: checkpointed (stored), then sealed at the same head
        assert later.size == 13 and checkpointer.checkpoint_now() == log.last_checkpoint()
        assert log.last_checkpoint() is not None and log.last_checkpoint().size == 13  # type: ignore[union-attr]
    finally:
        signer.close()
    public = serialization.load_pem_public_key((home.path / "audit" / "audit-v1.pem").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    verdict = verify(export_lines(log, seal), public, nonce=NONCE)
    assert verdict.ok and (verdict.checkpoints, verdict.covered, verdict.filtered) == (2, 12, True), verdict.summary()
    assert verify(export_lines(log, later), public, nonce=OTHER).ok
    assert verify(export_lines(log, seal), public, nonce=OTHER).problem == "truncated"  # another request's seal
    issuance = serialization.load_pem_public_key((home.path / "trust" / "hrss-issuance-v1.pem").read_bytes())
    assert isinstance(issuance, ec.EllipticCurvePublicKey)
    assert not verify(export_lines(log, later), issuance).ok  # a domain's key cannot stand in for the audit key


def test_the_audit_section_is_checked(tmp_path: Path, home: Home) -> None:
    import yaml

    from kms.errors import ConfigError

    doc = yaml.safe_load(home.config.read_text())
    doc["audit"]["checkpoint_records"] = 0
    bad = tmp_path / "kms.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"audit\.checkpoint_records"):
        config.load(bad)


def test_the_signer_seals_no_export_of_a_log_it_signed_further_than(home: Home, tmp_path: Path) -> None:
    """A seal obeys the signer's rule as a checkpoint does: a database reset (or rolled back to a copy) behind the
    signed head gets no seal, not even one at its own, shorter head."""
    from kms.errors import AuditChainBroken

    clock = FixedClock(dt.datetime(2026, 11, 27, 11, 0, tzinfo=dt.UTC))
    signer = AuditSigner(home.config)
    try:
        logs = []
        for name, count in (("before.db", 5), ("after.db", 9)):
            engine = store.make_engine(f"sqlite:///{tmp_path / name}")
            store.upgrade(engine)
            logs.append(AuditLog(engine, clock))
            for i in range(count):
                logs[-1].record("test.event", subject=str(i))
        assert Checkpointer(logs[1], signer, clock).seal(NONCE, {}).size == 9  # signed head: 9
        with pytest.raises(AuditChainBroken, match="holds 5 records, but 9 were signed already"):
            Checkpointer(logs[0], signer, clock).seal(NONCE, {})
    finally:
        signer.close()


def test_a_log_rewritten_behind_the_signers_back_is_never_signed_again(home: Home, tmp_path: Path) -> None:
    """Edit a signed record, re-chain everything after it, fix the head, delete the checkpoints: the signer, which
    keeps the head it last signed in its own token, refuses to sign the rewritten chain (so no export of it can end
    with a good checkpoint)."""
    import sqlalchemy as sa

    from kms.audit.log import chain
    from kms.errors import AuditChainBroken

    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.upgrade(engine)
    clock = FixedClock(dt.datetime(2026, 11, 27, 10, 0, tzinfo=dt.UTC))
    log = AuditLog(engine, clock)
    signer = AuditSigner(home.config)
    checkpointer = Checkpointer(log, signer, clock)
    try:
        for i in range(30):
            log.record("test.event", subject=str(i))
        assert checkpointer.checkpoint_now() is not None  # signed at 30
        with engine.begin() as conn:
            rows = conn.execute(sa.select(store.audit_log).order_by(store.audit_log.c.seq)).all()
            prev = bytes.fromhex(rows[13].hash)
            for row in rows[14:]:
                body = row.body.replace('"outcome":"ok"', '"outcome":"refused"') if row.seq == 15 else row.body
                digest = chain(prev, body.encode())
                conn.execute(store.audit_log.update().where(store.audit_log.c.seq == row.seq)
                             .values(body=body, prev=prev.hex(), hash=digest.hex()))
                prev = digest
            conn.execute(store.audit_head.update().values(hash=prev.hex()))
            conn.execute(store.audit_checkpoints.delete())
        with pytest.raises(AuditChainBroken, match="does not extend the head signed at 30"):
            checkpointer.checkpoint_now()
        log.record("test.after")  # more records on top of the rewrite change nothing
        with pytest.raises(AuditChainBroken):
            checkpointer.checkpoint_now()
        with pytest.raises(AuditChainBroken):  # nor is an export of it sealed
            checkpointer.seal(NONCE, {})
    finally:
        signer.close()


def runtime_session(cfg: config.Config) -> TokenSession:
    from kms import runtime

    assert cfg.audit is not None
    return runtime.module(cfg.hsm).open(cfg.audit.token, cfg.audit.pin.resolve())


def test_a_closed_signer_is_not_restarted_by_a_late_supervision_round(home: Home) -> None:
    """Stopping the service closes the signer; a health round still running (its join timed out) must not start
    a new signer process, logged into the audit token, after that."""
    signer = AuditSigner(home.config)
    signer.close()
    try:
        assert signer.supervise() is False
        assert signer.pids() == [] and signer.restarts == 0
    finally:
        signer.close()


@pytest.mark.parametrize("signers", ["shared", "embedded"])
def test_replicas_checkpoint_one_at_a_time(home: Home, backend: EngineFactory, signers: str) -> None:
    """Two replicas (each its own engine, audit log and checkpointer, as two `kms serve` on one database) append and
    checkpoint at once, through one audit signer (``shared``: the audit worker service) or each through a signer
    process of its own on the one audit token (``embedded``: the signed head is a data object that both processes
    read and replace). Without a lock across replicas, one reads the signer's head, the other has it signed
    further, and the first is refused ("… were signed already", "… are not all there"); with
    AuditLog.checkpoint_lock no round is refused, the checkpoints name both replicas, and the export verifies."""
    import threading

    from kms.errors import KmsError

    clock = FixedClock(dt.datetime(2026, 12, 1, 23, 0, tzinfo=dt.UTC))
    names = ("replica-a", "replica-b")
    shared = AuditSigner(home.config)
    own = {names[0]: shared, names[1]: AuditSigner(home.config) if signers == "embedded" else shared}
    replicas = {name: AuditLog(backend(), clock) for name in names}
    checkpointers = {name: Checkpointer(log, own[name], clock, replica=name) for name, log in replicas.items()}
    start = threading.Barrier(len(replicas))
    refused: list[KmsError] = []

    def replica(name: str) -> None:
        log, checkpointer = replicas[name], checkpointers[name]
        start.wait()
        for n in range(ROUNDS):
            log.record("test.event", subject=f"{name}-{n}")
            try:
                if n % 5 == 4:
                    checkpointer.seal(NONCE, {})
                else:
                    checkpointer.checkpoint_now()
            except KmsError as error:
                refused.append(error)

    try:
        threads = [threading.Thread(target=replica, args=(name,)) for name in replicas]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seal = checkpointers["replica-a"].seal(OTHER, {})
    finally:
        for signer in set(own.values()):
            signer.close()
    assert refused == []
    log = replicas["replica-b"]
    checkpoints = list(log.checkpoints())
    assert seal.size == 2 * ROUNDS and checkpoints[-1].size == 2 * ROUNDS
    assert {c.replica for c in checkpoints} == {"replica-a", "replica-b"}
    lines = list(export_lines(log, seal))
    assert {json.loads(line).get("replica") for line in lines if '"type":"checkpoint"' in line} == {
        "replica-a", "replica-b"}
    public = serialization.load_pem_public_key((home.path / "audit" / "audit-v1.pem").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    verdict = verify(iter(lines), public, nonce=OTHER)
    assert verdict.ok and verdict.covered == 2 * ROUNDS and verdict.checkpoints == len(checkpoints), verdict.summary()


ROUNDS = 40


def test_replicas_crossing_the_threshold_together_sign_one_checkpoint(home: Home, backend: EngineFactory) -> None:
    """The checkpointer's periodic round judges again under the checkpoint lock whether a checkpoint is due, by the
    newest checkpoint of any replica: every_records past it, or records past one older than every_seconds. Two
    replicas whose rounds come together sign one checkpoint, not two."""
    clock = FixedClock(dt.datetime(2026, 12, 1, 23, 30, tzinfo=dt.UTC))
    signer = AuditSigner(home.config)
    logs = [AuditLog(backend(), clock) for _ in range(2)]
    a, b = (Checkpointer(log, signer, clock, every_records=5, every_seconds=60, replica=name)
            for log, name in zip(logs, ("replica-a", "replica-b"), strict=True))
    try:
        for i in range(5):
            logs[i % 2].record("test.event", subject=str(i))
        first = a.checkpoint_due(1.0)
        assert first is not None and (first.size, first.replica) == (5, "replica-a")
        assert b.checkpoint_due(1.0) is None  # a's covers it
        for i in range(3):
            logs[1].record("test.event", subject=f"more-{i}")
        assert a.checkpoint_due(1.0) is None and b.checkpoint_due(60.0) is None  # 3 records, a checkpoint 0 s old
        clock.advance(dt.timedelta(seconds=60))
        second = b.checkpoint_due(60.0)
        assert second is not None and (second.size, second.replica) == (8, "replica-b")
        assert a.checkpoint_due(60.0) is None
    finally:
        signer.close()
    assert [(c.size, c.replica) for c in logs[0].checkpoints()] == [(5, "replica-a"), (8, "replica-b")]


def test_a_stale_signing_request_is_refused_as_moved_and_signs_nothing(home: Home, tmp_path: Path) -> None:
    """A request prepared from the signed head as it was (a replica's request that timed out, arriving late after
    another checkpoint was signed) is refused as AuditSignedHeadMoved (retryable), not as a broken chain, before
    anything is signed or anchored: the signed head stays where the newer checkpoint put it. Without a base (an
    older front end) the chain rule alone applies."""
    import hashlib

    from kms.audit.log import GENESIS, checkpoint_message
    from kms.clock import rfc3339
    from kms.errors import AuditChainBroken, AuditSignedHeadMoved

    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.upgrade(engine)
    clock = FixedClock(dt.datetime(2026, 12, 1, 23, 40, tzinfo=dt.UTC))
    log = AuditLog(engine, clock)
    signer = AuditSigner(home.config)
    try:
        for i in range(3):
            log.record("test.event", subject=str(i))
        base = signer.signed_head()
        assert base == (0, GENESIS.hex())
        size, head = log.head()
        digests = [hashlib.sha256(r.body.encode()).digest() for r in log.records(0, size)]
        at = rfc3339(clock.now())
        for i in range(3, 5):
            log.record("test.event", subject=str(i))
        newer = Checkpointer(log, signer, clock).checkpoint_now()  # another replica's, signed first
        assert newer is not None and newer.size == 5
        with pytest.raises(AuditSignedHeadMoved, match="signed head is at 5, not 0"):
            signer.sign(size, head, at, digests, base)
        with pytest.raises(AuditSignedHeadMoved):
            signer.seal(size, head, at, NONCE, {}, digests, base)
        assert signer.signed_head() == (5, newer.head)  # nothing was signed
        with pytest.raises(AuditChainBroken, match="3 records, but 5 were signed already"):
            signer.sign(size, head, at, digests)  # an older caller: the chain rule only
        # A request from the current head signs as before.
        log.record("test.event", subject="5")
        size, head = log.head()
        signature = signer.sign(size, head, at, [hashlib.sha256(r.body.encode()).digest()
                                                 for r in log.records(5, size)], (5, newer.head))
        public = serialization.load_pem_public_key((home.path / "audit" / "audit-v1.pem").read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, checkpoint_message(size, head, at), ec.ECDSA(hashes.SHA256()))
        assert signer.signed_head() == (6, head)
    finally:
        signer.close()
