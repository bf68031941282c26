"""Station side against real tokens: verify, unwrap into the station's token, KCVs, and every refusal."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11.exceptions as p11e
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from helpers import card, seal
from pkcs11 import Attribute, KeyType, ObjectClass

from kms import bundle, config, runtime, store
from kms.clock import SystemClock
from kms.errors import BundleRejected
from kms.hsm.session import TokenSession
from kms.issuance.sealer import DomainSealer
from kms.registry import KeyKind
from kms.station import OpenReport, Station, TrustStore, is_sm2_spki, spki_pem


def _doc(data: bytes) -> dict[str, Any]:
    return json.loads(data)


def _encode(doc: dict[str, Any]) -> bytes:
    return bundle.canonical(doc)


def _resign(doc: dict[str, Any], index: int, sign: Any) -> None:
    body = doc["sections"][index]["body"]
    doc["sections"][index]["signature"]["value"] = bundle.hexs(sign(bundle.signed_bytes(body)))


def test_a_bundle_opens_and_every_kcv_matches(sealers: dict[str, DomainSealer], station: Station) -> None:
    report = station.open(seal(sealers, card(10)))
    assert report.ok
    assert len(report.keys) == 15
    assert {k.domain for k in report.keys} == {"hrss", "bank"}
    assert all(k.kcv_expected == k.kcv_computed for k in report.keys)
    assert report.as_json()["ok"] is True


def test_opening_leaves_no_session_objects_and_store_keeps_token_objects(
    sealers: dict[str, DomainSealer], station: Station, station_session: TokenSession
) -> None:
    c = card(11)
    report = station.open(seal(sealers, c), store=True)
    assert report.ok and report.stored
    assert [o for o in station_session.objects() if not o.token] == []
    stored = {o.label: o for o in station_session.objects() if o.label.startswith(f"card/{c.card_ref}/")}
    assert set(stored) == {k.label for k in report.keys}
    assert len(stored) == 15
    for info in stored.values():
        assert info.sensitive is True and info.extractable is False
    for label in stored:
        station_session.destroy(label)


def test_replayed_bundle_is_rejected_even_by_a_restarted_station(
    sealers: dict[str, DomainSealer], station: Station, station_config: Any, station_session: TokenSession
) -> None:
    data = seal(sealers, card(12))
    station.open(data)
    with pytest.raises(BundleRejected):
        station.open(data)
    restarted = Station(station.name, station.bureau, station.domains, station_session,
                        TrustStore.load(station_config.trust), station._ledger, SystemClock())
    with pytest.raises(BundleRejected):
        restarted.open(data)


def test_every_byte_flip_is_rejected(sealers: dict[str, DomainSealer], station: Station) -> None:
    data = seal(sealers, card(13))
    rejected = 0
    for position in range(len(data)):
        for mask in (0x01, 0x20, 0xFF):
            flipped = bytearray(data)
            flipped[position] ^= mask
            with pytest.raises(BundleRejected) as raised:
                station.open(bytes(flipped))
            assert str(raised.value) == "bundle rejected"
            rejected += 1
    assert rejected == 3 * len(data)
    # Truncated and extended copies too.
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(BundleRejected):
            station.open(data[:cut])
    with pytest.raises(BundleRejected):
        station.open(data + b" ")
    # And the untouched bundle still opens: nothing above was recorded as opened.
    assert station.open(data).ok


def test_wrong_signer_is_rejected(sealers: dict[str, DomainSealer], station: Station) -> None:
    rogue = ec.generate_private_key(ec.SECP256R1())

    def rogue_sign(message: bytes) -> bytes:
        r, s = decode_dss_signature(rogue.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    doc = _doc(seal(sealers, card(14)))
    _resign(doc, 0, rogue_sign)
    with pytest.raises(BundleRejected):
        station.open(_encode(doc))


def test_a_section_signed_by_the_other_domain_is_rejected(
    sealers: dict[str, DomainSealer], sessions: dict[str, TokenSession], registry: Any, station: Station
) -> None:
    doc = _doc(seal(sealers, card(15)))
    assert doc["sections"][0]["body"]["domain"] == "bank"
    hrss_label = registry.active("hrss", KeyKind.SIGNING, "issuance").label
    _resign(doc, 0, lambda m: sessions["hrss"].sign_sha256(hrss_label, m))
    # Even with the hrss key id, a bank section is not accepted under the hrss key.
    doc["sections"][0]["signature"]["key_id"] = doc["sections"][1]["signature"]["key_id"]
    with pytest.raises(BundleRejected):
        station.open(_encode(doc))


def test_wrong_transport_key_is_rejected(
    sealers: dict[str, DomainSealer], station: Station, station_session: TokenSession
) -> None:
    data = seal(sealers, card(16))
    parsed = bundle.parse(data)
    section = parsed.sections[0]
    label = f"kms/{section.domain}/transport/{section.transport_key}/v{section.transport_key_version}"
    raw = station_session._session
    real = station_session._key(label)
    impostor = raw.generate_key(KeyType.AES, 256, store=False, label=label,
                                template={Attribute.UNWRAP: True, Attribute.EXTRACTABLE: False})
    cache_key = (ObjectClass.SECRET_KEY, label)
    station_session._keys[cache_key] = impostor
    try:
        with pytest.raises(BundleRejected):
            station.open(data)
    finally:
        station_session._keys[cache_key] = real
        impostor.destroy()
    assert [o for o in station_session.objects() if not o.token] == []
    assert station.open(data).ok  # the refusal did not burn the serial


def test_a_section_whose_signed_wrap_method_is_not_its_transport_keys_is_rejected(
    sealers: dict[str, DomainSealer], sessions: dict[str, TokenSession], registry: Any, station: Station,
    station_session: TokenSession, caplog: pytest.LogCaptureFixture
) -> None:
    """The wrap method is signed: a section that says SM4-ECB is refused by a station whose transport key for it is
    AES, although AES key wrap would unwrap its keys (the station once chose the method by the key alone)."""
    data = seal(sealers, card(18))
    doc = _doc(data)
    for index, section in enumerate(doc["sections"]):
        assert {k["wrap"] for k in section["body"]["keys"]} == {bundle.WRAP_ALGORITHM}
        domain = section["body"]["domain"]
        for key in section["body"]["keys"]:
            key["wrap"] = bundle.SM4_WRAP_ALGORITHM
        label = registry.active(domain, KeyKind.SIGNING, "issuance").label
        _resign(doc, index, lambda m, d=domain, lb=label: sessions[d].sign_sha256(lb, m))
    forged = _encode(doc)
    section = bundle.parse(forged).sections[0]
    label = f"kms/{section.domain}/transport/{section.transport_key}/v{section.transport_key_version}"
    assert station_session.transport_wrap(label) == bundle.WRAP_ALGORITHM
    with caplog.at_level(logging.INFO, logger="kms.station"), pytest.raises(BundleRejected):
        station.open(forged)
    reasons = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bundle rejected")]
    assert reasons == ["bundle rejected: the section's wrap method is not its transport key's"]
    results = list(station.open_many([forged]))
    assert len(results) == 1 and isinstance(results[0], BundleRejected)
    assert [o for o in station_session.objects() if not o.token] == []
    assert station.open(data).ok  # the refusals did not burn the serial


def test_a_station_of_another_bureau_rejects_the_bundle(
    sealers: dict[str, DomainSealer], station_session: TokenSession, station_config: Any, tmp_path: Path
) -> None:
    ledger = store.make_engine(f"sqlite:///{tmp_path / 'other.db'}")
    store.create_station_ledger(ledger)
    other = Station("station-b1", "bureau-b", ("hrss", "bank"), station_session,
                    TrustStore.load(station_config.trust), ledger, SystemClock())
    with pytest.raises(BundleRejected):
        other.open(seal(sealers, card(17)))


def test_a_station_not_registered_for_a_domain_rejects_its_section(
    sealers: dict[str, DomainSealer], station_session: TokenSession, station_config: Any, tmp_path: Path,
    registry: Any,
) -> None:
    ledger = store.make_engine(f"sqlite:///{tmp_path / 'hrss-only.db'}")
    store.create_station_ledger(ledger)
    hrss_only = Station("station-a1", "bureau-a", ("hrss",), station_session,
                        TrustStore.load(station_config.trust), ledger, SystemClock())
    with pytest.raises(BundleRejected):
        hrss_only.open(seal(sealers, card(18)))
    # A bundle of an HRSS-only profile opens there.
    from helpers import PROFILE

    from kms.cards.profiles import Profile

    hrss_profile = Profile(name="hrss-only", description="", source="test", domains={"hrss": PROFILE.keys("hrss")})
    sealer = DomainSealer("hrss", sealers["hrss"]._session, registry, hrss_profile, "bureau-a", SystemClock())
    hrss_bundle = bundle.assemble("AA" * 16, "card-hrss", {"hrss": sealer.seal_bytes(
        card(18, card_ref="card-hrss"), serial="AA" * 16, batch="B")})
    assert hrss_only.open(hrss_bundle).ok


def test_a_kcv_mismatch_is_reported_per_key_and_nothing_is_kept(
    sealers: dict[str, DomainSealer], sessions: dict[str, TokenSession], registry: Any, station: Station,
    station_session: TokenSession,
) -> None:
    doc = _doc(seal(sealers, card(19)))
    body = doc["sections"][0]["body"]
    body["keys"][1]["kcv"] = "000000" if body["keys"][1]["kcv"] != "000000" else "111111"
    label = registry.active("bank", KeyKind.SIGNING, "issuance").label
    _resign(doc, 0, lambda m: sessions["bank"].sign_sha256(label, m))
    data = _encode(doc)
    report = station.open(data, store=True)
    assert not report.ok
    assert not report.stored
    assert [k.name for k in report.keys if not k.match] == [body["keys"][1]["name"]]
    assert all(k.label is None for k in report.keys)
    assert not [o for o in station_session.objects() if o.label.startswith("card/card-000019/")]
    assert [o for o in station_session.objects() if not o.token] == []
    assert not station._seen(doc["serial"])


def test_trust_store_refuses_files_it_cannot_attribute(tmp_path: Path) -> None:
    from kms.errors import ConfigError

    with pytest.raises(ConfigError, match="no trusted signing keys"):
        TrustStore.load(tmp_path)
    (tmp_path / "someone.pem").write_text("x")
    with pytest.raises(ConfigError, match="named after their domain"):
        TrustStore.load(tmp_path)


#: Points of the SM2 curve: G and 2G (GB/T 32918.5).
_SM2_POINTS = {
    1: "32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7"
       "BC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0",
    2: "56CEFD60D7C87C000D58EF57FA73BA4D9C0DFA08C08A7331495C2E1DA3F2BD52"
       "31B7E7E6CC8189F668535CE0F8EAF1BD6DE84C182F6C8E716F780D3A970A23C3",
}


def _sm2_spki(seed: int = 1) -> bytes:
    """An SM2 public key's SubjectPublicKeyInfo: the point seed·G of the SM2 curve (seed 1 or 2)."""
    return bytes.fromhex("3059301306072A8648CE3D020106082A811CCF5501822D03420004" + _SM2_POINTS[seed])


