"""kms.cards.recipes: recipe construction and validation, the HSM steps each recipe asks for, and their references."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from kms.cards import recipes, reference
from kms.cards.cardid import CardIdentity
from kms.errors import InvalidArgument
from kms.hsm.types import Algorithm, DeriveStep

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "derivation.json").read_text(encoding="utf-8"))

#: The factor layout of vendor scripts (docs/architecture.md, section 6): province, city, card serial.
DEFAULT_FACTORS = ["ascii:{province}0000sh", "ascii:{city_code}sx", "hex:{card_serial}"]

CARD = CardIdentity(
    card_ref="card-1",
    city_code="320200",
    card_serial="86843202AD932A48",
    pan="12345678901234567",
    psn="01",
    kdd="00010203040506070809",
)


def _h(text: str) -> bytes:
    return bytes.fromhex(text)


def _not(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


# -- build -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "cls", "algorithm"),
    [
        ("emv_option_a", {}, recipes.OptionA, Algorithm.DES2),
        ("emv_option_a", {"algorithm": "3des"}, recipes.OptionA, Algorithm.DES2),
        ("emv_option_a", {"algorithm": "sm4"}, recipes.OptionA, Algorithm.SM4),
        ("gp_kmc", {"method": "emv-cps", "key": "enc"}, recipes.GpKmc, Algorithm.DES2),
        ("gp_kmc", {"method": "visa2", "key": "dek"}, recipes.GpKmc, Algorithm.DES2),
        ("hrss_dispersal", {"factors": DEFAULT_FACTORS}, recipes.HrssDispersal, Algorithm.DES2),
        ("hrss_dispersal", {"algorithm": "3des", "factors": ["hex:{card_serial}"]}, recipes.HrssDispersal,
         Algorithm.DES2),
        ("hrss_dispersal", {"algorithm": "sm4", "factors": DEFAULT_FACTORS}, recipes.HrssDispersal, Algorithm.SM4),
    ],
)
def test_build_each_recipe(name: str, params: dict[str, Any], cls: type, algorithm: Algorithm) -> None:
    recipe = recipes.build(name, params)
    assert isinstance(recipe, cls)
    assert recipe.name == name
    assert recipe.algorithm is algorithm


def test_build_gp_kmc_keeps_its_params() -> None:
    recipe = recipes.build("gp_kmc", {"method": "visa2", "key": "mac"})
    assert (recipe.method, recipe.key) == ("visa2", "mac")  # type: ignore[attr-defined]


def test_build_hrss_parses_factors() -> None:
    recipe = recipes.build("hrss_dispersal", {"factors": DEFAULT_FACTORS})
    assert [(f.encoding, f.template) for f in recipe.factors] == [  # type: ignore[attr-defined]
        ("ascii", "{province}0000sh"),
        ("ascii", "{city_code}sx"),
        ("hex", "{card_serial}"),
    ]


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        pytest.param("emv_option_b", {}, "unknown recipe 'emv_option_b'", id="unknown recipe"),
        pytest.param("emv_option_a", {"method": "x"}, "unknown parameter 'method'", id="option_a takes no params"),
        pytest.param("gp_kmc", {"method": "emv-cps", "key": "enc", "kvn": 1}, "unknown parameter 'kvn'",
                     id="gp unknown param"),
        pytest.param("hrss_dispersal", {"factors": DEFAULT_FACTORS, "levels": 3}, "unknown parameter 'levels'",
                     id="hrss unknown param"),
        pytest.param("gp_kmc", {"method": "visa1", "key": "enc"}, "method must be", id="bad method"),
        pytest.param("gp_kmc", {"key": "enc"}, "method must be", id="missing method"),
        pytest.param("gp_kmc", {"method": "emv-cps", "key": "kek"}, "key must be", id="bad key"),
        pytest.param("gp_kmc", {"method": "emv-cps"}, "key must be", id="missing key"),
        pytest.param("hrss_dispersal", {"algorithm": "aes", "factors": DEFAULT_FACTORS}, "algorithm must be",
                     id="bad algorithm"),
        pytest.param("emv_option_a", {"algorithm": "aes"}, "algorithm must be '3des' or 'sm4'",
                     id="option_a bad algorithm"),
        pytest.param("emv_option_a", {"algorithm": "SM4"}, "algorithm must be", id="option_a algorithm case"),
        pytest.param("emv_option_a", {"algorithm": "sm4", "method": "pboc"}, "unknown parameter 'method'",
                     id="option_a unknown param beside algorithm"),
        pytest.param("hrss_dispersal", {"factors": []}, "factors must be a list of 1 to 3", id="0 factors"),
        pytest.param("hrss_dispersal", {"factors": [*DEFAULT_FACTORS, "hex:{card_serial}"]},
                     "factors must be a list of 1 to 3", id="4 factors"),
        pytest.param("hrss_dispersal", {}, "factors must be a list", id="no factors"),
        pytest.param("hrss_dispersal", {"factors": "hex:{card_serial}"}, "factors must be a list",
                     id="factors not a list"),
        pytest.param("hrss_dispersal", {"factors": ["{card_serial}"]}, "must look like 'ascii:...' or 'hex:...'",
                     id="factor without encoding"),
        pytest.param("hrss_dispersal", {"factors": ["base64:{card_serial}"]}, "must look like",
                     id="factor unknown encoding"),
        pytest.param("hrss_dispersal", {"factors": ["hex:"]}, "must look like", id="factor empty template"),
        pytest.param("hrss_dispersal", {"factors": [42]}, "must look like", id="factor not text"),
        pytest.param("hrss_dispersal", {"factors": ["ascii:{county}00sh"]}, "unknown field {county}",
                     id="unknown factor field"),
        pytest.param("hrss_dispersal", {"factors": ["hex:{card_serial!r}"]}, "unknown field",
                     id="factor conversion"),
        pytest.param("hrss_dispersal", {"factors": ["hex:{card_serial:>16}"]}, "unknown field",
                     id="factor format spec"),
        pytest.param("hrss_dispersal", {"factors": ["hex:{}"]}, "unknown field", id="positional factor field"),
        pytest.param("hrss_dispersal", {"factors": ["hex:{card_serial.upper}"]}, "unknown field",
                     id="factor attribute access"),
    ],
)
def test_build_rejects(name: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        recipes.build(name, params)


def test_unknown_recipe_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        recipes.build("nope", {})
    assert all(name in str(info.value) for name in ("emv_option_a", "gp_kmc", "hrss_dispersal"))


def test_unknown_factor_field_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        recipes.Factor.parse("ascii:{ssn}")
    assert "{ssn}" in str(info.value)
    assert all(name in str(info.value) for name in ("province", "city_code", "card_serial", "pan", "psn"))


@pytest.mark.parametrize("template", ["ascii:{province", "ascii:province}", "hex:{card_serial}}"])
def test_unbalanced_braces_rejected(template: str) -> None:
    with pytest.raises(ValueError):
        recipes.Factor.parse(template)


def test_a_factor_with_a_trailing_newline_is_refused() -> None:
    # `re.match` with `$` took "ascii:{city_code}sx\n" as "ascii:{city_code}sx": the whole text must match.
    with pytest.raises(ValueError, match="must look like"):
        recipes.Factor.parse("ascii:{city_code}sx\n")


# -- factors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("ascii:{province}0000sh", b"320000sh"),
        ("ascii:{city_code}sx", b"320200sx"),
        ("hex:{card_serial}", _h("86843202AD932A48")),
        ("ascii:{psn}{city_code}", b"01320200"),
        ("hex:0011223344556677", _h("0011223344556677")),
    ],
)
def test_factor_render(template: str, expected: bytes) -> None:
    out = recipes.Factor.parse(template).render(CARD)
    assert out == expected
    assert len(out) == 8


@pytest.mark.parametrize(
    "template",
    ["ascii:{city_code}", "ascii:{city_code}sxx", "hex:{card_serial}00", "hex:{psn}", "ascii:{province}",
     "hex:{pan}0"],
)
def test_factor_of_another_length_is_refused_when_the_profile_loads(template: str) -> None:
    with pytest.raises(ValueError, match="not 8"):
        recipes.Factor.parse(template)


def test_a_pan_factor_is_refused_because_pan_length_varies() -> None:
    # A 16-digit PAN would give 8 bytes, a 19-digit one would not: refused at load, not on some cards.
    with pytest.raises(ValueError, match="for some cards, not 8"):
        recipes.Factor.parse("hex:{pan}")


def test_factor_render_names_a_missing_card_field() -> None:
    card = CardIdentity(card_ref="card-2", city_code="320200")
    with pytest.raises(InvalidArgument) as info:
        recipes.Factor.parse("hex:{card_serial}").render(card)
    assert info.value.field == "card_serial"


def test_factor_province_needs_city_code() -> None:
    factor = recipes.Factor.parse("ascii:{province}0000sh")
    assert factor.fields == frozenset({"city_code"})
    with pytest.raises(InvalidArgument) as info:
        factor.render(CardIdentity(card_ref="card-3", card_serial="86843202AD932A48"))
    assert info.value.field == "city_code"


# -- steps: what the HSM is asked to compute ---------------------------------------------------------------------


def test_option_a_steps() -> None:
    recipe = recipes.build("emv_option_a", {})
    # Rightmost 16 digits of PAN||PSN = "12345678901234567" + "01" -> 4567890123456701
    y = _h("4567890123456701")
    assert y == reference.option_a_input(CARD.pan or "", CARD.psn or "")
    assert recipe.steps(CARD) == ((DeriveStep.DES3_ECB, y + _not(y)),)


def test_option_a_sm4_steps() -> None:
    # PBOC 3.0 SM4: the same Y and the same 16 bytes Y || ~Y, as one SM4 block under the IMK.
    recipe = recipes.build("emv_option_a", {"algorithm": "sm4"})
    y = _h("4567890123456701")
    assert recipe.steps(CARD) == ((DeriveStep.SM4_ECB, y + _not(y)),)
    assert recipe.card_fields == frozenset({"pan", "psn"})


def test_option_a_default_is_unchanged() -> None:
    assert recipes.build("emv_option_a", {}) == recipes.OptionA() == recipes.OptionA(cipher="3des")
    assert recipes.OptionA() != recipes.OptionA(cipher="sm4")


def test_option_a_sm4_reference_is_pboc_sm4_udk() -> None:
    imk = _h("0123456789ABCDEFFEDCBA9876543210")
    sm4 = recipes.OptionA(cipher="sm4").reference(imk, CARD)
    assert sm4 == reference.pboc_sm4_udk(imk, CARD.pan or "", CARD.psn or "")
    assert sm4 == reference.sm4_ecb(imk, _h("4567890123456701") + _not(_h("4567890123456701")))
    assert sm4 != recipes.OptionA().reference(imk, CARD)


@pytest.mark.parametrize(
    ("method", "key", "data"),
    [
        ("emv-cps", "enc", "040506070809F001040506070809" + "0F01"),
        ("emv-cps", "mac", "040506070809F002040506070809" + "0F02"),
        ("visa2", "dek", "000104050607F003000104050607" + "0F03"),
    ],
)
def test_gp_kmc_steps(method: str, key: str, data: str) -> None:
    # GP KMC is not D || ~D: the KMC encrypts the 16-byte GP derivation data as it is.
    recipe = recipes.build("gp_kmc", {"method": method, "key": key})
    assert _h(data) == reference.gp_kmc_input(method, _h(CARD.kdd or ""), key)
    assert recipe.steps(CARD) == ((DeriveStep.DES3_ECB, _h(data)),)


@pytest.mark.parametrize(("cipher", "step"), [("3des", DeriveStep.DES3_ECB), ("sm4", DeriveStep.SM4_ECB)])
def test_hrss_steps_follow_the_domain_factor_layout(cipher: str, step: DeriveStep) -> None:
    recipe = recipes.build("hrss_dispersal", {"algorithm": cipher, "factors": DEFAULT_FACTORS})
    f1 = b"32" + b"0000sh"  # ASCII(province 2 digits) + "0000sh"
    f2 = b"320200" + b"sx"  # ASCII(city 6 digits) + "sx"
    f3 = _h("86843202AD932A48")  # the card serial bytes
    assert recipe.steps(CARD) == tuple((step, f + _not(f)) for f in (f1, f2, f3))


def test_hrss_single_level_steps() -> None:
    recipe = recipes.build("hrss_dispersal", {"factors": ["hex:{card_serial}"]})
    f3 = _h("86843202AD932A48")
    assert recipe.steps(CARD) == ((DeriveStep.DES3_ECB, f3 + _not(f3)),)


@pytest.mark.parametrize(
    ("name", "params", "missing", "card"),
    [
        ("emv_option_a", {}, "pan", CardIdentity(card_ref="c", psn="01")),
        ("emv_option_a", {}, "psn", CardIdentity(card_ref="c", pan="123456789012")),
        ("gp_kmc", {"method": "emv-cps", "key": "enc"}, "kdd", CardIdentity(card_ref="c", pan="123456789012")),
        ("hrss_dispersal", {"factors": DEFAULT_FACTORS}, "card_serial", CardIdentity(card_ref="c", city_code="320200")),
    ],
)
def test_steps_name_a_missing_card_field(name: str, params: dict[str, Any], missing: str, card: CardIdentity) -> None:
    with pytest.raises(InvalidArgument) as info:
        recipes.build(name, params).steps(card)
    assert info.value.field == missing


# -- references ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=f"{c['algorithm']} {c['source']}") for c in VECTORS["ssc_chain"]]
)
def test_hrss_reference_reproduces_ssc_chain_vector(case: dict[str, Any]) -> None:
    recipe = recipes.build("hrss_dispersal", {"algorithm": case["algorithm"], "factors": DEFAULT_FACTORS})
    card = CardIdentity(card_ref="vector", city_code=case["city_code"], card_serial=case["card_serial"])
    assert [f.render(card).hex().upper() for f in recipe.factors] == case["factors"]  # type: ignore[attr-defined]
    assert recipe.reference(_h(case["root"]), card).hex().upper() == case["key"]


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c["source"]) for c in VECTORS["option_a"]]
)
def test_option_a_reference_reproduces_vector(case: dict[str, str]) -> None:
    card = CardIdentity(card_ref="vector", pan=case["pan"], psn=case["psn"])
    assert recipes.build("emv_option_a", {}).reference(_h(case["imk"]), card).hex().upper() == case["key"]


@pytest.mark.parametrize(
    ("case", "key"),
    [pytest.param(c, k, id=f"{k} {c['source']}") for c in VECTORS["gp_kmc"] for k in ("enc", "mac", "dek")],
)
def test_gp_kmc_reference_reproduces_vector(case: dict[str, str], key: str) -> None:
    card = CardIdentity(card_ref="vector", kdd=case["kdd"])
    recipe = recipes.build("gp_kmc", {"method": case["method"], "key": key})
    assert recipe.reference(_h(case["kmc"]), card).hex().upper() == case[key]


# -- card fields ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "fields"),
    [
        ("emv_option_a", {}, {"pan", "psn"}),
        ("gp_kmc", {"method": "emv-cps", "key": "enc"}, {"kdd"}),
        ("hrss_dispersal", {"factors": DEFAULT_FACTORS}, {"city_code", "card_serial"}),
        ("hrss_dispersal", {"factors": ["hex:{card_serial}"]}, {"card_serial"}),
        ("hrss_dispersal", {"factors": ["ascii:{province}{psn}0000"]}, {"city_code", "psn"}),
        ("hrss_dispersal", {"factors": ["hex:{card_serial}", "ascii:{psn}000000"]}, {"card_serial", "psn"}),
        ("hrss_dispersal", {"factors": ["hex:0011223344556677"]}, set()),
    ],
)
def test_card_fields(name: str, params: dict[str, Any], fields: set[str]) -> None:
    assert recipes.build(name, params).card_fields == frozenset(fields)
