"""Baselines for `make bench`: bare python-pkcs11 loops doing exactly the token work kms does, and nothing else.

- ``run``, the issuing side, per key of the profile: C_DeriveKey level by level, KCV (encrypt a zero block), AES
  key wrap with padding, C_DestroyObject (no signing, no encoding, no inter-process traffic).
- ``Unwrapper``, the station side, per sealed key: C_UnwrapKey with AES key wrap with padding under the bureau's
  transport key into a session object (the template kms uses for a station card key), KCV (encrypt a zero block),
  C_DestroyObject (no parsing, no signature check, no ledger).

Deliberately outside the kms package: it is the yardstick, not the product. It takes from kms only the station
card key's template, so that both sides create the same objects.
"""

from __future__ import annotations

import ctypes
import os
import time
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


def run(module: str, softhsm2_conf: str, token: str, pin: str, plan: list[tuple[str, list[bytes]]],
        transport_label: str, ready: Any, go: Any) -> tuple[int, float]:
    """plan: for each key of each card, (master key label, [16-byte derivation data per level])."""
    os.environ["SOFTHSM2_CONF"] = softhsm2_conf
    lib = pkcs11.lib(module)
    with lib.get_token(token_label=token).open(user_pin=pin, rw=True) as session:
        masters: dict[str, Any] = {}
        transport: Any = session.get_key(object_class=ObjectClass.SECRET_KEY, label=transport_label)
        for label, _ in plan:
            if label not in masters:
                masters[label] = session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
        ready.set()
        go.wait()
        started = time.perf_counter()
        for label, levels in plan:
            made = []
            parent = masters[label]
            last = len(levels) - 1
            for i, data in enumerate(levels):
                buf = ctypes.create_string_buffer(data, len(data))
                param = bytes(_Kdsd(ctypes.addressof(buf), len(data)))
                parent = parent.derive_key(KeyType.DES2, 128, mechanism=Mechanism.DES3_ECB_ENCRYPT_DATA,
                                           mechanism_param=param, template=_LAST if i == last else _MID)
                made.append(parent)
            parent.encrypt(bytes(8), mechanism=Mechanism.DES3_ECB)
            transport.wrap_key(parent, mechanism=Mechanism.AES_KEY_WRAP_PAD)
            for key in made:
                key.destroy()
        return len(plan), time.perf_counter() - started


class Unwrapper:
    """The station side's raw loop on one logged-in session: ``unwrap(part)`` does, for each (transport key label,
    [wrapped keys]) of ``part``, per key C_UnwrapKey (AES key wrap with padding, the station card key's session
    template, key type DES2), KCV (DES3-ECB of a zero block) and C_DestroyObject. Returns the keys unwrapped."""

    def __init__(self, module: str, softhsm2_conf: str, token: str, pin: str) -> None:
        os.environ["SOFTHSM2_CONF"] = softhsm2_conf
        self._session = pkcs11.lib(module).get_token(token_label=token).open(user_pin=pin, rw=True)
        self._template = secret_key_template(Role.STATION_CARD_KEY, token=False)
        self._transports: dict[str, Any] = {}

    def unwrap(self, part: list[tuple[str, list[bytes]]]) -> int:
        for label, _ in part:  # key handles looked up once, as kms caches them
            if label not in self._transports:
                self._transports[label] = self._session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
        work = [(self._transports[label], wrapped) for label, wrapped in part]
        template, zero, count = self._template, bytes(8), 0
        for transport, keys in work:
            for wrapped in keys:
                key = transport.unwrap_key(ObjectClass.SECRET_KEY, KeyType.DES2, wrapped,
                                           mechanism=Mechanism.AES_KEY_WRAP_PAD, template=template)
                key.encrypt(zero, mechanism=Mechanism.DES3_ECB)
                key.destroy()
                count += 1
        return count

    def close(self) -> None:
        self._session.close()
