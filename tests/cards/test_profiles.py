"""kms.cards.profiles: the shipped profile, and rejection of bad profiles with the file, the line and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms.cards import profiles, recipes
from kms.errors import ProfileError
from kms.hsm.types import Algorithm, SignatureAlgorithm

SHIPPED = Path(__file__).resolve().parents[2] / "kms" / "policies" / "profiles"

HRSS_MASTERS = {"hrss-kmc", "hrss-mk", "hrss-stk", "hrss-eak", "hrss-irk", "hrss-puk", "hrss-rpk"}
BANK_MASTERS = {"bank-imk-ac", "bank-imk-smi", "bank-imk-smc", "bank-kmc"}
ALL_MASTERS = {"hrss": HRSS_MASTERS, "bank": BANK_MASTERS}
#: The SM4 master keys of dual-app-sm-v1 and dual-app-mixed-v1 (names of their own beside the 3DES ones).
SM_HRSS_MASTERS = {f"hrss-{k}-sm4" for k in ("mk", "stk", "eak", "irk", "puk", "rpk")}
SM_BANK_MASTERS = {f"bank-imk-{k}-sm4" for k in ("ac", "smi", "smc")}
ALL_SHIPPED_MASTERS = {"hrss": HRSS_MASTERS | SM_HRSS_MASTERS, "bank": BANK_MASTERS | SM_BANK_MASTERS}

GOOD = """\
profile: test-v1
description: a test profile
domains:
  hrss:
    keys:
      - name: mk
        usage: application-master
        recipe: hrss_dispersal
        params: {algorithm: 3des, factors: ["hex:{card_serial}"]}
        master_key: hrss-mk
      - {name: isd-enc, usage: gp-isd-enc, recipe: gp_kmc, params: {method: emv-cps, key: enc}, master_key: hrss-kmc}
  bank:
    keys:
      - {name: udk-ac, usage: application-cryptogram, recipe: emv_option_a, master_key: bank-imk-ac}
"""


def _write(tmp_path: Path, text: str, name: str = "profile.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based line number of the n-th line containing ``needle``."""
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    return hits[occurrence - 1]


def _reject(path: Path, master_keys: dict[str, set[str]] | None = None) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        profiles.load(path, master_keys=master_keys)
    return info.value


# -- the shipped profile -------------------------------------------------------------------------------------------


def test_shipped_profile_loads() -> None:
    profile = profiles.load(SHIPPED / "dual-app.yaml", master_keys=ALL_MASTERS)
    assert profile.name == "dual-app-v1"
    assert profile.source == str(SHIPPED / "dual-app.yaml")
    assert [k.name for k in profile.keys("hrss")] == ["isd-enc", "isd-mac", "isd-dek", "mk", "stk", "eak", "irk",
                                                      "puk", "rpk"]
    assert [k.name for k in profile.keys("bank")] == ["udk-ac", "udk-smi", "udk-smc", "ssd-enc", "ssd-mac", "ssd-dek"]
    assert set(profile.master_keys("hrss")) == HRSS_MASTERS
    assert set(profile.master_keys("bank")) == BANK_MASTERS
    assert profile.master_keys("hrss") == sorted(HRSS_MASTERS)


def test_shipped_profile_recipes() -> None:
    profile = profiles.load(SHIPPED / "dual-app.yaml")
    hrss = {k.name: k for k in profile.keys("hrss")}
    bank = {k.name: k for k in profile.keys("bank")}
    assert hrss["mk"].master_key == "hrss-mk"
    assert hrss["mk"].usage == "application-master"
    chain = hrss["mk"].recipe
    assert isinstance(chain, recipes.HrssDispersal)
    assert chain.factors == tuple(
        recipes.Factor.parse(f) for f in ("ascii:{province}0000sh", "ascii:{city_code}sx", "hex:{card_serial}")
    )
    # The YAML alias gives every HRSS application key the same chain.
    assert all(hrss[n].recipe == chain for n in ("stk", "eak", "irk", "puk", "rpk"))
    assert hrss["isd-mac"].recipe == recipes.GpKmc(method="emv-cps", key="mac")
    assert isinstance(bank["udk-smc"].recipe, recipes.OptionA)
    assert all(k.algorithm is Algorithm.DES2 for k in (*hrss.values(), *bank.values()))
    assert profile.card_fields("hrss") == frozenset({"kdd", "city_code", "card_serial"})
    assert profile.card_fields("bank") == frozenset({"pan", "psn", "kdd"})


