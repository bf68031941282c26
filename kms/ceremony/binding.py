"""Dual control enforced by the domain worker service itself (``kms worker``), not only by the front end.

Each key-changing step a ceremony runs in a domain's token (kms.ceremony.keyops: create_key, export_components,
transport_key_for_rsa, discard_key, destroy_key, generate_signing_key) arrives at the worker service naming the
ceremony it executes. The worker then decides on its own, from the database and its own trust file, whether that
step may run:

- the ceremony exists, is of the worker's domain, is ``executing`` and its proposal not expired for longer than an
  execution may take (kms.ceremony.store.EXECUTION_TIMEOUT);
- its approvals meet the quorum policy shipped with kms (kms/policies/quorum.yaml, never one the front end sends),
  by ``kms.ceremony.rules.evaluate``: each approval an ECDSA signature over this proposal's digest by an officer the
  worker trusts, with the role the quorum asks for;
- the step is one the approved operation runs, with exactly the arguments the approved parameters give (the
  recipients' public keys taken from the trust file, never from the request or the database), and each step at most
  once per ceremony (a replayed request finds it used).

The officers a worker trusts are those of its **trust file** (``worker.officers``: name, roles, approval public key
per officer), a file owned by the worker's user that the front end can neither write nor replace; an officer counts
only if the registry also still shows them active (a revoke ceremony takes effect at once; an officer inserted into
the database by whoever controls the front end counts for nothing). kms.dev writes the file at genesis; operators
edit it after enrol-officer and revoke-officer ceremonies (docs/deployment.md, "Dual control in the worker").

Anything else is PermissionDenied naming what failed (never key material).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms.ceremony.officers import OfficerStore, check_name, check_roles, parse_public_key, public_pem
from kms.ceremony.rules import Approval, Officer, Proposal, QuorumPolicy, approval_message, evaluate
from kms.ceremony.store import EXECUTION_TIMEOUT, MAX_TTL, Ceremonies, CeremonyRecord, CeremonyState
from kms.clock import Clock
from kms.errors import ConfigError, KmsError, NotFound, PermissionDenied
from kms.files import write_private
from kms.hsm.types import Algorithm
from kms.identity import Principal, parse_uri
from kms.registry import KeyKind

#: The keyops steps that change a token, by the name the worker API gives them.
KEY_CHANGING = ("create_key", "export_components", "transport_key_for_rsa", "discard_key", "destroy_key",
                "generate_signing_key")
TRUST_FORMAT = "kms-worker-officers"
#: How far in the future a proposal's creation time may lie by the worker's clock.
CLOCK_SKEW = dt.timedelta(minutes=5)


# -- the trust file -------------------------------------------------------------------------------------------------


def write_trust_file(path: Path, domain: str, officers: Sequence[tuple[str, Sequence[str], str]]) -> Path:
    """The trust file of ``domain``'s worker: (name, roles, approval public key PEM) per officer, mode 0600."""
    doc = {"format": TRUST_FORMAT, "version": 1, "domain": domain,
           "officers": [{"name": name, "roles": sorted(roles), "public_key": pem} for name, roles, pem in officers]}
    return write_private(path, yaml.safe_dump(doc, sort_keys=False))


def _read_journal(path: Path) -> dict[str, dict[str, int]]:
    """The steps run so far (``DualControl._record``): {proposal digest: {step: version}}. A journal that cannot be
    read is a ConfigError: the worker does not start rather than forget what it ran."""
    used: dict[str, dict[str, int]] = {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return used
    except OSError as error:
        raise ConfigError(f"worker journal {path}: cannot read it ({error.strerror})") from None
    with os.fdopen(fd, encoding="utf-8") as lines:
        info = os.fstat(lines.fileno())
        if info.st_uid not in (os.geteuid(), 0) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"worker journal {path}: must be owned by the worker's user and writable by no one "
                              "else")
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                used.setdefault(str(entry["digest"]), {})[str(entry["step"])] = int(entry["version"])
            except (ValueError, KeyError, TypeError):
                if line.endswith("\n"):  # a torn last line (a crash while writing) is ignored; others are not
                    raise ConfigError(f"worker journal {path}: line {number} is unreadable") from None
    return used


