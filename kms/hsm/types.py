"""Plain value types of the HSM port: algorithms, derivation steps, KCV methods, and `wipe`.

No pkcs11 import here, so that code which only names an algorithm or wipes a buffer (the CLI, the clients)
does not load the PKCS#11 library.
"""

from __future__ import annotations

import enum


class Algorithm(enum.StrEnum):
    """Secret key algorithms kms handles, with the size that goes with each."""

    DES2 = "DES2"  # two-key 3DES, 16 bytes, the card keys of PBOC 2.0 / HRSS / GP SCP02
    AES256 = "AES256"
    SM4 = "SM4"

    @property
    def length(self) -> int:
        return {"DES2": 16, "AES256": 32, "SM4": 16}[self.value]


class DeriveStep(enum.StrEnum):
    """How one level of diversification is computed inside the token."""

    DES3_ECB = "DES3_ECB_ENCRYPT_DATA"  # 3DES_K(D ‖ ~D) -> a DES2 key (odd parity set by the token)
    SM4_ECB = "SM4_ECB_ENCRYPT_DATA"  # SM4_K(D ‖ ~D) -> an SM4 key; vendor mechanism


class KcvMethod(enum.StrEnum):
    TDES_ECB_ZERO = "TDES-ECB-ZERO8-3"  # first 3 bytes of 3DES_K(0^8)
    AES_ECB_ZERO = "AES-ECB-ZERO16-3"  # first 3 bytes of AES_K(0^16) (the token's CKA_CHECK_VALUE)
    SM4_ECB_ZERO = "SM4-ECB-ZERO16-3"
    HMAC_EMPTY = "HMAC-SHA256-EMPTY-3"  # first 3 bytes of HMAC-SHA256_K("") (generic secrets: PAN index keys)


class SignatureAlgorithm(enum.StrEnum):
    """How a domain signs its bundle sections (the value is r‖s, 64 bytes, in both)."""

    ECDSA_P256_SHA256 = "ECDSA-P256-SHA256"
    SM2_SM3 = "SM2-SM3"  # SM2 with SM3 and the default Z_A identity of GM/T 0009



def wipe(buffer: bytearray) -> None:
    """Overwrite a buffer that held key material."""
    for i in range(len(buffer)):
        buffer[i] = 0
