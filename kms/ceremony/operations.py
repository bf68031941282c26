"""The operations a ceremony can run: each one's parameters (checked when proposed, so approvers sign exactly what
will run) and what executing it does. HSM steps go to the domain's own worker (kms.ceremony.keyops through
``DomainPool.call``); after any key change the domain's workers are recycled so none serves a stale key version.

Parameters are canonical JSON (kms.canonical: strings, integers, lists, objects); flags are "yes"/"no".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kms import bundle
from kms.cards.profiles import Profile
from kms.ceremony import keyops
from kms.ceremony.handoffs import TransportHandoffs
from kms.ceremony.officers import OfficerStore, check_name, check_roles, parse_public_key
from kms.ceremony.store import Ceremonies, CeremonyRecord, check_kcv
from kms.errors import InvalidArgument, InvalidState, NotFound
from kms.hsm.mechanisms import MechanismProfile
from kms.hsm.types import Algorithm
from kms.identity import Principal, parse_uri
from kms.issuance.batches import BatchState, BatchStore
from kms.issuance.issuer import DomainPools
from kms.issuance.limits import LimitStore
from kms.issuance.limits import check_params as check_limits
from kms.issuance.workers import Pool
from kms.principals import PrincipalRegistry, parse_certificate
from kms.registry import KeyKind, KeyRecord, KeyRegistry, KeyState
from kms.station import spki_pem, spki_sha256
from kms.validation import NAME, unknown_keys

_SETTABLE_STATES = (KeyState.ACTIVE, KeyState.SUSPENDED, KeyState.DEACTIVATED, KeyState.COMPROMISED)
_KINDS = (KeyKind.MASTER, KeyKind.TRANSPORT)
#: The kinds set-key-state and destroy-key act on: also the domains' issuance signing keys (generate-signing-key).
_STATE_KINDS = (*_KINDS, KeyKind.SIGNING)
TRANSPORT_METHODS = ("rsa-oaep", "import-components", "export-components")
TRANSPORT_ALGORITHMS = (Algorithm.AES256.value, Algorithm.SM4.value)
MAX_INT = 2**31 - 1  # the largest integer parameter (key versions)


@dataclass
class Context:
    """What operations read and change."""

    registry: KeyRegistry
    officers: OfficerStore
    batches: BatchStore
    profiles: Mapping[str, Profile]
    ceremonies: Ceremonies
    handoffs: TransportHandoffs
    pools: DomainPools | None  # None where no HSM step is needed (tests of the protocol)
    principals: PrincipalRegistry | None = None  # stations' and auditors' registrations, officers' certificate pins
    limits: LimitStore | None = None  # issuance limits set by set-limits ceremonies (kms.issuance.limits)
    #: The mechanism profile of each domain whose workers this service spawns from its own configuration (SM4
    #: transport keys refused at proposal when it names no SM4); a worker service's domain is checked there.
    mechanisms: Mapping[str, MechanismProfile] = field(default_factory=dict)


Checker = Callable[[Context, str, Mapping[str, Any]], dict[str, Any]]
Runner = Callable[[Context, CeremonyRecord], dict[str, Any]]


@dataclass(frozen=True)
class Operation:
    name: str
    summary: str
    check: Checker
    run: Runner
    changes_keys: bool = True
    #: The parameters, as `kms ceremony propose --help` lists them (NAME=VALUE; [optional]; | alternatives).
    params: str = ""


# -- parameter helpers -------------------------------------------------------------------------------------------


def _only(params: Mapping[str, Any], required: set[str], optional: frozenset[str] | set[str] = frozenset()) -> None:
    for name in sorted(required - set(params)):
        raise InvalidArgument(f"params.{name}", "is required")
    for name in unknown_keys(params, required | optional):
        raise InvalidArgument(f"params.{name}", "is not a parameter of this operation")


def _str(params: Mapping[str, Any], name: str, pattern: re.Pattern[str] = NAME, what: str = "") -> str:
    value = params.get(name)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidArgument(f"params.{name}", what or "must be 1-64 of a-z 0-9 . _ - starting with a letter or digit")
    return value


def _choice(params: Mapping[str, Any], name: str, choices: tuple[str, ...], default: str | None = None) -> str:
    value = params.get(name, default)
    if value not in choices:
        raise InvalidArgument(f"params.{name}", f"must be one of {', '.join(choices)}")
    return str(value)


def _int(params: Mapping[str, Any], name: str) -> int:
    # Bounded to what every database stores (PostgreSQL INTEGER; SQLite overflows past 64 bits).
    value = params.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_INT:
        raise InvalidArgument(f"params.{name}", f"must be an integer from 1 to {MAX_INT}")
    return value


def _algorithm(params: Mapping[str, Any]) -> str:
    """A master key's algorithm (default DES2). SM4 is made only by a token that offers it (its mechanism profile
    names the vendor codes, kms.hsm.mechanisms); any other token refuses it at execution with MechanismUnavailable,
    and nothing is made."""
    return _choice(params, "algorithm", tuple(a.value for a in Algorithm), Algorithm.DES2.value)


def _custodians(ctx: Context, domain: str, params: Mapping[str, Any], name: str) -> list[str]:
    """Two or more distinct enrolled key custodians of the domain, by name."""
    value = params.get(name)
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"params.{name}", "must list at least 2 officers (split knowledge)")
    if len(set(value)) != len(value):
        raise InvalidArgument(f"params.{name}", "names an officer twice")
    active = ctx.officers.active(domain)
    for officer_name in value:
        officer = active.get(Principal("officer", officer_name, domain=domain))
        if officer is None:
            raise InvalidArgument(f"params.{name}", f"{officer_name} is not an active {domain} officer")
        if "key-custodian" not in officer.roles:
            raise InvalidArgument(f"params.{name}", f"{officer_name} lacks the key-custodian role")
    return sorted(value)


def _existing(ctx: Context, domain: str, params: Mapping[str, Any], kinds: tuple[KeyKind, ...] = _KINDS
              ) -> tuple[str, str, int]:
    kind = _choice(params, "kind", tuple(k.value for k in kinds), KeyKind.MASTER.value)
    name, version = _str(params, "name"), _int(params, "version")
    ctx.registry.get(domain, KeyKind(kind), name, version)  # NotFound names it
    return kind, name, version


def pool_for(ctx: Context, domain: str) -> Pool:
    if ctx.pools is None or domain not in ctx.pools.pools:
        raise InvalidState(f"no {domain} HSM worker is configured here")
    return ctx.pools.pools[domain]


def _yes(params: Mapping[str, Any], name: str = "escrow") -> bool:
    return params.get(name) == "yes"


def _custody_key(ctx: Context, domain: str, params: Mapping[str, Any]) -> str:
    """The fingerprint of the custody key components are to be encrypted to: signed with the proposal, checked by
    each custodian's client before encrypting, and again when the ceremony executes."""
    current = ctx.registry.active(domain, KeyKind.CUSTODY, keyops.CUSTODY_NAME)
    fingerprint = hashlib.sha256(current.public_key or b"").hexdigest()
    if "custody_key" in params and params["custody_key"] != fingerprint:
        raise InvalidArgument("params.custody_key", f"is not the {domain} custody key ({fingerprint})")
    return fingerprint


