"""Key ceremonies end to end: a real server over mutual TLS, officers signing with their own approval keys, HSM
steps in the domain workers on SoftHSM2, records in SQLite (docs/ceremonies.md)."""

from __future__ import annotations

import hashlib
import json
import secrets

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import authorize_batch, card, client, key, kms, officer, officer_params, run_ceremony, service_client

from kms import config, store
from kms.ceremony import components
from kms.ceremony.rules import APPROVAL_CONTEXT, verify_minutes
from kms.client.ceremony import CeremonyClient
from kms.clock import SystemClock
from kms.dev.home import Home
from kms.errors import AlreadyExists, InvalidArgument, InvalidState, NotFound, PermissionDenied
from kms.hsm.types import Algorithm
from kms.identity import Principal
from kms.registry import KeyKind, KeyRegistry, KeyState
from kms.server.serve import Service

ALICE, BOB, CHEN = (officer("hrss", i) for i in range(3))
CAROL, DAVE, FRANK = (officer("bank", i) for i in range(3))


@pytest.fixture(scope="module")
def registry(home: Home) -> KeyRegistry:
    return KeyRegistry(store.make_engine(config.load(home.config).database), SystemClock())


def _name() -> str:
    return f"test-{secrets.token_hex(4)}"


def _as(home: Home, service: Service, who: Principal) -> CeremonyClient:
    return CeremonyClient(client(home, service.port, who))


# -- the protocol through gRPC ------------------------------------------------------------------------------------


def test_generate_master_key_needs_two_approvals_by_other_officers_of_the_domain(
        home: Home, service: Service, registry: KeyRegistry) -> None:
    name = _name()
    alice, bob, chen, carol = (_as(home, service, w) for w in (ALICE, BOB, CHEN, CAROL))
    ceremony = alice.propose("generate-master-key", {"name": name})
    assert (ceremony.domain, ceremony.state, ceremony.required, ceremony.role) == ("hrss", "open", 2, "approver")
    assert hashlib.sha256(ceremony.encoding).hexdigest() == ceremony.digest
    with pytest.raises(PermissionDenied, match="proposer does not count"):
        alice.approve(ceremony.ceremony_id, key(home, ALICE))
    with pytest.raises(NotFound):  # another domain's ceremony is not even visible
        carol.approve(ceremony.ceremony_id, key(home, CAROL))
    # A signature by bob's key but over another digest, or by another officer's key, is refused.
    forged = key(home, BOB).sign(APPROVAL_CONTEXT + bytes(32))
    with pytest.raises(InvalidArgument, match="signature"):
        bob._client.call(bob._stub.Approve, _approve_request(ceremony.ceremony_id, forged))
    with pytest.raises(InvalidArgument, match="signature"):
        bob.approve(ceremony.ceremony_id, key(home, CHEN))
    bob.approve(ceremony.ceremony_id, key(home, BOB))
    with pytest.raises(AlreadyExists, match="already approved"):
        bob.approve(ceremony.ceremony_id, key(home, BOB))
    with pytest.raises(InvalidState, match="1 of the 2 approvals"):
        alice.execute(ceremony.ceremony_id)
    assert registry.versions("hrss", KeyKind.MASTER, name) == []
    chen.approve(ceremony.ceremony_id, key(home, CHEN))
    with pytest.raises(NotFound):
        carol.execute(ceremony.ceremony_id)
    done = bob.execute(ceremony.ceremony_id)
    assert done.state == "executed" and [a.officer for a in done.approvals] == [BOB.uri(), CHEN.uri()]
    record = registry.active("hrss", KeyKind.MASTER, name)
    assert record.version == 1 and record.kcv and record.kcv in done.result_json
    with pytest.raises(InvalidState, match="executed"):
        alice.execute(ceremony.ceremony_id)  # once only
    with pytest.raises(InvalidState, match="executed"):
        chen.cancel(ceremony.ceremony_id)


def _approve_request(ceremony_id: str, signature: bytes) -> object:
    from kms.v1 import ceremony_pb2 as pb

    return pb.ApproveRequest(ceremony_id=ceremony_id, signature=signature)


