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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pkcs11
import pkcs11.exceptions as p11e
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_public_key
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from kms.errors import HsmError, HsmKeyNotFound, InvalidArgument, MechanismUnavailable
from kms.hsm import mechanisms as profiles
from kms.hsm import spki as sm2_spki
from kms.hsm.errors import _UNDECRYPTABLE, UNDECRYPTABLE, _hsm, _translate
from kms.hsm.labels import trusted_label
from kms.hsm.mechanisms import MechanismProfile
from kms.hsm.templates import (
    _ALL_CAPS,
    _CARD_KEY_DERIVE,
    _HANDOFF_UNWRAP_TEMPLATE,
    _INTERMEDIATE_DERIVE,
    _SM4_CARD_KEY_DERIVE,
    _SM4_INTERMEDIATE_DERIVE,
    _UNWRAPPED_KEY_TEMPLATE,
    _ZERO_BLOCK,
    Role,
    _attribute_mapper,
    _KeyDerivationStringData,
    secret_key_template,
)
from kms.hsm.types import Algorithm, DeriveStep, SignatureAlgorithm, wipe
from kms.metrics import hsm_call, record_hsm_call
from kms.validation import rsa_public_key

_KEY_TYPES = {Algorithm.DES2: KeyType.DES2, Algorithm.AES256: KeyType.AES}
#: python-pkcs11 looks up default capabilities by key type and has none for a vendor's: every template the port
#: passes sets each capability itself, so "none by default" changes nothing for the standard types.
_NO_DEFAULT_CAPABILITIES = 0
_P256_PARAMS = encode_named_curve_parameters("secp256r1")
_VERIFY_KEYS_KEPT = 64  # public keys ``verify`` keeps imported per session
_SM2_PARAMS = profiles.oid_der(profiles.SM2_CURVE_OID)

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
    """A loaded PKCS#11 library (one per process) and the mechanism profile its vendor codes are read with
    (kms.hsm.mechanisms; the standard profile, without SM codes, unless one is given)."""

    def __init__(self, path: str, mechanisms: MechanismProfile | None = None) -> None:
        self.path = path
        self.mechanisms = mechanisms if mechanisms is not None else profiles.load(profiles.STANDARD)
        try:
            self._lib = pkcs11.lib(path)
        except (RuntimeError, OSError, p11e.PKCS11Error) as error:
            raise HsmError(f"cannot load PKCS#11 module {path}: {type(error).__name__}") from None

    def with_mechanisms(self, mechanisms: MechanismProfile) -> Module:
        """The same loaded library read with another mechanism profile (C_Initialize runs once per library and
        process, so a second ``Module`` of the same path cannot load it again)."""
        other = object.__new__(Module)
        other.path, other.mechanisms, other._lib = self.path, mechanisms, self._lib
        return other

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
        return TokenSession(token_label, session, self.mechanisms)

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


class WrappedKey(NamedTuple):
    """A card key wrapped under a transport key, and its KCV (a tuple: made for every card key)."""

    wrapped: bytes
    kcv: bytes
    wrap: str = "AES-KWP"  # how ``wrapped`` was made: "AES-KWP" (RFC 5649) or "SM4-ECB" (the transport key's kind)


@dataclass(frozen=True)
class _Derivation:
    """How one kind of derivation step runs in this token (built once per session and kind)."""

    mechanism: Any  # the ECB-encrypt-data derivation
    key_type: Any  # of the parent and of the derived key
    algorithm: Algorithm
    intermediate: dict[Any, Any]  # templates
    card: dict[Any, Any]
    kcv_mechanism: Any  # ECB encryption of a zero block: the KCV (SoftHSM's CKA_CHECK_VALUE of derived keys is wrong)
    zero: bytes


