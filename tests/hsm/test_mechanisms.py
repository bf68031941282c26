"""kms.hsm.mechanisms: the mechanism profiles as data, validated at load; ``hsm.mechanisms`` in the configurations;
the SM2 SubjectPublicKeyInfo built by hand (kms.hsm.spki), checked against OpenSSL. No token needed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kms import config
from kms.errors import ConfigError, InvalidArgument
from kms.hsm import mechanisms, spki
from kms.hsm.mechanisms import MechanismProfile

#: Section 1 of the issue's interface notes: the development token's codes, fixed for every helper.
DEV_CODES = {
    "CKK_SM4": 0x80004D34,
    "SM4_KEY_GEN": 0x80004D01,
    "SM4_ECB": 0x80004D02,
    "SM4_ECB_ENCRYPT_DATA": 0x80004D03,
    "SM2_SM3": 0x80004D11,
    "SM2": 0x80004D12,
    "SM3": 0x80004D20,
}
#: IBM EP11 (the codes the profile cites from the EP11 header ep11.h).
EP11_CODES = {
    "CKK_SM4": 0x80050001,
    "SM4_KEY_GEN": 0x80050001,
    "SM4_ECB": 0x80050004,
    "SM4_ECB_ENCRYPT_DATA": 0x80050009,
    "SM2_KEY_PAIR_GEN": 0x8005000A,
    "SM2": 0x8005000B,
    "SM2_SM3": 0x8005000C,
    "SM3": 0x8005000E,
}


def test_the_shipped_profiles() -> None:
    assert mechanisms.shipped() == ("ibm-ep11", "pkcs11-standard", "softhsm2-sm-dev")
    for name in mechanisms.shipped():
        profile = mechanisms.load(name)
        assert profile.name == name
        assert profile.description and profile.verified and profile.source
        assert all(code >= mechanisms.VENDOR_DEFINED for code in profile.codes.values())


def test_the_standard_profile_has_no_sm_codes() -> None:
    standard = mechanisms.load(mechanisms.STANDARD)
    assert dict(standard.codes) == {}
    assert standard.sm2_key is None
    assert not standard.has_sm4
    assert dict(standard.mechanism_names) == {}


def test_the_development_profile_has_the_agreed_codes() -> None:
    dev = mechanisms.load("softhsm2-sm-dev")
    assert dict(dev.codes) == DEV_CODES
    assert dev.sm2_key is not None and dev.sm2_key.key_type is None  # CKK_EC, CKM_EC_KEY_PAIR_GEN
    assert dev.sm2_key.curve_oid == "1.2.156.10197.1.301"
    assert dev.sm2_key.ec_params == bytes.fromhex("06082A811CCF5501822D")
    # Mechanism names by code; the key type is left out (key type and mechanism codes are separate namespaces).
    assert dev.mechanism_names[0x80004D02] == "SM4_ECB"
    assert 0x80004D34 not in dev.mechanism_names
    assert set(dev.mechanism_names.values()) == set(DEV_CODES) - {"CKK_SM4"}


def test_the_ibm_profile_cites_its_source_and_says_it_is_not_tested() -> None:
    ibm = mechanisms.load("ibm-ep11")
    assert dict(ibm.codes) == EP11_CODES
    assert "ep11.h" in ibm.source and "not tested here" in ibm.verified
    assert ibm.sm2_key is not None and ibm.sm2_key.key_type == 0x80050002  # CKK_IBM_SM2
    # CKK_IBM_SM4 and CKM_IBM_SM4_KEY_GEN share a number: only the mechanism is a mechanism name.
    assert ibm.mechanism_names[0x80050001] == "SM4_KEY_GEN"


def test_an_unknown_profile_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown mechanism profile 'thales'; shipped: ibm-ep11, pkcs11-standard, "
                                          r"softhsm2-sm-dev"):
        mechanisms.load("thales")


def test_oid_der() -> None:
    assert mechanisms.oid_der("1.2.840.10045.2.1") == bytes.fromhex("06072A8648CE3D0201")
    assert mechanisms.oid_der("1.2.840.10045.3.1.7") == bytes.fromhex("06082A8648CE3D030107")  # P-256


# -- profile files: errors name the file and the key ---------------------------------------------------------------


def _profile(tmp_path: Path, stem: str = "acme", **changes: Any) -> Path:
    doc: dict[str, Any] = {
        "version": 1, "name": stem, "description": "Acme HSM", "module_hint": "/opt/acme/libp11.so",
        "source": "acme.h", "verified": "not tested here",
        "codes": {"CKK_SM4": 0x80001001, "SM4_ECB": 0x80001002, "SM4_ECB_ENCRYPT_DATA": 0x80001003,
                  "SM2_SM3": 0x80001011, "SM3": 0x80001020},
        "sm2_key": {"key_type": "ec", "curve_oid": "1.2.156.10197.1.301"},
    }
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def test_a_profile_file_loads(tmp_path: Path) -> None:
    profile = mechanisms.load_file(_profile(tmp_path))
    assert isinstance(profile, MechanismProfile)
    assert profile.code("SM4_ECB") == 0x80001002 and profile.code("SM4_KEY_GEN") is None


def test_hex_codes_in_yaml_are_integers(tmp_path: Path) -> None:
    path = _profile(tmp_path)
    path.write_text(path.read_text().replace(str(0x80001002), "0x80001002"))
    assert "0x80001002" in path.read_text()
    assert mechanisms.load_file(path).code("SM4_ECB") == 0x80001002


@pytest.mark.parametrize(("changes", "message"), [
    ({"vendor": "acme"}, r"top level: unknown key 'vendor'"),
    ({"verified": None}, r"top level: missing key 'verified'"),
    ({"version": 2}, r"version: must be 1"),
    ({"name": "other"}, r"name: 'other' differs from the file's name"),
    ({"description": 3}, r"description: must be text"),
    ({"codes": ["SM4_ECB"]}, r"codes: must be a mapping"),
    ({"codes": {"SM4_CBC": 0x80001004}}, r"codes: unknown name 'SM4_CBC'; known: CKK_SM4, SM4_KEY_GEN"),
    ({"codes": {"CKK_SM4": 0x80001001, "SM4_ECB": 0x1040}}, r"codes\.SM4_ECB: must be an integer from 0x80000000"),
    ({"codes": {"CKK_SM4": 0x80001001, "SM4_ECB": "0x80001002"}}, r"codes\.SM4_ECB: must be an integer"),
    ({"codes": {"CKK_SM4": 0x80001001, "SM4_ECB": True}}, r"codes\.SM4_ECB: must be an integer"),
    ({"codes": {"CKK_SM4": 0x80001001, "SM4_ECB": 0x1_0000_0000}}, r"codes\.SM4_ECB: must be an integer"),
    ({"codes": {"SM4_ECB": 0x80001002}}, r"codes: SM4 mechanisms need codes\.CKK_SM4"),
    ({"codes": {"CKK_SM4": 0x80001001, "SM4_ECB": 0x80001002, "SM3": 0x80001002}},
     r"codes\.SM3: the same code as codes\.SM4_ECB"),
    ({"sm2_key": None}, r"sm2_key: missing \(codes names SM2 mechanisms\)"),
    ({"sm2_key": {"key_type": "ec"}}, r"sm2_key: missing key 'curve_oid'"),
    ({"sm2_key": {"key_type": "ec", "curve_oid": "sm2p256v1"}}, r"sm2_key\.curve_oid: must be an object identifier"),
    ({"sm2_key": {"key_type": "rsa", "curve_oid": "1.2.156.10197.1.301"}}, r"sm2_key\.key_type: must be 'ec'"),
    ({"sm2_key": {"key_type": "ec", "curve_oid": "1.2.840.10045.3.1.7"}},
     r"sm2_key\.curve_oid: must be the SM2 curve 1\.2\.156\.10197\.1\.301 \(sm2p256v1\), not 1\.2\.840"),
    ({"codes": {"CKK_SM4": 0x80001001, "SM4_ECB": 0x80001002, "SM2_SM3": 0x80001011,
                "SM2_KEY_PAIR_GEN": 0x80001010},
      "sm2_key": {"key_type": 0x80001001, "curve_oid": "1.2.156.10197.1.301"}},
     r"sm2_key\.key_type: the same code as codes\.CKK_SM4"),
    ({"sm2_key": {"key_type": 0x80001050, "curve_oid": "1.2.156.10197.1.301"}},
     r"codes\.SM2_KEY_PAIR_GEN: missing \(sm2_key\.key_type is a vendor key type\)"),
    ({"codes": {"SM2_SM3": 0x80001011, "SM2_KEY_PAIR_GEN": 0x80001010}},
     r"codes\.SM2_KEY_PAIR_GEN: not used with sm2_key\.key_type 'ec'"),
])
def test_profile_errors_name_the_file_and_the_key(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    path = _profile(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message) as raised:
        mechanisms.load_file(path)
    assert str(raised.value).startswith(f"{path}: ")


def test_a_profile_that_is_not_yaml_or_not_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("codes: [", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        mechanisms.load_file(bad)
    listed = tmp_path / "listed.yaml"
    listed.write_text("- SM4_ECB\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"listed\.yaml: expected a mapping"):
        mechanisms.load_file(listed)
    with pytest.raises(ConfigError, match=r"absent\.yaml: cannot read"):
        mechanisms.load_file(tmp_path / "absent.yaml")


def test_a_vendor_sm2_key_type_with_its_key_pair_generation(tmp_path: Path) -> None:
    path = _profile(tmp_path, codes={"SM2_SM3": 0x80001011, "SM2_KEY_PAIR_GEN": 0x80001010},
                    sm2_key={"key_type": 0x80001050, "curve_oid": "1.2.156.10197.1.301"})
    profile = mechanisms.load_file(path)
    assert profile.sm2_key is not None and profile.sm2_key.key_type == 0x80001050
    assert not profile.has_sm4


# -- configuration: hsm.mechanisms -----------------------------------------------------------------------------------


def _issuer(tmp_path: Path, hsm: dict[str, Any]) -> Path:
    doc = {"hsm": hsm, "domains": {"hrss": {"token": "kms-hrss", "pin": "env:P"}, "bank": {"token": "kms-bank",
                                                                                         "pin": "env:P"}},
           "database": "sqlite:///kms.db", "profiles": "profiles"}
    path = tmp_path / "kms.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _station(tmp_path: Path, hsm: dict[str, Any]) -> Path:
    doc = {"station": "station-a1", "bureau": "bureau-a", "hsm": hsm, "token": "kms-station-a1", "pin": "env:P",
           "trust": "trust", "ledger": "sqlite:///ledger.db", "domains": ["hrss", "bank"]}
    path = tmp_path / "station.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.mark.parametrize("write", [_issuer, _station])
def test_hsm_mechanisms_defaults_to_the_standard_profile(tmp_path: Path, write: Any) -> None:
    loader = config.load if write is _issuer else config.load_station
    loaded = loader(write(tmp_path, {"module": "auto"}))
    assert loaded.hsm.mechanisms == "pkcs11-standard"
    assert loaded.hsm.profile() == mechanisms.load("pkcs11-standard")


@pytest.mark.parametrize("write", [_issuer, _station])
def test_hsm_mechanisms_names_a_shipped_profile(tmp_path: Path, write: Any) -> None:
    loader = config.load if write is _issuer else config.load_station
    loaded = loader(write(tmp_path, {"module": "auto", "mechanisms": "softhsm2-sm-dev"}))
    assert loaded.hsm.mechanisms == "softhsm2-sm-dev"
    assert loaded.hsm.profile().code("SM4_ECB") == 0x80004D02


@pytest.mark.parametrize("write", [_issuer, _station])
@pytest.mark.parametrize("value", ["thales-luna", 7, ["softhsm2-sm-dev"], ""])
def test_an_unknown_hsm_mechanisms_names_the_key_and_the_shipped_profiles(tmp_path: Path, write: Any,
                                                                          value: Any) -> None:
    loader = config.load if write is _issuer else config.load_station
    path = write(tmp_path, {"module": "auto", "mechanisms": value})
    with pytest.raises(ConfigError) as raised:
        loader(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: hsm.mechanisms: unknown mechanism profile {value!r}")
    assert "shipped: ibm-ep11, pkcs11-standard, softhsm2-sm-dev" in message


def test_hsm_mechanisms_may_name_a_profile_file_beside_the_configuration(tmp_path: Path) -> None:
    _profile(tmp_path, stem="acme")
    loaded = config.load(_issuer(tmp_path, {"module": "auto", "mechanisms": "acme.yaml"}))
    assert loaded.hsm.mechanisms == str(tmp_path / "acme.yaml")
    assert loaded.hsm.profile().name == "acme"


def test_a_broken_profile_file_is_a_configuration_error_naming_both_files(tmp_path: Path) -> None:
    profile = _profile(tmp_path, stem="acme", codes={"SM4_ECB": 0x42})
    path = _issuer(tmp_path, {"module": "auto", "mechanisms": "acme.yaml"})
    with pytest.raises(ConfigError) as raised:
        config.load(path)
    assert str(raised.value).startswith(f"{path}: hsm.mechanisms: {profile}: codes.SM4_ECB: must be an integer")


# -- SM2 SubjectPublicKeyInfo --------------------------------------------------------------------------------------


def test_sm2_spki_is_what_openssl_writes_for_an_sm2_key(tmp_path: Path) -> None:
    """An SM2 key made by OpenSSL 3 (independent of kms): its public key's DER is our fixed prefix and the point,
    and the SPKI kms builds from that point is byte for byte OpenSSL's."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    key, public = tmp_path / "sm2.pem", tmp_path / "sm2.der"
    subprocess.run([openssl, "genpkey", "-algorithm", "SM2", "-out", str(key)], check=True, capture_output=True)
    subprocess.run([openssl, "pkey", "-in", str(key), "-pubout", "-outform", "DER", "-out", str(public)], check=True,
                   capture_output=True)
    der = public.read_bytes()
    point = spki.sm2_point(der)
    assert len(point) == 65 and point[0] == 4
    assert spki.sm2_spki(point) == der
    assert spki.is_sm2(der)


def test_sm2_point_refuses_other_keys() -> None:
    p256 = bytes.fromhex("3059301306072A8648CE3D020106082A8648CE3D030107034200") + b"\x04" + bytes(64)
    for bad in (p256, spki.SM2_PREFIX + b"\x02" + bytes(64), spki.SM2_PREFIX + b"\x04" + bytes(63), b""):
        with pytest.raises(InvalidArgument, match=r"public_key: is not an SM2 public key"):
            spki.sm2_point(bad)


def test_ec_point_attribute_round_trip() -> None:
    point = b"\x04" + bytes(range(64))
    assert spki.ec_point_attribute(point) == b"\x04\x41" + point
    assert spki.point_of_attribute(spki.ec_point_attribute(point)) == point
    assert spki.point_of_attribute(point) == point
    with pytest.raises(ValueError):
        spki.point_of_attribute(b"\x04\x21" + bytes(33))
