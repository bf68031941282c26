"""kms.cards.reference: the software formulas (docs/architecture.md, section 6) against published known-answer
vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kms.cards import reference

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "derivation.json").read_text(encoding="utf-8"))


def _h(text: str) -> bytes:
    return bytes.fromhex(text)


def _cases(kind: str) -> list[pytest.ParameterSet]:
    return [pytest.param(case, id=f"{kind}[{i}] {case['source']}") for i, case in enumerate(VECTORS[kind])]


def _gp_cases() -> list[pytest.ParameterSet]:
    return [
        pytest.param(case, key, id=f"gp_kmc[{i}] {key} {case['source']}")
        for i, case in enumerate(VECTORS["gp_kmc"])
        for key in ("enc", "mac", "dek")
    ]


def _parity_odd(byte: int) -> bool:
    return bin(byte).count("1") % 2 == 1


# -- known-answer vectors ----------------------------------------------------------------------------------------


def test_every_vector_kind_is_covered() -> None:
    # A new kind in the JSON file must get a test here.
    assert set(VECTORS) - {"about"} == {"option_a", "gp_kmc", "ssc_chain", "sm4_block", "tdes_kcv"}
    assert all(VECTORS[kind] for kind in set(VECTORS) - {"about"})


@pytest.mark.parametrize("case", _cases("option_a"))
def test_option_a_vector(case: dict[str, str]) -> None:
    key = reference.option_a(_h(case["imk"]), case["pan"], case["psn"])
    assert key.hex().upper() == case["key"]
    assert reference.kcv_tdes(key).hex().upper() == case["kcv"]


@pytest.mark.parametrize(("case", "key_type"), _gp_cases())
def test_gp_kmc_vector(case: dict[str, str], key_type: str) -> None:
    key = reference.gp_kmc(_h(case["kmc"]), case["method"], _h(case["kdd"]), key_type)
    assert key.hex().upper() == case[key_type]
    assert reference.kcv_tdes(key).hex().upper() == case[f"kcv_{key_type}"]


@pytest.mark.parametrize("case", _cases("ssc_chain"))
def test_ssc_chain_vector(case: dict[str, object]) -> None:
    factors = [_h(f) for f in case["factors"]]  # type: ignore[attr-defined]
    key = reference.chain(str(case["algorithm"]), _h(str(case["root"])), factors)
    assert key.hex().upper() == case["key"]
    if "kcv" in case:
        assert reference.kcv_tdes(key).hex().upper() == case["kcv"]


@pytest.mark.parametrize("case", _cases("ssc_chain"))
def test_ssc_chain_is_level_by_level_diversification(case: dict[str, object]) -> None:
    step = reference.div3des if case["algorithm"] == "3des" else reference.divsm4
    key = _h(str(case["root"]))
    for factor in case["factors"]:  # type: ignore[attr-defined]
        key = step(key, _h(factor))
    assert key.hex().upper() == case["key"]


@pytest.mark.parametrize("case", _cases("sm4_block"))
def test_sm4_block_vector(case: dict[str, str]) -> None:
    assert reference.sm4_ecb(_h(case["key"]), _h(case["plaintext"])).hex().upper() == case["ciphertext"]


@pytest.mark.parametrize("case", _cases("tdes_kcv"))
def test_tdes_kcv_vector(case: dict[str, str]) -> None:
    assert reference.kcv_tdes(_h(case["key"])).hex().upper() == case["kcv"]


def test_tdes_two_key_equals_three_key_k1_k2_k1() -> None:
    key = _h("0123456789ABCDEFFEDCBA9876543210")
    data = _h("0011223344556677")
    assert reference.tdes_ecb(key, data) == reference.tdes_ecb(key + key[:8], data)


def test_kcv_sm4_is_first_three_bytes_of_sm4_of_zero_block() -> None:
    # Independent: the GB/T 32907 vector tells us SM4 works; a KCV is its first 3 bytes over 0^16.
    key = _h("0123456789ABCDEFFEDCBA9876543210")
    kcv = reference.kcv_sm4(key)
    assert len(kcv) == 3
    assert kcv == reference.sm4_ecb(key, bytes(16))[:3]


# -- diversification ---------------------------------------------------------------------------------------------


def test_div3des_is_3des_of_d_and_complement_with_parity() -> None:
    key = _h("0123456789ABCDEFFEDCBA9876543210")
    factor = _h("86843202AD932A48")
    expected = reference.tdes_ecb(key, factor) + reference.tdes_ecb(key, _h("797BCDFD526CD5B7"))
    assert reference.div3des(key, factor) == reference.odd_parity(expected)


def test_divsm4_is_one_sm4_block_of_d_and_complement() -> None:
    key = _h("0123456789ABCDEFFEDCBA9876543210")
    factor = _h("86843202AD932A48")
    assert reference.divsm4(key, factor) == reference.sm4_ecb(key, _h("86843202AD932A48797BCDFD526CD5B7"))


@pytest.mark.parametrize("step", [reference.div3des, reference.divsm4])
@pytest.mark.parametrize("length", [0, 7, 9, 16])
def test_diversification_factor_must_be_8_bytes(step: object, length: int) -> None:
    with pytest.raises(ValueError, match="factor must be 8 bytes"):
        step(bytes(16), bytes(length))  # type: ignore[operator]


def test_div_sm4_is_divsm4() -> None:
    assert reference.div_sm4 is reference.divsm4


def test_sm4_chain_is_div_sm4_level_by_level() -> None:
    root = _h("0123456789ABCDEFFEDCBA9876543210")
    factors = [b"320000sh", b"320200sx", _h("86843202AD932A48")]
    key = root
    for factor in factors:
        key = reference.div_sm4(key, factor)
    assert reference.chain("sm4", root, factors) == key
    assert reference.chain("sm4", root, factors[:1]) == reference.div_sm4(root, factors[0])


def test_pboc_sm4_udk_is_div_sm4_of_option_a_y() -> None:
    imk = _h("0123456789ABCDEFFEDCBA9876543210")
    udk = reference.pboc_sm4_udk(imk, "99012345678901234", "45")
    assert udk == reference.div_sm4(imk, _h("1234567890123445"))
    assert len(udk) == 16
    # No parity adjustment: an SM4 key is whatever the block cipher gives.
    assert udk == reference.sm4_ecb(imk, _h("1234567890123445EDCBA9876FEDCBBA"))


@pytest.mark.parametrize("length", [0, 8, 15, 24, 32])
def test_pboc_sm4_udk_needs_a_16_byte_imk(length: int) -> None:
    with pytest.raises(ValueError, match="imk must be 16 bytes"):
        reference.pboc_sm4_udk(bytes(length), "12345678901234567", "01")


def test_pboc_sm4_session_key_layout() -> None:
    udk = _h("016F6E76BD8E6FB4A17C28C4B05E03A8")
    assert reference.pboc_sm4_session_key(udk, _h("1234")) == reference.sm4_ecb(
        udk, _h("000000000000" + "1234" + "000000000000" + "EDCB"))


@pytest.mark.parametrize(("udk", "atc", "message"), [(bytes(8), bytes(2), "udk must be 16 bytes"),
                                                     (bytes(16), bytes(1), "atc must be 2 bytes"),
                                                     (bytes(16), bytes(3), "atc must be 2 bytes")])
def test_pboc_sm4_session_key_input_lengths(udk: bytes, atc: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        reference.pboc_sm4_session_key(udk, atc)


def test_complement() -> None:
    assert reference.complement(_h("00FF0F5A")) == _h("FF00F0A5")


# -- odd parity --------------------------------------------------------------------------------------------------


@given(st.binary(max_size=32))
def test_odd_parity_every_byte_odd(key: bytes) -> None:
    out = reference.odd_parity(key)
    assert len(out) == len(key)
    assert all(_parity_odd(b) for b in out)


@given(st.binary(max_size=32))
def test_odd_parity_idempotent(key: bytes) -> None:
    once = reference.odd_parity(key)
    assert reference.odd_parity(once) == once


@given(st.binary(max_size=32))
def test_odd_parity_changes_only_the_low_bit(key: bytes) -> None:
    out = reference.odd_parity(key)
    assert all((a ^ b) & 0xFE == 0 for a, b in zip(key, out, strict=True))


@given(st.binary(min_size=16, max_size=16))
def test_parity_never_changes_a_tdes_kcv(key: bytes) -> None:
    assert reference.kcv_tdes(reference.odd_parity(key)) == reference.kcv_tdes(key)


def test_odd_parity_examples() -> None:
    # 0x00 -> 0x01, 0x01 stays, 0x03 -> 0x02, 0xFE -> 0xFE (7 ones), 0xFF -> 0xFE
    assert reference.odd_parity(bytes([0x00, 0x01, 0x03, 0xFE, 0xFF])) == bytes([0x01, 0x01, 0x02, 0xFE, 0xFE])


# -- Option A input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pan", "psn", "y"),
    [
        pytest.param("12345678901234567", "01", "4567890123456701", id="17-digit PAN keeps rightmost 16 of PAN||PSN"),
        pytest.param("1234567890123456789", "01", "6789012345678901", id="19-digit PAN"),
        pytest.param("12345678901234", "56", "1234567890123456", id="exactly 16 digits"),
        pytest.param("123456789012", "00", "0012345678901200", id="short PAN zero padded on the left"),
        pytest.param("123456789012", "07", "0012345678901207", id="short PAN, PSN kept at the right"),
    ],
)
def test_option_a_input(pan: str, psn: str, y: str) -> None:
    assert reference.option_a_input(pan, psn) == _h(y)


def test_option_a_is_div3des_of_y() -> None:
    imk = _h("0123456789ABCDEFFEDCBA9876543210")
    assert reference.option_a(imk, "99012345678901234", "45") == reference.div3des(imk, _h("1234567890123445"))


# -- GlobalPlatform KMC input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kdd", "key", "data"),
    [
        ("emv-cps", "00010203040506070809", "enc", "040506070809F001040506070809" + "0F01"),
        ("emv-cps", "00010203040506070809", "mac", "040506070809F002040506070809" + "0F02"),
        ("emv-cps", "00010203040506070809", "dek", "040506070809F003040506070809" + "0F03"),
        ("visa2", "11223344556677889900", "enc", "112255667788F001112255667788" + "0F01"),
        ("visa2", "11223344556677889900", "dek", "112255667788F003112255667788" + "0F03"),
    ],
)
def test_gp_kmc_input_layout(method: str, kdd: str, key: str, data: str) -> None:
    assert reference.gp_kmc_input(method, _h(kdd), key) == _h(data)


@pytest.mark.parametrize("length", [0, 8, 9, 11, 16])
def test_gp_kmc_input_rejects_kdd_not_10_bytes(length: int) -> None:
    with pytest.raises(ValueError, match="kdd must be 10 bytes"):
        reference.gp_kmc_input("emv-cps", bytes(length), "enc")


@pytest.mark.parametrize("method", ["emv_cps", "EMV-CPS", "visa1", ""])
def test_gp_kmc_input_rejects_unknown_method(method: str) -> None:
    with pytest.raises(ValueError, match="unknown GlobalPlatform diversification method"):
        reference.gp_kmc_input(method, bytes(10), "enc")