def test_trust_store_refuses_an_sm2_key_whose_point_is_not_on_the_curve(tmp_path: Path) -> None:
    from kms.errors import ConfigError

    off_curve = _sm2_spki()[:-1] + bytes([_sm2_spki()[-1] ^ 1])
    (tmp_path / "bank-issuance-sm2-v1.pem").write_bytes(spki_pem(off_curve))
    with pytest.raises(ConfigError, match=r"bank-issuance-sm2-v1\.pem: an SM2 public key whose point is not on"):
        TrustStore.load(tmp_path)
    with pytest.raises(ConfigError, match="trusted key K: an SM2 public key whose point is not on the SM2 curve"):
        TrustStore.from_spkis({"K": ("bank", off_curve)})


def test_trust_store_reads_sm2_keys_by_their_der_and_keeps_p256_as_before(tmp_path: Path) -> None:
    from kms.errors import ConfigError

    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    p256_der = p256.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert spki_pem(p256_der) == p256.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    assert is_sm2_spki(_sm2_spki()) and not is_sm2_spki(p256_der) and not is_sm2_spki(_sm2_spki()[:-1])
    (tmp_path / "bank-issuance-v1.pem").write_bytes(spki_pem(p256_der))
    (tmp_path / "bank-issuance-sm2-v1.pem").write_bytes(spki_pem(_sm2_spki()))
    trust = TrustStore.load(tmp_path)
    assert trust.spkis() == {bundle.key_id(p256_der): ("bank", p256_der),
                             bundle.key_id(_sm2_spki()): ("bank", _sm2_spki())}
    assert TrustStore.from_spkis(trust.spkis()).spkis() == trust.spkis()
    # another curve (P-384) is neither kind: a configuration error naming the file
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(Encoding.DER,
                                                                             PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "hrss-issuance-v1.pem").write_bytes(spki_pem(p384))
    with pytest.raises(ConfigError, match=r"hrss-issuance-v1\.pem: not an ECDSA P-256 or SM2 public key"):
        TrustStore.load(tmp_path)


