"""The issuance service end to end: a real server on 127.0.0.1 over mutual TLS, real worker processes and
SoftHSM2 tokens, the batch records in SQLite; stations, officers and an auditor with their own certificates."""

from __future__ import annotations

import os
import secrets
import signal

import grpc
import pytest
from helpers import TEST_RANGE_PROFILE, card, open_batch, service_client

from kms.cards.cardid import CardIdentity, with_luhn_digit
from kms.dev.home import Home
from kms.errors import AlreadyExists, DeadlineExceeded, InvalidArgument, PermissionDenied, ResourceExhausted
from kms.identity import Principal
from kms.server.serve import Service
from kms.station import Station
from kms.v1 import issuance_pb2 as pb

ALICE = Principal("officer", "alice", domain="hrss")
CAROL = Principal("officer", "carol", domain="bank")
ERIN = Principal("auditor", "erin")


def _batch_id() -> str:
    return f"B-{secrets.token_hex(4)}"


def _cards(n: int, start: int) -> list[CardIdentity]:
    return [card(start + i, card_ref=f"svc-{start + i:06d}") for i in range(n)]


def test_an_officer_authorizes_a_batch_and_the_station_streams_and_opens_it(
    home: Home, service: Service, station: Station
) -> None:
    batch = _batch_id()
    with service_client(home, service, ALICE) as alice:
        status = open_batch(home, service.port, alice, batch, "bureau-a", "dual-app-v1", _cards(40, 10_000))
    assert (status.cards, status.issued, status.created_by) == (40, 0, ALICE.uri())
    with service_client(home, service, "station-a1") as st:
        bundles = list(st.stream_batch(batch, per_message=8))
        assert [b.card_ref for b in bundles] == [f"svc-{10_000 + i:06d}" for i in range(40)]
        assert st.batch_status(batch).issued == 40
        again = list(st.stream_batch(batch))  # the same stored bundles, not new ones
    assert [(b.serial, b.data) for b in again] == [(b.serial, b.data) for b in bundles]
    for b in bundles:
        report = station.open(b.data)
        assert report.ok and len(report.keys) == 15 and report.card_ref == b.card_ref
    with service_client(home, service, ERIN) as erin:
        assert erin.batch_status(batch).issued == 40


def test_issue_card_is_idempotent_and_at_most_once(home: Home, service: Service) -> None:
    batch = _batch_id()
    with service_client(home, service, CAROL) as carol:
        open_batch(home, service.port, carol, batch, "bureau-a", "dual-app-v1", _cards(2, 20_000))
    with service_client(home, service, "station-a1") as st:
        first = st.issue_card(batch, "svc-020000", idempotency_key="k-1")
        again = st.issue_card(batch, "svc-020000", idempotency_key="k-1")
        assert (again.serial, again.data) == (first.serial, first.data)
        with pytest.raises(AlreadyExists, match="already issued"):
            st.issue_card(batch, "svc-020000", idempotency_key="k-2")
        with pytest.raises(AlreadyExists):
            st.issue_card(batch, "svc-020000")


def test_chip_data_binds_at_the_station_and_a_spoiled_card_needs_a_reissue(home: Home, service: Service) -> None:
    batch = _batch_id()
    blank = [CardIdentity(card_ref=f"chip-{i}", city_code="320200", pan=with_luhn_digit(f"62148300000{i:04d}"),
                          psn="01") for i in range(2)]
    with service_client(home, service, ALICE) as alice:
        open_batch(home, service.port, alice, batch, "bureau-a", "dual-app-v1", blank)
    with service_client(home, service, "station-a1") as st:
        with pytest.raises(InvalidArgument) as missing:
            st.issue_card(batch, "chip-0")
        assert missing.value.field.startswith("chip.")
        first = st.issue_card(batch, "chip-0", card_serial="86843202AD932A48", kdd="00010203040506070809",
                              idempotency_key="a")
        with pytest.raises(AlreadyExists):  # another chip for the same record
            st.issue_card(batch, "chip-0", card_serial="1111111111111111", kdd="00010203040506070809",
                          idempotency_key="b")
        with service_client(home, service, ALICE) as alice, service_client(home, service, CAROL) as carol:
            # the finding: an hrss officer alone re-sent both domains' keys; now each domain consents
            alice_says = alice.reissue(batch, "chip-0")
            assert (alice_says.state, list(alice_says.awaiting)) == ("issued", ["bank"])
            with pytest.raises(AlreadyExists):  # still bound to its first chip
                st.issue_card(batch, "chip-0", card_serial="1111111111111111", kdd="00010203040506070809",
                              idempotency_key="b")
            carol_says = carol.reissue(batch, "chip-0")
            assert (carol_says.state, list(carol_says.awaiting)) == ("pending", [])
        second = st.issue_card(batch, "chip-0", card_serial="1111111111111111", kdd="00010203040506070809",
                               idempotency_key="b")
    assert second.serial != first.serial
    with pytest.raises(InvalidArgument) as bad, service_client(home, service, "station-a1") as st:
        st.issue_card(batch, "chip-1", card_serial="XYZ", kdd="00010203040506070809")
    assert bad.value.field == "chip.card_serial"


