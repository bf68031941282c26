"""What tests share besides fixtures (those are in conftest.py): known keys and vectors, card identities, sealing,
clients of the test server, the CLI runner, ceremonies run by a development home's officers (kms.dev.ceremonies), and
a software stand-in for the bank domain's PAN protection for unit tests of the stores (the service always uses
kms.issuance.pans with the bank token; tests/issuance/test_pans.py checks that path against a real token).

Tests import these from here, never from conftest. And the one fake: StorageFault, a database storage fault injected
where the driver raises it."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms import config
from kms.audit.log import mask_pan
from kms.cards import profiles
from kms.cards.cardid import CardIdentity, ProtectedPan, with_luhn_digit
from kms.client.service import Client
from kms.dev import smtoken
from kms.dev.ceremonies import (
    authorize_batch,
    certificate_pem,
    client,
    client_config_for,
    key,
    officer,
    officer_params,
    open_batch,
    run_ceremony,
)
from kms.dev.home import Home
from kms.identity import Principal
from kms.issuance.sealer import DomainSealer, new_serial
from kms.registry import DOMAINS
from kms.server.serve import Service

__all__ = ["authorize_batch", "certificate_pem", "client", "client_config_for", "key", "officer", "officer_params",
           "open_batch", "run_ceremony"]

ROOT = Path(__file__).resolve().parent.parent
VECTORS_PATH = Path(__file__).resolve().parent / "vectors" / "derivation.json"
VECTORS = json.loads(VECTORS_PATH.read_text())
PROFILE = profiles.load(ROOT / "kms" / "policies" / "profiles" / "dual-app.yaml")
TEST_BUREAU = "bureau-test"
#: A profile the test home adds (tests/conftest.py): dual-app-v1 with `pan_luhn: false`, for the public vectors' PANs.
TEST_RANGE_PROFILE = "dual-app-test-range"


def _known_master_keys() -> dict[tuple[str, str], bytes]:
    keys = {(d, name): secrets.token_bytes(16) for d in DOMAINS for name in PROFILE.master_keys(d)}
    # The public vectors' keys where they fit, so a card from the vectors comes out as the vectors say.
    keys[("bank", "bank-imk-ac")] = bytes.fromhex(VECTORS["option_a"][0]["imk"])
    keys[("hrss", "hrss-mk")] = bytes.fromhex(VECTORS["ssc_chain"][0]["root"])
    keys[("bank", "bank-kmc")] = bytes.fromhex(VECTORS["gp_kmc"][0]["kmc"])
    return keys


MASTER_KEYS = _known_master_keys()
TEST_TRANSPORT_KEYS = {d: secrets.token_bytes(32) for d in DOMAINS}



def card(i: int = 0, **overrides: str) -> CardIdentity:
    fields = {
        "card_ref": f"card-{i:06d}", "city_code": "320200", "card_serial": f"{0x86843202AD932A48 + i:016X}",
        "pan": with_luhn_digit(f"{621483000000000000 + i}"), "psn": "01", "kdd": f"{0x00010203040506070809 + i:020X}",
    }
    fields.update(overrides)
    return CardIdentity(**fields)


def seal(sealers: dict[str, DomainSealer], c: CardIdentity, batch: str = "B-1") -> bytes:
    from kms import bundle

    serial = new_serial()
    sections = {d: bundle.encode_section(s.seal(c, serial=serial, batch=batch)) for d, s in sealers.items()}
    return bundle.assemble(serial, c.card_ref, sections)


POSTGRES = os.environ.get("KMS_TEST_POSTGRES_URL")
EngineFactory = Callable[[], sa.Engine]


def service_client(home: Home, service: Service, who: Principal | str) -> Client:
    """A client of ``service`` as a station (its name) or an officer or auditor (their principal)."""
    path = home.station_config(who) if isinstance(who, str) else home.client_config(who)
    cfg = config.load_station(path).client if isinstance(who, str) else config.load_client(path)
    assert cfg is not None
    return Client(cfg, server=f"localhost:{service.port}", timeout=120)


def kms(*args: str, check: bool = False, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own, as a user runs it (``env``: variables set for it, "" unsets one)."""
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if v != ""}
    result = subprocess.run([sys.executable, "-m", "kms.cli", *args], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env=environment)
    if check:
        assert result.returncode == 0, result.stderr
    return result


# -- PANs at rest, in software (unit tests of the stores) ----------------------------------------------------

_KEY = hashlib.sha256(b"kms unit tests: not a key of any domain").digest()


