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
from kms.cards.profiles import Profile
from kms.clock import Clock, SystemClock
from kms.errors import ConfigError, KmsError
from kms.issuance.sealer import DomainKeys, new_serial
from kms.issuance.workers import DomainPool, Job, Pool


@dataclass(frozen=True)
class IssuedBundle:
    card_ref: str
    serial: str
    data: bytes | None
    error: KmsError | None = None


class DomainPools:
    """One worker pool per configured domain, shared by every bureau and profile (e.g. by a server's requests):
    processes spawned here, or the ``remote`` pool given for a domain (a domain worker service, kms.server.remote)."""

    def __init__(self, config_path: Path, processes_per_domain: int | None = None, *,
                 remote: Mapping[str, Pool] | None = None) -> None:
        cfg = config.load(config_path)
        remote = remote or {}
        self.pools: dict[str, Pool] = {d: remote[d] if d in remote else DomainPool(cfg.path, d, processes_per_domain)
                                       for d in cfg.domains}

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def terminate(self) -> None:
        for pool in self.pools.values():
            pool.terminate()


class Issuer:
    """Seals bundles for one bureau and profile with the domain worker pools it is given.

    It holds nothing it would have to keep current: the profiles and the pools are the caller's (``kms serve``: the
    service's own; ``kms bundle seal``: ``from_config``), and it needs no registry or clock, for it checks no key
    state: the workers check every key a chunk needs just before sealing it (kms.workers), the one check that also
    sees a key that changed state while a stream runs. The service refuses a bureau that is not registered before
    any work (``Issuance.check_registered``); only ``from_config`` resolves the keys up front, so that the offline
    CLI fails before any worker reads a PIN."""

    def __init__(self, profiles: Mapping[str, Profile], bureau: str, profile: str, pools: DomainPools, *,
                 owned: bool = False) -> None:
        """``owned``: the pools are this issuer's, closed (or on an error terminated) with it."""
        self.bureau = bureau
        self.profile_name = profile
        if profile not in profiles:
            raise ConfigError(f"no card profile named {profile!r}")
        self.profile = profiles[profile]
        self.domains = tuple(d for d in self.profile.domains if d in pools.pools)
        missing = set(self.profile.domains) - set(self.domains)
        if missing:
            raise ConfigError(f"profile {profile} needs domain(s) {', '.join(sorted(missing))} not configured here")
        self.keys_per_card = sum(len(self.profile.keys(d)) for d in self.domains)
        self._owned = owned
        self._pools = pools

    @classmethod
    def from_config(cls, config_path: Path, bureau: str, profile: str, processes_per_domain: int | None = None,
                    clock: Clock | None = None) -> Issuer:
        """An issuer with pools of its own, for a process that has no service around it (``kms bundle seal``)."""
        cfg = config.load(config_path)
        registry = runtime.registry(cfg, clock or SystemClock())
        loaded = profiles.load_dir(cfg.profiles)
        if profile not in loaded:
            raise ConfigError(f"no card profile named {profile!r} in {cfg.profiles}")
        pools = DomainPools(cfg.path, processes_per_domain)  # its processes start with the first chunk
        try:
            issuer = cls(loaded, bureau, profile, pools, owned=True)
            # Fail fast, before any worker reads a PIN: every key the sections need must be registered and active.
            for domain in issuer.domains:
                DomainKeys.resolve(registry, domain, issuer.profile, bureau)
        except BaseException:
            pools.terminate()
            raise
        return issuer

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