def test_a_section_is_verified_only_with_a_trusted_key_of_its_own_domain_and_algorithm(tmp_path: Path) -> None:
    """An SM2 section is left to the station's token (pending); naming the algorithm of the other kind of key, or
    a key of the other domain, refuses it before any verification."""
    (tmp_path / "bank-issuance-sm2-v1.pem").write_bytes(spki_pem(_sm2_spki()))
    (tmp_path / "hrss-issuance-sm2-v1.pem").write_bytes(spki_pem(_sm2_spki(2)))
    trust = TrustStore.load(tmp_path)

    def section(domain: str, spki: bytes, algorithm: str) -> bundle.ParsedSection:
        return bundle.ParsedSection(
            body={}, domain=domain, bureau="bureau-a", serial="S", card_ref="c", transport_key="bureau-a",
            transport_key_version=1, transport_key_kcv="", domains=[domain], key_id=bundle.key_id(spki),
            signature=bytes(64), keys=(), body_bytes=b"{}", signature_algorithm=algorithm)

    pending: list[Any] = []
    assert trust.verify(section("bank", _sm2_spki(), "SM2-SM3"), pending)
    assert pending == [(_sm2_spki(), bundle.SIGNING_CONTEXT + b"{}", bytes(64))]
    assert not trust.verify(section("bank", _sm2_spki(), "SM2-SM3"))  # nobody to verify it: refused
    assert not trust.verify(section("bank", _sm2_spki(), "ECDSA-P256-SHA256"), pending)
    assert not trust.verify(section("bank", _sm2_spki(2), "SM2-SM3"), pending)  # the hrss key
    assert len(pending) == 1


