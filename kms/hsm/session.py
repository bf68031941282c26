"""The HSM port's sessions: the module and token verbs (kms.hsm is the only package in kms that imports pkcs11).

It opens one token by label, logs in with a PIN the caller resolved from a reference, and offers domain verbs
(derive-and-wrap, KCV, sign, generate, import, unwrap) instead of raw Cryptoki. Every key it creates goes through
one template table (``_ROLES``, kms.hsm.templates): every secret key is CKA_SENSITIVE, and the only keys that may be
extracted at all are per-card keys, which are extractable solely by wrapping and are destroyed in the same call
that wraps them.

PKCS#11 errors become kms errors (kms.hsm.errors, retryable or not) with readable messages; nothing from the
token's memory ever reaches a message.

Each verb that calls the token is timed (``kms.metrics.hsm_call``: the ``kms_hsm_call_seconds`` histogram, observed
by the serving process from the timings its workers send back).

Concurrency: python-pkcs11 initializes Cryptoki without locking, so a ``Module`` and its sessions belong to one
thread. kms scales with processes, one token session per process.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pkcs11
import pkcs11.exceptions as p11e
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_public_key
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from kms.errors import HsmError, HsmKeyNotFound, InvalidArgument, MechanismUnavailable
from kms.hsm.errors import _UNDECRYPTABLE, UNDECRYPTABLE, _hsm, _translate
from kms.hsm.labels import trusted_label
from kms.hsm.templates import (
    _ALL_CAPS,
    _CARD_KEY_DERIVE,
    _INTERMEDIATE_DERIVE,
    _UNWRAPPED_KEY_TEMPLATE,
    _ZERO_BLOCK,
    Role,
    _attribute_mapper,
    _KeyDerivationStringData,
    secret_key_template,
)
from kms.hsm.types import Algorithm, DeriveStep, wipe
from kms.metrics import hsm_call
from kms.validation import rsa_public_key

_KEY_TYPES = {Algorithm.DES2: KeyType.DES2, Algorithm.AES256: KeyType.AES}

_OAEP_SHA1 = (Mechanism.SHA_1, pkcs11.MGF.SHA1, None)  # SoftHSM 2.6 offers OAEP with SHA-1 only
#: A card key a station unwraps to check (a session object): built once, for it is made for every key of every
#: bundle a station opens.
_STATION_SESSION_KEY = secret_key_template(Role.STATION_CARD_KEY, token=False)


# ---------------------------------------------------------------------------------------------------------------
# module and token


#: Diagnostics: with this environment variable naming a file, every user login attempt (C_Login, in ``Module.open``)
#: appends one line to it — time, process id, token label, outcome (``ok`` or the PKCS#11 error's name); never a PIN.
#: Worker processes inherit it. How the tests count login attempts with a wrong PIN; an operator may use it too.
LOGIN_TRACE_ENV = "KMS_HSM_LOGIN_TRACE"


def _trace_login(token_label: str, outcome: str) -> None:
    path = os.environ.get(LOGIN_TRACE_ENV)
    if not path:
        return
    line = f"{time.time():.3f} {os.getpid()} {token_label} {outcome}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)  # one write of a short line: lines of several processes do not interleave
    finally:
        os.close(fd)


class Module:
    """A loaded PKCS#11 library (one per process)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._lib = pkcs11.lib(path)
        except (RuntimeError, OSError, p11e.PKCS11Error) as error:
            raise HsmError(f"cannot load PKCS#11 module {path}: {type(error).__name__}") from None

    def trust_custody_key(self, token_label: str, so_pin: str, label: str, spki: bytes) -> None:
        """As the token's security officer: create the custody public key as a trusted wrapping key (CKA_TRUSTED
        can be set by the SO only), the one key escrowable keys may be wrapped under."""
        public = load_der_public_key(spki)
        if not isinstance(public, rsa.RSAPublicKey):
            raise HsmError("a custody key must be an RSA public key")
        numbers = public.public_numbers()
        with _hsm(f"trust custody key {label!r}"):
            token = self._lib.get_token(token_label=token_label)
            with token.open(so_pin=so_pin, rw=True) as session:
                for existing in session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                                                     Attribute.LABEL: trusted_label(label)}):
                    if bytes(existing[Attribute.MODULUS]).lstrip(b"\x00") != _big(numbers.n):
                        raise HsmError(f"{trusted_label(label)!r} exists but is another key")
                    return
                session.create_object({
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA,
                    Attribute.MODULUS: _big(numbers.n), Attribute.PUBLIC_EXPONENT: _big(numbers.e),
                    Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.LABEL: trusted_label(label),
                    Attribute.WRAP: True, Attribute.ENCRYPT: False, Attribute.VERIFY: False,
                    Attribute.TRUSTED: True, Attribute.MODIFIABLE: False,
                })

    def token_labels(self) -> list[str]:
        with _hsm("list tokens"):
            return [slot.get_token().label for slot in self._lib.get_slots(token_present=True)]

    @hsm_call("login")
    def open(self, token_label: str, pin: str) -> TokenSession:
        """A read-write session on the token with this label, logged in as the user."""
        with _hsm(f"open token {token_label!r}"):
            try:
                token = self._lib.get_token(token_label=token_label)
            except p11e.NoSuchToken:
                raise HsmError(f"no token labelled {token_label!r} in {self.path}") from None
            except p11e.MultipleTokensReturned:
                raise HsmError(f"more than one token labelled {token_label!r} in {self.path}") from None
            try:
                session = token.open(user_pin=pin, rw=True, attribute_mapper=_attribute_mapper())
            except p11e.PKCS11Error as error:
                _trace_login(token_label, type(error).__name__)
                raise
            _trace_login(token_label, "ok")
        return TokenSession(token_label, session)

    def reinitialize(self) -> None:
        """C_Finalize and C_Initialize: every session of this process is closed; tokens are looked for again."""
        with _hsm("initialize the PKCS#11 module again"):
            self._lib.reinitialize()


