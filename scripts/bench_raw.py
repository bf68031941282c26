"""Baselines for `make bench`: bare python-pkcs11 loops doing exactly the token work kms does, and nothing else.

- ``Deriver``, the issuing side (parts 1 and 2, block by block: a range of the plan at a time), per key of the
  profile: C_DeriveKey level by level, KCV (encrypt a zero block), AES key wrap with padding,
  C_DestroyObject (no signing, no encoding, no inter-process traffic).
- ``Unwrapper``, the station side, per sealed key: C_UnwrapKey with AES key wrap with padding under the bureau's
  transport key into a session object (the template kms uses for a station card key), KCV (encrypt a zero block),
  C_DestroyObject (no parsing, no signature check, no ledger).

For an SM profile (on a token whose mechanism profile has SM codes, e.g. the development SM token) the same calls
with the SM mechanisms, by the vendor codes the caller passes (``codes``: the mechanism profile's): C_DeriveKey with
SM4_ECB_ENCRYPT_DATA for an SM4 step (CKK_SM4 keys), the KCV with SM4_ECB for an SM4 key, C_WrapKey/C_UnwrapKey
with SM4_ECB under an SM4 transport key. python-pkcs11 takes a vendor code as an enum member made with
``int.__new__`` (it refuses other integers), is told each key's type rather than reading it back (as kms does: it
cannot read a vendor key type) and is given no default capabilities (it has none for a vendor key type; the
templates set every capability anyway).

Deliberately outside the kms package: it is the yardstick, not the product. It takes from kms only the station
card key's template, so that both sides create the same objects.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.constants import DEFAULT

from kms.hsm.templates import Role, secret_key_template


class _Kdsd(ctypes.Structure):
    _fields_ = (("pData", ctypes.c_void_p), ("ulLen", ctypes.c_ulong))


_BASE = {
    Attribute.TOKEN: False, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
    Attribute.VALUE_LEN: DEFAULT, Attribute.LABEL: DEFAULT, Attribute.ID: DEFAULT, Attribute.DECRYPT: False,
    Attribute.WRAP: False, Attribute.UNWRAP: False, Attribute.SIGN: False, Attribute.VERIFY: False,
}
# CKA_MODIFIABLE last: SoftHSM refuses attributes that follow CKA_MODIFIABLE=false in a template.
_LAST = {**_BASE, Attribute.ENCRYPT: True, Attribute.DERIVE: False, Attribute.EXTRACTABLE: True,
         Attribute.MODIFIABLE: False}
_MID = {**_BASE, Attribute.ENCRYPT: False, Attribute.DERIVE: True, Attribute.EXTRACTABLE: False,
        Attribute.MODIFIABLE: False}


class _Sm:
    """The SM mechanisms and key type of one token, from its mechanism profile's vendor codes."""

    def __init__(self, codes: dict[str, int]) -> None:
        self.key_type: Any = int.__new__(KeyType, codes["CKK_SM4"]) if "CKK_SM4" in codes else None
        self.ecb: Any = int.__new__(Mechanism, codes["SM4_ECB"]) if "SM4_ECB" in codes else None
        self.derive: Any = (int.__new__(Mechanism, codes["SM4_ECB_ENCRYPT_DATA"])
                            if "SM4_ECB_ENCRYPT_DATA" in codes else None)


