"""Wiring: open a domain's or a station's token from configuration, resolving the PIN in this process only."""

from __future__ import annotations

from collections.abc import Callable

from kms import store
from kms.audit.log import AuditLog
from kms.clock import Clock
from kms.config import Config, HsmConfig, StationConfig
from kms.errors import ConfigError, HsmError, HsmLoginFailed, SecretUnavailable
from kms.hsm.session import Module, TokenSession
from kms.registry import KeyRegistry
from kms.secrets import SecretRef

_modules: dict[str, Module] = {}


def module(hsm: HsmConfig) -> Module:
    """The process's PKCS#11 module (loaded once; SOFTHSM2_CONF applied first), read with the configuration's
    mechanism profile (``hsm.mechanisms``)."""
    hsm.apply_env()
    path = hsm.module_path()
    profile = hsm.profile()
    loaded = _modules.get(path)
    if loaded is None:
        loaded = _modules[path] = Module(path, profile)
    return loaded if loaded.mechanisms == profile else loaded.with_mechanisms(profile)


def open_token(hsm: HsmConfig, setting: str, token: str, pin: SecretRef,
               secret: Callable[[SecretRef], str] | None = None) -> TokenSession:
    """A session on ``token`` logged in with ``pin``; an error names the setting to fix (``setting`` is where the
    token and PIN are configured, e.g. ``domains.bank``): ``hsm.module`` (no such module, or not a PKCS#11
    library), ``<setting>.token`` (no token with that label), ``<setting>.pin`` (the reference cannot be read:
    ConfigError, or SecretUnavailable when OpenBao cannot be reached; the token refused the PIN: HsmLoginFailed,
    after exactly one login attempt). ``secret`` resolves the reference (``Config.secret``: also ``vault:``)."""
    try:
        loaded = module(hsm)
    except HsmError as error:
        raise ConfigError(f"hsm.module: {error}") from None
    if token not in loaded.token_labels():
        raise ConfigError(f"{setting}.token: no token labelled {token!r} in {loaded.path}")
    try:
        value = secret(pin) if secret is not None else pin.resolve()
    except ConfigError as error:
        raise ConfigError(f"{setting}.pin: {error}") from None
    except SecretUnavailable as error:
        raise SecretUnavailable(f"{setting}.pin: {error}") from None
    try:
        return loaded.open(token, value)
    except HsmLoginFailed:
        raise HsmLoginFailed(f"{setting}.pin: the token {token} refused the PIN") from None


def open_domain(config: Config, domain: str) -> TokenSession:
    """A session on the domain's own token. Only the domain's worker calls this: it is where its PIN is read."""
    try:
        domain_config = config.domains[domain]
    except KeyError:
        raise ConfigError(f"{config.path}: domain {domain!r} is not configured") from None
    if domain_config.pin is None:  # a front end's configuration: the domain's worker service holds the PIN
        raise ConfigError(f"{config.path}: domains.{domain}.pin is not set here (workers.{domain} serves the domain)")
    return open_token(config.hsm, f"domains.{domain}", domain_config.token, domain_config.pin, config.secret)


def open_station(config: StationConfig) -> TokenSession:
    return module(config.hsm).open(config.token, config.secret(config.pin))


def registry(config: Config, clock: Clock) -> KeyRegistry:
    """The key registry of the configured database, its changes chained into that database's audit log (also in the
    domain worker processes, where ceremonies' key operations run). Its schema must be current (``store.require_head``:
    one read of the recorded revision, Alembic not loaded; otherwise ConfigError naming ``kms db upgrade``)."""
    engine = store.make_engine(config.database)
    store.require_head(engine, config=config.path)
    return KeyRegistry(engine, clock, AuditLog(engine, clock))
