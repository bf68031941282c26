"""The worker's own dual control (kms.ceremony.binding): the trust file, and each key-changing step checked against
the ceremony it names — on a real database; the worker services themselves are tested in tests/server/test_worker.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kms import store
from kms.canonical import canonical
from kms.ceremony.binding import DualControl, load_trust_file, write_trust_file
from kms.ceremony.officers import OfficerStore, public_pem
from kms.ceremony.rules import MINUTES_FORMAT, QuorumPolicy, approval_message
from kms.ceremony.store import Ceremonies
from kms.clock import FixedClock
from kms.config import load
from kms.errors import ConfigError, PermissionDenied
from kms.identity import Principal

ROLES = ("approver", "key-custodian")
NAMES = ("alice", "bob", "chen")
PARAMS = {"name": "mk", "algorithm": "AES256", "escrow": "no"}
CREATE = ("master", "mk", "AES256", False, None, [], True)  # create_key's arguments as the worker checked them


@dataclass
class World:
    ceremonies: Ceremonies
    officers: OfficerStore
    keys: dict[str, ec.EllipticCurvePrivateKey]
    trust: Path
    clock: FixedClock
    dual: DualControl

    def who(self, name: str) -> Principal:
        return Principal("officer", name, domain="hrss")

    def approved(self, operation: str = "generate-master-key", params: dict[str, Any] | None = None,
                 approvers: tuple[str, ...] = ("bob", "chen")) -> str:
        record = self.ceremonies.propose(self.who("alice"), operation, params or PARAMS)
        for name in approvers:
            self.ceremonies.approve(record.ceremony_id, self.who(name), self.keys[name].sign(
                approval_message(record.proposal), ec.ECDSA(hashes.SHA256())))
        return record.ceremony_id

    def executing(self, ceremony_id: str, step: str = "create_key", arguments: tuple[Any, ...] = CREATE) -> Any:
        """Execute the ceremony through the store; inside, the worker's check of one step."""
        got: list[Any] = []
        self.ceremonies.execute(ceremony_id, self.who("alice"), lambda r: got.append(
            self.dual.run(ceremony_id, step, arguments, lambda: {"version": 1})) or {})
        return got[0]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    engine = store.make_engine(f"sqlite:///{tmp_path}/kms.db")
    store.upgrade(engine)
    clock = FixedClock(dt.datetime(2026, 5, 1, tzinfo=dt.UTC))
    officers = OfficerStore(engine, clock)
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in NAMES}
    for name, private in keys.items():
        officers.enrol(Principal("officer", name, domain="hrss"), ROLES, public_pem(private.public_key()), "genesis",
                       cert_sha256="0" * 64)
    trust = write_trust_file(tmp_path / "officers.yaml", "hrss",
                             [(n, ROLES, public_pem(k.public_key())) for n, k in keys.items()])
    ceremonies = Ceremonies(engine, clock, QuorumPolicy.load(), officers)
    yield World(ceremonies, officers, keys, trust, clock, DualControl("hrss", ceremonies, officers, trust, clock))
    engine.dispose()


def test_an_approved_executing_ceremony_runs_its_step_once(world: World) -> None:
    ceremony_id = world.approved()
    assert world.executing(ceremony_id) == {"version": 1}
    record = world.ceremonies.get(ceremony_id)
    assert record.state.value == "executed"


def test_a_step_outside_an_executing_ceremony_is_refused(world: World) -> None:
    ceremony_id = world.approved()
    ran: list[int] = []
    with pytest.raises(PermissionDenied, match="the ceremony is open, not executing"):
        world.dual.run(ceremony_id, "create_key", CREATE, lambda: ran.append(1))
    with pytest.raises(PermissionDenied, match="must name the ceremony"):
        world.dual.run("", "destroy_key", ("master", "mk", 1), lambda: ran.append(1))
    assert ran == []
    assert world.dual.run("", "check_component", (), lambda: "ran") == "ran"  # not a key-changing step


@pytest.mark.parametrize(("arguments", "field"), [
    (("master", "other", "AES256", False, None, [], True), "name"),
    (("master", "mk", "DES2", False, None, [], True), "algorithm"),
    (("master", "mk", "AES256", True, None, [], True), "escrow"),
    (("transport", "mk", "AES256", False, None, [], True), "kind"),
])
def test_arguments_other_than_the_approved_params_are_refused(world: World, arguments: tuple[Any, ...],
                                                             field: str) -> None:
    ceremony_id = world.approved()
    with pytest.raises(PermissionDenied, match=f"{field} is not what the approved proposal says"):
        world.executing(ceremony_id, arguments=arguments)


