"""Dual control: M-of-N signed approvals (kms.ceremony.rules), including a hypothesis state machine over
propose / approve / replay / cancel / expire / execute with officers of both domains."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kms.ceremony.rules import Approval, Officer, Proposal, QuorumPolicy, evaluate, sign_approval
from kms.errors import ConfigError, InvalidArgument
from kms.identity import Principal

T0 = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC)
POLICY = QuorumPolicy.load()


def _officer(domain: str, name: str, roles: set[str]) -> tuple[Officer, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    return Officer(Principal("officer", name, domain=domain), frozenset(roles), key.public_key()), key


STAFF = [
    _officer("hrss", "alice", {"approver", "key-custodian"}), _officer("hrss", "bob", {"approver"}),
    _officer("hrss", "chen", {"approver"}), _officer("hrss", "dong", {"key-custodian"}),
    _officer("bank", "carol", {"approver", "key-custodian"}), _officer("bank", "dave", {"approver"}),
    _officer("bank", "eve", {"approver"}),
]
OFFICERS = {o.principal: o for o, _ in STAFF}
KEYS = {o.principal: k for o, k in STAFF}


def _proposal(domain: str, operation: str, proposer: Principal, **params: object) -> Proposal:
    return Proposal(domain, operation, params, proposer, T0, T0 + dt.timedelta(hours=1))


def _approve(who: Principal, proposal: Proposal) -> Approval:
    return sign_approval(KEYS[who], who, proposal)


def test_quorum_of_distinct_officers_of_the_domain() -> None:
    alice, bob, chen = (Principal("officer", n, domain="hrss") for n in ("alice", "bob", "chen"))
    carol = Principal("officer", "carol", domain="bank")
    p = _proposal("hrss", "generate-master-key", alice, name="hrss-mk", algorithm="DES2")
    decision = evaluate(p, [_approve(alice, p), _approve(bob, p), _approve(bob, p), _approve(carol, p)],
                        OFFICERS, POLICY, T0)
    assert not decision.met and decision.counted == (bob,)
    assert dict(decision.refused) == {
        alice: "the proposer does not count as an approver", bob: "this officer has already approved",
        carol: "not an officer of the hrss domain"}
    assert evaluate(p, [_approve(bob, p), _approve(chen, p)], OFFICERS, POLICY, T0).met
    assert not evaluate(p, [_approve(bob, p), _approve(chen, p)], OFFICERS, POLICY, T0 + dt.timedelta(hours=1)).met
    assert not evaluate(p, [_approve(bob, p), _approve(chen, p)], OFFICERS, POLICY, T0, cancelled=True).met


def test_an_approval_cannot_be_replayed_onto_another_proposal() -> None:
    alice, bob, chen = (Principal("officer", n, domain="hrss") for n in ("alice", "bob", "chen"))
    first = _proposal("hrss", "destroy-key", alice, label="kms/hrss/master/hrss-mk/v1")
    second = _proposal("hrss", "destroy-key", alice, label="kms/hrss/master/hrss-mk/v2")
    moved = [Approval(a.officer, a.signature) for a in (_approve(bob, first), _approve(chen, first))]
    decision = evaluate(second, moved, OFFICERS, POLICY, T0)
    assert decision.counted == () and all(r == "the signature is not over this proposal" for _, r in decision.refused)


def test_roles_and_unknown_operations() -> None:
    alice, bob, dong = (Principal("officer", n, domain="hrss") for n in ("alice", "bob", "dong"))
    p = _proposal("hrss", "import-master-key", bob, name="hrss-mk")
    decision = evaluate(p, [_approve(alice, p), _approve(dong, p)], OFFICERS, POLICY, T0)
    assert decision.met  # both hold key-custodian
    q = _proposal("hrss", "generate-master-key", alice, name="x")
    assert dict(evaluate(q, [_approve(dong, q)], OFFICERS, POLICY, T0).refused) == {dong: "lacks the approver role"}
    with pytest.raises(InvalidArgument, match="has no quorum rule"):
        evaluate(_proposal("hrss", "format-hsm", alice), [], OFFICERS, POLICY, T0)
    with pytest.raises(InvalidArgument):
        _proposal("bank", "destroy-key", alice)  # an hrss officer cannot propose for the bank


def test_malformed_quorum_policies_are_refused(tmp_path: Path) -> None:
    for text in ("version: 2\nquorums: {}\n", "version: 1\nquorums: {both: {}}\n",
                 "version: 1\nquorums: {hrss: {x: {approvals: 0, role: a}}}\n"):
        path = tmp_path / "q.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError):
            QuorumPolicy.load(path)


class Ceremonies(RuleBasedStateMachine):
    """Random sequences over both domains; after every step, every proposal the evaluator calls met has at least M
    distinct, eligible, correctly signing officers of its own domain, and the evaluator agrees with this model."""

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.proposals: list[Proposal] = []
        self.approvals: dict[int, list[Approval]] = {}
        self.cancelled: set[int] = set()
        self.executed: set[int] = set()

    @initialize(hrss=st.sampled_from(sorted((o for o in OFFICERS if o.domain == "hrss"), key=str)),
                bank=st.sampled_from(sorted((o for o in OFFICERS if o.domain == "bank"), key=str)))
    def open_one_proposal_per_domain(self, hrss: Principal, bank: Principal) -> None:
        self.propose(hrss, "generate-master-key", "h")
        self.propose(bank, "generate-master-key", "b")

    @rule(proposer=st.sampled_from(sorted(OFFICERS, key=str)),
          operation=st.sampled_from(["generate-master-key", "import-master-key", "destroy-key", "authorize-batch"]),
          name=st.text("abc", min_size=1, max_size=3))
    def propose(self, proposer: Principal, operation: str, name: str) -> None:
        assert proposer.domain is not None
        self.proposals.append(Proposal(proposer.domain, operation, {"name": name}, proposer, self.now,
                                       self.now + dt.timedelta(minutes=30)))
        self.approvals[len(self.proposals) - 1] = []

    @precondition(lambda self: self.proposals)
    @rule(data=st.data(), officer=st.sampled_from(sorted(OFFICERS, key=str)))
    def approve(self, data: st.DataObject, officer: Principal) -> None:
        i = data.draw(st.integers(0, len(self.proposals) - 1))
        self.approvals[i].append(_approve(officer, self.proposals[i]))

    @precondition(lambda self: self.proposals)
    @rule(data=st.data())
    def approve_within_the_domain(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.proposals) - 1))
        own = sorted((o for o in OFFICERS if o.domain == self.proposals[i].domain), key=str)
        officer = data.draw(st.sampled_from(own))
        self.approvals[i].append(_approve(officer, self.proposals[i]))

    @precondition(lambda self: self.proposals)
    @rule(data=st.data())
    def rally(self, data: st.DataObject) -> None:
        """Every officer of the proposal's domain approves it (quorums are reached often, so the invariant sees
        both sides)."""
        i = data.draw(st.integers(0, len(self.proposals) - 1))
        for officer in sorted((o for o in OFFICERS if o.domain == self.proposals[i].domain), key=str):
            self.approvals[i].append(_approve(officer, self.proposals[i]))

    @precondition(lambda self: len(self.proposals) >= 2)
    @rule(data=st.data(), officer=st.sampled_from(sorted(OFFICERS, key=str)))
    def replay(self, data: st.DataObject, officer: Principal) -> None:
        i, j = data.draw(st.lists(st.integers(0, len(self.proposals) - 1), min_size=2, max_size=2, unique=True))
        signed = _approve(officer, self.proposals[i])  # an approval of proposal i presented for proposal j
        self.approvals[j].append(Approval(signed.officer, signed.signature))

    @precondition(lambda self: self.proposals)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self.cancelled.add(data.draw(st.integers(0, len(self.proposals) - 1)))

    @rule(minutes=st.integers(1, 15))
    def wait(self, minutes: int) -> None:
        self.now += dt.timedelta(minutes=minutes)

    @precondition(lambda self: self.proposals)
    @rule(data=st.data())
    def execute(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.proposals) - 1))
        if evaluate(self.proposals[i], self.approvals[i], OFFICERS, POLICY, self.now,
                    cancelled=i in self.cancelled).met:
            self.executed.add(i)

    @invariant()
    def only_quorums_of_the_own_domain_run(self) -> None:
        for i, proposal in enumerate(self.proposals):
            quorum = POLICY.quorum(proposal.domain, proposal.operation)
            decision = evaluate(proposal, self.approvals[i], OFFICERS, POLICY, self.now,
                                cancelled=i in self.cancelled)
            eligible = {
                a.officer for a in self.approvals[i]
                if a.officer != proposal.proposer and a.officer.domain == proposal.domain
                and quorum.role in OFFICERS[a.officer].roles
                and _valid(a, proposal)
            }
            model_met = (len(eligible) >= quorum.required and i not in self.cancelled
                         and self.now < proposal.expires_at)
            assert decision.met == model_met
            assert len(set(decision.counted)) == len(decision.counted)
            assert all(o.domain == proposal.domain and o != proposal.proposer for o in decision.counted)
            if decision.met:
                assert len(decision.counted) >= quorum.required


def _valid(approval: Approval, proposal: Proposal) -> bool:
    from kms.ceremony.rules import _verifies, approval_message

    return _verifies(OFFICERS[approval.officer].public_key, approval.signature, approval_message(proposal))


TestCeremonies = Ceremonies.TestCase
TestCeremonies.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


def _minutes(approved_by: list[str], signers: list[Principal], domain_key: ec.EllipticCurvePrivateKey,
             proposer: Principal) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import hashes, serialization

    from kms.bundle import canonical
    from kms.ceremony.rules import approval_message

    proposal = Proposal("hrss", "generate-master-key", {"name": "mk"}, proposer, T0, T0 + dt.timedelta(hours=1),
                        "C-00112233445566ff")
    approvals = [{"officer": who.uri(), "at": "t", "signature": KEYS[who].sign(
        approval_message(proposal), ec.ECDSA(hashes.SHA256())).hex(), "public_key": OFFICERS[who].public_key
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()}
        for who in signers]
    document = canonical({
        "format": "kms-ceremony-minutes", "version": 1, "ceremony_id": "C-00112233445566ff", "domain": "hrss",
        "operation": "generate-master-key", "proposal": proposal.encoding().decode(), "digest": proposal.digest.hex(),
        "approvals": approvals, "components": [], "required": 2, "role": "approver", "state": "executed",
        "result": {"approved_by": approved_by}, "error": "", "closed_at": "", "closed_by": "", "issued_at": "t"})
    return document, domain_key.sign(document, ec.ECDSA(hashes.SHA256()))


def test_minutes_verify_offline_only_with_a_quorum_of_good_signatures() -> None:
    from kms.ceremony.rules import verify_minutes

    alice, bob, chen = (o.principal for o, _ in STAFF[:3])
    domain_key = ec.generate_private_key(ec.SECP256R1())
    good, signature = _minutes([bob.uri(), chen.uri()], [bob, chen], domain_key, alice)
    assert verify_minutes(good, signature, domain_key.public_key())["state"] == "executed"
    with pytest.raises(InvalidArgument, match="signature"):
        verify_minutes(good, signature, ec.generate_private_key(ec.SECP256R1()).public_key())
    # Minutes the domain signed but that do not show a quorum are refused all the same.
    for approved_by, signers in (([bob.uri()], [bob]), ([alice.uri(), bob.uri()], [alice, bob]),
                                 ([bob.uri(), bob.uri()], [bob]), ([bob.uri(), chen.uri()], [bob])):
        document, sig = _minutes(approved_by, signers, domain_key, alice)
        with pytest.raises(InvalidArgument, match="approved_by"):
            verify_minutes(document, sig, domain_key.public_key())
