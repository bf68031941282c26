"""`kms serve`: the issuance service on its configured address, until SIGINT/SIGTERM.

The serving process holds no PIN: it reads records and the key registry, and hands sealing to each domain's worker
processes (kms.issuance.workers), which alone read their own domain's PIN.

Every store it builds shares one audit log (kms.audit.log) on the service's database: each state change appends its
record in its own transaction. A ``service.started`` record names the SHA-256 of the configuration file and of each
policy file (authorization, quorum, limits, profiles), so that a configuration change shows as a new digest.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kms import config as config_mod
from kms import runtime, store
from kms.audit.alarms import Alarms
from kms.audit.log import AuditLog
from kms.audit.signer import AuditSigner, Checkpointer
from kms.cards import profiles
from kms.ceremony.handoffs import TransportHandoffs
from kms.ceremony.officers import OfficerStore
from kms.ceremony.operations import Context
from kms.ceremony.rules import DEFAULT_QUORUMS, QuorumPolicy
from kms.ceremony.store import Ceremonies
from kms.clock import Clock, SystemClock
from kms.errors import ConfigError
from kms.files import restrict_umask
from kms.issuance.batches import BatchStore
from kms.issuance.issuer import DomainPools
from kms.issuance.lifecycle import CardLifecycle
from kms.issuance.limits import DEFAULT_LIMITS, LimitsPolicy, Quotas
from kms.principals import PrincipalRegistry
from kms.revocation import RevocationList
from kms.server import cards as card_service
from kms.server.audit import AuditService
from kms.server.audit import register as register_audit
from kms.server.authz import DEFAULT_POLICY, Policy
from kms.server.capacity import StreamSlots
from kms.server.ceremony import CeremonyService
from kms.server.ceremony import register as register_ceremonies
from kms.server.frame import TlsFiles, create_server
from kms.server.issuance import Issuance, register
from kms.store import database_display as _database

log = logging.getLogger(__name__)


class Service:
    """A configured, started server and what it owns; ``stop()`` ends both."""

    def __init__(self, config_path: Path, *, listen: str | None = None, clock: Clock | None = None,
                 processes_per_domain: int | None = None, limits: Path | None = None) -> None:
        """``limits``: another defaults file than kms/policies/limits.yaml (tests; `kms serve` has no such option)."""
        cfg = config_mod.load(config_path)
        if cfg.server is None:
            raise ConfigError(f"{cfg.path}: no 'server' section")
        # Client certificates checked against the CA's CRL on every call; a CRL that cannot be used stops the start.
        crl = cfg.server.tls.crl
        revocation = [RevocationList(crl, cfg.server.tls.ca)] if crl is not None else []
        clock = clock or SystemClock()
        engine = store.make_engine(cfg.database)
        store.create_all(engine)
        self.audit = audit = AuditLog(engine, clock)
        authz_path = cfg.server.policy or DEFAULT_POLICY
        limits_path = limits or DEFAULT_LIMITS
        quorum_path = cfg.server.quorum_policy or DEFAULT_QUORUMS
        limits_policy = LimitsPolicy.load(limits_path)
        audit.record("service.started", detail={
            "config": str(cfg.path), "config_sha256": _sha256(cfg.path), "database": _database(cfg.database),
            "policies": {"authz": _sha256(authz_path), "quorum": _sha256(quorum_path),
                         "limits": _sha256(limits_path),
                         "profiles": {p.name: _sha256(p) for p in sorted(cfg.profiles.glob("*.yaml"))}}})
        registry = runtime.registry(cfg, clock)  # with its own audit log on the same database
        loaded = profiles.load_dir(cfg.profiles, profiles.master_key_names(registry))
        self.pools = DomainPools(cfg.path, processes_per_domain)
        self.lifecycle = CardLifecycle(engine, clock, audit)
        # Issuance limits (kms/policies/limits.yaml, then set-limits ceremonies) and anomaly alarms
        # (kms.issuance.limits, alarms).
        self.alarms = Alarms(audit, clock, limits_policy.alarms)
        self.quotas = Quotas(engine, clock, limits_policy, audit, self.alarms)
        self.issuance = Issuance(BatchStore(engine, clock, audit), registry, loaded, self.pools, clock,
                                 lifecycle=self.lifecycle, quotas=self.quotas, alarms=self.alarms)
        officer_store = OfficerStore(engine, clock, audit)
        self.principals = PrincipalRegistry(engine, clock, audit)
        self.ceremonies = Ceremonies(engine, clock, QuorumPolicy.load(quorum_path), officer_store, audit)
        self.ceremonies.sweep()  # ceremonies that expired, or were interrupted, while no replica was running
        handoffs = TransportHandoffs(engine, registry, clock, audit)
        ceremony_context = Context(registry, officer_store, self.issuance.store, loaded, self.ceremonies, handoffs,
                                   self.pools, self.principals, limits=self.quotas.store)
        ceremony = CeremonyService(self.ceremonies, ceremony_context, clock)
        # Checkpoints of the audit chain, signed by the audit key in a process of its own (docs/audit.md).
        self.signer: AuditSigner | None = None
        self.checkpointer: Checkpointer | None = None
        audit_services = []
        if cfg.audit is not None:
            self.signer = AuditSigner(cfg.path)
            self.checkpointer = Checkpointer(audit, self.signer, clock, every_records=cfg.audit.checkpoint_records,
                                             every_seconds=cfg.audit.checkpoint_seconds)
            self.checkpointer.start()
            audit_services.append(register_audit(AuditService(audit, self.checkpointer)))
        tls = cfg.server.tls
        self.streams = StreamSlots(cfg.server.capacity)  # streams in progress (kms.server.capacity)
        self.server, self.port = create_server(
            TlsFiles(tls.cert, tls.key, tls.ca), Policy.load(cfg.server.policy or DEFAULT_POLICY),
            _services(register(self.issuance), card_service.register(self.lifecycle),
                      register_ceremonies(ceremony), *audit_services),
            address=listen or cfg.server.listen,
            audit=audit,
            principals=self.principals,
            certificate_checks=revocation,
            alarms=self.alarms,
            capacity=cfg.server.capacity,
            streams=self.streams,
        )
        self.server.start()

    def stop(self, grace: float = 5.0) -> None:
        self.server.stop(grace).wait()
        if self.checkpointer is not None:
            self.checkpointer.stop()  # signs the chain's end
        if self.signer is not None:
            self.signer.close()
        self.pools.close()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _services(*registrars: Callable[[Any], Iterable[str]]) -> Callable[[Any], list[str]]:
    """One ``register`` callback for kms.server.frame.create_server that runs several."""
    return lambda server: [name for add in registrars for name in add(server)]


def serve(config_path: Path, *, listen: str | None = None, ready: Callable[[int], Any] = lambda port: None) -> None:
    restrict_umask()  # a long-running process and its workers: every file they create is private (kms.files)
    service = Service(config_path, listen=listen)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    ready(service.port)
    stopping.wait()
    log.info("stopping")
    service.stop()
