"""The HSM port against a real SoftHSM2 token: key protection, no leftovers, error mapping.

Attacks use raw python-pkcs11 calls on purpose: they show what the token itself refuses, not what kms chooses
not to do.
"""

from __future__ import annotations

import pickle
import secrets
from typing import Any

import pkcs11
import pkcs11.exceptions as p11e
import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from helpers import MASTER_KEYS, PROFILE, card
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from kms import runtime
from kms.cards import reference
from kms.errors import HsmError, HsmKeyNotFound, HsmLoginFailed, MechanismUnavailable
from kms.hsm import errors as hsm_errors
from kms.hsm import templates, types
from kms.hsm.session import TokenSession
from kms.hsm.templates import Role
from kms.hsm.types import Algorithm, DeriveStep
from kms.registry import KeyKind, KeyRegistry
from kms.station import new_unwrap_key


def _raw(session: TokenSession) -> Any:
    return session._session


def _master(registry: KeyRegistry, domain: str, name: str) -> str:
    return registry.active(domain, KeyKind.MASTER, name).label


def test_every_role_template_is_sensitive_and_only_card_keys_are_extractable() -> None:
    escrowable = {Role.MASTER_ESCROWABLE, Role.TRANSPORT_ESCROWABLE}
    for role in Role:
        for token in (True, False):
            template = templates.secret_key_template(role, token=token)
            assert template[Attribute.SENSITIVE] is True
            assert template[Attribute.PRIVATE] is True
            assert template[Attribute.EXTRACTABLE] is (role is Role.CARD_KEY or role in escrowable)
            # Escrowable keys leave the token only wrapped under a key the security officer marked trusted.
            assert template.get(Attribute.WRAP_WITH_TRUSTED, False) is (role in escrowable)
            assert list(template)[-1] is Attribute.MODIFIABLE
    for template in (templates._CARD_KEY_DERIVE, templates._INTERMEDIATE_DERIVE):
        assert template[Attribute.SENSITIVE] is True
    assert templates._INTERMEDIATE_DERIVE[Attribute.EXTRACTABLE] is False
    assert templates._INTERMEDIATE_DERIVE[Attribute.DERIVE] is True
    assert templates._CARD_KEY_DERIVE[Attribute.DERIVE] is False


@pytest.mark.parametrize("domain", ["hrss", "bank"])
def test_master_keys_cannot_be_read_or_wrapped_out(
    domain: str, sessions: dict[str, TokenSession], registry: KeyRegistry
) -> None:
    session = sessions[domain]
    raw = _raw(session)
    # A wrapping key the attacker controls, in the same logged-in session.
    attacker_kek = raw.generate_key(KeyType.AES, 256, store=False,
                                    template={Attribute.WRAP: True, Attribute.EXTRACTABLE: True})
    try:
        for name in PROFILE.master_keys(domain):
            key = raw.get_key(object_class=ObjectClass.SECRET_KEY, label=_master(registry, domain, name))
            with pytest.raises(p11e.AttributeSensitive):
                key[Attribute.VALUE]
            with pytest.raises((p11e.KeyUnextractable, p11e.KeyNotWrappable)):
                attacker_kek.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
            assert key[Attribute.SENSITIVE] is True
            assert key[Attribute.EXTRACTABLE] is False
            assert key[Attribute.DERIVE] is True
            for capability in (Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.WRAP, Attribute.SIGN):
                assert key[capability] is False, capability
            with pytest.raises(p11e.PKCS11Error):
                key[Attribute.EXTRACTABLE] = True
    finally:
        attacker_kek.destroy()


