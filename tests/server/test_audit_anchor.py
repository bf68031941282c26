"""The audit anchor end to end: a real service (kms.server.serve.Service) whose audit signer process anchors every
checkpoint it signs in a real OpenBao (through a TCP gate the test can close), an auditor's export checked with
`kms audit verify` and `kms audit check-anchors`, and the attack the anchor exists for: the database's records
rewritten AND the signer's remembered head reset, every checkpoint re-signed with the audit token — `verify` passes,
the anchors name the first checkpoint where the history departs."""

from __future__ import annotations

import json
import multiprocessing
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import hvac
import prometheus_client
import pytest
import sqlalchemy as sa
import yaml
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from helpers import MASTER_KEYS, ROOT, TcpGate, kms, service_client
from openbao import BaoServer

from kms import config, runtime, store
from kms.audit.anchor import anchor_path, read_anchors
from kms.audit.log import chain, checkpoint_message
from kms.client.audit import AuditClient
from kms.dev.home import Home, init_home
from kms.files import write_private
from kms.hsm.labels import AUDIT_KEY, AUDIT_SIGNED_HEAD
from kms.identity import Principal
from kms.server.serve import Service

ERIN = Principal("auditor", "erin")
WAIT = 60.0  # seconds a test waits for the retry thread to send the backlog (a bound on a hang, not a measurement)


@pytest.fixture(scope="module")
def gate(openbao: BaoServer) -> Iterator[TcpGate]:
    relay = TcpGate(openbao.port)
    yield relay
    relay.stop()


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"a{secrets.token_hex(4)}/audit"


@pytest.fixture(scope="module")
def anchored_home(tmp_path_factory: pytest.TempPathFactory, openbao: BaoServer, gate: TcpGate, prefix: str) -> Home:
    """A home of this module's own (its database and audit token are rewritten here), whose kms.yaml anchors the
    audit log in OpenBao with the shipped signer's policy (pointed at this module's prefix), through the gate."""
    home = init_home(tmp_path_factory.mktemp("anchor-home"), master_keys=MASTER_KEYS)
    policy = (ROOT / "deploy" / "openbao" / "kms-audit-anchor.hcl").read_text().replace("kms/audit", prefix)
    role_id, secret_id = openbao.approle(f"anchor-{prefix.split('/')[0]}", policy)
    write_private(home.path / "openbao" / "role-id", role_id + "\n")
    write_private(home.path / "openbao" / "secret-id", secret_id + "\n")
    doc = yaml.safe_load(home.config.read_text())
    doc["openbao"] = {"address": gate.address,
                      "approle": {"role_id": "file:openbao/role-id", "secret_id": "file:openbao/secret-id"}}
    doc["audit"]["anchor"] = {"mount": "kv", "prefix": prefix}
    home.config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return home


@pytest.fixture(scope="module")
def service(anchored_home: Home) -> Iterator[Service]:
    svc = Service(anchored_home.config, listen="127.0.0.1:0", health_listen=None)
    yield svc
    svc.stop(grace=0)


