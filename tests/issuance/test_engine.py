"""The card key engine on real SoftHSM2 tokens: every key of every section equals the software reference."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding
from helpers import MASTER_KEYS, PROFILE, TEST_TRANSPORT_KEYS, VECTORS, card
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms import bundle
from kms.cards import reference
from kms.cards.cardid import CardIdentity
from kms.clock import FixedClock
from kms.errors import InvalidArgument, NotFound, PermissionDenied
from kms.hsm.session import TokenSession
from kms.issuance.sealer import DomainKeys, DomainSealer
from kms.registry import DOMAINS, KeyKind, KeyRegistry

NOW = dt.datetime(2026, 11, 26, 8, 30, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def test_sealers(
    sessions: dict[str, TokenSession], registry: KeyRegistry, test_bureau: str
) -> dict[str, DomainSealer]:
    """Sealers of the shipped profile as a test range (pan_luhn off): the derivation properties below hold for any
    PAN of 12 to 19 digits, and the public vectors' PANs fail the Luhn check."""
    test_range = dataclasses.replace(PROFILE, pan_luhn=False)
    return {d: DomainSealer(d, sessions[d], registry, test_range, test_bureau, FixedClock(NOW)) for d in DOMAINS}


def test_the_shipped_profile_refuses_a_pan_failing_the_luhn_check(
    sessions: dict[str, TokenSession], registry: KeyRegistry, test_bureau: str
) -> None:
    sealer = DomainSealer("bank", sessions["bank"], registry, PROFILE, test_bureau, FixedClock(NOW))
    with pytest.raises(InvalidArgument, match=r"^pan: fails the Luhn check$"):
        sealer.seal(card(7, pan="6214830012345678"), serial="AA" * 16, batch="B-luhn")
    assert sealer.seal(card(7), serial="AB" * 16, batch="B-luhn")["body"]["domain"] == "bank"


def _check_section(section: dict[str, Any], domain: str, c: CardIdentity) -> None:
    body = section["body"]
    specs = PROFILE.keys(domain)
    assert body["domain"] == domain
    assert [k["name"] for k in body["keys"]] == [s.name for s in specs]
    for spec, sealed in zip(specs, body["keys"], strict=True):
        key = aes_key_unwrap_with_padding(TEST_TRANSPORT_KEYS[domain], bytes.fromhex(sealed["wrapped"]))
        expected = spec.recipe.reference(MASTER_KEYS[(domain, spec.master_key)], c)
        assert key == expected, (domain, spec.name)
        assert bytes.fromhex(sealed["kcv"]) == reference.kcv_tdes(expected)
        assert sealed["kcv_method"] == "TDES-ECB-ZERO8-3"
        assert sealed["algorithm"] == "DES2"
        # A section is wrapped only under its own domain's transport key.
        other = next(d for d in DOMAINS if d != domain)
        with pytest.raises(InvalidUnwrap):
            aes_key_unwrap_with_padding(TEST_TRANSPORT_KEYS[other], bytes.fromhex(sealed["wrapped"]))


cards = st.builds(
    lambda i, city, serial, pan, psn, kdd: CardIdentity(
        card_ref=f"p-{i}", city_code=city, card_serial=serial.hex().upper(), pan=pan, psn=psn,
        kdd=kdd.hex().upper(),
    ),
    st.integers(0, 10**9),
    st.from_regex(r"[0-9]{6}", fullmatch=True),
    st.binary(min_size=8, max_size=8),
    st.from_regex(r"[0-9]{12,19}", fullmatch=True),
    st.from_regex(r"[0-9]{2}", fullmatch=True),
    st.binary(min_size=10, max_size=10),
)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(c=cards)
def test_random_cards_through_the_hsm_equal_the_software_reference(
    c: CardIdentity, test_sealers: dict[str, DomainSealer]
) -> None:
    for domain, sealer in test_sealers.items():
        _check_section(sealer.seal(c, serial="AB" * 16, batch="B-prop"), domain, c)


