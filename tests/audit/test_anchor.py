"""The audit anchor (kms.audit.anchor) against a real OpenBao server: the shipped policies (the signer's role creates
and never overwrites or deletes; the auditor's reads and never writes), the spool and its backlog when OpenBao is
down, and the comparison of an export with the anchored history."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import ROOT, TcpGate
from hvac import exceptions as bao_errors
from openbao import BaoServer

from kms import config
from kms.audit.anchor import Anchor, anchor_path, compare, from_config, read_anchors
from kms.audit.log import GENESIS, AuditRecord, Checkpoint, Seal, chain, checkpoint_message
from kms.canonical import canonical
from kms.errors import ConfigError, PermissionDenied
from kms.hsm.labels import AUDIT_KEY

WRITER_POLICY = (ROOT / "deploy" / "openbao" / "kms-audit-anchor.hcl").read_text()
AUDITOR_POLICY = (ROOT / "deploy" / "openbao" / "kms-auditor.hcl").read_text()
KEY = ec.generate_private_key(ec.SECP256R1())


class Clock:
    """Monotonic seconds the test moves on."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _login(openbao: BaoServer, name: str, policy: str, address: str | None = None) -> hvac.Client:
    role_id, secret_id = openbao.approle(name, policy)
    client = hvac.Client(url=address or openbao.address, timeout=3)
    client.auth.approle.login(role_id=role_id, secret_id=secret_id)
    return client


@pytest.fixture
def prefix() -> str:
    """A prefix of this test's own on the shared server; the shipped policies are pointed at it."""
    return f"t{secrets.token_hex(4)}/audit"


def _roles(openbao: BaoServer, prefix: str) -> tuple[hvac.Client, hvac.Client]:
    tag = prefix.split("/")[0]
    writer = _login(openbao, f"anchor-{tag}", WRITER_POLICY.replace("kms/audit", prefix))
    auditor = _login(openbao, f"auditor-{tag}", AUDITOR_POLICY.replace("kms/audit", prefix))
    return writer, auditor


def _checkpoint(size: int, head: str | None = None, at: str = "2026-12-01T09:00:00Z",
                key: ec.EllipticCurvePrivateKey = KEY) -> Checkpoint:
    head = head or secrets.token_hex(32)
    return Checkpoint(size, head, at, AUDIT_KEY, key.sign(checkpoint_message(size, head, at),
                                                          ec.ECDSA(hashes.SHA256())))


def _anchored(openbao: BaoServer, prefix: str, size: int) -> dict[str, Any]:
    return dict(openbao.client().secrets.kv.v2.read_secret_version(
        path=anchor_path(prefix, size), mount_point="kv", raise_on_deleted_version=True)["data"])


# -- the policies, on the real server -------------------------------------------------------------------------------