def test_raw_pkcs11_cannot_read_a_stored_card_key(
    sealers: dict[str, DomainSealer], station: Station, station_session: TokenSession
) -> None:
    c = card(20, card_ref=f"raw-{secrets.token_hex(4)}")
    report = station.open(seal(sealers, c), store=True)
    label = report.keys[0].label
    assert label is not None
    key = station_session._session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
    with pytest.raises(p11e.AttributeSensitive):
        key[Attribute.VALUE]
    for k in report.keys:
        assert k.label is not None
        station_session.destroy(k.label)


def test_a_bundle_stripped_of_a_section_is_rejected_and_the_genuine_one_still_opens(
    sealers: dict[str, DomainSealer], station: Station
) -> None:
    data = seal(sealers, card(30))
    doc = _doc(data)
    for kept in (0, 1):
        stripped = dict(doc, sections=[doc["sections"][kept]])
        with pytest.raises(BundleRejected):
            station.open(_encode(stripped))
    assert station.open(data).ok


def test_verify_only_records_nothing_so_the_bundle_can_be_opened_later(
    sealers: dict[str, DomainSealer], station: Station, station_session: TokenSession
) -> None:
    data = seal(sealers, card(31))
    first = station.open(data, verify_only=True)
    again = station.open(data, verify_only=True)
    assert first.ok and again.ok and not first.stored
    assert not station._seen(first.serial)
    stored = station.open(data, store=True)
    assert stored.ok and stored.stored and station._seen(first.serial)
    with pytest.raises(BundleRejected):
        station.open(data, verify_only=True)
    for key in stored.keys:
        assert key.label is not None
        station_session.destroy(key.label)


