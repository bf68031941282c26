"""Wiring: open a domain's or a station's token from configuration, resolving the PIN in this process only."""

from __future__ import annotations

from kms import store
from kms.audit.log import AuditLog
from kms.clock import Clock
from kms.config import Config, HsmConfig, StationConfig
from kms.errors import ConfigError
from kms.hsm.session import Module, TokenSession
from kms.registry import KeyRegistry

_modules: dict[str, Module] = {}


def module(hsm: HsmConfig) -> Module:
    """The process's PKCS#11 module (loaded once; SOFTHSM2_CONF applied first)."""
    hsm.apply_env()
    path = hsm.module_path()
    if path not in _modules:
        _modules[path] = Module(path)
    return _modules[path]


def open_domain(config: Config, domain: str) -> TokenSession:
    """A session on the domain's own token. Only the domain's worker calls this: it is where its PIN is read."""
    try:
        domain_config = config.domains[domain]
    except KeyError:
        raise ConfigError(f"{config.path}: domain {domain!r} is not configured") from None
    return module(config.hsm).open(domain_config.token, domain_config.pin.resolve())


def open_station(config: StationConfig) -> TokenSession:
    return module(config.hsm).open(config.token, config.pin.resolve())


def registry(config: Config, clock: Clock) -> KeyRegistry:
    """The key registry of the configured database, its changes chained into that database's audit log (also in the
    domain worker processes, where ceremonies' key operations run)."""
    engine = store.make_engine(config.database)
    store.create_all(engine)
    return KeyRegistry(engine, clock, AuditLog(engine, clock))
