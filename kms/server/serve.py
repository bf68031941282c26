"""`kms serve`: the issuance service on its configured address, until SIGINT/SIGTERM.

The serving process holds no PIN: it reads records and the key registry, and hands sealing to each domain's worker
processes (kms.issuance.workers), which alone read their own domain's PIN: processes it spawns, or, for a domain
named in ``workers`` (and the audit signer), a worker service of its own (``kms worker``, kms.server.remote).

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
from kms import metrics, runtime, store
from kms.audit.alarms import Alarms
from kms.audit.log import AuditLog
from kms.audit.signer import AuditSigner, Checkpointer, Signer
from kms.cards import profiles
from kms.ceremony.handoffs import TransportHandoffs
from kms.ceremony.officers import OfficerStore
from kms.ceremony.operations import Context
from kms.ceremony.rules import DEFAULT_QUORUMS, QuorumPolicy
from kms.ceremony.store import Ceremonies
from kms.clock import Clock, SystemClock
from kms.config import HEALTH_LISTEN_AUTO
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
from kms.server.health import Dependency, HealthMonitor
from kms.server.http import HealthListener
from kms.server.issuance import Issuance, register
from kms.server.remote import RemotePool, RemoteSigner
from kms.store import database_display as _database

log = logging.getLogger(__name__)


#: ``Service(health_listen=...)``: take ``server.health_listen`` from the configuration.
FROM_CONFIG = "from-config"


class Service:
    """A configured, started server and what it owns; ``stop()`` ends both.

    Start-up fails fast, in this order, before anything is served: the configuration, policies and CRL; the gRPC
    port (``server.listen``: in use is an error, never shared) and the health listener's; each domain's first
    worker process and the audit signer, each logged into its token once (a wrong PIN, label or module is a
    ConfigError or HsmLoginFailed naming the setting). Then the health monitor's first round, and the server."""

    def __init__(self, config_path: Path, *, listen: str | None = None, clock: Clock | None = None,
                 processes_per_domain: int | None = None, limits: Path | None = None,
                 health_listen: str | None = FROM_CONFIG, health_interval: float | None = None) -> None:
        """``limits``: another defaults file than kms/policies/limits.yaml (tests; `kms serve` has no such option).
        ``health_listen``: host:port for the HTTP health listener, None for none (default: the configuration's).
        ``health_interval``: seconds between the health monitor's rounds (default: the configuration's)."""
        cfg = config_mod.load(config_path)
        if cfg.server is None:
            raise ConfigError(f"{cfg.path}: no 'server' section")
        self.drain_seconds = float(cfg.server.drain_seconds)
        # First the records' schema: at this kms's revision, or one line naming `kms db upgrade` before anything is
        # read or written; an empty database (a first start) is created at that revision (kms.store).
        engine = store.make_engine(cfg.database)
        store.require_current(engine, create=True, config=cfg.path)
        #: This replica's name (``server.replica``, else ``<hostname>-<port>`` once the port is bound): in
        #: service.started/stopped, the checkpoints it has signed, /metrics (kms_replica_info) and /readyz.
        self.replica = cfg.server.replica or ""
        # Client certificates checked against the CA's CRL on every call; a CRL that cannot be used stops the start.
        crl = cfg.server.tls.crl
        revocation = [RevocationList(crl, cfg.server.tls.ca)] if crl is not None else []
        clock = clock or SystemClock()
        self.audit = audit = AuditLog(engine, clock)
        authz_path = cfg.server.policy or DEFAULT_POLICY
        limits_path = limits or DEFAULT_LIMITS
        quorum_path = cfg.server.quorum_policy or DEFAULT_QUORUMS
        limits_policy = LimitsPolicy.load(limits_path)
        registry = runtime.registry(cfg, clock)  # with its own audit log on the same database
        loaded = profiles.load_dir(cfg.profiles, profiles.master_key_names(registry))
        # Each domain's workers: spawned here, or its worker service (``workers.<domain>``: no PIN here).
        self.pools = DomainPools(cfg.path, processes_per_domain,
                                 remote={d: RemotePool(d, cfg.workers[d]) for d in cfg.domains if d in cfg.workers})
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
        handoffs = TransportHandoffs(engine, registry, clock, audit)
        ceremony_context = Context(registry, officer_store, self.issuance.store, loaded, self.ceremonies, handoffs,
                                   self.pools, self.principals, limits=self.quotas.store,
                                   mechanisms={d: cfg.hsm.profile() for d in cfg.domains if d not in cfg.workers})
        ceremony = CeremonyService(self.ceremonies, ceremony_context, clock)
        # Checkpoints of the audit chain, signed by the audit key in a process of its own (docs/audit.md).
        self.signer: Signer | None = None
        self.checkpointer: Checkpointer | None = None
        audit_services = []
        if cfg.audit is not None:
            self.signer = RemoteSigner(cfg.workers["audit"]) if "audit" in cfg.workers \
                else AuditSigner(cfg.path, start=False)
            self.checkpointer = Checkpointer(audit, self.signer, clock, every_records=cfg.audit.checkpoint_records,
                                             every_seconds=cfg.audit.checkpoint_seconds, replica=self.replica)
            audit_services.append(register_audit(AuditService(audit, self.checkpointer)))
        self.health = HealthMonitor(
            _dependencies(engine, self.pools, self.signer), _needs(list(self.pools.pools), self.signer is not None),
            clock, float(health_interval or cfg.server.health_check_seconds), replica=self.replica)
        self.draining = threading.Event()
        tls = cfg.server.tls
        address = listen or cfg.server.listen
        self.streams = StreamSlots(cfg.server.capacity)  # streams in progress (kms.server.capacity)
        self.server, self.port = create_server(
            TlsFiles(tls.cert, tls.private_key("server.tls.key"), tls.ca),
            Policy.load(cfg.server.policy or DEFAULT_POLICY),
            _services(register(self.issuance), card_service.register(self.lifecycle),
                      register_ceremonies(ceremony), *audit_services),
            address=address,
            audit=audit,
            principals=self.principals,
            certificate_checks=revocation,
            alarms=self.alarms,
            health_servicer=self.health.servicer,
            draining=self.draining,
            capacity=cfg.server.capacity,
            streams=self.streams,
        )
        self.replica = self.replica or config_mod.default_replica(self.port)
        self.health.replica = self.replica
        if self.checkpointer is not None:
            self.checkpointer.replica = self.replica
        self.http: HealthListener | None = None
        try:
            health_address = cfg.server.health_listen if health_listen == FROM_CONFIG else health_listen
            if health_address == HEALTH_LISTEN_AUTO:
                health_address = _beside(address, self.port)
            if health_address is not None:
                self.http = HealthListener(health_address, self.health)
            _start_all(self.pools, self.signer)  # fail fast: each token's login, once
        except BaseException:
            self._abandon()
            raise
        self.ceremonies.sweep()  # ceremonies that expired, or were interrupted, while no replica was running
        schema = store.current_schema(engine)  # part of every lock key: all replicas must resolve the same one
        audit.record("service.started", detail={
            "replica": self.replica, "config": str(cfg.path), "config_sha256": _sha256(cfg.path),
            "database": _database(cfg.database), **({"schema": schema} if schema is not None else {}),
            "policies": {"authz": _sha256(authz_path), "quorum": _sha256(quorum_path),
                         "limits": _sha256(limits_path),
                         "profiles": {p.name: _sha256(p) for p in sorted(cfg.profiles.glob("*.yaml"))}}})
        self.health.start()
        if self.checkpointer is not None:
            self.checkpointer.start()
        if self.http is not None:
            self.http.start()
        self.server.start()
        self._stopped = False
        # Gauges read when scraped: checkpoint lag, ceremonies by state (kms.metrics).
        # The audit anchor's backlog, from the signer that anchors (kms.audit.anchor), when it can tell.
        self.metrics = metrics.bind(checkpoints=audit.coverage, ceremonies=self.ceremonies.counts,
                                    anchor=getattr(self.signer, "anchor_status", None), replica=self.replica)

    def _abandon(self) -> None:
        """A start that failed: release the ports, end the processes started so far."""
        self.server.stop(None)
        if self.http is not None:
            self.http.stop()
        if self.signer is not None:
            self.signer.close()
        self.quotas.close()
        self.pools.terminate()

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop: health says NOT_SERVING, no new call is accepted, streams end after their current
        message (UNAVAILABLE: the station resumes from its cursor) and other calls finish within ``grace`` seconds
        (default: ``server.drain_seconds``); then the chain's end is signed (a final checkpoint) and the worker and
        signer processes end."""
        if self._stopped:
            return
        self._stopped = True
        self.metrics.close()
        self.draining.set()
        self.health.drain()
        self.server.stop(self.drain_seconds if grace is None else grace).wait()
        self.health.stop()
        if self.http is not None:
            self.http.stop()
        try:
            self.audit.record("service.stopped", detail={"replica": self.replica})
        except Exception:
            log.exception("the service's stop could not be recorded in the audit log")
        if self.checkpointer is not None:
            self.checkpointer.stop()  # signs the chain's end
        if self.signer is not None:
            self.signer.close()
        self.quotas.close()
        self.pools.close()

    def child_pids(self) -> list[int]:
        """The worker and signer processes this service runs now (tests, diagnostics)."""
        pids = [pid for pool in self.pools.pools.values() for pid in pool.pids()]
        return pids + (self.signer.pids() if self.signer is not None else [])


def _dependencies(engine: Any, pools: DomainPools, signer: Signer | None) -> list[Dependency]:
    def database() -> str | None:
        try:
            store.ping(engine)
        except Exception as error:
            return f"the database cannot be reached ({type(error).__name__})"
        return None

    found = [Dependency("database", database)]
    found += [Dependency(f"hsm.{domain}", pool.probe) for domain, pool in sorted(pools.pools.items())]
    if signer is not None:
        found.append(Dependency("audit-signer", signer.check, signer.supervise))
    return found


def _needs(domains: list[str], audit: bool) -> dict[str, list[str]]:
    """What each service needs: issuing and ceremonies need every domain's token; the audit service its signer."""
    hsm = [f"hsm.{d}" for d in sorted(domains)]
    needs = {
        "kms.v1.IssuanceService": ["database", *hsm],
        "kms.v1.BatchService": ["database", *hsm],
        "kms.v1.CardService": ["database"],
        "kms.v1.CeremonyService": ["database", *hsm],
    }
    if audit:
        needs["kms.v1.AuditService"] = ["database", "audit-signer"]
    return needs


