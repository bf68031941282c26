"""The SM4 card-key formulas (kms.cards.reference, kms.cards.recipes) against tests/vectors/sm4.json, and every SM4
block of those vectors against a second SM4 implementation: the OpenSSL command line (`openssl enc -sm4-ecb -nopad`).

Sources of the formulas and of each vector: docs/architecture.md, "SM4 derivations: sources". Subprocesses are kept
few: one `openssl` run per distinct key for the vectors, one per example for the property test."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms.cards import profiles, recipes, reference
from kms.cards.cardid import CardIdentity
from kms.hsm.types import Algorithm, DeriveStep

ROOT = Path(__file__).resolve().parents[2]
VECTORS = json.loads((ROOT / "tests" / "vectors" / "sm4.json").read_text(encoding="utf-8"))
SM_PROFILE = profiles.load(ROOT / "kms" / "policies" / "profiles" / "dual-app-sm.yaml")

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command line is not installed "
                                "(it is the independent SM4 implementation these tests compare with)")


def _h(text: str) -> bytes:
    return bytes.fromhex(text)


def _cases(kind: str) -> list[Any]:
    return [pytest.param(case, id=f"{kind}[{i}] {case['source'][:60]}") for i, case in enumerate(VECTORS[kind])]


def openssl_sm4_ecb(key: bytes, data: bytes) -> bytes:
    """SM4-ECB by the OpenSSL command line: an implementation independent of `cryptography`'s."""
    result = subprocess.run(["openssl", "enc", "-sm4-ecb", "-e", "-nopad", "-K", key.hex()], input=data,
                            capture_output=True, check=True, timeout=60)
    return result.stdout


@cache
def _openssl_blocks(key: bytes, blocks: tuple[bytes, ...]) -> dict[bytes, bytes]:
    out = openssl_sm4_ecb(key, b"".join(blocks))
    return {block: out[16 * i:16 * (i + 1)] for i, block in enumerate(blocks)}


def _every_vector_block() -> dict[bytes, list[bytes]]:
    """Each (key, plaintext block) pair the vectors' formulas encrypt, by key."""
    blocks: dict[bytes, list[bytes]] = {}

    def add(key: str | bytes, block: bytes) -> None:
        k = _h(key) if isinstance(key, str) else key
        blocks.setdefault(k, [])
        if block not in blocks[k]:
            blocks[k].append(block)

    for case in VECTORS["div_sm4"]:
        factor = _h(case["factor"])
        add(case["key"], factor + reference.complement(factor))
        add(case["derived"], bytes(16))
    for case in VECTORS["div_sm4_chain"]:
        parents = [case["root"], *case["levels"][:-1]]
        for parent, factor in zip(parents, case["factors"], strict=True):
            add(parent, _h(factor) + reference.complement(_h(factor)))
        add(case["key"], bytes(16))
    for case in VECTORS["pboc_sm4_udk"]:
        y = _h(case["y"])
        add(case["imk"], y + reference.complement(y))
        add(case["key"], bytes(16))
    return blocks


@pytest.fixture(scope="module")
def openssl() -> dict[tuple[bytes, bytes], bytes]:
    """OpenSSL's SM4 of every block the vectors use: one subprocess per distinct key."""
    return {(key, block): out for key, blocks in _every_vector_block().items()
            for block, out in _openssl_blocks(key, tuple(blocks)).items()}


# -- the vector file ---------------------------------------------------------------------------------------------


def test_every_vector_kind_is_covered_and_sourced() -> None:
    assert set(VECTORS) - {"about"} == {"sm4_block", "div_sm4", "div_sm4_chain", "pboc_sm4_udk"}
    for kind in set(VECTORS) - {"about"}:
        assert VECTORS[kind], kind
        assert all(case["source"].strip() for case in VECTORS[kind]), kind
    # The standard's examples and one published worked example, besides the computed cases.
    assert sum("GB/T 32907" in c["source"] for c in VECTORS["sm4_block"]) == 2
    assert any(c["source"].startswith("published") for c in VECTORS["pboc_sm4_udk"])