def _big(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _rsa_spki(public: Any) -> bytes:
    n = int.from_bytes(bytes(public[Attribute.MODULUS]), "big")
    e = int.from_bytes(bytes(public[Attribute.PUBLIC_EXPONENT]), "big")
    return rsa.RSAPublicNumbers(e, n).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class KeyInfo:
    """What the token tells about one object, without its value."""

    label: str
    object_class: str
    key_type: str
    token: bool
    sensitive: bool | None
    extractable: bool | None
    always_sensitive: bool | None
    never_extractable: bool | None
    capabilities: frozenset[str]
    wrap_with_trusted: bool | None = None  # escrowable keys: wrapped only under an SO-trusted key


@dataclass(frozen=True)
class WrappedKey:
    wrapped: bytes
    kcv: bytes


class TokenSession:
    """A logged-in session on one token, with the domain verbs. Not thread-safe; close() when done."""

    def __init__(self, token_label: str, session: Any) -> None:
        self.token_label = token_label
        self._session = session
        self._keys: dict[tuple[Any, str], Any] = {}  # (object class, label) -> key object
        self._mechanisms: frozenset[str] | None = None

    # -- housekeeping ------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._keys.clear()
        with contextlib.suppress(p11e.PKCS11Error):
            self._session.close()

    def __enter__(self) -> TokenSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self) -> None:
        """Raise an HsmError unless this session still reaches its token and objects: the token's information,
        every key handle this session keeps, and at least one object in the token (a token moved away and back
        shows none to an old session). Cheap: a few calls, no cryptography."""
        with _hsm(f"check token {self.token_label!r}"):
            self._session.token.slot.get_token()
            for key in list(self._keys.values()):
                key[Attribute.CLASS]
            objects = self._session.get_objects()
            try:
                first = next(objects, None)
            finally:
                objects.close()  # ends the search now (C_FindObjectsFinal), not when collected
            if first is None:
                raise HsmError(f"token {self.token_label!r} shows no objects to this session", retryable=True)

    def mechanisms(self) -> frozenset[str]:
        if self._mechanisms is None:
            with _hsm("list mechanisms"):
                self._mechanisms = frozenset(m.name for m in self._session.token.slot.get_mechanisms())
        return self._mechanisms

    def require(self, mechanism: str) -> None:
        """Raise MechanismUnavailable unless the token offers this mechanism (and python-pkcs11 knows it)."""
        if mechanism not in self.mechanisms() or not hasattr(Mechanism, mechanism):
            raise MechanismUnavailable(mechanism, self.token_label)

    def _key(self, label: str, object_class: Any = ObjectClass.SECRET_KEY) -> Any:
        cache_key = (object_class, label)
        key = self._keys.get(cache_key)
        if key is None:
            with _hsm(f"find key {label!r}"):
                try:
                    key = self._session.get_key(object_class=object_class, label=label)
                except p11e.NoSuchKey:
                    raise HsmKeyNotFound(f"no key labelled {label!r} in token {self.token_label!r}") from None
                except p11e.MultipleObjectsReturned:
                    raise HsmError(
                        f"more than one key labelled {label!r} in token {self.token_label!r}"
                    ) from None
            self._keys[cache_key] = key
        return key

    def has_key(self, label: str) -> bool:
        return self._has(label, ObjectClass.SECRET_KEY)

    def has_public_key(self, label: str) -> bool:
        return self._has(label, ObjectClass.PUBLIC_KEY)

    # -- data objects: small state a process keeps in its token rather than in a database ---------------------------

    def read_data(self, label: str) -> bytes | None:
        """The value of the private data object with this label, or None if there is none."""
        with _hsm(f"read data object {label!r}"):
            for obj in self._session.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label}):
                return bytes(obj[Attribute.VALUE])
        return None

    def write_data(self, label: str, value: bytes) -> None:
        """Replace the private data object with this label (a token object, readable only after login)."""
        with _hsm(f"write data object {label!r}"):
            for obj in list(self._session.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label})):
                obj.destroy()
            self._session.create_object({Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True,
                                         Attribute.PRIVATE: True, Attribute.LABEL: label,
                                         Attribute.APPLICATION: "kms", Attribute.VALUE: value})

    def _has(self, label: str, object_class: Any) -> bool:
        try:
            self._key(label, object_class)
        except HsmKeyNotFound:
            return False
        return True

    def objects(self) -> list[KeyInfo]:
        """Every key object this session can see (token objects and this application's session objects)."""
        infos = []
        with _hsm("list objects"):
            for obj in self._session.get_objects():
                if obj.object_class not in (
                    ObjectClass.SECRET_KEY,
                    ObjectClass.PRIVATE_KEY,
                    ObjectClass.PUBLIC_KEY,
                ):
                    continue
                infos.append(_describe(obj))
        return infos

    @hsm_call("destroy")
    def destroy(self, label: str, object_class: str = "secret") -> None:
        cls = {"secret": ObjectClass.SECRET_KEY, "private": ObjectClass.PRIVATE_KEY,
               "public": ObjectClass.PUBLIC_KEY}[object_class]
        key = self._key(label, cls)
        with _hsm(f"destroy key {label!r}"):
            key.destroy()
        self._keys.pop((cls, label), None)

    # -- master keys -------------------------------------------------------------------------------------------

    def generate_master_key(self, label: str, algorithm: Algorithm, *, escrow: bool = False) -> bytes:
        """Generate a token-resident, derive-only master key; returns its KCV. With ``escrow`` the key can later
        be exported as components, but only through the trusted custody key (CKA_WRAP_WITH_TRUSTED)."""
        return self._generate(label, Role.MASTER_ESCROWABLE if escrow else Role.MASTER, algorithm)

    def generate_transport_key(self, label: str, *, escrow: bool = False) -> bytes:
        """Generate a wrap-only AES-256 transport key in the token; returns its KCV."""
        return self._generate(label, Role.TRANSPORT_ESCROWABLE if escrow else Role.TRANSPORT, Algorithm.AES256)

    @hsm_call("generate")
    def _generate(self, label: str, role: Role, algorithm: Algorithm) -> bytes:
        self._refuse_duplicate(label)
        key_type = self._key_type(algorithm)
        with _hsm(f"generate key {label!r}"):
            key = self._session.generate_key(
                key_type,
                algorithm.length * 8 if algorithm is not Algorithm.DES2 else None,
                template=secret_key_template(role, token=True, label=label),
            )
            return bytes(key[Attribute.CHECK_VALUE])

    def import_master_key(self, label: str, algorithm: Algorithm, value: bytearray, *, token: bool = True,
                          escrow: bool = False) -> bytes:
        """Create a derive-only master key from clear key bytes and wipe them. Returns its KCV (the token's
        CKA_CHECK_VALUE). ``token=False`` makes a session object (self-test, scratch use).

        One of the two places a clear key enters the token: joining components in a ceremony, or test values.
        """
        return self._import(label, Role.MASTER_ESCROWABLE if escrow else Role.MASTER, algorithm, value, token)

    def import_transport_key(self, label: str, value: bytearray, *, token: bool = True, escrow: bool = False) -> bytes:
        """Create a wrap-only AES-256 transport key from clear bytes (bureau components, or a self-test KEK) and
        wipe them. Returns its KCV."""
        return self._import(label, Role.TRANSPORT_ESCROWABLE if escrow else Role.TRANSPORT, Algorithm.AES256, value,
                            token)

    # -- custody: components in and out of the token during ceremonies -----------------------------------------

    @hsm_call("generate")
    def generate_custody_keypair(self, label: str) -> bytes:
        """The domain's custody key: an RSA-3072 private key that may only decrypt (never extractable), for
        components sent in encrypted to it and for escrow exports wrapped under its trusted public half (which
        the security officer creates, ``Module.trust_custody_key``). Returns the public key (SPKI DER)."""
        self._refuse_duplicate(label, ObjectClass.PRIVATE_KEY)
        with _hsm(f"generate custody key {label!r}"):
            public, _ = self._session.generate_keypair(
                KeyType.RSA, 3072,
                public_template={Attribute.TOKEN: False, Attribute.ENCRYPT: True, Attribute.WRAP: False,
                                 Attribute.VERIFY: False},
                private_template={Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.LABEL: label,
                                  Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                  Attribute.DECRYPT: True, Attribute.UNWRAP: False, Attribute.SIGN: False,
                                  Attribute.MODIFIABLE: False},
            )
            try:
                return _rsa_spki(public)
            finally:
                public.destroy()

    @hsm_call("custody-decrypt")
    def custody_decrypt(self, label: str, ciphertext: bytes, field: str = "ciphertext") -> bytearray:
        """Decrypt a component sent in to the custody key (RSA-OAEP). The caller wipes the result (a ceremony's
        documented exception: components are joined outside the token, SoftHSM has no in-token XOR). A ciphertext
        the token cannot decrypt is InvalidArgument naming ``field``, with the reason UNDECRYPTABLE."""
        private = self._key(label, ObjectClass.PRIVATE_KEY)
        try:
            return bytearray(private.decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                                             mechanism_param=_OAEP_SHA1))
        except _UNDECRYPTABLE:
            # The ciphertext is this call's only input (SoftHSM 2.6 answers any failed OAEP decoding with
            # GeneralError): the caller's data, not the HSM, is at fault; nothing was decrypted.
            raise InvalidArgument(field, UNDECRYPTABLE) from None
        except p11e.PKCS11Error as error:
            raise _translate(error, f"decrypt a component with {label!r}") from None

    @hsm_call("escrow-export")
    def escrow_export(self, key_label: str, custody_label: str) -> bytearray:
        """An escrowable key's value, for splitting into components: wrapped by the token under the trusted custody
        public key (refused for any key not created escrowable, and under any key the SO did not trust), then
        decrypted with the custody private key. The caller splits and wipes it."""
        key = self._key(key_label)
        trusted = self._key(trusted_label(custody_label), ObjectClass.PUBLIC_KEY)
        private = self._key(custody_label, ObjectClass.PRIVATE_KEY)
        with _hsm(f"export {key_label!r} for escrow"):
            wrapped = trusted.wrap_key(key, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_SHA1)
            return bytearray(private.decrypt(wrapped, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_SHA1))

    @hsm_call("import")
    def _import(self, label: str, role: Role, algorithm: Algorithm, value: bytearray, token: bool) -> bytes:
        try:
            if len(value) != algorithm.length:
                raise HsmError(f"import key {label!r}: {algorithm} keys are {algorithm.length} bytes")
            self._refuse_duplicate(label)
            template = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: self._key_type(algorithm),
                        Attribute.VALUE: bytes(value)}
            template.update(secret_key_template(role, token=token, label=label))  # CKA_MODIFIABLE stays last
            with _hsm(f"import key {label!r}"):
                key = self._session.create_object(template)
                return bytes(key[Attribute.CHECK_VALUE])
        finally:
            wipe(value)

    # -- the hot path ------------------------------------------------------------------------------------------

    @hsm_call("derive-wrap")
    def derive_wrap(
        self,
        master_label: str,
        steps: Sequence[tuple[DeriveStep, bytes]],
        transport_label: str,
    ) -> WrappedKey:
        """Derive a per-card key inside the token through ``steps``, wrap it under the transport key with
        AES key wrap with padding (RFC 5649), compute its KCV, and destroy every key the derivation made.

        The per-card key is a sensitive session object that lives only for this call. This is the hot path:
        it does nothing in Python that the token calls do not need.
        """
        last = len(steps) - 1
        if not 0 <= last <= 2:
            raise HsmError("a derivation has 1 to 3 steps")
        for step, _ in steps:
            if step is not DeriveStep.DES3_ECB:
                self.require(step.value)
                # Offered by the token, but python-pkcs11 has no binding for a vendor SM4 mechanism yet:
                # refuse rather than compute anything else.
                raise HsmError(f"{step.value} is offered by token {self.token_label!r}, but kms has no binding "
                               "for this vendor mechanism yet; refusing rather than computing anything else")
        master = self._key(master_label)
        transport = self._key(transport_label)
        made: list[Any] = []
        try:
            parent = master
            for i, (_step, data) in enumerate(steps):
                buf = ctypes.create_string_buffer(data, len(data))  # alive until the call returns
                parent = parent.derive_key(
                    KeyType.DES2, 128, mechanism=Mechanism.DES3_ECB_ENCRYPT_DATA,
                    mechanism_param=bytes(_KeyDerivationStringData(ctypes.addressof(buf), len(data))),
                    template=_CARD_KEY_DERIVE if i == last else _INTERMEDIATE_DERIVE,
                )
                made.append(parent)
            kcv = parent.encrypt(_ZERO_BLOCK, mechanism=Mechanism.DES3_ECB)[:3]
            wrapped = transport.wrap_key(parent, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        except p11e.PKCS11Error as error:
            raise _translate(error, f"derive from {master_label!r} and wrap under {transport_label!r}") from None
        finally:
            _destroy_all(made)
        return WrappedKey(wrapped, kcv)

    # -- signing -----------------------------------------------------------------------------------------------

    @hsm_call("generate")
    def generate_signing_key(self, label: str) -> bytes:
        """An ECDSA P-256 key pair as token objects; returns the public key as SubjectPublicKeyInfo DER."""
        self._refuse_duplicate(label, ObjectClass.PRIVATE_KEY)
        with _hsm(f"generate signing key {label!r}"):
            params = self._session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
            )
            public, _private = params.generate_keypair(
                store=True,
                label=label,
                public_template={Attribute.VERIFY: True, Attribute.TOKEN: True, Attribute.MODIFIABLE: False},
                private_template={
                    Attribute.SIGN: True,
                    Attribute.DERIVE: False,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.PRIVATE: True,
                    Attribute.MODIFIABLE: False,
                },
            )
            return bytes(encode_ec_public_key(public))

    def public_key(self, label: str) -> bytes:
        """SubjectPublicKeyInfo DER of the public key with this label (EC or RSA)."""
        key = self._key(label, ObjectClass.PUBLIC_KEY)
        with _hsm(f"read public key {label!r}"):
            if key.key_type == KeyType.EC:
                return bytes(encode_ec_public_key(key))
            numbers = rsa.RSAPublicNumbers(
                int.from_bytes(key[Attribute.PUBLIC_EXPONENT], "big"),
                int.from_bytes(key[Attribute.MODULUS], "big"),
            )
        return numbers.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    @hsm_call("sign")
    def sign_sha256(self, label: str, message: bytes) -> bytes:
        """ECDSA P-256 over SHA-256(message); the hash is computed here (SoftHSM lacks CKM_ECDSA_SHA256).
        Returns the raw signature r ‖ s (64 bytes)."""
        key = self._key(label, ObjectClass.PRIVATE_KEY)
        digest = hashlib.sha256(message).digest()
        with _hsm(f"sign with {label!r}"):
            return bytes(key.sign(digest, mechanism=Mechanism.ECDSA))

    # -- cardholder data at rest (kms.issuance.pans) ---------------------------------------------------------------

    def generate_data_key(self, label: str) -> bytes:
        """An AES-256 key that encrypts and decrypts data (AES-GCM) in the token, never extractable; its KCV."""
        return self._generate(label, Role.DATA, Algorithm.AES256)

    @hsm_call("generate")
    def generate_index_key(self, label: str) -> bytes:
        """A 256-bit generic secret for HMAC-SHA256 look-up indexes, never extractable; the KCV of its first use
        (HMAC of the empty string, 3 bytes), since generic secrets have no CKA_CHECK_VALUE."""
        self._refuse_duplicate(label)
        with _hsm(f"generate key {label!r}"):
            self._session.generate_key(KeyType.GENERIC_SECRET, 256,
                                       template=secret_key_template(Role.INDEX, token=True, label=label))
        return self.hmac_sha256(label, b"")[:3]

    @hsm_call("encrypt")
    def encrypt_data(self, label: str, plaintext: bytes, aad: bytes) -> bytes:
        """AES-GCM under a data key: a fresh 12-byte IV ‖ ciphertext ‖ 16-byte tag, bound to ``aad``."""
        key = self._key(label)
        iv = secrets.token_bytes(12)
        with _hsm(f"encrypt with {label!r}"):
            return iv + bytes(key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                                          mechanism_param=GCMParams(iv, aad, 128)))

    @hsm_call("decrypt")
    def decrypt_data(self, label: str, sealed: bytes, aad: bytes, field: str = "data") -> bytes:
        """The plaintext of ``encrypt_data``; InvalidArgument naming ``field`` if it was altered, bound to other
        ``aad`` or made with another key (the token refuses the tag)."""
        key = self._key(label)
        if len(sealed) < 12 + 16:
            raise InvalidArgument(field, "is not data encrypted by kms")
        try:
            return bytes(key.decrypt(sealed[12:], mechanism=Mechanism.AES_GCM,
                                     mechanism_param=GCMParams(sealed[:12], aad, 128)))
        except (p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange, p11e.GeneralError):
            raise InvalidArgument(field, "cannot be decrypted: altered, or sealed for another record") from None
        except p11e.PKCS11Error as error:
            raise _translate(error, f"decrypt with {label!r}") from None

    @hsm_call("hmac")
    def hmac_sha256(self, label: str, message: bytes) -> bytes:
        key = self._key(label)
        with _hsm(f"HMAC with {label!r}"):
            return bytes(key.sign(message, mechanism=Mechanism.SHA256_HMAC))

    # -- transport keys ----------------------------------------------------------------------------------------

    @hsm_call("generate")
    def generate_unwrap_keypair(self, label: str) -> bytes:
        """At a station: an RSA-2048 key pair whose private half may only unwrap. Returns the public SPKI DER."""
        self._refuse_duplicate(label, ObjectClass.PRIVATE_KEY)
        with _hsm(f"generate unwrap key pair {label!r}"):
            self._session.generate_keypair(
                KeyType.RSA,
                2048,
                store=True,
                label=label,
                public_template={Attribute.WRAP: True, Attribute.ENCRYPT: False, Attribute.VERIFY: False,
                                 Attribute.TOKEN: True},
                private_template={Attribute.UNWRAP: True, Attribute.DECRYPT: False, Attribute.SIGN: False,
                                  Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                  Attribute.TOKEN: True, Attribute.PRIVATE: True,
                                  Attribute.UNWRAP_TEMPLATE: _UNWRAPPED_KEY_TEMPLATE,
                                  Attribute.MODIFIABLE: False},
            )
        return self.public_key(label)

    @hsm_call("transport-key-out")
    def generate_transport_key_for(self, label: str, recipient_spki: bytes) -> tuple[bytes, bytes]:
        """In an issuing domain's token: generate a bureau's AES-256 transport key (wrap only) and hand it to the
        bureau wrapped under the station's RSA public key with OAEP. The key is wrappable for exactly that one
        call; afterwards it is made unextractable. Returns (wrapped key, KCV)."""
        recipient = rsa_public_key(recipient_spki, "recipient_spki")
        numbers = recipient.public_numbers()
        self._refuse_duplicate(label)
        # A session object that may be wrapped exactly once; then it is made unextractable and copied into the
        # token as a key that can never be modified; the session original is destroyed whatever happens.
        template = secret_key_template(Role.TRANSPORT, token=False)
        template[Attribute.EXTRACTABLE] = True
        template[Attribute.MODIFIABLE] = True  # to clear CKA_EXTRACTABLE below (a one-way change in PKCS#11)
        made: list[Any] = []
        with _hsm(f"generate transport key {label!r}"):
            try:
                key = self._session.generate_key(KeyType.AES, 256, template=template)
                made.append(key)
                pub = self._session.create_object({
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                    Attribute.KEY_TYPE: KeyType.RSA,
                    Attribute.MODULUS: _big(numbers.n),
                    Attribute.PUBLIC_EXPONENT: _big(numbers.e),
                    Attribute.WRAP: True,
                    Attribute.ENCRYPT: False,
                    Attribute.VERIFY: False,
                    Attribute.TOKEN: False,
                })
                made.append(pub)
                wrapped = pub.wrap_key(key, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_SHA1)
                key[Attribute.EXTRACTABLE] = False
                stored = key.copy({Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.MODIFIABLE: False})
                return bytes(wrapped), bytes(stored[Attribute.CHECK_VALUE])
            finally:
                _destroy_all(made)

    @hsm_call("transport-key-in")
    def accept_transport_key(self, unwrap_label: str, wrapped: bytes, label: str) -> bytes:
        """At a station: unwrap a transport key sent under our RSA key into a token object that may only unwrap.
        Returns its KCV (first 3 bytes of AES_K(0^16), the method of the issuing token's CKA_CHECK_VALUE), for the
        caller to compare with the issuer's before trusting the key.

        SoftHSM sets no CKA_CHECK_VALUE on unwrapped keys and refuses one in the template, so the KCV comes from a
        second, encrypt-only session copy that is destroyed at once."""
        self._refuse_duplicate(label)
        private = self._key(unwrap_label, ObjectClass.PRIVATE_KEY)
        template = secret_key_template(Role.STATION_TRANSPORT, token=True, label=label)
        modifiable = template.pop(Attribute.MODIFIABLE)
        template[Attribute.UNWRAP_TEMPLATE] = _UNWRAPPED_KEY_TEMPLATE
        template[Attribute.MODIFIABLE] = modifiable  # last
        probe_template = secret_key_template(Role.CARD_KEY, token=False)
        probe_template[Attribute.EXTRACTABLE] = False
        with _hsm(f"accept transport key {label!r}"):
            probe = private.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.AES, wrapped,
                mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_SHA1, template=probe_template,
            )
            try:
                kcv = bytes(probe.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)[:3])
            finally:
                probe.destroy()
            private.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.AES, wrapped,
                mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_SHA1, template=template,
            )
            return kcv

    # -- station -----------------------------------------------------------------------------------------------

    @hsm_call("unwrap")
    def unwrap_card_keys(
        self,
        transport_label: str,
        keys: Sequence[tuple[bytes, Algorithm]],
    ) -> StationKeys:
        """Unwrap sealed card keys into session objects under the station's transport key and compute each KCV.
        The caller compares KCVs and then either stores the keys (``store_station_keys``) or discards them."""
        transport = self._key(transport_label)
        made: list[Any] = []
        kcvs: list[bytes] = []
        try:
            for wrapped, algorithm in keys:
                key, kcv = self._unwrap_card_key(transport, wrapped, algorithm, None)
                made.append(key)
                kcvs.append(kcv)
        except BaseException:
            _destroy_all(made)
            raise
        return StationKeys(transport, list(keys), made, kcvs)

    def _unwrap_card_key(self, transport: Any, wrapped: bytes, algorithm: Algorithm, label: str | None
                         ) -> tuple[Any, bytes]:
        if algorithm is not Algorithm.DES2:
            raise HsmError(f"card keys of algorithm {algorithm} are not supported at the station")
        template = (_STATION_SESSION_KEY if label is None
                    else secret_key_template(Role.STATION_CARD_KEY, token=True, label=label))
        with _hsm("unwrap card key"):
            key = transport.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.DES2, wrapped, mechanism=Mechanism.AES_KEY_WRAP_PAD,
                template=template,
            )
            # The key type is the one this unwrap set: telling python-pkcs11 saves it reading CKA_KEY_TYPE back
            # before the encrypt (it uses it only to pick a default mechanism; the mechanism is named here).
            key.key_type = KeyType.DES2
            try:
                return key, bytes(key.encrypt(bytes(8), mechanism=Mechanism.DES3_ECB)[:3])
            except BaseException:
                key.destroy()
                raise

    # -- helpers -----------------------------------------------------------------------------------------------

    def _key_type(self, algorithm: Algorithm) -> Any:
        if algorithm is Algorithm.SM4:
            raise MechanismUnavailable("SM4_KEY_GEN", self.token_label)
        return _KEY_TYPES[algorithm]

    def _refuse_duplicate(self, label: str, object_class: Any = ObjectClass.SECRET_KEY) -> None:
        with _hsm(f"look up {label!r}"):
            found = list(self._session.get_objects({Attribute.LABEL: label, Attribute.CLASS: object_class}))
        if found:
            raise HsmError(f"token {self.token_label!r} already holds a key labelled {label!r}")