def _beside(address: str, port: int) -> str:
    """The default health listener: loopback, the gRPC port + 1 (0 stays 0: any free port)."""
    return f"127.0.0.1:{port + 1 if address.rpartition(':')[2] != '0' else 0}"


def _start_all(pools: DomainPools, signer: Signer | None) -> None:
    """Each domain's first worker and the signer, started side by side; the first error (domains by name, then the
    audit signer) is raised."""
    starts: dict[str, Callable[[], None]] = {d: p.start for d, p in sorted(pools.pools.items())}
    if signer is not None:
        starts["audit"] = signer.start
    failures: dict[str, BaseException] = {}

    def run(name: str) -> None:
        try:
            starts[name]()
        except BaseException as error:
            failures[name] = error

    threads = [threading.Thread(target=run, args=(name,), name=f"kms-start-{name}") for name in starts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in starts:
        if name in failures:
            raise failures[name]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _services(*registrars: Callable[[Any], Iterable[str]]) -> Callable[[Any], list[str]]:
    """One ``register`` callback for kms.server.frame.create_server that runs several."""
    return lambda server: [name for add in registrars for name in add(server)]


def serve(config_path: Path, *, listen: str | None = None, health_listen: str | None = FROM_CONFIG,
          ready: Callable[[Service], Any] = lambda service: None) -> None:
    """Run until SIGINT or SIGTERM, then drain (``Service.stop``)."""
    restrict_umask()  # a long-running process and its workers: every file they create is private (kms.files)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    service = Service(config_path, listen=listen, health_listen=health_listen)
    ready(service)
    stopping.wait()
    log.info("stopping: draining for up to %s s", service.drain_seconds)
    service.stop()
