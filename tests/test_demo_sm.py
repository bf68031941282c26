"""The SM card profiles end to end (issue 14): a development home on the development SM token (`make sm-token`),
`kms serve` over mutual TLS issuing batches under dual-app-sm (SM4 everywhere, sections signed with SM2) and
dual-app-mixed (3DES HRSS, SM4 bank), a station opening every bundle in its own token (SM2 verified there, SM4 keys
unwrapped there, every KCV checked), and the refusals: a section signed by the other domain's SM2 key, a section
whose algorithm is not its key's, a tampered byte. Bundles of the plain dual-app profile stay ECDSA and AES-KWP.
Every card key is also derived again in software from the known master keys (the recipes' derivation data through
cryptography's 3DES and SM4 block ciphers) and its KCV compared with what the station computed.

The development token is SoftHSM2 with the project's own patch (deploy/softhsm2-sm/): it checks kms's PKCS#11 calls
for SM4/SM2/SM3 under the codes of the `softhsm2-sm-dev` mechanism profile, not compatibility with any vendor's HSM.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from helpers import ROOT, card, kms, requires_sm_token, service_client

from kms import bundle, config, runtime, store
from kms.cards import profiles, reference
from kms.cards.cardid import CardIdentity
from kms.cards.profiles import Profile
from kms.clock import SystemClock
from kms.dev.ceremonies import open_batch
from kms.dev.home import SM_MECHANISMS, Home, init_home, profile_file
from kms.errors import BundleRejected
from kms.hsm.types import Algorithm, DeriveStep, SignatureAlgorithm
from kms.identity import Principal
from kms.issuance.sealer import signing_key_name
from kms.metrics import take_hsm_calls
from kms.registry import DOMAINS, KeyKind
from kms.server.serve import Service
from kms.station import OpenReport, Station, TrustStore

pytestmark = [pytest.mark.hsm, pytest.mark.service]

PROFILES = ("dual-app", "dual-app-sm", "dual-app-mixed")
ALICE = Principal("officer", "alice", domain="hrss")
STATION = "station-a1"


def _profiles() -> dict[str, Profile]:
    return {name: profiles.load(profile_file(name)) for name in PROFILES}


def _known_masters() -> dict[tuple[str, str], bytes]:
    """A known value for every master key of the three profiles, so that the tests can derive card keys in
    software."""
    known = {}
    for profile in _profiles().values():
        for domain in profile.domains:
            for spec in profile.keys(domain):
                known.setdefault((domain, spec.master_key), secrets.token_bytes(spec.algorithm.length))
    return known


MASTERS = _known_masters()


@pytest.fixture(scope="module")
def sm_home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    return init_home(tmp_path_factory.mktemp("sm-home"), card_profiles=PROFILES, master_keys=MASTERS)


@pytest.fixture(scope="module")
def sm_service(sm_home: Home) -> Iterator[Service]:
    svc = Service(sm_home.config, listen="127.0.0.1:0")
    yield svc
    svc.stop(grace=0)


@pytest.fixture(scope="module")
def sm_station(sm_home: Home, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Station]:
    cfg = config.load_station(sm_home.station_config(STATION))
    ledger = store.make_engine(f"sqlite:///{tmp_path_factory.mktemp('sm-ledger') / 'ledger.db'}")
    store.create_station_ledger(ledger)
    with runtime.open_station(cfg) as session, Station(
            cfg.name, cfg.bureau, cfg.domains, session, TrustStore.load(cfg.trust), ledger, SystemClock(),
            checking_token=functools.partial(runtime.open_station, cfg)) as station:
        yield station


def _issue(sm_home: Home, sm_service: Service, profile: str, cards: list[CardIdentity], batch: str
           ) -> list[bytes]:
    with service_client(sm_home, sm_service, ALICE) as officer:
        open_batch(sm_home, sm_service.port, officer, batch, "bureau-a", profile, cards)
    with service_client(sm_home, sm_service, STATION) as station:
        received = list(station.stream_batch(batch, per_message=4))
    assert [b.card_ref for b in received] == [c.card_ref for c in cards]
    return [b.data for b in received]


# -- deriving card keys again in software, from the known master keys -----------------------------------------------


def _encrypt(algorithm: str, key: bytes, data: bytes) -> bytes:
    """ECB encryption with the block cipher primitive (cryptography's, through kms.cards.reference)."""
    return reference.sm4_ecb(key, data) if algorithm == "SM4" else reference.tdes_ecb(key, data)


def _software_kcv(spec: profiles.KeySpec, domain: str, c: CardIdentity) -> str:
    key, parent_algorithm = MASTERS[(domain, spec.master_key)], None
    for step, data in spec.recipe.steps(c):
        parent_algorithm = "SM4" if step is DeriveStep.SM4_ECB else "DES2"
        key = _encrypt(parent_algorithm, key, data)
    assert parent_algorithm is not None
    zero = bytes(16 if spec.algorithm is Algorithm.SM4 else 8)
    return _encrypt(spec.algorithm.value, key, zero)[:3].hex().upper()


def _check_bundle(data: bytes, report: OpenReport, profile: Profile, c: CardIdentity) -> None:
    """Every key's KCV matched at the station and equals the software derivation; each section's algorithm, wrap
    and KCV methods are what the profile says."""
    assert report.ok and report.keys
    parsed = bundle.parse(data)
    assert [s.domain for s in parsed.sections] == sorted(profile.domains)
    for section in parsed.sections:
        signature = profile.signature(section.domain)
        assert section.signature_algorithm == signature.value
        wrap = bundle.WRAP_BY_TRANSPORT[profile.transport(section.domain).value]
        specs = profile.keys(section.domain)
        assert [k.name for k in section.keys] == [s.name for s in specs]
        for key, spec in zip(section.keys, specs, strict=True):
            assert key.wrap == wrap
            assert key.algorithm == spec.algorithm.value
            assert key.kcv_method == bundle.KCV_METHODS[spec.algorithm.value]
            assert len(key.wrapped) == (16 if wrap == "SM4-ECB" else 24)
    by_name = {(k.domain, k.name): k for k in report.keys}
    for domain in profile.domains:
        for spec in profile.keys(domain):
            got = by_name[(domain, spec.name)]
            assert got.match
            assert got.kcv_computed == _software_kcv(spec, domain, c), (domain, spec.name)


def _other(domain: str) -> str:
    return next(d for d in DOMAINS if d != domain)


def _openssl_verifies(public_pem: Path, message: bytes, signature: bytes, tmp_path: Path) -> bool:
    """OpenSSL 3's verdict on an SM2-SM3 signature (r ‖ s) of ``message``, with GM/T 0009's default identity
    (OpenSSL 3.0 uses an empty one unless told)."""
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "sig.der").write_bytes(encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                                            int.from_bytes(signature[32:], "big")))
    result = subprocess.run(
        ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(public_pem), "-rawin", "-digest", "sm3",
         "-pkeyopt", "distid:1234567812345678", "-in", str(tmp_path / "msg"), "-sigfile", str(tmp_path / "sig.der")],
        capture_output=True, text=True, check=False)
    return result.returncode == 0 and "Signature Verified Successfully" in result.stdout