@pytest.mark.parametrize("domain", ["hrss", "bank"])
def test_an_escrowable_key_is_wrapped_only_under_the_so_trusted_custody_key(
    sessions: dict[str, TokenSession], registry: KeyRegistry, domain: str
) -> None:
    session = sessions[domain]
    raw = _raw(session)
    label = f"kms/{domain}/master/escrow-probe-{secrets.token_hex(3)}/v1"
    kcv = session.generate_master_key(label, Algorithm.DES2, escrow=True)
    attacker_kek = raw.generate_key(KeyType.AES, 256, store=False,
                                    template={Attribute.WRAP: True, Attribute.EXTRACTABLE: True})
    untrusted_rsa, untrusted_private = raw.generate_keypair(KeyType.RSA, 2048, store=False)
    custody = registry.active(domain, KeyKind.CUSTODY, "custody").label
    try:
        key = raw.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
        with pytest.raises(p11e.AttributeSensitive):
            key[Attribute.VALUE]
        with pytest.raises(p11e.KeyNotWrappable):
            attacker_kek.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        with pytest.raises(p11e.KeyNotWrappable):
            untrusted_rsa.wrap_key(key, mechanism=Mechanism.RSA_PKCS_OAEP,
                                   mechanism_param=(Mechanism.SHA_1, pkcs11.MGF.SHA1, None))
        with pytest.raises(p11e.PKCS11Error):
            key[Attribute.WRAP_WITH_TRUSTED] = False
        with pytest.raises(p11e.PKCS11Error):  # only the SO can mark a key trusted
            attacker_kek[Attribute.TRUSTED] = True
        value = session.escrow_export(label, custody)
        try:
            assert reference.kcv_tdes(bytes(value)) == kcv
        finally:
            types.wipe(value)
        # A key not created escrowable is refused even under the trusted custody key.
        plain = registry.get(domain, KeyKind.MASTER, PROFILE.master_keys(domain)[0], 1).label  # made by kms init
        with pytest.raises(HsmError, match="may not leave it"):
            session.escrow_export(plain, custody)
    finally:
        attacker_kek.destroy()
        untrusted_rsa.destroy()
        untrusted_private.destroy()
        session.destroy(label)


def test_every_secret_key_in_the_tokens_is_sensitive(
    sessions: dict[str, TokenSession], station_session: TokenSession
) -> None:
    seen = 0
    for session in (*sessions.values(), station_session):
        for info in session.objects():
            if info.object_class in ("SECRET_KEY", "PRIVATE_KEY"):
                seen += 1
                assert info.sensitive is True, info.label
                # Extractable only if escrowable, i.e. wrappable solely under the SO-trusted custody key.
                assert info.extractable is False or info.wrap_with_trusted is True, info.label
    assert seen >= 15


