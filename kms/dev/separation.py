"""A separated layout: each key domain, the audit signer and the front end as its own OS user (run as root).

A development home (kms.dev.home) keeps every token in one SoftHSM2 token directory and every PIN in one pins/
directory, all readable by the one user who made it. ``separate`` turns it into the layout of docs/deployment.md,
"Process and user layout", for the OS users named in ``ServiceUsers``:

  <root>/                      root, 0755 (every ancestor must be searchable by the service users)
    hrss/  bank/  audit/       owned by that component's user, 0700:
      hsm/softhsm2.conf        a SoftHSM2 configuration whose tokendir holds only this component's token
      hsm/tokens/<uuid>/       the token, moved out of the development home (SoftHSM2 keeps one directory per token)
      pin                      the token's user PIN, 0400 (moved out of the development home's pins/)
      worker.yaml              the worker configuration: kms.yaml's format with only this domain (or audit)
      profiles/                (domains) the card profiles the domain's workers load
    front/                     owned by the front end's user, 0700: kms.yaml with a ``workers:`` block and no PIN,
                               its TLS files (pki/), the profiles
    run/<component>/           owned by the component's user, group the front end's group, 2710: the worker's Unix
                               socket (the front end may only search the directory and connect)
    db/                        root, group ``ServiceUsers.database``, 2770: the SQLite database kms.db (0660), shared
                               by the front end and the domain workers (not the audit signer)

The security officers' SO PINs, the CA key, the officers' client files and the stations (other machines in
production) stay in the development home, root's alone.

PIN sources: a component's PIN is written to ``<component>/pin`` and named ``file:pin``; ``pin_sources`` replaces
that per component with another reference (``vault:kv/kms/hrss#pin``) and an ``openbao:`` block. ``approles``
gives a component (the front end too) its AppRole credentials: ``<component>/openbao/role-id`` and ``secret-id``,
0400, owned by the component's user (what ``file:openbao/role-id`` in an ``openbao:`` block names).

``readability`` measures who can read what by trying, as each user, in a child process; ``openbao_readability``
which KV secrets each user can read with the AppRole credentials it can read.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import sqlite3
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kms import config as config_mod
from kms.dev.home import Home
from kms.errors import ConfigError
from kms.files import copy_tree_private, write_private
from kms.hsm import softhsm
from kms.hsm.mechanisms import STANDARD
from kms.registry import DOMAINS

AUDIT = "audit"
FRONT = "front"
#: The components that log into a token of their own: the two domains and the audit signer.
SIGNERS = (*DOMAINS, AUDIT)
#: Where a component's PIN lives unless ``pin_sources`` says otherwise (relative to its worker configuration).
PIN_FILE = "pin"
#: Accounts at or above this uid are people's (login.defs UID_MIN); kms never changes them.
HUMAN_UID_MIN = 1000
NOLOGIN = next((s for s in ("/usr/sbin/nologin", "/sbin/nologin") if Path(s).exists()), "/bin/false")


@dataclass(frozen=True)
class ServiceUsers:
    """The OS users (and the database group) of a separated layout. Tests pass unique names."""

    front: str = "kms-front"
    hrss: str = "kms-hrss"
    bank: str = "kms-bank"
    audit: str = "kms-audit"
    database: str = "kms-db"

    def of(self, component: str) -> str:
        """The user of ``front``, ``hrss``, ``bank`` or ``audit``."""
        if component not in (FRONT, *SIGNERS):
            raise ValueError(f"no such component: {component}")
        return str(getattr(self, component))

    def all(self) -> dict[str, str]:
        """component -> user, front end first."""
        return {c: self.of(c) for c in (FRONT, *SIGNERS)}

    @classmethod
    def prefixed(cls, prefix: str) -> ServiceUsers:
        """``<prefix>-front``, ``<prefix>-hrss`` ... (names of at most 32 characters)."""
        return cls(**{c: f"{prefix}-{c}" for c in (FRONT, *SIGNERS)}, database=f"{prefix}-db")


#: Where a component's AppRole credentials are kept, relative to its directory (``approles``).
ROLE_ID = "openbao/role-id"
SECRET_ID = "openbao/secret-id"


@dataclass(frozen=True)
class PinSource:
    """Where a component's worker gets its PIN instead of ``file:pin``: ``reference`` (e.g.
    ``vault:kv/kms/hrss#pin``) and the ``openbao:`` block of its worker configuration (its credentials: ``approles``).
    ``store`` is called with the PIN once, by the build that takes it out of the development home, to put it where
    the reference points (a later build finds it gone and keeps the reference)."""

    reference: str
    openbao: Mapping[str, Any] = field(default_factory=dict)
    store: Callable[[str], None] | None = None


@dataclass(frozen=True)
class AppRole:
    """A component's AppRole credentials (``role_id`` is not secret on its own; ``secret_id`` is)."""

    role_id: str
    secret_id: str

    @staticmethod
    def block(address: str, **extra: Any) -> dict[str, Any]:
        """An ``openbao:`` block that logs in with the credentials ``approles`` writes."""
        return {"address": address, **extra,
                "approle": {"role_id": f"file:{ROLE_ID}", "secret_id": f"file:{SECRET_ID}"}}