class StationKeys:
    """Card keys unwrapped at a station, held as session objects until stored or discarded."""

    def __init__(self, transport: Any, sealed: list[tuple[bytes, Algorithm]], keys: list[Any],
                 kcvs: list[bytes]) -> None:
        self._transport = transport
        self._sealed = sealed
        self._keys = keys
        self.kcvs = kcvs

    def discard(self) -> None:
        _destroy_all(self._keys)
        self._keys = []


def store_station_keys(session: TokenSession, groups: Sequence[tuple[StationKeys, Sequence[str]]]) -> list[Any]:
    """Store every checked key of every group as a token object with its label: all or none. The keys are
    unwrapped again straight into token objects (a copy would need them modifiable) and each stored copy's KCV
    must equal the checked one. The session copies are dropped either way. Returns the stored objects (for
    ``discard_objects`` if the caller cannot commit)."""
    stored: list[Any] = []
    try:
        for keys, labels in groups:
            if len(labels) != len(keys._sealed):
                raise HsmError("one label per key is needed to store station keys")
            for (wrapped, algorithm), kcv, label in zip(keys._sealed, keys.kcvs, labels, strict=True):
                key, stored_kcv = session._unwrap_card_key(keys._transport, wrapped, algorithm, label)
                stored.append(key)
                if stored_kcv != kcv:
                    raise HsmError("a stored card key does not match the key that was checked")
    except BaseException:
        _destroy_all(stored)
        raise
    finally:
        for keys, _ in groups:
            keys.discard()
    return stored


def discard_objects(objects: Sequence[Any]) -> None:
    """Destroy objects returned by the port (e.g. stored keys whose record could not be committed)."""
    _destroy_all(objects)


def _destroy_all(objects: Sequence[Any]) -> None:
    for obj in objects:
        try:
            obj.destroy()
        except p11e.PKCS11Error:
            continue


def _describe(obj: Any) -> KeyInfo:
    def attr(name: Attribute) -> Any:
        try:
            return obj[name]
        except p11e.PKCS11Error:
            return None

    caps = frozenset(a.name for a in _ALL_CAPS if attr(a))
    key_type = attr(Attribute.KEY_TYPE)
    return KeyInfo(
        label=attr(Attribute.LABEL) or "",
        object_class=obj.object_class.name,
        key_type=key_type.name if key_type is not None else "",
        token=bool(attr(Attribute.TOKEN)),
        sensitive=attr(Attribute.SENSITIVE),
        extractable=attr(Attribute.EXTRACTABLE),
        always_sensitive=attr(Attribute.ALWAYS_SENSITIVE),
        never_extractable=attr(Attribute.NEVER_EXTRACTABLE),
        capabilities=caps,
        wrap_with_trusted=attr(Attribute.WRAP_WITH_TRUSTED),
    )