def test_a_cancelled_ceremony_runs_never(home: Home, service: Service, registry: KeyRegistry) -> None:
    name = _name()
    ceremony = run_ceremony(home, service.port, "bank", "generate-master-key", {"name": name}, execute=False)
    _as(home, service, DAVE).cancel(ceremony.ceremony_id)
    with pytest.raises(InvalidState, match="cancelled"):
        _as(home, service, CAROL).execute(ceremony.ceremony_id)
    with pytest.raises(InvalidState, match="cancelled"):
        _as(home, service, FRANK).approve(ceremony.ceremony_id, key(home, FRANK))
    assert registry.versions("bank", KeyKind.MASTER, name) == []


def test_bad_proposals_are_refused_naming_the_field(home: Home, service: Service) -> None:
    alice = _as(home, service, ALICE)
    cases = [
        ("make-coffee", {}, "operation"),
        ("generate-master-key", {"name": "Bad Name"}, "params.name"),
        ("generate-master-key", {"name": "ok", "algorithm": "SM5"}, "params.algorithm"),
        ("generate-master-key", {"name": "ok", "colour": "red"}, "params.colour"),
        ("import-master-key", {"name": "ok", "kcv": "12345", "custodians": ["bob", "chen"]}, "params.kcv"),
        ("import-master-key", {"name": "ok", "kcv": "123456", "custodians": ["bob"]}, "params.custodians"),
        ("import-master-key", {"name": "ok", "kcv": "123456", "custodians": ["bob", "carol"]}, "params.custodians"),
        ("authorize-batch", {"batch_id": "B-none"}, "params.batch_id"),
        ("register-transport-key", {"bureau": "bureau-x", "method": "fax"}, "params.method"),
        ("destroy-key", {"name": "hrss-mk", "version": 0}, "params.version"),
    ]
    for operation, params, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            alice.propose(operation, params)
        assert caught.value.field == field, (operation, params, caught.value)


# -- components: import and escrow export ----------------------------------------------------------------------


def _component(algorithm: Algorithm) -> bytearray:
    return bytearray(secrets.token_bytes(algorithm.length))


def test_import_from_components_checks_every_kcv_and_the_joined_one(
        home: Home, service: Service, registry: KeyRegistry, capfd: pytest.CaptureFixture[str]) -> None:
    name = _name()
    parts = {BOB: _component(Algorithm.DES2), CHEN: _component(Algorithm.DES2)}
    joined = components.join(list(parts.values()))
    expected = components.kcv(Algorithm.DES2, joined)
    ceremony = run_ceremony(home, service.port, "hrss", "import-master-key",
                            {"name": name, "kcv": expected, "custodians": ["bob", "chen"]}, execute=False)
    bob, chen = _as(home, service, BOB), _as(home, service, CHEN)
    with pytest.raises(InvalidState, match="still needs the components of bob, chen"):
        bob.execute(ceremony.ceremony_id)
    # A component whose KCV is not its own is refused before anything is stored.
    with pytest.raises(InvalidArgument, match="kcv"):
        bob.submit_component(ceremony.ceremony_id, parts[BOB], components.kcv(Algorithm.DES2, parts[CHEN]))
    with pytest.raises(PermissionDenied, match="not a custodian"):
        _as(home, service, ALICE).submit_component(ceremony.ceremony_id, parts[BOB],
                                                   components.kcv(Algorithm.DES2, parts[BOB]))
    bob.submit_component(ceremony.ceremony_id, parts[BOB], components.kcv(Algorithm.DES2, parts[BOB]))
    with pytest.raises(AlreadyExists):
        bob.submit_component(ceremony.ceremony_id, parts[BOB], components.kcv(Algorithm.DES2, parts[BOB]))
    state = chen.submit_component(ceremony.ceremony_id, parts[CHEN], components.kcv(Algorithm.DES2, parts[CHEN]))
    assert [c.custodian for c in state.components] == [BOB.uri(), CHEN.uri()]
    done = _as(home, service, ALICE).execute(ceremony.ceremony_id)
    record = registry.active("hrss", KeyKind.MASTER, name)
    assert record.kcv == expected and done.state == "executed"
    _assert_no_trace(home, capfd, [*parts.values(), joined])