class _Spy:
    """Stands in for the transport key object: inspects each derived card key in the token before wrapping it."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.key_type = real.key_type  # the port wraps by the transport key's algorithm
        self.seen: list[dict[str, Any]] = []

    def wrap_key(self, key: Any, **kwargs: Any) -> bytes:
        try:
            key[Attribute.VALUE]
            readable = True
        except p11e.AttributeSensitive:
            readable = False
        self.seen.append({
            "sensitive": key[Attribute.SENSITIVE], "extractable": key[Attribute.EXTRACTABLE],
            "token": key[Attribute.TOKEN], "readable": readable, "derive": key[Attribute.DERIVE],
        })
        return bytes(self.real.wrap_key(key, **kwargs))


def test_derived_card_keys_are_sensitive_session_objects_and_are_destroyed(
    sealers: dict[str, Any], sessions: dict[str, TokenSession], registry: KeyRegistry
) -> None:
    for domain, sealer in sealers.items():
        session = sessions[domain]
        transport_label = registry.active(domain, KeyKind.TRANSPORT, "bureau-a").label
        cache_key = (ObjectClass.SECRET_KEY, transport_label)
        session._key(transport_label)
        real = session._keys[cache_key]
        spy = _Spy(real)
        session._keys[cache_key] = spy
        session._wrap_keys.pop(transport_label, None)  # the hot path's own read of the key: made again, of the spy
        try:
            before = [o for o in session.objects() if not o.token]
            sealer.seal(card(1), serial="00" * 16, batch="B-spy")
            after = [o for o in session.objects() if not o.token]
        finally:
            session._keys[cache_key] = real
            session._wrap_keys.pop(transport_label, None)
        assert len(spy.seen) == len(PROFILE.keys(domain))
        for attrs in spy.seen:
            assert attrs == {"sensitive": True, "extractable": True, "token": False, "readable": False,
                             "derive": False}
        assert after == before == []


def test_no_session_object_is_left_when_a_derivation_fails(
    sessions: dict[str, TokenSession], registry: KeyRegistry
) -> None:
    session = sessions["bank"]
    label = _master(registry, "bank", "bank-imk-ac")
    with pytest.raises(HsmError):
        # A 3-level chain whose last level has data of a wrong length: the token refuses after two derives.
        session.derive_wrap(label, ((DeriveStep.DES3_ECB, bytes(16)), (DeriveStep.DES3_ECB, bytes(16)),
                                    (DeriveStep.DES3_ECB, bytes(15))), registry.active(
            "bank", KeyKind.TRANSPORT, "bureau-a").label)
    assert [o for o in session.objects() if not o.token] == []


def test_derive_wrap_matches_software_reference_under_known_transport_key(
    sessions: dict[str, TokenSession], registry: KeyRegistry, test_bureau: str
) -> None:
    from helpers import TEST_TRANSPORT_KEYS

    session = sessions["bank"]
    c = card(7)
    steps = ((DeriveStep.DES3_ECB, reference.option_a_input(c.pan or "", c.psn or "") +
              reference.complement(reference.option_a_input(c.pan or "", c.psn or ""))),)
    result = session.derive_wrap(_master(registry, "bank", "bank-imk-ac"), steps,
                                 registry.active("bank", KeyKind.TRANSPORT, test_bureau).label)
    key = aes_key_unwrap_with_padding(TEST_TRANSPORT_KEYS["bank"], result.wrapped)
    assert key == reference.option_a(MASTER_KEYS[("bank", "bank-imk-ac")], c.pan or "", c.psn or "")
    assert result.kcv == reference.kcv_tdes(key)


def test_derive_wrap_many_is_derive_wrap_per_key_each_timed_as_one_call(
    sessions: dict[str, TokenSession], registry: KeyRegistry, test_bureau: str
) -> None:
    from helpers import TEST_TRANSPORT_KEYS

    from kms import metrics

    session = sessions["bank"]
    transport = registry.active("bank", KeyKind.TRANSPORT, test_bureau).label
    cards = [card(i) for i in range(5)]
    keys = []
    for c in cards:
        y = reference.option_a_input(c.pan or "", c.psn or "")
        keys.append((_master(registry, "bank", "bank-imk-ac"), ((DeriveStep.DES3_ECB, y + reference.complement(y)),)))
        keys.append((_master(registry, "bank", "bank-imk-smi"), ((DeriveStep.DES3_ECB, y + reference.complement(y)),)))
    metrics.take_hsm_calls()
    results = session.derive_wrap_many(keys, transport)
    calls = metrics.take_hsm_calls()
    assert [verb for verb, _, error in calls] == ["derive-wrap"] * len(keys)
    assert all(error == "" and seconds > 0 for _, seconds, error in calls)
    for c, (ac, smi) in zip(cards, zip(results[::2], results[1::2], strict=True), strict=True):
        for result, name in ((ac, "bank-imk-ac"), (smi, "bank-imk-smi")):
            key = aes_key_unwrap_with_padding(TEST_TRANSPORT_KEYS["bank"], result.wrapped)
            assert key == reference.option_a(MASTER_KEYS[("bank", name)], c.pan or "", c.psn or "")
            assert (result.kcv, result.wrap) == (reference.kcv_tdes(key), "AES-KWP")
    one = session.derive_wrap(*keys[0], transport)  # one key: the same call, the same bytes (RFC 5649 is
    assert one == results[0]  # deterministic)
    assert [verb for verb, _, _ in metrics.take_hsm_calls()] == ["derive-wrap"]
    # A failing key is timed with its error's class and raises; the keys before it were made and destroyed.
    bad = [keys[0], ("kms/bank/master/nope/v1", keys[0][1]), keys[1]]
    with pytest.raises(HsmKeyNotFound):
        session.derive_wrap_many(bad, transport)
    assert [(verb, error) for verb, _, error in metrics.take_hsm_calls()] == [
        ("derive-wrap", ""), ("derive-wrap", "HsmKeyNotFound")]
    assert [o for o in session.objects() if not o.token] == []
    # What is worked out once per session is still checked for each new (key, kind of step): a transport key is
    # no master key, a master key no transport key.
    with pytest.raises(HsmError, match="is not a transport key here"):
        session.derive_wrap_many([keys[0]], keys[0][0])
    with pytest.raises(HsmError, match="is not one"):
        session.derive_wrap_many([(transport, keys[0][1])], transport)


def test_sm4_step_is_refused_with_a_clear_error_and_no_software_fallback(
    sessions: dict[str, TokenSession], registry: KeyRegistry
) -> None:
    session = sessions["hrss"]
    with pytest.raises(MechanismUnavailable) as raised:
        session.derive_wrap(_master(registry, "hrss", "hrss-mk"), ((DeriveStep.SM4_ECB, bytes(16)),),
                            registry.active("hrss", KeyKind.TRANSPORT, "bureau-a").label)
    assert "mechanism not available on this HSM" in str(raised.value)
    assert "SM4" in str(raised.value)
    with pytest.raises(MechanismUnavailable):
        session.generate_master_key("kms/hrss/master/sm4-test/v1", Algorithm.SM4)


def test_wrong_pin_is_a_login_error_without_the_pin(cfg: Any) -> None:
    module = runtime.module(cfg.hsm)
    canary = "CANARY-PIN-7731"
    with pytest.raises(HsmLoginFailed) as raised:
        # A token this test process has not logged in to (login state is per application).
        module.open("kms-station-b1", canary)
    assert canary not in str(raised.value)
    assert "refused the PIN" in str(raised.value)


def test_unknown_token_and_unknown_key_are_readable_errors(cfg: Any, sessions: dict[str, TokenSession]) -> None:
    module = runtime.module(cfg.hsm)
    with pytest.raises(HsmError, match="no token labelled 'no-such-token'"):
        module.open("no-such-token", "1234")
    with pytest.raises(HsmKeyNotFound, match="no key labelled 'kms/bank/master/nope/v1'"):
        sessions["bank"].derive_wrap("kms/bank/master/nope/v1", ((DeriveStep.DES3_ECB, bytes(16)),), "x")


def test_duplicate_labels_are_refused(sessions: dict[str, TokenSession], registry: KeyRegistry) -> None:
    label = _master(registry, "bank", "bank-kmc")
    with pytest.raises(HsmError, match="already holds a key"):
        sessions["bank"].generate_master_key(label, Algorithm.DES2)


def test_import_wipes_the_clear_key_buffer(sessions: dict[str, TokenSession]) -> None:
    value = bytearray(bytes.fromhex(VECTOR_KEY))
    kcv = sessions["bank"].import_master_key("kms/test/wipe/v1", Algorithm.DES2, value, token=False)
    assert value == bytearray(16)
    assert kcv.hex().upper() == "08D7B4"
    sessions["bank"].destroy("kms/test/wipe/v1")
    short = bytearray(b"\x01" * 8)
    with pytest.raises(HsmError, match="16 bytes"):
        sessions["bank"].import_master_key("kms/test/short/v1", Algorithm.DES2, short, token=False)
    assert short == bytearray(8)


VECTOR_KEY = "0123456789ABCDEFFEDCBA9876543210"


@pytest.mark.parametrize(
    ("error", "retryable", "kind"),
    [
        (p11e.DeviceRemoved(), True, HsmError),
        (p11e.SessionHandleInvalid(), True, HsmError),
        (p11e.TokenNotPresent(), True, HsmError),
        (p11e.PinIncorrect(), False, HsmLoginFailed),
        (p11e.PinLocked(), False, HsmLoginFailed),
        (p11e.KeyUnextractable(), False, HsmError),
        (p11e.FunctionFailed(), False, HsmError),
    ],
)
def test_pkcs11_errors_map_to_retryable_or_not(error: p11e.PKCS11Error, retryable: bool, kind: type) -> None:
    mapped = hsm_errors._translate(error, "do something")
    assert type(mapped) is kind
    assert mapped.retryable is retryable
    assert mapped.grpc_code == ("UNAVAILABLE" if retryable else mapped.grpc_status)
    assert str(mapped).startswith("do something: ")
    assert pickle.loads(pickle.dumps(mapped)).retryable is retryable


def test_station_card_keys_are_not_extractable(
    sealers: dict[str, Any], station_session: TokenSession
) -> None:
    from helpers import seal

    from kms import bundle

    parsed = bundle.parse(seal(sealers, card(3)))
    section = parsed.sections[0]
    label = f"kms/{section.domain}/transport/{section.transport_key}/v{section.transport_key_version}"
    keys = station_session.unwrap_card_keys(label, [(k.wrapped, Algorithm(k.algorithm)) for k in section.keys])
    assert [k.hex() for k in keys.kcvs] == [k.kcv.hex() for k in section.keys]
    assert [o for o in station_session.objects() if not o.token] == []  # each key destroyed once its KCV is known

    # a session copy as unwrap_card_keys makes one (same template: _STATION_SESSION_KEY), kept to be inspected
    key, kcv = station_session._unwrap_card_key(station_session._key(label), section.keys[0].wrapped,
                                                Algorithm(section.keys[0].algorithm), None)
    try:
        assert kcv == section.keys[0].kcv
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is False
        with pytest.raises(p11e.AttributeSensitive):
            key[Attribute.VALUE]
    finally:
        key.destroy()
    assert [o for o in station_session.objects() if not o.token] == []


def test_module_path_errors_are_config_errors(tmp_path: Any) -> None:
    from kms.errors import ConfigError
    from kms.hsm.softhsm import find_module

    with pytest.raises(ConfigError, match="no PKCS#11 module at"):
        find_module(str(tmp_path / "missing.so"))
    assert pkcs11 is not None


def test_a_station_pin_holder_cannot_unwrap_a_sealed_key_as_readable(
    sealers: dict[str, Any], station_session: TokenSession
) -> None:
    """CKA_UNWRAP_TEMPLATE on the station's transport keys: the token itself refuses a non-sensitive unwrap."""
    from helpers import seal

    from kms import bundle

    section = bundle.parse(seal(sealers, card(21))).sections[0]
    label = f"kms/{section.domain}/transport/{section.transport_key}/v{section.transport_key_version}"
    transport = _raw(station_session).get_key(object_class=ObjectClass.SECRET_KEY, label=label)
    for template in ({Attribute.SENSITIVE: False}, {Attribute.EXTRACTABLE: True},
                     {Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True}):
        with pytest.raises(p11e.PKCS11Error):
            transport.unwrap_key(ObjectClass.SECRET_KEY, KeyType.DES2, section.keys[0].wrapped,
                                 mechanism=Mechanism.AES_KEY_WRAP_PAD, template={**template, Attribute.TOKEN: False})
    with pytest.raises(p11e.PKCS11Error):
        transport[Attribute.UNWRAP_TEMPLATE] = {Attribute.SENSITIVE: False}
    assert [o for o in station_session.objects() if not o.token] == []