def test_a_second_bundle_for_a_card_whose_keys_are_stored_is_refused_and_not_recorded(
    sealers: dict[str, DomainSealer], station: Station, station_session: TokenSession
) -> None:
    from kms.errors import AlreadyExists

    c = card(32)
    first, second = seal(sealers, c), seal(sealers, c)
    report = station.open(first, store=True)
    with pytest.raises(AlreadyExists, match="already stored at this station"):
        station.open(second, store=True)
    assert not station._seen(bundle.parse(second).serial)
    assert len([o for o in station_session.objects() if o.label.startswith(f"card/{c.card_ref}/")]) == 15
    for key in report.keys:
        assert key.label is not None
        station_session.destroy(key.label)
    assert station.open(second, store=True).ok  # once the old keys are gone
    for o in station_session.objects():
        if o.label.startswith(f"card/{c.card_ref}/"):
            station_session.destroy(o.label)


# -- open_many: one ledger commit per chunk ------------------------------------------------------------------------


def test_open_many_reports_each_bundle_in_order_and_records_every_good_one(
    sealers: dict[str, DomainSealer], station: Station, station_session: TokenSession
) -> None:
    good = [seal(sealers, card(40 + i)) for i in range(5)]
    already = good[1]
    station.open(already)
    doc = _doc(good[3])
    doc["sections"][0]["body"]["card_ref"] = "card-999999"  # the signature no longer covers it
    tampered = _encode(doc)
    stream = [good[0], already, good[2], tampered, good[4], good[0]]  # good[0] twice: a replay within a chunk
    results = list(station.open_many(stream, chunk=len(stream)))
    assert len(results) == len(stream)
    assert [isinstance(r, OpenReport) for r in results] == [True, False, True, False, True, False]
    opened = [r for r in results if isinstance(r, OpenReport)]
    assert [r.card_ref for r in opened] == ["card-000040", "card-000042", "card-000044"]
    assert all(r.ok and not r.stored and len(r.keys) == 15 for r in opened)
    assert all(station._seen(bundle.parse(d).serial) for d in (good[0], already, good[2], good[4]))
    assert not station._seen(bundle.parse(good[3]).serial)
    assert [o for o in station_session.objects() if not o.token] == []
    with pytest.raises(BundleRejected):
        station.open(good[2])  # what open_many recorded is a replay for open too


def test_open_many_records_no_bundle_whose_kcv_does_not_match(
    sealers: dict[str, DomainSealer], station: Station, sessions: dict[str, TokenSession], registry: Any
) -> None:
    doc = _doc(seal(sealers, card(50)))
    body = doc["sections"][0]["body"]
    body["keys"][0]["kcv"] = "000000" if body["keys"][0]["kcv"] != "000000" else "111111"
    label = registry.active("bank", KeyKind.SIGNING, "issuance").label
    _resign(doc, 0, lambda m: sessions["bank"].sign_sha256(label, m))
    fine = seal(sealers, card(51))
    first, second = station.open_many([_encode(doc), fine])
    assert isinstance(first, OpenReport) and not first.ok and not first.stored
    assert isinstance(second, OpenReport) and second.ok
    assert not station._seen(doc["serial"])
    assert station._seen(bundle.parse(fine).serial)