def test_shipped_profile_rejected_without_one_master_key() -> None:
    masters = {"hrss": HRSS_MASTERS - {"hrss-puk"}, "bank": BANK_MASTERS}
    error = _reject(SHIPPED / "dual-app.yaml", masters)
    assert "hrss-puk" in error.reason
    assert error.line == _line_of((SHIPPED / "dual-app.yaml").read_text(encoding="utf-8"), "master_key: hrss-puk")


def test_load_dir_of_shipped_profiles() -> None:
    loaded = profiles.load_dir(SHIPPED, master_keys=ALL_SHIPPED_MASTERS)
    assert list(loaded) == ["dual-app-mixed-v1", "dual-app-sm-v1", "dual-app-v1"]


def test_shipped_sm_profiles_need_their_sm4_master_keys() -> None:
    # A registry with only dual-app-v1's keys (a token without SM4) refuses the SM profiles, naming the key.
    error = _reject(SHIPPED / "dual-app-sm.yaml", ALL_MASTERS)
    assert "hrss-mk-sm4" in error.reason and "domain hrss" in error.reason
    error = _reject(SHIPPED / "dual-app-mixed.yaml", ALL_MASTERS)
    assert "bank-imk-ac-sm4" in error.reason and "domain bank" in error.reason


# -- the SM profiles: SM4 keys, transport and signature algorithms ---------------------------------------------------


def test_shipped_sm_profile() -> None:
    profile = profiles.load(SHIPPED / "dual-app-sm.yaml", master_keys=ALL_SHIPPED_MASTERS)
    assert profile.name == "dual-app-sm-v1"
    hrss = {k.name: k for k in profile.keys("hrss")}
    bank = {k.name: k for k in profile.keys("bank")}
    assert list(hrss) == ["isd-enc", "isd-mac", "isd-dek", "mk", "stk", "eak", "irk", "puk", "rpk"]
    assert list(bank) == ["udk-ac", "udk-smi", "udk-smc", "ssd-enc", "ssd-mac", "ssd-dek"]
    # HRSS application keys by the DivSM4 chain with dual-app-v1's factor layout; bank UDKs by PBOC 3.0 SM4.
    chain = hrss["mk"].recipe
    assert chain == recipes.HrssDispersal(factors=tuple(recipes.Factor.parse(f) for f in (
        "ascii:{province}0000sh", "ascii:{city_code}sx", "hex:{card_serial}")), cipher="sm4")
    assert all(hrss[n].recipe == chain for n in ("stk", "eak", "irk", "puk", "rpk"))
    assert all(bank[n].recipe == recipes.OptionA(cipher="sm4") for n in ("udk-ac", "udk-smi", "udk-smc"))
    # GlobalPlatform keysets stay 3DES SCP02 from the same KMCs as dual-app-v1 (the file's comment says why).
    gp = [hrss["isd-enc"], hrss["isd-mac"], hrss["isd-dek"], bank["ssd-enc"], bank["ssd-mac"], bank["ssd-dek"]]
    assert all(isinstance(k.recipe, recipes.GpKmc) and k.algorithm is Algorithm.DES2 for k in gp)
    assert {k.master_key for k in gp} == {"hrss-kmc", "bank-kmc"}
    sm4 = [k for k in (*hrss.values(), *bank.values()) if k not in gp]
    assert len(sm4) == 9 and all(k.algorithm is Algorithm.SM4 for k in sm4)
    assert set(profile.master_keys("hrss")) == SM_HRSS_MASTERS | {"hrss-kmc"}
    assert set(profile.master_keys("bank")) == SM_BANK_MASTERS | {"bank-kmc"}
    for domain in ("hrss", "bank"):
        assert profile.transport(domain) is Algorithm.SM4
        assert profile.signature(domain) is SignatureAlgorithm.SM2_SM3
    assert profile.card_fields("bank") == frozenset({"pan", "psn", "kdd"})


def test_shipped_mixed_profile() -> None:
    mixed = profiles.load(SHIPPED / "dual-app-mixed.yaml", master_keys=ALL_SHIPPED_MASTERS)
    classic = profiles.load(SHIPPED / "dual-app.yaml")
    sm = profiles.load(SHIPPED / "dual-app-sm.yaml")
    assert mixed.name == "dual-app-mixed-v1"
    assert mixed.keys("hrss") == classic.keys("hrss")  # 3DES HRSS exactly as dual-app-v1
    assert mixed.keys("bank") == sm.keys("bank")  # SM4 bank exactly as dual-app-sm-v1
    assert mixed.transport("hrss") is Algorithm.AES256
    assert mixed.signature("hrss") is SignatureAlgorithm.ECDSA_P256_SHA256
    assert (mixed.transport("bank"), mixed.signature("bank")) == (Algorithm.SM4, SignatureAlgorithm.SM2_SM3)