def test_a_wrong_joined_kcv_leaves_no_active_key(
        home: Home, service: Service, registry: KeyRegistry, capfd: pytest.CaptureFixture[str]) -> None:
    name = _name()
    parts = [_component(Algorithm.DES2), _component(Algorithm.DES2)]
    ceremony = run_ceremony(home, service.port, "bank", "import-master-key",
                            {"name": name, "kcv": "000000", "custodians": ["dave", "frank"]}, execute=False)
    for who, part in zip((DAVE, FRANK), parts, strict=True):
        _as(home, service, who).submit_component(ceremony.ceremony_id, part, components.kcv(Algorithm.DES2, part))
    with pytest.raises(InvalidState, match="differs from the expected 000000"):
        _as(home, service, CAROL).execute(ceremony.ceremony_id)
    assert _as(home, service, CAROL).get(ceremony.ceremony_id).state == "failed"
    [version] = registry.versions("bank", KeyKind.MASTER, name)
    assert version.state is KeyState.DESTROYED
    with pytest.raises(InvalidState, match="no active version"):
        registry.active("bank", KeyKind.MASTER, name)
    _assert_no_trace(home, capfd, [*parts, components.join(parts)])


def test_escrow_export_gives_each_custodian_only_their_component(
        home: Home, service: Service, registry: KeyRegistry) -> None:
    name = _name()
    run_ceremony(home, service.port, "hrss", "generate-master-key", {"name": name, "escrow": "yes"})
    record = registry.active("hrss", KeyKind.MASTER, name)
    done = run_ceremony(home, service.port, "hrss", "export-master-key",
                        {"name": name, "version": 1, "recipients": ["bob", "chen"]})
    assert done.state == "executed", done.error
    opened = []
    for who in (BOB, CHEN):
        value, kcv = _as(home, service, who).fetch_component(done.ceremony_id, key(home, who), who.uri())
        assert components.kcv(Algorithm.DES2, value) == kcv
        opened.append(value)
    with pytest.raises(NotFound):
        _as(home, service, ALICE).fetch_component(done.ceremony_id, key(home, ALICE), ALICE.uri())
    assert opened[0] != opened[1]
    assert components.kcv(Algorithm.DES2, components.join(opened)) == record.kcv
    # A key not created escrowable cannot be exported: the token refuses to wrap it.
    plain = _name()
    run_ceremony(home, service.port, "hrss", "generate-master-key", {"name": plain})
    with pytest.raises(Exception, match="may not leave it"):
        run_ceremony(home, service.port, "hrss", "export-master-key",
                     {"name": plain, "version": 1, "recipients": ["bob", "chen"]})


# -- transport keys, states, destruction -------------------------------------------------------------------------


def test_transport_key_handed_to_one_station_active_only_once_it_confirmed_the_kcv(
        home: Home, service: Service, registry: KeyRegistry) -> None:
    from kms import runtime
    from kms.station import Station, TrustStore, accept_transport_key, new_unwrap_key

    cfg = config.load_station(home.station_config("station-b1"))
    with runtime.open_station(cfg) as session:
        made = new_unwrap_key(session, "station-b1", "hrss")
    pem = made.pem
    before = registry.active("hrss", KeyKind.TRANSPORT, "bureau-b")
    done = run_ceremony(home, service.port, "hrss", "register-transport-key",
                        {"bureau": "bureau-b", "station": "station-b1", "method": "rsa-oaep", "public_key": pem})
    result = json.loads(done.result_json)
    assert result["state"] == "pre-activation" and result["handed_to"] == "urn:kms:station:bureau-b:station-b1"
    assert "wrapped" not in done.result_json.lower()  # the wrapped key is in no result and no minutes
    assert registry.active("hrss", KeyKind.TRANSPORT, "bureau-b") == before  # not used before the bureau has it
    with service_client(home, service, "station-a1") as a1, pytest.raises(NotFound):
        CeremonyClient(a1).fetch_transport_key("hrss")  # only the named station
    with service_client(home, service, "station-b1") as b1:
        station = CeremonyClient(b1)
        handoff = station.fetch_transport_key("hrss")
        assert handoff.version == result["version"] and handoff.kcv == result["kcv"]
        assert handoff.algorithm == "AES256" and handoff.unwrap_key_sha256 == made.sha256 == result["unwrap_key_sha256"]
        with pytest.raises(InvalidArgument, match="kcv"):
            station.confirm_transport_key("hrss", handoff.version, "000000")
        assert registry.get("hrss", KeyKind.TRANSPORT, "bureau-b", handoff.version).state is KeyState.PRE_ACTIVATION
        with runtime.open_station(cfg) as session:
            kcv = accept_transport_key(session, "station-b1", "hrss", handoff.label, handoff.wrapped_key,
                                       handoff.kcv, unwrap_key_sha256=handoff.unwrap_key_sha256)
            assert not session.has_public_key(made.label)  # the single-use unwrap key pair is gone
        station.confirm_transport_key("hrss", handoff.version, kcv)
        with pytest.raises(NotFound):
            station.fetch_transport_key("hrss")  # erased once accepted
    assert registry.active("hrss", KeyKind.TRANSPORT, "bureau-b").version == handoff.version
    # The next bundle for bureau-b is sealed under the new key, and station-b1 opens it.
    batch = f"B-{secrets.token_hex(4)}"
    with client(home, service.port, ALICE) as alice:
        alice.create_batch(batch, "bureau-b", "dual-app-v1", [card(93_000, card_ref="tk-0")])
    authorize_batch(home, service.port, batch)
    with service_client(home, service, "station-b1") as b1:
        data = b1.issue_card(batch, "tk-0").data
    from kms import bundle

    hrss = next(s for s in bundle.parse(data).sections if s.domain == "hrss")
    assert hrss.transport_key_version == handoff.version
    ledger = store.make_engine(f"sqlite:///{home.path / 'tk-ledger.db'}")
    store.create_station_ledger(ledger)
    with runtime.open_station(cfg) as session:
        report = Station("station-b1", "bureau-b", cfg.domains, session, TrustStore.load(cfg.trust), ledger,
                         SystemClock()).open(data)
    assert report.ok and len(report.keys) == 15