class TokenSession:
    """A logged-in session on one token, with the domain verbs. Not thread-safe; close() when done."""

    def __init__(self, token_label: str, session: Any, mechanisms: MechanismProfile | None = None) -> None:
        self.token_label = token_label
        self._session = session
        self._keys: dict[tuple[Any, str], Any] = {}  # (object class, label) -> key object
        self._mechanisms: frozenset[str] | None = None
        #: The mechanism profile this token's vendor codes are read with (kms.hsm.mechanisms).
        self.profile = mechanisms if mechanisms is not None else profiles.load(profiles.STANDARD)
        # python-pkcs11 takes a vendor code only as a member-less instance of its enum (int.__new__).
        self._vendor: dict[str, Any] = {name: int.__new__(Mechanism, code)
                                        for name, code in self.profile.codes.items() if name in profiles.MECHANISMS}
        ckk_sm4 = self.profile.code("CKK_SM4")
        self._ckk_sm4: Any = int.__new__(KeyType, ckk_sm4) if ckk_sm4 is not None else None
        sm2 = self.profile.sm2_key
        self._sm2_key_type: Any = (None if sm2 is None else KeyType.EC if sm2.key_type is None
                                   else int.__new__(KeyType, sm2.key_type))
        self._sm2_params = sm2.ec_params if sm2 is not None else _SM2_PARAMS
        self._derivations: dict[DeriveStep, _Derivation] = {DeriveStep.DES3_ECB: _Derivation(
            Mechanism.DES3_ECB_ENCRYPT_DATA, KeyType.DES2, Algorithm.DES2, _INTERMEDIATE_DERIVE, _CARD_KEY_DERIVE,
            Mechanism.DES3_ECB, _ZERO_BLOCK)}
        self._verify_keys: dict[tuple[SignatureAlgorithm, bytes], Any] = {}  # public keys imported to verify
        self._signing_params: dict[str, bytes] = {}  # label -> CKA_EC_PARAMS of a signing key
        # The hot path's reads, once per session: (transport key label) -> (key, wrap mechanism, its name), and the
        # (master key label, kind of step) pairs whose key type was checked.
        self._wrap_keys: dict[str, tuple[Any, Any, str]] = {}
        self._derives_from: set[tuple[str, DeriveStep]] = set()

    # -- housekeeping ------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._keys.clear()
        self._verify_keys.clear()  # session objects: gone with the session
        self._signing_params.clear()
        self._wrap_keys.clear()
        self._derives_from.clear()
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
        """The names of the mechanisms the token lists: python-pkcs11's names of standard ones, and kms's names
        (``SM4_ECB``, ``SM2_SM3``, …) of the vendor codes the mechanism profile names. Other vendor codes are left
        out."""
        if self._mechanisms is None:
            with _hsm("list mechanisms"):
                listed = self._session.token.slot.get_mechanisms()
            vendor = self.profile.mechanism_names
            names = set()
            for mechanism in listed:
                name = vendor.get(int(mechanism))
                if name is None and isinstance(mechanism, Mechanism):
                    name = mechanism.name
                if name is not None:
                    names.add(name)
            self._mechanisms = frozenset(names)
        return self._mechanisms

    def require(self, mechanism: str) -> None:
        """Raise MechanismUnavailable unless the token offers this mechanism: a standard one python-pkcs11 knows, or
        one the mechanism profile names a code for."""
        if mechanism not in self.mechanisms() or not (mechanism in self._vendor or hasattr(Mechanism, mechanism)):
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
                infos.append(_describe(obj, self._key_type_name))
        return infos

    @hsm_call("destroy")
    def destroy(self, label: str, object_class: str = "secret") -> None:
        cls = {"secret": ObjectClass.SECRET_KEY, "private": ObjectClass.PRIVATE_KEY,
               "public": ObjectClass.PUBLIC_KEY}[object_class]
        key = self._key(label, cls)
        with _hsm(f"destroy key {label!r}"):
            key.destroy()
        self._keys.pop((cls, label), None)
        self._signing_params.pop(label, None)
        if cls is ObjectClass.SECRET_KEY:  # what the hot path worked out about the key goes with it
            self._wrap_keys.pop(label, None)
            for kind in DeriveStep:
                self._derives_from.discard((label, kind))

    # -- master keys -------------------------------------------------------------------------------------------

    def generate_master_key(self, label: str, algorithm: Algorithm, *, escrow: bool = False) -> bytes:
        """Generate a token-resident, derive-only master key; returns its KCV (the token's CKA_CHECK_VALUE:
        TDES-ECB-ZERO8-3, or SM4-ECB-ZERO16-3 for SM4). With ``escrow`` the key can later be exported as
        components, but only through the trusted custody key (CKA_WRAP_WITH_TRUSTED). SM4 needs a mechanism profile
        and token with SM4_KEY_GEN (else MechanismUnavailable)."""
        return self._generate(label, Role.MASTER_ESCROWABLE if escrow else Role.MASTER, algorithm)

    def generate_transport_key(self, label: str, *, escrow: bool = False,
                               algorithm: Algorithm = Algorithm.AES256) -> bytes:
        """Generate a wrap-only transport key (AES-256, or SM4) in the token; returns its KCV."""
        _transport_algorithm(algorithm)
        return self._generate(label, Role.TRANSPORT_ESCROWABLE if escrow else Role.TRANSPORT, algorithm)

    @hsm_call("generate")
    def _generate(self, label: str, role: Role, algorithm: Algorithm) -> bytes:
        self._refuse_duplicate(label)
        key_type = self._key_type(algorithm, "SM4_KEY_GEN")
        with _hsm(f"generate key {label!r}"):
            if algorithm is Algorithm.SM4:
                key = self._session.generate_key(
                    key_type, 128, mechanism=self._vendor["SM4_KEY_GEN"], capabilities=_NO_DEFAULT_CAPABILITIES,
                    template=secret_key_template(role, token=True, label=label),
                )
            else:
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

    def import_transport_key(self, label: str, value: bytearray, *, token: bool = True, escrow: bool = False,
                             algorithm: Algorithm = Algorithm.AES256) -> bytes:
        """Create a wrap-only transport key (AES-256, or SM4) from clear bytes (bureau components, or a self-test
        KEK) and wipe them. Returns its KCV."""
        try:
            _transport_algorithm(algorithm)
        except HsmError:
            wipe(value)
            raise
        return self._import(label, Role.TRANSPORT_ESCROWABLE if escrow else Role.TRANSPORT, algorithm, value, token)

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
            template = {Attribute.CLASS: ObjectClass.SECRET_KEY,
                        Attribute.KEY_TYPE: self._key_type(algorithm, "SM4_ECB"), Attribute.VALUE: bytes(value)}
            template.update(secret_key_template(role, token=token, label=label))  # CKA_MODIFIABLE stays last
            with _hsm(f"import key {label!r}"):
                key = self._session.create_object(template)
                return bytes(key[Attribute.CHECK_VALUE])
        finally:
            wipe(value)

    # -- the hot path ------------------------------------------------------------------------------------------

    def derive_wrap(
        self,
        master_label: str,
        steps: Sequence[tuple[DeriveStep, bytes]],
        transport_label: str,
    ) -> WrappedKey:
        """Derive a per-card key inside the token through ``steps``, wrap it under the transport key by the
        transport key's algorithm (AES key wrap with padding, RFC 5649, under AES; SM4-ECB under SM4), compute its
        KCV by the card key's algorithm (TDES-ECB-ZERO8-3, SM4-ECB-ZERO16-3), and destroy every key the derivation
        made.

        Every step is of the master key's algorithm (``DES3_ECB`` steps from a DES2 master give a DES2 card key,
        ``SM4_ECB`` steps from an SM4 master an SM4 one); SM4 needs a mechanism profile and token offering
        SM4_ECB_ENCRYPT_DATA and SM4_ECB (else MechanismUnavailable naming the mechanism and the token).

        The per-card key is a sensitive session object that lives only for this call."""
        return self.derive_wrap_many(((master_label, steps),), transport_label)[0]

    def derive_wrap_many(
        self,
        keys: Sequence[tuple[str, Sequence[tuple[DeriveStep, bytes]]]],
        transport_label: str,
    ) -> list[WrappedKey]:
        """``derive_wrap`` for each (master key label, steps) of ``keys`` in turn, all under one transport key: the
        sealer's hot path (a card's keys). The same token calls and checks as one ``derive_wrap`` per key, each key
        timed as one "derive-wrap" HSM call; what does not change from key to key (the key objects, the wrap
        mechanism, a master key's type checked against its steps) is worked out once per session, not per key.
        The first key that fails raises (the keys before it were destroyed already, as each key's own are)."""
        results = []
        for master_label, steps in keys:
            started = time.perf_counter()
            try:
                results.append(self._derive_wrap(master_label, steps, transport_label))
            except Exception as error:
                record_hsm_call("derive-wrap", time.perf_counter() - started, type(error).__name__)
                raise
            record_hsm_call("derive-wrap", time.perf_counter() - started)
        return results

    def _derive_wrap(self, master_label: str, steps: Sequence[tuple[DeriveStep, bytes]], transport_label: str
                     ) -> WrappedKey:
        last = len(steps) - 1
        if not 0 <= last <= 2:
            raise HsmError("a derivation has 1 to 3 steps")
        kind = steps[0][0]
        for step, _ in steps:
            if step is not kind:
                raise HsmError("a derivation's steps are all of one algorithm (a step derives from a key of its own "
                               "algorithm)")
        derivation = self._derivation(kind)
        master = self._key(master_label)
        made: list[Any] = []
        try:
            transport, wrap, wrap_name = self._wrapping(transport_label)
            if (master_label, kind) not in self._derives_from:
                if master.key_type != derivation.key_type:
                    raise HsmError(f"{kind.value} steps derive from a {derivation.algorithm} key; {master_label!r} "
                                   f"in token {self.token_label!r} is not one")
                if not hasattr(master, "derive_key"):  # python-pkcs11 gives the method only to a key that may derive
                    raise HsmError(f"{master_label!r} in token {self.token_label!r} is not a master key here (it may "
                                   "not derive)")
                self._derives_from.add((master_label, kind))
            parent = master
            for i, (_step, data) in enumerate(steps):
                buf = ctypes.create_string_buffer(data, len(data))  # alive until the call returns
                parent = parent.derive_key(
                    derivation.key_type, 128, mechanism=derivation.mechanism,
                    mechanism_param=bytes(_KeyDerivationStringData(ctypes.addressof(buf), len(data))),
                    template=derivation.card if i == last else derivation.intermediate,
                    capabilities=_NO_DEFAULT_CAPABILITIES,
                )
                made.append(parent)
                parent.key_type = derivation.key_type  # known: python-pkcs11 need not read it back
            kcv = parent.encrypt(derivation.zero, mechanism=derivation.kcv_mechanism)[:3]
            wrapped = transport.wrap_key(parent, mechanism=wrap)
        except p11e.PKCS11Error as error:
            raise _translate(error, f"derive from {master_label!r} and wrap under {transport_label!r}") from None
        finally:
            _destroy_all(made)
        return WrappedKey(wrapped, kcv, wrap_name)

    def wrap_method(self, transport_label: str) -> str:
        """How ``derive_wrap`` wraps under the transport key with this label, as a section names it: AES-KWP under an
        AES key, SM4-ECB under an SM4 one (HsmError if the key is neither or may not wrap)."""
        return self._wrapping(transport_label)[2]

    def _wrapping(self, transport_label: str) -> tuple[Any, Any, str]:
        """(key object, wrap mechanism, its name in a section) of a transport key: read once per session."""
        found = self._wrap_keys.get(transport_label)
        if found is None:
            transport = self._key(transport_label)
            wrap, wrap_name = self._wrap_mechanism(transport, repr(transport_label))
            found = self._wrap_keys[transport_label] = (transport, wrap, wrap_name)
        return found

    # -- signing -----------------------------------------------------------------------------------------------

    @hsm_call("generate")
    def generate_signing_key(self, label: str,
                             algorithm: SignatureAlgorithm = SignatureAlgorithm.ECDSA_P256_SHA256) -> bytes:
        """A signing key pair as token objects; returns the public key as SubjectPublicKeyInfo DER. ECDSA P-256, or
        SM2 (a key on the SM2 curve of the kind the mechanism profile names; its SPKI is id-ecPublicKey with the SM2
        curve, which OpenSSL 3 reads as an SM2 key). SM2 needs the profile and token to offer SM2_SM3."""
        self._refuse_duplicate(label, ObjectClass.PRIVATE_KEY)
        key_type, mechanism, params = KeyType.EC, None, _P256_PARAMS
        if algorithm is SignatureAlgorithm.SM2_SM3:
            self.require("SM2_SM3")
            key_type, params = self._sm2_key_type, self._sm2_params
            if key_type == KeyType.EC:
                self.require("EC_KEY_PAIR_GEN")
            else:
                self.require("SM2_KEY_PAIR_GEN")
                mechanism = self._vendor["SM2_KEY_PAIR_GEN"]
        with _hsm(f"generate signing key {label!r}"):
            domain = self._session.create_domain_parameters(key_type, {Attribute.EC_PARAMS: params}, local=True)
            public, _private = domain.generate_keypair(
                store=True,
                label=label,
                mechanism=mechanism,
                capabilities=None if key_type == KeyType.EC else _NO_DEFAULT_CAPABILITIES,
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
            if algorithm is SignatureAlgorithm.SM2_SM3:
                return sm2_spki.sm2_spki(sm2_spki.point_of_attribute(bytes(public[Attribute.EC_POINT])))
            return bytes(encode_ec_public_key(public))

    def public_key(self, label: str) -> bytes:
        """SubjectPublicKeyInfo DER of the public key with this label (EC P-256, SM2 or RSA)."""
        key = self._key(label, ObjectClass.PUBLIC_KEY)
        with _hsm(f"read public key {label!r}"):
            key_type = key.key_type
            if key_type == KeyType.EC or (self._sm2_key_type is not None and key_type == self._sm2_key_type):
                if bytes(key[Attribute.EC_PARAMS]) == self._sm2_params:
                    return sm2_spki.sm2_spki(sm2_spki.point_of_attribute(bytes(key[Attribute.EC_POINT])))
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
        return self._sign_ecdsa(label, message)

    @hsm_call("sign")
    def sign(self, label: str, message: bytes, algorithm: SignatureAlgorithm) -> bytes:
        """Sign ``message`` with the private key of this label: ECDSA P-256 over SHA-256(message), or SM2 over
        SM3(Z_A ‖ message) with the GM/T 0009 default ID (computed in the token, SM2_SM3). Returns r ‖ s, 64 bytes.
        A key not on the algorithm's curve is refused (HsmError)."""
        if algorithm is SignatureAlgorithm.ECDSA_P256_SHA256:
            self._check_curve(label, self._key(label, ObjectClass.PRIVATE_KEY), _P256_PARAMS, algorithm)
            return self._sign_ecdsa(label, message)
        self.require("SM2_SM3")
        key = self._key(label, ObjectClass.PRIVATE_KEY)
        self._check_curve(label, key, self._sm2_params, algorithm)
        with _hsm(f"sign with {label!r}"):
            return bytes(key.sign(message, mechanism=self._vendor["SM2_SM3"]))

    def _sign_ecdsa(self, label: str, message: bytes) -> bytes:
        key = self._key(label, ObjectClass.PRIVATE_KEY)
        digest = hashlib.sha256(message).digest()
        with _hsm(f"sign with {label!r}"):
            return bytes(key.sign(digest, mechanism=Mechanism.ECDSA))

    def _check_curve(self, label: str, key: Any, params: bytes, algorithm: SignatureAlgorithm) -> None:
        known = self._signing_params.get(label)
        if known is None:
            with _hsm(f"read key {label!r}"):
                known = self._signing_params[label] = bytes(key[Attribute.EC_PARAMS])
        if known != params:
            raise HsmError(f"{label!r} in token {self.token_label!r} is not a key for {algorithm}")

    @hsm_call("verify")
    def verify(self, spki: bytes, message: bytes, signature: bytes, algorithm: SignatureAlgorithm) -> bool:
        """Whether ``signature`` (r ‖ s) is a valid ``algorithm`` signature of ``message`` by the public key
        ``spki`` (SubjectPublicKeyInfo DER), checked in this token: the public key is imported as a session object
        (kept for this session's later calls). For SM2 this is how kms verifies at all (``cryptography`` has no SM2).
        A key that is not of the algorithm is InvalidArgument naming ``public_key``."""
        key = self._verify_keys.get((algorithm, spki))
        if key is None:
            if len(self._verify_keys) >= _VERIFY_KEYS_KEPT:  # a station trusts a few keys; never grow unbounded
                _destroy_all(list(self._verify_keys.values()))
                self._verify_keys.clear()
            key = self._verify_keys[(algorithm, spki)] = self._import_public_key(spki, algorithm)
        if algorithm is SignatureAlgorithm.SM2_SM3:
            data, mechanism = message, self._vendor["SM2_SM3"]
        else:
            data, mechanism = hashlib.sha256(message).digest(), Mechanism.ECDSA
        with _hsm("verify a signature"):
            return bool(key.verify(data, signature, mechanism=mechanism))

    def _import_public_key(self, spki: bytes, algorithm: SignatureAlgorithm) -> Any:
        if algorithm is SignatureAlgorithm.SM2_SM3:
            self.require("SM2_SM3")
            point, key_type, params = sm2_spki.sm2_point(spki), self._sm2_key_type, self._sm2_params
        else:
            point, key_type, params = _p256_point(spki), KeyType.EC, _P256_PARAMS
        with _hsm("import a public key to verify with"):
            return self._session.create_object({
                Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: key_type, Attribute.TOKEN: False,
                Attribute.PRIVATE: False, Attribute.EC_PARAMS: params,
                Attribute.EC_POINT: sm2_spki.ec_point_attribute(point), Attribute.VERIFY: True,
            })

    @hsm_call("digest")
    def digest_sm3(self, data: bytes) -> bytes:
        """SM3(data), 32 bytes, computed in the token (needs SM3 in the mechanism profile and token)."""
        self.require("SM3")
        with _hsm("SM3 digest"):
            return bytes(self._session.digest(data, mechanism=self._vendor["SM3"]))

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
        """At a station: an RSA-2048 key pair whose private half may only unwrap, for one transport key hand-off
        (``accept_transport_key`` destroys it once it unwrapped that key). Returns the public SPKI DER."""
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
                                  Attribute.UNWRAP_TEMPLATE: _HANDOFF_UNWRAP_TEMPLATE,
                                  Attribute.MODIFIABLE: False},
            )
        return self.public_key(label)

    @hsm_call("transport-key-out")
    def generate_transport_key_for(self, label: str, recipient_spki: bytes,
                                   algorithm: Algorithm = Algorithm.AES256) -> tuple[bytes, bytes]:
        """In an issuing domain's token: generate a bureau's transport key (AES-256, or SM4; wrap only) and hand it
        to the bureau wrapped under the station's RSA public key with OAEP. The key is wrappable for exactly that one
        call; afterwards it is made unextractable. Returns (wrapped key, KCV: AES- or SM4-ECB-ZERO16-3)."""
        recipient = rsa_public_key(recipient_spki, "recipient_spki")
        numbers = recipient.public_numbers()
        _transport_algorithm(algorithm)
        key_type = self._key_type(algorithm, "SM4_KEY_GEN")
        self._refuse_duplicate(label)
        # A session object that may be wrapped exactly once; then it is made unextractable and copied into the
        # token as a key that can never be modified; the session original is destroyed whatever happens.
        template = secret_key_template(Role.TRANSPORT, token=False)
        template[Attribute.EXTRACTABLE] = True
        template[Attribute.MODIFIABLE] = True  # to clear CKA_EXTRACTABLE below (a one-way change in PKCS#11)
        made: list[Any] = []
        with _hsm(f"generate transport key {label!r}"):
            try:
                if algorithm is Algorithm.SM4:
                    key = self._session.generate_key(key_type, 128, mechanism=self._vendor["SM4_KEY_GEN"],
                                                     capabilities=_NO_DEFAULT_CAPABILITIES, template=template)
                else:
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
    def accept_transport_key(self, unwrap_label: str, wrapped: bytes, label: str,
                             algorithm: Algorithm = Algorithm.AES256) -> bytes:
        """At a station: unwrap a transport key (AES-256, or SM4) sent under our RSA key into a token object that
        may only unwrap. Returns its KCV (first 3 bytes of AES_K(0^16) or SM4_K(0^16), the method of the issuing
        token's CKA_CHECK_VALUE), for the caller to compare with the issuer's before trusting the key.

        SoftHSM sets no CKA_CHECK_VALUE on unwrapped keys and refuses one in the template, so the KCV comes from a
        second, encrypt-only session copy that is destroyed at once.

        The unwrap key pair is single use: once the wrapped bytes have been unwrapped (the KCV copy made), both its
        halves are destroyed, whether the key then reaches the token or not, so the same bytes can never be
        unwrapped again (review finding F1: a PIN holder who kept them could otherwise unwrap an unwrap-capable copy
        without CKA_UNWRAP_TEMPLATE and read card keys with it). Bytes that do not unwrap leave the pair in place."""
        _transport_algorithm(algorithm)
        key_type = self._key_type(algorithm, "SM4_ECB")
        kcv_mechanism, zero = self._kcv_mechanism(algorithm)
        if self._has(label, ObjectClass.SECRET_KEY):
            # An earlier acceptance got as far as the token and was interrupted before it destroyed the pair (the
            # station killed): the pair has served its hand-off, destroy it now (review revD-2).
            self._destroy_unwrap_pair(unwrap_label)
            raise HsmError(f"token {self.token_label!r} already holds a key labelled {label!r} (an interrupted "
                           "acceptance): its unwrap key is destroyed; remove that key and hand the transport key "
                           "over again (a new unwrap-key and register-transport-key ceremony)")
        private = self._key(unwrap_label, ObjectClass.PRIVATE_KEY)
        template = secret_key_template(Role.STATION_TRANSPORT, token=True, label=label)
        modifiable = template.pop(Attribute.MODIFIABLE)
        template[Attribute.UNWRAP_TEMPLATE] = _UNWRAPPED_KEY_TEMPLATE
        template[Attribute.MODIFIABLE] = modifiable  # last
        probe_template = secret_key_template(Role.CARD_KEY, token=False)
        probe_template[Attribute.EXTRACTABLE] = False
        with _hsm(f"accept transport key {label!r}"):
            probe = private.unwrap_key(
                ObjectClass.SECRET_KEY, key_type, wrapped, mechanism=Mechanism.RSA_PKCS_OAEP,
                mechanism_param=_OAEP_SHA1, template=probe_template, capabilities=_NO_DEFAULT_CAPABILITIES,
            )
            try:
                try:
                    probe.key_type = key_type
                    kcv = bytes(probe.encrypt(zero, mechanism=kcv_mechanism)[:3])
                finally:
                    probe.destroy()
                private.unwrap_key(
                    ObjectClass.SECRET_KEY, key_type, wrapped, mechanism=Mechanism.RSA_PKCS_OAEP,
                    mechanism_param=_OAEP_SHA1, template=template, capabilities=_NO_DEFAULT_CAPABILITIES,
                )
            finally:
                self._destroy_unwrap_pair(unwrap_label)
            return kcv

    def retire_unwrap_pair(self, label: str) -> bool:
        """At a station: destroy both halves of the hand-off key pair ``label`` if the token holds either; returns
        whether it held one (the long-lived pair of a kms before single-use hand-off keys, retired on upgrade)."""
        held = self._has(label, ObjectClass.PRIVATE_KEY) or self._has(label, ObjectClass.PUBLIC_KEY)
        if held:
            with _hsm(f"destroy the unwrap key pair {label!r}"):
                self._destroy_unwrap_pair(label)
        return held

    def _destroy_unwrap_pair(self, label: str) -> None:
        """Both halves of a station's hand-off key pair (the public one may be gone already)."""
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            if self._has(label, cls):
                key = self._key(label, cls)
                key.destroy()
                self._keys.pop((cls, label), None)

    def unwrap_keys(self, prefix: str) -> dict[str, bytes]:
        """At a station: the hand-off key pairs whose label is ``prefix`` or starts with ``prefix/``, by label, with
        their public key (SPKI DER)."""
        with _hsm("list unwrap keys"):
            labels = {obj.label for obj in self._session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY})}
        found = sorted(label for label in labels if label == prefix or label.startswith(prefix + "/"))
        return {label: self.public_key(label) for label in found if self._has(label, ObjectClass.PRIVATE_KEY)}

    # -- station -----------------------------------------------------------------------------------------------

    @hsm_call("unwrap")
    def unwrap_card_keys(
        self,
        transport_label: str,
        keys: Sequence[tuple[bytes, Algorithm]],
    ) -> StationKeys:
        """Unwrap sealed card keys under the station's transport key and compute each KCV. Each key lives as a
        session object only while its KCV is computed: it is destroyed at once (storing unwraps the sealed keys
        again, straight into token objects: ``store_station_keys``), so nothing is left in the token whatever the
        caller does next. The caller compares the KCVs and may then store the keys."""
        transport = self._key(transport_label)
        kinds = {algorithm: self._card_key_kind(algorithm) for algorithm in {a for _, a in keys}}
        kcvs: list[bytes] = []
        with _hsm("unwrap card key"):
            wrap, _ = self._wrap_mechanism(transport, "the station's transport key", "unwrap_key")
            for wrapped, algorithm in keys:
                key_type, kcv_mechanism, zero = kinds[algorithm]
                key = transport.unwrap_key(ObjectClass.SECRET_KEY, key_type, wrapped, mechanism=wrap,
                                           template=_STATION_SESSION_KEY, capabilities=_NO_DEFAULT_CAPABILITIES)
                try:
                    key.key_type = key_type  # the type this unwrap set (saves python-pkcs11 reading it back)
                    kcvs.append(bytes(key.encrypt(zero, mechanism=kcv_mechanism)[:3]))
                finally:
                    key.destroy()
        return StationKeys(transport, list(keys), kcvs)

    def transport_wrap(self, label: str) -> str:
        """How card keys sealed under the transport key with this label are wrapped, as a section names it:
        AES-KWP under an AES key, SM4-ECB under an SM4 one (HsmError if the key is neither or cannot unwrap)."""
        transport = self._key(label)
        with _hsm(f"read transport key {label!r}"):
            return self._wrap_mechanism(transport, "the station's transport key", "unwrap_key")[1]

    def _card_key_kind(self, algorithm: Algorithm) -> tuple[Any, Any, bytes]:
        """A station card key's type, KCV mechanism and zero block; HsmError for an algorithm a card key is not."""
        if algorithm not in (Algorithm.DES2, Algorithm.SM4):
            raise HsmError(f"card keys of algorithm {algorithm} are not supported at the station")
        return (self._key_type(algorithm, "SM4_ECB"), *self._kcv_mechanism(algorithm))

    def _unwrap_card_key(self, transport: Any, wrapped: bytes, algorithm: Algorithm, label: str | None
                         ) -> tuple[Any, bytes]:
        """One card key unwrapped by the transport key's algorithm (AES-KWP or SM4-ECB) as a token object labelled
        ``label`` (a session object if None), and its KCV by the card key's (TDES-ECB-ZERO8-3 or SM4-ECB-ZERO16-3)."""
        key_type, kcv_mechanism, zero = self._card_key_kind(algorithm)
        template = (_STATION_SESSION_KEY if label is None
                    else secret_key_template(Role.STATION_CARD_KEY, token=True, label=label))
        with _hsm("unwrap card key"):
            wrap, _ = self._wrap_mechanism(transport, "the station's transport key", "unwrap_key")
            key = transport.unwrap_key(
                ObjectClass.SECRET_KEY, key_type, wrapped, mechanism=wrap, template=template,
                capabilities=_NO_DEFAULT_CAPABILITIES,
            )
            # The key type is the one this unwrap set: telling python-pkcs11 saves it reading CKA_KEY_TYPE back
            # before the encrypt (it uses it only to pick a default mechanism; the mechanism is named here).
            key.key_type = key_type
            try:
                return key, bytes(key.encrypt(zero, mechanism=kcv_mechanism)[:3])
            except BaseException:
                key.destroy()
                raise

    # -- helpers -----------------------------------------------------------------------------------------------

    def _key_type(self, algorithm: Algorithm, needs: str = "SM4_ECB") -> Any:
        """The token's key type of an algorithm; for SM4 (a vendor key type) only if the token offers ``needs``."""
        if algorithm is Algorithm.SM4:
            self.require(needs)
            return self._ckk_sm4
        return _KEY_TYPES[algorithm]

    def _kcv_mechanism(self, algorithm: Algorithm) -> tuple[Any, bytes]:
        """The ECB mechanism and zero block whose first 3 bytes of ciphertext are a key's KCV (KcvMethod.of)."""
        if algorithm is Algorithm.DES2:
            return Mechanism.DES3_ECB, _ZERO_BLOCK
        if algorithm is Algorithm.AES256:
            return Mechanism.AES_ECB, bytes(16)
        self.require("SM4_ECB")
        return self._vendor["SM4_ECB"], bytes(16)

    def _wrap_mechanism(self, transport: Any, what: str, use: str = "wrap_key") -> tuple[Any, str]:
        """Card keys are wrapped by the transport key's own algorithm: AES key wrap with padding (RFC 5649) under
        an AES key, SM4-ECB under an SM4 key (card keys are 16 bytes: no padding). ``use``: what the key must be able
        to do (python-pkcs11 gives a key the method only if the token says it may)."""
        if not hasattr(transport, use):
            raise HsmError(f"{what} in token {self.token_label!r} is not a transport key here (it may not "
                           f"{use.partition('_')[0]})")
        key_type = transport.key_type  # read once per key object (cached by python-pkcs11)
        if key_type == KeyType.AES:
            return Mechanism.AES_KEY_WRAP_PAD, "AES-KWP"
        if self._ckk_sm4 is not None and key_type == self._ckk_sm4:
            self.require("SM4_ECB")
            return self._vendor["SM4_ECB"], "SM4-ECB"
        if self._ckk_sm4 is None and int(key_type) >= profiles.VENDOR_DEFINED:
            # A vendor key type (an SM4 key: the only one kms makes a transport key of) read with a mechanism profile
            # that names no SM4: this process's configuration lacks SM4, the key is not wrong (review s23: a station
            # refused every SM4-ECB section as "bundle rejected" instead of saying so).
            raise MechanismUnavailable("SM4_ECB", self.token_label, f"{what} (a key of a vendor type, 0x"
                                       f"{int(key_type):08X}, that the mechanism profile {self.profile.name!r} "
                                       "does not name)")
        raise HsmError(f"{what} in token {self.token_label!r} is not a transport key (AES or SM4)")

    def _derivation(self, step: DeriveStep) -> _Derivation:
        derivation = self._derivations.get(step)
        if derivation is None:  # SM4: built once the token is known to offer both mechanisms
            self.require(step.value)
            self.require("SM4_ECB")
            derivation = self._derivations[step] = _Derivation(
                self._vendor[step.value], self._ckk_sm4, Algorithm.SM4, _SM4_INTERMEDIATE_DERIVE,
                _SM4_CARD_KEY_DERIVE, self._vendor["SM4_ECB"], bytes(16))
        return derivation

    def _key_type_name(self, key_type: Any) -> str:
        """A key type's name: python-pkcs11's, or "SM4" for the profile's SM4 key type, or the vendor code."""
        if self._ckk_sm4 is not None and key_type == self._ckk_sm4:
            return "SM4"
        if self._sm2_key_type is not None and self._sm2_key_type != KeyType.EC and key_type == self._sm2_key_type:
            return "SM2"
        member = KeyType._value2member_map_.get(int(key_type))
        return member.name if isinstance(member, KeyType) else f"0x{int(key_type):08X}"

    def _refuse_duplicate(self, label: str, object_class: Any = ObjectClass.SECRET_KEY) -> None:
        with _hsm(f"look up {label!r}"):
            found = list(self._session.get_objects({Attribute.LABEL: label, Attribute.CLASS: object_class}))
        if found:
            raise HsmError(f"token {self.token_label!r} already holds a key labelled {label!r}")