def load_trust_file(path: Path, domain: str) -> dict[Principal, Officer]:
    """The officers ``path`` lists for ``domain``. The file must be a regular file owned by this process's user (or
    root) and writable by nobody else; ConfigError naming the setting and what is wrong otherwise."""
    where = f"worker.officers {path}"
    try:
        info = path.lstat()
    except OSError as error:
        raise ConfigError(f"{where}: cannot read it ({error.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{where}: is not a regular file")
    if info.st_uid not in (os.geteuid(), 0) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{where}: must be owned by the worker's user and writable by no one else")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise ConfigError(f"{where}: is not a readable YAML file") from None
    if (not isinstance(doc, dict) or doc.get("format") != TRUST_FORMAT or doc.get("version") != 1
            or not isinstance(doc.get("officers"), list)):
        raise ConfigError(f"{where}: is not a {TRUST_FORMAT} version 1 file (format, version, domain, officers)")
    if doc.get("domain") != domain:
        raise ConfigError(f"{where}: lists the officers of {doc.get('domain')!r}, not of {domain}")
    officers: dict[Principal, Officer] = {}
    for i, entry in enumerate(doc["officers"]):
        field = f"{where}: officers[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "roles", "public_key"}:
            raise ConfigError(f"{field}: needs exactly name, roles and public_key")
        try:
            name = check_name(str(entry["name"]), "name")
            roles = check_roles(entry["roles"] if isinstance(entry["roles"], list) else [], "roles")
            key = parse_public_key(str(entry["public_key"]), "public_key")
        except KmsError as error:
            raise ConfigError(f"{field}: {error}") from None
        principal = Principal("officer", name, domain=domain)
        if principal in officers:
            raise ConfigError(f"{field}: lists {name} twice")
        officers[principal] = Officer(principal, roles, key)
    return officers


# -- what an approved ceremony runs ---------------------------------------------------------------------------------


def _der(pem: str) -> bytes:
    return serialization.load_pem_public_key(pem.encode("ascii")).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _yes(params: Mapping[str, Any], name: str = "escrow") -> bool:
    return params.get(name) == "yes"