@pytest.fixture(scope="module")
def auditor_token(openbao: BaoServer, prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A token file of an auditor's OpenBao role (the shipped kms-auditor.hcl, pointed at this module's prefix)."""
    policy = (ROOT / "deploy" / "openbao" / "kms-auditor.hcl").read_text().replace("kms/audit", prefix)
    role_id, secret_id = openbao.approle(f"auditor-{prefix.split('/')[0]}", policy)
    client = hvac.Client(url=openbao.address)
    token = client.auth.approle.login(role_id=role_id, secret_id=secret_id)["auth"]["client_token"]
    return write_private(tmp_path_factory.mktemp("auditor") / "bao-token", token + "\n")


def _records(home: Home, service: Service, count: int) -> None:
    """``count`` calls of the auditor: each is a request.ok record."""
    with service_client(home, service, ERIN) as erin:
        for _ in range(count):
            AuditClient(erin).head()


def _export(home: Home, service: Service, out: Path) -> dict[str, object]:
    done = kms("audit", "export", "--client", str(home.client_config(ERIN)), "--server",
               f"localhost:{service.port}", "-o", str(out), "--json", check=True)
    return dict(json.loads(done.stdout))


def _check(home: Home, openbao: BaoServer, prefix: str, token: Path, export: Path, *more: str
           ) -> tuple[int, str, str]:
    done = kms("audit", "check-anchors", "--export", str(export), "--openbao-address", openbao.address,
               "--token-file", str(token), "--mount", "kv", "--prefix", prefix, "--public-key",
               str(home.path / "audit" / "audit-v1.pem"), *more)
    return done.returncode, done.stdout, done.stderr


def _resign(config_path: str, checkpoints: list[tuple[int, str, str]], signed_head: str) -> list[bytes]:
    """As someone who holds the audit PIN, in a process of its own (its SoftHSM2 configuration this home's): sign
    ``checkpoints`` (size, head, at) with the audit key and set the signer's remembered head to ``signed_head``."""
    cfg = config.load(Path(config_path))
    assert cfg.audit is not None
    session = runtime.module(cfg.hsm).open(cfg.audit.token, cfg.audit.pin.resolve())
    try:
        signatures = []
        for size, head, at in checkpoints:
            raw = session.sign_sha256(AUDIT_KEY, checkpoint_message(size, head, at))
            signatures.append(encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")))
        session.write_data(AUDIT_SIGNED_HEAD, signed_head.encode("ascii"))
        return signatures
    finally:
        session.close()


def _as_attacker(config_path: Path, checkpoints: list[tuple[int, str, str]], signed_head: str) -> list[bytes]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_resign, str(config_path), checkpoints, signed_head).result(timeout=120)


def _backlog(service: Service) -> dict[str, object]:
    assert service.signer is not None
    status = service.signer.anchor_status()
    assert status is not None
    return status


def test_checkpoints_signed_while_openbao_is_down_stay_valid_and_are_anchored_later_in_order(
        anchored_home: Home, service: Service, openbao: BaoServer, gate: TcpGate, prefix: str) -> None:
    assert service.checkpointer is not None
    _records(anchored_home, service, 3)
    first = service.checkpointer.checkpoint_now()
    assert first is not None and _backlog(service)["anchored"] == first.size  # written as it was signed
    gate.close()
    try:
        signed = []
        for _ in range(2):
            _records(anchored_home, service, 2)
            checkpoint = service.checkpointer.checkpoint_now()  # signed and stored: OpenBao is not waited for
            assert checkpoint is not None and checkpoint.size > (signed[-1].size if signed else first.size)
            signed.append(checkpoint)
        status = _backlog(service)
        assert (status["backlog"], status["oldest"], status["anchored"]) == (2, signed[0].size, first.size)
        assert str(status["error"]).startswith("OpenBao cannot be reached")
        scraped = prometheus_client.generate_latest().decode()
        assert "kms_audit_anchor_backlog 2.0" in scraped and "kms_audit_anchor_failing 1.0" in scraped
        assert set(read_anchors(openbao.client(), "kv", prefix)) == {first.size}
    finally:
        gate.open()
    deadline = time.monotonic() + WAIT
    while _backlog(service)["backlog"] and time.monotonic() < deadline:
        time.sleep(0.2)  # the signer's retry thread sends the backlog within its retry period
    status = _backlog(service)
    assert (status["backlog"], status["anchored"], status["error"], status["conflicts"]) == (0, signed[-1].size,
                                                                                           "", 0)
    anchors = read_anchors(openbao.client(), "kv", prefix)
    assert [anchors[c.size] for c in signed] == signed
    kv = openbao.client().secrets.kv.v2
    created = [kv.read_secret_metadata(path=anchor_path(prefix, c.size), mount_point="kv")["data"]["created_time"]
               for c in signed]
    assert created == sorted(created)  # in sequence order
    assert "kms_audit_anchor_backlog 0.0" in prometheus_client.generate_latest().decode()


def test_a_rewritten_log_with_a_reset_signer_passes_verify_but_not_the_anchors(
        anchored_home: Home, service: Service, openbao: BaoServer, prefix: str, auditor_token: Path,
        tmp_path: Path) -> None:
    assert service.checkpointer is not None
    sizes = []
    for _ in range(3):
        _records(anchored_home, service, 4)
        checkpoint = service.checkpointer.checkpoint_now()
        assert checkpoint is not None
        sizes.append(checkpoint.size)
    key = str(anchored_home.path / "audit" / "audit-v1.pem")
    honest = tmp_path / "honest.jsonl"
    honest_last = int(str(_export(anchored_home, service, honest)["last_seq"]))
    kms("audit", "verify", str(honest), "--public-key", key, check=True)
    code, out, err = _check(anchored_home, openbao, prefix, auditor_token, honest)
    assert (code, err) == (0, "") and out.startswith("anchors agree: "), err

    # The attack: a record between the 1st and 2nd of these checkpoints edited, the chain after it recomputed and
    # the head fixed; every checkpoint re-signed over the new chain with the audit token, and the signer's
    # remembered head set to the new end (what someone who holds the database and the audit PIN can do).
    target = sizes[0] + 2
    engine = store.make_engine(config.load(anchored_home.config).database)
    with engine.begin() as conn:
        rows = conn.execute(sa.select(store.audit_log).order_by(store.audit_log.c.seq)).all()
        old = conn.execute(sa.select(store.audit_checkpoints).order_by(store.audit_checkpoints.c.size)).all()
        assert [r.seq for r in rows] == list(range(1, len(rows) + 1)) and target < len(rows)
        prev, heads = bytes.fromhex(rows[target - 2].hash), {}
        for row in rows[target - 1:]:
            body = row.body.replace('"outcome":"ok"', '"outcome":"refused"') if row.seq == target else row.body
            assert row.seq != target or body != row.body
            digest = chain(prev, body.encode())
            conn.execute(store.audit_log.update().where(store.audit_log.c.seq == row.seq)
                         .values(body=body, prev=prev.hex(), hash=digest.hex()))
            heads[row.seq] = digest.hex()
            prev = digest
        conn.execute(store.audit_head.update().values(hash=prev.hex()))
        conn.execute(store.audit_checkpoints.delete())
        resigned = [(cp.size, heads.get(cp.size, cp.head), cp.at) for cp in old]
        signatures = _as_attacker(anchored_home.config, resigned, f"{len(rows)}:{prev.hex()}")
        for (size, head, at), signature in zip(resigned, signatures, strict=True):
            conn.execute(store.audit_checkpoints.insert().values(size=size, head=head, at=at, key=AUDIT_KEY,
                                                                 signature=signature))
    engine.dispose()

    rewritten = tmp_path / "rewritten.jsonl"
    _export(anchored_home, service, rewritten)  # the service signs and seals the rewritten log as its own
    verified = kms("audit", "verify", str(rewritten), "--public-key", key)
    assert verified.returncode == 0 and verified.stdout.startswith("audit log verified: "), verified.stderr
    code, out, err = _check(anchored_home, openbao, prefix, auditor_token, rewritten)
    assert code == 9 and out == "" and err.count("\n") == 1
    assert err.startswith(f"kms: audit log NOT anchored: checkpoint {sizes[1]}: head: the export's chain at "
                          f"{sizes[1]} is "), err
    as_json = kms("audit", "check-anchors", "--export", str(rewritten), "--openbao-address", openbao.address,
                  "--token-file", str(auditor_token), "--prefix", prefix, "--json")
    verdict = json.loads(as_json.stdout)
    assert as_json.returncode == 9 and (verdict["ok"], verdict["bad_size"], verdict["problem"]) == (
        False, sizes[1], "head")
    # The honest export still agrees with the anchors (they were never overwritten) — up to its end, as the auditor
    # says: the log was anchored further since, and an older export is not told from a cut-back log otherwise.
    code, out, err = _check(anchored_home, openbao, prefix, auditor_token, honest)
    assert code == 9 and "the log was cut back, or the export is older than anchor" in err, err
    assert f"--until {honest_last}" in err
    code, out, err = _check(anchored_home, openbao, prefix, auditor_token, honest, "--until", str(honest_last))
    assert code == 0 and f"compared only up to {honest_last} as asked (--until)" in out, err


def test_check_anchors_says_what_is_wrong_with_its_arguments(
        anchored_home: Home, openbao: BaoServer, prefix: str, tmp_path: Path) -> None:
    export = tmp_path / "none.jsonl"
    export.write_text('{"type":"export","version":2}\n')
    denied = tmp_path / "token"
    denied.write_text("not-a-token\n")
    done = kms("audit", "check-anchors", "--export", str(export), "--openbao-address", openbao.address,
               "--token-file", str(denied), "--prefix", prefix)
    assert done.returncode == 5 and "kms-auditor.hcl" in done.stderr and "not-a-token" not in done.stderr
    down = kms("audit", "check-anchors", "--export", str(export), "--openbao-address", "http://127.0.0.1:9",
               "--token-file", str(denied))
    assert down.returncode == 12 and "OpenBao cannot be reached" in down.stderr
    missing = kms("audit", "check-anchors", "--export", str(tmp_path / "absent.jsonl"), "--openbao-address",
                  openbao.address, "--token-file", str(denied))
    assert missing.returncode == 2 and "export" in missing.stderr
    nothing = kms("audit", "check-anchors", "--export", str(export))
    assert nothing.returncode == 2 and "openbao_address" in nothing.stderr
    plain = kms("audit", "check-anchors", "--export", str(export), "--openbao-address", "http://bao.example:8200",
                "--token-file", str(denied))
    assert plain.returncode == 2 and "plain http is allowed only to a loopback address" in plain.stderr
    # The signer's own role (what --config logs in with here) may create anchors, not read them.
    signer_role = kms("audit", "check-anchors", "--export", str(export), "--config", str(anchored_home.config))
    assert signer_role.returncode == 5 and "kms-auditor.hcl" in signer_role.stderr, signer_role.stderr
