"""Configuration: one frozen, validated object per role (issuer service, station). Unknown keys are errors;
PINs are references (kms.secrets), never literals. Relative paths are taken from the file's directory."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from kms.errors import ConfigError
from kms.files import read_yaml_mapping
from kms.hsm import mechanisms as mechanism_profiles
from kms.hsm.softhsm import find_module
from kms.registry import DOMAINS
from kms.secrets import OpenBaoSettings, SecretRef, check_address
from kms.secrets import resolve as resolve_secret
from kms.validation import unknown_keys


@dataclass(frozen=True)
class HsmConfig:
    module: str  # "auto" or a path
    softhsm2_conf: Path | None
    #: The mechanism profile (kms.hsm.mechanisms): a shipped profile's name, or the path of a profile file.
    mechanisms: str = mechanism_profiles.STANDARD

    def apply_env(self) -> None:
        """Point SoftHSM2 at its configuration; must run before the module is loaded in this process."""
        if self.softhsm2_conf is not None:
            os.environ["SOFTHSM2_CONF"] = str(self.softhsm2_conf)

    def module_path(self) -> str:
        return find_module(self.module)

    def profile(self) -> mechanism_profiles.MechanismProfile:
        """The mechanism profile the module's vendor codes are read with."""
        if self.mechanisms.endswith(".yaml"):
            return mechanism_profiles.load_file(Path(self.mechanisms))
        return mechanism_profiles.load(self.mechanisms)


@dataclass(frozen=True)
class DomainConfig:
    name: str
    token: str
    pin: SecretRef | None  # None only where ``workers.<name>`` serves the domain (a front end holds no PIN)


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS material: our certificate and key, the CA that must have issued the peer's certificate, and
    optionally that CA's certificate revocation list (PEM; kms.revocation), against which the peer's certificate
    is checked."""

    cert: Path
    #: A PEM file, or a ``vault:`` reference to a field holding the PEM (then loaded into memory, never written).
    key: Path | SecretRef
    ca: Path
    crl: Path | None = None
    openbao: OpenBaoSettings | None = field(default=None, compare=False)

    def private_key(self, setting: str) -> bytes:
        """The private key's PEM, from its file or from OpenBao (resolved in this process); errors name ``setting``."""
        if isinstance(self.key, SecretRef):
            try:
                return resolve_secret(self.key, self.openbao).encode("utf-8")
            except ConfigError as error:
                raise ConfigError(f"{setting}: {error}") from None
        return read_file(self.key, setting)


#: ``server.health_listen`` when it is not set: loopback, the gRPC port + 1 (port 0, any free port, stays 0).
HEALTH_LISTEN_AUTO = "auto"


@dataclass(frozen=True)
class Capacity:
    """How much the server takes on at once (``server`` section of kms.yaml; docs/operations.md, "Capacity, limits
    and retries"). Every call runs on one of ``threads``; a stream holds its thread until it ends, so streams get at
    most ``max_streams`` of them (fewer than ``threads``: unary calls always find one free), and one principal at
    most ``streams_per_principal``. gRPC itself refuses calls beyond ``max_concurrent_rpcs`` (running or waiting for
    a thread) with RESOURCE_EXHAUSTED."""

    threads: int = 16
    max_concurrent_rpcs: int = 128
    max_streams: int = 8
    streams_per_principal: int = 4
    #: Unary calls in progress of one principal: fewer than ``threads``, so that one caller's slow calls (an
    #: IssueCard the HSM takes its time over) never hold every thread; 0: half the threads.
    calls_per_principal: int = 0

    def __post_init__(self) -> None:
        if self.threads < 2:
            raise ConfigError("server.threads must be at least 2")
        if not 1 <= self.max_streams < self.threads:
            raise ConfigError(f"server.max_streams must be from 1 to server.threads - 1 ({self.threads - 1}), so "
                              "that calls other than streams always have a thread")
        if not 1 <= self.streams_per_principal <= self.max_streams:
            raise ConfigError(f"server.streams_per_principal must be from 1 to server.max_streams "
                              f"({self.max_streams})")
        if self.calls_per_principal == 0:
            object.__setattr__(self, "calls_per_principal", max(1, self.threads // 2))
        if not 1 <= self.calls_per_principal < self.threads:
            raise ConfigError(f"server.calls_per_principal must be from 1 to server.threads - 1 ({self.threads - 1}), "
                              "so that one caller's calls never hold every thread")
        if self.max_concurrent_rpcs < self.threads:
            raise ConfigError(f"server.max_concurrent_rpcs must be at least server.threads ({self.threads})")


@dataclass(frozen=True)
class ServerConfig:
    listen: str
    tls: TlsConfig
    policy: Path | None
    quorum_policy: Path | None = None
    #: The plain-HTTP listener for /healthz, /readyz and /metrics (kms.server.http): host:port, HEALTH_LISTEN_AUTO,
    #: or None (``off``: no listener).
    health_listen: str | None = HEALTH_LISTEN_AUTO
    #: How often the health monitor checks the workers' tokens, the database and the audit signer.
    health_check_seconds: int = 5
    #: On SIGTERM: how long in-flight calls may take to finish (a stream ends after its current message).
    drain_seconds: int = 30
    capacity: Capacity = Capacity()
    #: This replica's name (``server.replica``; None: ``default_replica``, ``<hostname>-<port>`` of the port it
    #: listens on): in its ``service.started``/``service.stopped`` records, the checkpoints it signs, /metrics and
    #: /readyz.
    replica: str | None = None


@dataclass(frozen=True)
class Endpoint:
    """One address of the service: a host name or IP address, and a port."""

    host: str  # an IPv6 address without its brackets
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})")


