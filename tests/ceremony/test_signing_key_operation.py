"""generate-signing-key's checks at proposal (kms.ceremony.operations), and what set-key-state, destroy-key and
export-master-key accept of signing keys — on a real database, without an HSM: a check that needs the domain's token
(SM2) is asked of its worker, which tests/server/test_signing_keys.py runs for real (refused on the standard
SoftHSM2 token, accepted on the development SM token)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kms import store
from kms.ceremony.handoffs import TransportHandoffs
from kms.ceremony.officers import OfficerStore
from kms.ceremony.operations import OPERATIONS, Context
from kms.ceremony.rules import QuorumPolicy
from kms.ceremony.store import Ceremonies
from kms.clock import FixedClock
from kms.errors import InvalidArgument, InvalidState
from kms.issuance.batches import BatchStore
from kms.registry import KeyKind, KeyRegistry, KeyState

SPKI = b"\x30\x59" + bytes(89)  # what the registry keeps of a public key (only its presence matters here)


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.upgrade(engine)
    clock = FixedClock(dt.datetime(2026, 12, 2, 9, 0, tzinfo=dt.UTC))
    registry = KeyRegistry(engine, clock)
    officers = OfficerStore(engine, clock)
    yield Context(registry, officers, BatchStore(engine, clock), {},
                  Ceremonies(engine, clock, QuorumPolicy.load(), officers), TransportHandoffs(engine, registry, clock),
                  pools=None)
    engine.dispose()


def check(ctx: Context, operation: str, params: dict[str, Any], domain: str = "hrss") -> dict[str, Any]:
    return OPERATIONS[operation].check(ctx, domain, params)


def refused(ctx: Context, operation: str, params: dict[str, Any]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        check(ctx, operation, params)
    return caught.value


def test_an_ecdsa_key_needs_no_worker_and_the_algorithm_is_filled_in(ctx: Context) -> None:
    assert check(ctx, "generate-signing-key", {"name": "issuance"}) == {"name": "issuance", "algorithm": "ecdsa-p256"}
    assert check(ctx, "generate-signing-key", {"name": "issuance", "algorithm": "ecdsa-p256"}) == {
        "name": "issuance", "algorithm": "ecdsa-p256"}


@pytest.mark.parametrize(("params", "field", "reason"), [
    ({"name": "mine"}, "params.name", "must be the name of an issuance signing key: issuance (ecdsa-p256), "
                                      "issuance-sm2 (sm2)"),
    ({"name": "Issuance"}, "params.name", "must be 1-64 of a-z"),
    ({"name": ["issuance"]}, "params.name", "must be 1-64 of a-z"),
    ({"algorithm": "sm2"}, "params.name", "is required"),
    ({"name": "issuance", "algorithm": "sm2"}, "params.algorithm",
     "issuance keys are ecdsa-p256; sections signed with sm2 use issuance-sm2"),
    ({"name": "issuance-sm2", "algorithm": "ecdsa-p256"}, "params.algorithm",
     "issuance-sm2 keys are sm2; sections signed with ecdsa-p256 use issuance"),
    ({"name": "issuance", "algorithm": "ECDSA-P256"}, "params.algorithm", "must be one of ecdsa-p256, sm2"),
    ({"name": "issuance", "escrow": "yes"}, "params.escrow", "is not a parameter of this operation"),
])
def test_bad_parameters_are_refused_naming_the_field(ctx: Context, params: dict[str, Any], field: str,
                                                     reason: str) -> None:
    error = refused(ctx, "generate-signing-key", params)
    assert error.field == field and reason in error.reason, error


def test_sm2_is_asked_of_the_domains_worker(ctx: Context) -> None:
    """Without a worker here (pools None) an SM2 proposal cannot be checked: refused, never an internal error."""
    with pytest.raises(InvalidState, match="no hrss HSM worker is configured here"):
        check(ctx, "generate-signing-key", {"name": "issuance-sm2"})


def test_a_version_awaiting_activation_blocks_the_next(ctx: Context) -> None:
    ctx.registry.add("hrss", KeyKind.SIGNING, "issuance", "ECDSA-P256", public_key=SPKI)
    pending = ctx.registry.add("hrss", KeyKind.SIGNING, "issuance", "ECDSA-P256", public_key=SPKI,
                               state=KeyState.PRE_ACTIVATION)
    error = refused(ctx, "generate-signing-key", {"name": "issuance"})
    assert error.field == "params.name" and f"{pending.label} awaits activation" in error.reason
    assert check(ctx, "generate-signing-key", {"name": "issuance"}, domain="bank")["name"] == "issuance"
    ctx.registry.transition(pending, KeyState.DESTROYED)
    assert check(ctx, "generate-signing-key", {"name": "issuance"})["algorithm"] == "ecdsa-p256"


def test_set_key_state_activates_a_signing_key_made_pre_activation_with_its_public_key(ctx: Context) -> None:
    ctx.registry.add("hrss", KeyKind.SIGNING, "issuance", "ECDSA-P256", public_key=SPKI)
    # The only version, active: not retired (suspended or deactivated); marking it compromised is allowed.
    error = refused(ctx, "set-key-state", {"kind": "signing", "name": "issuance", "version": 1, "state": "suspended"})
    assert error.field == "params.state" and "only active version" in error.reason
    compromised = {"kind": "signing", "name": "issuance", "version": 1, "state": "compromised"}
    assert check(ctx, "set-key-state", compromised) == compromised
    # Once its next version is made (awaiting activation), its retirement may be proposed, to run after activation.
    ctx.registry.add("hrss", KeyKind.SIGNING, "issuance", "ECDSA-P256", public_key=SPKI,
                     state=KeyState.PRE_ACTIVATION)
    activate = {"kind": "signing", "name": "issuance", "version": 2, "state": "active"}
    assert check(ctx, "set-key-state", activate) == activate
    retire = {"kind": "signing", "name": "issuance", "version": 1, "state": "deactivated"}
    assert check(ctx, "set-key-state", retire) == retire
    # A pre-activation record without a public key was never made: nothing to activate.
    ctx.registry.add("hrss", KeyKind.SIGNING, "issuance-sm2", "SM2", state=KeyState.PRE_ACTIVATION)
    error = refused(ctx, "set-key-state", {"kind": "signing", "name": "issuance-sm2", "version": 1, "state": "active"})
    assert error.field == "params.version" and "no public key on record" in error.reason
    # A master key is still activated only inside the ceremony that made it.
    ctx.registry.add("hrss", KeyKind.MASTER, "mk", "AES256", state=KeyState.PRE_ACTIVATION)
    error = refused(ctx, "set-key-state", {"kind": "master", "name": "mk", "version": 1, "state": "active"})
    assert error.field == "params.state"


def test_destroy_key_takes_signing_keys_and_export_does_not(ctx: Context) -> None:
    ctx.registry.add("hrss", KeyKind.SIGNING, "issuance", "ECDSA-P256", public_key=SPKI,
                     state=KeyState.PRE_ACTIVATION)
    ref = {"kind": "signing", "name": "issuance", "version": 1}
    assert check(ctx, "destroy-key", ref) == ref
    error = refused(ctx, "export-master-key", {**ref, "recipients": ["alice", "dong"]})
    assert error.field == "params.kind"
    error = refused(ctx, "set-key-state", {**ref, "kind": "custody", "state": "suspended"})
    assert error.field == "params.kind"
