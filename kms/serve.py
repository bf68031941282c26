"""`kms serve`: the issuance service on its configured address, until SIGINT/SIGTERM.

The serving process holds no PIN: it reads records and the key registry, and hands sealing to each domain's worker
processes (kms.workers), which alone read their own domain's PIN.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kms import card_service, profiles, runtime, store
from kms import config as config_mod
from kms.authz import DEFAULT_POLICY, Policy
from kms.batches import BatchStore
from kms.ceremonies import Ceremonies
from kms.ceremony import QuorumPolicy
from kms.ceremony_service import CeremonyService
from kms.ceremony_service import register as register_ceremonies
from kms.clock import Clock, SystemClock
from kms.errors import ConfigError
from kms.handoffs import TransportHandoffs
from kms.issuance import Issuance, register
from kms.issuer import DomainPools
from kms.lifecycle import CardLifecycle
from kms.officers import OfficerStore
from kms.operations import Context
from kms.server import TlsFiles, create_server

log = logging.getLogger("kms.serve")


class Service:
    """A configured, started server and what it owns; ``stop()`` ends both."""

    def __init__(self, config_path: Path, *, listen: str | None = None, clock: Clock | None = None,
                 processes_per_domain: int | None = None) -> None:
        cfg = config_mod.load(config_path)
        if cfg.server is None:
            raise ConfigError(f"{cfg.path}: no 'server' section")
        clock = clock or SystemClock()
        engine = store.make_engine(cfg.database)
        store.create_all(engine)
        registry = runtime.registry(cfg, clock)
        loaded = profiles.load_dir(cfg.profiles, profiles.master_key_names(registry))
        self.pools = DomainPools(cfg.path, processes_per_domain)
        self.lifecycle = CardLifecycle(engine, clock)
        self.issuance = Issuance(cfg.path, BatchStore(engine, clock), registry, loaded, self.pools, clock,
                                 lifecycle=self.lifecycle)
        officer_store = OfficerStore(engine, clock)
        self.ceremonies = Ceremonies(engine, clock, QuorumPolicy.load(), officer_store)
        self.ceremonies.sweep()  # ceremonies that expired, or were interrupted, while no replica was running
        handoffs = TransportHandoffs(engine, registry, clock)
        ceremony_context = Context(registry, officer_store, self.issuance.store, loaded, self.ceremonies, handoffs,
                                   self.pools)
        ceremony = CeremonyService(self.ceremonies, ceremony_context, clock)
        tls = cfg.server.tls
        self.server, self.port = create_server(
            TlsFiles(tls.cert, tls.key, tls.ca), Policy.load(cfg.server.policy or DEFAULT_POLICY),
            _services(register(self.issuance), card_service.register(self.lifecycle),
                      register_ceremonies(ceremony)),
            address=listen or cfg.server.listen,
        )
        self.server.start()

    def stop(self, grace: float = 5.0) -> None:
        self.server.stop(grace).wait()
        self.pools.close()


def _services(*registrars: Callable[[Any], Iterable[str]]) -> Callable[[Any], list[str]]:
    """One ``register`` callback for kms.server.create_server that runs several."""
    return lambda server: [name for add in registrars for name in add(server)]


def serve(config_path: Path, *, listen: str | None = None, ready: Callable[[int], Any] = lambda port: None) -> None:
    service = Service(config_path, listen=listen)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    ready(service.port)
    stopping.wait()
    log.info("stopping")
    service.stop()