def endpoint(text: str) -> Endpoint:
    """``host:port`` or ``[IPv6]:port`` as an Endpoint; ValueError saying what is wrong with it otherwise."""
    text = text.strip()
    if not text:
        raise ValueError("an empty endpoint (two commas in a row, or one at an end)")
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{text!r} has no port (host:port)")
    if host.startswith("[") and host.endswith("]"):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))  # one spelling, so a duplicate shows
        except ValueError:
            raise ValueError(f"{text!r}: {host[1:-1]!r} in brackets is not an IPv6 address") from None
    elif not _HOST_NAME.fullmatch(host):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not a host name or IP address") from None
        raise ValueError(f"{text!r}: an IPv6 address goes in brackets ([::1]:7443)")
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return Endpoint(host.lower(), int(port))


def endpoints(value: Any) -> tuple[Endpoint, ...]:
    """The service's endpoints: one ``host:port``, several separated by commas, or (from YAML) a list of them, each
    listed once. ValueError saying what is wrong otherwise (callers add where the value came from)."""
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, list) and value:
        items = value
    else:
        raise ValueError("must be host:port or a list of them")
    found: list[Endpoint] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not host:port")
        one = endpoint(item)
        if one in found:
            raise ValueError(f"{one} is listed twice")
        found.append(one)
    return tuple(found)


@dataclass(frozen=True)
class ClientConfig:
    """How a station, an officer or an auditor reaches the service (kms station fetch, kms batch ...)."""

    path: Path
    #: The service's endpoints, as text: ``host:port``, or several separated by commas (kms.client.service
    #: balances calls over them and fails over between them).
    server: str
    tls: TlsConfig
    approval_key: Path | None = None  # an officer's ECDSA P-256 approval key (development: a PEM file)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return endpoints(self.server)


@dataclass(frozen=True)
class AnchorConfig:
    """``audit.anchor``: where the audit signer anchors each signed checkpoint in OpenBao KV v2 (kms.audit.anchor):
    ``<mount>/data/<prefix>/checkpoints/<size>``, create-only. The connection is the top-level ``openbao`` block.
    ``spool``: the signer's directory of checkpoints signed but not yet anchored (default: ``audit-anchor`` beside
    the configuration file)."""

    mount: str = "kv"
    prefix: str = "kms/audit"
    spool: Path | None = None


@dataclass(frozen=True)
class AuditConfig:
    """The audit signing key's own token (apart from the domains'), and how often checkpoints are signed."""

    token: str
    pin: SecretRef | None  # None only where ``workers.audit`` serves the signer
    checkpoint_records: int = 1_000
    checkpoint_seconds: int = 60
    anchor: AnchorConfig | None = None


@dataclass(frozen=True)
class DatabaseSetting:
    """``database``: a URL, or a reference to one (``vault:kv/kms/front/database#url``), or a mapping ``url`` (a
    URL without password, or a reference) and ``password`` (a reference), the password merged into the URL."""

    url: str | SecretRef
    password: SecretRef | None = None