def test_a_transport_key_for_rsa_runs_only_with_the_approved_algorithm_and_key(world: World) -> None:
    """register-transport-key (rsa-oaep): the worker runs transport_key_for_rsa with the proposal's algorithm (AES256
    for a proposal made before the parameter) and the station public key the approvers signed off."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    der = private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    params = {"bureau": "bureau-a", "method": "rsa-oaep", "station": "urn:kms:station:bureau-a:station-a1",
              "public_key": pem}
    sm4 = world.approved("register-transport-key", {**params, "algorithm": "SM4"})
    with pytest.raises(PermissionDenied, match="algorithm is not what the approved proposal says"):
        world.executing(sm4, "transport_key_for_rsa", ("bureau-a", der, "AES256"))
    sm4 = world.approved("register-transport-key", {**params, "algorithm": "SM4"})
    with pytest.raises(PermissionDenied, match="recipient_spki is not what the approved proposal says"):
        world.executing(sm4, "transport_key_for_rsa", ("bureau-a", other, "SM4"))
    sm4 = world.approved("register-transport-key", {**params, "algorithm": "SM4"})
    assert world.executing(sm4, "transport_key_for_rsa", ("bureau-a", der, "SM4")) == {"version": 1}
    older = world.approved("register-transport-key", params)  # no algorithm: AES256
    assert world.executing(older, "transport_key_for_rsa", ("bureau-a", der, "AES256")) == {"version": 1}


def test_a_replayed_step_and_a_step_the_operation_does_not_run_are_refused(world: World) -> None:
    ceremony_id = world.approved()

    def twice(record: Any) -> dict[str, Any]:
        world.dual.run(ceremony_id, "create_key", CREATE, lambda: {"version": 1})
        with pytest.raises(PermissionDenied, match="already ran create_key"):
            world.dual.run(ceremony_id, "create_key", CREATE, lambda: {"version": 2})
        with pytest.raises(PermissionDenied, match="generate-master-key does not run destroy_key"):
            world.dual.run(ceremony_id, "destroy_key", ("master", "mk", 1), lambda: None)
        return {}

    world.ceremonies.execute(ceremony_id, world.who("alice"), twice)


def test_only_officers_of_the_trust_file_still_active_in_the_registry_count(world: World) -> None:
    listed = yaml.safe_load(world.trust.read_text())
    listed["officers"] = [o for o in listed["officers"] if o["name"] != "chen"]  # chen: in the database only
    world.trust.write_text(yaml.safe_dump(listed))
    with pytest.raises(PermissionDenied, match=r"1 of the 2 approvals .*chen: not an enrolled officer"):
        world.executing(world.approved())
    write_trust_file(world.trust, "hrss", [(n, ROLES, public_pem(k.public_key())) for n, k in world.keys.items()])
    ceremony_id = world.approved()

    def revoked_meanwhile(record: Any) -> dict[str, Any]:
        world.officers.revoke(world.who("bob"))  # revoked by ceremony: no longer counts, whatever the file says
        return dict(world.dual.run(ceremony_id, "create_key", CREATE, lambda: {"version": 1}))

    with pytest.raises(PermissionDenied, match="bob: not an enrolled officer"):
        world.ceremonies.execute(ceremony_id, world.who("alice"), revoked_meanwhile)


def test_an_approval_under_a_key_the_trust_file_does_not_hold_does_not_count(world: World) -> None:
    forged = ec.generate_private_key(ec.SECP256R1())
    world.keys["chen"] = forged  # chen's key replaced in the database (as the front end can): the file keeps his own
    with world.ceremonies._engine.begin() as conn:
        conn.execute(store.officers.update().where(store.officers.c.principal == world.who("chen").uri())
                     .values(public_key=public_pem(forged.public_key())))
    with pytest.raises(PermissionDenied, match="chen: the signature is not over this proposal"):
        world.executing(world.approved())


def test_without_a_trust_file_no_key_changing_step_runs(world: World) -> None:
    bare = DualControl("hrss", world.ceremonies, world.officers, None, world.clock)
    ceremony_id = world.approved()
    with pytest.raises(PermissionDenied, match=r"worker\.officers is not set"):
        world.ceremonies.execute(ceremony_id, world.who("alice"), lambda r: bare.run(
            ceremony_id, "create_key", CREATE, lambda: {"version": 1}))


def test_the_trust_file_is_checked(world: World, tmp_path: Path) -> None:
    assert set(load_trust_file(world.trust, "hrss")) == {world.who(n) for n in NAMES}
    with pytest.raises(ConfigError, match="lists the officers of 'hrss', not of bank"):
        load_trust_file(world.trust, "bank")
    os.chmod(world.trust, 0o664)
    with pytest.raises(ConfigError, match="writable by no one else"):
        load_trust_file(world.trust, "hrss")
    os.chmod(world.trust, 0o600)
    doc = yaml.safe_load(world.trust.read_text())
    doc["officers"].append(doc["officers"][0])
    world.trust.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"officers\[3\]: lists alice twice"):
        load_trust_file(world.trust, "hrss")
    with pytest.raises(ConfigError, match="cannot read it"):
        load_trust_file(tmp_path / "missing.yaml", "hrss")


def test_worker_officers_is_read_relative_to_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "worker-hrss.yaml"
    path.write_text(yaml.safe_dump({
        "hsm": {"module": "/usr/lib/softhsm/libsofthsm2.so"}, "database": "sqlite:///kms.db",
        "domains": {"hrss": {"token": "kms-hrss", "pin": "env:HRSS_PIN"}},
        "worker": {"listen": f"unix:{tmp_path}/w.sock", "officers": "officers.yaml"}}))
    cfg = load(path)
    assert cfg.worker is not None and cfg.worker.officers == tmp_path / "officers.yaml"


def _minutes(world: World, ceremony_id: str, extra: list[dict[str, str]] | None = None, state: str = "executed",
             drop: int = 0) -> bytes:
    """Minutes as kms.server.ceremony.minutes writes them (the parts the worker checks)."""
    record = world.ceremonies.get(ceremony_id)
    keys = {r.officer.principal.uri(): r.public_key_pem for r in world.officers.all("hrss")}
    approvals = [{"officer": a.officer.uri(), "at": a.at, "signature": a.signature.hex(),
                  "public_key": keys[a.officer.uri()]} for a in record.approvals][drop:]
    return canonical({"format": MINUTES_FORMAT, "version": 1, "ceremony_id": ceremony_id, "domain": "hrss",
                      "operation": record.operation, "proposal": record.encoding.decode(), "digest": record.digest,
                      "approvals": approvals + (extra or []), "state": state, "result": {}})


def test_minutes_are_signed_only_with_approvals_by_trusted_officers(world: World) -> None:
    ceremony_id = world.approved()
    world.dual.check_minutes(_minutes(world, ceremony_id))  # genuine: may be signed
    world.dual.check_minutes(_minutes(world, ceremony_id, state="open", drop=1))  # an open one, one approval so far
    record = world.ceremonies.get(ceremony_id)
    mallory = ec.generate_private_key(ec.SECP256R1())
    forged = {"officer": "urn:kms:officer:hrss:mallory", "at": "2026-05-01T00:00:00Z",
              "signature": mallory.sign(approval_message(record.proposal), ec.ECDSA(hashes.SHA256())).hex(),
              "public_key": public_pem(mallory.public_key())}
    with pytest.raises(PermissionDenied, match="approval by officer hrss/mallory under a key this worker does not"):
        world.dual.check_minutes(_minutes(world, ceremony_id, [forged], drop=1))
    as_chen = {**forged, "officer": world.who("chen").uri()}  # a known officer, a key of the front end's choosing
    with pytest.raises(PermissionDenied, match="approval by officer hrss/chen under a key"):
        world.dual.check_minutes(_minutes(world, ceremony_id, [as_chen], drop=2))
    with pytest.raises(PermissionDenied, match="show 1 of the 2 approvals"):
        world.dual.check_minutes(_minutes(world, ceremony_id, drop=1))  # "executed" with one approval
    other = world.approved(params={"name": "other", "algorithm": "AES256", "escrow": "no"})
    moved = json.loads(_minutes(world, ceremony_id))
    moved["approvals"][0]["signature"] = world.ceremonies.get(other).approvals[0].signature.hex()
    with pytest.raises(PermissionDenied, match="does not verify over the quoted proposal"):
        world.dual.check_minutes(canonical(moved))  # an approval of another proposal
    moved = json.loads(_minutes(world, ceremony_id))
    moved["proposal"] = moved["proposal"].replace('"other"', '"x"').replace('"mk"', '"mk2"')
    with pytest.raises(PermissionDenied, match="differ from the proposal they quote"):
        world.dual.check_minutes(canonical(moved))


def _copy_under(world: World, ceremony_id: str, new_id: str, state: str = "executing") -> None:
    """What a taken-over front end can do: the approved ceremony's row and approvals again, under another id."""
    engine = world.ceremonies._engine
    with engine.begin() as conn:
        row = dict(conn.execute(sa.select(store.ceremonies).where(
            store.ceremonies.c.ceremony_id == ceremony_id)).mappings().one())
        conn.execute(store.ceremonies.insert().values({**row, "ceremony_id": new_id, "state": state}))
        for approval in conn.execute(sa.select(store.ceremony_approvals).where(
                store.ceremony_approvals.c.ceremony_id == ceremony_id)).mappings().all():
            conn.execute(store.ceremony_approvals.insert().values({**approval, "ceremony_id": new_id}))