def test_open_many_stops_on_a_token_failure_with_nothing_of_that_chunk_recorded(
    sealers: dict[str, DomainSealer], station: Station, station_session: TokenSession,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from kms.errors import HsmError

    bundles = [seal(sealers, card(60 + i)) for i in range(4)]
    unwrap = station_session.unwrap_card_keys
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> Any:  # fault injection: the token fails on bundle 4's first section
        calls["n"] += 1
        if calls["n"] == 7:
            raise HsmError("token went away", retryable=True)
        return unwrap(*args, **kwargs)

    monkeypatch.setattr(station_session, "unwrap_card_keys", failing)
    results = station.open_many(bundles, chunk=2)
    first, second = next(results), next(results)
    assert isinstance(first, OpenReport) and first.ok and isinstance(second, OpenReport) and second.ok
    with pytest.raises(HsmError):
        next(results)
    serials = [bundle.parse(d).serial for d in bundles]
    assert [station._seen(s) for s in serials] == [True, True, False, False]
    assert [o for o in station_session.objects() if not o.token] == []


def test_open_many_opens_what_a_failing_source_gave_before_raising_its_error(
    sealers: dict[str, DomainSealer], station: Station, station_session: TokenSession
) -> None:
    bundles = [seal(sealers, card(70 + i)) for i in range(3)]

    def source() -> Iterator[bytes]:  # a stream that breaks after three bundles, mid-chunk
        yield from bundles
        raise OSError("stream broke")

    results = station.open_many(source(), chunk=32)
    opened = [next(results) for _ in bundles]
    assert all(isinstance(r, OpenReport) and r.ok for r in opened)
    with pytest.raises(OSError, match="stream broke"):
        next(results)
    assert all(station._seen(bundle.parse(d).serial) for d in bundles)
    assert [o for o in station_session.objects() if not o.token] == []


def test_open_many_checks_ahead_in_a_checking_process_and_refuses_what_it_refuses(
    sealers: dict[str, DomainSealer], station: Station, station_session: TokenSession,
    caplog: pytest.LogCaptureFixture
) -> None:
    good = [seal(sealers, card(80 + i)) for i in range(4)]
    doc = _doc(good[3])
    created = doc["sections"][1]["body"]["created_at"]
    doc["sections"][1]["body"]["created_at"] = created.replace(created[:4], str(int(created[:4]) - 1), 1)  # unsigned
    stream = [good[0], good[1], good[2], _encode(doc), good[1]]  # chunks of 2: the 2nd and 3rd are checked ahead
    with caplog.at_level(logging.INFO, logger="kms.station"):
        results = list(station.open_many(stream, chunk=2))
    assert station._checker is not None  # the checking process did chunks 2 and 3
    assert [isinstance(r, OpenReport) and r.ok for r in results] == [True, True, True, False, False]
    assert all(isinstance(r, BundleRejected) for r in results[3:])
    # the reasons reach this station's log, not only the checking process's
    reasons = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bundle rejected")]
    assert reasons == ["bundle rejected: signature", "bundle rejected: replay"]
    assert [station._seen(bundle.parse(d).serial) for d in good] == [True, True, True, False]
    assert [o for o in station_session.objects() if not o.token] == []
    station.close()
    assert station._checker is None


def test_open_many_checks_here_when_the_checking_process_dies(
    sealers: dict[str, DomainSealer], station: Station
) -> None:
    good = [seal(sealers, card(90 + i)) for i in range(5)]
    doc = _doc(good[4])
    doc["sections"][0]["body"]["card_ref"] = "card-999998"
    stream = [*good[:4], _encode(doc)]
    results = station.open_many(stream, chunk=1)
    first = next(results)  # chunk 2 is being checked ahead: the checking process is up
    assert isinstance(first, OpenReport) and first.ok
    assert station._checker is not None
    pid = station._checker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # fault injection: the checking process is killed
    rest = list(results)
    assert [isinstance(r, OpenReport) and r.ok for r in rest] == [True, True, True, False]
    assert station._checker is None and not station._check_ahead  # the rest was checked in this process
    assert [station._seen(bundle.parse(d).serial) for d in good] == [True, True, True, True, False]


def test_without_check_ahead_no_process_is_started(
    sealers: dict[str, DomainSealer], station: Station, station_session: TokenSession
) -> None:
    alone = Station(station.name, station.bureau, station.domains, station_session, station._trust,
                    station._ledger, SystemClock(), check_ahead=False)
    results = list(alone.open_many([seal(sealers, card(100 + i)) for i in range(3)], chunk=1))
    assert all(isinstance(r, OpenReport) and r.ok for r in results)
    assert alone._checker is None


def test_a_later_open_many_checks_its_first_chunk_partly_in_the_running_checking_process(
    sealers: dict[str, DomainSealer], station: Station, station_session: TokenSession,
    caplog: pytest.LogCaptureFixture
) -> None:
    first = [seal(sealers, card(120 + i)) for i in range(2)]
    assert all(isinstance(r, OpenReport) and r.ok for r in station.open_many(first, chunk=1))
    assert station._checker is not None  # running: the next open_many's first chunk is split with it
    good = [seal(sealers, card(122 + i)) for i in range(13)]
    doc = _doc(good[12])
    created = doc["sections"][1]["body"]["created_at"]
    doc["sections"][1]["body"]["created_at"] = created.replace(created[:4], str(int(created[:4]) - 1), 1)  # unsigned
    # one chunk of 16: bundles 0-3 checked here, 4-11 and 12-15 in the checking process; replays across the parts
    # (within the chunk, and of the earlier open_many) are refused like any other
    chunk = [*good[:12], _encode(doc), good[1], good[5], first[0]]
    submitted = []
    submit = station._checker.submit

    def counted(block: list[bytes]) -> int:  # the parts sent to the checking process, counted
        submitted.append(len(block))
        return submit(block)

    station._checker.submit = counted  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="kms.station"):
        results = list(station.open_many(chunk, chunk=16))
    assert submitted == [8, 4]
    assert [isinstance(r, OpenReport) and r.ok for r in results] == [True] * 12 + [False] * 4
    reasons = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bundle rejected")]
    assert reasons == ["bundle rejected: signature"] + ["bundle rejected: replay"] * 3
    assert [station._seen(bundle.parse(d).serial) for d in good] == [True] * 12 + [False]
    assert [o for o in station_session.objects() if not o.token] == []