# -- the home ------------------------------------------------------------------------------------------------------


@requires_sm_token
def test_the_sm_home_names_the_sm_token_and_holds_the_keys_the_profiles_need(sm_home: Home) -> None:
    from kms.dev.smtoken import sm_module

    for path in (sm_home.config, sm_home.station_config(STATION), sm_home.station_config("station-b1")):
        hsm = yaml.safe_load(path.read_text(encoding="utf-8"))["hsm"]
        assert hsm["mechanisms"] == SM_MECHANISMS
        assert hsm["module"] == sm_module()
    cfg = config.load(sm_home.config)
    registry = runtime.registry(cfg, SystemClock())
    loaded = _profiles()
    for domain in DOMAINS:
        for profile in loaded.values():
            for spec in profile.keys(domain):
                assert registry.active(domain, KeyKind.MASTER, spec.master_key).algorithm == spec.algorithm.value
        transports = {r.algorithm for r in registry.versions(domain, KeyKind.TRANSPORT, "bureau-a")}
        assert transports == {p.transport(domain).value for p in loaded.values()}
        for signature in {p.signature(domain) for p in loaded.values()}:
            record = registry.active(domain, KeyKind.SIGNING, signing_key_name(signature))
            assert record.public_key is not None
            published = sm_home.path / "trust" / f"{domain}-{record.name}-v{record.version}.pem"
            assert published.is_file()
    # the station trusts both kinds of key of both domains
    trusted = TrustStore.load(sm_home.path / "trust").spkis()
    assert {d for d, _ in trusted.values()} == set(DOMAINS) and len(trusted) == 4


# -- issuing and opening -------------------------------------------------------------------------------------------