def test_an_approved_ceremony_copied_under_another_id_runs_nothing(world: World) -> None:
    ceremony_id = world.approved()
    assert world.executing(ceremony_id) == {"version": 1}
    copy = "C-" + "f" * 16
    _copy_under(world, ceremony_id, copy)
    ran: list[int] = []
    with pytest.raises(PermissionDenied, match="the stored proposal is not this ceremony's"):
        world.dual.run(copy, "create_key", CREATE, lambda: ran.append(1))
    assert ran == []


def test_a_step_run_before_a_restart_of_the_worker_is_not_run_after_it(world: World, tmp_path: Path) -> None:
    journal = tmp_path / "dual-control-hrss.journal"
    before = DualControl("hrss", world.ceremonies, world.officers, world.trust, world.clock, journal=journal)
    ceremony_id = world.approved()
    engine = world.ceremonies._engine
    with engine.begin() as conn:  # executing, as the front end would leave it
        conn.execute(store.ceremonies.update().where(store.ceremonies.c.ceremony_id == ceremony_id).values(
            state="executing"))
    assert before.run(ceremony_id, "create_key", CREATE, lambda: {"version": 1}) == {"version": 1}
    assert oct(journal.stat().st_mode & 0o777) == "0o600"
    after = DualControl("hrss", world.ceremonies, world.officers, world.trust, world.clock, journal=journal)
    ran: list[int] = []
    with pytest.raises(PermissionDenied, match="already ran create_key"):
        after.run(ceremony_id, "create_key", CREATE, lambda: ran.append(1))
    assert ran == []
    journal.write_text("not json\n" + journal.read_text())
    with pytest.raises(ConfigError, match="line 1 is unreadable"):
        DualControl("hrss", world.ceremonies, world.officers, world.trust, world.clock, journal=journal)


