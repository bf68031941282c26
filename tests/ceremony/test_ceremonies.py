"""Ceremonies, persisted (kms.ceremony.store): propose / approve / components / cancel / expire / execute over a real
database, with officers of both domains and a fake operation (the unit seam: the real operations run through gRPC in
test_ceremony_service.py).

A hypothesis state machine drives random sequences, including attacks (another officer's key, an approval replayed
from another ceremony, officers of the other domain), against an independent model; plain tests pin each rule and
run on SQLite always and on PostgreSQL when KMS_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import EngineFactory
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kms import store
from kms.audit.log import AuditLog
from kms.ceremony.officers import OfficerRecord, OfficerStore, public_pem
from kms.ceremony.operations import OPERATIONS
from kms.ceremony.rules import APPROVAL_CONTEXT, Officer, QuorumPolicy
from kms.ceremony.store import (
    EXECUTION_TIMEOUT,
    INTERRUPTED,
    MAX_SEALED_COMPONENT,
    Ceremonies,
    CeremonyRecord,
    CeremonyState,
)
from kms.clock import FixedClock
from kms.errors import AlreadyExists, HsmError, InvalidArgument, InvalidState, KmsError, NotFound, PermissionDenied
from kms.identity import Principal
from kms.registry import DOMAINS

POSTGRES = os.environ.get("KMS_TEST_POSTGRES_URL")
T0 = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC)
QUORUM_FILE = Path(__file__).resolve().parents[2] / "kms" / "policies" / "quorum.yaml"
#: What an approval signs, as docs/ceremonies.md states it (kept independent of kms.ceremony.rules).
CONTEXT = b"kms-ceremony-approval/v1\x00"
#: The quorum rules read straight from the policy file: {(domain, operation): (approvals, role)}.
RULES: dict[tuple[str, str], tuple[int, str]] = {
    (domain, operation): (rule["approvals"], rule["role"])
    for domain, operations in yaml.safe_load(QUORUM_FILE.read_text())["quorums"].items()
    for operation, rule in operations.items()
}
KCV = re.compile(r"[0-9A-F]{6}")


# -- officers -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Staff:
    principal: Principal
    roles: frozenset[str]
    key: ec.EllipticCurvePrivateKey
    enrolled: bool = True

    @property
    def name(self) -> str:
        return self.principal.name

    @property
    def domain(self) -> str:
        assert self.principal.domain is not None
        return self.principal.domain


def _staff(domain: str, name: str, *roles: str, enrolled: bool = True) -> Staff:
    return Staff(Principal("officer", name, domain=domain), frozenset(roles), ec.generate_private_key(ec.SECP256R1()),
                 enrolled)


STAFF: dict[str, Staff] = {s.name: s for s in (
    _staff("hrss", "alice", "approver", "key-custodian"), _staff("hrss", "bob", "approver"),
    _staff("hrss", "chen", "approver"), _staff("hrss", "dong", "key-custodian"),
    _staff("hrss", "erin", "approver", "key-custodian", enrolled=False),  # holds a key but was never enrolled
    _staff("bank", "carol", "approver", "key-custodian"), _staff("bank", "dave", "approver"),
    _staff("bank", "eve", "key-custodian"),
)}
BY_PRINCIPAL = {s.principal: s for s in STAFF.values()}
NAMES = sorted(STAFF)


def enrol_all(officer_store: OfficerStore) -> None:
    for s in STAFF.values():
        if s.enrolled:
            officer_store.enrol(s.principal, s.roles, public_pem(s.key.public_key()), "C-genesis",
                                cert_sha256="0" * 64)


def sign(key: ec.EllipticCurvePrivateKey, digest_hex: str) -> bytes:
    return key.sign(CONTEXT + bytes.fromhex(digest_hex), ec.ECDSA(hashes.SHA256()))


def verifies(who: Staff, signature: bytes, digest_hex: str) -> bool:
    try:
        who.key.public_key().verify(signature, CONTEXT + bytes.fromhex(digest_hex), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


class FakeRun:
    """The operation: records each call (the record it was given) and returns ``result`` or raises ``error``."""

    def __init__(self, result: Mapping[str, Any] | None = None, error: BaseException | None = None,
                 delay: float = 0.0) -> None:
        self.result = dict(result or {"label": "kms/hrss/master/mk/v1", "version": 1, "kcv": "0A1B2C"})
        self.error = error
        self.delay = delay
        self.calls: list[CeremonyRecord] = []
        self._lock = threading.Lock()

    def __call__(self, record: CeremonyRecord) -> Mapping[str, Any]:
        with self._lock:
            self.calls.append(record)
        if self.delay:
            time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.result


def stored_state(engine: sa.Engine, ceremony_id: str) -> str:
    """The state column itself (get() reads an open ceremony past its expiry as expired before any sweep)."""
    with engine.connect() as conn:
        return str(conn.execute(sa.select(store.ceremonies.c.state).where(
            store.ceremonies.c.ceremony_id == ceremony_id)).scalar_one())


def sealed_rows(engine: sa.Engine, ceremony_id: str) -> dict[str, tuple[bytes, str]]:
    """custodian URI → (stored sealed bytes, KCV) of the components sent in to a ceremony."""
    table = store.ceremony_components
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table.c.custodian, table.c.sealed, table.c.kcv).where(
            table.c.ceremony_id == ceremony_id, table.c.direction == "in")).all()
    return {r.custodian: (bytes(r.sealed), r.kcv) for r in rows}


# -- the state machine ----------------------------------------------------------------------------------------------


@dataclass
class Expected:
    """The model of one ceremony."""

    ceremony_id: str
    domain: str
    operation: str
    proposer: Principal
    params: dict[str, Any]
    digest: str
    expires_at: dt.datetime
    state: str = "open"  # open | cancelled | executed | failed | expired (once swept; read so before that)
    approvers: set[Principal] = field(default_factory=set)
    components: dict[Principal, tuple[bytes, str]] = field(default_factory=dict)  # custodian → (sealed sent, KCV)
    counted: set[Principal] = field(default_factory=set)  # the approvals that counted when it was run

    @property
    def custodians(self) -> tuple[str, ...]:
        return tuple(self.params.get("custodians", ()))


PARAMS: dict[str, Callable[[str, str, int], dict[str, Any]]] = {
    "generate-master-key": lambda domain, name, _: {"name": name, "algorithm": "AES256", "escrow": "no"},
    "destroy-key": lambda domain, name, _: {"kind": "master", "name": name, "version": 1},
    "authorize-batch": lambda domain, name, _: {"batch_id": f"B-{name}"},
    # custodians: the domain's two key custodians, or a list naming an officer without the role (never completes)
    "import-master-key": lambda domain, name, pick: {
        "name": name, "algorithm": "AES256", "escrow": "no", "kcv": "0A1B2C",
        "custodians": [["alice", "dong"], ["alice", "bob"]][pick] if domain == "hrss"
        else [["carol", "eve"], ["carol", "dave"]][pick]},
}


class CeremonyMachine(RuleBasedStateMachine):
    """Random protocol runs over a fresh database per example; after every step the stored ceremonies agree with the
    model, and every executed ceremony carries a quorum of valid, timely approvals by its own domain's officers."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="kms-ceremonies-")
        self.engine = store.make_engine(f"sqlite:///{self.tmp}/kms.db")
        store.upgrade(self.engine)
        self.clock = FixedClock(T0)
        self.officer_store = OfficerStore(self.engine, self.clock)
        enrol_all(self.officer_store)
        self.ceremonies = Ceremonies(self.engine, self.clock, QuorumPolicy.load(), self.officer_store)
        self.model: list[Expected] = []
        self.runs: Counter[str] = Counter()
        self.ran: set[str] = set()  # ceremonies the model says were run (executed or failed)
        self.verified: set[tuple[str, str, bytes]] = set()
        self.revoked: set[Principal] = set()

    def active(self, s: Staff) -> bool:
        return s.enrolled and s.principal not in self.revoked

    def teardown(self) -> None:
        self.engine.dispose()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------------------------------

    def effective(self, c: Expected) -> str:
        if c.state == "open" and self.clock.now() >= c.expires_at:
            return "expired"
        return c.state

    def expect(self, refusals: Sequence[type[KmsError]], call: Callable[[], CeremonyRecord]) -> CeremonyRecord | None:
        """Succeeds when the model sees no reason to refuse; otherwise raises one of the reasons' errors."""
        if not refusals:
            return call()
        with pytest.raises(tuple(refusals)):
            call()
        return None

    def pick(self, data: st.DataObject) -> Expected:
        return self.model[data.draw(st.integers(0, len(self.model) - 1), label="ceremony")]

    def run_for(self, outcome: str) -> Callable[[CeremonyRecord], Mapping[str, Any]]:
        def run(record: CeremonyRecord) -> Mapping[str, Any]:
            self.runs[record.ceremony_id] += 1
            assert record.state is CeremonyState.EXECUTING
            if outcome == "kms-error":
                raise HsmError("the token refused C_GenerateKey")
            if outcome == "crash":
                raise RuntimeError("unexpected: secret-0xdeadbeef")
            return {"label": f"kms/{record.domain}/master/x/v1", "version": 1}
        return run

    # -- rules -------------------------------------------------------------------------------------------------

    @precondition(lambda self: len(self.model) < 6)
    @rule(who=st.sampled_from(NAMES), operation=st.sampled_from(sorted(PARAMS)), name=st.sampled_from(["mk", "pk"]),
          pick=st.integers(0, 1), ttl_minutes=st.sampled_from([1, 60, 24 * 60, 24 * 60]))
    def propose(self, who: str, operation: str, name: str, pick: int, ttl_minutes: int) -> None:
        s = STAFF[who]
        params = PARAMS[operation](s.domain, name, pick)
        ttl = dt.timedelta(minutes=ttl_minutes)
        record = self.expect([] if self.active(s) else [PermissionDenied],
                             lambda: self.ceremonies.propose(s.principal, operation, params, ttl))
        if record is None:
            return
        now = self.clock.now()
        assert (record.state, record.domain, record.operation, dict(record.params)) == (
            CeremonyState.OPEN, s.domain, operation, params)
        assert (record.proposal.proposer, record.proposal.created_at, record.proposal.expires_at) == (
            s.principal, now, now + ttl)
        assert record.digest == hashlib.sha256(record.encoding).hexdigest()
        self.model.append(Expected(record.ceremony_id, s.domain, operation, s.principal, params, record.digest,
                                   now + ttl))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), who=st.sampled_from(NAMES),
          attack=st.sampled_from(["none", "none", "another-key", "replay"]))
    def approve(self, data: st.DataObject, who: str, attack: str) -> None:
        """Any officer, possibly of the other domain, possibly signing with another's key or another digest."""
        c = self.pick(data)
        s = STAFF[who]
        key, digest = s.key, c.digest
        if attack == "another-key":
            key = STAFF[data.draw(st.sampled_from([n for n in NAMES if n != who]), label="key of")].key
        elif attack == "replay":
            digest = self.pick(data).digest  # possibly the same proposal content, hence the same digest
        self.try_approve(c, s, key, digest)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def rally(self, data: st.DataObject) -> None:
        """Every officer of the ceremony's own domain approves it with their own key (so that quorums are reached
        often); the model says which of them the service must refuse."""
        c = self.pick(data)
        for s in STAFF.values():
            if s.domain == c.domain:
                self.try_approve(c, s, s.key, c.digest)

    def try_approve(self, c: Expected, s: Staff, key: ec.EllipticCurvePrivateKey, digest: str) -> None:
        valid = key is s.key and digest == c.digest
        refusals: list[type[KmsError]] = []
        if self.effective(c) != "open":
            refusals.append(InvalidState)
        if (not self.active(s) or s.domain != c.domain or s.principal == c.proposer
                or RULES[(c.domain, c.operation)][1] not in s.roles):
            refusals.append(PermissionDenied)
        if not valid:
            refusals.append(InvalidArgument)
        if s.principal in c.approvers:
            refusals.append(AlreadyExists)
        signature = sign(key, digest)
        if self.expect(refusals, lambda: self.ceremonies.approve(c.ceremony_id, s.principal, signature)) is not None:
            c.approvers.add(s.principal)

    @precondition(lambda self: any(c.custodians for c in self.model))
    @rule(data=st.data(), who=st.sampled_from(NAMES), kcv=st.sampled_from(["ABC123", "abc123", "12345", "XYZ123"]),
          body=st.binary(min_size=0, max_size=24), worker_refuses=st.booleans())
    def add_component(self, data: st.DataObject, who: str, kcv: str, body: bytes, worker_refuses: bool) -> None:
        """Anyone sends a component, well-formed or not; the domain worker's check may refuse it."""
        c = data.draw(st.sampled_from([c for c in self.model if c.custodians]), label="import ceremony")
        self.try_add_component(c, STAFF[who], kcv, b"sealed component:" + body if body else b"", worker_refuses)

    @precondition(lambda self: any(c.custodians for c in self.model))
    @rule(data=st.data())
    def custodians_deliver(self, data: st.DataObject) -> None:
        """The custodians named in an import ceremony send well-formed components."""
        c = data.draw(st.sampled_from([c for c in self.model if c.custodians]), label="import ceremony")
        for name in c.custodians:
            self.try_add_component(c, STAFF[name], "0A1B2C", f"{name}'s component".encode(), False)

    def try_add_component(self, c: Expected, s: Staff, kcv: str, sealed: bytes, worker_refuses: bool) -> None:
        refusals: list[type[KmsError]] = []
        if self.effective(c) != "open":
            refusals.append(InvalidState)
        if not KCV.fullmatch(kcv.upper()) or not sealed:
            refusals.append(InvalidArgument)
        legitimate = (self.active(s) and s.domain == c.domain and s.name in c.custodians
                      and "key-custodian" in s.roles)
        if not legitimate:
            refusals.append(PermissionDenied)
        if s.principal in c.components:
            refusals.append(AlreadyExists)
        if worker_refuses and not refusals:
            refusals.append(InvalidArgument)
        reached: list[bool] = []

        def check(record: CeremonyRecord, got: bytes, got_kcv: str) -> None:
            reached.append(True)
            assert (record.ceremony_id, got, got_kcv) == (c.ceremony_id, sealed, kcv.upper())
            if worker_refuses:
                raise InvalidArgument("kcv", "does not match the component")

        stored = self.expect(refusals, lambda: self.ceremonies.add_component(c.ceremony_id, s.principal, sealed, kcv,
                                                                            check))
        if reached:
            assert legitimate and self.effective(c) == "open", "the worker was given a component to refuse"
        if stored is not None:
            assert reached
            c.components[s.principal] = (sealed, kcv.upper())

    @precondition(lambda self: self.model)
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "ok", "kms-error", "crash"]))
    def see_it_through(self, data: st.DataObject, outcome: str) -> None:
        """The domain's officers approve, the custodians deliver, the proposer executes: it runs unless the model
        knows why not (another domain cannot help, too few eligible officers, expired, cancelled, already run)."""
        c = self.pick(data)
        for s in STAFF.values():
            if s.domain == c.domain:
                self.try_approve(c, s, s.key, c.digest)
        for name in c.custodians:
            self.try_add_component(c, STAFF[name], "0A1B2C", f"{name}'s component".encode(), False)
        self.try_execute(c, BY_PRINCIPAL[c.proposer], outcome)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), who=st.sampled_from(NAMES))
    def cancel(self, data: st.DataObject, who: str) -> None:
        c = self.pick(data)
        s = STAFF[who]
        refusals: list[type[KmsError]] = []
        if self.effective(c) != "open":
            refusals.append(InvalidState)
        if s.domain != c.domain or not self.active(s):
            refusals.append(PermissionDenied)
        if self.expect(refusals, lambda: self.ceremonies.cancel(c.ceremony_id, s.principal)) is not None:
            c.state = "cancelled"

    @rule(minutes=st.sampled_from([1, 5, 30, 59, 60]))
    def wait(self, minutes: int) -> None:
        self.clock.advance(dt.timedelta(minutes=minutes))

    @precondition(lambda self: not self.revoked)
    @rule(who=st.sampled_from([n for n in NAMES if STAFF[n].enrolled]))
    def revoke(self, who: str) -> None:
        """An officer is revoked (what an executed revoke-officer ceremony does): from now on they count for
        nothing, and approvals they already gave stop counting."""
        self.officer_store.revoke(STAFF[who].principal)
        self.revoked.add(STAFF[who].principal)

    @rule()
    def sweep(self) -> None:
        """What a replica does at start and before each change: record expiry, erasing encrypted components."""
        self.ceremonies.sweep()
        for c in self.model:
            if self.effective(c) == "expired":
                c.state = "expired"

    @precondition(lambda self: self.model)
    @rule(data=st.data(), who=st.sampled_from([*NAMES, "the proposer", "the proposer"]),
          outcome=st.sampled_from(["ok", "ok", "kms-error", "crash"]))
    def execute(self, data: st.DataObject, who: str, outcome: str) -> None:
        c = self.pick(data)
        self.try_execute(c, BY_PRINCIPAL[c.proposer] if who == "the proposer" else STAFF[who], outcome)

    def try_execute(self, c: Expected, s: Staff, outcome: str) -> None:
        required, role = RULES[(c.domain, c.operation)]
        counted = {a for a in c.approvers if self.active(BY_PRINCIPAL[a]) and a.domain == c.domain
                   and a != c.proposer and role in BY_PRINCIPAL[a].roles}
        missing = {n for n in c.custodians if Principal("officer", n, domain=c.domain) not in c.components}
        refusals: list[type[KmsError]] = []
        if self.effective(c) != "open" or len(counted) < required or missing:
            refusals.append(InvalidState)
        if not self.active(s) or s.domain != c.domain:
            refusals.append(PermissionDenied)
        run = self.run_for(outcome)
        if refusals:
            self.expect(refusals, lambda: self.ceremonies.execute(c.ceremony_id, s.principal, run))
            return
        self.ran.add(c.ceremony_id)
        c.counted = counted
        if outcome == "ok":
            done = self.ceremonies.execute(c.ceremony_id, s.principal, run)
            assert (done.state, done.closed_by) == (CeremonyState.EXECUTED, s.principal.uri())
            c.state = "executed"
            return
        with pytest.raises(HsmError if outcome == "kms-error" else RuntimeError):
            self.ceremonies.execute(c.ceremony_id, s.principal, run)
        c.state = "failed"

    # -- invariants --------------------------------------------------------------------------------------------

    @invariant()
    def the_store_agrees_with_the_model(self) -> None:
        for c in self.model:
            record = self.ceremonies.get(c.ceremony_id)
            assert record.state.value == self.effective(c), (c, record)
            if c.state != "open":
                assert stored_state(self.engine, c.ceremony_id) == c.state
            assert record.digest == c.digest == hashlib.sha256(record.encoding).hexdigest()
            doc = json.loads(record.encoding)
            assert (doc["domain"], doc["operation"], doc["params"], doc["proposer"]) == (
                c.domain, c.operation, c.params, c.proposer.uri())
            assert {a.officer for a in record.approvals} == c.approvers
            assert len(record.approvals) == len(c.approvers)
            assert {x.custodian: x.kcv for x in record.components} == {k: v[1] for k, v in c.components.items()}
            assert self.runs[c.ceremony_id] == (1 if c.ceremony_id in self.ran else 0)
            if record.state is CeremonyState.FAILED:
                assert record.error in ("the token refused C_GenerateKey", "internal error; see the server log")
            if record.state is CeremonyState.EXECUTED:
                assert record.result is not None and record.error is None
                assert record.result["label"] == f"kms/{c.domain}/master/x/v1"

    @invariant()
    def only_timely_quorums_of_the_own_domain_run(self) -> None:
        for c in self.model:
            record = self.ceremonies.get(c.ceremony_id)
            expires = record.proposal.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
            required, role = RULES[(c.domain, c.operation)]
            signers = set()
            for a in record.approvals:
                assert a.officer.domain == c.domain and a.officer != c.proposer
                who = BY_PRINCIPAL[a.officer]
                if (c.digest, a.officer.uri(), a.signature) not in self.verified:
                    assert verifies(who, a.signature, c.digest), f"{a.officer} did not sign {c.ceremony_id}"
                    self.verified.add((c.digest, a.officer.uri(), a.signature))
                assert a.at < expires
                if role in who.roles:
                    signers.add(a.officer)
            if record.state in (CeremonyState.EXECUTED, CeremonyState.FAILED):
                assert record.closed_at is not None
                assert all(a.at <= record.closed_at for a in record.approvals)
                assert record.closed_at < expires
                assert len(signers) >= required  # distinct, eligible, own domain, not the proposer, valid
                assert self.runs[c.ceremony_id] == 1
                # the result names the approvals that counted when execution began: a quorum of those signers
                assert record.result is not None and record.result["required"] == required
                counted = record.result["approved_by"]
                assert len(set(counted)) == len(counted) >= required
                assert set(counted) <= {p.uri() for p in signers}
                assert set(counted) == {p.uri() for p in c.counted}
        assert set(self.runs) == self.ran and all(n == 1 for n in self.runs.values())

    @invariant()
    def sealed_components_live_only_while_the_ceremony_is_open(self) -> None:
        for c in self.model:
            if not c.components:
                continue
            rows = sealed_rows(self.engine, c.ceremony_id)
            assert set(rows) == {p.uri() for p in c.components}
            for who, (sent, kcv) in c.components.items():
                stored, stored_kcv = rows[who.uri()]
                assert stored_kcv == kcv
                if c.state in ("cancelled", "executed", "failed", "expired"):
                    assert stored == b"" != sent  # erased: custodian and KCV stay
                elif c.state == "open" and self.effective(c) == "open":
                    assert stored == sent