@requires_sm_token
@pytest.mark.parametrize("name", ["dual-app-sm", "dual-app-mixed", "dual-app"])
def test_a_batch_is_issued_over_the_service_and_opened_at_the_station(
        sm_home: Home, sm_service: Service, sm_station: Station, name: str, tmp_path: Path) -> None:
    profile = _profiles()[name]
    cards = [card(i, card_ref=f"{name}-{i:04d}") for i in range(6)]
    bundles = _issue(sm_home, sm_service, profile.name, cards, f"B-{name}")
    results = list(sm_station.open_many(bundles, chunk=4))  # two chunks: the second checked ahead
    assert all(isinstance(r, OpenReport) for r in results), results
    for data, report, c in zip(bundles, results, cards, strict=True):
        assert isinstance(report, OpenReport)
        _check_bundle(data, report, profile, c)
    for data in bundles[:2]:  # replays
        with pytest.raises(BundleRejected):
            sm_station.open(data)
    # an independent implementation agrees: each SM2 section verifies with OpenSSL 3 against the published key
    for section in bundle.parse(bundles[0]).sections:
        if section.signature_algorithm == "SM2-SM3":
            published = sm_home.path / "trust" / f"{section.domain}-issuance-sm2-v1.pem"
            assert _openssl_verifies(published, section.signed_bytes, section.signature, tmp_path)
            other = sm_home.path / "trust" / f"{_other(section.domain)}-issuance-sm2-v1.pem"
            assert not _openssl_verifies(other, section.signed_bytes, section.signature, tmp_path)


@requires_sm_token
def test_the_plain_profile_on_the_sm_token_seals_what_it_always_sealed(
        sm_home: Home, sm_service: Service) -> None:
    [data] = _issue(sm_home, sm_service, "dual-app-v1", [card(50, card_ref="plain-0050")], "B-plain")
    parsed = bundle.parse(data)
    assert {s.signature_algorithm for s in parsed.sections} == {"ECDSA-P256-SHA256"}
    assert {(k.algorithm, k.wrap, k.kcv_method, len(k.wrapped)) for s in parsed.sections for k in s.keys} == {
        ("DES2", "AES-KWP", "TDES-ECB-ZERO8-3", 24)}


# -- refusals ------------------------------------------------------------------------------------------------------


def _resigned(data: bytes, domain: str, signer_domain: str, signature: SignatureAlgorithm, sm_home: Home,
              label_algorithm: str | None = None) -> bytes:
    """``data`` with ``domain``'s section signed again, in ``signer_domain``'s token, by its issuance key of
    ``signature``, its key id named; ``label_algorithm`` replaces the algorithm the section names."""
    cfg = config.load(sm_home.config)
    registry = runtime.registry(cfg, SystemClock())
    record = registry.active(signer_domain, KeyKind.SIGNING, signing_key_name(signature))
    assert record.public_key is not None
    parsed = bundle.parse(data)
    sections = {}
    with runtime.open_domain(cfg, signer_domain) as session:
        for s in parsed.sections:
            if s.domain != domain:
                sections[s.domain] = bundle.encode_signed_section(s.body_bytes, s.key_id, s.signature,
                                                                  s.signature_algorithm)
                continue
            if signature is SignatureAlgorithm.SM2_SM3:
                value = session.sign(record.label, s.signed_bytes, signature)
            else:
                value = session.sign_sha256(record.label, s.signed_bytes)
            sections[s.domain] = bundle.encode_signed_section(
                s.body_bytes, bundle.key_id(record.public_key), value, label_algorithm or signature.value)
    return bundle.assemble(parsed.serial, parsed.card_ref, sections)


