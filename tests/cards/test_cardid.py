"""kms.cards.cardid: card identities, validated field by field; errors name the field."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kms.cards.cardid import CardIdentity, luhn_check_digit, luhn_valid
from kms.errors import InvalidArgument

FULL = {
    "card_ref": "card-1",
    "city_code": "320200",
    "card_serial": "86843202AD932A48",
    "pan": "6214830012345673",
    "psn": "01",
    "kdd": "00010203040506070809",
}


def _invalid(field: str, **values: str | None) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        CardIdentity(**{"card_ref": "card-1", **values})  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    return info.value


def test_full_identity() -> None:
    card = CardIdentity(**FULL)
    assert card.as_dict() == FULL
    assert card.province == "32"


def test_only_card_ref_is_required() -> None:
    card = CardIdentity(card_ref="c")
    assert card.as_dict() == {"card_ref": "c"}
    assert card.province is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pan", "123456789012"),  # 12 digits
        ("pan", "1234567890123456789"),  # 19 digits
        ("psn", "00"),
        ("psn", "99"),
        ("city_code", "110100"),
        ("card_serial", "0123456789ABCDEF"),
        ("kdd", "FFFFFFFFFFFFFFFFFFFF"),
    ],
)
def test_valid_field_values(field: str, value: str) -> None:
    assert getattr(CardIdentity(card_ref="c", **{field: value}), field) == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pan", "12345678901"),  # 11 digits
        ("pan", "12345678901234567890"),  # 20 digits
        ("pan", "12345678901A"),
        ("pan", "1234 5678 9012"),
        ("pan", ""),
        ("psn", "1"),
        ("psn", "001"),
        ("psn", "0A"),
        ("city_code", "32020"),
        ("city_code", "3202000"),
        ("city_code", "32020X"),
        ("card_serial", "86843202AD932A4"),  # 15 hex digits
        ("card_serial", "86843202AD932A4800"),  # 18
        ("card_serial", "86843202ad932a48"),  # lower case: from_mapping upper-cases, the constructor does not
        ("card_serial", "86843202AD932A4G"),
        ("kdd", "000102030405060708"),  # 9 bytes
        ("kdd", "0001020304050607080900"),  # 11 bytes
        ("kdd", "0001020304050607080a"),
        ("kdd", "000102030405060708GG"),
    ],
)
def test_invalid_field_values(field: str, value: str) -> None:
    _invalid(field, **{field: value})


@pytest.mark.parametrize(
    "card_ref",
    ["", "-leading-dash", ".dot", "has space", "slash/no", "x" * 65, "社保卡", "a\tb"],
)
def test_invalid_card_ref(card_ref: str) -> None:
    _invalid("card_ref", card_ref=card_ref)


@pytest.mark.parametrize("card_ref", ["a", "A", "0", "card-1", "bureau.a:batch_7:0001", "x" * 64])
def test_valid_card_ref(card_ref: str) -> None:
    assert CardIdentity(card_ref=card_ref).card_ref == card_ref


def test_card_ref_none_is_invalid() -> None:
    _invalid("card_ref", card_ref=None)


@given(st.from_regex(r"\A[0-9]{12,19}\Z"), st.from_regex(r"\A[0-9]{2}\Z"))
def test_any_valid_pan_and_psn_accepted(pan: str, psn: str) -> None:
    card = CardIdentity(card_ref="c", pan=pan, psn=psn)
    assert (card.pan, card.psn) == (pan, psn)


def _looks_like_pan(s: str) -> bool:
    # A trailing newline is left to test_trailing_newline_rejected (a known bug).
    s = s.removesuffix("\n")
    return s.isascii() and s.isdigit() and 12 <= len(s) <= 19


@given(st.text(max_size=25).filter(lambda s: not _looks_like_pan(s)))
def test_anything_else_is_not_a_pan(pan: str) -> None:
    _invalid("pan", pan=pan)


@pytest.mark.parametrize(
    ("field", "value"),
    [("card_ref", "card-1\n"), ("city_code", "320200\n"), ("card_serial", "86843202AD932A48\n"),
     ("pan", "123456789012\n"), ("psn", "01\n"), ("kdd", "00010203040506070809\n")],
)
def test_trailing_newline_rejected(field: str, value: str) -> None:
    _invalid(field, **{field: value})


# -- from_mapping --------------------------------------------------------------------------------------------------


def test_from_mapping_upper_cases_hex_fields() -> None:
    card = CardIdentity.from_mapping({**FULL, "card_serial": "86843202ad932a48", "kdd": "0001020304050607080a"})
    assert card.card_serial == "86843202AD932A48"
    assert card.kdd == "0001020304050607080A"


def test_from_mapping_equals_constructor() -> None:
    assert CardIdentity.from_mapping(dict(FULL)) == CardIdentity(**FULL)


def test_from_mapping_does_not_upper_case_other_fields() -> None:
    with pytest.raises(InvalidArgument) as info:
        CardIdentity.from_mapping({"card_ref": "c", "city_code": "32020a"})
    assert info.value.field == "city_code"


@pytest.mark.parametrize("unknown", ["ssn", "social_security_number", "province"])
def test_from_mapping_rejects_unknown_fields(unknown: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        CardIdentity.from_mapping({**FULL, unknown: "x"})
    assert info.value.field == unknown
    assert "unknown" in info.value.reason


@pytest.mark.parametrize("value", [320200, b"320200", ["320200"]])
def test_from_mapping_rejects_non_strings(value: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        CardIdentity.from_mapping({"card_ref": "c", "city_code": value})
    assert info.value.field == "city_code"


def test_from_mapping_requires_card_ref() -> None:
    with pytest.raises(InvalidArgument) as info:
        CardIdentity.from_mapping({"pan": "123456789012"})
    assert info.value.field == "card_ref"


def test_from_mapping_treats_none_as_absent() -> None:
    assert CardIdentity.from_mapping({"card_ref": "c", "pan": None}).as_dict() == {"card_ref": "c"}


# -- require -------------------------------------------------------------------------------------------------------


def test_require_present_fields() -> None:
    CardIdentity(**FULL).require(frozenset({"pan", "psn", "kdd", "city_code", "card_serial"}))
    CardIdentity(card_ref="c").require(frozenset())


def test_require_names_the_missing_field() -> None:
    card = CardIdentity(card_ref="c", pan="123456789012")
    with pytest.raises(InvalidArgument) as info:
        card.require(frozenset({"pan", "psn"}))
    assert info.value.field == "psn"
    assert "required" in info.value.reason


def test_require_reports_missing_fields_in_a_stable_order() -> None:
    card = CardIdentity(card_ref="c")
    for _ in range(5):
        with pytest.raises(InvalidArgument) as info:
            card.require(frozenset({"psn", "kdd", "pan"}))
        assert info.value.field == "kdd"  # alphabetically first


@pytest.mark.parametrize("pan", ["4111111111111111", "6214830012345673", "6214830000000000007"])
def test_luhn_valid_pans(pan: str) -> None:
    assert luhn_valid(pan) and luhn_valid("79927398713") and not luhn_valid("79927398710")
    CardIdentity(card_ref="c", pan=pan).check_luhn()


def test_a_wrong_check_digit_is_refused_naming_the_pan() -> None:
    card = CardIdentity(card_ref="c", pan="6214830012345678")
    with pytest.raises(InvalidArgument) as info:
        card.check_luhn()
    assert info.value.field == "pan" and str(info.value) == "pan: fails the Luhn check"
    CardIdentity(card_ref="c").check_luhn()  # no PAN: nothing to check


@given(st.text(alphabet="0123456789", min_size=11, max_size=18))
def test_exactly_one_check_digit_completes_a_body(body: str) -> None:
    digit = luhn_check_digit(body)
    assert [d for d in "0123456789" if luhn_valid(body + d)] == [digit]