def test_transport_key_from_and_to_components(home: Home, service: Service, registry: KeyRegistry) -> None:
    bureau = _name()
    parts = [_component(Algorithm.AES256), _component(Algorithm.AES256)]
    expected = components.kcv(Algorithm.AES256, components.join(parts))
    ceremony = run_ceremony(home, service.port, "hrss", "register-transport-key",
                            {"bureau": bureau, "method": "import-components", "kcv": expected,
                             "custodians": ["bob", "chen"]}, execute=False)
    for who, part in zip((BOB, CHEN), parts, strict=True):
        _as(home, service, who).submit_component(ceremony.ceremony_id, part, components.kcv(Algorithm.AES256, part))
    _as(home, service, ALICE).execute(ceremony.ceremony_id)
    [made] = registry.versions("hrss", KeyKind.TRANSPORT, bureau)
    assert (made.kcv, made.state) == (expected, KeyState.PRE_ACTIVATION)  # until the bureau has loaded it
    run_ceremony(home, service.port, "hrss", "set-key-state",
                 {"kind": "transport", "name": bureau, "version": 1, "state": "active"})
    assert registry.active("hrss", KeyKind.TRANSPORT, bureau).kcv == expected

    other = _name()
    done = run_ceremony(home, service.port, "hrss", "register-transport-key",
                        {"bureau": other, "method": "export-components", "recipients": ["bob", "chen"]})
    opened = [_as(home, service, w).fetch_component(done.ceremony_id, key(home, w), w.uri())[0] for w in (BOB, CHEN)]
    assert components.kcv(Algorithm.AES256, components.join(opened)) == registry.get(
        "hrss", KeyKind.TRANSPORT, other, 1).kcv


def test_key_states_rotation_and_destruction_are_ceremonies(
        home: Home, service: Service, registry: KeyRegistry) -> None:
    name = _name()
    run_ceremony(home, service.port, "bank", "generate-master-key", {"name": name})
    rotated = run_ceremony(home, service.port, "bank", "rotate-master-key", {"name": name})
    assert rotated.state == "executed"
    assert registry.active("bank", KeyKind.MASTER, name).version == 2  # the newest active version serves new cards
    assert registry.get("bank", KeyKind.MASTER, name, 1).state is KeyState.ACTIVE  # v1 stays until deactivated
    with pytest.raises(InvalidState, match="deactivate it"):
        run_ceremony(home, service.port, "bank", "destroy-key", {"name": name, "version": 1})
    for state in ("suspended", "active", "deactivated"):
        run_ceremony(home, service.port, "bank", "set-key-state", {"name": name, "version": 1, "state": state})
        assert registry.get("bank", KeyKind.MASTER, name, 1).state.value == state
    with pytest.raises(InvalidArgument, match="is deactivated: only a suspended key"):
        run_ceremony(home, service.port, "bank", "set-key-state", {"name": name, "version": 1, "state": "active"})
    run_ceremony(home, service.port, "bank", "destroy-key", {"name": name, "version": 1})
    assert registry.get("bank", KeyKind.MASTER, name, 1).state is KeyState.DESTROYED