@dataclass(frozen=True)
class Layout:
    root: Path
    users: ServiceUsers

    def dir(self, component: str) -> Path:
        return self.root / component

    @property
    def front_config(self) -> Path:
        return self.root / FRONT / "kms.yaml"

    def worker_config(self, component: str) -> Path:
        return self.root / component / "worker.yaml"

    def pin_file(self, component: str) -> Path:
        return self.root / component / PIN_FILE

    def softhsm2_conf(self, component: str) -> Path:
        return self.root / component / "hsm" / "softhsm2.conf"

    def token_dir(self, component: str) -> Path:
        """The component's token directory (the one subdirectory of its tokendir)."""
        tokens = [p for p in (self.root / component / "hsm" / "tokens").iterdir() if p.is_dir()]
        if len(tokens) != 1:
            raise ConfigError(f"{self.root / component}: expected exactly one token directory, found {len(tokens)}")
        return tokens[0]

    def socket(self, component: str) -> Path:
        return self.root / "run" / component / "worker.sock"

    def approle(self, component: str) -> tuple[Path, Path] | None:
        """The component's role-id and secret-id files, if it was given an AppRole."""
        role_id, secret_id = self.root / component / ROLE_ID, self.root / component / SECRET_ID
        return (role_id, secret_id) if secret_id.exists() else None

    @property
    def database(self) -> Path:
        return self.root / "db" / "kms.db"

    @property
    def tls_key(self) -> Path:
        return self.root / FRONT / "pki" / "server.key"

    def secrets(self) -> dict[str, Path]:
        """What must stay apart, by name: each component's PIN file and token directory, the front end's TLS key,
        the database, and each worker's socket while it exists (to connect to it is to use that token). PINs given
        by ``pin_sources`` have no file; they are left out."""
        found: dict[str, Path] = {}
        for component in SIGNERS:
            if self.pin_file(component).exists():
                found[f"{component} PIN"] = self.pin_file(component)
            found[f"{component} token"] = self.token_dir(component)
        found["front TLS key"] = self.tls_key
        found["database"] = self.database
        for component in (FRONT, *SIGNERS):
            approle = self.approle(component)
            if approle is not None:
                found[f"{component} AppRole secret_id"] = approle[1]
        for component in SIGNERS:  # while the workers run: who can connect to each (and so use its token)
            if self.socket(component).exists():
                found[f"{component} worker socket"] = self.socket(component)
        return found

    def expected_readers(self) -> dict[str, set[str]]:
        """secret name (as in ``secrets``) -> the users meant to read it; everyone else must not."""
        expected: dict[str, set[str]] = {}
        for component in SIGNERS:
            expected[f"{component} PIN"] = {self.users.of(component)}
            expected[f"{component} token"] = {self.users.of(component)}
            expected[f"{component} worker socket"] = {self.users.front, self.users.of(component)}
        for component in (FRONT, *SIGNERS):
            expected[f"{component} AppRole secret_id"] = {self.users.of(component)}
        expected["front TLS key"] = {self.users.front}
        expected["database"] = {self.users.front, *(self.users.of(d) for d in DOMAINS)}
        return {name: readers for name, readers in expected.items() if name in self.secrets()}


# -- OS users ---------------------------------------------------------------------------------------------------


