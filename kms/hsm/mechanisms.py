"""Mechanism profiles: the vendor-defined PKCS#11 codes one family of modules uses for the SM algorithms.

PKCS#11 has no standard SM4, SM2 or SM3 mechanisms; every vendor picks codes of its own above
CKM_VENDOR_DEFINED (0x80000000), and they conflict. A profile is a reviewed data file in
``kms/hsm/mechanisms/<name>.yaml`` (package data) naming, for one family of modules, its code for each name of
kms's vocabulary (``CKK_SM4``, ``SM4_KEY_GEN``, ``SM4_ECB``, ``SM4_ECB_ENCRYPT_DATA``, ``SM2_SM3``, ``SM2``, ``SM3``,
``SM2_KEY_PAIR_GEN``), the kind of key an SM2 key pair is, and what the codes were verified against.
A configuration chooses one (``hsm.mechanisms``); only the HSM port (kms/hsm) reads codes, everything else speaks
of ``Algorithm.SM4``, ``DeriveStep.SM4_ECB`` and ``SignatureAlgorithm.SM2_SM3``.

No pkcs11 import here: the configuration loader validates profile names and files without loading a PKCS#11 library.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kms.errors import ConfigError
from kms.files import read_yaml_mapping

#: The profile of a module that offers only standard mechanisms (no SM algorithms): the default.
STANDARD = "pkcs11-standard"
#: CKM_VENDOR_DEFINED (= CKK_VENDOR_DEFINED): every code a profile names is at least this.
VENDOR_DEFINED = 0x80000000
_CODE_MAX = 0xFFFFFFFF  # CK_ULONG is 32 bits on some platforms; every vendor code seen fits

#: Key types a profile may name (CKK_...).
KEY_TYPES = ("CKK_SM4",)
#: Mechanisms a profile may name. ``SM2_KEY_PAIR_GEN`` only when SM2 keys are of a vendor key type; with
#: ``sm2_key.key_type: ec`` they are made with the standard CKM_EC_KEY_PAIR_GEN and the SM2 curve.
MECHANISMS = ("SM4_KEY_GEN", "SM4_ECB", "SM4_ECB_ENCRYPT_DATA", "SM2_SM3", "SM2", "SM3", "SM2_KEY_PAIR_GEN")
_SM4_MECHANISMS = frozenset({"SM4_KEY_GEN", "SM4_ECB", "SM4_ECB_ENCRYPT_DATA"})
_SM2_MECHANISMS = frozenset({"SM2_SM3", "SM2"})

#: The SM2 curve (GM/T 0006: sm2p256v1), as ``CKA_EC_PARAMS`` names it.
SM2_CURVE_OID = "1.2.156.10197.1.301"

_TOP = {"version", "name", "description", "module_hint", "source", "verified", "codes", "sm2_key"}
_REQUIRED = {"version", "name", "description", "verified", "codes"}
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


def oid_der(dotted: str) -> bytes:
    """The DER encoding (tag, length, value) of an object identifier given in dotted form."""
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return bytes([0x06, len(body)]) + bytes(body)


@dataclass(frozen=True)
class Sm2Key:
    """What an SM2 key pair is in this family's tokens."""

    key_type: int | None  # None: an ordinary CKK_EC key; else the vendor's key type code
    curve_oid: str

    @property
    def ec_params(self) -> bytes:
        """CKA_EC_PARAMS of an SM2 key: the curve's OID, DER."""
        return oid_der(self.curve_oid)


@dataclass(frozen=True)
class MechanismProfile:
    """One family's codes for kms's SM vocabulary. ``codes`` holds only the names the family has."""

    name: str
    description: str
    module_hint: str
    source: str
    verified: str
    codes: Mapping[str, int]
    sm2_key: Sm2Key | None

    def code(self, name: str) -> int | None:
        """The code of a key type or mechanism name, or None if this family has none."""
        return self.codes.get(name)

    @functools.cached_property
    def mechanism_names(self) -> Mapping[int, str]:
        """Mechanism code -> kms's name (key types left out: their codes may reuse a mechanism's number)."""
        return MappingProxyType({code: name for name, code in self.codes.items() if name in MECHANISMS})

    @property
    def has_sm4(self) -> bool:
        return "CKK_SM4" in self.codes


def shipped() -> tuple[str, ...]:
    """The names of the profiles shipped with kms, sorted."""
    return tuple(sorted(p.name.removesuffix(".yaml") for p in _directory().iterdir() if p.name.endswith(".yaml")))


def load(name: str) -> MechanismProfile:
    """A shipped profile by name; ConfigError naming the shipped names if there is none."""
    if name not in shipped():
        raise ConfigError(f"unknown mechanism profile {name!r}; shipped: {', '.join(shipped())}")
    return load_file(_directory() / f"{name}.yaml")