def test_minutes_claiming_execution_or_genesis_need_their_approvals(world: World) -> None:
    ceremony_id = world.approved()
    with pytest.raises(PermissionDenied, match="show 0 of the 2 approvals"):
        world.dual.check_minutes(_minutes(world, ceremony_id, state="executing", drop=2))
    record = world.ceremonies.propose(world.who("alice"), "genesis", {"officers": [
        {"name": "alice"}, {"name": "bob"}]}, quorum_required=False)
    with pytest.raises(PermissionDenied, match="need the approval of every officer they list"):
        world.dual.check_minutes(_minutes(world, record.ceremony_id, state="executed"))


SIGNING = {"name": "issuance-sm2", "algorithm": "sm2"}


@pytest.mark.parametrize(("step", "arguments", "refused"), [
    ("generate_signing_key", ("issuance-sm2", "sm2"), None),
    ("generate_signing_key", ("issuance", "sm2"), "name is not what the approved proposal says"),
    ("generate_signing_key", ("issuance-sm2", "ecdsa-p256"), "algorithm is not what the approved proposal says"),
    ("create_key", CREATE, "generate-signing-key does not run create_key"),
])
def test_generate_signing_key_runs_only_the_approved_key_pair(world: World, step: str, arguments: tuple[Any, ...],
                                                               refused: str | None) -> None:
    ceremony_id = world.approved("generate-signing-key", SIGNING)
    if refused is None:
        assert world.executing(ceremony_id, step, arguments) == {"version": 1}
    else:
        with pytest.raises(PermissionDenied, match=refused):
            world.executing(ceremony_id, step, arguments)


def test_a_transport_key_for_rsa_is_refused_when_the_approved_sha256_is_not_the_approved_keys(world: World) -> None:
    """Review revD-1: approvers compare the proposal's public_key_sha256 with the SHA-256 the station's operator read
    out (docs/ceremonies.md 4.4); a front end that proposes another public_key under the station key's SHA-256 must
    not get the transport key wrapped to its own key by the worker."""
    station = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    rogue = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    station_der = station.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    rogue_pem = rogue.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    rogue_der = rogue.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    params = {"bureau": "bureau-a", "method": "rsa-oaep", "station": "urn:kms:station:bureau-a:station-a1",
              "algorithm": "AES256", "public_key": rogue_pem,
              "public_key_sha256": hashlib.sha256(station_der).hexdigest()}
    ceremony_id = world.approved("register-transport-key", params)
    with pytest.raises(PermissionDenied, match="public_key_sha256"):
        world.executing(ceremony_id, "transport_key_for_rsa", ("bureau-a", rogue_der, "AES256"))