def test_transport_and_unwrap_keys_cannot_be_repurposed(
    sessions: dict[str, TokenSession], station_session: TokenSession, registry: KeyRegistry
) -> None:
    label = registry.active("bank", KeyKind.TRANSPORT, "bureau-a").label
    key = _raw(sessions["bank"]).get_key(object_class=ObjectClass.SECRET_KEY, label=label)
    assert key[Attribute.MODIFIABLE] is False and key[Attribute.EXTRACTABLE] is False
    assert key[Attribute.WRAP] is True and key[Attribute.UNWRAP] is False and key[Attribute.DECRYPT] is False
    for attribute in (Attribute.UNWRAP, Attribute.DECRYPT, Attribute.ENCRYPT):
        with pytest.raises(p11e.PKCS11Error):
            key[attribute] = True
    made = new_unwrap_key(station_session, "station-a1", "bank")  # a single-use hand-off key pair
    try:
        unwrap = _raw(station_session).get_key(object_class=ObjectClass.PRIVATE_KEY, label=made.label)
        assert unwrap[Attribute.MODIFIABLE] is False and unwrap[Attribute.UNWRAP] is True
        with pytest.raises(p11e.PKCS11Error):
            unwrap[Attribute.DECRYPT] = True
    finally:
        station_session.destroy(made.label, "private")
        station_session.destroy(made.label, "public")