def test_dual_app_keeps_the_defaults() -> None:
    profile = profiles.load(SHIPPED / "dual-app.yaml")
    for domain in ("hrss", "bank", "nowhere"):
        assert profile.transport(domain) is Algorithm.AES256
        assert profile.signature(domain) is SignatureAlgorithm.ECDSA_P256_SHA256


def test_a_profile_built_in_code_has_the_defaults() -> None:
    profile = profiles.Profile(name="x", description="", domains={}, source="x")
    assert profile.transport("bank") is Algorithm.AES256
    assert profile.signature("hrss") is SignatureAlgorithm.ECDSA_P256_SHA256


#: GOOD with an SM4 bank domain: PBOC 3.0 SM4 UDKs, an SM4 transport key, SM2 signatures.
SM_GOOD = GOOD.replace(
    "  bank:\n    keys:\n", "  bank:\n    transport: sm4\n    signature: sm2-sm3\n    keys:\n"
).replace("recipe: emv_option_a, master_key: bank-imk-ac}",
          "recipe: emv_option_a, params: {algorithm: sm4}, master_key: bank-imk-ac}")


def test_transport_and_signature_per_domain(tmp_path: Path) -> None:
    profile = profiles.load(_write(tmp_path, SM_GOOD), master_keys=ALL_MASTERS)
    assert profile.transport("bank") is Algorithm.SM4 and profile.signature("bank") is SignatureAlgorithm.SM2_SM3
    assert profile.transport("hrss") is Algorithm.AES256
    assert profile.signature("hrss") is SignatureAlgorithm.ECDSA_P256_SHA256
    assert profile.keys("bank")[0].algorithm is Algorithm.SM4


def test_3des_keys_may_travel_under_an_sm4_transport_key(tmp_path: Path) -> None:
    text = GOOD.replace("  hrss:\n    keys:\n", "  hrss:\n    transport: sm4\n    keys:\n")
    profile = profiles.load(_write(tmp_path, text))
    assert profile.transport("hrss") is Algorithm.SM4
    assert all(k.algorithm is Algorithm.DES2 for k in profile.keys("hrss"))


@pytest.mark.parametrize(
    ("old", "new", "marker", "reason"),
    [
        pytest.param("transport: sm4", "transport: aes128", "transport: aes128",
                     "domain bank: 'transport' must be one of aes256, sm4, not 'aes128'", id="unknown transport"),
        pytest.param("transport: sm4", "transport: SM4", "transport: SM4", "'transport' must be one of",
                     id="transport is case sensitive"),
        pytest.param("transport: sm4", "transport: [sm4]", "transport: [sm4]", "'transport' must be one of",
                     id="transport not text"),
        pytest.param("signature: sm2-sm3", "signature: sm2", "signature: sm2",
                     "domain bank: 'signature' must be one of ecdsa-p256-sha256, sm2-sm3, not 'sm2'",
                     id="unknown signature"),
        pytest.param("signature: sm2-sm3", "signature: 1", "signature: 1", "'signature' must be one of",
                     id="signature not text"),
        pytest.param("transport: sm4", "transport: aes256", "transport: aes256",
                     "domain bank: key udk-ac is an SM4 key, so the domain needs 'transport: sm4' (it has aes256)",
                     id="SM4 key under an AES transport key"),
        pytest.param("    transport: sm4\n", "", "  bank:",
                     "key udk-ac is an SM4 key, so the domain needs 'transport: sm4'",
                     id="SM4 key under the default transport"),
        pytest.param("    signature: sm2-sm3\n", "    signature: sm2-sm3\n    wrap: sm4\n", "wrap: sm4",
                     "unknown field 'wrap'; allowed: keys, signature, transport", id="unknown domain field"),
    ],
)
def test_sm_fields_rejected_with_file_line_and_reason(tmp_path: Path, old: str, new: str, marker: str,
                                                      reason: str) -> None:
    assert old in SM_GOOD
    text = SM_GOOD.replace(old, new, 1)
    path = _write(tmp_path, text)
    error = _reject(path, ALL_MASTERS)
    line = _line_of(text, marker)
    assert (error.path, error.line) == (str(path), line)
    assert str(error).startswith(f"{path}:{line}:")
    assert reason in error.reason


# -- a good profile written here -----------------------------------------------------------------------------------


