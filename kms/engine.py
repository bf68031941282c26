"""The card key engine for one domain: card identity in, signed bundle section out.

A ``DomainSealer`` holds one logged-in session on its own domain's token and nothing of the other domain. For each
card it runs every key of the profile through the HSM (derive inside the token, wrap under the bureau's transport
key, KCV, destroy), then signs the section with the domain's issuance signing key.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from kms import bundle
from kms.cardid import CardIdentity
from kms.clock import Clock, rfc3339
from kms.errors import ConfigError, InvalidArgument, NotFound, PermissionDenied
from kms.hsm import KcvMethod, TokenSession
from kms.profiles import KeySpec, Profile
from kms.registry import KeyKind, KeyRecord, KeyRegistry, check_domain

SIGNING_KEY_NAME = "issuance"


def new_serial() -> str:
    """A bundle serial: 128 random bits, hex."""
    return secrets.token_hex(16).upper()


@dataclass(frozen=True)
class _Resolved:
    spec: KeySpec
    master_label: str


@dataclass(frozen=True)
class DomainKeys:
    """The registry records a domain's section needs for one profile and bureau, all checked active."""

    masters: dict[str, KeyRecord]
    transport: KeyRecord
    signing: KeyRecord

    @classmethod
    def resolve(cls, registry: KeyRegistry, domain: str, profile: Profile, bureau: str) -> DomainKeys:
        if not profile.keys(domain):
            raise ConfigError(f"profile {profile.name} has no keys for domain {domain}")
        masters = {name: registry.active(domain, KeyKind.MASTER, name) for name in profile.master_keys(domain)}
        try:
            transport = registry.active(domain, KeyKind.TRANSPORT, bureau)
        except NotFound:
            raise PermissionDenied(f"bureau {bureau!r} has no {domain} transport key: it is not registered for "
                                   f"the {domain} domain") from None
        signing = registry.active(domain, KeyKind.SIGNING, SIGNING_KEY_NAME)
        if signing.public_key is None:
            raise ConfigError(f"{domain} signing key has no public key on record")
        return cls(masters, transport, signing)


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
    ) -> None:
        self.domain = check_domain(domain)
        self._session = session
        self._clock = clock
        self.profile = profile
        self.bureau = bureau
        resolved = DomainKeys.resolve(registry, domain, profile, bureau)
        masters = resolved.masters
        self._master_versions = {name: rec.version for name, rec in masters.items()}
        self._keys = tuple(_Resolved(spec, masters[spec.master_key].label) for spec in profile.keys(domain))
        self._card_fields = profile.card_fields(domain)
        self._transport = resolved.transport
        self._signing_label = resolved.signing.label
        assert resolved.signing.public_key is not None
        self.signing_key_id = bundle.key_id(resolved.signing.public_key)
        for label in [r.master_label for r in self._keys] + [self._transport.label]:
            if not session.has_key(label):
                raise ConfigError(f"{domain} token {session.token_label!r} lacks key {label!r} the registry lists")

    @property
    def keys_per_card(self) -> int:
        return len(self._keys)

    def seal(self, card: CardIdentity, *, serial: str, batch: str) -> dict[str, Any]:
        """One signed section for this card. Raises InvalidArgument when the card lacks a field a recipe needs."""
        card.require(self._card_fields)
        if not batch:
            raise InvalidArgument("batch", "is required")
        sealed = []
        for resolved in self._keys:
            spec = resolved.spec
            result = self._session.derive_wrap(
                resolved.master_label, spec.recipe.steps(card), self._transport.label
            )
            sealed.append(bundle.SealedKey(
                name=spec.name, usage=spec.usage, algorithm=spec.algorithm.value, wrapped=result.wrapped,
                kcv=result.kcv, kcv_method=KcvMethod.TDES_ECB_ZERO.value,
            ))
        header = bundle.SectionHeader(
            serial=serial, domain=self.domain, bureau=self.bureau, batch=batch, card_ref=card.card_ref,
            profile=self.profile.name, created_at=rfc3339(self._clock.now()), master_keys=self._master_versions,
            transport_key=self._transport.name, transport_key_version=self._transport.version,
            transport_key_kcv=self._transport.kcv or "",
        )
        body = bundle.section_body(header, sealed)
        signature = self._session.sign_sha256(self._signing_label, bundle.signed_bytes(body))
        return bundle.section(body, self.signing_key_id, signature)
