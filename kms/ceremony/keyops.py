"""What ceremonies do inside a domain's HSM. These functions run in the domain's own worker process (the only
process holding its PIN, ``kms.issuance.workers.DomainPool.call``) and change the key registry with the token.

Every key a ceremony makes is registered ``pre-activation`` first and becomes ``active`` only after its KCV is
known (and, for a key joined from components, equals the expected one); a failure leaves no active key behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kms.ceremony import components
from kms.ceremony.officers import parse_public_key
from kms.errors import HsmError, HsmKeyNotFound, InvalidArgument, InvalidState
from kms.hsm.session import TokenSession
from kms.hsm.types import Algorithm, SignatureAlgorithm, wipe
from kms.identity import parse_uri
from kms.issuance.sealer import SIGNING_KEYS
from kms.registry import TRANSITIONS, KeyKind, KeyRecord, KeyRegistry, KeyState

CUSTODY_NAME = "custody"
#: A signing key's algorithm as a generate-signing-key ceremony names it -> how sections are signed with it.
SIGNING_ALGORITHMS: dict[str, SignatureAlgorithm] = {
    "ecdsa-p256": SignatureAlgorithm.ECDSA_P256_SHA256,
    "sm2": SignatureAlgorithm.SM2_SM3,
}
#: A component as the worker receives it: (custodian URI, encrypted to the custody key, its KCV).
Sealed = tuple[str, bytes, str]


class Worker(Protocol):
    domain: str
    session: TokenSession
    registry: KeyRegistry


def custody_label(w: Worker) -> str:
    return w.registry.active(w.domain, KeyKind.CUSTODY, CUSTODY_NAME).label


def check_sealed(custody_spki: bytes, sealed: bytes) -> None:
    """Before any worker sees it: a component sent in is one RSA-OAEP ciphertext under the custody key, exactly as
    long as its modulus and smaller than it as a number (what the token would refuse only after trying)."""
    try:
        public = serialization.load_der_public_key(custody_spki)
    except ValueError:
        raise InvalidState("the custody key's public key is not recorded") from None
    if not isinstance(public, rsa.RSAPublicKey):
        raise InvalidState("the custody key is not an RSA key")
    size = (public.key_size + 7) // 8
    if len(sealed) != size or int.from_bytes(sealed, "big") >= public.public_numbers().n:
        raise InvalidArgument("encrypted_component", f"is not an RSA-OAEP ciphertext under the {public.key_size}-bit "
                                                     f"custody key ({size} bytes)")


def check_component(w: Worker, algorithm: str, sealed: bytes, kcv: str) -> None:
    """Decrypt one component sent in and compare its KCV with the one its custodian gave (nothing stored). A
    ciphertext the token cannot decrypt is InvalidArgument ``encrypted_component`` with reason hsm.UNDECRYPTABLE."""
    alg = Algorithm(algorithm)
    value = w.session.custody_decrypt(custody_label(w), sealed, "encrypted_component")
    try:
        if len(value) != alg.length:
            raise InvalidArgument("encrypted_component", f"does not hold a {alg} component ({alg.length} bytes)")
        if components.kcv(alg, value) != kcv:
            raise InvalidArgument("kcv", "does not match the component")
    finally:
        wipe(value)


def _join(w: Worker, algorithm: Algorithm, sealed: Sequence[Sealed]) -> bytearray:
    parts: list[bytearray] = []
    try:
        for custodian, data, kcv in sealed:
            parts.append(w.session.custody_decrypt(custody_label(w), data))
            if components.kcv(algorithm, parts[-1]) != kcv:
                raise InvalidArgument("components", f"the component of {parse_uri(custodian)} does not match its KCV")
        return components.join(parts)
    finally:
        for part in parts:
            wipe(part)


def create_key(w: Worker, kind: str, name: str, algorithm: str, escrow: bool, expected_kcv: str | None = None,
               sealed: Sequence[Sealed] = (), activate: bool = True) -> dict[str, Any]:
    """A new version of a master or transport key: generated in the token, or joined from components (then its
    KCV must equal ``expected_kcv`` before it becomes active; otherwise it is destroyed). With ``activate`` false
    it stays pre-activation (a transport key waits for its bureau)."""
    key_kind, alg = KeyKind(kind), Algorithm(algorithm)
    if key_kind is KeyKind.TRANSPORT:
        transport_algorithm_offered(w, alg, generate=not sealed)
    record = w.registry.add(w.domain, key_kind, name, alg.value, state=KeyState.PRE_ACTIVATION)
    try:
        if sealed:
            value = _join(w, alg, sealed)
            if key_kind is KeyKind.MASTER:
                got = w.session.import_master_key(record.label, alg, value, escrow=escrow)
            else:
                got = w.session.import_transport_key(record.label, value, escrow=escrow, algorithm=alg)
        elif key_kind is KeyKind.MASTER:
            got = w.session.generate_master_key(record.label, alg, escrow=escrow)
        else:
            got = w.session.generate_transport_key(record.label, escrow=escrow, algorithm=alg)
    except BaseException:
        w.registry.remove(record)  # no token object was made
        raise
    kcv = got.hex().upper()
    w.registry.set_kcv(record, kcv, components.kcv_method(alg).value)
    if expected_kcv is not None and kcv != expected_kcv:
        w.session.destroy(record.label)
        w.registry.transition(w.registry.get(w.domain, key_kind, name, record.version), KeyState.DESTROYED)
        raise InvalidState(f"the joined key's KCV {kcv} differs from the expected {expected_kcv}; it was destroyed "
                           "and never active")
    made = w.registry.get(w.domain, key_kind, name, record.version)
    return _key_result(w.registry.transition(made, KeyState.ACTIVE) if activate else made, escrow)


def transport_algorithm_offered(w: Worker, algorithm: Algorithm, *, generate: bool = True) -> None:
    """A transport key is AES256, or SM4 where the domain's token offers SM4 by its mechanism profile (generation
    and SM4-ECB, which wraps card keys and computes the KCV); otherwise InvalidArgument naming params.algorithm
    before anything is registered or made."""
    if algorithm not in (Algorithm.AES256, Algorithm.SM4):
        raise InvalidArgument("params.algorithm", f"transport keys are AES256 or SM4, not {algorithm}")
    if algorithm is Algorithm.SM4:
        needed = ("SM4_KEY_GEN", "SM4_ECB") if generate else ("SM4_ECB",)
        offered = w.session.mechanisms()
        if not w.session.profile.has_sm4 or any(name not in offered for name in needed):
            raise InvalidArgument("params.algorithm", f"SM4: the {w.domain} domain's token does not offer "
                                                      f"{' and '.join(needed)} (mechanism profile "
                                                      f"{w.session.profile.name})")


def transport_key_for_rsa(w: Worker, bureau: str, recipient_spki: bytes, algorithm: str = Algorithm.AES256.value
                          ) -> tuple[dict[str, Any], bytes]:
    """A bureau's transport key (AES256, or SM4) generated in the token, pre-activation, and wrapped under the
    bureau station's single-use RSA key (OAEP) for the hand-off (kms.ceremony.handoffs). Returns (result, wrapped
    key)."""
    alg = Algorithm(algorithm)
    transport_algorithm_offered(w, alg)
    record = w.registry.add(w.domain, KeyKind.TRANSPORT, bureau, alg.value, state=KeyState.PRE_ACTIVATION)
    try:
        wrapped, kcv = (w.session.generate_transport_key_for(record.label, recipient_spki) if alg is Algorithm.AES256
                        else w.session.generate_transport_key_for(record.label, recipient_spki, algorithm=alg))
    except BaseException:
        w.registry.remove(record)
        raise
    w.registry.set_kcv(record, kcv.hex().upper(), components.kcv_method(alg).value)
    return _key_result(w.registry.get(w.domain, KeyKind.TRANSPORT, bureau, record.version), False), wrapped


def discard_key(w: Worker, kind: str, name: str, version: int) -> None:
    """Undo a key a failed ceremony made: destroy the token object, record it destroyed (never active)."""
    record = w.registry.get(w.domain, KeyKind(kind), name, version)
    if w.session.has_key(record.label):
        w.session.destroy(record.label)
    w.registry.transition(record, KeyState.DESTROYED)


def export_components(w: Worker, kind: str, name: str, version: int, recipients: Sequence[tuple[str, str]],
                      ceremony_id: str) -> list[tuple[str, bytes, str]]:
    """Escrow: the key split into one component per recipient (URI, approval public key PEM), each sealed to that
    recipient with its KCV. The token refuses keys not created escrowable. The whole key exists only in a buffer
    wiped before this returns; its KCV is checked against the registry first."""
    record = w.registry.get(w.domain, KeyKind(kind), name, version)
    if record.state in (KeyState.DESTROYED, KeyState.COMPROMISED):
        raise InvalidState(f"{record.label} is {record.state.value}; it is not exported")
    alg = Algorithm(record.algorithm)
    value = w.session.escrow_export(record.label, custody_label(w))
    parts: list[bytearray] = []
    try:
        if components.kcv(alg, value) != record.kcv:
            raise HsmError(f"{record.label}: the exported value does not match the registered KCV")
        parts = components.split(value, len(recipients))
        return [(uri, components.seal_to_officer(parse_public_key(pem), part, components.context_for(ceremony_id, uri)),
                 components.kcv(alg, part)) for (uri, pem), part in zip(recipients, parts, strict=True)]
    finally:
        wipe(value)
        for part in parts:
            wipe(part)


def destroy_key(w: Worker, kind: str, name: str, version: int) -> dict[str, Any]:
    """Destroy the token object (both halves of a signing key pair) and record the key as destroyed (allowed from
    pre-activation, deactivated or compromised only: an active key is first deactivated by its own ceremony)."""
    record = w.registry.get(w.domain, KeyKind(kind), name, version)
    if KeyState.DESTROYED not in TRANSITIONS[record.state]:
        raise InvalidState(f"{record.label} is {record.state.value}; deactivate it (or mark it compromised) first")
    if record.kind is KeyKind.SIGNING:
        for half in ("private", "public"):
            with contextlib.suppress(HsmKeyNotFound):  # a half already gone
                w.session.destroy(record.label, half)
    elif w.session.has_key(record.label):
        w.session.destroy(record.label)
    return _key_result(w.registry.transition(record, KeyState.DESTROYED), False)


def signing_key_name(algorithm: str) -> str:
    """The name of the issuance signing key of a ceremony's ``algorithm`` (the one the sealer signs with)."""
    return SIGNING_KEYS[SIGNING_ALGORITHMS[algorithm]][0]