def test_good_profile(tmp_path: Path) -> None:
    profile = profiles.load(_write(tmp_path, GOOD), master_keys=ALL_MASTERS)
    assert profile.description == "a test profile"
    assert [k.name for k in profile.keys("hrss")] == ["mk", "isd-enc"]
    assert profile.keys("nowhere") == ()
    assert profile.card_fields("hrss") == frozenset({"card_serial", "kdd"})


def test_one_domain_is_enough(tmp_path: Path) -> None:
    text = GOOD.split("  bank:")[0]
    profile = profiles.load(_write(tmp_path, text))
    assert set(profile.domains) == {"hrss"}
    assert profile.keys("bank") == ()


# -- rejections: file, line, reason --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "marker", "reason"),
    [
        pytest.param("recipe: hrss_dispersal", "recipe: hrss_dispersal_v2", "recipe: hrss_dispersal_v2",
                     "unknown recipe 'hrss_dispersal_v2'", id="unknown recipe"),
        pytest.param("{algorithm: 3des,", "{algorithm: aes,", "{algorithm: aes,", "algorithm must be",
                     id="bad recipe params"),
        pytest.param("params: {method: emv-cps, key: enc}", "params: {method: emv-cps, key: enc, kvn: 1}", "kvn: 1",
                     "unknown parameter 'kvn'", id="unknown recipe param"),
        pytest.param("description: a test profile\n", "description: a test profile\nowner: someone\n",
                     "owner: someone", "unknown field 'owner'", id="unknown top-level field"),
        pytest.param("        master_key: hrss-mk\n", "        master_key: hrss-mk\n        slot: 3\n", "slot: 3",
                     "unknown field 'slot'", id="unknown key field"),
        pytest.param("  bank:\n", "  finance:\n", "finance:", "unknown domain 'finance'", id="unknown domain"),
        pytest.param("{name: isd-enc,", "{name: mk,", "{name: mk,", "key 'mk' appears twice",
                     id="duplicate key name"),
        pytest.param("        usage: application-master\n",
                     "        usage: application-master\n        usage: maintenance\n", "usage: maintenance",
                     "duplicate key 'usage'", id="duplicate YAML mapping key"),
        pytest.param("description: a test profile\n", "description: a test profile\ndescription: twice\n",
                     "description: twice", "duplicate key 'description'", id="duplicate top-level key"),
        pytest.param("description: a test profile", "description: a test: profile", "description: a test: profile",
                     "not valid YAML", id="invalid YAML"),
        pytest.param("  bank:\n    keys:\n      - {name: udk-ac, usage: application-cryptogram, recipe: emv_option_a, "
                     "master_key: bank-imk-ac}\n", "  bank:\n    keys: []\n", "keys: []", "non-empty list",
                     id="empty keys list"),
        pytest.param("name: mk", "name: MK", "name: MK", "must be a lower-case name", id="bad key name"),
        pytest.param("profile: test-v1", "profile: Test V1", "profile: Test V1", "lower-case name",
                     id="bad profile name"),
        pytest.param("params: {algorithm: 3des, factors: [\"hex:{card_serial}\"]}", "params: [3des]",
                     "params: [3des]", "'params' must be a mapping", id="params not a mapping"),
    ],
)
def test_rejected_with_file_line_and_reason(tmp_path: Path, old: str, new: str, marker: str, reason: str) -> None:
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    path = _write(tmp_path, text)
    error = _reject(path, ALL_MASTERS)
    line = _line_of(text, marker, occurrence=text.count(marker))
    assert error.path == str(path)
    assert error.line == line
    assert str(error).startswith(f"{path}:{line}:")
    assert reason in error.reason


