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


#: The SM2 curve (GB/T 32918.5): y^2 = x^3 + a x + b over GF(p).
_P = int("FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF", 16)
_A = _P - 3
_B = int("28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93", 16)


def on_sm2_curve(point: bytes) -> bool:
    """Whether an uncompressed point 04 ‖ X ‖ Y is a point of the SM2 curve (its cofactor is 1: every such point is
    in the group the signatures use)."""
    if len(point) != POINT_LENGTH or point[0] != 0x04:
        return False
    x, y = int.from_bytes(point[1:33], "big"), int.from_bytes(point[33:], "big")
    return x < _P and y < _P and (y * y - (x * x * x + _A * x + _B)) % _P == 0


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