@requires_sm_token
def test_forged_tampered_and_mislabelled_sm_sections_are_refused_and_the_genuine_bundle_still_opens(
        sm_home: Home, sm_service: Service, sm_station: Station) -> None:
    cards = [card(60, card_ref="sm-forged-0060")]
    [genuine] = _issue(sm_home, sm_service, "dual-app-sm-v1", cards, "B-sm-forged")
    sm2, ecdsa = SignatureAlgorithm.SM2_SM3, SignatureAlgorithm.ECDSA_P256_SHA256
    # the genuine signature, re-made: a control that the re-signing itself is sound
    control = _resigned(genuine, "bank", "bank", sm2, sm_home)
    assert bundle.parse(control).sections[0].key_id == bundle.parse(genuine).sections[0].key_id
    forged = {
        "bank section signed by the hrss SM2 key": _resigned(genuine, "bank", "hrss", sm2, sm_home),
        "hrss section signed by the bank SM2 key": _resigned(genuine, "hrss", "bank", sm2, sm_home),
        "SM2 signature labelled ECDSA": _resigned(genuine, "bank", "bank", sm2, sm_home, "ECDSA-P256-SHA256"),
        "ECDSA signature labelled SM2": _resigned(genuine, "bank", "bank", ecdsa, sm_home, "SM2-SM3"),
    }
    body = bundle.parse(genuine).sections[0].body_bytes
    at = genuine.index(body) + body.index(b'"kcv":"') + len(b'"kcv":"')  # a hex digit of the first key's KCV
    tampered = bytearray(genuine)
    tampered[at] = ord("0") if tampered[at] != ord("0") else ord("1")
    forged["a KCV digit changed"] = bytes(tampered)
    sig_at = genuine.index(b'"value":"') + len(b'"value":"')
    flipped = bytearray(genuine)
    flipped[sig_at] = ord("0") if flipped[sig_at] != ord("0") else ord("1")
    forged["an SM2 signature digit changed"] = bytes(flipped)
    for name, data in forged.items():
        assert data != genuine, name
        with pytest.raises(BundleRejected):
            sm_station.open(data, verify_only=True)
        results = list(sm_station.open_many([data]))
        assert len(results) == 1 and isinstance(results[0], BundleRejected), name
    report = sm_station.open(control)  # refusals record nothing: the (re-signed) genuine bundle still opens
    _check_bundle(control, report, _profiles()["dual-app-sm"], cards[0])


# -- review of issue 14: no key material in what SM issuing and opening shows; the checked-ahead path; a station
# -- whose mechanism profile lacks SM2


def _clear_keys(profile_name: str, c: CardIdentity) -> list[str]:
    """Every key value a card's derivations pass through (intermediate and card keys), in hex, from the known
    master keys."""
    profile = _profiles()[profile_name]
    values = []
    for domain in profile.domains:
        for spec in profile.keys(domain):
            key = MASTERS[(domain, spec.master_key)]
            for step, data in spec.recipe.steps(c):
                key = _encrypt("SM4" if step is DeriveStep.SM4_ECB else "DES2", key, data)
                values.append(key.hex().upper())
    return values


def _secrets(home: Home) -> list[str]:
    values = [p.read_text().strip() for p in (home.path / "pins").iterdir()]
    values += [v.hex().upper() for v in MASTERS.values()]
    return [v for v in values if v]


def _clean(text: str, secrets: list[str]) -> None:
    upper = text.upper()
    for secret in secrets:
        assert secret.upper() not in upper


@requires_sm_token
@pytest.mark.parametrize("name", ["dual-app-sm", "dual-app-mixed"])
def test_sm_bundles_their_opening_and_refusals_hold_no_key_material(
        sm_home: Home, sm_service: Service, sm_station: Station, name: str, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    cards = [card(70 + i, card_ref=f"canary-{name}-{i}") for i in range(2)]
    bundles = _issue(sm_home, sm_service, _profiles()[name].name, cards, f"B-canary-{name}")
    secrets = _secrets(sm_home) + [k for c in cards for k in _clear_keys(name, c)]
    # a KCV mismatch: the signed KCV of a key changed and the section signed again by its own key
    parsed = bundle.parse(bundles[1])
    doc = json.loads(bundles[1])
    section = next(s for s in doc["sections"] if s["body"]["domain"] == "bank")
    section["body"]["keys"][0]["kcv"] = "000000"
    body = bundle.canonical(section["body"])
    sections = {s.domain: bundle.encode_signed_section(s.body_bytes, s.key_id, s.signature, s.signature_algorithm)
                for s in parsed.sections}
    sections["bank"] = bundle.encode_signed_section(body, section["signature"]["key_id"], bytes(64),
                                                    section["signature"]["algorithm"])
    unsigned = bundle.assemble(parsed.serial, parsed.card_ref, sections)
    resigned = _resigned(unsigned, "bank", "bank", SignatureAlgorithm.SM2_SM3, sm_home)
    text = ""
    for data in bundles[:1]:
        report = sm_station.open(data)
        assert report.ok
        text += json.dumps(report.as_json())
    mismatch = sm_station.open(resigned)
    assert not mismatch.ok
    text += json.dumps(mismatch.as_json())
    with pytest.raises(BundleRejected) as raised:
        sm_station.open(unsigned)
    text += str(raised.value)
    text += "\n".join(r.getMessage() for r in caplog.records)
    text += "".join(b.decode() for b in bundles)
    _clean(text, secrets)


@requires_sm_token
def test_kms_bundle_open_of_sm_bundles_prints_no_key_material(
        sm_home: Home, sm_service: Service, tmp_path: Path) -> None:
    cards = [card(80, card_ref="canary-cli-0080")]
    [data] = _issue(sm_home, sm_service, "dual-app-sm-v1", cards, "B-canary-cli")
    out = tmp_path / "bundles"
    out.mkdir()
    (out / "c.kmsb").write_bytes(data)
    text = ""
    # opened (verify only) as JSON and as text, and refused by another bureau's station
    for station, extra in ((STATION, ["--json"]), (STATION, []), ("station-b1", [])):
        result = subprocess.run(
            [sys.executable, "-m", "kms.cli", "-v", "bundle", "open", "--station-config",
             str(sm_home.station_config(station)), "--verify-only", *extra, str(out)],
            capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ))
        text += result.stdout + result.stderr
    assert "rejected" in text.lower() and "udk-ac" in text
    _clean(text, _secrets(sm_home) + _clear_keys("dual-app-sm", cards[0]))


