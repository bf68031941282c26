"""The audit service and request outcomes end to end: a real server (kms.server.serve.Service) on the session home, its
checkpoints signed by the audit key in the audit token; an auditor exports, `kms audit verify` checks the export
offline with audit/audit-v1.pem; stations and officers are refused, and each call's outcome is itself a
record."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import kms, service_client

from kms import store
from kms.audit.log import AuditLog, AuditUnavailable, checkpoint_message
from kms.audit.verify import NOT_THIS_REQUEST, verify
from kms.client.audit import AuditClient
from kms.clock import SystemClock
from kms.dev.home import Home
from kms.dev.pki import DevPki
from kms.errors import InvalidArgument, NotFound, PermissionDenied
from kms.identity import Principal
from kms.server.audit import chunks, parse_time
from kms.server.authz import Policy
from kms.server.frame import TlsFiles, create_server
from kms.server.serve import Service

ALICE = Principal("officer", "alice", domain="hrss")
ERIN = Principal("auditor", "erin")
STATION_URI = "urn:kms:station:bureau-a:station-a1"
EXPORT = "/kms.v1.AuditService/Export"


@pytest.fixture(scope="module")
def public_key(home: Home) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key((home.path / "audit" / "audit-v1.pem").read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _export(home: Home, service: Service, who: Principal | str = ERIN, **filters: str) -> list[str]:
    with service_client(home, service, who) as client:
        return [line for chunk in AuditClient(client).export(**filters) for line in chunk]


def _record_something(home: Home, service: Service) -> None:
    with service_client(home, service, ERIN) as erin:
        AuditClient(erin).head()


def _bodies(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line)["body"] for line in lines if line.startswith('{"type":"record"')]


def test_the_auditor_exports_and_the_export_verifies_ending_with_a_checkpoint(
    home: Home, service: Service, public_key: ec.EllipticCurvePublicKey
) -> None:
    with service_client(home, service, ERIN) as erin:  # some calls to record
        AuditClient(erin).head()
    lines = _export(home, service)
    header, last = json.loads(lines[0]), json.loads(lines[-1])
    records = _bodies(lines)
    assert header["type"] == "export" and not header["filtered"]
    assert [r["seq"] for r in records] == list(range(1, header["size"] + 1))  # complete, from the first record on
    checkpoint = json.loads(lines[-2])
    assert checkpoint["type"] == "checkpoint" and checkpoint["size"] == records[-1]["seq"] == header["size"]
    assert last["type"] == "export-seal" and last["size"] == header["size"] and last["head"] == checkpoint["head"]
    assert last["nonce"] == header["nonce"] and len(header["nonce"]) == 32  # the client's random one
    verdict = verify(lines, public_key)
    assert verdict.ok, verdict.summary()
    assert (verdict.records, verdict.last_seq, verdict.covered, verdict.filtered) == (
        len(records), header["size"], header["size"], False)
    assert {"service.started", "request.ok"} <= {r["kind"] for r in records}


def test_get_head_names_the_chain_and_its_newest_signed_checkpoint(
    home: Home, service: Service, public_key: ec.EllipticCurvePublicKey
) -> None:
    _export(home, service)  # signs a checkpoint
    with service_client(home, service, ERIN) as erin:
        head = AuditClient(erin).head()
    assert head.size >= head.checkpoint_size > 0 and len(head.hash) == 64
    checkpoint = json.loads(head.checkpoint)
    assert (checkpoint["size"], checkpoint["at"]) == (head.checkpoint_size, head.checkpoint_at)
    public_key.verify(bytes.fromhex(checkpoint["signature"]),  # signed by the audit key
                      checkpoint_message(checkpoint["size"], checkpoint["head"], checkpoint["at"]),
                      ec.ECDSA(hashes.SHA256()))


def test_stations_and_officers_are_refused_and_each_refusal_is_recorded(home: Home, service: Service) -> None:
    for who in ("station-a1", ALICE):
        with pytest.raises(PermissionDenied, match=r"may not call /kms\.v1\.AuditService/Export"):
            _export(home, service, who)
        with service_client(home, service, who) as client, pytest.raises(PermissionDenied):
            AuditClient(client).head()
    refused = [r for r in _bodies(_export(home, service, kind="request.refused")) if r["subject"] == EXPORT]
    actors = {r["actor"] for r in refused}
    assert {STATION_URI, ALICE.uri()} <= actors
    mine = next(r for r in reversed(refused) if r["actor"] == ALICE.uri())
    assert mine["outcome"] == "refused" and mine["domain"] == "hrss"
    assert mine["detail"]["status"] == "PERMISSION_DENIED"
    assert mine["detail"]["message"] == f"officer hrss/alice may not call {EXPORT} (allowed: auditor)"


def test_a_handler_that_ends_with_an_error_is_a_refused_outcome(home: Home, service: Service) -> None:
    with service_client(home, service, ALICE) as alice, pytest.raises(NotFound):
        alice.get_card("no-such-card-audit")
    refused = [r for r in _bodies(_export(home, service, kind="request.refused"))
               if r["subject"] == "/kms.v1.CardService/GetCard" and r["actor"] == ALICE.uri()]
    assert refused and refused[-1]["detail"]["status"] == "NOT_FOUND"
    assert "no-such-card-audit" in refused[-1]["detail"]["message"]


def test_calls_that_end_ok_are_recorded_streams_when_they_end(home: Home, service: Service) -> None:
    first = _export(home, service)
    with service_client(home, service, ERIN) as erin:
        AuditClient(erin).head()
    later = _bodies(_export(home, service, kind="request.ok"))
    size = json.loads(first[0])["size"]
    after = [(r["subject"], r["actor"]) for r in later if r["seq"] > size]
    # The first export's own outcome is recorded when its stream ended, after the records it holds.
    assert after[:2] == [(EXPORT, ERIN.uri()), ("/kms.v1.AuditService/GetHead", ERIN.uri())]
    assert all(r["outcome"] == "ok" and r["detail"] == {"method": r["subject"]} for r in later)


def test_filtered_exports_hold_only_matching_records_and_verify_as_filtered(
    home: Home, service: Service, public_key: ec.EllipticCurvePublicKey
) -> None:
    with service_client(home, service, ALICE) as alice, pytest.raises(NotFound):
        alice.get_card("no-such-card-filter")  # an hrss officer's call: a record of domain hrss
    full = _bodies(_export(home, service))
    for filters, keep in (
        ({"domain": "hrss"}, lambda r: r["domain"] == "hrss"),
        ({"kind": "request"}, lambda r: r["kind"].startswith("request.")),
        ({"kind": "request.ok"}, lambda r: r["kind"] == "request.ok"),
    ):
        lines = _export(home, service, **filters)
        got = _bodies(lines)
        size = json.loads(lines[0])["size"]
        assert got and all(keep(r) for r in got), filters
        assert [r["seq"] for r in got if r["seq"] <= full[-1]["seq"]] == [r["seq"] for r in full if keep(r)]
        assert got[-1]["seq"] <= size
        verdict = verify(lines, public_key)
        assert verdict.ok and verdict.filtered, verdict.summary()
        assert json.loads(lines[0])["filters"] == filters

    times = sorted({r["at"] for r in full})
    since = times[len(times) // 2]
    until = (dt.datetime.fromisoformat(since) + dt.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = _export(home, service, since=since, until=until)
    got = _bodies(lines)
    assert got and all(since <= r["at"] < until for r in got)
    assert [r["seq"] for r in got if r["seq"] <= full[-1]["seq"]] == [
        r["seq"] for r in full if since <= r["at"] < until]
    assert verify(lines, public_key).ok


def test_an_export_cut_back_to_an_earlier_checkpoint_is_named_truncated(
    home: Home, service: Service, public_key: ec.EllipticCurvePublicKey
) -> None:
    """The finding, over the real server: an export cut exactly after an earlier checkpoint is a complete, signed log
    up to it; the seal signed for this request (its nonce) is what it lacks, and the verdict names that."""
    with service_client(home, service, ERIN) as erin:
        older = [line for chunk in AuditClient(erin).export(nonce="0a" * 16) for line in chunk]
    _record_something(home, service)
    with service_client(home, service, ERIN) as erin:
        current = [line for chunk in AuditClient(erin).export(nonce="0b" * 16) for line in chunk]
    earlier = json.loads(older[0])["size"]
    assert json.loads(current[0])["size"] > earlier
    assert verify(older, public_key, nonce="0a" * 16).ok and verify(current, public_key, nonce="0b" * 16).ok
    cut_at = next(i for i, line in enumerate(current)
                  if line.startswith('{"type":"checkpoint"') and json.loads(line)["size"] == earlier)
    cut = current[:cut_at + 1]
    verdict = verify(cut, public_key)
    assert (verdict.ok, verdict.bad_seq, verdict.problem) == (False, earlier + 1, "truncated")
    assert verdict.detail == f"{NOT_THIS_REQUEST} (it has no export seal)"
    spliced = verify([*cut, older[-1]], public_key)  # the older export's seal put on: the header's nonce differs
    assert (spliced.ok, spliced.bad_seq, spliced.problem) == (False, earlier + 1, "truncated")
    # The older export as a whole is what the server signed for an older request: the nonce kept apart tells.
    for nonce in ("0b" * 16, "0B" * 16):
        replayed = verify(older, public_key, nonce=nonce.lower())
        assert (replayed.ok, replayed.bad_seq, replayed.problem) == (False, earlier + 1, "truncated")


@pytest.mark.parametrize("nonce", ["", "0a" * 15, "0A" * 16, "0a" * 65, "zz" * 16])
def test_an_export_without_a_good_nonce_is_refused(home: Home, service: Service, nonce: str) -> None:
    with pytest.raises(InvalidArgument) as raised, service_client(home, service, ERIN) as erin:
        list(AuditClient(erin).export(nonce=nonce))
    assert raised.value.field == "nonce" and "hex digits" in raised.value.reason


@pytest.mark.parametrize(("filters", "field"), [
    ({"since": "9999-12-31T23:59:59.5Z"}, "since"),  # rounded up past the last second there is
    ({"until": "9999-12-31T23:59:59-01:00"}, "until"),  # in UTC, year 10000
    ({"since": "0001-01-01T00:00:00+00:01"}, "since"),  # in UTC, year 0
    ({"since": "yesterday"}, "since"),
    ({"until": "2026-13-01T00:00:00Z"}, "until"),
    ({"until": "2026-11-27T08:00:00"}, "until"),  # no offset: not RFC 3339
    ({"since": "2026-11-28T00:00:00Z", "until": "2026-11-27T00:00:00Z"}, "until"),
    ({"domain": "nope"}, "domain"),
    ({"kind": "Request OK"}, "kind"),
])
def test_bad_filters_are_refused_naming_the_field(home: Home, service: Service, filters: dict[str, str],
                                                   field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        _export(home, service, **filters)
    assert raised.value.field == field


def test_times_are_normalized_to_what_records_carry() -> None:
    assert parse_time("since", "2026-11-27T10:00:00+02:00") == "2026-11-27T08:00:00Z"
    assert parse_time("until", "2026-11-27t08:00:00.25z") == "2026-11-27T08:00:01Z"
    assert parse_time("since", "") is None
    assert parse_time("until", "9999-12-31T23:59:59Z") == "9999-12-31T23:59:59Z"  # the last time there is
    with pytest.raises(InvalidArgument, match=r"^until: is out of range"):
        parse_time("until", "9999-12-31T23:59:59.000001Z")
    assert [len(c) for c in chunks(iter(["x" * 10] * 7), per_chunk=3)] == [3, 3, 1]
    assert [len(c) for c in chunks(iter(["x" * 10] * 7), max_bytes=25)] == [2, 2, 2, 1]


# -- the command line ---------------------------------------------------------------------------------------------


def test_cli_export_and_verify_round_trip_and_a_tampered_byte_is_named(
    home: Home, service: Service, tmp_path: Path
) -> None:
    client = str(home.client_config(ERIN))
    key = str(home.path / "audit" / "audit-v1.pem")
    out = tmp_path / "audit.jsonl"
    exported = kms("audit", "export", "--client", client, "--server", f"localhost:{service.port}", "-o", str(out),
                   "--json", check=True)
    summary = json.loads(exported.stdout)
    assert summary["records"] == summary["size"] == summary["last_seq"] > 0 and summary["checkpoints"] >= 1
    assert out.stat().st_mode & 0o077 == 0
    nonce = summary["nonce"]
    written = out.read_text().splitlines()
    header, seal = json.loads(written[0]), json.loads(written[-1])
    assert len(nonce) == 32 and header["nonce"] == seal["nonce"] == nonce and seal["at"] == summary["sealed_at"]
    verified = kms("audit", "verify", str(out), "--public-key", key, check=True)
    assert verified.stdout.startswith(f"audit log verified: {summary['records']} records")
    assert verified.stdout.rstrip().endswith(f"for the header's nonce {nonce}")
    kept = kms("audit", "verify", str(out), "--public-key", key, "--nonce", nonce.upper(), check=True)
    assert kept.stdout.rstrip().endswith(f"for the nonce expected {nonce}")
    other = kms("audit", "verify", str(out), "--public-key", key, "--expect-nonce", "ab" * 16)
    assert other.returncode == 9 and other.stdout == "" and other.stderr.count("\n") == 1
    assert other.stderr.startswith(f"kms: audit log NOT verified: record {summary['size'] + 1}: truncated: "
                                   f"{NOT_THIS_REQUEST} (it is sealed for nonce {nonce}, not the expected {'ab' * 16})")
    bad = kms("audit", "verify", str(out), "--public-key", key, "--nonce", "not-hex")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nonce" in bad.stderr

    again = kms("audit", "export", "--client", client, "--server", f"localhost:{service.port}", "-o", str(out))
    assert again.returncode == 4 and "exists" in again.stderr
    assert kms("audit", "verify", str(out), "--public-key", key).returncode == 0  # left as it was

    filtered = tmp_path / "refused.jsonl"
    kms("audit", "export", "--client", client, "--server", f"localhost:{service.port}", "-o", str(filtered),
        "--kind", "request", "--domain", "hrss", check=True)
    assert "left out by the filter" in kms("audit", "verify", str(filtered), "--public-key", key, check=True).stdout

    lines = out.read_bytes().split(b"\n")
    hidden = tmp_path / "hidden.jsonl"  # a record removed, and the header changed to say "filtered"
    hidden.write_bytes(b"\n".join([lines[0].replace(b'"filtered":false', b'"filtered":true'), *lines[1:3],
                                   *lines[4:]]))
    result = kms("audit", "verify", str(hidden), "--public-key", key)
    assert result.returncode == 9 and "removed" in result.stderr

    index = len(lines) // 2
    while not lines[index].startswith(b'{"type":"record"'):
        index += 1
    seq = json.loads(lines[index])["seq"]
    at = lines[index].index(b'"outcome":"') + len(b'"outcome":"')
    lines[index] = lines[index][:at] + b"X" + lines[index][at + 1:]  # one byte of the record's body
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(b"\n".join(lines))
    result = kms("audit", "verify", str(tampered), "--public-key", key)
    assert result.returncode == 9
    assert result.stderr.strip() == (f"kms: audit log NOT verified: record {seq}: edited: its hash does not match "
                                      "its content")
    as_json = json.loads(kms("audit", "verify", str(tampered), "--public-key", key, "--json").stdout)
    assert (as_json["ok"], as_json["bad_seq"], as_json["problem"]) == (False, seq, "edited")


@pytest.mark.parametrize(("option", "value"), [("--since", "9999-12-31T23:59:59.5Z"),
                                               ("--until", "9999-12-31T23:59:59-01:00")])
def test_cli_export_with_a_time_out_of_range_says_which_and_leaves_no_file(
    home: Home, service: Service, tmp_path: Path, option: str, value: str
) -> None:
    out = tmp_path / "audit.jsonl"
    result = kms("audit", "export", "--client", str(home.client_config(ERIN)), "--server",
                 f"localhost:{service.port}", "-o", str(out), option, value)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert f"{option[2:]}: is out of range" in result.stderr
    assert not out.exists()


def test_cli_export_refused_for_an_officer_leaves_no_file(home: Home, service: Service, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    result = kms("audit", "export", "--client", str(home.client_config(ALICE)), "--server",
                 f"localhost:{service.port}", "-o", str(out))
    assert result.returncode == 5 and "may not call" in result.stderr
    assert not out.exists()


# -- the interceptor: fail closed ---------------------------------------------------------------------------------


class _BreakableAudit(AuditLog):
    broken = False

    def record(self, kind: str, **fields: Any) -> int:
        if self.broken:
            raise AuditUnavailable()
        return super().record(kind, **fields)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return DevPki(tmp_path_factory.mktemp("pki"))


def _channel(pki: DevPki, port: int, who: Principal) -> grpc.Channel:
    cred = pki.client(who)
    return grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert.read_bytes(), private_key=cred.key.read_bytes(),
        certificate_chain=cred.cert.read_bytes()))


def test_an_ok_outcome_that_cannot_be_recorded_fails_the_call_and_a_refusal_stays_one(
    pki: DevPki, tmp_path: Path
) -> None:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.upgrade(engine)
    audit = _BreakableAudit(engine, SystemClock())
    cred = pki.server()
    server, port = create_server(TlsFiles(cred.cert, cred.key, pki.ca.cert), Policy.load(), audit=audit)
    server.start()
    station = Principal("station", "station-a1", bureau="bureau-a")
    reflect = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        with _channel(pki, port, station) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as raised:
                list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([reflect]),
                                                                                            timeout=10))
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
            audit.broken = True
            with pytest.raises(grpc.RpcError) as raised:
                health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "outcome could not be recorded in the audit log" in (raised.value.details() or "")
            with pytest.raises(grpc.RpcError) as raised:  # still refused, not turned into UNAVAILABLE
                list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([reflect]),
                                                                                            timeout=10))
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with _channel(pki, port, Principal("auditor", "carol")) as channel:
            with pytest.raises(grpc.RpcError) as raised:  # a stream that ends OK, its outcome not recordable
                list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([reflect]),
                                                                                            timeout=10))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            audit.broken = False
            assert len(list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflect]), timeout=10))) == 1
    finally:
        server.stop(grace=None)
    with engine.connect() as conn:
        rows = [json.loads(body) for body in conn.execute(sa.select(store.audit_log.c.body)
                                                            .order_by(store.audit_log.c.seq)).scalars()]
    assert [(r["kind"], r["subject"], r["actor"]) for r in rows] == [
        ("request.ok", "/grpc.health.v1.Health/Check", station.uri()),
        ("request.refused", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", station.uri()),
        ("request.ok", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "urn:kms:auditor:carol"),
    ]
    assert rows[1]["detail"]["status"] == "PERMISSION_DENIED"


def test_a_stream_the_caller_cancels_is_recorded_as_cancelled(home: Home, service: Service) -> None:
    import secrets

    from helpers import card, open_batch

    from kms.v1 import issuance_pb2 as ipb

    batch = f"AC-{secrets.token_hex(3)}"
    with service_client(home, service, ALICE) as alice:
        open_batch(home, service.port, alice, batch, "bureau-a", "dual-app-v1",
                   [card(97_000 + i, card_ref=f"ac-{i}") for i in range(64)])
    with service_client(home, service, "station-a1") as st:
        stream = st.issuance.StreamBatch(ipb.StreamBatchRequest(batch_id=batch, max_bundles_per_message=4),
                                         timeout=60)
        next(stream)
        stream.cancel()
    import time

    time.sleep(1.0)  # the server notices the cancellation and ends the handler
    streams = [r for r in _bodies(_export(home, service, kind="request"))
               if r["detail"].get("method") == "/kms.v1.IssuanceService/StreamBatch" and r["actor"] == STATION_URI]
    assert streams[-1]["kind"] == "request.refused" and streams[-1]["detail"]["status"] == "CANCELLED"


def test_bundles_sent_again_are_recorded_each_time(home: Home, service: Service) -> None:
    import secrets

    from helpers import card, open_batch

    batch = f"RD-{secrets.token_hex(3)}"
    with service_client(home, service, ALICE) as alice:
        open_batch(home, service.port, alice, batch, "bureau-a", "dual-app-v1",
                   [card(98_000 + i, card_ref=f"rd-{i}") for i in range(6)])
    with service_client(home, service, "station-a1") as st:
        first = st.issue_card(batch, "rd-0", idempotency_key="rd-key")
        assert st.issue_card(batch, "rd-0", idempotency_key="rd-key").serial == first.serial  # a retry
        streamed = list(st.stream_batch(batch, per_message=4))
        again = list(st.stream_batch(batch, per_message=4))  # the whole batch read a second time
    assert [b.serial for b in again] == [b.serial for b in streamed]
    records = [r for r in _bodies(_export(home, service, kind="issuance")) if r["subject"].startswith(f"{batch}/")]
    issued = [r["detail"]["serial"] for r in records if r["kind"] == "issuance.issued"]
    resent = [r["detail"]["serial"] for r in records if r["kind"] == "issuance.redelivered"]
    assert sorted(issued) == sorted(b.serial for b in streamed)  # each bundle issued once
    # rd-0: the retry, then the first stream (issued earlier by IssueCard), then the second stream; the others once.
    assert resent.count(first.serial) == 3 and len(resent) == 3 + 5
    assert all(r["actor"] == STATION_URI for r in records)