def signature_algorithms(w: Worker) -> list[str]:
    """The signing key algorithms (as ceremonies name them) this domain's token can generate and sign with: what
    its mechanism list offers, read through the configured mechanism profile (SM2 only where the profile names its
    codes and the token lists them)."""
    offered = w.session.mechanisms()
    found = []
    if {"EC_KEY_PAIR_GEN", "ECDSA"} <= offered:
        found.append("ecdsa-p256")
    sm2 = w.session.profile.sm2_key
    if sm2 is not None and "SM2_SM3" in offered and (
            "EC_KEY_PAIR_GEN" if sm2.key_type is None else "SM2_KEY_PAIR_GEN") in offered:
        found.append("sm2")
    return found


def generate_signing_key(w: Worker, name: str, algorithm: str) -> dict[str, Any]:
    """The next version of the issuance signing key ``name``: a key pair made in the token (private key sensitive,
    non-extractable, sign only; kms.hsm.session.generate_signing_key), registered ``pre-activation`` with its public
    key (the registry's audit records show its SHA-256, never the key). It signs nothing until a set-key-state
    ceremony activates it, once the bureaus' stations trust its public key. A version still awaiting activation is
    refused (InvalidState): activate or destroy it first. Returns label, version, state, algorithm and the public
    key (SubjectPublicKeyInfo DER)."""
    if algorithm not in SIGNING_ALGORITHMS:
        raise InvalidArgument("algorithm", f"must be one of {', '.join(SIGNING_ALGORITHMS)}")
    signature = SIGNING_ALGORITHMS[algorithm]
    key_name, registered = SIGNING_KEYS[signature]
    if name != key_name:
        raise InvalidArgument("name", f"{algorithm} issuance signing keys are named {key_name}")
    for pending in w.registry.versions(w.domain, KeyKind.SIGNING, name):
        if pending.state is KeyState.PRE_ACTIVATION:
            raise InvalidState(f"{pending.label} awaits activation: activate it (set-key-state) or destroy it first")
    record = w.registry.add(w.domain, KeyKind.SIGNING, name, registered, state=KeyState.PRE_ACTIVATION)
    try:
        spki = w.session.generate_signing_key(record.label, algorithm=signature)
    except BaseException:
        w.registry.remove(record)  # no token object was made
        raise
    w.registry.set_kcv(record, "", "", public_key=spki)
    made = w.registry.get(w.domain, KeyKind.SIGNING, name, record.version)
    return {"label": made.label, "version": made.version, "state": made.state.value, "algorithm": algorithm,
            "public_key": spki}


def sign(w: Worker, label: str, message: bytes) -> bytes:
    """The domain's signature (ECDSA P-256 over SHA-256) on a document such as ceremony minutes."""
    return w.session.sign_sha256(label, message)


def _key_result(record: KeyRecord, escrow: bool) -> dict[str, Any]:
    return {"label": record.label, "version": record.version, "state": record.state.value, "kcv": record.kcv or "",
            "kcv_method": record.kcv_method or "", "escrow": "yes" if escrow else "no"}
