"""Dual control: signed M-of-N approvals of an exact operation.

A proposal names one operation of one domain with its parameters; its canonical encoding (kms.canonical)
is hashed, and that digest is what every approval signs — so an approval cannot be moved to another proposal. The
quorum for (domain, operation) is data (kms/policies/quorum.yaml). ``evaluate`` decides, with a reason per refused
approval, whether a proposal may run:

- the proposer never counts as an approver, and one officer counts once;
- only officers of the proposal's own domain holding the required role count;
- each approval's signature must verify under that officer's enrolled public key, over this proposal's digest;
- nothing counts once the proposal has expired or was cancelled.

This module holds no state and touches no HSM: kms.ceremony.store persists ceremonies, kms.ceremony.operations says what
each operation does, kms.server.ceremony serves them; ``verify_minutes`` checks signed minutes offline.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms.canonical import canonical
from kms.clock import rfc3339
from kms.config import read_policy
from kms.errors import ConfigError, InvalidArgument
from kms.identity import Principal
from kms.policies import shipped
from kms.registry import DOMAINS

APPROVAL_CONTEXT = b"kms-ceremony-approval/v1\x00"
DEFAULT_QUORUMS = shipped("quorum.yaml")


@dataclass(frozen=True)
class Proposal:
    domain: str
    operation: str
    params: Mapping[str, Any]
    proposer: Principal
    created_at: dt.datetime
    expires_at: dt.datetime
    ceremony_id: str = ""  # unique per proposal: two identical requests still have distinct digests

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise InvalidArgument("domain", f"must be one of {', '.join(DOMAINS)}")
        if self.proposer.role != "officer" or self.proposer.domain != self.domain:
            raise InvalidArgument("proposer", f"must be an officer of the {self.domain} domain")
        if self.expires_at <= self.created_at:
            raise InvalidArgument("expires_at", "must be after created_at")

    def encoding(self) -> bytes:
        """The canonical bytes approvals are about (parameters: strings, integers, lists, objects only)."""
        try:
            return canonical({
                "format": "kms-ceremony-proposal", "version": 1, "ceremony_id": self.ceremony_id,
                "domain": self.domain, "operation": self.operation,
                "params": dict(self.params), "proposer": self.proposer.uri(),
                "created_at": rfc3339(self.created_at), "expires_at": rfc3339(self.expires_at),
            })
        except TypeError as error:
            raise InvalidArgument("params", str(error)) from None

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.encoding()).digest()


@dataclass(frozen=True)
class Officer:
    principal: Principal
    roles: frozenset[str]
    public_key: ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class Approval:
    officer: Principal
    signature: bytes  # DER ECDSA P-256 over APPROVAL_CONTEXT + proposal digest


def approval_message(proposal: Proposal) -> bytes:
    return APPROVAL_CONTEXT + proposal.digest


def sign_approval(key: ec.EllipticCurvePrivateKey, officer: Principal, proposal: Proposal) -> Approval:
    """An officer's approval (development: the officer's key is a file; later, a smartcard token)."""
    return Approval(officer, key.sign(approval_message(proposal), ec.ECDSA(hashes.SHA256())))


@dataclass(frozen=True)
class Quorum:
    required: int
    role: str


@dataclass(frozen=True)
class QuorumPolicy:
    quorums: Mapping[tuple[str, str], Quorum]

    @classmethod
    def load(cls, path: Path = DEFAULT_QUORUMS) -> QuorumPolicy:
        quorums: dict[tuple[str, str], Quorum] = {}
        for domain, operations in read_policy(path, "quorums").items():
            if domain not in DOMAINS or not isinstance(operations, dict):
                raise ConfigError(f"{path}: quorums are listed per domain ({', '.join(DOMAINS)})")
            for operation, rule in operations.items():
                if (not isinstance(rule, dict) or set(rule) != {"approvals", "role"}
                        or not isinstance(rule["approvals"], int) or isinstance(rule["approvals"], bool)
                        or rule["approvals"] < 1 or not isinstance(rule["role"], str)):
                    raise ConfigError(f"{path}: {domain}.{operation}: needs 'approvals' (at least 1) and 'role'")
                quorums[(domain, str(operation))] = Quorum(rule["approvals"], rule["role"])
        return cls(quorums)

    def quorum(self, domain: str, operation: str) -> Quorum:
        """The rule for an operation; an operation without one is refused (default deny)."""
        try:
            return self.quorums[(domain, operation)]
        except KeyError:
            raise InvalidArgument("operation", f"{operation!r} has no quorum rule in the {domain} domain") from None


@dataclass(frozen=True)
class Decision:
    met: bool
    required: int
    counted: tuple[Principal, ...]
    refused: tuple[tuple[Principal, str], ...] = field(default_factory=tuple)


def evaluate(
    proposal: Proposal,
    approvals: Sequence[Approval],
    officers: Mapping[Principal, Officer],
    policy: QuorumPolicy,
    now: dt.datetime,
    *,
    cancelled: bool = False,
) -> Decision:
    """Whether ``approvals`` reach the quorum for ``proposal`` at ``now``, and why each one that does not count
    was refused."""
    quorum = policy.quorum(proposal.domain, proposal.operation)
    if cancelled or now >= proposal.expires_at:
        reason = "the proposal was cancelled" if cancelled else "the proposal has expired"
        return Decision(False, quorum.required, (), tuple((a.officer, reason) for a in approvals))
    message = approval_message(proposal)
    counted: list[Principal] = []
    refused: list[tuple[Principal, str]] = []
    for approval in approvals:
        who = approval.officer
        officer = officers.get(who)
        if who == proposal.proposer:
            refused.append((who, "the proposer does not count as an approver"))
        elif who in counted:
            refused.append((who, "this officer has already approved"))
        elif officer is None:
            refused.append((who, "not an enrolled officer"))
        elif who.role != "officer" or who.domain != proposal.domain:
            refused.append((who, f"not an officer of the {proposal.domain} domain"))
        elif quorum.role not in officer.roles:
            refused.append((who, f"lacks the {quorum.role} role"))
        elif not _verifies(officer.public_key, approval.signature, message):
            refused.append((who, "the signature is not over this proposal"))
        else:
            counted.append(who)
    return Decision(len(counted) >= quorum.required, quorum.required, tuple(counted), tuple(refused))


def _verifies(key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


MINUTES_FORMAT = "kms-ceremony-minutes"


def verify_minutes(document: bytes, signature: bytes, domain_key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """Offline check of signed minutes: the domain's signature over the document, the digest of the proposal it
    quotes, and every approval's signature under the approving officer's public key. Returns the minutes; raises
    InvalidArgument naming what does not hold."""
    if not _verifies(domain_key, signature, document):
        raise InvalidArgument("signature", "the minutes are not signed by this domain key")
    try:
        doc = json.loads(document)
        if doc.get("format") != MINUTES_FORMAT or doc.get("version") != 1:
            raise InvalidArgument("minutes", f"not {MINUTES_FORMAT} version 1")
        digest = hashlib.sha256(doc["proposal"].encode()).digest()
        proposal = json.loads(doc["proposal"])
        approvals = doc["approvals"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidArgument("minutes", "not a minutes document") from None
    if digest.hex() != doc.get("digest") or proposal.get("domain") != doc.get("domain"):
        raise InvalidArgument("digest", "does not match the quoted proposal")
    for i, approval in enumerate(approvals):
        try:
            key = serialization.load_pem_public_key(approval["public_key"].encode())
            sig = bytes.fromhex(approval["signature"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InvalidArgument(f"approvals[{i}]", "has no readable public key or signature") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not _verifies(key, sig, APPROVAL_CONTEXT + digest):
            raise InvalidArgument(f"approvals[{i}]", f"the signature of {approval.get('officer')} does not verify")
        if not str(approval.get("officer", "")).startswith(f"urn:kms:officer:{doc['domain']}:"):
            raise InvalidArgument(f"approvals[{i}]", "is not by an officer of the ceremony's domain")
    if doc.get("state") == "executed" and doc.get("operation") != "genesis":
        counted = (doc.get("result") or {}).get("approved_by", [])
        signers = [a["officer"] for a in approvals]
        if (len(set(counted)) != len(counted) or not set(counted) <= set(signers)
                or proposal.get("proposer") in counted or len(counted) < int(doc.get("required", 1))):
            raise InvalidArgument("result.approved_by", "does not show a quorum of distinct approvers other than "
                                                        "the proposer, each with a good signature")
    if proposal.get("operation") != doc.get("operation") or proposal.get("ceremony_id") != doc.get("ceremony_id"):
        raise InvalidArgument("proposal", "is not the proposal of this ceremony")
    return dict(doc)