def _run(*argv: str) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ConfigError(f"{argv[0]} {argv[-1]}: failed (exit {result.returncode}): {result.stderr.strip()}")


def _system_account(name: str) -> bool:
    """True if ``name`` exists as a system account; ConfigError if it exists as a person's (never changed)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return False
    if entry.pw_uid == 0 or entry.pw_uid >= HUMAN_UID_MIN:
        raise ConfigError(f"user {name} exists and is not a system account (uid {entry.pw_uid}); kms will not "
                          "use or change it: choose other user names")
    return True


def ensure_users(users: ServiceUsers) -> list[str]:
    """Create the service users (``useradd --system``, no home, no login shell, a group of their own) and the
    database group, unless they exist; add the front end and domain users to the database group. Returns what was
    created here (users, then the group if new, as ``group:<name>``), for ``remove_users``. Idempotent; an existing
    account that is a person's (uid >= 1000) is refused, never changed."""
    created: list[str] = []
    for user in users.all().values():
        if not _system_account(user):
            _run("useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                 "--shell", NOLOGIN, "--comment", "kms service", user)
            created.append(user)
    try:
        grp.getgrnam(users.database)
    except KeyError:
        _run("groupadd", "--system", users.database)
        created.append(f"group:{users.database}")
    members = set(grp.getgrnam(users.database).gr_mem)
    for user in (users.front, *(users.of(d) for d in DOMAINS)):
        if user not in members:
            _run("gpasswd", "--add", user, users.database)
    return created


def remove_users(created: Iterable[str]) -> None:
    """Remove what ``ensure_users`` created (and only that): users first, then groups."""
    names = list(created)
    for name in names:
        if not name.startswith("group:"):
            subprocess.run(["userdel", name], capture_output=True, check=False)
    for name in names:
        if name.startswith("group:"):
            subprocess.run(["groupdel", name.removeprefix("group:")], capture_output=True, check=False)


def run_as(user: str) -> dict[str, Any]:
    """subprocess keyword arguments that run a child as ``user`` with its groups (its own and supplementary)."""
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": os.getgrouplist(user, entry.pw_gid)}


# -- reaching the interpreter and the code ---------------------------------------------------------------------

_ACL = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_UNDEFINED = 0xFFFFFFFF
_SEARCH = 0o1


def _acl_entries(path: Path) -> list[tuple[int, int, int]]:
    """The access ACL of ``path`` as (tag, perm, id) entries; from its mode if it has none."""
    try:
        raw = os.getxattr(path, _ACL)
    except OSError:
        mode = os.stat(path).st_mode
        return [(_USER_OBJ, mode >> 6 & 7, _UNDEFINED), (_GROUP_OBJ, mode >> 3 & 7, _UNDEFINED),
                (_OTHER, mode & 7, _UNDEFINED)]
    return [struct.unpack_from("<HHI", raw, offset) for offset in range(4, len(raw), 8)]


def _blocking(paths: Iterable[Path]) -> list[Path]:
    """The directories on the way to ``paths`` (themselves included) that other users cannot search."""
    found: list[Path] = []
    for path in paths:
        path = path.resolve()
        for directory in [*reversed(path.parents), *([path] if path.is_dir() else [])]:
            if directory not in found and not os.stat(directory).st_mode & stat.S_IXOTH:
                found.append(directory)
    return found


@contextmanager
def searchable(users: Iterable[str], paths: Iterable[Path]) -> Iterator[list[Path]]:
    """While inside: the given users may search (only search: x, not list) every directory on the way to
    ``paths`` that others cannot, through a POSIX ACL entry per user; on leaving, each directory's ACL and mode are
    put back as they were. For development machines whose interpreter or checkout lives under a private directory
    (a pyenv Python under /root, 0700), so that services can run as their own users; a deployment installs kms
    where its users can reach it and needs none of this. Yields the directories changed."""
    uids = sorted({pwd.getpwnam(user).pw_uid for user in users})
    changed: list[tuple[Path, bytes | None, int]] = []
    try:
        for directory in _blocking(paths):
            try:
                before: bytes | None = os.getxattr(directory, _ACL)
            except OSError:
                before = None
            mode = stat.S_IMODE(os.stat(directory).st_mode)
            entries = [e for e in _acl_entries(directory) if not (e[0] == _USER and e[2] in uids)]
            entries += [(_USER, _SEARCH, uid) for uid in uids]
            group = next(perm for tag, perm, _ in entries if tag == _GROUP_OBJ)
            mask = next((perm for tag, perm, _ in entries if tag == _MASK), group)
            entries = [e for e in entries if e[0] != _MASK] + [(_MASK, mask | _SEARCH, _UNDEFINED)]
            entries.sort(key=lambda e: (e[0], e[2]))
            raw = struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)
            try:
                os.setxattr(directory, _ACL, raw)
            except OSError as error:
                raise ConfigError(f"{directory}: cannot give the service users search access (POSIX ACLs: "
                                  f"{error.strerror}); install kms where other users can reach it") from None
            changed.append((directory, before, mode))
        yield [directory for directory, _, _ in changed]
    finally:
        for directory, before, mode in reversed(changed):
            if before is None:
                os.removexattr(directory, _ACL)
            else:
                os.setxattr(directory, _ACL, before)
            os.chmod(directory, mode)