class SoftwarePans:
    def protect(self, cards: Sequence[CardIdentity], batch_id: str = "") -> list[CardIdentity]:
        out = []
        for card in cards:
            if card.pan is None:
                out.append(card)
                continue
            iv = os.urandom(12)
            sealed = b"\x01\x00\x00\x00\x01" + iv + AESGCM(_KEY).encrypt(iv, card.pan.encode(), card.card_ref.encode())
            out.append(dataclasses.replace(card, pan=None, protected=ProtectedPan(
                sealed=sealed, index=pan_index(card.pan), pan_psn_index=pan_index(f"{card.pan}/{card.psn or ''}"),
                masked=mask_pan(card.pan))))
        return out


def pan_index(value: str) -> str:
    return hmac.new(_KEY, value.encode(), hashlib.sha256).hexdigest()


# -- storage faults (fault injection: the one place a test fakes the database) ----------------------------------


def serving_engine(service: Service) -> sa.Engine:
    """The database engine of a running service's process: where a StorageFault goes."""
    engine = service.issuance.store._engine
    assert isinstance(engine, sa.Engine)
    return engine


class StorageFault:
    """While in its ``with`` block, statements of ``engine`` that begin with ``statement`` fail as the database
    driver fails them on a storage fault (``error()``, by default SQLite's "disk I/O error"): the first ``after``
    of them pass, the next ``times`` fail (None: every one until ``clear()``). Raised where the driver raises, so
    SQLAlchemy and kms.store see it as they would see the real one. ``hits``: how many failed."""

    def __init__(self, engine: sa.Engine, statement: str, *, after: int = 0, times: int | None = None,
                 error: Callable[[], Exception] = lambda: sqlite3.OperationalError("disk I/O error")) -> None:
        self.engine, self.statement, self.after, self.times, self.error = engine, statement, after, times, error
        self.seen = self.hits = 0
        self.on = True
        self._lock = threading.Lock()

    def _hook(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not statement.lstrip().upper().startswith(self.statement.upper()):
            return
        with self._lock:
            self.seen += 1
            failing = self.on and self.seen > self.after and (self.times is None or self.hits < self.times)
            if failing:
                self.hits += 1
        if failing:
            raise self.error()

    def clear(self) -> None:
        self.on = False

    def __enter__(self) -> StorageFault:
        sa.event.listen(self.engine, "before_cursor_execute", self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._hook)


# -- a TCP gate: fault injection for a server reached over loopback (OpenBao) ---------------------------------------


class TcpGate:
    """A loopback TCP relay to ``127.0.0.1:<target>`` that a test closes and opens again: closed, it drops every
    connection it holds and each new one as soon as it is accepted, so to a client the server behind it is down.
    ``connections``: connections accepted so far (attempts, open or closed)."""

    def __init__(self, target: int) -> None:
        import socket

        self._target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self.address = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self._open = True
        self._lock = threading.Lock()
        self._live: list[Any] = []
        threading.Thread(target=self._accept, name="tcp-gate", daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                if not self._open:
                    conn.close()
                    continue
                try:
                    upstream = socket.create_connection(("127.0.0.1", self._target), timeout=5)
                except OSError:
                    conn.close()
                    continue
                upstream.settimeout(None)
                self._live += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: Any, sink: Any) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        """The server behind is unreachable from now on (connections in progress are cut)."""
        import socket

        with self._lock:
            self._open = False
            live, self._live = self._live, []
        for s in live:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def open(self) -> None:
        with self._lock:
            self._open = True

    def stop(self) -> None:
        self.close()
        self._server.close()


# -- kms before schema migrations (tests/migrations) ---------------------------------------------------------------

#: The `kms` package of commit 5a25ab4, the last one before schema migrations: `git archive 5a25ab4 kms | xz -9`.
KMS_BEFORE_MIGRATIONS = ROOT / "tests" / "fixtures" / "kms-5a25ab4.tar.xz"


def unpack_kms_before_migrations(dest: Path) -> Path:
    """The old kms unpacked under ``dest``: the directory to put on PYTHONPATH (it holds ``kms/``)."""
    import tarfile

    with tarfile.open(KMS_BEFORE_MIGRATIONS) as archive:
        archive.extractall(dest, filter="data")
    assert (dest / "kms" / "store.py").is_file()
    return dest


def old_kms(tree: Path, *args: str, cwd: Path | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess[str]:
    """``python <args>`` with the old kms of ``tree`` (PYTHONPATH) and this venv's python and libraries."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or tree, env=env)


def with_search_path(url: str, *schemas: str) -> str:
    """``url`` whose connections use these schemas (libpq's options, added to any query the URL has already)."""
    return sa.make_url(url).update_query_dict({"options": f"-csearch_path={','.join(schemas)}"}).render_as_string(
        hide_password=False)


@contextlib.contextmanager
def postgres_schema() -> Any:
    """A fresh PostgreSQL schema (KMS_TEST_POSTGRES_URL): yields the database URL whose connections use it (its
    search_path); dropped afterwards."""
    import uuid

    assert POSTGRES
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield with_search_path(POSTGRES, schema)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def database_rows(engine: sa.Engine) -> dict[str, Any]:
    """Every table of the database with its columns and all its rows, sorted: what to compare before and after
    something that must change nothing."""
    found: dict[str, Any] = {}
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        for name in sorted(inspector.get_table_names()):
            columns = [c["name"] for c in inspector.get_columns(name)]
            table = sa.table(name, *[sa.column(c) for c in columns])
            rows = sorted((tuple(row) for row in conn.execute(sa.select(table))), key=repr)
            found[name] = (columns, sorted(ix["name"] or "" for ix in inspector.get_indexes(name)), rows)
    return found


def postgres_home(path: Path, bureaus: dict[str, tuple[str, ...]]) -> tuple[Home, sa.Engine]:
    """A development home at ``path`` whose records are in a fresh schema of KMS_TEST_POSTGRES_URL's database (one
    worker process per domain), and an engine on that schema for the test's own statements (the caller drops the
    schema: ``drop_schema``)."""
    import uuid

    import yaml

    from kms.dev.home import FORMAT_FILE, HOME_FORMAT, init_home
    from kms.dev.pki import DevPki
    from kms.files import write_private
    from kms.hsm.labels import AUDIT_TOKEN, domain_token

    assert POSTGRES is not None
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES, connect_args={"options": f"-csearch_path={schema}"})
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    pki = DevPki(path / "pki")
    server, relative = pki.server(), (lambda p: os.path.relpath(p, path))
    write_private(path / FORMAT_FILE, f"{HOME_FORMAT}\n")  # init_home completes the home this kms.yaml starts
    write_private(path / "kms.yaml", yaml.safe_dump({
        "hsm": {"module": "auto", "softhsm2_conf": "hsm/softhsm2.conf"},
        "domains": {d: {"token": domain_token(d), "pin": f"file:pins/{d}.pin"} for d in DOMAINS},
        "database": f"{POSTGRES}?options=-csearch_path%3D{schema}",
        "profiles": "profiles", "workers_per_domain": 1,
        "server": {"listen": "127.0.0.1:0", "tls": {"cert": relative(server.cert), "key": relative(server.key),
                                                   "ca": relative(pki.ca.cert), "crl": relative(pki.crl)}},
        "audit": {"token": AUDIT_TOKEN, "pin": "file:pins/audit.pin"},
    }, sort_keys=False))
    return init_home(path, bureaus=bureaus), admin


def drop_schema(admin: sa.Engine) -> None:
    """Drop the schema ``postgres_home`` made (the engine's search path) and dispose of the engine."""
    with admin.begin() as conn:
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


#: For tests that need the development SM token (deploy/softhsm2-sm: SoftHSM2 with SM4, SM2 and SM3 under the
#: softhsm2-sm-dev codes; a token that checks kms's PKCS#11 calls, not vendor compatibility). They skip, saying so,
#: when it is not built; CI builds it first (.ci/run) and names it in $KMS_SM_PKCS11_MODULE, so there they run.
SM_TOKEN_PATCH = ROOT / "deploy" / "softhsm2-sm" / "softhsm2-sm.patch"
SM2_MULG_HEADER = "src/lib/crypto/kms_sm2_mulg.h"


def patch_new_file(patch: str, path: str) -> str:
    """The text of a file a unified diff creates (its hunk against /dev/null)."""
    name = re.escape(path)
    match = re.search(rf"^--- (?:/dev/null|a/{name})[^\n]*\n\+\+\+ b/{name}[^\n]*\n@@ -0,0 \+1,(\d+) @@\n", patch, re.M)
    assert match is not None, f"the patch does not create {path}"
    lines = patch[match.end():].split("\n")[: int(match.group(1))]
    assert all(line.startswith("+") for line in lines)
    return "".join(line[1:] + "\n" for line in lines)


def sm2_mulg_header() -> str:
    """kms_sm2_mulg.h (the SM token's SM2 comb) as deploy/softhsm2-sm/softhsm2-sm.patch ships it."""
    return patch_new_file(SM_TOKEN_PATCH.read_text(), SM2_MULG_HEADER)


requires_sm_token = pytest.mark.skipif(
    smtoken.sm_module() is None,
    reason="the development SM token is not built: run deploy/softhsm2-sm/build.sh (see deploy/softhsm2-sm/README.md)")