class _Expected:
    """The steps one approved ceremony runs in its domain's token, each with the arguments it must carry."""

    def __init__(self, record: CeremonyRecord, officers: Mapping[Principal, Officer]) -> None:
        self.record = record
        self.officers = officers

    def _custodians(self, names: Any, what: str) -> list[Principal]:
        """Two or more distinct officers of the trust file with the key-custodian role (split knowledge), checked
        here again: the front end's own check is not a boundary."""
        listed = [Principal("officer", str(n), domain=self.record.domain) for n in (names or [])]
        if len(listed) < 2 or len(set(listed)) != len(listed):
            raise PermissionDenied(f"the approved {what} must name at least 2 distinct officers (split knowledge)")
        for principal in listed:
            officer = self.officers.get(principal)
            if officer is None:
                raise PermissionDenied(f"{what[:-1]} {principal} is not an officer this worker trusts")
            if "key-custodian" not in officer.roles:
                raise PermissionDenied(f"{what[:-1]} {principal} lacks the key-custodian role in the trust file")
        return listed

    def _officer_uris(self, names: Any) -> list[str]:
        return [p.uri() for p in self._custodians(names, "custodians")]

    def _recipients(self, names: Any) -> list[tuple[str, bytes]]:
        return [(p.uri(), _der(public_pem(self.officers[p].public_key)))
                for p in self._custodians(names, "recipients")]

    def steps(self, made: Mapping[str, int]) -> dict[str, tuple[Any, ...]]:
        """{step: its arguments, normalized as ``normalize`` gives a request's}; ``made`` holds versions made by
        earlier steps of the same ceremony (create_key's)."""
        r, p = self.record, self.record.params
        op = r.operation
        master, transport = KeyKind.MASTER.value, KeyKind.TRANSPORT.value
        if op in ("generate-master-key", "rotate-master-key"):
            return {"create_key": (master, p["name"], p["algorithm"], _yes(p), None, (), True)}
        if op == "import-master-key":
            return {"create_key": (master, p["name"], p.get("algorithm", Algorithm.AES256.value), _yes(p), p["kcv"],
                                   tuple(sorted(self._officer_uris(p["custodians"]))), True)}
        if op == "export-master-key":
            return {"export_components": (p["kind"], p["name"], p["version"],
                                          tuple(self._recipients(p["recipients"])), r.ceremony_id)}
        if op == "destroy-key":
            return {"destroy_key": (p["kind"], p["name"], p["version"])}
        if op == "generate-signing-key":
            return {"generate_signing_key": (p["name"], p["algorithm"])}
        if op == "register-transport-key":
            method = p.get("method")
            if method == "rsa-oaep":
                spki = _der(p["public_key"])
                # What approvers compare with the station's is the SHA-256; it must be the key's (review revD-1).
                if "public_key_sha256" in p and p["public_key_sha256"] != hashlib.sha256(spki).hexdigest():
                    raise PermissionDenied("the approved public_key_sha256 is not the SHA-256 of the approved "
                                           "public_key")
                return {"transport_key_for_rsa": (p["bureau"], spki, p.get("algorithm", Algorithm.AES256.value))}
            if method == "import-components":
                return {"create_key": (transport, p["bureau"], p.get("algorithm", Algorithm.AES256.value),
                                       _yes(p), p["kcv"], tuple(sorted(self._officer_uris(p["custodians"]))), False)}
            if method == "export-components":
                steps: dict[str, tuple[Any, ...]] = {
                    "create_key": (transport, p["bureau"], p.get("algorithm", Algorithm.AES256.value), True, None,
                                   (), False)}
                if "create_key" in made:  # then the key it made: exported, or discarded if that failed
                    version = made["create_key"]
                    steps["export_components"] = (transport, p["bureau"], version,
                                                  tuple(self._recipients(p["recipients"])), r.ceremony_id)
                    steps["discard_key"] = (transport, p["bureau"], version)
                return steps
        return {}


def normalize(step: str, arguments: Sequence[Any]) -> tuple[Any, ...]:
    """A request's arguments (as kms.server.worker checked them) in the form ``_Expected.steps`` gives."""
    a = tuple(arguments)
    if step == "create_key":  # kind, name, algorithm, escrow, expected_kcv, sealed, activate
        return (a[0], a[1], a[2], bool(a[3]), a[4], tuple(sorted(uri for uri, _, _ in a[5])), bool(a[6]))
    if step == "export_components":  # kind, name, version, recipients, ceremony_id
        try:
            recipients = tuple((uri, _der(pem)) for uri, pem in a[3])
        except (ValueError, UnicodeEncodeError):
            raise PermissionDenied("export_components: a recipient's public key is not a PEM public key") from None
        return (a[0], a[1], a[2], recipients, a[4])
    if step == "transport_key_for_rsa":  # bureau, recipient SPKI (DER), algorithm (AES256 when not given)
        return (a[0], bytes(a[1]), a[2] if len(a) > 2 else Algorithm.AES256.value)
    return a  # discard_key, destroy_key: kind, name, version; generate_signing_key: name, algorithm


#: What the arguments of each step are called (for the message naming the first that differs).
_ARGUMENT_NAMES = {
    "create_key": ("kind", "name", "algorithm", "escrow", "expected_kcv", "custodians", "activate"),
    "export_components": ("kind", "name", "version", "recipients", "ceremony_id"),
    "transport_key_for_rsa": ("bureau", "recipient_spki", "algorithm"),
    "discard_key": ("kind", "name", "version"),
    "destroy_key": ("kind", "name", "version"),
    "generate_signing_key": ("name", "algorithm"),
}


def _parse_time(text: Any) -> dt.datetime:
    return dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))