#: The names ``workers`` may give an endpoint for: each domain, and the audit signer.
WORKER_NAMES = (*DOMAINS, "audit")


#: Two of the largest batches (kms.issuance.batches.MAX_BATCH_CARDS) an hour, with room for look-ups.
DEFAULT_PAN_QUOTA_PER_HOUR = 250_000


@dataclass(frozen=True)
class WorkerConfig:
    """A worker service's own settings (``kms worker``; the ``worker`` section of its configuration)."""

    listen: str | None = None  # unix:PATH (absolute)
    socket_group: str | None = None  # the group the socket is given to (the front end's)
    #: PANs a bank worker service protects in any one hour (kms.server.worker._protect): the bound on how many
    #: candidate PANs a front end that was taken over can have indexed (docs/deployment.md).
    pan_quota_per_hour: int = DEFAULT_PAN_QUOTA_PER_HOUR
    #: The domain's officers this worker trusts for dual control (kms.ceremony.binding), a file it owns.
    officers: Path | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    hsm: HsmConfig
    domains: dict[str, DomainConfig]
    database_setting: DatabaseSetting
    profiles: Path
    workers_per_domain: int
    recycle_after_keys: int
    server: ServerConfig | None = None
    audit: AuditConfig | None = None
    #: The ``openbao`` block: how this process reads ``vault:`` references (kms.secrets).
    openbao: OpenBaoSettings | None = None
    #: A front end's worker services: ``hrss``, ``bank``, ``audit`` -> ``unix:PATH`` (kms.server.remote).
    workers: dict[str, str] = field(default_factory=dict)
    worker: WorkerConfig | None = None

    @property
    def home(self) -> Path:
        return self.path.parent

    def secret(self, ref: SecretRef) -> str:
        """The value of a secret reference (env:, file:, vault:), resolved in this process (kms.secrets)."""
        return resolve_secret(ref, self.openbao, str(self.path))

    @property
    def database(self) -> str:
        """The database URL, its references resolved in this process (the password never in the file)."""
        return _database_url(self.database_setting, self.secret)


@dataclass(frozen=True)
class StationConfig:
    path: Path
    name: str
    bureau: str
    hsm: HsmConfig
    token: str
    pin: SecretRef
    trust: Path
    ledger: str
    domains: tuple[str, ...]
    client: ClientConfig | None = None
    openbao: OpenBaoSettings | None = None

    def secret(self, ref: SecretRef) -> str:
        """The value of a secret reference (env:, file:, vault:), resolved in this process (kms.secrets)."""
        return resolve_secret(ref, self.openbao, str(self.path))


def _read(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path)


def read_file(path: Path, setting: str) -> bytes:
    """The bytes of a file a setting names (a certificate, key or CA file); ConfigError naming the setting and the
    path when it cannot be read (a wrong path is then one clear line, not an internal error)."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{setting}: {path}: cannot read ({error.strerror})") from None


def read_policy(path: Path, body: str) -> Any:
    """The body of a versioned policy file (``version: 1`` and one top-level ``body`` key), e.g. authz, quorums."""
    doc = _read(path)
    if set(doc) != {"version", body} or doc["version"] != 1:
        raise ConfigError(f"{path}: expected 'version: 1' and '{body}'")
    value = doc[body] or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: '{body}' must be a mapping")
    return value


def _only(
    path: Path, where: str, doc: Any, required: set[str], optional: set[str] | None = None
) -> dict[str, Any]:
    optional = optional or set()
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: {where} must be a mapping")
    unknown = unknown_keys(doc, required | optional)
    if unknown:
        raise ConfigError(f"{path}: {where}: unknown setting {unknown[0]!r}")
    missing = sorted(required - set(doc))
    if missing:
        raise ConfigError(f"{path}: {where}: missing setting {missing[0]!r}")
    return doc


def _path(base: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a path")
    p = Path(value)
    return p if p.is_absolute() else (base / p)


def _sqlite_url(base: Path, url: Any, where: str) -> str:
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"{where} must be a database URL")
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite://":
        return prefix + str((base / url[len(prefix):]).resolve())
    return url


def _int(doc: dict[str, Any], key: str, default: int, lo: int, hi: int, where: str) -> int:
    value = doc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{where}.{key} must be an integer from {lo} to {hi}")
    return value


def _hsm(path: Path, doc: Any) -> HsmConfig:
    doc = _only(path, "hsm", doc, set(), {"module", "softhsm2_conf", "mechanisms"})
    conf = doc.get("softhsm2_conf")
    hsm = HsmConfig(
        module=str(doc.get("module", "auto")),
        softhsm2_conf=_path(path.parent, conf, "hsm.softhsm2_conf") if conf else None,
        mechanisms=_mechanisms(path, doc.get("mechanisms", mechanism_profiles.STANDARD)),
    )
    try:
        hsm.profile()  # validated now: a broken profile is a configuration error at start, not at first use
    except ConfigError as error:
        raise ConfigError(f"{path}: hsm.mechanisms: {error}") from None
    return hsm


def _mechanisms(path: Path, value: Any) -> str:
    """A shipped mechanism profile's name, or the path (``*.yaml``, relative to the file) of a profile file."""
    if isinstance(value, str) and value.endswith(".yaml"):
        return str(_path(path.parent, value, "hsm.mechanisms"))
    return mechanism_profile(value, f"{path}: hsm.mechanisms")