TestCeremonyMachine = CeremonyMachine.TestCase
TestCeremonyMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])


# -- plain tests on every backend -----------------------------------------------------------------------------------


@dataclass
class World:
    make: EngineFactory
    engine: sa.Engine
    clock: FixedClock
    officers: OfficerStore
    ceremonies: Ceremonies

    def replica(self) -> Ceremonies:
        """Another service replica: its own engine on the same database, the same clock."""
        engine = self.make()
        return Ceremonies(engine, self.clock, QuorumPolicy.load(), OfficerStore(engine, self.clock))

    def propose(self, who: str, operation: str = "generate-master-key", params: Mapping[str, Any] | None = None,
                ttl: dt.timedelta = dt.timedelta(hours=1)) -> CeremonyRecord:
        chosen = dict(params) if params is not None else {"name": "mk", "algorithm": "AES256", "escrow": "no"}
        return self.ceremonies.propose(STAFF[who].principal, operation, chosen, ttl)

    def approve(self, ceremony_id: str, *names: str) -> CeremonyRecord:
        record = self.ceremonies.get(ceremony_id)
        for name in names:
            record = self.ceremonies.approve(ceremony_id, STAFF[name].principal, sign(STAFF[name].key, record.digest))
        return record

    def revoke(self, name: str) -> None:
        self.officers.revoke(STAFF[name].principal)


