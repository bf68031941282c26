"""Card identities: what a card's keys are diversified from, validated field by field.

Never the social security number (社会保障号码): it survives card replacement, so keys would repeat.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from kms.errors import InvalidArgument
from kms.validation import CARD_REF, unknown_keys

_PATTERNS = {
    "city_code": (re.compile(r"^[0-9]{6}$"), "must be 6 digits"),
    "card_serial": (re.compile(r"^[0-9A-F]{16}$"), "must be 16 upper-case hex digits (8 bytes)"),
    "pan": (re.compile(r"^[0-9]{12,19}$"), "must be 12 to 19 digits"),
    "psn": (re.compile(r"^[0-9]{2}$"), "must be 2 digits (00-99)"),
    "kdd": (re.compile(r"^[0-9A-F]{20}$"), "must be 20 upper-case hex digits (10 bytes)"),
}


def _luhn_sum(digits: str) -> int:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits ends with its Luhn (ISO/IEC 7812-1, mod 10) check digit, as a payment card's PAN
    does."""
    return _luhn_sum(digits) == 0


def luhn_check_digit(body: str) -> str:
    """The check digit to append to ``body`` (digits) to make a Luhn-valid PAN."""
    return str((10 - _luhn_sum(body + "0")) % 10)


def with_luhn_digit(body: str) -> str:
    """``body`` (digits) with its Luhn check digit appended: a PAN the check accepts."""
    return body + luhn_check_digit(body)


@dataclass(frozen=True)
class ProtectedPan:
    """A PAN as records keep it (kms.issuance.pans): encrypted under the bank domain's data key, bound to its card_ref,
    with keyed look-up indexes (HMAC in the bank token) and the PAN masked (first 6, last 4) for people."""

    sealed: bytes
    index: str  # HMAC-SHA256 of the PAN (hex): the same PAN on two records
    pan_psn_index: str  # HMAC-SHA256 of "<pan>/<psn>" (hex): retired identities
    masked: str

    def __repr__(self) -> str:
        return f"ProtectedPan({self.masked})"


@dataclass(frozen=True)
class CardIdentity:
    """One card as the derivation recipes see it. Fields a profile does not need may be absent. A card read from
    the records carries its PAN only ``protected``; the bank domain's workers open it (kms.issuance.pans) to derive
    keys."""

    card_ref: str
    city_code: str | None = None
    card_serial: str | None = None
    pan: str | None = None
    psn: str | None = None
    kdd: str | None = None
    protected: ProtectedPan | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.card_ref, str) or not CARD_REF.fullmatch(self.card_ref):
            raise InvalidArgument("card_ref", "must be 1-64 characters of letters, digits and . _ : -")
        for name, (pattern, reason) in _PATTERNS.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not pattern.fullmatch(value)):
                raise InvalidArgument(name, reason)

    @property
    def province(self) -> str | None:
        return self.city_code[:2] if self.city_code else None

    def has(self, name: str) -> bool:
        """Whether the card carries this field (a protected PAN counts: the bank's workers open it)."""
        return getattr(self, name) is not None or (name == "pan" and self.protected is not None)

    def check_luhn(self) -> None:
        """InvalidArgument naming ``pan`` when the card carries a clear PAN whose check digit is wrong. Applied where
        cards meet their profile (batch creation, sealing), unless the profile opts out (``pan_luhn: false``, for
        test ranges)."""
        if self.pan is not None and not luhn_valid(self.pan):
            raise InvalidArgument("pan", "fails the Luhn check")

    def require(self, names: frozenset[str]) -> None:
        for name in sorted(names):
            if getattr(self, name) is None:
                raise InvalidArgument(name, "is required by the card profile")

    @classmethod
    def from_mapping(cls, data: dict[str, object]) -> CardIdentity:
        known = {f.name for f in fields(cls)} - {"protected"}
        unknown = unknown_keys(data, known)
        if unknown:
            raise InvalidArgument(unknown[0], "unknown card field")
        values: dict[str, str | None] = {}
        for name in known:
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                raise InvalidArgument(name, "must be a string")
            if isinstance(value, str) and name in ("card_serial", "kdd") and value.isascii():  # "ﬀ".upper() is "FF"
                value = value.upper()
            values[name] = value
        return cls(**values)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, str]:
        return {f.name: v for f in fields(self) if f.name != "protected" and (v := getattr(self, f.name)) is not None}