@functools.lru_cache(maxsize=32)
def load_file(path: Path) -> MechanismProfile:
    """A profile file, validated: unknown keys, names and code ranges are errors naming the file and the key."""
    doc = read_yaml_mapping(path)
    _keys(path, "top level", doc, _REQUIRED, _TOP)
    if doc["version"] != 1:
        raise ConfigError(f"{path}: version: must be 1")
    text = {key: _text(path, key, doc.get(key, "")) for key in ("name", "description", "module_hint", "source",
                                                                  "verified")}
    if text["name"] != path.name.removesuffix(".yaml"):
        raise ConfigError(f"{path}: name: {text['name']!r} differs from the file's name")
    codes = _codes(path, doc["codes"])
    sm2_key = _sm2_key(path, doc.get("sm2_key"))
    if _SM4_MECHANISMS & codes.keys() and "CKK_SM4" not in codes:
        raise ConfigError(f"{path}: codes: SM4 mechanisms need codes.CKK_SM4 (the SM4 key type)")
    if (_SM2_MECHANISMS & codes.keys()) and sm2_key is None:
        raise ConfigError(f"{path}: sm2_key: missing (codes names SM2 mechanisms)")
    if sm2_key is not None and sm2_key.key_type is not None and sm2_key.key_type == codes.get("CKK_SM4"):
        raise ConfigError(f"{path}: sm2_key.key_type: the same code as codes.CKK_SM4 (key types must differ)")
    if sm2_key is not None and sm2_key.key_type is not None and "SM2_KEY_PAIR_GEN" not in codes:
        raise ConfigError(f"{path}: codes.SM2_KEY_PAIR_GEN: missing (sm2_key.key_type is a vendor key type)")
    if sm2_key is not None and sm2_key.key_type is None and "SM2_KEY_PAIR_GEN" in codes:
        raise ConfigError(f"{path}: codes.SM2_KEY_PAIR_GEN: not used with sm2_key.key_type 'ec' "
                          "(EC keys are made with CKM_EC_KEY_PAIR_GEN)")
    return MechanismProfile(codes=MappingProxyType(codes), sm2_key=sm2_key, **text)


def _directory() -> Path:
    resource = files("kms.hsm").joinpath("mechanisms")
    if not isinstance(resource, Path):
        raise RuntimeError(f"kms mechanism profiles are not files on disk ({resource!r}); install kms unzipped")
    return resource


def _keys(path: Path, where: str, doc: dict[str, Any], required: set[str], known: set[str]) -> None:
    for key in doc:
        if key not in known:
            raise ConfigError(f"{path}: {where}: unknown key {key!r}; known: {', '.join(sorted(known))}")
    for key in sorted(required - set(doc)):
        raise ConfigError(f"{path}: {where}: missing key {key!r}")


def _text(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {key}: must be text")
    return value.strip()


def _code(path: Path, where: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not VENDOR_DEFINED <= value <= _CODE_MAX:
        raise ConfigError(f"{path}: {where}: must be an integer from 0x80000000 to 0xFFFFFFFF "
                          "(a vendor-defined code; write it in hex, e.g. 0x80004D02)")
    return value


def _codes(path: Path, doc: Any) -> dict[str, int]:
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: codes: must be a mapping of names to codes")
    known = (*KEY_TYPES, *MECHANISMS)
    codes: dict[str, int] = {}
    for name, value in doc.items():
        if name not in known:
            raise ConfigError(f"{path}: codes: unknown name {name!r}; known: {', '.join(known)}")
        codes[name] = _code(path, f"codes.{name}", value)
    seen: dict[int, str] = {}
    for name, code in codes.items():
        if name in MECHANISMS:
            if code in seen:
                raise ConfigError(f"{path}: codes.{name}: the same code as codes.{seen[code]}")
            seen[code] = name
    return codes


def _sm2_key(path: Path, doc: Any) -> Sm2Key | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: sm2_key: must be a mapping")
    _keys(path, "sm2_key", doc, {"key_type", "curve_oid"}, {"key_type", "curve_oid"})
    kind = doc["key_type"]
    if kind != "ec" and (not isinstance(kind, int) or isinstance(kind, bool)):
        raise ConfigError(f"{path}: sm2_key.key_type: must be 'ec' (CKK_EC) or a vendor-defined key type code")
    key_type = None if kind == "ec" else _code(path, "sm2_key.key_type", kind)
    oid = doc["curve_oid"]
    if not isinstance(oid, str) or not _OID.match(oid):
        raise ConfigError(f"{path}: sm2_key.curve_oid: must be an object identifier in dotted form")
    if oid != SM2_CURVE_OID:
        # kms.hsm.spki writes and reads SM2 keys with this curve only, and the port tells SM2 keys from ECDSA P-256
        # ones by their curve: any other OID (P-256's) would make P-256 keys pass for SM2 keys and back.
        raise ConfigError(f"{path}: sm2_key.curve_oid: must be the SM2 curve {SM2_CURVE_OID} (sm2p256v1), "
                          f"not {oid}")
    return Sm2Key(key_type, oid)