def test_the_signers_role_creates_anchors_and_can_never_overwrite_or_delete_one(
        openbao: BaoServer, prefix: str, tmp_path: Path) -> None:
    writer, _ = _roles(openbao, prefix)
    anchor = Anchor(writer, mount="kv", prefix=prefix, spool=tmp_path / "spool")
    first = _checkpoint(7)
    anchor.record(first)
    assert anchor.status().to_json() == {"backlog": 0, "anchored": 7, "conflicts": 0, "error": "", "oldest": 0}
    stored = _anchored(openbao, prefix, 7)
    assert stored["data"]["head"] == first.head and stored["metadata"]["version"] == 1
    path = anchor_path(prefix, 7)
    kv = writer.secrets.kv.v2
    attempts = {
        "overwrite with cas=0": lambda: kv.create_or_update_secret(path=path, secret={"head": "0" * 64}, cas=0,
                                                                  mount_point="kv"),
        "overwrite without cas": lambda: kv.create_or_update_secret(path=path, secret={"head": "0" * 64},
                                                                   mount_point="kv"),
        "overwrite with cas=1": lambda: kv.create_or_update_secret(path=path, secret={"head": "0" * 64}, cas=1,
                                                                  mount_point="kv"),
        "patch": lambda: kv.patch(path=path, secret={"head": "0" * 64}, mount_point="kv"),
        "delete the latest version": lambda: kv.delete_latest_version_of_secret(path=path, mount_point="kv"),
        "delete versions": lambda: kv.delete_secret_versions(path=path, versions=[1], mount_point="kv"),
        "destroy versions": lambda: kv.destroy_secret_versions(path=path, versions=[1], mount_point="kv"),
        "delete the metadata": lambda: kv.delete_metadata_and_all_versions(path=path, mount_point="kv"),
        "shorten the history": lambda: kv.update_metadata(path=path, max_versions=1, mount_point="kv"),
        "read": lambda: kv.read_secret_version(path=path, mount_point="kv", raise_on_deleted_version=True),
        "list": lambda: kv.list_secrets(path=f"{prefix}/checkpoints", mount_point="kv"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(bao_errors.Forbidden):
            attempt()
            pytest.fail(f"the anchor role could {what}")
    after = _anchored(openbao, prefix, 7)
    assert after["data"] == stored["data"] and after["metadata"]["version"] == 1
    assert not after["metadata"]["deletion_time"] and not after["metadata"]["destroyed"]
    # Another checkpoint signed at the same size (a second replica, a re-signed log) is refused, never written over
    # the anchor; it is kept in the spool's conflicts/ and counted, and later ones are anchored as before.
    anchor.record(_checkpoint(7, at="2026-12-01T09:00:05Z"))
    anchor.record(_checkpoint(9))
    status = anchor.status()
    assert (status.backlog, status.conflicts, status.anchored, status.error) == (0, 1, 9, "")
    assert [p.name for p in (tmp_path / "spool" / "conflicts").iterdir()] == [f"{7:016d}.json"]
    assert _anchored(openbao, prefix, 7)["data"] == stored["data"]
    anchor.record(_checkpoint(7, at="2026-12-01T09:00:09Z"))  # a third: kept beside the second, not over it
    assert anchor.status().conflicts == 2 and _anchored(openbao, prefix, 7)["data"] == stored["data"]


def test_the_auditors_role_reads_the_anchors_and_cannot_write_any(
        openbao: BaoServer, prefix: str, tmp_path: Path) -> None:
    writer, auditor = _roles(openbao, prefix)
    anchor = Anchor(writer, mount="kv", prefix=prefix, spool=tmp_path / "spool")
    checkpoints = [_checkpoint(size) for size in (3, 10, 25)]
    for checkpoint in checkpoints:
        anchor.record(checkpoint)
    assert read_anchors(auditor, "kv", prefix) == {c.size: c for c in checkpoints}
    assert set(read_anchors(auditor, "kv", prefix, upto=10)) == {3, 10, 25}  # up to 10 and the first after
    assert set(read_anchors(auditor, "kv", prefix, upto=4)) == {3, 10}
    kv = auditor.secrets.kv.v2
    for attempt in (
            lambda: kv.create_or_update_secret(path=anchor_path(prefix, 30), secret={"x": 1}, cas=0,
                                               mount_point="kv"),
            lambda: kv.create_or_update_secret(path=anchor_path(prefix, 3), secret={"x": 1}, mount_point="kv"),
            lambda: kv.delete_latest_version_of_secret(path=anchor_path(prefix, 3), mount_point="kv"),
            lambda: kv.destroy_secret_versions(path=anchor_path(prefix, 3), versions=[1], mount_point="kv"),
            lambda: kv.delete_metadata_and_all_versions(path=anchor_path(prefix, 3), mount_point="kv")):
        with pytest.raises(bao_errors.Forbidden):
            attempt()
    assert read_anchors(auditor, "kv", prefix) == {c.size: c for c in checkpoints}
    with pytest.raises(PermissionDenied, match=r"kms-auditor\.hcl"):
        read_anchors(writer, "kv", prefix)  # the signer's role cannot read what it anchored
    assert read_anchors(openbao.client(), "kv", f"{prefix}-none") == {}  # nothing anchored there yet


def test_a_role_that_may_not_create_keeps_every_checkpoint_in_the_backlog(
        openbao: BaoServer, prefix: str, tmp_path: Path) -> None:
    """A refused write that is not an existing anchor (here: a policy for other paths) is not a conflict: the
    checkpoint stays in the backlog, the error names the path and the policy file."""
    wrong = _login(openbao, f"wrong-{prefix.split('/')[0]}", WRITER_POLICY.replace("kms/audit", "elsewhere"))
    anchor = Anchor(wrong, mount="kv", prefix=prefix, spool=tmp_path / "spool")
    anchor.record(_checkpoint(4))
    status = anchor.status()
    assert (status.backlog, status.conflicts, status.oldest) == (1, 0, 4)
    assert f"may not create kv/data/{prefix}/checkpoints/{4:016d}" in status.error
    assert "kms-audit-anchor.hcl" in status.error


# -- OpenBao down: the backlog ---------------------------------------------------------------------------------------


@pytest.fixture
def gate(openbao: BaoServer) -> Iterator[TcpGate]:
    relay = TcpGate(openbao.port)
    yield relay
    relay.stop()


def test_checkpoints_signed_while_openbao_is_down_are_anchored_later_in_order(
        openbao: BaoServer, prefix: str, tmp_path: Path, gate: TcpGate) -> None:
    tag = prefix.split("/")[0]
    role_id, secret_id = openbao.approle(f"anchor-{tag}", WRITER_POLICY.replace("kms/audit", prefix))
    logins = []

    def connect() -> hvac.Client:
        client = hvac.Client(url=gate.address, timeout=3)
        client.auth.approle.login(role_id=role_id, secret_id=secret_id)
        logins.append(client)
        return client

    clock = Clock()
    spool = tmp_path / "spool"
    anchor = Anchor(connect, mount="kv", prefix=prefix, spool=spool, clock=clock)
    anchor.record(_checkpoint(2))
    assert anchor.status().anchored == 2 and len(logins) == 1
    gate.close()
    late = [_checkpoint(size) for size in (5, 9, 14)]
    anchor.record(late[0])  # one attempt, refused at once
    tried = gate.connections
    status = anchor.status()
    assert (status.backlog, status.oldest, status.anchored) == (1, 5, 2)
    assert status.error.startswith("OpenBao cannot be reached")
    anchor.record(late[1])  # within the retry period: spooled, OpenBao not even tried
    assert gate.connections == tried and anchor.status().backlog == 2
    anchor.record(_checkpoint(9, at="2026-12-01T09:09:09Z"))  # 9 signed again while it waits: kept apart
    assert (anchor.status().backlog, anchor.status().conflicts) == (2, 1)
    # The backlog is on disk: a new signer process (a new Anchor over the same spool) has it.
    assert Anchor(connect, mount="kv", prefix=prefix, spool=spool).status().backlog == 2
    clock.now += 10
    anchor.record(late[2])  # a retry period later it tries again, still down: nothing is skipped or lost
    assert gate.connections > tried and anchor.status().backlog == 3
    root = openbao.client().secrets.kv.v2
    assert root.list_secrets(path=f"{prefix}/checkpoints", mount_point="kv")["data"]["keys"] == [f"{2:016d}"]
    gate.open()
    status = anchor.flush()
    assert (status.backlog, status.anchored, status.error, status.conflicts) == (0, 14, "", 1)
    anchored = read_anchors(openbao.client(), "kv", prefix)
    assert [anchored[c.size] for c in late] == late
    created = [root.read_secret_metadata(path=anchor_path(prefix, c.size), mount_point="kv")["data"]["created_time"]
               for c in late]
    assert created == sorted(created)  # written in sequence order


def test_the_anchor_logs_in_with_a_wrapped_secret_id_the_process_already_unwrapped(
        openbao: BaoServer, prefix: str, tmp_path: Path) -> None:
    """audit.pin in OpenBao and the AppRole's secret_id response-wrapped (no secret_id file): the signer's process
    unwraps it once to read the PIN; the anchor then logs in through that same client, not a second one that would
    try the spent wrapping token."""
    tag = prefix.split("/")[0]
    openbao.put(f"{tag}/audit", pin="123456")
    policy = WRITER_POLICY.replace("kms/audit", prefix) + f'path "kv/data/{tag}/audit" {{ capabilities = ["read"] }}\n'
    role_id, _ = openbao.approle(f"wrapped-{tag}", policy)
    (tmp_path / "role-id").write_text(role_id + "\n")
    (tmp_path / "wrapped").write_text(openbao.wrapped_secret_id(f"wrapped-{tag}") + "\n")
    path = tmp_path / "kms.yaml"
    path.write_text(yaml.safe_dump({
        "hsm": {}, "database": "sqlite:///kms.db",
        "openbao": {"address": openbao.address, "approle": {"role_id": "file:role-id",
                                                            "wrapped_secret_id": "file:wrapped"}},
        "audit": {"token": "kms-audit", "pin": f"vault:kv/{tag}/audit#pin",
                  "anchor": {"prefix": prefix, "spool": str(tmp_path / "spool")}}}))
    cfg = config.load(path)
    assert cfg.audit is not None and cfg.audit.pin is not None and cfg.secret(cfg.audit.pin) == "123456"
    anchor = from_config(cfg)
    assert anchor is not None
    checkpoint = _checkpoint(7)
    anchor.record(checkpoint)
    status = anchor.status()
    assert (status.backlog, status.anchored, status.error) == (0, 7, ""), status
    assert read_anchors(openbao.client(), "kv", prefix) == {7: checkpoint}


# -- configuration ------------------------------------------------------------------------------------------------


def test_the_anchor_settings_are_checked(tmp_path: Path) -> None:
    doc: dict[str, Any] = {"hsm": {}, "domains": {"hrss": {"token": "kms-hrss", "pin": "env:PIN"}},
                           "database": "sqlite:///kms.db",
                           "audit": {"token": "kms-audit", "pin": "env:AUDIT_PIN", "anchor": {}}}
    path = tmp_path / "kms.yaml"

    def load() -> config.Config:
        path.write_text(yaml.safe_dump(doc))
        return config.load(path)

    with pytest.raises(ConfigError, match=r"audit\.anchor needs the top-level 'openbao' block"):
        load()
    doc["openbao"] = {"address": "http://127.0.0.1:8200",
                      "approle": {"role_id": "file:role-id", "secret_id": "file:secret-id"}}
    cfg = load()
    assert cfg.audit is not None and cfg.audit.anchor == config.AnchorConfig("kv", "kms/audit",
                                                                             tmp_path / "audit-anchor")
    for bad, message in (({"mount": "kv/../x y"}, r"audit\.anchor\.mount"),
                         ({"prefix": "../up"}, r"audit\.anchor\.prefix"), ({"path": "x"}, "unknown setting 'path'")):
        doc["audit"]["anchor"] = bad
        with pytest.raises(ConfigError, match=message):
            load()
    doc["audit"]["anchor"] = {"mount": "secret", "prefix": "kms/prod/audit", "spool": "/var/lib/kms/anchor"}
    assert load().audit.anchor == config.AnchorConfig(  # type: ignore[union-attr]
        "secret", "kms/prod/audit", Path("/var/lib/kms/anchor"))
    doc["openbao"] = {"address": "127.0.0.1:8200", "approle": {"role_id": "file:r", "secret_id": "file:s"}}
    with pytest.raises(ConfigError, match=r"openbao\.address"):
        load()


# -- comparing an export with the anchors (no server needed) ----------------------------------------------------------


_SIGNED: dict[tuple[int, str], Checkpoint] = {}


def _export(count: int, at: tuple[int, ...], *, edit: int | None = None,
            sealed: str = "2026-12-01T12:00:00Z") -> tuple[list[str], dict[int, Checkpoint]]:
    """An export of ``count`` records with checkpoints at sizes ``at``, and those checkpoints (each signed at a
    minute of its own); ``edit``: record ``edit``'s body changed and the chain (and checkpoints) made over it."""
    lines = ['{"type":"export","format":"kms-audit-export","version":2}']
    prev, checkpoints = GENESIS, {}
    for seq in range(1, count + 1):
        body = canonical({"seq": seq, "at": "2026-12-01T09:00:00Z", "kind": "test.event", "domain": "",
                          "actor": "", "subject": "edited" if seq == edit else str(seq), "outcome": "ok",
                          "detail": {}})
        digest = chain(prev, body)
        lines.append(AuditRecord(seq, prev.hex(), digest.hex(), body.decode()).line())
        prev = digest
        if seq in at:  # signed once per (size, head): the same history gives the same checkpoint lines
            signed = (seq, digest.hex())
            if signed not in _SIGNED:
                _SIGNED[signed] = _checkpoint(seq, digest.hex(), at=f"2026-12-01T10:{seq % 60:02d}:00Z")
            checkpoints[seq] = _SIGNED[signed]
            lines.append(checkpoints[seq].line())
    lines.append(Seal(count, prev.hex(), sealed, "00" * 16, {}, AUDIT_KEY, b"\x00").line())
    return lines, checkpoints


def test_an_export_that_matches_its_anchors_agrees() -> None:
    lines, checkpoints = _export(40, (10, 25, 40))
    verdict = compare(lines, checkpoints, KEY.public_key())
    assert verdict.ok and (verdict.compared, verdict.anchors, verdict.last_seq, verdict.newest) == (3, 3, 40, 40)
    assert verdict.summary() == "anchors agree: 3 checkpoints compared up to record 40 (3 anchors read; newest " \
                                "anchor at 40)"
    # An older export (the log went on, and was anchored further, since) agrees only when the auditor says so.
    later = dict(checkpoints) | {55: _checkpoint(55, at="2026-12-01T13:00:00Z")}
    older = compare(lines, later)
    assert (older.ok, older.bad_size, older.problem) == (False, 55, "missing in export")
    assert "--until 40" in older.detail
    upto = compare(lines, later, until=40)
    assert upto.ok and (upto.compared, upto.anchors, upto.later) == (3, 4, 1)
    assert "compared only up to 40 as asked (--until): 1 later anchors not checked" in upto.summary()
    # Anchoring switched on after the checkpoint at 10: it has no anchor to meet, and is said not compared.
    since = compare(lines, {25: checkpoints[25], 40: checkpoints[40]})
    assert since.ok and (since.compared, since.before) == (2, 1) and since.summary().endswith(
        "; 1 checkpoints from before the first anchor not compared)")
    # No anchor at all (a wrong mount or prefix) is no agreement.
    nothing = compare(lines, {})
    assert (nothing.ok, nothing.bad_size, nothing.problem) == (False, 10, "missing in anchor")
    assert "check the mount and prefix" in nothing.detail


def test_each_disagreement_is_named_by_the_first_checkpoint_and_what_differs() -> None:
    honest_lines, anchors = _export(40, (10, 25, 40))
    # The log rewritten from record 17 on and re-signed (the attack the anchor exists for): 10 still agrees.
    lines, _ = _export(40, (10, 25, 40), edit=17)
    verdict = compare(lines, anchors)
    assert (verdict.ok, verdict.bad_size, verdict.problem) == (False, 25, "head")
    assert verdict.summary().startswith("audit log NOT anchored: checkpoint 25: head: the export's chain at 25 is ")
    # The same heads signed again (another time, another signature).
    resigned = [_checkpoint(25, anchors[25].head, at="2026-12-01T11:11:11Z").line() if '"size":25,' in line
                and line.startswith('{"type":"checkpoint"') else line for line in honest_lines]
    verdict = compare(resigned, anchors)
    assert (verdict.bad_size, verdict.problem) == (25, "signature")
    # A checkpoint the export lacks, and one the anchor lacks (forged, or still in the signer's backlog).
    dropped = [line for line in honest_lines if not (line.startswith('{"type":"checkpoint"') and '"size":10,' in line)]
    assert (compare(dropped, anchors).bad_size, compare(dropped, anchors).problem) == (10, "missing in export")
    partial = {10: anchors[10], 40: anchors[40]}
    verdict = compare(honest_lines, partial)
    assert (verdict.bad_size, verdict.problem) == (25, "missing in anchor")
    verdict = compare(honest_lines, {10: anchors[10]})
    assert (verdict.bad_size, verdict.problem) == (25, "missing in anchor") and "backlog" in verdict.detail
    # An anchor not signed by the audit key (only with the public key given).
    forged = dict(anchors) | {10: _checkpoint(10, anchors[10].head, key=ec.generate_private_key(ec.SECP256R1()))}
    assert compare(honest_lines, forged, KEY.public_key()).problem == "anchor forged"
    # The log cut back to 30 records and exported afterwards: the anchor at 40 names the cut, whatever the seal says.
    cut, _ = _export(30, (10, 25))
    verdict = compare(cut, anchors)
    assert (verdict.bad_size, verdict.problem) == (40, "missing in export") and "cut back" in verdict.detail
    earlier, _ = _export(30, (10, 25), sealed="2026-12-01T10:30:00Z")  # a seal dated before the checkpoint at 40
    assert (compare(earlier, anchors).ok, compare(earlier, anchors).bad_size) == (False, 40)
    assert compare(earlier, anchors, until=30).ok  # the auditor knows this export is older than anchor 40


def test_a_truncated_log_never_passes_the_anchors() -> None:
    """The review's attack (/tmp/review/anchor_trunc.py): the log cut back after a checkpoint, the seal backdated
    before the next anchor (the seal's time is signed by whoever holds the audit PIN), or no seal at all."""
    honest, anchors = _export(40, (10, 25, 40))
    for sealed in ("2026-12-01T10:11:00Z", "2000-01-01T00:00:00Z"):
        backdated, _ = _export(30, (10, 25), sealed=sealed)
        verdict = compare(backdated, anchors, created={40: "2026-12-01T10:40:01.5Z"})
        assert (verdict.ok, verdict.bad_size, verdict.problem) == (False, 40, "missing in export")
        assert "the log was cut back, or the export is older than anchor 40" in verdict.detail
        assert "created in OpenBao 2026-12-01T10:40:01.5Z" in verdict.detail
    unsealed = [line for line in _export(30, (10, 25))[0] if not line.startswith('{"type":"export-seal"')]
    assert (compare(unsealed, anchors).ok, compare(unsealed, anchors).bad_size) == (False, 40)
    # Up to --until the comparison is made as ever: a cut before N still fails, and so does nothing compared.
    assert (compare(unsealed, anchors, until=40).ok, compare(unsealed, anchors, until=40).bad_size) == (False, 40)
    nothing = compare(honest, {40: anchors[40]}, until=20)
    assert (nothing.ok, nothing.problem) == (False, "nothing compared")
    # A filtered export is said to be one.
    verdict = compare(_omit(honest, 3), anchors)
    assert verdict.ok and verdict.omitted == 1 and "a filtered export: 1 records omitted" in verdict.summary()
    assert verdict.to_json()["omitted"] == 1


def _omit(lines: list[str], seq: int) -> list[str]:
    """``lines`` with record ``seq`` as a filtered export has it: an omitted line (its body's digest)."""
    out = []
    for line in lines:
        if line.startswith(f'{{"type":"record","seq":{seq},'):
            doc = json.loads(line)
            body = line[line.index(',"body":') + len(',"body":'):-1]
            line = AuditRecord(seq, doc["prev"], doc["hash"], body).omitted_line()
        out.append(line)
    return out


def test_a_checkpoint_sends_only_a_bounded_part_of_a_long_backlog_itself(
        openbao: BaoServer, prefix: str, tmp_path: Path, gate: TcpGate) -> None:
    """After a long outage the checkpoint that finds OpenBao back sends the oldest SEND_AT_ONCE of the backlog (in
    order) and leaves the rest to the retry thread, so signing never waits for the whole backlog."""
    from kms.audit.anchor import SEND_AT_ONCE

    writer, _ = _roles(openbao, prefix)
    writer.url = gate.address
    clock = Clock()
    anchor = Anchor(writer, mount="kv", prefix=prefix, spool=tmp_path / "spool", clock=clock)
    gate.close()
    for size in range(1, SEND_AT_ONCE + 6):
        anchor.record(_checkpoint(size))
    assert anchor.status().backlog == SEND_AT_ONCE + 5
    gate.open()
    clock.now += 10
    anchor.record(_checkpoint(SEND_AT_ONCE + 6))
    status = anchor.status()
    assert (status.backlog, status.oldest, status.anchored) == (6, SEND_AT_ONCE + 1, SEND_AT_ONCE)
    assert anchor.flush().backlog == 0 and len(read_anchors(openbao.client(), "kv", prefix)) == SEND_AT_ONCE + 6
