"""The issuer: turns card identities into sealed bundles through each domain's own worker processes.

The issuer holds no PIN and no key; it hands each domain's workers the same card and bundle serial, and splices
their signed sections into one bundle per card.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kms import bundle, config, runtime
from kms.cards import profiles
from kms.cards.cardid import CardIdentity
from kms.clock import SystemClock
from kms.errors import ConfigError, KmsError
from kms.issuance.sealer import DomainKeys, new_serial
from kms.issuance.workers import DomainPool, Job


@dataclass(frozen=True)
class IssuedBundle:
    card_ref: str
    serial: str
    data: bytes | None
    error: KmsError | None = None


class DomainPools:
    """One worker pool per configured domain, shared by every bureau and profile (e.g. by a server's requests)."""

    def __init__(self, config_path: Path, processes_per_domain: int | None = None) -> None:
        cfg = config.load(config_path)
        self.pools = {d: DomainPool(cfg.path, d, processes_per_domain) for d in cfg.domains}

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def terminate(self) -> None:
        for pool in self.pools.values():
            pool.terminate()


class Issuer:
    """Seals bundles for one bureau and profile. With ``pools`` it borrows them; without, it owns its own."""

    def __init__(self, config_path: Path, bureau: str, profile: str, processes_per_domain: int | None = None,
                 pools: DomainPools | None = None):
        cfg = config.load(config_path)
        self.bureau = bureau
        self.profile_name = profile
        loaded = profiles.load_dir(cfg.profiles)
        if profile not in loaded:
            raise ConfigError(f"no card profile named {profile!r} in {cfg.profiles}")
        self.profile = loaded[profile]
        self.domains = tuple(d for d in self.profile.domains if d in cfg.domains)
        missing = set(self.profile.domains) - set(self.domains)
        if missing:
            raise ConfigError(f"profile {profile} needs domain(s) {', '.join(sorted(missing))} not configured here")
        self.keys_per_card = sum(len(self.profile.keys(d)) for d in self.domains)
        # Fail fast, before any worker reads a PIN: every key the sections need must be registered and active.
        registry = runtime.registry(cfg, SystemClock())
        for domain in self.domains:
            DomainKeys.resolve(registry, domain, self.profile, bureau)
        self._owned = pools is None
        self._pools = pools if pools is not None else DomainPools(cfg.path, processes_per_domain)

    def issue(self, cards: Iterable[CardIdentity], batch: str,
              pins: Mapping[str, Mapping[str, int]] | None = None) -> Generator[IssuedBundle, None, None]:
        """One bundle per card, in order, lazily: cards are taken from ``cards`` only as the domain workers have
        room for them. A card that a domain refuses yields an IssuedBundle with its error. ``pins`` gives, per
        domain, the master key versions the batch was authorized with (default: the newest active ones)."""
        jobs = (Job(card, new_serial()) for card in cards)
        mine, *theirs = itertools.tee(jobs, 1 + len(self.domains))
        pinned = {d: tuple(sorted((pins or {}).get(d, {}).items())) for d in self.domains}
        streams = [self._pools.pools[d].seal(it, batch, self.bureau, self.profile_name, pinned[d])
                   for d, it in zip(self.domains, theirs, strict=True)]
        for job, *results in zip(mine, *streams, strict=True):
            error = next((r.error for r in results if r.error is not None), None)
            if error is not None:
                yield IssuedBundle(job.card.card_ref, job.serial, None, error)
                continue
            sections = {d: r.section for d, r in zip(self.domains, results, strict=True) if r.section is not None}
            yield IssuedBundle(job.card.card_ref, job.serial, bundle.assemble(job.serial, job.card.card_ref, sections))

    def close(self) -> None:
        if self._owned:
            self._pools.close()

    def __enter__(self) -> Issuer:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._owned:
            return
        if exc[0] is None:
            self._pools.close()
        else:
            self._pools.terminate()
