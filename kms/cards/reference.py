"""Software reference implementations of the card-key formulas of docs/architecture.md, section 6 (sources of the
SM4 ones: "SM4 derivations: sources" there).

These exist to check the HSM (known-answer self-test, property tests) and to compute SM4 results that a token without
SM4 cannot. They are never a fallback for issuance: production keys are derived only inside the HSM.
"""

from __future__ import annotations

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import BlockCipherAlgorithm, Cipher, algorithms, modes


def _ecb_encrypt(algorithm: BlockCipherAlgorithm, data: bytes) -> bytes:
    encryptor = Cipher(algorithm, modes.ECB()).encryptor()  # noqa: S305 - ECB is the formula, one block at a time
    return encryptor.update(data) + encryptor.finalize()


def tdes_ecb(key: bytes, data: bytes) -> bytes:
    """3DES-ECB with a 16-byte (two-key) or 24-byte key."""
    if len(key) == 16:
        key = key + key[:8]  # K1 K2 K1: the same cipher, spelled the way the library wants
    return _ecb_encrypt(TripleDES(key), data)


def sm4_ecb(key: bytes, data: bytes) -> bytes:
    """SM4-ECB (GB/T 32907) with a 16-byte key over whole 16-byte blocks, no padding."""
    return _ecb_encrypt(algorithms.SM4(key), data)


def complement(data: bytes) -> bytes:
    """Every bit inverted (D ⊕ FF…FF)."""
    return (int.from_bytes(data, "big") ^ ((1 << (8 * len(data))) - 1)).to_bytes(len(data), "big")


def odd_parity(key: bytes) -> bytes:
    """Set each byte's low bit so the byte has odd parity (parity never changes a DES result)."""
    out = bytearray(key)
    for i, b in enumerate(out):
        high = b & 0xFE
        out[i] = high | ((bin(high).count("1") + 1) & 1)
    return bytes(out)


def div3des(key: bytes, factor: bytes) -> bytes:
    """Div3DES(K16, D8) = 3DES_K(D) ‖ 3DES_K(D ⊕ FF…FF), odd parity."""
    _check_len("factor", factor, 8)
    return odd_parity(tdes_ecb(key, factor + complement(factor)))


def divsm4(key: bytes, factor: bytes) -> bytes:
    """DivSM4(K16, D8) = SM4_K(D ‖ ~D): one 16-byte block, no parity (SM4 keys have none)."""
    _check_len("factor", factor, 8)
    return sm4_ecb(key, factor + complement(factor))


div_sm4 = divsm4  # the name of docs/architecture.md's SM4 section; divsm4 stays for existing callers


def option_a_input(pan: str, psn: str) -> bytes:
    """Y: BCD of the rightmost 16 digits of PAN‖PSN, left padded with zeros."""
    digits = (pan + psn)[-16:].rjust(16, "0")
    return bytes.fromhex(digits)


def option_a(imk: bytes, pan: str, psn: str) -> bytes:
    """EMV / PBOC Option A: UDK = 3DES_IMK(Y) ‖ 3DES_IMK(Y ⊕ FF…FF), odd parity."""
    return div3des(imk, option_a_input(pan, psn))


def pboc_sm4_udk(imk: bytes, pan: str, psn: str) -> bytes:
    """PBOC 3.0 (JR/T 0025) SM4 UDK: Option A's Y, UDK = SM4_IMK(Y ‖ ~Y), one block (docs/architecture.md,
    "SM4 derivations: sources")."""
    _check_len("imk", imk, 16)
    return divsm4(imk, option_a_input(pan, psn))


def pboc_sm4_session_key(udk: bytes, atc: bytes) -> bytes:
    """PBOC 3.0 SM4 session key (for ARQC checks, not personalization): SK = SM4_UDK(00^6 ‖ ATC ‖ 00^6 ‖ ~ATC),
    the 3DES session key's two halves as one 16-byte block. Source: docs/architecture.md, "SM4 derivations:
    sources" (a published worked example whose ARQC this key reproduces; the standard's text was not found)."""
    _check_len("udk", udk, 16)
    _check_len("atc", atc, 2)
    return sm4_ecb(udk, bytes(6) + atc + bytes(6) + complement(atc))


GP_KEY_TYPES = {"enc": 0x01, "mac": 0x02, "dek": 0x03}


def gp_kmc_input(method: str, kdd: bytes, key: str) -> bytes:
    """The 16 bytes the KMC encrypts for one key of a GlobalPlatform keyset."""
    _check_len("kdd", kdd, 10)
    t = GP_KEY_TYPES[key]
    if method == "emv-cps":
        part = kdd[4:10]
    elif method == "visa2":
        part = kdd[0:2] + kdd[4:8]
    else:
        raise ValueError(f"unknown GlobalPlatform diversification method {method!r}")
    return part + bytes([0xF0, t]) + part + bytes([0x0F, t])


def gp_kmc(kmc: bytes, method: str, kdd: bytes, key: str) -> bytes:
    return odd_parity(tdes_ecb(kmc, gp_kmc_input(method, kdd, key)))


def chain(algorithm: str, root: bytes, factors: list[bytes]) -> bytes:
    """Multi-level dispersal: each level diversifies the previous level's key by its factor (``"3des"``: Div3DES;
    ``"sm4"``: DivSM4, the SM4 dispersal chain)."""
    step = div3des if algorithm == "3des" else divsm4
    key = root
    for factor in factors:
        key = step(key, factor)
    return key


def kcv_tdes(key: bytes) -> bytes:
    """First 3 bytes of 3DES_K(0^8)."""
    return tdes_ecb(key, bytes(8))[:3]


def kcv_sm4(key: bytes) -> bytes:
    """First 3 bytes of SM4_K(0^16)."""
    return sm4_ecb(key, bytes(16))[:3]


def _check_len(name: str, value: bytes, length: int) -> None:
    if len(value) != length:
        raise ValueError(f"{name} must be {length} bytes, got {len(value)}")