class DualControl:
    """The worker's check of each key-changing step against the ceremony it names (module docstring)."""

    def __init__(self, domain: str, ceremonies: Ceremonies, officer_store: OfficerStore, trust: Path | None,
                 clock: Clock, policy: QuorumPolicy | None = None, *, journal: Path | None = None) -> None:
        self.domain = domain
        self._ceremonies = ceremonies
        self._officer_store = officer_store
        self._trust = trust
        self._clock = clock
        self._policy = policy or QuorumPolicy.load()  # the policy shipped with kms
        self._lock = threading.Lock()
        #: proposal digest (hex) -> step -> version made (0: none); kept in the journal too, so a step run before a
        #: restart of the worker is not run again after it.
        self._used: dict[str, dict[str, int]] = {}
        self._journal = journal
        if journal is not None:
            self._used = _read_journal(journal)

    def _listed(self) -> dict[Principal, Officer]:
        if self._trust is None:
            raise PermissionDenied("this worker trusts no officer (worker.officers is not set): it runs no "
                                   "key-changing step and signs no minutes")
        return load_trust_file(self._trust, self.domain)

    def trusted(self) -> dict[Principal, Officer]:
        """The trust file's officers (read again at every check: an edit takes effect without a restart) who are
        still active in the registry."""
        listed = self._listed()
        active = self._officer_store.active(self.domain)
        return {p: o for p, o in listed.items() if p in active}

    def run(self, ceremony_id: str, step: str, arguments: Sequence[Any],
            execute: Callable[[], Any]) -> Any:
        """``execute()`` if ``ceremony_id`` approves ``step`` with ``arguments``; PermissionDenied otherwise. The
        step is marked used before it runs (a concurrent or replayed copy is refused)."""
        if step not in KEY_CHANGING:
            return execute()
        where = f"{step} for {ceremony_id or 'no ceremony'}"
        if not ceremony_id:
            raise PermissionDenied(f"{step} changes keys: the request must name the ceremony it executes")
        try:
            record = self._ceremonies.get(ceremony_id)
        except NotFound:
            raise PermissionDenied(f"{where}: no such ceremony") from None
        if (record.ceremony_id != ceremony_id or record.proposal.ceremony_id != ceremony_id
                or record.encoding != record.proposal.encoding()):
            # The officers signed the ceremony id inside the proposal: a row copied under another id is not theirs.
            raise PermissionDenied(f"{where}: the stored proposal is not this ceremony's")
        if record.domain != self.domain:
            raise PermissionDenied(f"{where}: the ceremony is of the {record.domain} domain, not {self.domain}")
        if record.state is not CeremonyState.EXECUTING:
            raise PermissionDenied(f"{where}: the ceremony is {record.state.value}, not executing")
        now = self._clock.now()
        expires = record.proposal.expires_at
        if expires - record.proposal.created_at > MAX_TTL or record.proposal.created_at > now + CLOCK_SKEW:
            raise PermissionDenied(f"{where}: the proposal's lifetime is longer than kms allows, or it was made in "
                                   "the future")
        if now >= expires + EXECUTION_TIMEOUT:
            raise PermissionDenied(f"{where}: the proposal expired")
        officers = self.trusted()
        # An execution that began before expiry may end just after it: the quorum as it stood then.
        decision = evaluate(record.proposal, [Approval(a.officer, a.signature) for a in record.approvals],
                            officers, self._policy, min(now, expires - dt.timedelta(microseconds=1)))
        if not decision.met:
            why = "; ".join(f"{who}: {reason}" for who, reason in decision.refused)
            raise PermissionDenied(f"{where}: {len(decision.counted)} of the {decision.required} approvals it needs "
                                   f"are by officers this worker trusts" + (f" ({why})" if why else ""))
        digest = record.proposal.digest.hex()
        with self._lock:
            used = self._used.setdefault(digest, {})
            expected = _Expected(record, officers).steps(used)
            if step not in expected:
                raise PermissionDenied(f"{where}: {record.operation} does not run {step}"
                                       + (" again" if step in used else ""))
            if step in used:
                raise PermissionDenied(f"{where}: this ceremony already ran {step}")
            got = normalize(step, arguments)
            for name, want, have in zip(_ARGUMENT_NAMES[step], expected[step], got, strict=True):
                if want != have:
                    raise PermissionDenied(f"{where}: {name} is not what the approved proposal says")
            used[step] = 0
            self._record(digest, step, 0)  # before the step runs: a crash leaves it used, never runnable twice
        result = execute()
        if step == "create_key" and isinstance(result, Mapping):
            with self._lock:
                used[step] = int(result.get("version", 0))
                self._record(digest, step, used[step])
        return result

    def _record(self, digest: str, step: str, version: int) -> None:
        if self._journal is None:
            return
        line = json.dumps({"digest": digest, "step": step, "version": version}, sort_keys=True) + "\n"
        try:
            fd = os.open(self._journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:  # fail closed: the step is marked used in memory and does not run
            raise ConfigError(f"worker journal {self._journal}: cannot write it ({error.strerror}); the step did "
                              "not run") from None

    def check_minutes(self, document: bytes) -> None:
        """Before the domain's key signs minutes: every approval they quote is by an officer of the trust file, under
        the key the file holds, and verifies over the quoted proposal; minutes of an executed ceremony show the
        shipped quorum of such approvals. So a front end cannot have the domain sign minutes of a ceremony its own
        keys approved (kms.server.worker checked the format and the domain already)."""
        try:
            doc = json.loads(document)
            quoted = str(doc["proposal"])
            proposal_doc = json.loads(quoted)
            proposal = Proposal(proposal_doc["domain"], proposal_doc["operation"], proposal_doc["params"],
                                parse_uri(proposal_doc["proposer"]), _parse_time(proposal_doc["created_at"]),
                                _parse_time(proposal_doc["expires_at"]), proposal_doc["ceremony_id"])
            approvals = [(parse_uri(str(a["officer"])), str(a["public_key"]), bytes.fromhex(str(a["signature"])))
                         for a in doc["approvals"]]
        except (ValueError, KeyError, TypeError, AttributeError, KmsError):
            raise PermissionDenied("sign: the minutes do not quote a proposal and its approvals") from None
        if (hashlib.sha256(quoted.encode()).hexdigest() != doc.get("digest") or proposal.domain != self.domain
                or proposal.encoding() != quoted.encode() or proposal.ceremony_id != doc.get("ceremony_id")
                or proposal.operation != doc.get("operation")):
            raise PermissionDenied("sign: the minutes' digest, domain, ceremony or operation differ from the "
                                   "proposal they quote")
        trusted = self._listed()
        for officer, pem, signature in approvals:
            known = trusted.get(officer)
            try:
                same_key = known is not None and _der(pem) == _der(public_pem(known.public_key))
            except (ValueError, UnicodeEncodeError):
                same_key = False
            if not same_key:
                raise PermissionDenied(f"sign: the minutes quote an approval by {officer} under a key this worker "
                                       "does not trust for that officer")
            assert known is not None
            try:
                known.public_key.verify(signature, approval_message(proposal), ec.ECDSA(hashes.SHA256()))
            except (InvalidSignature, ValueError):
                raise PermissionDenied(f"sign: the approval by {officer} does not verify over the quoted "
                                       "proposal") from None
        if proposal.operation == "genesis":
            # Genesis has no quorum: every officer it lists signed it, each one this worker trusts.
            try:
                listed = {Principal("officer", str(o["name"]), domain=self.domain) for o in proposal.params["officers"]}
            except (KeyError, TypeError, ValueError, KmsError):
                raise PermissionDenied("sign: the genesis minutes list no officers") from None
            if not listed or not listed <= {officer for officer, _, _ in approvals}:
                raise PermissionDenied("sign: genesis minutes need the approval of every officer they list")
        elif doc.get("state") in ("executed", "executing"):
            decision = evaluate(proposal, [Approval(o, sig) for o, _, sig in approvals], trusted, self._policy,
                                proposal.created_at)
            if not decision.met:
                raise PermissionDenied(f"sign: the minutes show {len(decision.counted)} of the {decision.required} "
                                       "approvals the ceremony needs by officers this worker trusts")