# -- SM4 itself: GB/T 32907-2016 Appendix A ------------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases("sm4_block"))
def test_sm4_block_examples(case: dict[str, Any]) -> None:
    key, block = _h(case["key"]), _h(case["plaintext"])
    # Example 2 runs the block through SM4 a million times: one encryptor, not a million Cipher objects. Its first
    # step is checked to be the reference's, so the example still speaks for kms.cards.reference.sm4_ecb.
    encryptor = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()
    assert encryptor.update(block) == reference.sm4_ecb(key, block)
    out = reference.sm4_ecb(key, block)
    for _ in range(case["iterations"] - 1):
        out = encryptor.update(out)
    assert out.hex().upper() == case["ciphertext"]


def test_sm4_example_1_by_openssl() -> None:
    case = VECTORS["sm4_block"][0]
    assert openssl_sm4_ecb(_h(case["key"]), _h(case["plaintext"])).hex().upper() == case["ciphertext"]


def test_sm4_ecb_is_block_by_block() -> None:
    key = _h(VECTORS["sm4_block"][0]["key"])
    a, b = bytes(range(16)), bytes(range(16, 32))
    assert reference.sm4_ecb(key, a + b) == reference.sm4_ecb(key, a) + reference.sm4_ecb(key, b)


# -- DivSM4 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases("div_sm4"))
def test_div_sm4_vector(case: dict[str, str], openssl: dict[tuple[bytes, bytes], bytes]) -> None:
    key, factor = _h(case["key"]), _h(case["factor"])
    derived = reference.div_sm4(key, factor)
    assert derived.hex().upper() == case["derived"]
    assert reference.kcv_sm4(derived).hex().upper() == case["kcv"]
    assert openssl[(key, factor + reference.complement(factor))] == derived
    assert openssl[(derived, bytes(16))][:3].hex().upper() == case["kcv"]


@pytest.mark.parametrize("case", _cases("div_sm4_chain"))
def test_div_sm4_chain_vector(case: dict[str, Any], openssl: dict[tuple[bytes, bytes], bytes]) -> None:
    factors = [_h(f) for f in case["factors"]]
    assert reference.chain("sm4", _h(case["root"]), factors).hex().upper() == case["key"] == case["levels"][-1]
    parent = _h(case["root"])
    for factor, level in zip(factors, case["levels"], strict=True):
        child = reference.div_sm4(parent, factor)
        assert child.hex().upper() == level
        assert openssl[(parent, factor + reference.complement(factor))] == child  # level by level, by OpenSSL
        parent = child
    assert reference.kcv_sm4(parent).hex().upper() == case["kcv"] == openssl[(parent, bytes(16))][:3].hex().upper()


@pytest.mark.parametrize("case", _cases("div_sm4_chain"))
def test_sm_profile_hrss_chain_reproduces_vector(case: dict[str, Any]) -> None:
    """The shipped dual-app-sm-v1 profile: its HRSS keys' recipe renders the vector's factors (the HRSS factor
    layout of dual-app.yaml) and computes the vector's card key; the token is asked for one SM4 step per level."""
    recipe = {k.name: k for k in SM_PROFILE.keys("hrss")}["mk"].recipe
    assert isinstance(recipe, recipes.HrssDispersal) and recipe.algorithm is Algorithm.SM4
    card = CardIdentity(card_ref="vector", city_code=case["city_code"], card_serial=case["card_serial"])
    assert [f.render(card).hex().upper() for f in recipe.factors] == case["factors"]
    assert recipe.reference(_h(case["root"]), card).hex().upper() == case["key"]
    assert recipe.steps(card) == tuple(
        (DeriveStep.SM4_ECB, _h(f) + reference.complement(_h(f))) for f in case["factors"])


# -- PBOC 3.0 SM4 UDK, session key, ARQC ---------------------------------------------------------------------------


