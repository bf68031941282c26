"""A development home: SoftHSM2 tokens, keys and configuration for trying kms on one machine (``kms init``).

Layout under the home directory:
  hsm/softhsm2.conf, hsm/tokens/   one SoftHSM2 token per domain (kms-hrss, kms-bank) and per station
  pins/                            random user and SO PINs, one file each (mode 0600), referenced as file:...
  kms.yaml                         the issuer configuration; kms.db the key registry
  profiles/                        card profiles (a copy of kms/policies/profiles)
  trust/                           the domains' published issuance signing keys (what stations trust)
  stations/<name>/station.yaml     a station's configuration; ledger.db its opened-bundle ledger
  pki/                             the development CA (ca.pem, ca.key), its revocation list crl.pem, certificates
Every file is 0600 and every directory 0700, the home included (kms.files).

Each domain's keys are set up in a process of its own that reads only that domain's PIN, and each station's in
another: the bureau's transport key goes from the domain's token to the station's token wrapped under the station's
RSA key, so no clear key exists outside a token. Creating keys this way (no quorum) is a development shortcut;
production key ceremonies run under dual control.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_public_key
from cryptography.x509 import load_pem_x509_certificate

from kms import config as config_mod
from kms import runtime, store
from kms.audit.log import AuditLog
from kms.cards import profiles
from kms.ceremony.binding import write_trust_file
from kms.ceremony.keyops import CUSTODY_NAME
from kms.ceremony.officers import ApprovalKeyFile, OfficerStore, public_pem
from kms.ceremony.rules import QuorumPolicy, approval_message
from kms.ceremony.store import Ceremonies
from kms.clock import SystemClock
from kms.dev.pki import Credential, DevPki
from kms.errors import ConfigError
from kms.files import PRIVATE_DIR, private_dir, write_private
from kms.hsm import softhsm
from kms.hsm.labels import AUDIT_KEY, AUDIT_TOKEN, domain_token, key_label, station_token
from kms.hsm.types import Algorithm, KcvMethod, SignatureAlgorithm
from kms.identity import Principal
from kms.issuance import pans
from kms.issuance.sealer import SIGNING_KEYS
from kms.policies import shipped
from kms.principals import PrincipalRegistry, certificate_pin
from kms.registry import DOMAINS, KeyKind, KeyRegistry
from kms.secrets import SecretRef
from kms.station import accept_transport_key, new_unwrap_key, pem_spki, spki_pem, spki_sha256

T = TypeVar("T")
#: bureau-a is the issuer's in-house personalization centre; bureau-b an outsourced bureau (外包单位).
DEFAULT_BUREAUS: Mapping[str, tuple[str, ...]] = {"bureau-a": ("station-a1",), "bureau-b": ("station-b1",)}
#: Officers per domain, and the auditor, who get client certificates in a development home.
#: Three per domain, so that a proposer and two approvers (or custodians) can run each ceremony.
OFFICERS: Mapping[str, tuple[str, ...]] = {"hrss": ("alice", "bob", "chen"), "bank": ("carol", "dave", "frank")}
OFFICER_ROLES = ("approver", "key-custodian")
AUDITORS = ("erin",)
DEFAULT_PORT = 7443
GENESIS = "genesis"
#: Development homes record the layout they were made with; an older one is refused rather than half upgraded.
#: 2: officers' approval keys, custody keys, genesis ceremonies; 3: the audit token and key; 4: the principal
#: registry (certificate pins of officers, stations and auditors)
HOME_FORMAT = 4
FORMAT_FILE = ".kms-home-format"
#: The card profile a home gets unless told otherwise (kms/policies/profiles/dual-app.yaml).
DEFAULT_PROFILES = ("dual-app",)
#: The mechanism profile (kms/hsm/mechanisms/) of the development SM token, written into the configurations of a
#: home whose profiles use SM4 or SM2.
SM_MECHANISMS = "softhsm2-sm-dev"
#: KCV methods of the master keys a home creates, by algorithm.
_MASTER_KCV = {Algorithm.DES2: KcvMethod.TDES_ECB_ZERO, Algorithm.SM4: KcvMethod.SM4_ECB_ZERO}
_TRANSPORT_KCV = {Algorithm.AES256: KcvMethod.AES_ECB_ZERO, Algorithm.SM4: KcvMethod.SM4_ECB_ZERO}


def profile_file(name: str) -> Path:
    """A card profile to put into a home: a shipped profile by its file's stem (``dual-app-sm``) or its profile name
    (``dual-app-sm-v1``), or the path of a profile file. ConfigError listing the shipped ones otherwise."""
    directory = shipped("profiles")
    candidates = [directory / f"{name}.yaml", directory / f"{name.removesuffix('-v1')}.yaml"]
    if name.endswith((".yaml", ".yml")) or "/" in name:
        candidates = [Path(name)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
    raise ConfigError(f"--profile: no card profile {name!r} (shipped: {known}; or the path of a profile file)")


def uses_sm(profile: profiles.Profile) -> bool:
    """Whether a profile needs SM mechanisms: SM4 card keys, SM4 transport keys or SM2-signed sections."""
    return any(spec.algorithm is Algorithm.SM4 for d in profile.domains for spec in profile.keys(d)) or any(
        profile.transport(d) is Algorithm.SM4 or profile.signature(d) is SignatureAlgorithm.SM2_SM3
        for d in profile.domains)


def sm_token_module() -> str:
    """The development SM token's PKCS#11 module (kms.dev.smtoken), or ConfigError saying how to build it."""
    from kms.dev.smtoken import sm_module

    module = sm_module()
    if module is None:
        raise ConfigError("the development SM token is not built: run `make sm-token` (deploy/softhsm2-sm/build.sh, "
                          "see deploy/softhsm2-sm/README.md), or name its module with --module")
    return module


