"""Per-card key derivation recipes.

A recipe turns a card identity into the derivation steps the HSM runs (``steps``) and, for checking only, computes
the same key in software from a known master key (``reference``). Recipes are selected by name from card profiles;
their parameters are validated when the profile loads.

- ``emv_option_a``: EMV / PBOC Option A (UDK-AC, UDK-SMI, UDK-SMC from the IMKs; PAN + PSN); ``algorithm: 3des``
  (default) or ``sm4`` (the PBOC 3.0 SM4 variant, JR/T 0025: UDK = SM4_IMK(Y ‖ ~Y); needs an HSM that offers SM4).
- ``hrss_dispersal``: HRSS multi-level dispersal, 1-3 levels, each level's 8-byte factor built from a template;
  ``algorithm: 3des`` (Div3DES) or ``sm4`` (DivSM4, needs an HSM that offers SM4).
- ``gp_kmc``: GlobalPlatform KMC diversification (``method: emv-cps`` or ``visa2``; ``key: enc|mac|dek``).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kms.cards import reference
from kms.cards.cardid import CardIdentity
from kms.errors import InvalidArgument
from kms.hsm.types import Algorithm, DeriveStep
from kms.validation import unknown_keys

Steps = tuple[tuple[DeriveStep, bytes], ...]


class Recipe(Protocol):
    name: str

    @property
    def algorithm(self) -> Algorithm:
        """The algorithm of the key the recipe produces."""
        ...

    @property
    def card_fields(self) -> frozenset[str]:
        """The card identity fields this recipe reads."""
        ...

    def steps(self, card: CardIdentity) -> Steps:
        """The derivation the HSM runs, level by level."""
        ...

    def reference(self, master: bytes, card: CardIdentity) -> bytes:
        """The same key computed in software (tests and self-test only)."""
        ...


def _diversify(factor: bytes) -> bytes:
    return factor + reference.complement(factor)


def _field(card: CardIdentity, name: str) -> str:
    value = getattr(card, name)
    if value is None:
        raise InvalidArgument(name, "is required by the card profile")
    return str(value)


@dataclass(frozen=True)
class OptionA:
    cipher: str = "3des"  # "3des": EMV / PBOC 2.0 Option A; "sm4": the PBOC 3.0 SM4 variant
    name = "emv_option_a"

    @property
    def algorithm(self) -> Algorithm:
        return Algorithm.DES2 if self.cipher == "3des" else Algorithm.SM4

    @property
    def card_fields(self) -> frozenset[str]:
        return frozenset({"pan", "psn"})

    def steps(self, card: CardIdentity) -> Steps:
        # One level either way: Y ‖ ~Y under the IMK (3DES: two 8-byte blocks; SM4: one 16-byte block).
        y = reference.option_a_input(_field(card, "pan"), _field(card, "psn"))
        step = DeriveStep.DES3_ECB if self.cipher == "3des" else DeriveStep.SM4_ECB
        return ((step, _diversify(y)),)

    def reference(self, master: bytes, card: CardIdentity) -> bytes:
        pan, psn = _field(card, "pan"), _field(card, "psn")
        if self.cipher == "3des":
            return reference.option_a(master, pan, psn)
        return reference.pboc_sm4_udk(master, pan, psn)


@dataclass(frozen=True)
class GpKmc:
    method: str
    key: str
    name = "gp_kmc"
    algorithm = Algorithm.DES2

    @property
    def card_fields(self) -> frozenset[str]:
        return frozenset({"kdd"})

    def steps(self, card: CardIdentity) -> Steps:
        data = reference.gp_kmc_input(self.method, bytes.fromhex(_field(card, "kdd")), self.key)
        return ((DeriveStep.DES3_ECB, data),)

    def reference(self, master: bytes, card: CardIdentity) -> bytes:
        return reference.gp_kmc(master, self.method, bytes.fromhex(_field(card, "kdd")), self.key)


# Factor templates: "ascii:<text with {fields}>" (the ASCII bytes) or "hex:<text with {fields}>" (hex decoded);
# either must come to exactly 8 bytes.
FACTOR_FIELDS = ("province", "city_code", "card_serial", "pan", "psn")
FIELD_LENGTHS = {"province": (2, 2), "city_code": (6, 6), "card_serial": (16, 16), "pan": (12, 19), "psn": (2, 2)}
_FACTOR = re.compile(r"^(ascii|hex):(.+)$")
_HEX_LITERAL = re.compile(r"[0-9A-F]*")
_ASCII_LITERAL = re.compile(r"[\x20-\x7e]*")


@dataclass(frozen=True)
class Factor:
    encoding: str
    template: str
    fields: frozenset[str]  # card identity fields read (province counts as city_code)
    parts: tuple[tuple[str, str | None], ...]  # (literal text, field or None), parsed once at load

    @classmethod
    def parse(cls, text: object) -> Factor:
        if not isinstance(text, str) or not (match := _FACTOR.fullmatch(text)):
            raise ValueError(f"factor {text!r} must look like 'ascii:...' or 'hex:...'")
        encoding, template = match.groups()
        parts = []
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError:
            raise ValueError(f"factor {text!r}: unbalanced braces") from None
        for literal, name, spec, conv in parsed:
            if not (_HEX_LITERAL if encoding == "hex" else _ASCII_LITERAL).fullmatch(literal):
                raise ValueError(f"factor {text!r}: {literal!r} is not {encoding} text")
            if name is not None and (name not in FACTOR_FIELDS or spec or conv):
                raise ValueError(f"factor {text!r}: unknown field {{{name}}}; known: {', '.join(FACTOR_FIELDS)}")
            parts.append((literal, name or None))
        names = {name for _, name in parts if name}
        fields = frozenset("city_code" if n == "province" else n for n in names)
        for bound in (0, 1):  # the shortest and the longest each field can be
            chars = sum(len(lit) + (FIELD_LENGTHS[name][bound] if name else 0) for lit, name in parts)
            length = chars if encoding == "ascii" else chars / 2
            if length != 8:
                raise ValueError(f"factor {text!r} gives {length:g} bytes for some cards, not 8")
        return cls(encoding, template, fields, tuple(parts))

    def render(self, card: CardIdentity) -> bytes:
        out = []
        for literal, name in self.parts:
            out.append(literal)
            if name == "province":
                out.append(_field(card, "city_code")[:2])
            elif name is not None:
                out.append(_field(card, name))
        text = "".join(out)
        try:
            raw = text.encode("ascii") if self.encoding == "ascii" else bytes.fromhex(text)
        except ValueError:
            raise InvalidArgument("card", f"factor {self.encoding}:{self.template} is not valid {self.encoding}"
                                  ) from None
        if len(raw) != 8:
            raise InvalidArgument("card", f"factor {self.encoding}:{self.template} gives {len(raw)} bytes, not 8")
        return raw


@dataclass(frozen=True)
class HrssDispersal:
    factors: tuple[Factor, ...]
    cipher: str  # "3des" or "sm4"
    name = "hrss_dispersal"

    @property
    def algorithm(self) -> Algorithm:
        return Algorithm.DES2 if self.cipher == "3des" else Algorithm.SM4

    @property
    def card_fields(self) -> frozenset[str]:
        return frozenset().union(*(f.fields for f in self.factors))

    def steps(self, card: CardIdentity) -> Steps:
        step = DeriveStep.DES3_ECB if self.cipher == "3des" else DeriveStep.SM4_ECB
        return tuple((step, _diversify(f.render(card))) for f in self.factors)

    def reference(self, master: bytes, card: CardIdentity) -> bytes:
        return reference.chain(self.cipher, master, [f.render(card) for f in self.factors])


def _only(params: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = unknown_keys(params, allowed)
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r}; allowed: {', '.join(sorted(allowed)) or 'none'}")


def _cipher(params: Mapping[str, Any]) -> str:
    cipher = params.get("algorithm", "3des")
    if cipher not in ("3des", "sm4"):
        raise ValueError("algorithm must be '3des' or 'sm4'")
    return str(cipher)


def _option_a(params: Mapping[str, Any]) -> Recipe:
    _only(params, {"algorithm"})
    return OptionA(cipher=_cipher(params))


def _gp_kmc(params: Mapping[str, Any]) -> Recipe:
    _only(params, {"method", "key"})
    method, key = params.get("method"), params.get("key")
    if method not in ("emv-cps", "visa2"):
        raise ValueError("method must be 'emv-cps' or 'visa2'")
    if key not in reference.GP_KEY_TYPES:
        raise ValueError("key must be 'enc', 'mac' or 'dek'")
    return GpKmc(method=method, key=key)


def _hrss_dispersal(params: Mapping[str, Any]) -> Recipe:
    _only(params, {"algorithm", "factors"})
    cipher = _cipher(params)
    factors = params.get("factors")
    if not isinstance(factors, list) or not 1 <= len(factors) <= 3:
        raise ValueError("factors must be a list of 1 to 3 factor templates")
    return HrssDispersal(factors=tuple(Factor.parse(f) for f in factors), cipher=cipher)


RECIPES = {"emv_option_a": _option_a, "gp_kmc": _gp_kmc, "hrss_dispersal": _hrss_dispersal}


def build(name: str, params: Mapping[str, Any]) -> Recipe:
    """A recipe by name with validated parameters; ValueError says what is wrong."""
    try:
        factory = RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}") from None
    return factory(params)