def _transport_algorithm(algorithm: Algorithm) -> None:
    if algorithm not in (Algorithm.AES256, Algorithm.SM4):
        raise HsmError(f"transport keys are AES-256 or SM4, not {algorithm}")


def _p256_point(spki: bytes) -> bytes:
    """The uncompressed point of an ECDSA P-256 SPKI; InvalidArgument naming ``public_key`` for anything else."""
    try:
        public = load_der_public_key(spki)
    except (ValueError, UnsupportedAlgorithm):
        public = None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise InvalidArgument("public_key", "is not an ECDSA P-256 public key (SubjectPublicKeyInfo DER)")
    return public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


class StationKeys:
    """Card keys checked at a station: the sealed keys and the KCVs the token computed for them (the unwrapped
    session objects are already gone: ``TokenSession.unwrap_card_keys``)."""

    def __init__(self, transport: Any, sealed: list[tuple[bytes, Algorithm]], kcvs: list[bytes]) -> None:
        self._transport = transport
        self._sealed = sealed
        self.kcvs = kcvs


def store_station_keys(session: TokenSession, groups: Sequence[tuple[StationKeys, Sequence[str]]]) -> list[Any]:
    """Store every checked key of every group as a token object with its label: all or none. The sealed keys are
    unwrapped again straight into token objects and each stored copy's KCV must equal the checked one. Returns the
    stored objects (for ``discard_objects`` if the caller cannot commit)."""
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


def _describe(obj: Any, key_type_name: Callable[[Any], str]) -> KeyInfo:
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
        key_type=key_type_name(key_type) if key_type is not None else "",
        token=bool(attr(Attribute.TOKEN)),
        sensitive=attr(Attribute.SENSITIVE),
        extractable=attr(Attribute.EXTRACTABLE),
        always_sensitive=attr(Attribute.ALWAYS_SENSITIVE),
        never_extractable=attr(Attribute.NEVER_EXTRACTABLE),
        capabilities=caps,
        wrap_with_trusted=attr(Attribute.WRAP_WITH_TRUSTED),
    )