def test_missing_master_key_names_key_and_domain(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    error = _reject(path, {"hrss": HRSS_MASTERS - {"hrss-kmc"}, "bank": BANK_MASTERS})
    line = _line_of(GOOD, "master_key: hrss-kmc")
    assert error.line == line
    assert str(error).startswith(f"{path}:{line}:")
    assert "'hrss-kmc'" in error.reason
    assert "domain hrss" in error.reason


def test_master_key_of_the_other_domain_does_not_count(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    # bank-imk-ac exists, but only in the hrss token: the bank key must not accept it.
    error = _reject(path, {"hrss": HRSS_MASTERS | BANK_MASTERS, "bank": set()})
    assert error.line == _line_of(GOOD, "master_key: bank-imk-ac")
    assert "'bank-imk-ac'" in error.reason
    assert "domain bank" in error.reason


def test_master_keys_are_not_checked_without_a_registry(tmp_path: Path) -> None:
    profile = profiles.load(_write(tmp_path, GOOD), master_keys=None)
    assert profile.master_keys("hrss") == ["hrss-kmc", "hrss-mk"]


def test_missing_required_key_field(tmp_path: Path) -> None:
    text = GOOD.replace("        usage: application-master\n", "", 1)
    path = _write(tmp_path, text)
    error = _reject(path)
    assert error.line == _line_of(text, "- name: mk")
    assert "'usage'" in error.reason


@pytest.mark.parametrize("text", ["", "- just\n- a list\n", "plain text\n"])
def test_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    error = _reject(path)
    assert str(error).startswith(f"{path}:1:")


def test_unreadable_profile(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    error = _reject(path)
    assert error.path == str(path)
    assert "cannot read" in error.reason


def test_non_utf8_profile_is_a_profile_error(tmp_path: Path) -> None:
    path = tmp_path / "gbk.yaml"
    path.write_bytes(GOOD.replace("a test profile", "社保应用").encode("gbk"))
    error = _reject(path)
    assert error.path == str(path)


def test_unhashable_yaml_key_is_a_profile_error(tmp_path: Path) -> None:
    text = GOOD.replace("description: a test profile\n", "description: a test profile\n? [a, b]\n: c\n")
    path = _write(tmp_path, text)
    error = _reject(path)
    assert error.line == _line_of(text, "? [a, b]")


def test_key_entry_not_a_mapping_has_its_line(tmp_path: Path) -> None:
    text = GOOD.replace("      - {name: udk-ac,", "      - just-a-name\n      - {name: udk-ac,")
    path = _write(tmp_path, text)
    error = _reject(path)
    assert error.line == _line_of(text, "- just-a-name")


def test_key_name_with_trailing_newline_rejected(tmp_path: Path) -> None:
    text = GOOD.replace("name: mk", 'name: "mk\\n"', 1)
    path = _write(tmp_path, text)
    error = _reject(path)
    assert error.line == _line_of(text, 'name: "mk\\n"')


# -- load_dir ------------------------------------------------------------------------------------------------------


def test_load_dir_by_profile_name(tmp_path: Path) -> None:
    _write(tmp_path, GOOD, "a.yaml")
    _write(tmp_path, GOOD.replace("profile: test-v1", "profile: test-v2"), "b.yaml")
    _write(tmp_path, "not: a profile, and not *.yaml\n", "notes.txt")
    loaded = profiles.load_dir(tmp_path, master_keys=ALL_MASTERS)
    assert sorted(loaded) == ["test-v1", "test-v2"]
    assert loaded["test-v2"].source == str(tmp_path / "b.yaml")


def test_load_dir_rejects_the_same_profile_twice(tmp_path: Path) -> None:
    first = _write(tmp_path, GOOD, "a.yaml")
    second = _write(tmp_path, GOOD.replace("a test profile", "another copy"), "b.yaml")
    with pytest.raises(ProfileError) as info:
        profiles.load_dir(tmp_path)
    assert info.value.path == str(second)
    assert str(info.value).startswith(f"{second}:")
    assert "'test-v1'" in info.value.reason
    assert str(first) in info.value.reason


def test_load_dir_passes_on_a_bad_profile(tmp_path: Path) -> None:
    _write(tmp_path, GOOD, "a.yaml")
    bad = _write(tmp_path, GOOD.replace("recipe: emv_option_a", "recipe: option_b"), "b.yaml")
    with pytest.raises(ProfileError) as info:
        profiles.load_dir(tmp_path)
    assert info.value.path == str(bad)


def test_pan_luhn_is_on_by_default_and_a_profile_may_opt_out(tmp_path: Path) -> None:
    from kms.cards.cardid import CardIdentity
    from kms.errors import InvalidArgument

    bad = CardIdentity(card_ref="c", pan="6214830012345678")
    strict = profiles.load(_write(tmp_path, GOOD, "strict.yaml"))
    assert strict.pan_luhn
    with pytest.raises(InvalidArgument, match=r"^pan: fails the Luhn check$"):
        strict.check_card(bad)
    lax = profiles.load(_write(tmp_path, GOOD.replace("profile: test-v1\n", "profile: test-v1\npan_luhn: false\n"),
                               "lax.yaml"))
    assert not lax.pan_luhn
    lax.check_card(bad)


def test_pan_luhn_must_be_a_boolean(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.replace("profile: test-v1\n", "profile: test-v1\npan_luhn: maybe\n"))
    with pytest.raises(ProfileError) as info:
        profiles.load(path)
    assert info.value.line == 2 and "'pan_luhn' must be true or false" in str(info.value)