# -- batches, officers, minutes ----------------------------------------------------------------------------------


def test_a_batch_is_issuable_only_after_both_domains_authorized_it(home: Home, service: Service) -> None:
    batch = f"B-{secrets.token_hex(4)}"
    with client(home, service.port, ALICE) as alice:
        status = alice.create_batch(batch, "bureau-a", "dual-app-v1", [card(90_000, card_ref="cer-090000")])
    assert status.state == "awaiting-authorization"

    with service_client(home, service, "station-a1") as st:
        with pytest.raises(InvalidState, match="awaiting-authorization: the bank, hrss domain has not"):
            st.issue_card(batch, "cer-090000")
        with pytest.raises(InvalidState, match="awaiting-authorization"):
            list(st.stream_batch(batch))
        authorize_batch(home, service.port, batch, ("hrss",))
        with pytest.raises(InvalidState, match="awaiting-authorization: the bank domain has not"):
            st.issue_card(batch, "cer-090000")
        with pytest.raises(InvalidArgument, match="already authorized"):
            run_ceremony(home, service.port, "hrss", "authorize-batch", {"batch_id": batch}, approvers=(1,))
        authorize_batch(home, service.port, batch, ("bank",))
        assert st.issue_card(batch, "cer-090000").card_ref == "cer-090000"