# -- the layout ---------------------------------------------------------------------------------------------------


def _chown(path: Path, user: str | None, group: str | None, mode: int) -> None:
    uid = pwd.getpwnam(user).pw_uid if user else -1
    gid = grp.getgrnam(group).gr_gid if group else -1
    os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(path, mode)


def _own_tree(path: Path, user: str) -> None:
    """``path`` and everything under it owned by ``user`` (and its group); directories 0700, files 0600."""
    entry = pwd.getpwnam(user)
    for directory, _, files in os.walk(path):
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        os.chmod(directory, 0o700)
        for name in files:
            file = Path(directory) / name
            os.chown(file, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
            os.chmod(file, 0o600)


def _searchable_by_all(path: Path) -> None:
    """ConfigError unless every directory from / down to ``path`` lets other users search it (the service users
    must reach their own directories under it)."""
    for ancestor in [*reversed(path.parents), path]:
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            raise ConfigError(f"{ancestor}: other users cannot search this directory; the separated layout must be "
                              "under directories every service user can traverse (not under /root or a 0700 "
                              "temporary directory)")


def _tokendir(conf: Path) -> Path:
    for line in conf.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "directories.tokendir":
            return Path(value.strip())
    raise ConfigError(f"{conf}: no directories.tokendir")


def _label_of(token: Path, staging: Path) -> str | None:
    """The label of the token in directory ``token``: moved alone into a staging tokendir, asked of softhsm2-util
    (SoftHSM2 names token directories by a UUID, not by label), moved back. None if not one token."""
    conf = softhsm.write_conf(staging)
    tokens = staging / "tokens"
    for leftover in tokens.iterdir():
        raise ConfigError(f"{leftover}: left in the staging token directory; move it back by hand")
    moved = tokens / token.name
    shutil.move(str(token), str(moved))
    try:
        labels = softhsm.token_labels(conf)
    finally:
        shutil.move(str(moved), str(token))
    return next(iter(labels)) if len(labels) == 1 else None


def _move_tokens(home: Home, root: Path, wanted: Mapping[str, str]) -> None:
    """Move each wanted token (label -> component) from the development home's tokendir into the component's own
    tokendir; a token already moved (found under the component's configuration) is left alone."""
    missing = {label: c for label, c in wanted.items()
               if label not in softhsm.token_labels(root / c / "hsm" / "softhsm2.conf")}
    if not missing:
        return
    source = _tokendir(home.softhsm2_conf)
    staging = root / ".staging"
    for token in sorted(p for p in source.iterdir() if p.is_dir()):
        label = _label_of(token, staging)
        if label in missing:
            shutil.move(str(token), str(root / missing[label] / "hsm" / "tokens" / token.name))
            del missing[label]
    shutil.rmtree(staging, ignore_errors=True)
    if missing:
        raise ConfigError(f"{home.path}: no token labelled {sorted(missing)[0]} in {source}")


def _move_pin(source: Path, target: Path, user: str, handed_over: bool) -> str | None:
    """Move a PIN file (or keep the one moved before): owned by ``user``, 0400. Returns the PIN; None if it is in
    neither place and ``handed_over`` (a PinSource took it on an earlier run)."""
    if source.exists():
        write_private(target, source.read_bytes())
        source.unlink()
    elif not target.exists():
        if handed_over:
            return None
        raise ConfigError(f"{source}: no PIN file (and none at {target})")
    _chown(target, user, None, 0o400)
    return target.read_text(encoding="utf-8").splitlines()[0].strip()


def _write_yaml(path: Path, data: object) -> None:
    write_private(path, yaml.safe_dump(data, sort_keys=False))


def separate(home: Home, root: Path, users: ServiceUsers, *,
             pin_sources: Mapping[str, PinSource] | None = None,
             approles: Mapping[str, AppRole] | None = None) -> Layout:
    """Build the separated layout under ``root`` from the development home (run as root, after ``ensure_users``).
    The home's domain and audit tokens and their user PINs are moved out of it, its database moved to ``root/db``;
    everything else of the home (stations, clients, the CA) stays. Idempotent: a second run on the same home and
    root rewrites the configurations and ownerships and moves nothing twice."""
    if os.geteuid() != 0:
        raise ConfigError("separating a home into OS users needs root")
    root = root.resolve()
    cfg = config_mod.load(home.config)
    if cfg.server is None or cfg.audit is None:
        raise ConfigError(f"{cfg.path}: a development home has 'server' and 'audit' sections")
    layout = Layout(root, users)
    root.mkdir(parents=True, exist_ok=True)
    _chown(root, "root", "root", 0o755)
    _searchable_by_all(root)
    front_group = grp.getgrgid(pwd.getpwnam(users.front).pw_gid).gr_name
    sources = dict(pin_sources or {})

    tokens = {**{cfg.domains[d].token: d for d in DOMAINS}, cfg.audit.token: AUDIT}
    for component in SIGNERS:
        softhsm.write_conf(root / component / "hsm")
    _move_tokens(home, root, tokens)
    pins = {c: _move_pin(home.path / "pins" / f"{c}.pin", layout.pin_file(c), users.of(c), c in sources)
            for c in SIGNERS}

    # The database: checkpointed into its main file (the last connection to close does that), then moved.
    db_dir = root / "db"
    db_dir.mkdir(exist_ok=True)
    _chown(db_dir, "root", users.database, 0o2770)
    home_db = home.path / "kms.db"
    if home_db.exists():
        connection = sqlite3.connect(home_db)
        try:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            connection.close()
        shutil.move(str(home_db), str(layout.database))
        for suffix in ("-wal", "-shm"):
            Path(f"{home_db}{suffix}").unlink(missing_ok=True)
    _chown(layout.database, users.front, users.database, 0o660)
    database = f"sqlite:///{layout.database}"

    run = root / "run"
    run.mkdir(exist_ok=True)
    _chown(run, "root", "root", 0o755)
    for component in SIGNERS:
        (run / component).mkdir(exist_ok=True)
        # setgid: the socket the worker binds here is born in the front end's group, which the worker (not a member,
        # or it could reach the other workers' sockets) could not give it otherwise; worker.socket_group then only
        # confirms the group, and the worker makes the socket 0660.
        _chown(run / component, users.of(component), front_group, 0o2710)

    module = cfg.hsm.module
    profile = {} if cfg.hsm.mechanisms == STANDARD else {"mechanisms": cfg.hsm.mechanisms}  # hsm.mechanisms, carried
    for component in SIGNERS:
        directory = root / component
        source = sources.get(component)
        pin = pins[component]
        if source is not None and pin is not None:  # not yet handed over
            if source.store is not None:
                source.store(pin)
            layout.pin_file(component).unlink()
        reference = source.reference if source is not None else f"file:{PIN_FILE}"
        doc: dict[str, Any] = {"hsm": {"module": module, "softhsm2_conf": "hsm/softhsm2.conf", **profile}}
        if component == AUDIT:
            doc["audit"] = {"token": cfg.audit.token, "pin": reference,
                            "checkpoint_records": cfg.audit.checkpoint_records,
                            "checkpoint_seconds": cfg.audit.checkpoint_seconds}
            doc["database"] = database  # the loader asks for one; the audit signer never opens it
        else:
            doc["domains"] = {component: {"token": cfg.domains[component].token, "pin": reference}}
            doc["database"] = database
            if not (directory / "profiles").exists():
                copy_tree_private(cfg.profiles, directory / "profiles")
            doc["profiles"] = "profiles"
            doc["workers_per_domain"] = cfg.workers_per_domain
        if source is not None and source.openbao:
            doc["openbao"] = dict(source.openbao)
        doc["worker"] = {"listen": f"unix:{layout.socket(component)}", "socket_group": front_group}
        officers = home.officers_file(component)
        if component != AUDIT and officers.exists():  # the officers it trusts, in a file of its own user's
            write_private(directory / "officers.yaml", officers.read_bytes())
            doc["worker"]["officers"] = "officers.yaml"
        _write_yaml(layout.worker_config(component), doc)
        _own_tree(directory, users.of(component))
        if layout.pin_file(component).exists():
            os.chmod(layout.pin_file(component), 0o400)

    front = root / FRONT
    tls = cfg.server.tls
    for name, path in (("server.pem", tls.cert), ("server.key", tls.key), ("ca.pem", tls.ca), ("crl.pem", tls.crl)):
        if path is None:
            continue
        if not isinstance(path, Path):  # a reference (e.g. the key in OpenBao): not a file to copy
            raise ConfigError(f"{cfg.path}: server.tls: {name} must be a file in a development home")
        write_private(front / "pki" / name, path.read_bytes())
    if not (front / "profiles").exists():
        copy_tree_private(cfg.profiles, front / "profiles")
    server = yaml.safe_load(home.config.read_text(encoding="utf-8"))["server"]
    server["tls"] = {"cert": "pki/server.pem", "key": "pki/server.key", "ca": "pki/ca.pem",
                     **({"crl": "pki/crl.pem"} if tls.crl is not None else {})}
    _write_yaml(layout.front_config, {
        "hsm": {"module": module, **profile},
        "domains": {d: {"token": cfg.domains[d].token} for d in DOMAINS},  # no PIN: the workers hold them
        "database": database,
        "profiles": "profiles",
        "workers_per_domain": cfg.workers_per_domain,
        "server": server,
        "audit": {"token": cfg.audit.token, "checkpoint_records": cfg.audit.checkpoint_records,
                  "checkpoint_seconds": cfg.audit.checkpoint_seconds},
        "workers": {c: f"unix:{layout.socket(c)}" for c in SIGNERS},
    })
    _own_tree(front, users.front)
    for component, approle in (approles or {}).items():
        files = {root / component / ROLE_ID: approle.role_id, root / component / SECRET_ID: approle.secret_id}
        for path, value in files.items():
            write_private(path, value + "\n")
        _own_tree(root / component / ROLE_ID.partition("/")[0], users.of(component))
        for path in files:
            os.chmod(path, 0o400)
    return layout


# -- who can read what ----------------------------------------------------------------------------------------------

#: Run as the user being measured, isolated (-I): for each path, can this user read it? A file: open and read a
#: byte. A directory: list it and open every file in it (a token's objects). A Unix socket: connect to it.
_PROBE = r"""
import json, os, socket, stat, sys
result = {}
for path in json.loads(sys.argv[1]):
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
        elif os.path.isdir(path):
            for name in os.listdir(path):
                if os.path.isfile(os.path.join(path, name)):
                    with open(os.path.join(path, name), "rb") as f:
                        f.read(1)
        else:
            with open(path, "rb") as f:
                f.read(1)
        result[path] = True
    except OSError:
        result[path] = False
print(json.dumps(result))
"""


def readable_by(user: str, paths: Sequence[Path]) -> dict[Path, bool]:
    """For each path, whether ``user`` can read it, found by trying in a child process running as that user."""
    result = subprocess.run([sys.executable, "-I", "-c", _PROBE, json.dumps([str(p) for p in paths])],
                            capture_output=True, text=True, check=False, cwd="/", env={"PATH": "/usr/bin:/bin"},
                            **run_as(user))
    if result.returncode != 0:
        raise ConfigError(f"cannot run a probe as {user} (exit {result.returncode}): {result.stderr.strip()[-300:]}")
    found = json.loads(result.stdout)
    return {p: bool(found[str(p)]) for p in paths}


def readability(users: Sequence[str], secrets: Mapping[str, Path]) -> dict[str, dict[str, bool]]:
    """secret name -> user -> readable, measured (``readable_by``)."""
    matrix: dict[str, dict[str, bool]] = {name: {} for name in secrets}
    for user in users:
        found = readable_by(user, list(secrets.values()))
        for name, path in secrets.items():
            matrix[name][user] = found[path]
    return matrix


#: Run as the user being measured, isolated: log in with the AppRole credentials in the files given (if this user
#: can read them), then try to read each KV v2 secret. Standard library only (urllib), so it needs nothing of kms.
_BAO_PROBE = r"""
import json, sys, urllib.error, urllib.request
address, role_id_file, secret_id_file, paths = json.loads(sys.argv[1])

def call(path, body=None, token=None):
    request = urllib.request.Request(address + "/v1/" + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"X-Vault-Token": token} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)

result = {path: False for path in paths}
try:
    role_id = open(role_id_file).read().strip()
    secret_id = open(secret_id_file).read().strip()
except OSError:
    print(json.dumps(result))
    sys.exit(0)
token = call("auth/approle/login", {"role_id": role_id, "secret_id": secret_id})["auth"]["client_token"]
for path in paths:
    mount, _, rest = path.partition("/")
    try:
        call(f"{mount}/data/{rest}", token=token)
        result[path] = True
    except urllib.error.HTTPError as error:
        if error.code not in (403, 404):
            raise
print(json.dumps(result))
"""


def openbao_readability(layout: Layout, address: str, paths: Mapping[str, str]) -> dict[str, dict[str, bool]]:
    """secret name -> user -> readable, for KV v2 secrets (name -> ``mount/path``): as each user with an AppRole in
    ``layout``, in a child process running as that user, its credential files read and its AppRole logged in."""
    matrix: dict[str, dict[str, bool]] = {name: {} for name in paths}
    for component, user in layout.users.all().items():
        approle = layout.approle(component)
        if approle is None:
            continue
        argument = json.dumps([address, str(approle[0]), str(approle[1]), list(paths.values())])
        result = subprocess.run([sys.executable, "-I", "-c", _BAO_PROBE, argument], capture_output=True, text=True,
                                check=False, cwd="/", env={"PATH": "/usr/bin:/bin"}, **run_as(user))
        if result.returncode != 0:
            raise ConfigError(f"cannot run an OpenBao probe as {user} (exit {result.returncode}): "
                              f"{result.stderr.strip()[-300:]}")
        found = json.loads(result.stdout)
        for name, path in paths.items():
            matrix[name][user] = bool(found[path])
    return matrix


#: Run as the user being measured: open the SQLite database for writing and change every key registry row of
#: ``domain`` (label = label, in a transaction rolled back: nothing stays changed). Standard library only.
_DB_WRITE_PROBE = r"""
import json, sqlite3, sys
path, domain = json.loads(sys.argv[1])
try:
    db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE keys SET label = label WHERE domain = ?", (domain,))
        db.execute("ROLLBACK")
    finally:
        db.close()
    print(json.dumps(True))
except sqlite3.Error:
    print(json.dumps(False))
"""


def database_writers(users: Sequence[str], database: Path, domain: str = "bank") -> dict[str, bool]:
    """user -> whether a child process running as that user can change ``domain``'s key registry rows in the SQLite
    ``database`` (measured; the change is rolled back)."""
    found = {}
    for user in users:
        result = subprocess.run([sys.executable, "-I", "-c", _DB_WRITE_PROBE, json.dumps([str(database), domain])],
                                capture_output=True, text=True, check=False, cwd="/", env={"PATH": "/usr/bin:/bin"},
                                **run_as(user))
        if result.returncode != 0:
            raise ConfigError(f"cannot run a database probe as {user} (exit {result.returncode}): "
                              f"{result.stderr.strip()[-300:]}")
        found[user] = bool(json.loads(result.stdout))
    return found


def format_matrix(matrix: Mapping[str, Mapping[str, bool]], users: Sequence[str],
                  writes: Mapping[str, Mapping[str, bool]] | None = None) -> str:
    """The matrix as a Markdown table: a row per secret, a column per user, ``write`` (where ``writes`` says so),
    ``read`` or ``-``."""
    writes = writes or {}
    lines = ["| secret | " + " | ".join(users) + " |", "|---" * (len(users) + 1) + "|"]
    for name, row in matrix.items():
        cells = ("write" if writes.get(name, {}).get(u) else "read" if row[u] else "-" for u in users)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
