"""The card key engine for one domain: card identity in, signed bundle section out.

A ``DomainSealer`` holds one logged-in session on its own domain's token and nothing of the other domain. For each
card it runs every key of the profile through the HSM (derive inside the token, wrap under the bureau's transport
key, KCV, destroy), then signs the section with the domain's issuance signing key.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kms import bundle
from kms.cards.cardid import CardIdentity
from kms.cards.profiles import KeySpec, Profile
from kms.clock import Clock, rfc3339
from kms.errors import ConfigError, InvalidArgument, InvalidState, KmsError, NotFound, PermissionDenied
from kms.hsm.session import TokenSession
from kms.hsm.types import Algorithm, SignatureAlgorithm
from kms.registry import KeyKind, KeyRecord, KeyRegistry, KeyState, check_domain

SIGNING_KEY_NAME = "issuance"  # the domain's ECDSA P-256 issuance key (also signs its ceremony minutes)
#: The issuance signing key of each signature algorithm a profile may name: (key name, registry algorithm).
SIGNING_KEYS: dict[SignatureAlgorithm, tuple[str, str]] = {
    SignatureAlgorithm.ECDSA_P256_SHA256: (SIGNING_KEY_NAME, "ECDSA-P256"),
    SignatureAlgorithm.SM2_SM3: ("issuance-sm2", "SM2"),
}


def signing_key_name(algorithm: SignatureAlgorithm) -> str:
    """The name of a domain's issuance signing key for sections signed with ``algorithm``."""
    return SIGNING_KEYS[algorithm][0]


def new_serial() -> str:
    """A bundle serial: 128 random bits, hex."""
    return secrets.token_hex(16).upper()


@dataclass(frozen=True)
class _Resolved:
    spec: KeySpec
    master_label: str
    entry: dict[str, str]  # the fixed fields of this key's entry in a section

    @classmethod
    def of(cls, spec: KeySpec, master_label: str, wrap: str) -> _Resolved:
        kcv_method = bundle.KCV_METHODS.get(spec.algorithm.value)
        if kcv_method is None:
            raise ConfigError(f"key {spec.name}: {spec.algorithm} card keys are not issued")
        return cls(spec, master_label, {
            "name": spec.name, "usage": spec.usage, "algorithm": spec.algorithm.value,
            "wrap": wrap, "kcv_method": kcv_method,
        })


@dataclass(frozen=True)
class DomainKeys:
    """The registry records a domain's section needs for one profile and bureau, all checked active."""

    masters: dict[str, KeyRecord]
    transport: KeyRecord
    signing: KeyRecord

    @classmethod
    def resolve(cls, registry: KeyRegistry, domain: str, profile: Profile, bureau: str,
                pinned: Mapping[str, int] | None = None) -> DomainKeys:
        """The newest active version of each master key, or the versions ``pinned`` by the batch's authorization
        (a rotated-out version still serves its batches, re-issues included, for as long as it stays active)."""
        if not profile.keys(domain):
            raise ConfigError(f"profile {profile.name} has no keys for domain {domain}")
        masters = {name: _pinned(registry, domain, name, pinned[name]) if pinned and name in pinned
                   else registry.active(domain, KeyKind.MASTER, name) for name in profile.master_keys(domain)}
        transport = cls.transport_key(registry, domain, bureau, profile.transport(domain))
        signature = profile.signature(domain)
        name, algorithm = SIGNING_KEYS[signature]
        signing = registry.active(domain, KeyKind.SIGNING, name)
        if signing.algorithm != algorithm:
            raise ConfigError(f"{signing.label} is {signing.algorithm}, not the {algorithm} key profile "
                              f"{profile.name} signs {domain} sections with")
        if signing.public_key is None:
            raise ConfigError(f"{domain} signing key has no public key on record")
        return cls(masters, transport, signing)

    @staticmethod
    def transport_key(registry: KeyRegistry, domain: str, bureau: str,
                      algorithm: Algorithm = Algorithm.AES256) -> KeyRecord:
        """The bureau's transport key of the domain that serves sections wrapped with ``algorithm`` (the profile's
        ``transport``): its newest active version of that algorithm. A bureau may hold an AES-256 and an SM4
        transport key as versions of its one transport key name. PermissionDenied if the bureau has none there;
        InvalidState if none of that algorithm is active."""
        try:
            newest = registry.active(domain, KeyKind.TRANSPORT, bureau)
        except NotFound:
            raise PermissionDenied(f"bureau {bureau!r} has no {domain} transport key: it is not registered for "
                                   f"the {domain} domain") from None
        if newest.algorithm == algorithm.value:
            return newest
        for record in reversed(registry.versions(domain, KeyKind.TRANSPORT, bureau)):
            if record.state is KeyState.ACTIVE and record.algorithm == algorithm.value:
                return record
        raise InvalidState(f"bureau {bureau!r} has no active {algorithm} transport key in the {domain} domain "
                           f"(its newest is {newest.algorithm}): register one for it first")