def test_enrolment_and_signed_minutes(home: Home, service: Service) -> None:
    name = f"o{secrets.token_hex(3)}"
    done = run_ceremony(home, service.port, "hrss", "enrol-officer",
                        officer_params(home, Principal("officer", name, domain="hrss")))
    domain = _as(home, service, ALICE).domain()
    assert f"urn:kms:officer:hrss:{name}" in [o.officer for o in domain.officers]
    minutes = _as(home, service, BOB).minutes(done.ceremony_id)
    trust = home.path / "trust" / "hrss-issuance-v1.pem"
    public = serialization.load_pem_public_key(trust.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    doc = verify_minutes(minutes.document, minutes.signature, public)
    assert doc["state"] == "executed" and [a["officer"] for a in doc["approvals"]] == [BOB.uri(), CHEN.uri()]
    tampered = minutes.document.replace(b'"executed"', b'"cancelled"')
    with pytest.raises(InvalidArgument, match="signature"):
        verify_minutes(tampered, minutes.signature, public)
    bank_trust = serialization.load_pem_public_key((home.path / "trust" / "bank-issuance-v1.pem").read_bytes())
    assert isinstance(bank_trust, ec.EllipticCurvePublicKey)
    with pytest.raises(InvalidArgument, match="signature"):
        verify_minutes(minutes.document, minutes.signature, bank_trust)


# -- canaries ---------------------------------------------------------------------------------------------------


def _assert_no_trace(home: Home, capfd: pytest.CaptureFixture[str], values: list[bytearray]) -> None:
    """No component or joined key, in hex (either case) or raw, in any log line or any database row."""
    out, err = capfd.readouterr()
    engine = store.make_engine(config.load(home.config).database)
    dumped = []
    with engine.connect() as conn:
        for table in store.metadata.sorted_tables:
            for row in conn.execute(sa.select(table)):
                dumped.append(repr(tuple(row)))
    everything = out + err + "\n".join(dumped)
    raw = b"".join(bytes(str(r), "utf-8") for r in dumped)
    for value in values:
        assert value.hex() not in everything.lower()
        assert bytes(value) not in raw


def test_a_suspended_master_key_serves_no_card_until_reactivated(home: Home, service: Service) -> None:
    batch = f"B-{secrets.token_hex(4)}"
    with client(home, service.port, ALICE) as alice:
        alice.create_batch(batch, "bureau-a", "dual-app-v1", [card(91_000 + i, card_ref=f"cer-s{i}") for i in range(2)])
    authorize_batch(home, service.port, batch)

    state = {"name": "hrss-mk", "version": 1}
    run_ceremony(home, service.port, "hrss", "set-key-state", {**state, "state": "suspended"})
    try:
        with service_client(home, service, "station-a1") as st, \
                pytest.raises(InvalidState, match="hrss-mk/v1, the version this batch was authorized with, is "
                                                  "suspended"):
            st.issue_card(batch, "cer-s0")
    finally:
        run_ceremony(home, service.port, "hrss", "set-key-state", {**state, "state": "active"})
    with service_client(home, service, "station-a1") as st:
        assert st.issue_card(batch, "cer-s0").card_ref == "cer-s0"


def _bank_versions(data: bytes) -> dict[str, int]:
    from kms import bundle

    section = next(s for s in bundle.parse(data).sections if s.domain == "bank")
    return dict(section.body["master_keys"])


def test_rotation_new_batches_get_the_new_version_old_batches_keep_theirs_until_deactivated(
        home: Home, service: Service, registry: KeyRegistry) -> None:

    old, new = f"B-{secrets.token_hex(4)}", f"B-{secrets.token_hex(4)}"
    with client(home, service.port, CAROL) as carol:
        carol.create_batch(old, "bureau-a", "dual-app-v1", [card(92_000 + i, card_ref=f"rot-o{i}") for i in range(2)])
        authorized = authorize_batch(home, service.port, old)
        assert '"bank-imk-ac": 1' in authorized[1].params_json  # approvers signed the key versions
        rotated = run_ceremony(home, service.port, "bank", "rotate-master-key", {"name": "bank-imk-ac"})
        v2 = json.loads(rotated.result_json)["version"]
        try:
            carol.create_batch(new, "bureau-a", "dual-app-v1",
                               [card(92_100 + i, card_ref=f"rot-n{i}") for i in range(2)])
            authorize_batch(home, service.port, new)
            with service_client(home, service, "station-a1") as st:
                first = st.issue_card(old, "rot-o0")
                assert _bank_versions(first.data)["bank-imk-ac"] == 1
                assert _bank_versions(st.issue_card(new, "rot-n0").data)["bank-imk-ac"] == v2
                carol.reissue(old, "rot-o0")  # a re-issue of an old batch's card: still the old version
                with client(home, service.port, ALICE) as alice:
                    alice.reissue(old, "rot-o0")  # the hrss domain's consent too
                again = st.issue_card(old, "rot-o0")
                assert again.serial != first.serial and _bank_versions(again.data)["bank-imk-ac"] == 1
        finally:
            run_ceremony(home, service.port, "bank", "set-key-state",
                         {"name": "bank-imk-ac", "version": v2, "state": "deactivated"})
        with service_client(home, service, "station-a1") as st, \
                pytest.raises(InvalidState, match=f"bank-imk-ac/v{v2}, the version this batch was authorized with, "
                                                  "is deactivated"):
            st.issue_card(new, "rot-n1")
    assert registry.active("bank", KeyKind.MASTER, "bank-imk-ac").version == 1


def test_identical_proposals_have_distinct_digests_so_approvals_do_not_carry_over(
        home: Home, service: Service, registry: KeyRegistry) -> None:
    name = _name()
    alice, bob = _as(home, service, ALICE), _as(home, service, BOB)
    first = alice.propose("generate-master-key", {"name": name})
    second = alice.propose("generate-master-key", {"name": name})  # e.g. a retried request, the same second
    assert first.digest != second.digest
    signature = key(home, BOB).sign(APPROVAL_CONTEXT + bytes.fromhex(first.digest))
    with pytest.raises(InvalidArgument, match="signature"):
        bob._client.call(bob._stub.Approve, _approve_request(second.ceremony_id, signature))
    bob._client.call(bob._stub.Approve, _approve_request(first.ceremony_id, signature))
    assert [a.officer for a in bob.get(first.ceremony_id).approvals] == [BOB.uri()]
    assert list(bob.get(second.ceremony_id).approvals) == []


def test_a_component_goes_only_to_the_custody_key_the_proposal_names(
        home: Home, service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    ceremony = run_ceremony(home, service.port, "hrss", "import-master-key",
                            {"name": _name(), "kcv": "123456", "custodians": ["bob", "chen"]}, execute=False)
    params = json.loads(ceremony.params_json)
    bob = _as(home, service, BOB)
    assert params["custody_key"] == hashlib.sha256(bob.domain().custody_public_key).hexdigest()
    from cryptography.hazmat.primitives.asymmetric import rsa

    rogue = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    real_domain = bob.domain

    def lying_domain() -> object:  # a service (or a man in the middle) offering another key to encrypt to
        info = real_domain()
        info.custody_public_key = rogue
        return info

    monkeypatch.setattr(bob, "domain", lying_domain)
    part = _component(Algorithm.DES2)
    with pytest.raises(InvalidArgument, match="custody_key"):
        bob.submit_component(ceremony.ceremony_id, part, components.kcv(Algorithm.DES2, part))
    assert list(bob.get(ceremony.ceremony_id).components) == []


def test_a_revoked_officer_is_listed_as_revoked(home: Home, service: Service) -> None:
    name = f"r{secrets.token_hex(3)}"
    params = officer_params(home, Principal("officer", name, domain="bank"))
    run_ceremony(home, service.port, "bank", "enrol-officer", params)
    other = officer_params(home, Principal("officer", name + "x", domain="bank"))
    with pytest.raises(InvalidArgument, match="already an officer's approval key"):
        _as(home, service, CAROL).propose("enrol-officer", {**other, "public_key": params["public_key"]})
    done = run_ceremony(home, service.port, "bank", "revoke-officer", {"name": name})
    assert json.loads(done.result_json)["state"] == "revoked"
    states = {o.officer: o.state for o in _as(home, service, DAVE).domain().officers}
    assert states[f"urn:kms:officer:bank:{name}"] == "revoked"
    with pytest.raises(InvalidArgument, match="not an active bank officer"):
        _as(home, service, CAROL).propose("revoke-officer", {"name": name})


def test_the_genesis_is_signed_by_every_officer_it_enrols(home: Home, service: Service) -> None:
    alice = _as(home, service, ALICE)
    [genesis] = [c for c in alice.list("executed") if c.operation == "genesis"]
    assert genesis.domain == "hrss" and {a.officer for a in genesis.approvals} == {ALICE.uri(), BOB.uri(), CHEN.uri()}
    minutes = alice.minutes(genesis.ceremony_id)
    public = serialization.load_pem_public_key((home.path / "trust" / "hrss-issuance-v1.pem").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    doc = verify_minutes(minutes.document, minutes.signature, public)
    listed = [o["name"] for o in json.loads(doc["proposal"])["params"]["officers"]]
    assert listed == ["alice", "bob", "chen"]


# -- input hardening (the security test's findings) --------------------------------------------------------------


def _propose_raw(home: Home, service: Service, who: Principal, operation: str, params_json: str) -> object:
    from kms.v1 import ceremony_pb2 as pb

    officer_client = _as(home, service, who)
    return officer_client._client.call(officer_client._stub.Propose,
                                       pb.ProposeRequest(operation=operation, params_json=params_json))


@pytest.mark.parametrize("params_json", [
    "[" * 100_000 + "]" * 100_000,  # the finding: 100,000 deep ended INTERNAL (RecursionError)
    '{"a":' * 1_000 + "1" + "}" * 1_000,  # short enough, far too deep
    '{"name":"x","version":NaN}', '{"name":"x","version":Infinity}', '{"name":"x","version":1.0}',
    '{"name":"x","version":1e3}', '{"name":"x","version":' + "9" * 5_000 + "}",  # int() refuses 4,300+ digits
    '{"name":"x","escrow":true}', '{"name":"x","escrow":null}', '{"name":"\\ud800"}',
    '{"name":"x","name":"y"}', "[]", '"x"', "1", "{", "{'name':'x'}",
])
def test_params_json_is_canonical_json_of_bounded_size_and_depth(
        home: Home, service: Service, params_json: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        _propose_raw(home, service, ALICE, "generate-master-key", params_json)
    assert refused.value.field == "params_json"


def test_integer_parameters_are_bounded(home: Home, service: Service, registry: KeyRegistry) -> None:
    name = _name()
    run_ceremony(home, service.port, "hrss", "generate-master-key", {"name": name, "escrow": "yes"})
    alice = _as(home, service, ALICE)
    for operation, extra in (("set-key-state", {"state": "suspended"}), ("destroy-key", {}),
                             ("export-master-key", {"recipients": ["bob", "chen"]})):
        # The finding: 99999999999999999999 reached SQLite (OverflowError, INTERNAL).
        for version in (99999999999999999999, 2**63, 2**31, 0, -1):
            with pytest.raises(InvalidArgument) as refused:
                alice.propose(operation, {"name": name, "version": version, **extra})
            assert (refused.value.field, refused.value.reason) == ("params.version",
                                                                   "must be an integer from 1 to 2147483647")
        with pytest.raises(NotFound):  # in range: looked up
            alice.propose(operation, {"name": name, "version": 2**31 - 1, **extra})
    assert alice.propose("set-key-state", {"name": name, "version": 1, "state": "suspended"}).state == "open"


def test_an_undecryptable_component_is_invalid_argument_and_recycles_no_worker(
        home: Home, service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = service.pools.pools["hrss"]
    recycled = []
    real_recycle = pool.recycle
    monkeypatch.setattr(pool, "recycle", lambda: (recycled.append(1), real_recycle())[1])
    part = _component(Algorithm.AES256)
    ceremony = run_ceremony(home, service.port, "hrss", "import-master-key",
                            {"name": _name(), "algorithm": "AES256", "kcv": "000000", "custodians": ["bob", "chen"]},
                            execute=False)
    bob = _as(home, service, BOB)
    custody = bob.domain().custody_public_key
    kcv = components.kcv(Algorithm.AES256, part)
    for sealed, reason in ((secrets.token_bytes(100), "is not an RSA-OAEP ciphertext"),
                           (b"\xff" * 384, "is not an RSA-OAEP ciphertext"),  # not below the modulus
                           (bytes(1) + secrets.token_bytes(383), "cannot be decrypted")):  # the finding: INTERNAL
        with pytest.raises(InvalidArgument) as refused:
            bob._client.call(bob._stub.SubmitComponent, _component_request(ceremony.ceremony_id, sealed, kcv))
        assert refused.value.field == "encrypted_component" and refused.value.reason.startswith(reason)
    assert recycled == []  # nothing was decrypted: the workers stay
    # Decrypted, then refused: the worker the clear component passed through is replaced.
    with pytest.raises(InvalidArgument, match="kcv: does not match"):
        bob._client.call(bob._stub.SubmitComponent, _component_request(
            ceremony.ceremony_id, components.seal_to_custody(custody, part), "000000"))
    with pytest.raises(InvalidArgument, match="encrypted_component: does not hold a AES256 component"):
        bob._client.call(bob._stub.SubmitComponent, _component_request(
            ceremony.ceremony_id, components.seal_to_custody(custody, part[:16]), kcv))
    assert len(recycled) == 2
    assert len(bob.submit_component(ceremony.ceremony_id, part, kcv).components) == 1
    assert len(recycled) == 3


def _component_request(ceremony_id: str, sealed: bytes, kcv: str) -> object:
    from kms.v1 import ceremony_pb2 as pb

    return pb.SubmitComponentRequest(ceremony_id=ceremony_id, encrypted_component=sealed, kcv=kcv)


def test_names_ids_and_kcvs_are_matched_whole(home: Home, service: Service) -> None:
    alice = _as(home, service, ALICE)
    params = officer_params(home, Principal("officer", f"e{secrets.token_hex(3)}", domain="hrss"))
    with pytest.raises(InvalidArgument) as refused:  # the finding: "eve\n" passed `re.match` with `$`
        alice.propose("enrol-officer", {**params, "name": params["name"] + "\n"})
    assert refused.value.field == "params.name"
    ceremony = alice.propose("generate-master-key", {"name": _name()})
    for ceremony_id in (ceremony.ceremony_id + "\n", ceremony.ceremony_id.upper()):
        with pytest.raises(InvalidArgument) as refused:
            alice.get(ceremony_id)
        assert refused.value.field == "ceremony_id"
    with pytest.raises(InvalidArgument, match="kcv: must be 6 hexadecimal digits"):  # "ﬀ".upper() is "FF"
        alice.propose("import-master-key", {"name": _name(), "kcv": "ﬀ1234", "custodians": ["bob", "chen"]})
    alice.cancel(ceremony.ceremony_id)


def test_the_cli_refuses_out_of_range_and_non_ascii_versions_in_one_line(home: Home, service: Service) -> None:
    alice = str(home.client_config(ALICE))
    address = f"localhost:{service.port}"
    # The finding: `kms ceremony propose set-key-state version=99999999999999999999` ended INTERNAL (SQLite).
    for version, message in (("99999999999999999999", "params.version: must be an integer from 1 to 2147483647"),
                             ("\u0663", "params.version: must be an integer"),  # int() reads Arabic-Indic 3 as 3
                             ("1_0", "params.version: must be an integer")):
        result = kms("ceremony", "propose", "--client", alice, "--server", address, "set-key-state",
                     "name=hrss-mk", f"version={version}", "state=suspended")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr == f"kms: error: {message}\n"