@pytest.fixture
def world(backend: EngineFactory) -> World:
    engine = backend()
    clock = FixedClock(T0)
    officer_store = OfficerStore(engine, clock)
    enrol_all(officer_store)
    return World(backend, engine, clock, officer_store, Ceremonies(engine, clock, QuorumPolicy.load(), officer_store))


def officer(name: str) -> Principal:
    return STAFF[name].principal


COUNTED_BOB_CHEN = {"approved_by": [STAFF["bob"].principal.uri(), STAFF["chen"].principal.uri()], "required": 2}
IMPORT = {"name": "mk", "algorithm": "AES256", "escrow": "no", "kcv": "0A1B2C", "custodians": ["alice", "dong"]}


def test_a_quorum_of_the_domain_runs_the_operation_once(world: World) -> None:
    proposed = world.propose("alice")
    assert (proposed.state, proposed.proposal.created_at, proposed.proposal.expires_at) == (
        CeremonyState.OPEN, T0, T0 + dt.timedelta(hours=1))
    assert proposed.digest == hashlib.sha256(proposed.encoding).hexdigest()
    world.approve(proposed.ceremony_id, "bob")
    run = FakeRun()
    with pytest.raises(InvalidState, match="has 1 of the 2 approvals"):
        world.ceremonies.execute(proposed.ceremony_id, officer("alice"), run)
    world.approve(proposed.ceremony_id, "chen")
    done = world.ceremonies.execute(proposed.ceremony_id, officer("dong"), run)  # any officer of the domain
    assert [r.ceremony_id for r in run.calls] == [proposed.ceremony_id]
    assert run.calls[0].state is CeremonyState.EXECUTING
    counted = {"approved_by": [officer("bob").uri(), officer("chen").uri()], "required": 2}
    assert (done.state, done.result, done.error, done.closed_by) == (
        CeremonyState.EXECUTED, {**run.result, **counted}, None, officer("dong").uri())
    assert [a.officer for a in done.approvals] == [officer("bob"), officer("chen")]
    refusals: list[Callable[[], object]] = [
        lambda: world.ceremonies.execute(proposed.ceremony_id, officer("alice"), run),
        lambda: world.approve(proposed.ceremony_id, "alice"),
        lambda: world.ceremonies.cancel(proposed.ceremony_id, officer("alice")),
    ]
    for refused in refusals:
        with pytest.raises(InvalidState, match="executed"):
            refused()
    assert len(run.calls) == 1


