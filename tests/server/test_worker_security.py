"""What a front end that was taken over can ask of the worker services, and no more (the security review of issue
12): the bank worker service's PAN quota and per-call cap (the index is an oracle for guessed PANs), bad input named
as INVALID_ARGUMENT, the audit signer's own clock for the times it signs, and the socket directory. Real `kms worker`
processes over the development home's SoftHSM2 tokens, called on their Unix sockets as the front end calls them."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from helpers import ROOT

from kms.dev.home import Home
from kms.files import write_private
from kms.server import worker
from kms.server.worker import ERROR_KEY, MAX_PANS_PER_CALL, error_from
from kms.v1 import worker_pb2 as pb

QUOTA = 40  # PANs an hour for the bank worker service of this test


def _luhn(digits: str) -> str:
    """``digits`` with its Luhn check digit."""
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return digits + str((10 - total % 10) % 10)


class Running:
    """`kms worker` processes of this test, each on a socket of its own."""

    def __init__(self, home: Home, sockets: Path, logs: Path) -> None:
        self.doc = yaml.safe_load(home.config.read_text(encoding="utf-8"))
        self.sockets, self.logs, self.home = sockets, logs, home
        self.processes: list[subprocess.Popen[str]] = []

    def config(self, name: str, **worker_settings: object) -> tuple[Path, str]:
        base = {k: v for k, v in self.doc.items() if k not in ("domains", "server", "audit", "workers", "worker")}
        own = {**base, "audit": self.doc["audit"]} if name == "audit" else {
            **base, "domains": {name: self.doc["domains"][name]}}
        listen = f"unix:{self.sockets / name / 'w.sock'}"
        own["worker"] = {"listen": listen, **worker_settings}
        path = self.home.config.parent / f"worker-{name}-security.yaml"
        write_private(path, yaml.safe_dump(own, sort_keys=False))
        return path, listen

    def start(self, name: str, **worker_settings: object) -> str:
        path, listen = self.config(name, **worker_settings)
        which = ["--audit"] if name == "audit" else ["--domain", name]
        with (self.logs / f"{name}.log").open("a") as stderr:
            process = subprocess.Popen([sys.executable, "-m", "kms.cli", "worker", *which, "--config", str(path)],
                                       cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith(f"kms: worker {name} serving on"), (line, (self.logs / f"{name}.log").read_text())
        self.processes.append(process)
        return listen

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
            process.wait(timeout=120)
            assert process.stdout is not None
            process.stdout.close()


@pytest.fixture(scope="module")
def running(home: Home, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    sockets = Path(tempfile.mkdtemp(prefix="kmss-", dir="/tmp"))  # short: a socket path has at most 107 bytes
    services = Running(home, sockets, tmp_path_factory.mktemp("security-logs"))
    try:
        yield {"bank": services.start("bank", pan_quota_per_hour=QUOTA), "audit": services.start("audit"),
               "logs": str(services.logs)}
    finally:
        services.stop()
        for child in sorted(sockets.rglob("*"), reverse=True):
            child.unlink() if not child.is_dir() else child.rmdir()
        sockets.rmdir()


def _call(listen: str, method: str, request: object) -> tuple[grpc.StatusCode, str, object]:
    """(status, details, the kms error it carries) of a call that fails; AssertionError if it succeeds."""
    with grpc.insecure_channel(listen) as channel:
        try:
            channel.unary_unary(method)(request.SerializeToString(), timeout=120)  # type: ignore[attr-defined]
        except grpc.RpcError as failed:
            carried = dict(failed.trailing_metadata() or ()).get(ERROR_KEY)  # type: ignore[attr-defined]
            error = error_from(pb.WorkerError.FromString(carried)) if carried else None
            return failed.code(), failed.details(), error  # type: ignore[attr-defined]
    raise AssertionError(f"{method} succeeded")


def _protect(listen: str, batch_id: str, pans: list[str]) -> pb.KeyOperationResponse:
    request = pb.KeyOperationRequest(protect_pans=pb.ProtectPans(batch_id=batch_id, items=[
        pb.PanItem(card_ref=f"c{i}", pan=p, psn="01") for i, p in enumerate(pans)]))
    with grpc.insecure_channel(listen) as channel:
        raw = channel.unary_unary("/kms.v1.DomainWorker/KeyOperation")(request.SerializeToString(), timeout=120)
    return pb.KeyOperationResponse.FromString(raw)


OPERATION = "/kms.v1.DomainWorker/KeyOperation"


def test_the_bank_worker_is_no_pan_guessing_oracle_beyond_its_quota(running: dict[str, str]) -> None:
    """The reviewer's attack: 10,000 candidate PANs (first 6 and last 4 digits known) in one call, to find the one
    whose index the database holds. Refused by the cap per call; and by the hour's quota however it is split."""
    bank = running["bank"]
    head, tail = "621483", "7895"
    candidates = [_luhn(f"{head}{m:06d}{tail[:3]}") for m in range(10_000)]
    code, details, error = _call(bank, OPERATION, pb.KeyOperationRequest(protect_pans=pb.ProtectPans(
        batch_id="B-guess", items=[pb.PanItem(card_ref=f"c{i}", pan=p, psn="01") for i, p in
                                   enumerate(candidates)])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and getattr(error, "field", "") == "items"
    assert f"1 to {MAX_PANS_PER_CALL} PANs in one call" in details
    code, details, error = _call(bank, OPERATION, pb.KeyOperationRequest(protect_pans=pb.ProtectPans(
        batch_id="", items=[pb.PanItem(card_ref="c1", pan=candidates[0], psn="01")])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and getattr(error, "field", "") == "batch_id"
    # Within the quota, a batch is protected as ever; the PAN named twice gets the same index.
    done = _protect(bank, "B-real", candidates[:QUOTA - 1] + candidates[:1])
    assert len(done.pans.pans) == QUOTA and done.pans.pans[0].index == done.pans.pans[-1].index
    code, details, error = _call(bank, OPERATION, pb.KeyOperationRequest(protect_pans=pb.ProtectPans(
        batch_id="B-guess", items=[pb.PanItem(card_ref="c1", pan=candidates[1], psn="01")])))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "worker.pan_quota_per_hour" in details and getattr(error, "limit", "") == "worker.pan_quota_per_hour"
    assert candidates[1] not in details
    alarm = (Path(running["logs"]) / "bank.log").read_text()
    assert "SECURITY ALARM: protect_pans refused" in alarm and candidates[1] not in alarm


def test_bad_arguments_are_invalid_argument_naming_the_field_not_internal(running: dict[str, str]) -> None:
    bank = running["bank"]
    for field, request in (
            ("recipient_spki", pb.KeyOperationRequest(transport_key_for_rsa=pb.TransportKeyForRsa(
                bureau=f"bad-{secrets.token_hex(3)}", recipient_spki=b"\x30\x82"))),
            ("message", pb.KeyOperationRequest(sign=pb.SignDocument(label="kms/bank/signing/issuance/v1",
                                                                   message=b"[" * 100_000))),
            ("message", pb.KeyOperationRequest(sign=pb.SignDocument(label="kms/bank/signing/issuance/v1",
                                                                   message=b" " * (2 * 1024 * 1024))))):
        code, details, error = _call(bank, OPERATION, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, code, details)
        assert getattr(error, "field", "") == field, details


def test_the_audit_signer_signs_only_times_of_its_own_clock(running: dict[str, str]) -> None:
    """The front end gives the time a checkpoint or a seal is signed with: the signer checks it against its own
    clock (a backdated seal made the anchors' cut-back check pass)."""
    audit = running["audit"]
    head = "0" * 64
    for at in ("2020-01-01T00:00:00Z", "yesterday", "2026-12-01 10:30:00",
               "2026-12-01T10:30:00+08:00"):
        for method, request in (
                ("/kms.v1.AuditSignerWorker/SignCheckpoint", pb.SignCheckpointRequest(size=1, head=head, at=at)),
                ("/kms.v1.AuditSignerWorker/SignSeal", pb.SignSealRequest(size=1, head=head, at=at, nonce="00"))):
            code, details, error = _call(audit, method, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and getattr(error, "field", "") == "at", (at, details)


def test_a_worker_refuses_a_socket_directory_its_group_may_write(home: Home, tmp_path: Path) -> None:
    sockets = Path(tempfile.mkdtemp(prefix="kmsg-", dir="/tmp"))
    try:
        group_writable = sockets / "g"
        group_writable.mkdir()
        group_writable.chmod(0o770)
        with pytest.raises(worker.ConfigError, match="is writable by its group"):
            worker.prepare_socket(f"unix:{group_writable / 'w.sock'}")
        linked = sockets / "link"
        linked.symlink_to(group_writable)
        with pytest.raises(worker.ConfigError, match="not a directory of its own"):
            worker.prepare_socket(f"unix:{linked / 'w.sock'}")
        layout = sockets / "ok"  # the recommended layout: setgid, the group may only pass through
        layout.mkdir()
        layout.chmod(0o2710)
        assert worker.prepare_socket(f"unix:{layout / 'w.sock'}") == layout / "w.sock"
        made = worker.prepare_socket(f"unix:{sockets / 'new' / 'w.sock'}")
        assert stat.S_IMODE(os.lstat(made.parent).st_mode) == 0o750
    finally:
        for child in sorted(sockets.rglob("*"), reverse=True):
            child.unlink() if child.is_symlink() or not child.is_dir() else child.rmdir()
        sockets.rmdir()


def test_the_socket_is_made_0660_when_bound(running: dict[str, str]) -> None:
    path = Path(running["bank"][len("unix:"):])
    info = path.lstat()
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660 and info.st_uid == os.geteuid()


def test_the_audit_signer_signs_only_from_the_signed_head_the_request_names(running: dict[str, str]) -> None:
    """A request whose base (the signed head its digests start from) is not the signer's signed head is refused
    UNAVAILABLE carrying AuditSignedHeadMoved (retryable), before anything is signed; a malformed base is
    INVALID_ARGUMENT naming it."""
    import datetime as dt

    from kms.errors import AuditSignedHeadMoved

    audit = running["audit"]
    at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    stale = pb.SignedHeadBase(size=10**12, head="ab" * 32)  # never this token's signed head
    for method, request in (
            ("/kms.v1.AuditSignerWorker/SignCheckpoint",
             pb.SignCheckpointRequest(size=10**12, head="cd" * 32, at=at, base=stale)),
            ("/kms.v1.AuditSignerWorker/SignSeal",
             pb.SignSealRequest(size=10**12, head="cd" * 32, at=at, nonce="00", base=stale))):
        code, details, error = _call(audit, method, request)
        assert code == grpc.StatusCode.UNAVAILABLE and isinstance(error, AuditSignedHeadMoved), details
    bad = pb.SignCheckpointRequest(size=1, head="0" * 64, at=at, base=pb.SignedHeadBase(size=0, head="x"))
    code, details, error = _call(audit, "/kms.v1.AuditSignerWorker/SignCheckpoint", bad)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and getattr(error, "field", "") == "base.head", details