def test_refusals_name_a_human_reason(home: Home, service: Service) -> None:
    batch = _batch_id()
    with service_client(home, service, ALICE) as alice:
        open_batch(home, service.port, alice, batch, "bureau-a", "dual-app-v1", _cards(1, 30_000))
        with pytest.raises(PermissionDenied, match=r"not registered for the hrss domain"):
            alice.create_batch(_batch_id(), "bureau-zz", "dual-app-v1", _cards(1, 30_001))
        from kms.v1 import issuance_pb2 as pb

        request = pb.CreateBatchRequest(batch_id=_batch_id(), bureau="bureau-a", profile="dual-app-v1", cards=[
            pb.CardIdentity(**card(1, card_ref="ok-1").as_dict()),
            pb.CardIdentity(**dict(card(2, card_ref="bad-2").as_dict(), pan="1234"))])
        with pytest.raises(grpc.RpcError) as invalid:
            alice.batches.CreateBatch(request, timeout=30)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert invalid.value.details() == "cards[1].pan: must be 12 to 19 digits"
        with pytest.raises(PermissionDenied, match=r"may not call /kms\.v1\.IssuanceService/IssueCard"):
            alice.issue_card(batch, "svc-030000")
    with service_client(home, service, "station-b1") as other:
        with pytest.raises(PermissionDenied, match="is not authorized for bureau-b"):
            list(other.stream_batch(batch))
        with pytest.raises(PermissionDenied, match=r"may not call /kms\.v1\.BatchService/CreateBatch"):
            other.create_batch(_batch_id(), "bureau-b", "dual-app-v1", _cards(1, 30_002))
    with service_client(home, service, "station-a1") as st:
        with pytest.raises(PermissionDenied, match="not in batch"):
            st.issue_card(batch, "svc-999999")
        with pytest.raises(InvalidArgument) as cursor:
            list(st.stream_batch(batch, cursor="abc"))
        assert cursor.value.field == "cursor"


def test_cursors_and_chip_data_are_ascii_only(home: Home, service: Service) -> None:
    """The finding: a cursor of Unicode digits ("²" passes str.isdigit()) ended INTERNAL; "\u0663" was read as 3. And
    "ﬀ".upper() is "FF": a 15-character serial with it passed as 16 hex digits."""
    batch = _batch_id()
    blank = CardIdentity(card_ref="ascii-0", city_code="320200", pan="6214830000054329", psn="01")
    with service_client(home, service, ALICE) as alice:
        open_batch(home, service.port, alice, batch, "bureau-a", "dual-app-v1", [blank])
        request = pb.CreateBatchRequest(batch_id=_batch_id(), bureau="bureau-a", profile="dual-app-v1", cards=[
            pb.CardIdentity(**dict(card(50_000, card_ref="ascii-1").as_dict(), card_serial="ﬀ843202AD932A48"))])
        with pytest.raises(grpc.RpcError) as created:
            alice.batches.CreateBatch(request, timeout=30)
        assert (created.value.code(), created.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT, "cards[0].card_serial: must be 16 upper-case hex digits (8 bytes)")
    with service_client(home, service, "station-a1") as st:
        for cursor in ("²", "\u0663", "\uff11", "1²", "1234567890", " 1", "-1", "0\n"):  # ², Arabic 3, wide 1
            with pytest.raises(InvalidArgument) as refused:
                list(st.stream_batch(batch, cursor=cursor))
            assert refused.value.field == "cursor", cursor
        for serial, kdd, field in (("ﬀ843202AD932A48", "00010203040506070809", "chip.card_serial"),
                                   ("86843202AD932A48", "ﬀ010203040506070809", "chip.kdd")):
            with pytest.raises(InvalidArgument) as chip:
                st.issue_card(batch, "ascii-0", card_serial=serial, kdd=kdd)
            assert chip.value.field == field
        # ASCII lower-case hex is still taken; an ASCII cursor is still read (past the batch's only card).
        bundle = st.issue_card(batch, "ascii-0", card_serial="86843202ad932a48", kdd="00010203040506070809")
        assert [b.serial for b in st.stream_batch(batch)] == [bundle.serial]
        assert list(st.stream_batch(batch, cursor=str(bundle.sequence))) == []


