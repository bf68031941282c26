"""Checkpoints signed in the audit token of a development home (its own token and PIN, its own process)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms import config, store
from kms.audit import AuditLog, export_lines
from kms.audit_signer import AUDIT_KEY_LABEL, AuditSigner, Checkpointer
from kms.audit_verify import verify
from kms.clock import FixedClock
from kms.devhome import Home


def test_checkpoints_are_signed_in_the_audit_token_and_verify_offline(home: Home, tmp_path: Path) -> None:
    cfg = config.load(home.config)
    assert cfg.audit is not None and cfg.audit.token == "kms-audit" and cfg.audit.token not in {
        d.token for d in cfg.domains.values()}
    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.create_all(engine)
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
                assert first is not None and (first.size, first.key) == (7, AUDIT_KEY_LABEL)
                assert checkpointer.checkpoint_now() == first  # the head has not moved: no new checkpoint
        last = checkpointer.checkpoint_now()
        assert last is not None and last.size == 12
    finally:
        signer.close()
    public = serialization.load_pem_public_key((home.path / "audit" / "audit-v1.pem").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    verdict = verify(export_lines(log, 12), public)
    assert verdict.ok and (verdict.checkpoints, verdict.covered) == (2, 12), verdict.summary()
    issuance = serialization.load_pem_public_key((home.path / "trust" / "hrss-issuance-v1.pem").read_bytes())
    assert isinstance(issuance, ec.EllipticCurvePublicKey)
    assert not verify(export_lines(log, 12), issuance).ok  # a domain's key cannot stand in for the audit key


def test_the_audit_section_is_checked(tmp_path: Path, home: Home) -> None:
    import yaml

    from kms.errors import ConfigError

    doc = yaml.safe_load(home.config.read_text())
    doc["audit"]["checkpoint_records"] = 0
    bad = tmp_path / "kms.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"audit\.checkpoint_records"):
        config.load(bad)