# -- operations --------------------------------------------------------------------------------------------------


def _check_enrol(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
    _only(p, {"name", "roles", "public_key", "certificate"}, {"cert_sha256"})
    name = check_name(p["name"] if isinstance(p["name"], str) else "", "params.name")
    pin = _pin(p, Principal("officer", name, domain=domain))
    roles = p["roles"]
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise InvalidArgument("params.roles", "must be a list of roles")
    chosen = check_roles(roles, "params.roles")
    pem = p["public_key"] if isinstance(p["public_key"], str) else ""
    parse_public_key(pem, "params.public_key")
    if Principal("officer", name, domain=domain) in {r.officer.principal for r in ctx.officers.all(domain)}:
        raise InvalidArgument("params.name", f"{name} is already a {domain} officer")
    if ctx.officers.key_in_use(pem):
        raise InvalidArgument("params.public_key", "is already an officer's approval key")
    return {"name": name, "roles": sorted(chosen), "public_key": pem, "certificate": p["certificate"],
            "cert_sha256": pin}


def _check_revoke(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
    _only(p, {"name"})
    name = check_name(p["name"] if isinstance(p["name"], str) else "", "params.name")
    if Principal("officer", name, domain=domain) not in ctx.officers.active(domain):
        raise InvalidArgument("params.name", f"{name} is not an active {domain} officer")
    return {"name": name}


def _run_revoke(ctx: Context, c: CeremonyRecord) -> dict[str, Any]:
    revoked = ctx.officers.revoke(Principal("officer", c.params["name"], domain=c.domain))
    return {"officer": revoked.officer.principal.uri(), "state": revoked.state}


def _run_enrol(ctx: Context, c: CeremonyRecord) -> dict[str, Any]:
    principal = Principal("officer", c.params["name"], domain=c.domain)
    ctx.officers.enrol(principal, c.params["roles"], c.params["public_key"], c.ceremony_id,
                       cert_sha256=c.params["cert_sha256"])
    return {"officer": principal.uri(), "roles": list(c.params["roles"]),
            "key_fingerprint": fingerprint(c.params["public_key"]), "cert_sha256": c.params["cert_sha256"]}


def _pin(p: Mapping[str, Any], principal: Principal) -> str:
    """The certificate pin of ``params.certificate`` (which must name ``principal``); a ``cert_sha256`` given with
    the proposal must be the same, so approvers can compare it with what the principal showed them."""
    pin = parse_certificate(p.get("certificate"), "params.certificate", principal)
    if "cert_sha256" in p and p["cert_sha256"] != pin:
        raise InvalidArgument("params.cert_sha256", f"is not the certificate's key ({pin})")
    return pin


def _registry(ctx: Context) -> PrincipalRegistry:
    if ctx.principals is None:
        raise InvalidState("no principal registry is configured here")
    return ctx.principals


def _grantee(p: Mapping[str, Any], role: str) -> Principal:
    if role == "station":
        return Principal("station", _str(p, "station"), bureau=_str(p, "bureau"))
    return Principal("auditor", check_name(p["name"] if isinstance(p.get("name"), str) else "", "params.name"))


def _check_register(role: str) -> Checker:
    """register-station (bureau, station, certificate) / enrol-auditor (name, certificate): this domain's trust in
    that principal, pinned to its certificate's key. Registering again with a new certificate moves the pin."""
    def check(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
        _only(p, {"bureau", "station", "certificate"} if role == "station" else {"name", "certificate"},
              {"cert_sha256"})
        principal = _grantee(p, role)
        return {**{k: p[k] for k in p if k != "cert_sha256"}, "principal": principal.uri(),
                "cert_sha256": _pin(p, principal)}
    return check


def _run_register(ctx: Context, c: CeremonyRecord) -> dict[str, Any]:
    principal = parse_uri(c.params["principal"])
    done = _registry(ctx).register(principal, c.domain, c.params["cert_sha256"], c.ceremony_id)
    return {"principal": principal.uri(), "domain": c.domain, "cert_sha256": done.cert_sha256, "state": done.state}


def _check_unregister(role: str) -> Checker:
    """revoke-station (bureau, station) / revoke-auditor (name): this domain no longer trusts that principal."""
    def check(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
        _only(p, {"bureau", "station"} if role == "station" else {"name"})
        principal = _grantee(p, role)
        if not _registry(ctx).active(principal, domain):
            raise InvalidArgument("params.station" if role == "station" else "params.name",
                                  f"{principal.uri()} is not registered for the {domain} domain")
        return {**dict(p), "principal": principal.uri()}
    return check


def _run_unregister(ctx: Context, c: CeremonyRecord) -> dict[str, Any]:
    principal = parse_uri(c.params["principal"])
    done = _registry(ctx).revoke(principal, c.domain, c.ceremony_id)
    return {"principal": principal.uri(), "domain": c.domain, "state": done.state}


def _check_renew(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
    """renew-certificate (name, certificate): an active officer of the domain now uses this certificate's key."""
    _only(p, {"name", "certificate"}, {"cert_sha256"})
    name = check_name(p["name"] if isinstance(p["name"], str) else "", "params.name")
    principal = Principal("officer", name, domain=domain)
    if principal not in ctx.officers.active(domain):
        raise InvalidArgument("params.name", f"{name} is not an active {domain} officer")
    return {"name": name, "certificate": p["certificate"], "cert_sha256": _pin(p, principal)}


def _run_renew(ctx: Context, c: CeremonyRecord) -> dict[str, Any]:
    principal = Principal("officer", c.params["name"], domain=c.domain)
    _registry(ctx).repin_officer(principal, c.params["cert_sha256"], c.ceremony_id)
    return {"officer": principal.uri(), "cert_sha256": c.params["cert_sha256"]}


def _check_generate(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
    _only(p, {"name"}, {"algorithm", "escrow"})
    return {"name": _str(p, "name"), "algorithm": _algorithm(p), "escrow": _choice(p, "escrow", ("yes", "no"), "no")}


def _check_rotate(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
    checked = _check_generate(ctx, domain, p)
    versions = ctx.registry.versions(domain, KeyKind.MASTER, checked["name"])
    if not versions:
        raise InvalidArgument("params.name", f"no {domain} master key {checked['name']} to rotate")
    checked["algorithm"] = versions[-1].algorithm
    checked["replaces_version"] = versions[-1].version
    return checked


def _run_generate(ctx: Context, c: CeremonyRecord) -> dict[str, Any]:
    p = c.params
    return dict(pool_for(ctx, c.domain).call(keyops.create_key, KeyKind.MASTER.value, p["name"], p["algorithm"],
                                             _yes(p), ceremony=c.ceremony_id))


def _check_import(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
    _only(p, {"name", "kcv", "custodians"}, {"algorithm", "escrow", "custody_key"})
    return {"name": _str(p, "name"), "algorithm": _algorithm(p), "escrow": _choice(p, "escrow", ("yes", "no"), "no"),
            "kcv": check_kcv(p["kcv"] if isinstance(p["kcv"], str) else "", "params.kcv"),
            "custodians": _custodians(ctx, domain, p, "custodians"), "custody_key": _custody_key(ctx, domain, p)}


def _run_import(ctx: Context, c: CeremonyRecord, kind: KeyKind = KeyKind.MASTER, name_param: str = "name"
                ) -> dict[str, Any]:
    p = c.params
    _custody_key(ctx, c.domain, p)  # still the key the components were encrypted to
    sealed = [(who.uri(), data, kcv) for who, data, kcv in ctx.ceremonies.sealed_components(c.ceremony_id, "in")]
    # A master key is active once its joined KCV matched; a transport key waits for its bureau (set-key-state).
    return dict(pool_for(ctx, c.domain).call(keyops.create_key, kind.value, p[name_param],
                                             p.get("algorithm", Algorithm.AES256.value), _yes(p), p["kcv"], sealed,
                                             kind is KeyKind.MASTER, ceremony=c.ceremony_id))


def _check_export(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
    _only(p, {"name", "version", "recipients"}, {"kind"})
    kind, name, version = _existing(ctx, domain, p)
    return {"kind": kind, "name": name, "version": version,
            "recipients": _custodians(ctx, domain, p, "recipients")}


def _run_export(ctx: Context, c: CeremonyRecord, kind: str | None = None, name: str | None = None,
                version: int | None = None) -> dict[str, Any]:
    p = c.params
    recipients = []
    for officer_name in p["recipients"]:
        record = ctx.officers.get(Principal("officer", officer_name, domain=c.domain))
        recipients.append((record.officer.principal.uri(), record.public_key_pem))
    outputs = pool_for(ctx, c.domain).call(keyops.export_components, kind or p["kind"], name or p["name"],
                                           version or p["version"], recipients, c.ceremony_id,
                                           ceremony=c.ceremony_id)
    ctx.ceremonies.store_outputs(c.ceremony_id, [(parse_uri(uri), sealed, kcv) for uri, sealed, kcv in outputs])
    return {"components": [{"custodian": uri, "kcv": kcv} for uri, _, kcv in outputs]}


def _transport_algorithm(ctx: Context, domain: str, p: Mapping[str, Any]) -> str:
    """A transport key's algorithm: AES256 (default) or SM4. SM4 is refused here when this service knows the
    domain's mechanism profile names no SM4 (its own workers); otherwise the domain's worker refuses it at execution
    if its token lacks SM4 (kms.ceremony.keyops.transport_algorithm_offered), before any key is made."""
    algorithm = _choice(p, "algorithm", TRANSPORT_ALGORITHMS, Algorithm.AES256.value)
    profile = ctx.mechanisms.get(domain)
    if algorithm == Algorithm.SM4.value and profile is not None and not profile.has_sm4:
        raise InvalidArgument("params.algorithm", f"SM4: the {domain} domain's mechanism profile {profile.name} "
                                                  "names no SM4 (configure hsm.mechanisms for a token with SM4)")
    return algorithm


def _handoff_key(ctx: Context, p: Mapping[str, Any]) -> tuple[str, bytes, str]:
    """The station's hand-off public key (PEM and SubjectPublicKeyInfo DER) and its SHA-256 (of the DER, hex). The
    key must be RSA of at least 2048 bits and new: a key a transport key was ever wrapped under is refused (hand-off
    keys are single use, docs/ceremonies.md section 4.4). A ``public_key_sha256`` given with the proposal must be the
    key's, so approvers can compare it with what the station showed them."""
    pem = p["public_key"] if isinstance(p.get("public_key"), str) else ""
    try:
        public = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise InvalidArgument("params.public_key", "is not a PEM public key") from None
    if not isinstance(public, rsa.RSAPublicKey) or public.key_size < 2048:
        raise InvalidArgument("params.public_key", "must be an RSA public key of at least 2048 bits")
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    sha256 = spki_sha256(der)
    if "public_key_sha256" in p and p["public_key_sha256"] != sha256:
        raise InvalidArgument("params.public_key_sha256", f"is not the public key's ({sha256})")
    if ctx.handoffs.used(sha256):
        raise InvalidArgument("params.public_key", "has received a transport key already: a station's unwrap key "
                                                   "serves one hand-off (make a new one with kms station unwrap-key)")
    return pem, der, sha256


def _check_transport(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
    method = _choice(p, "method", TRANSPORT_METHODS)
    bureau = _str(p, "bureau")
    if method == "rsa-oaep":
        _only(p, {"bureau", "method", "station", "public_key"}, {"algorithm", "public_key_sha256"})
        station = _str(p, "station")
        pem, _, sha256 = _handoff_key(ctx, p)
        receiver = Principal("station", station, bureau=bureau)
        if ctx.principals is not None and not ctx.principals.active(receiver, domain):
            raise InvalidArgument("params.station", f"{receiver.uri()} is not registered for the {domain} domain "
                                                    "(register-station first)")
        return {"bureau": bureau, "method": method, "algorithm": _transport_algorithm(ctx, domain, p),
                "public_key": pem, "public_key_sha256": sha256, "station": receiver.uri()}
    if method == "import-components":
        _only(p, {"bureau", "method", "kcv", "custodians"}, {"algorithm", "custody_key"})
        return {"bureau": bureau, "method": method, "algorithm": _transport_algorithm(ctx, domain, p),
                "kcv": check_kcv(p["kcv"] if isinstance(p["kcv"], str) else "", "params.kcv"),
                "custodians": _custodians(ctx, domain, p, "custodians"), "custody_key": _custody_key(ctx, domain, p)}
    _only(p, {"bureau", "method", "recipients"}, {"algorithm"})
    return {"bureau": bureau, "method": method, "algorithm": _transport_algorithm(ctx, domain, p),
            "recipients": _custodians(ctx, domain, p, "recipients")}


def _run_transport(ctx: Context, c: CeremonyRecord) -> dict[str, Any]:
    p = c.params
    pool = pool_for(ctx, c.domain)
    algorithm = p.get("algorithm", Algorithm.AES256.value)  # proposals made before SM4 transport keys: AES256
    if p["method"] == "rsa-oaep":
        _, spki, sha256 = _handoff_key(ctx, p)  # still unused (another ceremony may have used it since the proposal)
        made, wrapped = pool.call(keyops.transport_key_for_rsa, p["bureau"], spki, algorithm, ceremony=c.ceremony_id)
        # The wrapped key goes to the named station only (kms.ceremony.handoffs), never into results or minutes.
        ctx.handoffs.offer(c.domain, p["bureau"], made["version"], p["station"], wrapped, made["kcv"],
                           c.ceremony_id)
        return {**made, "algorithm": algorithm, "handed_to": p["station"], "unwrap_key_sha256": sha256}
    if p["method"] == "import-components":
        return _run_import(ctx, c, KeyKind.TRANSPORT, "bureau")
    made = dict(pool.call(keyops.create_key, KeyKind.TRANSPORT.value, p["bureau"], algorithm, True,
                          None, (), False, ceremony=c.ceremony_id))
    try:
        exported = _run_export(ctx, c, KeyKind.TRANSPORT.value, p["bureau"], made["version"])
    except BaseException:
        pool.call(keyops.discard_key, KeyKind.TRANSPORT.value, p["bureau"], made["version"], ceremony=c.ceremony_id)
        raise
    return {**made, "algorithm": algorithm, **exported}


def _check_state(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
    _only(p, {"name", "version", "state"}, {"kind"})
    kind, name, version = _existing(ctx, domain, p, _STATE_KINDS)
    state = _choice(p, "state", tuple(s.value for s in _SETTABLE_STATES))
    record = ctx.registry.get(domain, KeyKind(kind), name, version)
    _activation_allowed(record, KeyState(state))
    _signer_kept(ctx, record, KeyState(state), proposed=True)
    return {"kind": kind, "name": name, "version": version, "state": state}


def _activation_allowed(record: KeyRecord, to: KeyState) -> None:
    """Activation by ceremony: a suspended key again, a transport key whose bureau confirmed its KCV out of band
    (components), or a signing key generate-signing-key made, once the bureaus' stations trust its public key. A
    master key becomes active only inside the ceremony that made it, after its KCV check."""
    if to is KeyState.ACTIVE and record.state is not KeyState.SUSPENDED and not (
            record.kind in (KeyKind.TRANSPORT, KeyKind.SIGNING) and record.state is KeyState.PRE_ACTIVATION):
        raise InvalidArgument("params.state", f"{record.label} is {record.state.value}: only a suspended key, or a "
                                              "transport or signing key awaiting activation, can be made active")
    if to is KeyState.ACTIVE and record.kind is KeyKind.SIGNING and not record.public_key:
        raise InvalidArgument("params.version", f"{record.label} has no public key on record: it was never made")


def _signer_kept(ctx: Context, record: KeyRecord, to: KeyState, proposed: bool = False) -> None:
    """The only active version of a domain's signing key is not suspended or deactivated: it signs the domain's
    sections of its profiles (and ``issuance`` the ceremony minutes), which would stop until the next version is
    made and activated. Activate the next version first (generate-signing-key, then set-key-state); ``proposed``: a
    retirement may be proposed while the next version still awaits activation (made, with its public key), to be
    executed once it is active. Marking it compromised is always allowed: a compromised key must stop at once,
    whatever stops with it."""
    if not _retires_a_signer(record, to):
        return
    if not any(r.version != record.version and (
            r.state is KeyState.ACTIVE or (proposed and r.state is KeyState.PRE_ACTIVATION and r.public_key))
               for r in ctx.registry.versions(record.domain, KeyKind.SIGNING, record.name)):
        raise InvalidArgument("params.state", f"{record.label} is the only active version of the {record.domain} "
                                              f"{record.name} signing key: activate its next version first "
                                              "(generate-signing-key, set-key-state); a compromised key can "
                                              "always be marked compromised")


def _retires_a_signer(record: KeyRecord, to: KeyState) -> bool:
    """Whether ``to`` suspends or deactivates an active signing key (what _signer_kept guards)."""
    return record.kind is KeyKind.SIGNING and record.state is KeyState.ACTIVE and to not in (
        KeyState.ACTIVE, KeyState.COMPROMISED)


def _run_state(ctx: Context, c: CeremonyRecord) -> dict[str, Any]:
    p = c.params
    record = ctx.registry.get(c.domain, KeyKind(p["kind"]), p["name"], p["version"])
    _activation_allowed(record, KeyState(p["state"]))
    to = KeyState(p["state"])
    _signer_kept(ctx, record, to)
    # and again where it changes: of two retirements executed at once, the second sees the first's
    changed = ctx.registry.transition(record, to, keep_one_active=_retires_a_signer(record, to))
    return {"label": changed.label, "from": record.state.value, "state": changed.state.value,
            "at": changed.state_changed_at}


def _check_destroy(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
    _only(p, {"name", "version"}, {"kind"})
    kind, name, version = _existing(ctx, domain, p, _STATE_KINDS)
    return {"kind": kind, "name": name, "version": version}


def _run_destroy(ctx: Context, c: CeremonyRecord) -> dict[str, Any]:
    p = c.params
    return dict(pool_for(ctx, c.domain).call(keyops.destroy_key, p["kind"], p["name"], p["version"],
                                             ceremony=c.ceremony_id))


SIGNING_ALGORITHMS = tuple(keyops.SIGNING_ALGORITHMS)


def _check_signing(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
    """generate-signing-key (name, algorithm): the next version of one of the issuance signing keys the sealer signs
    with (``issuance``: ecdsa-p256; ``issuance-sm2``: sm2; the algorithm defaults to the name's). None of its
    versions may still await activation, and SM2 only where the domain's worker finds its token and mechanism
    profile offer it."""
    _only(p, {"name"}, {"algorithm"})
    name = _str(p, "name")
    by_name = {keyops.signing_key_name(a): a for a in SIGNING_ALGORITHMS}
    if name not in by_name:
        raise InvalidArgument("params.name", "must be the name of an issuance signing key: "
                                             + ", ".join(f"{n} ({a})" for n, a in by_name.items()))
    algorithm = _choice(p, "algorithm", SIGNING_ALGORITHMS, by_name[name])
    if algorithm != by_name[name]:
        raise InvalidArgument("params.algorithm", f"{name} keys are {by_name[name]}; sections signed with "
                                                  f"{algorithm} use {keyops.signing_key_name(algorithm)}")
    for record in ctx.registry.versions(domain, KeyKind.SIGNING, name):
        if record.state is KeyState.PRE_ACTIVATION:
            raise InvalidArgument("params.name", f"{record.label} awaits activation: activate it (set-key-state) "
                                                 "or destroy it (destroy-key) first")
    # ECDSA P-256 is what every domain's token signs ceremony minutes with already; SM2 is asked of the token.
    if algorithm != "ecdsa-p256" and algorithm not in pool_for(ctx, domain).call(keyops.signature_algorithms):
        raise InvalidArgument("params.algorithm", f"the {domain} token does not offer {algorithm} (its mechanism "
                                                  "profile, hsm.mechanisms, or its mechanism list lacks it)")
    return {"name": name, "algorithm": algorithm}


def _run_signing(ctx: Context, c: CeremonyRecord) -> dict[str, Any]:
    """The key pair made pre-activation; the result (and so the minutes) carries its public key as PEM, with the
    SHA-256 of its SubjectPublicKeyInfo and the key id sections will name, for each bureau's station trust store."""
    p = c.params
    made = dict(pool_for(ctx, c.domain).call(keyops.generate_signing_key, p["name"], p["algorithm"],
                                             ceremony=c.ceremony_id))
    spki = bytes(made.pop("public_key"))
    return {**made, "public_key": spki_pem(spki).decode("ascii"),
            "spki_sha256": hashlib.sha256(spki).hexdigest(), "key_id": bundle.key_id(spki),
            "trust_file": f"{c.domain}-{p['name']}-v{made['version']}.pem"}


def _check_batch(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
    _only(p, {"batch_id"}, {"bureau", "profile", "card_count", "cards_digest", "master_keys"})
    batch_id = p["batch_id"] if isinstance(p["batch_id"], str) else ""
    try:
        batch = ctx.batches.get_batch(batch_id)
    except NotFound:
        raise InvalidArgument("params.batch_id", f"no batch {batch_id}") from None
    if batch.state is not BatchState.AWAITING:
        raise InvalidArgument("params.batch_id", f"batch {batch_id} is {batch.state.value}")
    if domain not in ctx.profiles[batch.profile].domains:
        raise InvalidArgument("params.batch_id", f"batch {batch_id} has no {domain} keys")
    if domain in batch.authorized_by:
        raise InvalidArgument("params.batch_id", f"batch {batch_id} is already authorized by the {domain} domain")
    # What the approvers sign: the batch's bureau, profile and exact cards (by digest), filled in from the record,
    # and the master key versions its cards will be derived from (the newest active ones now; they stay the
    # batch's keys after a rotation, re-issues included, while they remain active).
    profile = ctx.profiles[batch.profile]
    versions = {name: ctx.registry.active(domain, KeyKind.MASTER, name).version
                for name in profile.master_keys(domain)}
    facts = {"batch_id": batch.batch_id, "bureau": batch.bureau, "profile": batch.profile,
             "card_count": batch.card_count, "cards_digest": batch.cards_digest, "master_keys": versions}
    for name, value in facts.items():
        if name in p and p[name] != value:
            raise InvalidArgument(f"params.{name}", f"does not match batch {batch_id} ({value})")
    return facts


def _run_batch(ctx: Context, c: CeremonyRecord) -> dict[str, Any]:
    p = c.params
    batch = ctx.batches.get_batch(p["batch_id"])
    if (batch.bureau, batch.profile, batch.card_count) != (p["bureau"], p["profile"], p["card_count"]):
        raise InvalidState(f"batch {batch.batch_id} differs from what was approved")
    for name, version in p["master_keys"].items():
        record = ctx.registry.get(c.domain, KeyKind.MASTER, name, version)
        if record.state is not KeyState.ACTIVE:
            raise InvalidState(f"{record.label} is {record.state.value} since it was approved for this batch")
    done = ctx.batches.authorize(batch.batch_id, c.domain, c.ceremony_id, p["cards_digest"],
                                 tuple(ctx.profiles[batch.profile].domains), p["master_keys"])
    return {"batch_id": done.batch_id, "state": done.state.value, "authorized_by": list(done.authorized_by),
            "master_keys": dict(p["master_keys"])}


def _check_limits(ctx: Context, domain: str, p: Mapping[str, Any]) -> dict[str, Any]:
    """set-limits (scope, subject, cards_per_hour / cards_per_day / concurrent_streams): this domain's value of
    issuance limits for a station, a bureau, or every one ("default"); kms.issuance.limits.check_params."""
    return check_limits(p)


def _run_limits(ctx: Context, c: CeremonyRecord) -> dict[str, Any]:
    if ctx.limits is None:
        raise InvalidState("no issuance limits are kept here")
    return ctx.limits.set(c.domain, c.params, c.ceremony_id)


OPERATIONS: dict[str, Operation] = {op.name: op for op in (
    Operation("enrol-officer", "enrol an officer with roles and an approval key", _check_enrol, _run_enrol, False,
              "name=NAME roles=approver,key-custodian public_key=@KEY.pem certificate=@CERT.pem [cert_sha256=HEX]"),
    Operation("revoke-officer", "an officer who no longer counts for anything", _check_revoke, _run_revoke, False,
              "name=NAME"),
    Operation("renew-certificate", "pin an officer to a new client certificate key", _check_renew, _run_renew,
              False, "name=NAME certificate=@CERT.pem [cert_sha256=HEX]"),
    Operation("register-station", "trust a bureau's station (pinned to its certificate) for this domain",
              _check_register("station"), _run_register, False,
              "bureau=BUREAU station=NAME certificate=@CERT.pem [cert_sha256=HEX]"),
    Operation("revoke-station", "this domain no longer trusts a station", _check_unregister("station"),
              _run_unregister, False, "bureau=BUREAU station=NAME"),
    Operation("enrol-auditor", "let an auditor (pinned to their certificate) read this domain's audit records",
              _check_register("auditor"), _run_register, False, "name=NAME certificate=@CERT.pem [cert_sha256=HEX]"),
    Operation("revoke-auditor", "an auditor who may no longer read this domain's audit records",
              _check_unregister("auditor"), _run_unregister, False, "name=NAME"),
    Operation("generate-master-key", "generate a master key (next version) in the HSM", _check_generate,
              _run_generate, params="name=NAME [algorithm=ALGORITHM] [escrow=yes]"),
    Operation("import-master-key", "join a master key (next version) from custodians' components", _check_import,
              _run_import, params="name=NAME kcv=HEX custodians=A,B[,...] [algorithm=ALGORITHM] [escrow=yes] "
                                  "[custody_key=FINGERPRINT]"),
    Operation("rotate-master-key", "generate the next version of an existing master key", _check_rotate,
              _run_generate, params="name=NAME [escrow=yes]"),
    Operation("export-master-key", "export an escrowable key as components, one per custodian", _check_export,
              _run_export, params="name=NAME version=N recipients=A,B[,...] [kind=KIND]"),
    Operation("register-transport-key", "a bureau's transport key (rsa-oaep, import-components, export-components)",
              _check_transport, _run_transport,
              params="bureau=BUREAU [algorithm=AES256|SM4] and method=rsa-oaep station=NAME public_key=@PEM "
                     "[public_key_sha256=HEX] | method=import-components kcv=HEX custodians=A,B[,...] "
                     "[custody_key=FINGERPRINT] | method=export-components recipients=A,B[,...]"),
    Operation("generate-signing-key", "an issuance signing key pair (next version), pre-activation, in the HSM",
              _check_signing, _run_signing, params="name=issuance|issuance-sm2 [algorithm=ecdsa-p256|sm2]"),
    Operation("set-key-state", "suspend, reactivate, deactivate or mark a key compromised", _check_state,
              _run_state, params="name=NAME version=N state=STATE [kind=KIND]"),
    Operation("destroy-key", "destroy a deactivated or compromised key", _check_destroy, _run_destroy,
              params="name=NAME version=N [kind=KIND]"),
    Operation("authorize-batch", "the domain's authorization of an issuance batch", _check_batch, _run_batch,
              False, "batch_id=ID (the service fills in bureau, profile, card_count, cards_digest, master_keys)"),
    Operation("set-limits", "this domain's issuance limits for a station, a bureau or every one", _check_limits,
              _run_limits, False, "scope=station|bureau subject=URI|BUREAU|default [cards_per_hour=N] "
                                  "[cards_per_day=N] [concurrent_streams=N]"),
)}


def operation(name: str) -> Operation:
    try:
        return OPERATIONS[name]
    except KeyError:
        raise InvalidArgument("operation", f"must be one of {', '.join(sorted(OPERATIONS))}") from None


def fingerprint(pem: str) -> str:
    der = parse_public_key(pem).public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:32]