class Deriver:
    """The issuing side's raw loop on one logged-in session, for ``plan``: for each key of each card, (master key
    label, [(derivation step, 16-byte data) per level], the card key's algorithm); steps are
    "DES3_ECB_ENCRYPT_DATA" or "SM4_ECB_ENCRYPT_DATA", algorithms "DES2" or "SM4". Every key's work is made before
    any timing; ``derive(lo, hi)`` runs the keys plan[lo:hi] (all by default) and returns how many."""

    def __init__(self, module: str, softhsm2_conf: str, token: str, pin: str,
                 plan: list[tuple[str, list[tuple[str, bytes]], str]], transport_label: str, transport_algorithm: str,
                 codes: dict[str, int]) -> None:
        os.environ["SOFTHSM2_CONF"] = softhsm2_conf
        lib = pkcs11.lib(module)
        sm = _Sm(codes)
        mechanisms = {"DES3_ECB_ENCRYPT_DATA": Mechanism.DES3_ECB_ENCRYPT_DATA, "SM4_ECB_ENCRYPT_DATA": sm.derive}
        parent_types = {"DES3_ECB_ENCRYPT_DATA": KeyType.DES2, "SM4_ECB_ENCRYPT_DATA": sm.key_type}
        card_types = {"DES2": KeyType.DES2, "SM4": sm.key_type}
        kcvs = {"DES2": (bytes(8), Mechanism.DES3_ECB), "SM4": (bytes(16), sm.ecb)}
        self._wrap = sm.ecb if transport_algorithm == "SM4" else Mechanism.AES_KEY_WRAP_PAD
        self._session = session = lib.get_token(token_label=token).open(user_pin=pin, rw=True)
        masters: dict[str, Any] = {}
        transport: Any = session.get_key(object_class=ObjectClass.SECRET_KEY, label=transport_label)
        if transport_algorithm == "SM4":
            transport.key_type = sm.key_type  # python-pkcs11 cannot read a vendor key type back
        self._transport = transport
        for label, _, _ in plan:
            if label not in masters:
                masters[label] = session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
        # Per key, made before the clock starts: each level's (mechanism, data, type of the key it makes: the next
        # step's parent type, the card key's type at the last level), the KCV's zero block and mechanism.
        work = []
        for label, levels, algorithm in plan:
            masters[label].key_type = parent_types[levels[0][0]]  # told, not read back (a vendor type cannot be)
            types = [parent_types[step] for step, _ in levels[1:]] + [card_types[algorithm]]
            work.append((masters[label], [(mechanisms[step], data, key_type)
                                          for (step, data), key_type in zip(levels, types, strict=True)],
                         *kcvs[algorithm]))
        self._work = work

    def derive(self, lo: int = 0, hi: int | None = None) -> int:
        transport, wrap = self._transport, self._wrap
        work = self._work[lo:hi]
        for master, chain, zero, kcv_mechanism in work:
            made = []
            parent = master
            last = len(chain) - 1
            for i, (mechanism, data, key_type) in enumerate(chain):
                buf = ctypes.create_string_buffer(data, len(data))
                param = bytes(_Kdsd(ctypes.addressof(buf), len(data)))
                parent = parent.derive_key(key_type, 128, mechanism=mechanism, mechanism_param=param,
                                           template=_LAST if i == last else _MID, capabilities=0)
                parent.key_type = key_type  # as kms does: the type this call set, not read back
                made.append(parent)
            parent.encrypt(zero, mechanism=kcv_mechanism)
            transport.wrap_key(parent, mechanism=wrap)
            for key in made:
                key.destroy()
        return len(work)

    def close(self) -> None:
        self._session.close()


class Unwrapper:
    """The station side's raw loop on one logged-in session: ``unwrap(part)`` does, for each (transport key label,
    [(wrapped key, algorithm)]) of ``part``, per key C_UnwrapKey (AES key wrap with padding, or SM4-ECB under an SM4
    transport key; the station card key's session template; key type DES2 or SM4), KCV (DES3-ECB or SM4-ECB of a
    zero block) and C_DestroyObject. Returns the keys unwrapped."""

    def __init__(self, module: str, softhsm2_conf: str, token: str, pin: str, codes: dict[str, int] | None = None
                 ) -> None:
        os.environ["SOFTHSM2_CONF"] = softhsm2_conf
        self._session = pkcs11.lib(module).get_token(token_label=token).open(user_pin=pin, rw=True)
        self._template = secret_key_template(Role.STATION_CARD_KEY, token=False)
        self._transports: dict[str, tuple[Any, Any]] = {}  # label -> (key, wrap mechanism)
        sm = _Sm(codes or {})
        self._sm = sm
        self._kinds = {"DES2": (KeyType.DES2, bytes(8), Mechanism.DES3_ECB), "SM4": (sm.key_type, bytes(16), sm.ecb)}

    def _transport(self, label: str, wrap: str) -> tuple[Any, Any]:
        key = self._session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
        if wrap == "SM4-ECB":
            key.key_type = self._sm.key_type  # python-pkcs11 cannot read a vendor key type back
            return key, self._sm.ecb
        return key, Mechanism.AES_KEY_WRAP_PAD

    def unwrap(self, part: list[tuple[str, str, list[tuple[bytes, str]]]]) -> int:
        """``part``: (transport key label, the section's wrap method, [(wrapped key, algorithm)]) per section."""
        for label, wrap, _ in part:  # key handles looked up once, as kms caches them
            if label not in self._transports:
                self._transports[label] = self._transport(label, wrap)
        work = [(*self._transports[label], [(wrapped, *self._kinds[algorithm]) for wrapped, algorithm in keys])
                for label, _, keys in part]
        template, count = self._template, 0
        for transport, wrap, keys in work:
            for wrapped, key_type, zero, kcv_mechanism in keys:
                key = transport.unwrap_key(ObjectClass.SECRET_KEY, key_type, wrapped, mechanism=wrap,
                                           template=template, capabilities=0)
                key.key_type = key_type  # as kms does
                key.encrypt(zero, mechanism=kcv_mechanism)
                key.destroy()
                count += 1
        return count

    def close(self) -> None:
        self._session.close()