def test_approvals_are_refused_with_the_reason(world: World) -> None:
    first = world.propose("alice")
    second = world.propose("alice", params={"name": "other", "algorithm": "AES256", "escrow": "no"})
    cid = first.ceremony_id
    cases: list[tuple[str, bytes, type[KmsError], str]] = [
        ("alice", sign(STAFF["alice"].key, first.digest), PermissionDenied, "proposer does not count"),
        ("carol", sign(STAFF["carol"].key, first.digest), PermissionDenied, "hrss domain"),
        ("dong", sign(STAFF["dong"].key, first.digest), PermissionDenied, "lacks the approver role"),
        ("erin", sign(STAFF["erin"].key, first.digest), PermissionDenied, "not an enrolled officer"),
        ("bob", sign(STAFF["chen"].key, first.digest), InvalidArgument, "signature"),  # another officer's key
        ("bob", sign(STAFF["bob"].key, second.digest), InvalidArgument, "signature"),  # replayed from another
        ("bob", b"\x30\x00", InvalidArgument, "signature"),
    ]
    for who, signature, error, reason in cases:
        with pytest.raises(error, match=reason):
            world.ceremonies.approve(cid, officer(who), signature)
    assert world.ceremonies.get(cid).approvals == ()
    world.approve(cid, "bob")
    with pytest.raises(AlreadyExists, match="already approved"):
        world.approve(cid, "bob")
    assert [a.officer for a in world.ceremonies.get(cid).approvals] == [officer("bob")]
    with pytest.raises(NotFound):
        world.ceremonies.approve("C-0000000000000000", officer("bob"), b"x")
    with pytest.raises(InvalidArgument, match="ceremony_id"):
        world.ceremonies.get("C-nope")


def test_officers_of_the_other_domain_touch_nothing(world: World) -> None:
    c = world.propose("carol")
    assert c.domain == "bank"
    for name in ("alice", "bob"):
        with pytest.raises(PermissionDenied):
            world.approve(c.ceremony_id, name)
        with pytest.raises(PermissionDenied):
            world.ceremonies.cancel(c.ceremony_id, officer(name))
    world.approve(c.ceremony_id, "dave")
    with pytest.raises(InvalidState):  # carol is the proposer and eve lacks the approver role: 1 of 2
        world.ceremonies.execute(c.ceremony_id, officer("carol"), FakeRun())
    with pytest.raises(PermissionDenied):
        world.ceremonies.execute(c.ceremony_id, officer("alice"), FakeRun())
    with pytest.raises(InvalidArgument, match="has no quorum rule"):
        world.propose("alice", "format-hsm", {})
    assert world.ceremonies.list("hrss") == []


def test_an_expired_ceremony_accepts_nothing(world: World) -> None:
    c = world.propose("bob", "import-master-key", IMPORT)
    world.approve(c.ceremony_id, "alice")
    world.clock.advance(dt.timedelta(hours=1) - dt.timedelta(seconds=1))
    assert world.ceremonies.get(c.ceremony_id).state is CeremonyState.OPEN
    world.clock.advance(dt.timedelta(seconds=1))
    assert world.ceremonies.get(c.ceremony_id).state is CeremonyState.EXPIRED
    run = FakeRun()
    refusals: list[Callable[[], object]] = [
        lambda: world.approve(c.ceremony_id, "dong"),
        lambda: world.ceremonies.add_component(c.ceremony_id, officer("alice"), b"sealed", "ABC123"),
        lambda: world.ceremonies.execute(c.ceremony_id, officer("bob"), run),
        lambda: world.ceremonies.cancel(c.ceremony_id, officer("bob")),
    ]
    for refused in refusals:
        with pytest.raises(InvalidState, match="expired"):
            refused()
    assert run.calls == []
    record = world.ceremonies.get(c.ceremony_id)
    assert (record.state, [a.officer for a in record.approvals], record.components) == (
        CeremonyState.EXPIRED, [officer("alice")], ())


def test_a_quorum_reached_in_time_cannot_execute_after_expiry(world: World) -> None:
    c = world.propose("alice", ttl=dt.timedelta(minutes=1))
    world.approve(c.ceremony_id, "bob", "chen")
    world.clock.advance(dt.timedelta(minutes=1))
    run = FakeRun()
    with pytest.raises(InvalidState, match="expired"):
        world.ceremonies.execute(c.ceremony_id, officer("alice"), run)
    assert run.calls == [] and world.ceremonies.get(c.ceremony_id).state is CeremonyState.EXPIRED


@pytest.mark.parametrize("seconds", [-60, 0, 59, 7 * 24 * 3600 + 1, 30 * 24 * 3600])
def test_ttl_out_of_bounds_is_refused(world: World, seconds: int) -> None:
    with pytest.raises(InvalidArgument) as refused:
        world.propose("alice", ttl=dt.timedelta(seconds=seconds))
    assert refused.value.field == "ttl_seconds"
    assert world.ceremonies.list("hrss") == []


@pytest.mark.parametrize("seconds", [60, 24 * 3600, 7 * 24 * 3600])
def test_ttl_within_bounds_sets_the_expiry(world: World, seconds: int) -> None:
    c = world.propose("alice", ttl=dt.timedelta(seconds=seconds))
    assert c.proposal.expires_at == T0 + dt.timedelta(seconds=seconds)
    world.clock.advance(dt.timedelta(seconds=seconds - 1))
    assert world.ceremonies.get(c.ceremony_id).state is CeremonyState.OPEN
    world.clock.advance(dt.timedelta(seconds=1))
    assert world.ceremonies.get(c.ceremony_id).state is CeremonyState.EXPIRED


def test_unenrolled_and_revoked_officers_cannot_propose_or_approve(world: World) -> None:
    with pytest.raises(PermissionDenied, match="not an enrolled officer"):
        world.propose("erin")
    c = world.propose("alice")
    with pytest.raises(PermissionDenied, match="not an enrolled officer"):
        world.approve(c.ceremony_id, "erin")
    with pytest.raises(PermissionDenied, match="not an enrolled officer"):
        world.ceremonies.execute(c.ceremony_id, officer("erin"), FakeRun())
    world.revoke("chen")
    with pytest.raises(PermissionDenied, match="not an active officer"):
        world.propose("chen")
    with pytest.raises(PermissionDenied, match="not an active officer"):
        world.approve(c.ceremony_id, "chen")
    with pytest.raises(PermissionDenied, match="not an active officer"):
        world.ceremonies.execute(c.ceremony_id, officer("chen"), FakeRun())
    with pytest.raises(PermissionDenied):
        world.ceremonies.propose(Principal("auditor", "audrey"), "generate-master-key", {"name": "mk"})
    assert [r.ceremony_id for r in world.ceremonies.list("hrss")] == [c.ceremony_id]
    assert world.ceremonies.get(c.ceremony_id).approvals == ()


def test_an_approval_stops_counting_when_its_officer_is_revoked(world: World) -> None:
    c = world.propose("alice")
    world.approve(c.ceremony_id, "bob", "chen")
    world.revoke("chen")
    run = FakeRun()
    with pytest.raises(InvalidState, match="1 of the 2 approvals"):
        world.ceremonies.execute(c.ceremony_id, officer("alice"), run)
    assert run.calls == [] and world.ceremonies.get(c.ceremony_id).state is CeremonyState.OPEN


def test_the_proposer_or_any_officer_of_the_domain_cancels(world: World) -> None:
    mine = world.propose("alice")
    theirs = world.propose("alice")
    assert world.ceremonies.cancel(mine.ceremony_id, officer("alice")).state is CeremonyState.CANCELLED
    cancelled = world.ceremonies.cancel(theirs.ceremony_id, officer("dong"))
    assert (cancelled.state, cancelled.closed_by) == (CeremonyState.CANCELLED, officer("dong").uri())
    with pytest.raises(InvalidState, match="cancelled"):
        world.approve(theirs.ceremony_id, "bob")
    with pytest.raises(InvalidState, match="cancelled"):
        world.ceremonies.cancel(theirs.ceremony_id, officer("bob"))