def test_oversize_message_and_passed_deadline(home: Home, service: Service) -> None:
    batch = _batch_id()
    with service_client(home, service, ALICE) as alice:
        open_batch(home, service.port, alice, batch, "bureau-a", "dual-app-v1", _cards(1, 40_000))
        huge = [CardIdentity(card_ref=f"x{i:08d}" + "y" * 50, city_code="320200") for i in range(150_000)]
        with pytest.raises(ResourceExhausted, match="larger than max"):  # gRPC's own RESOURCE_EXHAUSTED
            alice.create_batch(_batch_id(), "bureau-a", "dual-app-v1", huge)
    with service_client(home, service, "station-a1") as st:
        st.timeout = 0.001
        with pytest.raises((DeadlineExceeded, Exception)):
            st.issue_card(batch, "svc-040000")
        st.timeout = 60
        assert st.batch_status(batch).issued == 0  # no HSM work was done for it


def test_a_dropped_stream_resumes_without_losing_or_repeating_a_card(home: Home, service: Service) -> None:
    batch = _batch_id()
    with service_client(home, service, CAROL) as carol:
        open_batch(home, service.port, carol, batch, "bureau-a", "dual-app-v1", _cards(60, 50_000))
    received: list[str] = []
    cursor = ""
    with service_client(home, service, "station-a1") as st:
        from kms.v1 import issuance_pb2 as pb

        call = st.issuance.StreamBatch(pb.StreamBatchRequest(batch_id=batch, max_bundles_per_message=5), timeout=60)
        for i, message in enumerate(call):
            received += [b.card_ref for b in message.bundles]
            cursor = message.cursor
            if i == 2:
                call.cancel()  # the connection drops after three messages
                break
        assert len(received) == 15
        received += [b.card_ref for b in st.stream_batch(batch, cursor=cursor)]
    assert received == [f"svc-{50_000 + i:06d}" for i in range(60)]


def test_a_worker_killed_mid_batch_loses_and_repeats_nothing(home: Home, service: Service) -> None:
    batch = _batch_id()
    with service_client(home, service, ALICE) as alice:
        open_batch(home, service.port, alice, batch, "bureau-a", "dual-app-v1", _cards(300, 60_000))
    received = []
    with service_client(home, service, "station-a1") as st:
        for i, bundle in enumerate(st.stream_batch(batch, per_message=4)):
            received.append((bundle.card_ref, bundle.serial))
            if i == 3:
                for pool in service.pools.pools.values():
                    for pid in list(getattr(pool._executor, "_processes", {}) or {}):
                        os.kill(pid, signal.SIGKILL)
        assert st.batch_status(batch).issued == 300
    assert [r for r, _ in received] == [f"svc-{60_000 + i:06d}" for i in range(300)]
    assert len({s for _, s in received}) == 300


def test_no_pin_in_the_serving_process(home: Home, service: Service) -> None:
    # The server's own process resolves no PIN reference: sealing happens in the domain workers.
    assert grpc is not None and isinstance(service.port, int)
    pins = [p.read_text().strip() for p in (home.path / "pins").iterdir()]
    assert pins and all(pin not in repr(vars(service.issuance)) for pin in pins)