def test_a_checking_process_opens_no_token_for_a_trust_store_without_sm2_keys(
    sealers: dict[str, DomainSealer], station: Station, station_session: TokenSession,
    station_config: config.StationConfig, caplog: pytest.LogCaptureFixture
) -> None:
    # an opener that would fail (no such token): never called, since ECDSA signatures need no token
    no_token = functools.partial(runtime.open_station, dataclasses.replace(station_config, token="no-such-token"))
    with Station(station.name, station.bureau, station.domains, station_session, station._trust, station._ledger,
                 SystemClock(), checking_token=no_token) as ahead, caplog.at_level(logging.INFO, logger="kms.station"):
        results = list(ahead.open_many([seal(sealers, card(105 + i)) for i in range(3)], chunk=1))
        assert ahead._checker is not None
    assert all(isinstance(r, OpenReport) and r.ok for r in results)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_open_many_opens_both_chunks_read_when_the_source_fails_in_the_second(
    sealers: dict[str, DomainSealer], station: Station
) -> None:
    bundles = [seal(sealers, card(110 + i)) for i in range(3)]

    def source() -> Iterator[bytes]:  # breaks while the 2nd chunk is read, the 1st not opened yet (read ahead)
        yield from bundles
        raise OSError("stream broke")

    results = station.open_many(source(), chunk=2)
    opened = [next(results) for _ in bundles]
    assert all(isinstance(r, OpenReport) and r.ok for r in opened)
    with pytest.raises(OSError, match="stream broke"):
        next(results)
    assert all(station._seen(bundle.parse(d).serial) for d in bundles)