@pytest.mark.parametrize("who", ["erin", "chen"])  # never enrolled; revoked
def test_an_unenrolled_or_revoked_officer_cannot_cancel(world: World, who: str) -> None:
    c = world.propose("alice")
    world.revoke("chen")
    with pytest.raises(PermissionDenied, match=r"not an (enrolled|active) officer"):
        world.ceremonies.cancel(c.ceremony_id, officer(who))
    assert world.ceremonies.get(c.ceremony_id).state is CeremonyState.OPEN


def test_an_operation_failing_with_a_kms_error_fails_the_ceremony(world: World) -> None:
    c = world.propose("alice")
    world.approve(c.ceremony_id, "bob", "chen")
    error = HsmError("the token refused C_GenerateKey (CKR_DEVICE_MEMORY)")
    run = FakeRun(error=error)
    with pytest.raises(HsmError) as raised:
        world.ceremonies.execute(c.ceremony_id, officer("bob"), run)
    assert raised.value is error
    record = world.ceremonies.get(c.ceremony_id)
    assert (record.state, record.error, record.result) == (
        CeremonyState.FAILED, "the token refused C_GenerateKey (CKR_DEVICE_MEMORY)", COUNTED_BOB_CHEN)
    with pytest.raises(InvalidState, match="failed"):
        world.ceremonies.execute(c.ceremony_id, officer("bob"), run)
    assert len(run.calls) == 1


def test_an_unexpected_exception_fails_the_ceremony_without_its_text(world: World) -> None:
    c = world.propose("alice")
    world.approve(c.ceremony_id, "bob", "chen")
    run = FakeRun(error=RuntimeError("pin=1234 key=00112233445566778899AABBCCDDEEFF"))
    with pytest.raises(RuntimeError, match="pin=1234"):
        world.ceremonies.execute(c.ceremony_id, officer("bob"), run)
    record = world.ceremonies.get(c.ceremony_id)
    assert (record.state, record.error, record.result) == (
        CeremonyState.FAILED, "internal error; see the server log", COUNTED_BOB_CHEN)
    with world.engine.connect() as conn:
        row = conn.execute(sa.select(store.ceremonies).where(
            store.ceremonies.c.ceremony_id == c.ceremony_id)).one()
    assert not any(isinstance(v, str) and ("1234" in v or "AABB" in v) for v in row._mapping.values())
    assert len(run.calls) == 1