def test_a_batch_must_carry_what_no_chip_can_supply(home: Home, service: Service) -> None:
    from kms.v1 import issuance_pb2 as pb

    no_pan = pb.CardIdentity(card_ref="no-pan", city_code="320200", psn="01")
    request = pb.CreateBatchRequest(batch_id=_batch_id(), bureau="bureau-a", profile="dual-app-v1", cards=[no_pan])
    with service_client(home, service, ALICE) as alice, pytest.raises(grpc.RpcError) as raised:
        alice.batches.CreateBatch(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "cards[0].pan: is required by profile dual-app-v1"


def test_a_pan_failing_the_luhn_check_is_refused_unless_the_profile_opts_out(home: Home, service: Service) -> None:
    from kms.v1 import issuance_pb2 as pb

    bad = pb.CardIdentity(**dict(card(1, card_ref="luhn-0").as_dict(), pan="6214830012345678"))
    request = pb.CreateBatchRequest(batch_id=_batch_id(), bureau="bureau-a", profile="dual-app-v1",
                                    cards=[pb.CardIdentity(**card(0, card_ref="luhn-ok").as_dict()), bad])
    with service_client(home, service, ALICE) as alice:
        with pytest.raises(grpc.RpcError) as raised:
            alice.batches.CreateBatch(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == "cards[1].pan: fails the Luhn check"
        request.profile = TEST_RANGE_PROFILE  # a test range: the profile opts out (pan_luhn: false)
        assert alice.batches.CreateBatch(request, timeout=30).cards == 2


def test_a_malformed_idempotency_key_is_refused_before_any_hsm_work(home: Home, service: Service) -> None:
    batch = _batch_id()
    with service_client(home, service, ALICE) as alice:
        open_batch(home, service.port, alice, batch, "bureau-a", "dual-app-v1", _cards(1, 70_000))
    with service_client(home, service, "station-a1") as st:
        with pytest.raises(InvalidArgument) as raised:
            st.issue_card(batch, "svc-070000", idempotency_key="has space")
        assert raised.value.field == "idempotency_key"
        assert st.batch_status(batch).issued == 0


def test_a_card_that_fails_to_seal_ends_the_stream_and_the_resume_seals_it(
    home: Home, service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kms.errors import HsmError
    from kms.issuance.issuer import IssuedBundle

    batch = _batch_id()
    with service_client(home, service, CAROL) as carol:
        open_batch(home, service.port, carol, batch, "bureau-a", "dual-app-v1", _cards(5, 80_000))
    issuer = service.issuance.issuer("bureau-a", "dual-app-v1")
    real, failed = issuer.issue, []

    def flaky(cards, batch_id, pins=None):  # type: ignore[no-untyped-def]
        for issued in real(cards, batch_id, pins):
            if issued.card_ref == "svc-080002" and not failed:  # the token fails once, on the third card
                failed.append(issued.card_ref)
                yield IssuedBundle(issued.card_ref, issued.serial, None, HsmError("injected", retryable=True))
            else:
                yield issued

    monkeypatch.setattr(issuer, "issue", flaky)
    with service_client(home, service, "station-a1") as st:
        from kms.v1 import issuance_pb2 as pb

        got = []
        with pytest.raises(grpc.RpcError) as raised:
            for message in st.issuance.StreamBatch(pb.StreamBatchRequest(batch_id=batch), timeout=60):
                got += [b.card_ref for b in message.bundles]
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert got == ["svc-080000", "svc-080001"]  # nothing after the failed card was skipped over
        assert [b.card_ref for b in st.stream_batch(batch, cursor="1")] == ["svc-080002", "svc-080003",
                                                                            "svc-080004"]


def test_replay_with_another_chip_and_unknown_batches_are_refused(home: Home, service: Service) -> None:
    batch = _batch_id()
    with service_client(home, service, ALICE) as alice:
        open_batch(home, service.port, alice, batch, "bureau-a", "dual-app-v1",
                           [CardIdentity(card_ref="rc-0", city_code="320200", pan="6214830000000009", psn="01")])
    with service_client(home, service, "station-a1") as st:
        st.issue_card(batch, "rc-0", card_serial="86843202AD932A48", kdd="00010203040506070809", idempotency_key="r")
        with pytest.raises(PermissionDenied, match="issued for another chip"):
            st.issue_card(batch, "rc-0", card_serial="2222222222222222", kdd="00010203040506070809",
                          idempotency_key="r")
        with pytest.raises(PermissionDenied, match="B-nonexistent is not authorized for bureau-a"):
            st.issue_card("B-nonexistent", "rc-0")


def test_the_service_issuer_is_built_from_what_the_service_holds(service: Service,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # No second configuration, profile directory or database engine: the service's own are handed over.
    from kms import config, runtime, store
    from kms.cards import profiles

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the issuer rebuilt what the service already holds")

    for module, name in ((config, "load"), (profiles, "load_dir"), (runtime, "registry"), (store, "make_engine")):
        monkeypatch.setattr(module, name, refuse)
    issuer = service.issuance.issuer("bureau-built-once", "dual-app-v1")
    assert issuer.profile is service.issuance.profiles["dual-app-v1"]
    assert issuer._pools is service.pools  # borrowed: closing the issuer leaves the service's workers running
    assert service.issuance.issuer("bureau-built-once", "dual-app-v1") is issuer