def mechanism_profile(value: Any, setting: str) -> str:
    """A shipped mechanism profile's name, checked; ConfigError naming ``setting`` and the shipped names."""
    shipped = mechanism_profiles.shipped()
    if not isinstance(value, str) or value not in shipped:
        raise ConfigError(f"{setting}: unknown mechanism profile {value!r}; shipped: {', '.join(shipped)}"
                          + (" (or the path of a profile file, *.yaml)" if "hsm.mechanisms" in setting else ""))
    return value


def _tls(path: Path, doc: Any, where: str, openbao: OpenBaoSettings | None) -> TlsConfig:
    doc = _only(path, where, doc, {"cert", "key", "ca"}, {"crl"})
    cert, ca = (_path(path.parent, doc[k], f"{where}.{k}") for k in ("cert", "ca"))
    key: Path | SecretRef
    if isinstance(doc["key"], str) and doc["key"].startswith("vault:"):
        key = _reference(path, doc["key"], f"{where}.key", openbao)
    else:
        key = _path(path.parent, doc["key"], f"{where}.key")
    crl = _path(path.parent, doc["crl"], f"{where}.crl") if doc.get("crl") is not None else None
    return TlsConfig(cert, key, ca, crl, openbao)


CAPACITY_KEYS = ("threads", "max_concurrent_rpcs", "max_streams", "streams_per_principal", "calls_per_principal")