def race_execute(world: World, ceremony_id: str, run: FakeRun, contenders: int = 2) -> list[object]:
    """Each replica executes the ceremony at the same moment; what each one got back (a record or a kms error)."""
    replicas = [world.replica() for _ in range(contenders)]
    for r in replicas:  # connect before the start line, so that the calls themselves line up
        r.get(ceremony_id)
    start = threading.Barrier(contenders)
    outcomes: list[object] = [None] * contenders

    def execute(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = replicas[i].execute(ceremony_id, officer("dong"), run)
        except KmsError as error:
            outcomes[i] = error

    threads = [threading.Thread(target=execute, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcomes


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_racing_replicas_execute_a_ceremony_once(world: World, delay: float) -> None:
    for _ in range(3):
        c = world.propose("alice")
        world.approve(c.ceremony_id, "bob", "chen")
        run = FakeRun(delay=delay)
        outcomes = race_execute(world, c.ceremony_id, run)
        assert len(run.calls) == 1, outcomes
        winners = [o for o in outcomes if isinstance(o, CeremonyRecord)]
        assert len(winners) == 1 and winners[0].state is CeremonyState.EXECUTED, outcomes
        assert sum(isinstance(o, InvalidState) for o in outcomes) == 1, outcomes
        assert world.ceremonies.get(c.ceremony_id).state is CeremonyState.EXECUTED


def test_components_come_from_the_named_custodians_once_each(world: World) -> None:
    c = world.propose("bob", "import-master-key", IMPORT)
    cid = c.ceremony_id
    add = world.ceremonies.add_component
    with pytest.raises(PermissionDenied, match="not a custodian named"):
        add(cid, officer("chen"), b"sealed", "ABC123")
    with pytest.raises(PermissionDenied, match="not an officer of the hrss domain"):
        add(cid, officer("carol"), b"sealed", "ABC123")
    with pytest.raises(PermissionDenied, match="not an officer of the hrss domain"):  # the name alone is not enough
        add(cid, Principal("officer", "alice", domain="bank"), b"sealed", "ABC123")
    for bad in ("", "12345", "1234567", "GGGGGG", "AB CD1"):
        with pytest.raises(InvalidArgument) as refused:
            add(cid, officer("alice"), b"sealed", bad)
        assert refused.value.field == "kcv"
    for size in (0, MAX_SEALED_COMPONENT + 1):
        with pytest.raises(InvalidArgument, match="encrypted_component"):
            add(cid, officer("alice"), b"s" * size, "ABC123")
    seen: list[tuple[str, bytes, str]] = []

    def refuse(record: CeremonyRecord, sealed: bytes, kcv: str) -> None:
        seen.append((record.ceremony_id, sealed, kcv))
        raise InvalidArgument("kcv", "does not match the decrypted component")

    with pytest.raises(InvalidArgument, match="does not match"):
        add(cid, officer("alice"), b"alice's component", "abc123", refuse)
    assert seen == [(cid, b"alice's component", "ABC123")]
    assert world.ceremonies.get(cid).components == () and sealed_rows(world.engine, cid) == {}

    accepted: list[str] = []
    record = add(cid, officer("alice"), b"alice's component", "abc123", lambda r, s, k: accepted.append(k))
    assert accepted == ["ABC123"]
    assert [(x.custodian, x.kcv) for x in record.components] == [(officer("alice"), "ABC123")]
    with pytest.raises(AlreadyExists, match="already submitted"):
        add(cid, officer("alice"), b"another component", "DEF456")
    assert sealed_rows(world.engine, cid) == {officer("alice").uri(): (b"alice's component", "ABC123")}

    world.approve(cid, "alice", "dong")  # import: two key custodians besides the proposer
    run = FakeRun()
    with pytest.raises(InvalidState, match="still needs the components of dong"):
        world.ceremonies.execute(cid, officer("bob"), run)
    assert run.calls == []
    add(cid, officer("dong"), b"dong's component", "0F0F0F")
    done = world.ceremonies.execute(cid, officer("bob"), run)
    assert done.state is CeremonyState.EXECUTED and len(run.calls) == 1
    assert {x.custodian: x.kcv for x in run.calls[0].components} == {officer("alice"): "ABC123",
                                                                     officer("dong"): "0F0F0F"}


class MeddlingOfficers(OfficerStore):
    """An officer store that runs ``meddle`` (once) the first time the protocol reads an officer or the domain's
    officers: a deterministic way to let another replica act between a step's checks and its write."""

    def __init__(self, engine: sa.Engine, clock: FixedClock) -> None:
        super().__init__(engine, clock)
        self.meddle: Callable[[], object] | None = None

    def _once(self) -> None:
        meddle, self.meddle = self.meddle, None
        if meddle is not None:
            meddle()

    def get(self, principal: Principal) -> OfficerRecord:
        self._once()
        return super().get(principal)

    def active(self, domain: str) -> Mapping[Principal, Officer]:
        self._once()
        return super().active(domain)


def meddled(world: World) -> tuple[Ceremonies, MeddlingOfficers]:
    officers = MeddlingOfficers(world.engine, world.clock)
    return Ceremonies(world.engine, world.clock, QuorumPolicy.load(), officers), officers


def test_an_approval_cannot_land_on_a_ceremony_cancelled_meanwhile(world: World) -> None:
    c = world.propose("alice")
    ceremonies, officers = meddled(world)
    officers.meddle = lambda: world.replica().cancel(c.ceremony_id, officer("chen"))
    with pytest.raises(InvalidState, match="no longer open"):
        ceremonies.approve(c.ceremony_id, officer("bob"), sign(STAFF["bob"].key, c.digest))
    record = world.ceremonies.get(c.ceremony_id)
    assert (record.state, record.approvals) == (CeremonyState.CANCELLED, ())


def test_a_component_cannot_land_on_a_ceremony_cancelled_while_the_worker_checked_it(world: World) -> None:
    c = world.propose("bob", "import-master-key", IMPORT)

    def cancel_meanwhile(record: CeremonyRecord, sealed: bytes, kcv: str) -> None:
        world.replica().cancel(c.ceremony_id, officer("chen"))

    with pytest.raises(InvalidState, match="no longer open"):
        world.ceremonies.add_component(c.ceremony_id, officer("alice"), b"alice's component", "ABC123",
                                       cancel_meanwhile)
    assert world.ceremonies.get(c.ceremony_id).components == () and sealed_rows(world.engine, c.ceremony_id) == {}


def test_an_execution_does_not_start_on_a_ceremony_cancelled_meanwhile(world: World) -> None:
    c = world.propose("alice")
    world.approve(c.ceremony_id, "bob", "chen")
    ceremonies, officers = meddled(world)
    ceremonies.get(c.ceremony_id)
    officers.meddle = lambda: world.replica().cancel(c.ceremony_id, officer("chen"))
    run = FakeRun()
    with pytest.raises(InvalidState, match="cancelled"):
        ceremonies.execute(c.ceremony_id, officer("dong"), run)
    assert run.calls == [] and world.ceremonies.get(c.ceremony_id).state is CeremonyState.CANCELLED


def test_the_next_change_records_expiry_and_erases_components(world: World) -> None:
    c = world.propose("bob", "import-master-key", IMPORT, ttl=dt.timedelta(minutes=10))
    world.ceremonies.add_component(c.ceremony_id, officer("alice"), b"alice's sealed component", "ABC123")
    world.clock.advance(dt.timedelta(minutes=10))
    assert world.ceremonies.get(c.ceremony_id).state is CeremonyState.EXPIRED  # at once, before any sweep
    world.replica().propose(officer("chen"), "generate-master-key", {"name": "other"})  # any replica, any change
    record = world.ceremonies.get(c.ceremony_id)
    assert (record.state, stored_state(world.engine, c.ceremony_id)) == (CeremonyState.EXPIRED, "expired")
    assert record.closed_at == "2026-11-26T09:10:00Z"
    assert [(x.custodian, x.kcv) for x in record.components] == [(officer("alice"), "ABC123")]
    (stored, kcv), = sealed_rows(world.engine, c.ceremony_id).values()
    assert (stored, kcv) == (b"", "ABC123")
    world.ceremonies.sweep()  # idempotent
    assert world.ceremonies.get(c.ceremony_id) == record


def test_sweep_fails_an_execution_interrupted_for_longer_than_the_timeout(world: World) -> None:
    """SQLite: an execution running for longer than EXECUTION_TIMEOUT is taken to be interrupted (its outcome, when
    it comes, still counts); PostgreSQL knows the execution is alive (test_replica_processes_…, below)."""
    c = world.propose("alice")
    world.approve(c.ceremony_id, "bob", "chen")
    seen: list[tuple[str, str | None]] = []

    def slow(record: CeremonyRecord) -> Mapping[str, Any]:
        other = world.replica()
        for minutes in (14, 2):  # 14 minutes in: still executing; 16 minutes in: taken to be interrupted
            world.clock.advance(dt.timedelta(minutes=minutes))
            other.sweep()
            now = other.get(record.ceremony_id)
            seen.append((now.state.value, now.error))
        return {"label": "kms/hrss/master/mk/v1"}

    done = world.ceremonies.execute(c.ceremony_id, officer("alice"), slow)
    if world.engine.dialect.name == "postgresql":  # the executing replica holds the execution's lock: not failed
        assert seen == [("executing", None), ("executing", None)]
    else:  # SQLite has no such lock: the timeout decides
        assert seen == [("executing", None),
                        ("failed", "interrupted while executing; check the key registry against the token")]
    # The execution was in fact still alive: its outcome, when it comes, replaces the sweep's guess.
    assert (done.state, done.error) == (CeremonyState.EXECUTED, None)
    assert done.result is not None and done.result["label"] == "kms/hrss/master/mk/v1"


def test_an_unstorable_result_fails_the_ceremony_at_once(world: World) -> None:
    c = world.propose("alice")
    world.approve(c.ceremony_id, "bob", "chen")
    with pytest.raises(TypeError):
        world.ceremonies.execute(c.ceremony_id, officer("alice"), lambda record: {"escrow": True})
    record = world.ceremonies.get(c.ceremony_id)
    assert (record.state, record.error) == (CeremonyState.FAILED, "internal error; see the server log")


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_operation_fails_the_ceremony(world: World, interruption: type[BaseException]) -> None:
    c = world.propose("alice")
    world.approve(c.ceremony_id, "bob", "chen")
    with pytest.raises(interruption):
        world.ceremonies.execute(c.ceremony_id, officer("bob"), FakeRun(error=interruption()))
    record = world.ceremonies.get(c.ceremony_id)
    assert (record.state, record.error) == (CeremonyState.FAILED, "internal error; see the server log")


def test_a_named_custodian_needs_the_key_custodian_role(world: World) -> None:
    c = world.propose("dong", "import-master-key", {**IMPORT, "custodians": ["alice", "bob"]})
    with pytest.raises(PermissionDenied, match="lacks the key-custodian role"):
        world.ceremonies.add_component(c.ceremony_id, officer("bob"), b"sealed", "ABC123")
    with pytest.raises(PermissionDenied, match="not an enrolled officer"):
        world.ceremonies.add_component(
            world.propose("dong", "import-master-key", {**IMPORT, "custodians": ["alice", "erin"]}).ceremony_id,
            officer("erin"), b"sealed", "ABC123")


def _end(world: World, cid: str, how: str) -> None:
    if how == "cancelled":
        world.ceremonies.cancel(cid, officer("bob"))
    elif how == "expired":
        world.clock.advance(dt.timedelta(hours=1))
        world.replica().sweep()
    elif how == "executed":
        world.ceremonies.execute(cid, officer("bob"), FakeRun())
    else:
        with pytest.raises(HsmError):
            world.ceremonies.execute(cid, officer("bob"), FakeRun(error=HsmError("KCV mismatch")))


@pytest.mark.parametrize("how", ["executed", "failed", "cancelled", "expired"])
def test_sealed_components_are_dropped_when_the_ceremony_ends(world: World, how: str) -> None:
    c = world.propose("bob", "import-master-key", IMPORT)
    world.approve(c.ceremony_id, "alice", "dong")
    sent = {"alice": b"alice's sealed component", "dong": b"dong's sealed component"}
    for name, sealed in sent.items():
        world.ceremonies.add_component(c.ceremony_id, officer(name), sealed, "ABC123")
    _end(world, c.ceremony_id, how)
    assert world.ceremonies.get(c.ceremony_id).state.value == how == stored_state(world.engine, c.ceremony_id)
    rows = sealed_rows(world.engine, c.ceremony_id)
    assert {uri: kcv for uri, (_, kcv) in rows.items()} == {officer(n).uri(): "ABC123" for n in sent}
    for name, sealed in sent.items():
        stored = rows[officer(name).uri()][0]
        assert stored == b"" != sealed  # erased; custodian and KCV stay
    assert [(x.custodian, x.kcv) for x in world.ceremonies.get(c.ceremony_id).components] == [
        (officer("alice"), "ABC123"), (officer("dong"), "ABC123")]


def test_list_filters_by_domain_and_state(world: World) -> None:
    expired = world.propose("alice", ttl=dt.timedelta(minutes=1))
    world.clock.advance(dt.timedelta(minutes=2))
    proposed = []
    for _ in range(4):  # list() orders by creation time (then by id)
        world.clock.advance(dt.timedelta(seconds=1))
        proposed.append(world.propose("alice"))
    executed, failed, cancelled, still_open = proposed
    bank = world.propose("carol")
    for c in (executed, failed):
        world.approve(c.ceremony_id, "bob", "chen")
    world.ceremonies.execute(executed.ceremony_id, officer("alice"), FakeRun())
    with pytest.raises(HsmError):
        world.ceremonies.execute(failed.ceremony_id, officer("alice"), FakeRun(error=HsmError("no")))
    world.ceremonies.cancel(cancelled.ceremony_id, officer("alice"))

    def ids(domain: str, *states: CeremonyState) -> list[str]:
        return [r.ceremony_id for r in world.ceremonies.list(domain, states)]

    assert ids("hrss") == [c.ceremony_id for c in (expired, executed, failed, cancelled, still_open)]
    assert ids("hrss", CeremonyState.OPEN) == [still_open.ceremony_id]
    assert ids("hrss", CeremonyState.EXPIRED) == [expired.ceremony_id]
    assert ids("hrss", CeremonyState.EXECUTED, CeremonyState.FAILED) == [executed.ceremony_id, failed.ceremony_id]
    assert ids("hrss", CeremonyState.CANCELLED) == [cancelled.ceremony_id]
    assert ids("hrss", CeremonyState.EXECUTING) == []
    assert ids("bank") == ids("bank", CeremonyState.OPEN) == [bank.ceremony_id]


# -- the policy file ------------------------------------------------------------------------------------------------


def test_every_operation_has_a_quorum_rule_in_both_domains_and_no_rule_names_an_unknown_operation() -> None:
    for domain in DOMAINS:
        ruled = {operation for d, operation in RULES if d == domain}
        assert ruled == set(OPERATIONS), domain
    assert {d for d, _ in RULES} == set(DOMAINS)
    policy = QuorumPolicy.load()
    assert {key: (q.required, q.role) for key, q in policy.quorums.items()} == RULES
    assert all(required >= 1 and role in ("approver", "key-custodian") for required, role in RULES.values())


def test_approvals_sign_the_documented_context() -> None:
    assert APPROVAL_CONTEXT == CONTEXT


# -- audit records (kms.audit.log): each step in its own transaction, only once it happened
# -----------------------------


def test_each_step_appends_its_audit_record_and_a_refused_one_none(world: World) -> None:
    log = AuditLog(world.engine, world.clock)
    audited = Ceremonies(world.engine, world.clock, QuorumPolicy.load(), world.officers, log)
    c = audited.propose(officer("bob"), "import-master-key", IMPORT)
    for name in ("alice", "dong"):
        audited.approve(c.ceremony_id, officer(name), sign(STAFF[name].key, c.digest))
    with pytest.raises(AlreadyExists):
        audited.approve(c.ceremony_id, officer("dong"), sign(STAFF["dong"].key, c.digest))
    for name in ("alice", "dong"):
        audited.add_component(c.ceremony_id, officer(name), f"{name}'s sealed component".encode(), "ABC123")
    audited.execute(c.ceremony_id, officer("bob"), FakeRun())
    failing = audited.propose(officer("alice"), "generate-master-key", {"name": "mk2"})
    world.approve(failing.ceremony_id, "bob", "chen")
    with pytest.raises(HsmError):
        audited.execute(failing.ceremony_id, officer("alice"), FakeRun(error=HsmError("the token is busy")))
    cancelled = audited.propose(officer("alice"), "generate-master-key", {"name": "mk3"})
    audited.cancel(cancelled.ceremony_id, officer("chen"))
    with pytest.raises(InvalidState):
        audited.cancel(cancelled.ceremony_id, officer("chen"))
    expiring = audited.propose(officer("alice"), "generate-master-key", {"name": "mk4"}, dt.timedelta(minutes=5))
    world.clock.advance(dt.timedelta(minutes=5))
    audited.sweep()
    audited.sweep()  # nothing more to close: nothing recorded

    bodies = [json.loads(r.body) for r in log.records()]
    assert [(b["kind"], b["subject"]) for b in bodies] == [
        ("ceremony.proposed", c.ceremony_id), ("ceremony.approved", c.ceremony_id),
        ("ceremony.approved", c.ceremony_id), ("ceremony.component", c.ceremony_id),
        ("ceremony.component", c.ceremony_id), ("ceremony.executing", c.ceremony_id),
        ("ceremony.executed", c.ceremony_id),
        ("ceremony.proposed", failing.ceremony_id), ("ceremony.executing", failing.ceremony_id),
        ("ceremony.failed", failing.ceremony_id),
        ("ceremony.proposed", cancelled.ceremony_id), ("ceremony.cancelled", cancelled.ceremony_id),
        ("ceremony.proposed", expiring.ceremony_id), ("ceremony.expired", expiring.ceremony_id)]
    # (world.approve used the store without an audit log: those approvals are not in this log.)
    assert bodies[0]["detail"] == {"operation": "import-master-key", "digest": c.digest,
                                   "expires_at": "2026-11-27T09:00:00Z", "params": IMPORT}
    assert [b["detail"] for b in bodies[3:5]] == [{"custodian": officer(n).uri(), "kcv": "ABC123"}
                                                  for n in ("alice", "dong")]
    assert bodies[6]["detail"]["result"] == {**FakeRun().result, "approved_by": [officer("alice").uri(),
                                                                                 officer("dong").uri()],
                                             "required": 2}
    assert (bodies[9]["outcome"], bodies[9]["detail"]["error"]) == ("failed", "the token is busy")
    assert all(b["domain"] == "hrss" for b in bodies) and "sealed component" not in repr(bodies)


def test_a_sweep_records_an_interrupted_execution(world: World) -> None:
    log = AuditLog(world.engine, world.clock)
    audited = Ceremonies(world.engine, world.clock, QuorumPolicy.load(), world.officers, log)
    c = world.propose("alice")
    world.approve(c.ceremony_id, "bob", "chen")

    def slow(record: CeremonyRecord) -> Mapping[str, Any]:
        world.clock.advance(dt.timedelta(minutes=16))
        Ceremonies(world.engine, world.clock, QuorumPolicy.load(), world.officers, log).sweep()
        return {"label": "kms/hrss/master/mk/v1"}

    audited.execute(c.ceremony_id, officer("alice"), slow)
    kinds = [(json.loads(r.body)["kind"], json.loads(r.body)["outcome"]) for r in log.records()]
    if world.engine.dialect.name == "postgresql":  # a live execution is never taken for interrupted (see below)
        assert kinds == [("ceremony.executing", "ok"), ("ceremony.executed", "ok")]
    else:
        assert kinds == [("ceremony.executing", "ok"), ("ceremony.interrupted", "failed"),
                         ("ceremony.executed", "ok")]


def test_enrolment_and_revocation_are_audited_once(world: World) -> None:
    log = AuditLog(world.engine, world.clock)
    officers = OfficerStore(world.engine, world.clock, log)
    newcomer = Principal("officer", "newcomer", domain="bank")
    officers.enrol(newcomer, ["approver"], public_pem(ec.generate_private_key(ec.SECP256R1()).public_key()),
                   "C-0000000000000000", cert_sha256="0" * 64)
    with pytest.raises(AlreadyExists):
        officers.enrol(newcomer, ["approver"], public_pem(ec.generate_private_key(ec.SECP256R1()).public_key()),
                       "C-0000000000000000", cert_sha256="0" * 64)
    officers.revoke(newcomer)
    with pytest.raises(InvalidState):
        officers.revoke(newcomer)
    bodies = [json.loads(r.body) for r in log.records()]
    assert [(b["kind"], b["domain"], b["subject"]) for b in bodies] == [
        ("officer.enrolled", "bank", newcomer.uri()), ("officer.revoked", "bank", newcomer.uri())]
    assert bodies[0]["detail"]["roles"] == ["approver"] and len(bodies[0]["detail"]["key_fingerprint"]) == 32


# -- replicas as processes of their own, on PostgreSQL ---------------------------------------------------------------

#: A replica's execution in a process of its own: waits for the file ``start`` (so that racing processes line up),
#: executes the ceremony with an operation that writes ``ran-<pid>`` and then waits for the file ``go``, and prints
#: what it got. argv: database URL, schema, ceremony id, officer URI, the signal directory, the clock's time.
EXECUTOR = """
import datetime as dt, os, sys, time
from pathlib import Path
import sqlalchemy as sa
from kms import store
from kms.audit.log import AuditLog
from kms.ceremony.officers import OfficerStore
from kms.ceremony.rules import QuorumPolicy
from kms.ceremony.store import Ceremonies
from kms.clock import FixedClock
from kms.errors import KmsError
from kms.identity import parse_uri

url, schema, ceremony_id, officer, signals, at = sys.argv[1:7]
engine = store.translate_storage_faults(sa.create_engine(url, connect_args={"options": f"-csearch_path={schema}"}))
clock = FixedClock(dt.datetime.fromisoformat(at))
replica = Ceremonies(engine, clock, QuorumPolicy.load(), OfficerStore(engine, clock), AuditLog(engine, clock))
replica.get(ceremony_id)  # connected before the start line
Path(signals, f"ready-{os.getpid()}").touch()
while not Path(signals, "start").exists():
    time.sleep(0.01)

def run(record):
    Path(signals, f"ran-{os.getpid()}").touch()
    while not Path(signals, "go").exists():
        time.sleep(0.01)
    return {"label": "kms/hrss/master/mk/v1"}

try:
    print("executed", replica.execute(ceremony_id, parse_uri(officer), run).state.value, flush=True)
except KmsError as error:
    print("refused", type(error).__name__, error, flush=True)
"""


class ReplicaProcesses:
    """`kms serve` replicas as far as a ceremony's execution goes: processes of their own on the test's database."""

    def __init__(self, world: World, ceremony_id: str, signals: Path) -> None:
        with world.engine.connect() as conn:
            schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
        self.signals = signals
        self.args = [POSTGRES or "", schema, ceremony_id, officer("dong").uri(), str(signals),
                     world.clock.now().isoformat()]
        self.processes: list[subprocess.Popen[str]] = []

    def start(self, count: int) -> None:
        self.processes += [subprocess.Popen([sys.executable, "-c", EXECUTOR, *self.args], stdout=subprocess.PIPE,
                                            text=True) for _ in range(count)]
        _wait_for(lambda: len(list(self.signals.glob("ready-*"))) == len(self.processes), self.processes)
        (self.signals / "start").touch()

    def ran(self) -> list[str]:
        return sorted(p.name for p in self.signals.glob("ran-*"))

    def outcomes(self) -> list[str]:
        (self.signals / "go").touch()
        return sorted(p.communicate(timeout=120)[0].strip() for p in self.processes)

    def close(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait_for(condition: Callable[[], bool], processes: Sequence[subprocess.Popen[str]]) -> None:
    """Until ``condition`` holds; fails at once if a process ended (a broken script), never on time alone."""
    while not condition():
        ended = [p for p in processes if p.poll() is not None]
        assert not ended, [p.communicate()[0] for p in ended]
        time.sleep(0.01)


@pytest.fixture
def replicas(world: World, tmp_path: Path) -> Iterator[Callable[[str], ReplicaProcesses]]:
    made: list[ReplicaProcesses] = []

    def make(ceremony_id: str) -> ReplicaProcesses:
        signals = tmp_path / f"signals-{len(made)}"
        signals.mkdir()
        made.append(ReplicaProcesses(world, ceremony_id, signals))
        return made[-1]

    yield make
    for r in made:
        r.close()


def audited(world: World) -> Ceremonies:
    """A replica of the test's own with an audit log (the records a sweep makes are checked)."""
    engine = world.make()
    return Ceremonies(engine, world.clock, QuorumPolicy.load(), OfficerStore(engine, world.clock),
                      AuditLog(engine, world.clock))


def interruptions(world: World, ceremony_id: str) -> int:
    with world.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(store.audit_log).where(
            store.audit_log.c.kind == "ceremony.interrupted",
            store.audit_log.c.body.contains(ceremony_id))).scalar_one())


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_replica_processes_racing_execute_a_ceremony_once(world: World,
                                                          replicas: Callable[[str], ReplicaProcesses]) -> None:
    for _ in range(3):
        c = world.propose("alice")
        world.approve(c.ceremony_id, "bob", "chen")
        race = replicas(c.ceremony_id)
        race.start(3)
        outcomes = race.outcomes()
        assert len(race.ran()) == 1, outcomes
        assert outcomes[0] == "executed executed" and all(o.startswith("refused InvalidState") for o in outcomes[1:])
        assert world.ceremonies.get(c.ceremony_id).state is CeremonyState.EXECUTED


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_starting_replicas_sweep_leaves_a_live_execution_and_fails_a_dead_one_at_once(
        world: World, replicas: Callable[[str], ReplicaProcesses]) -> None:
    """A replica starting (its sweep) while another replica's process executes a ceremony for longer than
    EXECUTION_TIMEOUT leaves it executing, and its outcome stands; a replica SIGKILLed mid-execution has its
    ceremony failed as interrupted by the next sweep, without waiting for the timeout."""
    live = world.propose("alice")
    world.approve(live.ceremony_id, "bob", "chen")
    executing = replicas(live.ceremony_id)
    executing.start(1)
    _wait_for(lambda: len(executing.ran()) == 1, executing.processes)
    world.clock.advance(EXECUTION_TIMEOUT * 2)
    starting = audited(world)
    starting.sweep()
    assert starting.get(live.ceremony_id).state is CeremonyState.EXECUTING
    assert executing.outcomes() == ["executed executed"]
    assert world.ceremonies.get(live.ceremony_id).state is CeremonyState.EXECUTED
    assert interruptions(world, live.ceremony_id) == 0

    dead = world.propose("alice")
    world.approve(dead.ceremony_id, "bob", "chen")
    killed = replicas(dead.ceremony_id)
    killed.start(1)
    _wait_for(lambda: len(killed.ran()) == 1, killed.processes)
    starting.sweep()  # alive: left alone
    assert starting.get(dead.ceremony_id).state is CeremonyState.EXECUTING
    killed.processes[0].send_signal(signal.SIGKILL)
    killed.processes[0].wait()
    # Its connection, and the execution's lock with it, ended with the process: PostgreSQL's backend notices the
    # closed socket a moment later (asynchronously), so the next sweeps fail it within seconds, not the timeout.
    deadline = time.monotonic() + 60
    while starting.get(dead.ceremony_id).state is CeremonyState.EXECUTING and time.monotonic() < deadline:
        starting.sweep()
        time.sleep(0.05)
    record = starting.get(dead.ceremony_id)
    assert (record.state, record.error) == (CeremonyState.FAILED, INTERRUPTED)
    assert interruptions(world, dead.ceremony_id) == 1


def _execution_locks_held(world: World, ceremony_id: str) -> int:
    """Sessions holding ``ceremony_id``'s execution lock (kms.store's named-lock key, computed in this schema)."""
    with world.engine.connect() as conn:
        return int(conn.execute(sa.text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
            "AND ((classid::bigint << 32) | objid::bigint) = "
            "hashtextextended('kms:' || current_schema() || ':' || :name, 0)"),
            {"name": f"ceremony-execution:{ceremony_id}"}).scalar_one())


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.parametrize("failing", ["unlock", "try_lock"])
def test_a_failure_around_the_execution_lock_never_pools_a_connection_that_holds_it(
        world: World, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """A rollback at checkin does not end a session lock: the connection must be invalidated (its session ended)
    on any failure between taking the lock and giving it back, or a pooled connection holds it for ever."""
    c = world.propose("alice")
    world.approve(c.ceremony_id, "bob", "chen")
    real = getattr(store, failing)

    def fail(conn: sa.Connection, name: str) -> Any:
        if failing == "try_lock":
            real(conn, name)  # the lock taken, then a fault that is not a KmsError
        raise RuntimeError(f"injected in {failing}")  # unlock: before the lock is given back

    monkeypatch.setattr(store, failing, fail)
    with pytest.raises(RuntimeError, match="injected"):
        world.ceremonies.execute(c.ceremony_id, officer("bob"), FakeRun())
    monkeypatch.undo()
    assert _execution_locks_held(world, c.ceremony_id) == 0


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_the_execution_lock_outlives_the_servers_idle_session_timeout(world: World) -> None:
    """The execution's session sits idle while the operation runs: PostgreSQL's idle_session_timeout (here 100 ms,
    set on the replica's engine) must not end it, or another replica's sweep would fail a live execution."""
    with world.engine.connect() as conn:
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
    idle = sa.create_engine(os.environ["KMS_TEST_POSTGRES_URL"], pool_pre_ping=True, connect_args={
        "options": f"-csearch_path={schema} -cidle_session_timeout=100"})  # pooled ones: replaced (as kms does)
    replica = Ceremonies(idle, world.clock, QuorumPolicy.load(), OfficerStore(idle, world.clock))
    c = world.propose("alice")
    world.approve(c.ceremony_id, "bob", "chen")
    held: list[int] = []

    def run(record: CeremonyRecord) -> Mapping[str, Any]:
        time.sleep(0.5)  # the execution's session idle for five idle timeouts
        held.append(_execution_locks_held(world, record.ceremony_id))
        world.replica().sweep()  # another replica's sweep: the execution is alive
        return FakeRun().result

    try:
        done = replica.execute(c.ceremony_id, officer("bob"), run)
    finally:
        idle.dispose()
    assert held == [1] and done.state is CeremonyState.EXECUTED