@requires_sm_token
def test_a_forged_sm2_section_is_refused_on_the_checked_ahead_path_of_open_many(
        sm_home: Home, sm_service: Service, sm_station: Station) -> None:
    cards = [card(90 + i, card_ref=f"ahead-{i}") for i in range(3)]
    bundles = _issue(sm_home, sm_service, "dual-app-sm-v1", cards, "B-ahead")
    forged = _resigned(bundles[2], "bank", "hrss", SignatureAlgorithm.SM2_SM3, sm_home)
    # chunk=1: the first bundle is checked here, the next ones in the checking process (SM2 signatures verified
    # there, in a session of its own on the station's token)
    results = list(sm_station.open_many([bundles[0], bundles[1], forged], chunk=1))
    assert isinstance(results[0], OpenReport) and results[0].ok
    assert isinstance(results[1], OpenReport) and results[1].ok
    assert isinstance(results[2], BundleRejected)
    assert sm_station.open(bundles[2]).ok  # the refusal recorded nothing


def _flipped(data: bytes) -> bytes:
    """``data`` with a hex digit of its first section's signature changed: the key fits, C_Verify says no."""
    at = data.index(b'"value":"') + len(b'"value":"')
    flipped = bytearray(data)
    flipped[at] = ord("0") if flipped[at] != ord("0") else ord("1")
    return bytes(flipped)


def _verifies_here(results: Iterator[OpenReport | BundleRejected]) -> tuple[list[OpenReport | BundleRejected], int]:
    """The results, and how many signatures this process verified in its token meanwhile (the HSM port's timings)."""
    take_hsm_calls()
    taken = list(results)
    return taken, sum(verb == "verify" for verb, _, _ in take_hsm_calls())