def _capacity(path: Path, doc: dict[str, Any]) -> Capacity:
    """The server's capacity settings; a setting left out takes its default, ``max_streams`` and
    ``max_concurrent_rpcs`` derived from ``threads`` (half of them; eight times as many)."""
    try:
        threads = _int(doc, "threads", Capacity.threads, 2, 1024, "server")
        max_streams = _int(doc, "max_streams", max(1, threads // 2), 1, 1023, "server")
        return Capacity(
            threads=threads,
            max_concurrent_rpcs=_int(doc, "max_concurrent_rpcs", 8 * threads, 2, 100_000, "server"),
            max_streams=max_streams,
            streams_per_principal=_int(doc, "streams_per_principal", min(Capacity.streams_per_principal, max_streams),
                                       1, 1023, "server"),
            calls_per_principal=_int(doc, "calls_per_principal", max(1, threads // 2), 1, 1023, "server"),
        )
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def _server(path: Path, doc: Any, openbao: OpenBaoSettings | None) -> ServerConfig:
    doc = _only(path, "server", doc, {"listen", "tls"},
                {"policy", "quorum_policy", "health_listen", "health_check_seconds", "drain_seconds", "replica",
                 *CAPACITY_KEYS})
    listen = doc["listen"]
    if not isinstance(listen, str) or ":" not in listen:
        raise ConfigError(f"{path}: server.listen must be host:port")
    health = doc.get("health_listen", HEALTH_LISTEN_AUTO)
    if health is False or health == "off":  # YAML reads a bare off as false
        health = None
    elif not isinstance(health, str) or (health != HEALTH_LISTEN_AUTO and ":" not in health):
        raise ConfigError(f"{path}: server.health_listen must be host:port, auto or off")
    policy, quorum = doc.get("policy"), doc.get("quorum_policy")
    return ServerConfig(listen, _tls(path, doc["tls"], "server.tls", openbao),
                        _path(path.parent, policy, "server.policy") if policy else None,
                        _path(path.parent, quorum, "server.quorum_policy") if quorum else None,
                        health_listen=health,
                        health_check_seconds=_int(doc, "health_check_seconds", 5, 1, 3600, "server"),
                        drain_seconds=_int(doc, "drain_seconds", 30, 0, 3600, "server"),
                        capacity=_capacity(path, doc),
                        replica=_replica(path, doc.get("replica")))


#: ``server.replica``: what a replica is called where several share one database (letters, digits, ``.``, ``_``,
#: ``-``; it fits ``audit_checkpoints.replica``).
REPLICA = re.compile(r"[A-Za-z0-9._-]{1,64}")


def default_replica(port: int) -> str:
    """``<hostname>-<port>``, the replica's name when ``server.replica`` is not set: unique among replicas on
    distinct hosts or ports (the host name's first label, cut to fit; a character outside REPLICA becomes ``-``)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0]) or "localhost"
    return f"{host[:63 - len(str(port))]}-{port}"


def _replica(path: Path, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not REPLICA.fullmatch(value):
        raise ConfigError(f"{path}: server.replica must be 1 to 64 letters, digits, '.', '_' or '-'")
    return value


def _client(path: Path, doc: Any, where: str = "client", openbao: OpenBaoSettings | None = None) -> ClientConfig:
    doc = _only(path, where, doc, {"server", "tls"}, {"approval_key"})
    try:
        server = ",".join(str(e) for e in endpoints(doc["server"]))
    except ValueError as error:
        raise ConfigError(f"{path}: {where}.server: {error}") from None
    key = doc.get("approval_key")
    return ClientConfig(path, server, _tls(path, doc["tls"], f"{where}.tls", openbao),
                        _path(path.parent, key, f"{where}.approval_key") if key else None)


def load_client(path: Path) -> ClientConfig:
    """A client configuration file (an officer's or auditor's): just the 'client' section."""
    path = path.resolve()
    doc = _only(path, "top level", _read(path), {"client"}, {"openbao"})
    return _client(path, doc["client"], openbao=_openbao(path, doc.get("openbao")))


def load(path: Path) -> Config:
    path = path.resolve()
    doc = _only(path, "top level", _read(path), {"hsm", "database"},
                {"domains", "profiles", "workers_per_domain", "recycle_after_keys", "server", "audit", "openbao",
                 "workers", "worker"})
    openbao = _openbao(path, doc.get("openbao"))
    workers = _workers(path, doc.get("workers"))
    domains_doc = _only(path, "domains", doc.get("domains") or {}, set(), set(DOMAINS))
    domains = {}
    for name, body in domains_doc.items():
        body = _only(path, f"domains.{name}", body, {"token"} if name in workers else {"token", "pin"}, {"pin"})
        domains[name] = DomainConfig(
            name=name, token=str(body["token"]),
            pin=_reference(path, body["pin"], f"domains.{name}.pin", openbao) if "pin" in body else None,
        )
    # An audit worker's configuration holds only the audit section (kms worker --audit).
    if "domains" not in doc and ("audit" not in doc or "server" in doc):
        raise ConfigError(f"{path}: top level: missing setting 'domains'")
    if not domains and "domains" in doc:
        raise ConfigError(f"{path}: domains: at least one domain is needed")
    for name in workers:
        if name != "audit" and name not in domains:
            raise ConfigError(f"{path}: workers.{name}: the {name} domain is not configured (domains.{name})")
    if "audit" in workers and "audit" not in doc:
        raise ConfigError(f"{path}: workers.audit: there is no 'audit' section")
    return Config(
        path=path,
        hsm=_hsm(path, doc["hsm"]),
        domains=domains,
        database_setting=_database(path, doc["database"], openbao),
        profiles=_path(path.parent, doc.get("profiles", "profiles"), "profiles"),
        workers_per_domain=_int(doc, "workers_per_domain", 1, 1, 64, "workers_per_domain"),
        recycle_after_keys=_int(doc, "recycle_after_keys", 200_000, 1_000, 100_000_000, "recycle_after_keys"),
        server=_server(path, doc["server"], openbao) if "server" in doc else None,
        audit=_audit(path, doc["audit"], openbao, remote="audit" in workers) if "audit" in doc else None,
        openbao=openbao,
        workers=workers,
        worker=_worker(path, doc["worker"]) if "worker" in doc else None,
    )


def unix_socket(path: Path, value: Any, where: str) -> str:
    """``unix:PATH``, the path made absolute (taken from the configuration file's directory) and short enough for a
    socket address."""
    if not isinstance(value, str) or not value.startswith("unix:") or not value[len("unix:"):]:
        raise ConfigError(f"{path}: {where} must be unix:PATH (a Unix socket)")
    socket_path = _path(path.parent, value[len("unix:"):], where)
    if len(str(socket_path).encode()) > 107:
        raise ConfigError(f"{path}: {where}: the socket path is longer than 107 bytes")
    return f"unix:{socket_path}"


def _workers(path: Path, doc: Any) -> dict[str, str]:
    if doc is None:
        return {}
    doc = _only(path, "workers", doc, set(), set(WORKER_NAMES))
    return {name: unix_socket(path, value, f"workers.{name}") for name, value in doc.items()}


def _worker(path: Path, doc: Any) -> WorkerConfig:
    doc = _only(path, "worker", doc, set(), {"listen", "socket_group", "pan_quota_per_hour", "officers"})
    group = doc.get("socket_group")
    if group is not None and (not isinstance(group, str) or not group):
        raise ConfigError(f"{path}: worker.socket_group must be a group name")
    return WorkerConfig(listen=unix_socket(path, doc["listen"], "worker.listen") if "listen" in doc else None,
                        socket_group=group,
                        pan_quota_per_hour=_int(doc, "pan_quota_per_hour", DEFAULT_PAN_QUOTA_PER_HOUR, 1,
                                                100_000_000, "worker"),
                        officers=_path(path.parent, doc["officers"], "worker.officers") if "officers" in doc else None)


def _audit(path: Path, doc: Any, openbao: OpenBaoSettings | None = None, remote: bool = False) -> AuditConfig:
    doc = _only(path, "audit", doc, {"token"} if remote else {"token", "pin"},
                {"pin", "checkpoint_records", "checkpoint_seconds", "anchor"})
    return AuditConfig(
        token=str(doc["token"]),
        pin=_reference(path, doc["pin"], "audit.pin", openbao) if "pin" in doc else None,
        checkpoint_records=_int(doc, "checkpoint_records", 1_000, 1, 10_000_000, "audit"),
        checkpoint_seconds=_int(doc, "checkpoint_seconds", 60, 1, 86_400, "audit"),
        anchor=_anchor(path, doc["anchor"], openbao is not None) if "anchor" in doc else None,
    )


_KV_MOUNT = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")
_KV_PREFIX = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


def _anchor(path: Path, doc: Any, openbao: bool) -> AnchorConfig:
    doc = _only(path, "audit.anchor", doc or {}, set(), {"mount", "prefix", "spool"})
    mount, prefix = doc.get("mount", AnchorConfig.mount), doc.get("prefix", AnchorConfig.prefix)
    if not isinstance(mount, str) or not _KV_MOUNT.fullmatch(mount):
        raise ConfigError(f"{path}: audit.anchor.mount must be a KV v2 mount path, e.g. kv")
    if not isinstance(prefix, str) or not _KV_PREFIX.fullmatch(prefix) or ".." in prefix.split("/"):
        raise ConfigError(f"{path}: audit.anchor.prefix must be a path inside the mount, e.g. kms/audit")
    if not openbao:
        raise ConfigError(f"{path}: audit.anchor needs the top-level 'openbao' block (the connection and AppRole)")
    spool = doc.get("spool")
    return AnchorConfig(mount, prefix, _path(path.parent, spool if spool else "audit-anchor", "audit.anchor.spool"))


def load_station(path: Path) -> StationConfig:
    path = path.resolve()
    doc = _only(path, "top level", _read(path), {"station", "bureau", "hsm", "token", "pin", "trust", "ledger",
                                                  "domains"}, {"client", "openbao"})
    openbao = _openbao(path, doc.get("openbao"))
    domains = doc["domains"]
    if not isinstance(domains, list) or not domains or any(d not in DOMAINS for d in domains):
        raise ConfigError(f"{path}: domains must list hrss and/or bank")
    return StationConfig(
        path=path, name=str(doc["station"]), bureau=str(doc["bureau"]), hsm=_hsm(path, doc["hsm"]),
        token=str(doc["token"]), pin=_reference(path, doc["pin"], "pin", openbao),
        trust=_path(path.parent, doc["trust"], "trust"), ledger=_sqlite_url(path.parent, doc["ledger"], "ledger"),
        domains=tuple(domains),
        client=_client(path, doc["client"], openbao=openbao) if "client" in doc else None,
        openbao=openbao,
    )


# -- secrets: references, the database URL, the openbao block (kms.secrets) -----------------------------------------


def _reference(path: Path, value: Any, where: str, openbao: OpenBaoSettings | None) -> SecretRef:
    """A secret reference; a ``vault:`` one only with an ``openbao`` block in the same file."""
    ref = SecretRef.parse(str(value), base_dir=path.parent, field=where)
    if ref.scheme == "vault" and openbao is None:
        raise ConfigError(f"{path}: {where}: a vault reference needs an 'openbao' block in this file")
    return ref


def _database(path: Path, doc: Any, openbao: OpenBaoSettings | None) -> DatabaseSetting:
    if isinstance(doc, dict):
        body = _only(path, "database", doc, {"url"}, {"password"})
        setting = _database(path, body["url"], openbao)
        if "password" not in body:
            return setting
        if not isinstance(setting.url, str) or setting.url.startswith("sqlite"):
            raise ConfigError(f"{path}: database.password goes with a database.url that is a server's URL "
                              "(written out, without a password)")
        if urlsplit(setting.url).password is not None:
            raise ConfigError(f"{path}: database.url has a password already; with database.password it must not")
        return DatabaseSetting(setting.url, _reference(path, body["password"], "database.password", openbao))
    if isinstance(doc, str) and doc.split(":", 1)[0] in ("env", "file", "vault") and "://" not in doc:
        return DatabaseSetting(_reference(path, doc, "database", openbao))
    return DatabaseSetting(_sqlite_url(path.parent, doc, "database"))


def _database_url(setting: DatabaseSetting, secret: Any) -> str:
    """The URL of a DatabaseSetting; ``secret`` resolves a reference (Config.secret)."""
    if isinstance(setting.url, SecretRef):
        try:
            url = str(secret(setting.url)).strip()
        except ConfigError as error:
            raise ConfigError(f"database: {error}") from None
        if "://" not in url:
            raise ConfigError(f"database: the secret {setting.url} is not a database URL")
        return url
    if setting.password is None:
        return setting.url
    try:
        password = str(secret(setting.password))
    except ConfigError as error:
        raise ConfigError(f"database.password: {error}") from None
    parts = urlsplit(setting.url)
    user, _, host = parts.netloc.rpartition("@")
    if not user:
        raise ConfigError("database.url: a database.password needs a user name in the URL (user@host)")
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _openbao(path: Path, doc: Any) -> OpenBaoSettings | None:
    """The ``openbao`` block: address, ca_cert, approle (mount, role_id, secret_id or wrapped_secret_id), and
    cache_seconds, timeout_seconds."""
    if doc is None:
        return None
    doc = _only(path, "openbao", doc, {"address", "approle"}, {"ca_cert", "cache_seconds", "timeout_seconds"})
    address = doc["address"]
    try:
        check_address(address if isinstance(address, str) else repr(address))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    role = _only(path, "openbao.approle", doc["approle"], {"role_id"}, {"mount", "secret_id", "wrapped_secret_id"})
    ca = doc.get("ca_cert")

    def ref(key: str) -> SecretRef | None:
        value = role.get(key)
        return SecretRef.parse(str(value), base_dir=path.parent, field=f"openbao.approle.{key}") \
            if value is not None else None

    role_id = ref("role_id")
    assert role_id is not None
    mount = role.get("mount", "approle")
    if not isinstance(mount, str) or not mount or "/" in mount.strip("/"):
        raise ConfigError(f"{path}: openbao.approle.mount must be the name of the AppRole mount, e.g. approle")
    try:
        return OpenBaoSettings(
            address=address.rstrip("/"), role_id=role_id, secret_id=ref("secret_id"),
            wrapped_secret_id=ref("wrapped_secret_id"),
            ca_cert=_path(path.parent, ca, "openbao.ca_cert") if ca is not None else None,
            approle_mount=mount.strip("/"),
            cache_seconds=_int(doc, "cache_seconds", 300, 0, 86_400, "openbao"),
            timeout_seconds=float(_int(doc, "timeout_seconds", 10, 1, 300, "openbao")),
        )
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
