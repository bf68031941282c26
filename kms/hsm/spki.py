"""SubjectPublicKeyInfo of SM2 public keys, built and read by hand (``cryptography`` has no SM2 curve).

An SM2 public key is an ``id-ecPublicKey`` whose named curve is the SM2 curve ``1.2.156.10197.1.301``, holding the
uncompressed point ``04 ‖ X ‖ Y`` (GM/T 0010, as OpenSSL 3 writes and reads it: it loads such a key as an SM2 key).
Both coordinates have 32 bytes, so the DER is one fixed 26-byte prefix and the 65-byte point. No pkcs11 import.
"""

from __future__ import annotations

from kms.errors import InvalidArgument
from kms.hsm.mechanisms import SM2_CURVE_OID, oid_der

_ID_EC_PUBLIC_KEY = oid_der("1.2.840.10045.2.1")
_ALGORITHM = _ID_EC_PUBLIC_KEY + oid_der(SM2_CURVE_OID)
POINT_LENGTH = 65  # 04 ‖ X ‖ Y
#: SEQUENCE { SEQUENCE { id-ecPublicKey, sm2 }, BIT STRING (no unused bits) … }
SM2_PREFIX = (bytes([0x30, 2 + len(_ALGORITHM) + 3 + POINT_LENGTH, 0x30, len(_ALGORITHM)]) + _ALGORITHM
              + bytes([0x03, 1 + POINT_LENGTH, 0x00]))


def sm2_spki(point: bytes) -> bytes:
    """The SPKI DER of an SM2 public key given its uncompressed point."""
    if len(point) != POINT_LENGTH or point[0] != 0x04:
        raise ValueError("an SM2 public key point is 04 ‖ X ‖ Y, 65 bytes")
    return SM2_PREFIX + point


def sm2_point(spki: bytes, field: str = "public_key") -> bytes:
    """The uncompressed point of an SM2 SPKI; InvalidArgument naming ``field`` for anything else."""
    if len(spki) != len(SM2_PREFIX) + POINT_LENGTH or not spki.startswith(SM2_PREFIX) or spki[len(SM2_PREFIX)] != 4:
        raise InvalidArgument(field, "is not an SM2 public key (SubjectPublicKeyInfo, id-ecPublicKey on the SM2 "
                                     "curve, uncompressed point)")
    return spki[len(SM2_PREFIX):]


def is_sm2(spki: bytes) -> bool:
    return spki.startswith(SM2_PREFIX)


def ec_point_attribute(point: bytes) -> bytes:
    """CKA_EC_POINT of an EC public key: the DER OCTET STRING of the uncompressed point (what SoftHSM stores)."""
    return bytes([0x04, len(point)]) + point


def point_of_attribute(value: bytes) -> bytes:
    """The uncompressed point in a CKA_EC_POINT value (a DER OCTET STRING; some modules give the raw point)."""
    if len(value) == POINT_LENGTH + 2 and value[0] == 0x04 and value[1] == POINT_LENGTH:
        return value[2:]
    if len(value) == POINT_LENGTH and value[0] == 0x04:
        return value
    raise ValueError("CKA_EC_POINT holds no uncompressed 256-bit point")
