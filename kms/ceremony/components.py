"""Key components for split knowledge: splitting, joining, check values, and sealing each component to one person.

This is the one documented place where a clear key exists outside an HSM: during a ceremony, a key is joined from
(or split into) components in a ``bytearray`` that the caller wipes right after use, because SoftHSM offers no
in-token XOR. Nothing here logs, prints or raises with a value in it.

- Components sent in travel encrypted to the domain's custody key (RSA-OAEP with SHA-1, the only OAEP SoftHSM 2.6
  decrypts), sealed on the custodian's machine: ``seal_to_custody``.
- Components sent out (escrow) are encrypted to the custodian's approval key, ECIES: an ephemeral P-256 key, ECDH,
  HKDF-SHA256 bound to the ceremony and the custodian, AES-256-GCM: ``seal_to_officer`` / ``open_for_officer``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kms.cards import reference
from kms.errors import InvalidArgument
from kms.hsm.types import Algorithm, KcvMethod, wipe

# SHA-1 is what SoftHSM 2.6 offers for OAEP decryption (OAEP's security does not rest on SHA-1's collisions).
_OAEP_SHA1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
_ECIES_INFO = b"kms-component/v1\x00"
_POINT = 65  # uncompressed P-256 point


def kcv_method(algorithm: Algorithm) -> KcvMethod:
    if algorithm is Algorithm.DES2:
        return KcvMethod.TDES_ECB_ZERO
    if algorithm is Algorithm.AES256:
        return KcvMethod.AES_ECB_ZERO
    if algorithm is Algorithm.SM4:
        return KcvMethod.SM4_ECB_ZERO
    raise InvalidArgument("algorithm", f"{algorithm} components are not supported on this HSM")


def kcv(algorithm: Algorithm, value: bytes | bytearray) -> str:
    """The check value of a component or key, by the method recorded for its algorithm."""
    if len(value) != algorithm.length:
        raise InvalidArgument("component", f"a {algorithm} component is {algorithm.length} bytes")
    if kcv_method(algorithm) is KcvMethod.TDES_ECB_ZERO:
        return reference.kcv_tdes(bytes(value)).hex().upper()
    cipher = algorithms.SM4(bytes(value)) if algorithm is Algorithm.SM4 else algorithms.AES(bytes(value))
    encryptor = Cipher(cipher, modes.ECB()).encryptor()  # noqa: S305 (one zero block: a KCV)
    return (encryptor.update(bytes(16)) + encryptor.finalize())[:3].hex().upper()


def split(value: bytearray, count: int) -> list[bytearray]:
    """``count`` components whose XOR is ``value``: count-1 random, the last one the XOR of all. The caller wipes
    the value and every component."""
    if count < 2:
        raise InvalidArgument("custodians", "split knowledge needs at least 2 custodians")
    parts = [bytearray(secrets.token_bytes(len(value))) for _ in range(count - 1)]
    last = bytearray(value)
    for part in parts:
        for i, byte in enumerate(part):
            last[i] ^= byte
    return [*parts, last]


def join(parts: Sequence[bytearray]) -> bytearray:
    """The XOR of the components (all of one length), in a new buffer the caller wipes."""
    if len(parts) < 2 or len({len(p) for p in parts}) != 1:
        raise InvalidArgument("components", "need at least 2 components of one length")
    joined = bytearray(len(parts[0]))
    for part in parts:
        for i, byte in enumerate(part):
            joined[i] ^= byte
    return joined


def seal_to_custody(custody_spki: bytes, component: bytes | bytearray) -> bytes:
    """At the custodian's machine: the component encrypted to the domain's custody key (RSA-OAEP, SHA-1)."""
    public = serialization.load_der_public_key(custody_spki)
    if not isinstance(public, rsa.RSAPublicKey):
        raise InvalidArgument("custody_key", "is not an RSA public key")
    return public.encrypt(bytes(component), _OAEP_SHA1)


def _kek(shared: bytes, context: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_ECIES_INFO + context).derive(shared)


def seal_to_officer(public: ec.EllipticCurvePublicKey, component: bytes | bytearray, context: bytes) -> bytes:
    """A component for one officer only: ephemeral point ‖ nonce ‖ AES-256-GCM(component), ``context`` (ceremony
    id and custodian) bound in both the key derivation and the associated data."""
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    point = ephemeral.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint)
    key = _kek(ephemeral.exchange(ec.ECDH(), public), context)
    nonce = secrets.token_bytes(12)
    return point + nonce + AESGCM(key).encrypt(nonce, bytes(component), context)


def open_for_officer(private: ec.EllipticCurvePrivateKey, sealed: bytes, context: bytes) -> bytearray:
    """At the custodian's machine: their component back (the caller wipes it)."""
    if len(sealed) < _POINT + 12 + 16:
        raise InvalidArgument("component", "is too short to be a sealed component")
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), sealed[:_POINT])
        key = _kek(private.exchange(ec.ECDH(), peer), context)
        return bytearray(AESGCM(key).decrypt(sealed[_POINT:_POINT + 12], sealed[_POINT + 12:], context))
    except (ValueError, InvalidTag):
        raise InvalidArgument("component", "cannot be opened with this approval key") from None


def context_for(ceremony_id: str, custodian_uri: str) -> bytes:
    return f"{ceremony_id}\x00{custodian_uri}".encode()


__all__ = ["context_for", "join", "kcv", "kcv_method", "open_for_officer", "seal_to_custody", "seal_to_officer",
           "split", "wipe"]