def _pboc_sm4_mac(key: bytes, data: bytes) -> bytes:
    """PBOC-SM4-MAC as the worked example computes its ARQC: `80` then `00` padding to a multiple of 16, CBC under
    SM4 with a zero IV, the leftmost 8 bytes of the last block."""
    padded = data + b"\x80" + bytes(-(len(data) + 1) % 16)
    state = bytes(16)
    for i in range(0, len(padded), 16):
        state = reference.sm4_ecb(key, bytes(a ^ b for a, b in zip(state, padded[i:i + 16], strict=True)))
    return state[:8]


@pytest.mark.parametrize("case", _cases("pboc_sm4_udk"))
def test_pboc_sm4_udk_vector(case: dict[str, str], openssl: dict[tuple[bytes, bytes], bytes]) -> None:
    imk, y = _h(case["imk"]), _h(case["y"])
    assert reference.option_a_input(case["pan"], case["psn"]) == y
    udk = reference.pboc_sm4_udk(imk, case["pan"], case["psn"])
    assert udk.hex().upper() == case["key"]
    assert udk == reference.div_sm4(imk, y)  # the same operation as DivSM4, with Option A's Y as the factor
    assert reference.kcv_sm4(udk).hex().upper() == case["kcv"]
    assert openssl[(imk, y + reference.complement(y))] == udk
    assert openssl[(udk, bytes(16))][:3].hex().upper() == case["kcv"]


@pytest.mark.parametrize("case", _cases("pboc_sm4_udk"))
def test_pboc_sm4_recipe_reproduces_vector(case: dict[str, str]) -> None:
    recipe = {k.name: k for k in SM_PROFILE.keys("bank")}["udk-ac"].recipe
    assert recipe == recipes.OptionA(cipher="sm4") and recipe.algorithm is Algorithm.SM4
    card = CardIdentity(card_ref="vector", pan=case["pan"], psn=case["psn"])
    y = _h(case["y"])
    assert recipe.steps(card) == ((DeriveStep.SM4_ECB, y + reference.complement(y)),)
    assert recipe.reference(_h(case["imk"]), card).hex().upper() == case["key"]


def _published() -> Iterable[Any]:
    return [pytest.param(c, id=c["source"][:40]) for c in VECTORS["pboc_sm4_udk"] if "session_key" in c]


@pytest.mark.parametrize("case", _published())
def test_pboc_sm4_session_key_and_arqc_of_the_worked_example(case: dict[str, str]) -> None:
    """The published example's whole chain: our UDK gives its session key, and that key its ARQC over the
    example's transaction data. Three results of an independent implementation agree with the reference."""
    udk = _h(case["key"])
    session_key = reference.pboc_sm4_session_key(udk, _h(case["atc"]))
    assert session_key.hex().upper() == case["session_key"]
    assert session_key == reference.sm4_ecb(udk, _h("0000000000000001000000000000FFFE"))  # as the example spells it
    assert _pboc_sm4_mac(session_key, _h(case["arqc_data"])).hex().upper() == case["arqc"]


def test_a_wrong_udk_does_not_give_the_example_arqc() -> None:
    # The ARQC check above can fail: the 3DES-style UDK (two halves, each Y or ~Y alone) gives another ARQC.
    case = next(c for c in VECTORS["pboc_sm4_udk"] if "arqc" in c)
    y = _h(case["y"])
    imk = _h(case["imk"])
    wrong = reference.sm4_ecb(imk, y + y)
    assert wrong.hex().upper() != case["key"]
    session_key = reference.pboc_sm4_session_key(wrong, _h(case["atc"]))
    assert _pboc_sm4_mac(session_key, _h(case["arqc_data"])).hex().upper() != case["arqc"]


# -- the reference against OpenSSL on random input ---------------------------------------------------------------


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.binary(min_size=16, max_size=16), factors=st.lists(st.binary(min_size=8, max_size=8), min_size=1,
                                                                  max_size=6, unique=True))
def test_div_sm4_equals_openssl(key: bytes, factors: list[bytes]) -> None:
    # One openssl run per example, over all its factors' blocks.
    blocks = [f + reference.complement(f) for f in factors]
    out = openssl_sm4_ecb(key, b"".join(blocks))
    assert [reference.div_sm4(key, f) for f in factors] == [out[16 * i:16 * (i + 1)] for i in range(len(factors))]