def test_public_vector_card_comes_out_as_the_vectors_say(test_sealers: dict[str, DomainSealer]) -> None:
    chain = VECTORS["ssc_chain"][0]
    option_a = VECTORS["option_a"][0]
    gp = VECTORS["gp_kmc"][0]
    c = CardIdentity(card_ref="vector", city_code=chain["city_code"], card_serial=chain["card_serial"],
                     pan=option_a["pan"], psn=option_a["psn"], kdd=gp["kdd"])
    by_name = {}
    for domain, sealer in test_sealers.items():
        for sealed in sealer.seal(c, serial="CD" * 16, batch="B-vec")["body"]["keys"]:
            by_name[sealed["name"]] = (
                aes_key_unwrap_with_padding(TEST_TRANSPORT_KEYS[domain], bytes.fromhex(sealed["wrapped"])),
                sealed["kcv"],
            )
    assert by_name["mk"][0].hex().upper() == chain["key"]
    assert by_name["mk"][1] == chain["kcv"]
    assert by_name["udk-ac"][0].hex().upper() == option_a["key"]
    assert by_name["udk-ac"][1] == option_a["kcv"]
    for which in ("enc", "mac", "dek"):
        assert by_name[f"ssd-{which}"][0].hex().upper() == gp[which]
        assert by_name[f"ssd-{which}"][1] == gp[f"kcv_{which}"]


def test_section_header_records_what_a_station_and_an_auditor_need(
    test_sealers: dict[str, DomainSealer], registry: KeyRegistry
) -> None:
    section = test_sealers["bank"].seal(card(5), serial="EF" * 16, batch="B-hdr")
    body = section["body"]
    assert body["format"] == "kms-sealed-section" and body["version"] == 1
    assert body["serial"] == "EF" * 16
    assert body["bureau"] == "bureau-test" and body["batch"] == "B-hdr" and body["card_ref"] == "card-000005"
    assert body["profile"] == "dual-app-v1"
    assert body["created_at"] == "2026-11-26T08:30:00Z"
    assert body["master_keys"] == {n: registry.active("bank", KeyKind.MASTER, n).version
                                   for n in PROFILE.master_keys("bank")}
    tk = registry.active("bank", KeyKind.TRANSPORT, "bureau-test")
    assert body["transport_key"] == {"name": "bureau-test", "version": tk.version, "kcv": tk.kcv}
    signing = registry.active("bank", KeyKind.SIGNING, "issuance")
    assert signing.public_key is not None
    assert section["signature"]["key_id"] == bundle.key_id(signing.public_key)
    assert section["signature"]["algorithm"] == "ECDSA-P256-SHA256"


def test_keys_of_equal_recipes_share_one_computation_of_their_steps(test_sealers: dict[str, DomainSealer]) -> None:
    """The HRSS chain's six keys name equal (not identical) recipes: their steps are computed once per card, and
    every key still gets its own master key and the steps its recipe gives."""
    sealer = test_sealers["hrss"]
    c = card(3)
    plan = sealer._plan(c)
    specs = PROFILE.keys("hrss")
    assert [label for label, _ in plan] == [r.master_label for r in sealer._keys]
    assert [steps for _, steps in plan] == [spec.recipe.steps(c) for spec in specs]
    chain = [steps for (_, steps), spec in zip(plan, specs, strict=True) if spec.recipe.name == "hrss_dispersal"]
    assert len(chain) == 6 and len({id(steps) for steps in chain}) == 1
    assert len({id(steps) for _, steps in plan}) == len({spec.recipe for spec in specs}) == 4


def test_a_card_without_a_field_its_recipes_need_is_invalid_argument(test_sealers: dict[str, DomainSealer]) -> None:
    c = CardIdentity(card_ref="no-pan", city_code="320200", card_serial="86843202AD932A48",
                     kdd="00010203040506070809")
    with pytest.raises(InvalidArgument) as raised:
        test_sealers["bank"].seal(c, serial="00" * 16, batch="B")
    assert raised.value.field == "pan"
    # The HRSS section needs no PAN.
    test_sealers["hrss"].seal(c, serial="00" * 16, batch="B")


def test_unregistered_bureau_or_missing_master_key_is_refused(registry: KeyRegistry) -> None:
    with pytest.raises(PermissionDenied, match="not registered for the bank domain"):
        DomainKeys.resolve(registry, "bank", PROFILE, "bureau-nobody")
    from kms.cards import profiles
    from kms.cards.profiles import Profile

    bad = Profile(name="x", description="", source="x", domains={
        "bank": (profiles.KeySpec(name="k", usage="u", recipe=PROFILE.keys("bank")[0].recipe, master_key="nope"),)})
    with pytest.raises(NotFound, match="no bank master key named nope"):
        DomainKeys.resolve(registry, "bank", bad, "bureau-a")