@requires_sm_token
def test_open_many_verifies_sm2_signatures_in_its_checking_process_with_a_token_session_of_its_own(
        sm_home: Home, sm_service: Service, sm_station: Station, caplog: pytest.LogCaptureFixture) -> None:
    cards = [card(100 + i, card_ref=f"checker-sm2-{i}") for i in range(4)]
    bundles = _issue(sm_home, sm_service, "dual-app-sm-v1", cards, "B-checker-sm2")
    forged = _flipped(bundles[3])
    with caplog.at_level(logging.INFO, logger="kms.station"):
        results, here = _verifies_here(sm_station.open_many([*bundles[:3], forged], chunk=2))
    assert [isinstance(r, OpenReport) and r.ok for r in results] == [True, True, True, False]
    assert isinstance(results[3], BundleRejected)
    # the first chunk was checked here (2 bundles, 2 SM2 sections each); the second in the checking process
    assert here == 4
    assert "bundle rejected: signature" in [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sm_station.open(bundles[3]).ok  # the refusal recorded nothing


@requires_sm_token
def test_open_many_verifies_sm2_here_and_says_so_when_its_checking_process_cannot_open_the_token(
        sm_home: Home, sm_service: Service, sm_station: Station, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    cfg = config.load_station(sm_home.station_config(STATION))
    ledger = store.make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.create_station_ledger(ledger)
    # fault injection: the checking process's opener names a token that is not there
    no_token = functools.partial(runtime.open_station, dataclasses.replace(cfg, token="no-such-token"))
    cards = [card(110 + i, card_ref=f"checker-fallback-{i}") for i in range(4)]
    bundles = _issue(sm_home, sm_service, "dual-app-sm-v1", cards, "B-checker-fallback")
    forged = _flipped(bundles[3])
    with Station(cfg.name, cfg.bureau, cfg.domains, sm_station._session, TrustStore.load(cfg.trust), ledger,
                 SystemClock(), checking_token=no_token) as station, \
            caplog.at_level(logging.INFO, logger="kms.station"):
        results, here = _verifies_here(station.open_many([*bundles[:3], forged], chunk=2))
        assert station._checker is not None  # the other checks of the second chunk were still made there
    assert [isinstance(r, OpenReport) and r.ok for r in results] == [True, True, True, False]
    assert here == 4 + 2 + 1  # every SM2 signature verified in this process's token (the forged one's first fails)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "checking process cannot use the station's token" in warnings[0] and "no-such-token" in warnings[0]
    assert "bundle rejected: signature" in [r.getMessage() for r in caplog.records]


@requires_sm_token
def test_a_station_whose_token_cannot_verify_sm2_says_so_rather_than_calling_bundles_forged(
        sm_home: Home, sm_service: Service, tmp_path: Path) -> None:
    """Station A's configuration with the standard mechanism profile (no SM2, no SM4), in another process (this one
    has station A's token open): a configuration error, not "bundle rejected" for every genuine SM bundle."""
    [data] = _issue(sm_home, sm_service, "dual-app-sm-v1", [card(99, card_ref="plain-0099")],
                    "B-plain-station")
    (tmp_path / "c.kmsb").write_bytes(data)
    original = sm_home.station_config(STATION)
    doc = yaml.safe_load(original.read_text(encoding="utf-8"))
    doc["hsm"]["mechanisms"] = "pkcs11-standard"
    doc["ledger"] = f"sqlite:///{tmp_path / 'ledger.db'}"
    plain = original.with_name("plain-mechanisms.yaml")
    plain.write_text(yaml.safe_dump(doc), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "kms.cli", "bundle", "open", "--station-config", str(plain), "--verify-only",
         str(tmp_path / "c.kmsb")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ))
    output = result.stdout + result.stderr
    assert "SM2_SM3" in output, output
    assert "rejected" not in output.lower(), output


# -- the demo ------------------------------------------------------------------------------------------------------


@requires_sm_token
def test_make_demo_sm_runs_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--profile", "dual-app-sm", "--cards", "12",
         "--home", str(tmp_path / "demo-home-sm")],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "profile dual-app-sm-v1" in result.stdout
    assert "comes from the imported IMK: True" in result.stdout
    assert "result           OK" in result.stdout


def test_the_demo_says_in_one_line_how_to_build_a_missing_sm_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KMS_SM_PKCS11_MODULE"}
    env["KMS_SM_TOKEN_CACHE"] = str(tmp_path / "no-token-here")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--profile", "dual-app-sm", "--cards", "2",
         "--home", str(tmp_path / "home")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "make sm-token" in lines[0], result.stderr
    assert not (tmp_path / "home").exists()


def test_kms_init_refuses_an_sm_profile_without_the_sm_token_and_an_unknown_profile_in_one_line(
        tmp_path: Path) -> None:
    env = {"KMS_SM_PKCS11_MODULE": "", "KMS_SM_TOKEN_CACHE": str(tmp_path / "no-token-here")}
    missing = kms("init", str(tmp_path / "home"), "--profile", "dual-app-sm", env=env)
    assert missing.returncode == 3
    assert len(missing.stderr.strip().splitlines()) == 1 and "make sm-token" in missing.stderr
    unknown = kms("init", str(tmp_path / "home"), "--profile", "dual-app-xyz")
    assert unknown.returncode == 3
    assert "--profile" in unknown.stderr and "dual-app-sm" in unknown.stderr  # the shipped ones are listed
    assert not (tmp_path / "home").exists()


def test_kms_init_refuses_to_add_an_sm_profile_to_a_home_made_without_the_sm_token(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "kms.yaml").write_text("hsm: {module: auto, softhsm2_conf: hsm/softhsm2.conf}\n", encoding="utf-8")
    (home / ".kms-home-format").write_text("4\n", encoding="ascii")
    result = kms("init", str(home), "--profile", "dual-app-sm", "--module", str(tmp_path / "some-sm-module.so"))
    assert result.returncode == 3
    assert "made for a token without SM mechanisms" in result.stderr and "needs a new home" in result.stderr
    assert sorted(p.name for p in home.iterdir()) == [".kms-home-format", "kms.yaml"]  # nothing added