def home_format(path: Path) -> int:
    """The layout version of the development home at ``path`` (0: none recorded, or no home)."""
    try:
        return int((path / FORMAT_FILE).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return 0


@dataclass(frozen=True)
class Home:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "kms.yaml"

    def station_config(self, station: str) -> Path:
        return self.path / "stations" / station / "station.yaml"

    def client_config(self, principal: Principal) -> Path:
        """An officer's or auditor's client configuration: clients/<role>-<domain>-<name>.yaml."""
        return self.path / "clients" / (principal.uri().removeprefix("urn:kms:").replace(":", "-") + ".yaml")

    def officers_file(self, domain: str) -> Path:
        """The domain's officers as its worker service trusts them (``worker.officers``, kms.ceremony.binding),
        written at genesis."""
        return self.path / f"officers-{domain}.yaml"

    def approval_key(self, officer: Principal) -> Path:
        """An officer's approval key file (development; production: the officer's smartcard)."""
        return self.client_config(officer).with_suffix(".approval-key.pem")

    @property
    def softhsm2_conf(self) -> Path:
        return self.path / "hsm" / "softhsm2.conf"


def init_home(
    path: Path,
    *,
    bureaus: Mapping[str, tuple[str, ...]] = DEFAULT_BUREAUS,
    master_keys: Mapping[tuple[str, str], bytes] | None = None,
    module: str = "auto",
    port: int = DEFAULT_PORT,
    database: str = "sqlite:///kms.db",
    card_profiles: Sequence[str] = DEFAULT_PROFILES,
) -> Home:
    """Create (or complete) a development home. ``master_keys`` imports known test values for (domain, name);
    every other master key the profiles need is generated inside the token. ``database``: the records' URL written
    into a new kms.yaml (default: SQLite in the home; the cluster run gives a PostgreSQL schema of its own).
    ``card_profiles``: the card profiles the home gets (``profile_file``: shipped names or files; default dual-app);
    a profile using SM4 or SM2 makes the home use the development SM token (``module`` "auto": kms.dev.smtoken's;
    ``hsm.mechanisms: softhsm2-sm-dev`` in every configuration) and creates the SM4 master keys, SM4 transport keys
    and SM2 signing keys it names. Idempotent: a profile named for an existing home is added to it."""
    chosen = [profile_file(name) for name in card_profiles]
    sm = any(uses_sm(profiles.load(p)) for p in chosen)
    if sm and module == "auto":
        module = sm_token_module()
    hsm = {"module": module, "softhsm2_conf": "hsm/softhsm2.conf", **({"mechanisms": SM_MECHANISMS} if sm else {})}
    home = Home(path.resolve())
    if home.config.exists() and home_format(home.path) < HOME_FORMAT:
        raise ConfigError(f"{home.path} was made by an older kms (no principal registry, certificate pins, audit "
                          "token or ceremony records); create a new home")
    if sm and home.config.exists():
        made = (yaml.safe_load(home.config.read_text(encoding="utf-8")) or {}).get("hsm") or {}
        if made.get("mechanisms") != SM_MECHANISMS:
            raise ConfigError(f"{home.path} was made for a token without SM mechanisms (no hsm.mechanisms: "
                              f"{SM_MECHANISMS}); an SM profile needs a new home")
    private_dir(home.path)
    os.chmod(home.path, PRIVATE_DIR)  # the home holds PINs, the CA key and card data: its owner's alone
    write_private(home.path / FORMAT_FILE, f"{HOME_FORMAT}\n")
    conf = softhsm.write_conf(home.path / "hsm")
    pins = home.path / "pins"
    for domain in DOMAINS:
        softhsm.ensure_token(conf, domain_token(domain), pins / f"{domain}.pin", pins / f"{domain}.so-pin")
    softhsm.ensure_token(conf, AUDIT_TOKEN, pins / "audit.pin", pins / "audit.so-pin")
    stations = [(bureau, station) for bureau, names in bureaus.items() for station in names]
    for _, station in stations:
        softhsm.ensure_token(conf, station_token(station), pins / f"{station}.pin", pins / f"{station}.so-pin")

    profiles_dir = private_dir(home.path / "profiles")
    for source in chosen:
        if not (profiles_dir / source.name).exists():
            write_private(profiles_dir / source.name, source.read_bytes())
    pki = DevPki(home.path / "pki")
    server = pki.server()
    if not home.config.exists():
        _write_yaml(home.config, {
            "hsm": hsm,
            "domains": {d: {"token": domain_token(d), "pin": f"file:pins/{d}.pin"} for d in DOMAINS},
            "database": database,
            "profiles": "profiles",
            "workers_per_domain": 1,
            "server": {"listen": f"127.0.0.1:{port}", "tls": _tls(home.path, server, pki)},
            "audit": {"token": AUDIT_TOKEN, "pin": "file:pins/audit.pin", "checkpoint_records": 1000,
                      "checkpoint_seconds": 60},
        })
    for bureau, station in stations:
        station_path = home.station_config(station)
        if not station_path.exists():
            cred = pki.client(Principal("station", station, bureau=bureau))
            _write_yaml(station_path, {
                "station": station, "bureau": bureau,
                "hsm": {**hsm, "softhsm2_conf": "../../hsm/softhsm2.conf"},
                "token": station_token(station), "pin": f"file:../../pins/{station}.pin",
                "trust": "../../trust", "ledger": "sqlite:///ledger.db", "domains": list(DOMAINS),
                "client": {"server": f"localhost:{port}", "tls": _tls(station_path.parent, cred, pki)},
            })
    people = [Principal("officer", name, domain=domain) for domain, names in OFFICERS.items() for name in names]
    people += [Principal("auditor", name) for name in AUDITORS]
    for person in people:
        path = home.client_config(person)
        if not path.exists():
            cred = pki.client(person)
            client = {"server": f"localhost:{port}", "tls": _tls(path.parent, cred, pki)}
            if person.role == "officer":
                ApprovalKeyFile.create(home.approval_key(person))
                client["approval_key"] = home.approval_key(person).name
            _write_yaml(path, {"client": client})

    _create_database(home)
    _in_own_process(_audit_setup, str(home.config))
    known = dict(master_keys or {})
    # The transport keys still to make (one per bureau, domain and algorithm), each handed to the bureau's station
    # under an RSA key pair the station makes for that one hand-off and destroys once it unwrapped it.
    plan = _transport_plan(home.config, bureaus)
    unwrap_keys: dict[tuple[str, str, str], bytes] = {}
    for _, station in stations:
        wanted = [(domain, algorithm) for domain, items in plan.items() for _, s, algorithm in items if s == station]
        if wanted:
            made = _in_own_process(_station_unwrap_keys, str(home.station_config(station)), wanted)
            unwrap_keys.update({(station, domain, algorithm): spki for (domain, algorithm), spki in made.items()})
    for domain in DOMAINS:
        todo = [(bureau, algorithm, station, unwrap_keys[(station, domain, algorithm)])
                for bureau, station, algorithm in plan[domain]]
        handoffs = _in_own_process(_domain_setup, str(home.config), domain, todo, known)
        _in_own_process(_trust_custody_key, str(home.config), domain, str(pins / f"{domain}.so-pin"))
        for station, (bureau, version, algorithm, wrapped, kcv, spki) in handoffs:
            _in_own_process(_station_accept, str(home.station_config(station)), domain, bureau, version, algorithm,
                            wrapped, kcv, spki_sha256(spki))
        _genesis(home, domain, pki, stations)
    return home


def _transport_plan(config_path: Path, bureaus: Mapping[str, tuple[str, ...]]
                    ) -> dict[str, list[tuple[str, str, str]]]:
    """Per domain, the transport keys the home's profiles need that are not made yet: (bureau, station, algorithm)
    for each bureau and algorithm the profiles name for that domain (its only station receives it). Reads the
    profiles and the key registry, no token."""
    cfg = config_mod.load(config_path)
    registry = runtime.registry(cfg, SystemClock())
    loaded = profiles.load_dir(cfg.profiles).values()
    plan: dict[str, list[tuple[str, str, str]]] = {}
    for domain in DOMAINS:
        transports = {p.transport(domain) for p in loaded if p.keys(domain)} or {Algorithm.AES256}
        plan[domain] = []
        for bureau, names in bureaus.items():
            if len(names) != 1:
                raise ConfigError("development homes give each bureau exactly one station")
            made = {r.algorithm for r in registry.versions(domain, KeyKind.TRANSPORT, bureau)}
            plan[domain] += [(bureau, names[0], a.value) for a in sorted(transports) if a.value not in made]
    return plan


def _create_database(home: Home) -> None:
    """The records database at this kms's schema revision: created if empty; a home whose database is at another
    revision is refused with the line naming `kms db upgrade` (kms.store.require_current)."""
    engine = store.make_engine(config_mod.load(home.config).database)
    try:
        store.require_current(engine, create=True, config=home.config)
    finally:
        engine.dispose()


def _audit_setup(config_path: str) -> None:
    """In a process of its own, the only one reading the audit token's PIN: the audit signing key, and its public
    key published as audit/audit-v1.pem for auditors (apart from trust/, which stations read)."""
    cfg = config_mod.load(Path(config_path))
    assert cfg.audit is not None
    trust = private_dir(cfg.home / "audit")
    assert cfg.audit.pin is not None  # a development home's own configuration holds every PIN
    with runtime.module(cfg.hsm).open(cfg.audit.token, cfg.secret(cfg.audit.pin)) as session:
        if session.has_public_key(AUDIT_KEY):
            spki = session.public_key(AUDIT_KEY)
        else:
            spki = session.generate_signing_key(AUDIT_KEY)
    pem = load_der_public_key(spki).public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    write_private(trust / "audit-v1.pem", pem)


def _genesis(home: Home, domain: str, pki: DevPki, stations: list[tuple[str, str]]) -> None:
    """The genesis ceremony of a domain: its first officers, enrolled with their approval public keys and pinned
    to their client certificates, and the stations and auditors the domain trusts from the start (each pinned to its
    certificate). The first officer proposes the list; every listed officer, the proposer included, signs it with
    their own approval key (proof of possession)."""
    cfg = config_mod.load(home.config)
    engine = store.make_engine(cfg.database)
    store.require_current(engine, config=home.config)
    clock = SystemClock()
    audit = AuditLog(engine, clock)
    officer_store = OfficerStore(engine, clock, audit)
    if officer_store.all(domain):
        return
    people = [Principal("officer", name, domain=domain) for name in OFFICERS[domain]]
    keys = {p: ApprovalKeyFile(home.approval_key(p)) for p in people}
    grantees = [Principal("station", name, bureau=bureau) for bureau, name in stations]
    grantees += [Principal("auditor", name) for name in AUDITORS]
    pins = {p: _pin(pki.client(p)) for p in [*people, *grantees]}
    listed = [{"name": p.name, "roles": list(OFFICER_ROLES), "public_key": public_pem(keys[p].public_key()),
               "cert_sha256": pins[p]} for p in people]
    trusted = [{"principal": p.uri(), "cert_sha256": pins[p]} for p in grantees]
    ceremonies = Ceremonies(engine, clock, QuorumPolicy.load(), officer_store, audit)
    record = ceremonies.propose(people[0], GENESIS, {"officers": listed, "principals": trusted},
                                quorum_required=False)
    message = approval_message(record.proposal)
    for person in people:
        ceremonies.add_genesis_signature(record.ceremony_id, person, keys[person].sign(message))
    for person in people:
        officer_store.enrol(person, OFFICER_ROLES, public_pem(keys[person].public_key()), record.ceremony_id,
                            cert_sha256=pins[person])
    registry = PrincipalRegistry(engine, clock, audit)
    for grantee in grantees:
        registry.register(grantee, domain, pins[grantee], record.ceremony_id)
    ceremonies.record_executed(record, {"officers": [p.uri() for p in people],
                                        "principals": [p.uri() for p in grantees]}, people[0])
    write_trust_file(home.officers_file(domain), domain,
                     [(p.name, OFFICER_ROLES, public_pem(keys[p].public_key())) for p in people])


def _pin(cred: Credential) -> str:
    return certificate_pin(load_pem_x509_certificate(cred.cert.read_bytes()))


def _trust_custody_key(config_path: str, domain: str, so_pin_file: str) -> None:
    """As the domain token's security officer (in a process of its own, the only one reading the SO PIN): mark the
    custody key's public half trusted, the one key escrowable keys may be wrapped under."""
    cfg = config_mod.load(Path(config_path))
    registry = runtime.registry(cfg, SystemClock())
    custody = registry.active(domain, KeyKind.CUSTODY, CUSTODY_NAME)
    assert custody.public_key is not None
    so_pin = cfg.secret(SecretRef.parse(f"file:{so_pin_file}"))
    runtime.module(cfg.hsm).trust_custody_key(cfg.domains[domain].token, so_pin, custody.label, custody.public_key)


def _in_own_process(function: Callable[..., T], *args: object) -> T:
    """Run one setup step in a fresh process, so that each reads only its own token's PIN."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _tls(base: Path, cred: Credential, pki: DevPki) -> dict[str, str]:
    """TLS file paths relative to the directory of the config that names them; ``crl`` is the development CA's
    revocation list (kms.revocation; ``kms dev revoke-certificate`` adds to it)."""
    return {"cert": os.path.relpath(cred.cert, base), "key": os.path.relpath(cred.key, base),
            "ca": os.path.relpath(pki.ca.cert, base), "crl": os.path.relpath(pki.crl, base)}


def _write_yaml(path: Path, data: object) -> None:
    write_private(path, yaml.safe_dump(data, sort_keys=False))


def _station_unwrap_keys(station_config: str, wanted: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    """In the station's process: a new single-use RSA unwrap key pair for each (domain, algorithm) hand-off it is
    to receive; returns their public keys (SPKI DER)."""
    cfg = config_mod.load_station(Path(station_config))
    with runtime.open_station(cfg) as session:
        return {(domain, algorithm): pem_spki(new_unwrap_key(session, cfg.name, domain).pem.encode(), "unwrap key")
                for domain, algorithm in wanted}


def _domain_setup(
    config_path: str,
    domain: str,
    transports: Sequence[tuple[str, str, str, bytes]],
    known: Mapping[tuple[str, str], bytes],
) -> list[tuple[str, tuple[str, int, str, bytes, bytes, bytes]]]:
    """In the domain's own process: master keys, the issuance signing keys, and the transport keys of
    ``transports`` (bureau, algorithm, station, the station's single-use unwrap public key; an SM4 one as another
    version of the bureau's transport key). Returns, per station, each transport key wrapped for it: (station,
    (bureau, version, algorithm, wrapped, KCV, unwrap public key))."""
    cfg = config_mod.load(Path(config_path))
    registry = runtime.registry(cfg, SystemClock())
    needed: dict[str, Algorithm] = {}
    signatures = {SignatureAlgorithm.ECDSA_P256_SHA256}  # always: it also signs the domain's ceremony minutes
    for profile in profiles.load_dir(cfg.profiles).values():
        if not profile.keys(domain):
            continue
        for spec in profile.keys(domain):
            if needed.setdefault(spec.master_key, spec.algorithm) is not spec.algorithm:
                raise ConfigError(f"master key {spec.master_key}: the home's profiles need it as "
                                  f"{needed[spec.master_key]} and as {spec.algorithm}")
        signatures.add(profile.signature(domain))
    handoffs: list[tuple[str, tuple[str, int, str, bytes, bytes, bytes]]] = []
    with runtime.open_domain(cfg, domain) as session:
        existing = registry.names(domain, KeyKind.MASTER)
        for name, algorithm in sorted(needed.items()):
            if name in existing:
                continue
            if algorithm not in _MASTER_KCV:
                raise ConfigError(f"master key {name}: {algorithm} master keys are not created in a development home")
            value = known.get((domain, name))

            def create(label: str, value: bytes | None = value, algorithm: Algorithm = algorithm) -> bytes:
                if value is not None:
                    return session.import_master_key(label, algorithm, bytearray(value))
                return session.generate_master_key(label, algorithm)

            _add_key(registry, domain, KeyKind.MASTER, name, algorithm, create, _MASTER_KCV[algorithm])
        _add_key_pair(registry, domain, KeyKind.CUSTODY, CUSTODY_NAME, "RSA-3072", session.generate_custody_keypair)
        for signature in sorted(signatures):
            key_name, key_algorithm = SIGNING_KEYS[signature]

            def generate(label: str, signature: SignatureAlgorithm = signature) -> bytes:
                if signature is SignatureAlgorithm.ECDSA_P256_SHA256:
                    return session.generate_signing_key(label)
                return session.generate_signing_key(label, algorithm=signature)

            _add_key_pair(registry, domain, KeyKind.SIGNING, key_name, key_algorithm, generate)
            signing = registry.active(domain, KeyKind.SIGNING, key_name)
            assert signing.public_key is not None
            trust = private_dir(cfg.home / "trust")
            write_private(trust / f"{domain}-{key_name}-v{signing.version}.pem", spki_pem(signing.public_key))
        if domain == pans.DOMAIN:  # cardholder data at rest: the PAN encryption and index keys (kms.issuance.pans)
            existing_data = registry.names(domain, KeyKind.DATA)
            if pans.DATA_KEY not in existing_data:
                _add_key(registry, domain, KeyKind.DATA, pans.DATA_KEY, Algorithm.AES256, session.generate_data_key,
                         KcvMethod.AES_ECB_ZERO)
            if pans.INDEX_KEY not in existing_data:
                record = registry.add(domain, KeyKind.DATA, pans.INDEX_KEY, "HMAC-SHA256")
                registry.set_kcv(record, session.generate_index_key(record.label).hex().upper(),
                                 KcvMethod.HMAC_EMPTY.value)
        for bureau, algorithm_name, station, spki in transports:
            algorithm = Algorithm(algorithm_name)
            # One transport key per bureau, domain and algorithm; the bureau's station receives it.
            record = registry.add(domain, KeyKind.TRANSPORT, bureau, algorithm.value)
            try:
                wrapped, kcv = (
                    session.generate_transport_key_for(record.label, spki) if algorithm is Algorithm.AES256 else
                    session.generate_transport_key_for(record.label, spki, algorithm=algorithm))
            except BaseException:
                registry.remove(record)
                raise
            registry.set_kcv(record, kcv.hex().upper(), _TRANSPORT_KCV[algorithm].value)
            handoffs.append((station, (bureau, record.version, algorithm.value, wrapped, kcv, spki)))
    return handoffs


def _add_key(registry: KeyRegistry, domain: str, kind: KeyKind, name: str, algorithm: Algorithm,
             create: Callable[[str], bytes], method: KcvMethod) -> None:
    record = registry.add(domain, kind, name, algorithm.value)
    try:
        kcv = create(record.label)
    except BaseException:
        registry.remove(record)
        raise
    registry.set_kcv(record, kcv.hex().upper(), method.value)


def _add_key_pair(registry: KeyRegistry, domain: str, kind: KeyKind, name: str, algorithm: str,
                  generate: Callable[[str], bytes]) -> None:
    """Unless registered already: a key pair generated in the token, its public key (SPKI DER) on record."""
    if name in registry.names(domain, kind):
        return
    record = registry.add(domain, kind, name, algorithm)
    try:
        spki = generate(record.label)
    except BaseException:
        registry.remove(record)
        raise
    registry.set_kcv(record, "", "", public_key=spki)


def _station_accept(station_config: str, domain: str, bureau: str, version: int, algorithm: str, wrapped: bytes,
                    kcv: bytes, unwrap_key_sha256: str) -> None:
    """In the station's process: accept the transport key and check its KCV against the issuer's (its single-use
    unwrap key is destroyed)."""
    cfg = config_mod.load_station(Path(station_config))
    label = key_label(domain, KeyKind.TRANSPORT, bureau, version)
    with runtime.open_station(cfg) as session:
        accept_transport_key(session, cfg.name, domain, label, wrapped, kcv.hex(), Algorithm(algorithm),
                             unwrap_key_sha256)


def master_key_names(cfg: config_mod.Config) -> dict[str, set[str]]:
    engine = store.make_engine(cfg.database)
    store.require_current(engine, config=cfg.path)
    return profiles.master_key_names(KeyRegistry(engine, SystemClock()))