def test_a_section_takes_the_bureaus_newest_active_transport_key_of_the_profiles_algorithm(
    registry: KeyRegistry,
) -> None:
    """A bureau may hold an AES-256 and an SM4 transport key as versions of its one transport key name: each
    profile's sections take the newest active one of the profile's ``transport`` algorithm (registry records only:
    no token is used to choose)."""
    from kms.errors import InvalidState
    from kms.hsm.types import Algorithm
    from kms.registry import KeyState

    bureau = "bureau-two-algorithms"
    aes = registry.add("bank", KeyKind.TRANSPORT, bureau, Algorithm.AES256.value)
    sm4 = registry.add("bank", KeyKind.TRANSPORT, bureau, Algorithm.SM4.value)
    assert DomainKeys.transport_key(registry, "bank", bureau, Algorithm.SM4).version == sm4.version
    assert DomainKeys.transport_key(registry, "bank", bureau, Algorithm.AES256).version == aes.version
    assert DomainKeys.transport_key(registry, "bank", bureau).version == aes.version  # the default: AES-256
    aes2 = registry.add("bank", KeyKind.TRANSPORT, bureau, Algorithm.AES256.value)  # a rotation of the AES one
    assert DomainKeys.transport_key(registry, "bank", bureau, Algorithm.AES256).version == aes2.version
    registry.transition(registry.get("bank", KeyKind.TRANSPORT, bureau, sm4.version), KeyState.SUSPENDED)
    with pytest.raises(InvalidState, match="no active SM4 transport key in the bank domain"):
        DomainKeys.transport_key(registry, "bank", bureau, Algorithm.SM4)
    with pytest.raises(PermissionDenied, match="not registered for the hrss domain"):
        DomainKeys.transport_key(registry, "hrss", bureau, Algorithm.SM4)


def test_a_profile_whose_key_usage_holds_a_private_use_character_seals_canonical_sections(
    sessions: dict[str, TokenSession], registry: KeyRegistry, test_bureau: str
) -> None:
    """A key's usage is free text in a profile (GBK's user-defined characters map to U+E000 and on): a sealer of
    such a profile writes sections in their canonical encoding, the usage as given (review s22: the section
    template's slot mark was U+E000, and such a profile made every sealer of it raise ValueError)."""
    specs = PROFILE.keys("bank")
    odd = (dataclasses.replace(specs[0], usage=f"{specs[0].usage} \ue000"), *specs[1:])
    profile = dataclasses.replace(PROFILE, pan_luhn=False, domains={**PROFILE.domains, "bank": odd})
    sealer = DomainSealer("bank", sessions["bank"], registry, profile, test_bureau, FixedClock(NOW))
    sealed = sealer.seal_bytes(card(5), serial="AC" * 16, batch="B-usage")
    section = json.loads(sealed)
    assert bundle.canonical(section) == sealed
    assert section["body"]["keys"][0]["usage"] == f"{specs[0].usage} \ue000"
    _check_section(section, "bank", card(5))


def test_a_sealer_refuses_a_transport_key_the_token_wraps_otherwise_than_the_registry_says(
    sessions: dict[str, TokenSession], registry: KeyRegistry, test_bureau: str
) -> None:
    """Each section names its wrap method from the registry's record of the transport key; the token wraps by the
    type of its key of that label. A token whose key disagrees (fault injected: the session reports SM4-ECB for the
    AES key) is refused when the sealer is made, naming the key, rather than sealing sections a station rejects
    (review s22, finding 4)."""
    from kms.errors import ConfigError

    real = sessions["bank"]
    transport = DomainKeys.transport_key(registry, "bank", test_bureau).label
    assert real.wrap_method(transport) == "AES-KWP"

    class Disagreeing:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def wrap_method(self, label: str) -> str:
            return "SM4-ECB"

    with pytest.raises(ConfigError, match=r"lists a AES256 transport key \(AES-KWP\) but the bank token.s"):
        DomainSealer("bank", Disagreeing(), registry, PROFILE, test_bureau, FixedClock(NOW))  # type: ignore[arg-type]
    DomainSealer("bank", real, registry, PROFILE, test_bureau, FixedClock(NOW))  # the real token agrees
