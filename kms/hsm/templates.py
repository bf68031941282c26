"""The key template table of the HSM port and the ctypes packing python-pkcs11 does not do itself.

Every key the port creates goes through one table (``_ROLES``): every secret key is CKA_SENSITIVE, and the only
keys that may be extracted at all are per-card keys, which are extractable solely by wrapping.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Any

from pkcs11 import Attribute, KeyType
from pkcs11.constants import DEFAULT

from kms.errors import HsmError


class Role(enum.Enum):
    """What a secret key is for; decides every attribute of its template."""

    MASTER = "master"  # issuer master key / KMC: token object, derive only, never extractable
    INTERMEDIATE = "intermediate"  # a level of a dispersal chain: session object, derive only
    CARD_KEY = "card_key"  # a per-card key: session object, extractable only by wrapping, then destroyed
    TRANSPORT = "transport"  # a bureau's transport key in the issuing domain's token: wrap only
    STATION_TRANSPORT = "station_transport"  # the same key in the station's token: unwrap only
    STATION_CARD_KEY = "station_card_key"  # a card key unwrapped at the station: never extractable
    # Escrowable variants (a ceremony chose escrow when the key was created): extractable, but only wrapped under
    # a key the security officer marked CKA_TRUSTED (CKA_WRAP_WITH_TRUSTED), i.e. the domain's custody key.
    MASTER_ESCROWABLE = "master_escrowable"
    TRANSPORT_ESCROWABLE = "transport_escrowable"
    # Cardholder data at rest (kms.issuance.pans): an AES key that encrypts and decrypts PANs (AES-GCM) and an HMAC key
    # that makes their look-up indexes; neither ever leaves the token.
    DATA = "data"
    INDEX = "index"


_ALL_CAPS = (
    Attribute.ENCRYPT,
    Attribute.DECRYPT,
    Attribute.WRAP,
    Attribute.UNWRAP,
    Attribute.SIGN,
    Attribute.VERIFY,
    Attribute.DERIVE,
)

# role -> (capabilities that are true, extractable, modifiable)
_ROLES: dict[Role, tuple[frozenset[Attribute], bool, bool]] = {
    Role.MASTER: (frozenset({Attribute.DERIVE}), False, False),
    Role.INTERMEDIATE: (frozenset({Attribute.DERIVE}), False, False),
    Role.CARD_KEY: (frozenset({Attribute.ENCRYPT}), True, False),
    Role.TRANSPORT: (frozenset({Attribute.WRAP}), False, False),
    Role.STATION_TRANSPORT: (frozenset({Attribute.UNWRAP}), False, False),
    Role.STATION_CARD_KEY: (frozenset({Attribute.ENCRYPT}), False, False),
    Role.MASTER_ESCROWABLE: (frozenset({Attribute.DERIVE}), True, False),
    Role.TRANSPORT_ESCROWABLE: (frozenset({Attribute.WRAP}), True, False),
    Role.DATA: (frozenset({Attribute.ENCRYPT, Attribute.DECRYPT}), False, False),
    Role.INDEX: (frozenset({Attribute.SIGN, Attribute.VERIFY}), False, False),
}
_TRUSTED_ONLY = frozenset({Role.MASTER_ESCROWABLE, Role.TRANSPORT_ESCROWABLE})


def secret_key_template(role: Role, *, token: bool, label: str | None = None) -> dict[Attribute, Any]:
    """The one template every secret key the port creates is built from. Always sensitive, always private."""
    caps, extractable, modifiable = _ROLES[role]
    template: dict[Attribute, Any] = {attr: attr in caps for attr in _ALL_CAPS}
    template.update(
        {
            Attribute.TOKEN: token,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: extractable,
        }
    )
    if role in _TRUSTED_ONLY:
        template[Attribute.WRAP_WITH_TRUSTED] = True
    if label is not None:
        template[Attribute.LABEL] = label
    # Last, always: SoftHSM 2.6 applies a template in order, and once CKA_MODIFIABLE=false is set it refuses
    # every later attribute as read-only (AttributeReadOnly).
    template[Attribute.MODIFIABLE] = modifiable
    return template


def _derive_template(role: Role) -> dict[Attribute, Any]:
    template = secret_key_template(role, token=False)
    # SoftHSM sizes a derived DES key from its type and rejects CKA_VALUE_LEN (AttributeReadOnly).
    template[Attribute.VALUE_LEN] = DEFAULT
    template[Attribute.LABEL] = DEFAULT
    template[Attribute.ID] = DEFAULT
    return template


_ZERO_BLOCK = bytes(8)
_CARD_KEY_DERIVE = _derive_template(Role.CARD_KEY)
_INTERMEDIATE_DERIVE = _derive_template(Role.INTERMEDIATE)
# SM4 keys derived by SM4_ECB_ENCRYPT_DATA: the same roles; an SM4 key's length follows from its type, as a DES2 key's.
_SM4_CARD_KEY_DERIVE = _derive_template(Role.CARD_KEY)
_SM4_INTERMEDIATE_DERIVE = _derive_template(Role.INTERMEDIATE)


class _Attribute(ctypes.Structure):
    """CK_ATTRIBUTE, for the one array-valued attribute kms sets (CKA_UNWRAP_TEMPLATE)."""

    _fields_ = (("type", ctypes.c_ulong), ("pValue", ctypes.c_void_p), ("ulValueLen", ctypes.c_ulong))


# CK_BBOOL values an unwrap template points at: static, so they outlive every call that uses them.
_CK_TRUE = ctypes.c_ubyte(1)
_CK_FALSE = ctypes.c_ubyte(0)

#: What every key unwrapped under a station's unwrapping key must be: the token enforces it, so even a PIN holder
#: cannot unwrap a sealed key as readable (CKA_UNWRAP_TEMPLATE, checked by SoftHSM 2.6 with TemplateInconsistent).
_UNWRAPPED_KEY_TEMPLATE = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.DECRYPT: False}
#: What the one transport key a station's single-use hand-off key unwraps may be: everything of the station's
#: transport key (and of the encrypt-only session copy its KCV is computed with) that a flat template can pin. SoftHSM
#: 2.6 checks each of these (TemplateInconsistent otherwise) but cannot pin the new key's own CKA_UNWRAP_TEMPLATE (a
#: nested template is never matched), so this does not stop an unwrap-capable copy without one: the key pair being
#: single use does (kms.station.accept_transport_key, docs/ceremonies.md section 4.4).
_HANDOFF_UNWRAP_TEMPLATE = {
    Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.DECRYPT: False, Attribute.WRAP: False,
    Attribute.SIGN: False, Attribute.VERIFY: False, Attribute.DERIVE: False, Attribute.MODIFIABLE: False,
}


def _pack_bool_template(template: dict[Attribute, bool]) -> bytes:
    if not isinstance(template, dict):
        raise TypeError("an unwrap template is a mapping of attributes to booleans")
    array = (_Attribute * len(template))()
    for i, (attribute, value) in enumerate(template.items()):
        if not isinstance(value, bool):
            raise HsmError("unwrap templates hold only boolean attributes")
        flag = _CK_TRUE if value else _CK_FALSE
        array[i] = _Attribute(int(attribute), ctypes.addressof(flag), 1)
    return bytes(array)


def _key_type_handler() -> tuple[Any, Any]:
    """CKA_KEY_TYPE packed and read: python-pkcs11 turns the value into its KeyType enum and fails on a vendor's
    key type (CKK_SM4 of a mechanism profile); such a value is read as a member-less KeyType (``int.__new__``), the
    form python-pkcs11 accepts back."""
    from pkcs11.attributes import handle_ulong

    pack, unpack = handle_ulong

    def read(raw: bytes) -> KeyType:
        value = unpack(raw)
        try:
            return KeyType(value)
        except ValueError:
            return int.__new__(KeyType, value)

    return (lambda value: pack(int(value))), read


def _attribute_mapper() -> Any:
    # python-pkcs11 has no encoder for array attributes (and crashes on one it cannot encode): register ours.
    from pkcs11.attributes import AttributeMapper

    mapper = AttributeMapper()
    mapper.register_handler(Attribute.UNWRAP_TEMPLATE, _pack_bool_template, lambda raw: raw)
    mapper.register_handler(Attribute.KEY_TYPE, *_key_type_handler())
    return mapper


class _KeyDerivationStringData(ctypes.Structure):
    """CK_KEY_DERIVATION_STRING_DATA; python-pkcs11 packs it only for the AES mechanisms."""

    _fields_ = (("pData", ctypes.c_void_p), ("ulLen", ctypes.c_ulong))