def _pinned(registry: KeyRegistry, domain: str, name: str, version: int) -> KeyRecord:
    record = registry.get(domain, KeyKind.MASTER, name, version)
    if record.state is not KeyState.ACTIVE:
        raise InvalidState(f"{record.label}, the version this batch was authorized with, is {record.state.value}; "
                           "it serves no card")
    return record


class DomainSealer:
    """Seals one domain's section of a card's bundle. One per process (the token session is not thread-safe)."""

    def __init__(
        self,
        domain: str,
        session: TokenSession,
        registry: KeyRegistry,
        profile: Profile,
        bureau: str,
        clock: Clock,
        pinned: Mapping[str, int] | None = None,
    ) -> None:
        self.domain = check_domain(domain)
        self._session = session
        self._clock = clock
        self.profile = profile
        self.bureau = bureau
        resolved = DomainKeys.resolve(registry, domain, profile, bureau, pinned)
        masters = resolved.masters
        self._master_versions = {name: rec.version for name, rec in masters.items()}
        self._transport = resolved.transport
        wrap = bundle.WRAP_BY_TRANSPORT.get(self._transport.algorithm)
        if wrap is None:
            raise ConfigError(f"{self._transport.label}: {self._transport.algorithm} transport keys wrap no card key")
        self._keys = tuple(_Resolved.of(spec, masters[spec.master_key].label, wrap) for spec in profile.keys(domain))
        self._card_fields = profile.card_fields(domain)
        self._signing_label = resolved.signing.label
        self.signature_algorithm = profile.signature(domain)
        assert resolved.signing.public_key is not None
        self.signing_key_id = bundle.key_id(resolved.signing.public_key)
        for label in [r.master_label for r in self._keys] + [self._transport.label]:
            if not session.has_key(label):
                raise ConfigError(f"{domain} token {session.token_label!r} lacks key {label!r} the registry lists")
        # Each section names its wrap method from the registry; the token wraps by its key's type: they must agree.
        token_wrap = session.wrap_method(self._transport.label)
        if token_wrap != wrap:
            raise ConfigError(f"{self._transport.label}: the registry lists a {self._transport.algorithm} transport "
                              f"key ({wrap}) but the {domain} token's key of that label wraps by {token_wrap}")

        # Everything of a section that is the same for all cards of this sealer, encoded once (kms.bundle).
        header = bundle.SectionHeader(
            serial="", domain=self.domain, bureau=bureau, batch="", card_ref="", profile=profile.name,
            created_at="", master_keys=self._master_versions, transport_key=self._transport.name,
            transport_key_version=self._transport.version, transport_key_kcv=self._transport.kcv or "",
            domains=tuple(sorted(profile.domains)),
        ).to_json()
        self._template = bundle.SectionTemplate(header, [r.entry for r in self._keys], self.signing_key_id,
                                                self.signature_algorithm.value)
        # Keys that share a recipe (e.g. one HRSS chain) share its steps: each recipe once per card.
        recipes: dict[Any, list[int]] = {}  # equal recipes (frozen dataclasses) are one
        for i, key in enumerate(self._keys):
            recipes.setdefault(key.spec.recipe, []).append(i)
        self._recipes = list(recipes.items())
        self._master_labels = [r.master_label for r in self._keys]

    @property
    def key_labels(self) -> tuple[str, ...]:
        """Every registered key this sealer uses: master keys, the transport key, the signing key."""
        return (*sorted({r.master_label for r in self._keys}), self._transport.label, self._signing_label)

    @property
    def keys_per_card(self) -> int:
        return len(self._keys)

    def seal(self, card: CardIdentity, *, serial: str, batch: str) -> dict[str, Any]:
        """One signed section for this card, as a document (see seal_bytes)."""
        result: dict[str, Any] = json.loads(self.seal_bytes(card, serial=serial, batch=batch))
        return result

    def seal_bytes(self, card: CardIdentity, *, serial: str, batch: str) -> bytes:
        """One signed section for this card, canonically encoded. Raises InvalidArgument when the card lacks a
        field a recipe needs."""
        result = self.seal_many([(card, serial)], batch=batch)[0]
        if isinstance(result, KmsError):
            raise result
        return result

    def seal_many(self, cards: Sequence[tuple[CardIdentity, str]], *, batch: str) -> list[bytes | KmsError]:
        """Signed sections for several (card, serial) pairs, in order; a card that cannot be sealed gets its
        error in its place.

        The work runs in phases over the whole list — derivation inputs, then every HSM derivation, then the
        encoding, then every signature — rather than card by card: alternating Python work with the token's
        3DES, AES and ECDSA code costs measurably more (cold caches) than running each kind of work in a row.
        """
        if not batch:
            raise InvalidArgument("batch", "is required")
        plans: list[list[tuple[str, Any]] | KmsError] = []
        for card, _ in cards:
            try:
                plans.append(self._plan(card))
            except KmsError as error:
                plans.append(error)
        results = [plan if isinstance(plan, KmsError) else self._derive(plan) for plan in plans]
        created_at = rfc3339(self._clock.now())
        template = self._template
        bodies: list[bytes | KmsError] = [
            wrapped if isinstance(wrapped, KmsError) else template.body(
                serial, batch, card.card_ref, created_at, [(r.wrapped, r.kcv) for r in wrapped])
            for (card, serial), wrapped in zip(cards, results, strict=True)
        ]
        label, algorithm = self._signing_label, self.signature_algorithm
        if algorithm is SignatureAlgorithm.ECDSA_P256_SHA256:
            sign = self._session.sign_sha256  # the hash computed here (SoftHSM lacks CKM_ECDSA_SHA256)
            return [body if isinstance(body, KmsError)
                    else template.signed(body, sign(label, bundle.SIGNING_CONTEXT + body))
                    for body in bodies]
        sign_with = self._session.sign  # SM2-SM3: Z_A and SM3 in the token
        return [body if isinstance(body, KmsError)
                else template.signed(body, sign_with(label, bundle.SIGNING_CONTEXT + body, algorithm))
                for body in bodies]

    def _derive(self, plan: list[tuple[str, Any]]) -> list[Any] | KmsError:
        try:
            return self._session.derive_wrap_many(plan, self._transport.label)
        except KmsError as error:
            if error.retryable:  # the token is failing, not this card: stop the chunk, the caller may retry
                raise
            return error  # this card fails; the others of the chunk go on

    def _plan(self, card: CardIdentity) -> list[tuple[str, Any]]:
        """(master key label, derivation steps) for each key of the card."""
        card.require(self._card_fields)
        if "pan" in self._card_fields:  # a clear PAN here: the bank's workers opened it, or a card file gave it
            self.profile.check_card(card)
        labels = self._master_labels
        plan: list[tuple[str, Any]] = [("", ())] * len(labels)
        for recipe, keys in self._recipes:
            steps = recipe.steps(card)
            for i in keys:
                plan[i] = (labels[i], steps)
        return plan
