"""Storage faults (kms.store.storage_fault, translate_storage_faults): a database that cannot be reached, read or
written now is StorageUnavailable (UNAVAILABLE, retryable) from every store; everything else a database says stays
what it is. Real faults of both backends: SQLite's own SQLITE_FULL, SQLITE_CANTOPEN and SQLITE_BUSY, PostgreSQL's
disk_full raised by the server (a trigger), a backend terminated by the administrator, a server that is not there."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from helpers import EngineFactory, SoftwarePans, card
from sqlalchemy import event

from kms import store
from kms.audit.log import AuditLog
from kms.clock import SystemClock
from kms.errors import AlreadyExists, AuditUnavailable, ConfigError, StorageUnavailable
from kms.issuance.batches import BatchStore

OFFICER = "urn:kms:officer:hrss:alice"


# -- which errors are faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "fault"), [
    (sqlite3.OperationalError("disk I/O error"), "disk I/O error"),
    (sqlite3.OperationalError("database or disk is full"), "disk full"),
    (sqlite3.OperationalError("unable to open database file"), "cannot open the database file"),
    (sqlite3.OperationalError("database is locked"), "database locked"),
    (sqlite3.OperationalError("attempt to write a readonly database"), "database read-only"),
    (sqlite3.OperationalError("no such table: batches"), None),  # a programming error
    (sqlite3.OperationalError('near "SELEC": syntax error'), None),
    (sqlite3.IntegrityError("UNIQUE constraint failed: batches.batch_id"), None),
    (sqlite3.DatabaseError("database disk image is malformed"), None),  # corrupt: not fixed by waiting
    (psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
     "database server shutting down"),
    (psycopg.errors.CannotConnectNow("the database system is starting up"),
     "database server not accepting connections"),
    (psycopg.errors.DiskFull("could not extend file"), "disk full"),
    (psycopg.errors.IoError("could not read block"), "disk I/O error"),
    (psycopg.errors.TooManyConnections("too many clients"), "too many connections"),
    (psycopg.errors.ConnectionFailure("connection failure"), "connection lost"),
    (psycopg.errors.SerializationFailure("could not serialize access"), "serialization failure"),
    (psycopg.errors.DeadlockDetected("deadlock detected"), "deadlock"),
    (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), "statement cancelled"),
    (psycopg.OperationalError("connection failed: Connection refused"), "cannot connect"),
    (psycopg.errors.UniqueViolation("duplicate key value"), None),
    (psycopg.errors.UndefinedTable("relation does not exist"), None),
    (psycopg.errors.ProgramLimitExceeded("index row size exceeds maximum"), None),
    (ValueError("disk I/O error"), None),  # not a database's error at all
])
def test_which_database_errors_are_storage_faults(error: Exception, fault: str | None) -> None:
    assert store.storage_fault(error) == fault
    wrapped = sa.exc.DBAPIError.instance("SELECT 1", {}, error, Exception)
    assert store.storage_fault(wrapped) == fault
    # A connection SQLAlchemy found lost is a fault whatever the driver said.
    assert store.storage_fault(error, disconnected=True) == "connection lost"


# -- SQLite's own faults -------------------------------------------------------------------------------------------


def _full(engine: sa.Engine) -> None:
    """Every connection of ``engine`` made from now on cannot grow the database file: SQLite's SQLITE_FULL, as on
    a full disk (PRAGMA max_page_count, per connection)."""
    @event.listens_for(engine, "connect")
    def limit(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")
    engine.dispose()


def test_a_full_sqlite_disk_is_unavailable_and_a_duplicate_is_still_a_duplicate(tmp_path: Path) -> None:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.upgrade(engine)
    clock = SystemClock()
    audit = AuditLog(engine, clock)
    batches = BatchStore(engine, clock, audit)
    cards = SoftwarePans().protect([card(i) for i in range(3)], "B-1")
    batches.create_batch("B-1", "bureau-a", "dual-app", cards, OFFICER)
    _full(engine)
    with pytest.raises(AlreadyExists):  # reads, then a constraint: what it always was
        batches.create_batch("B-1", "bureau-a", "dual-app", cards, OFFICER)
    many = SoftwarePans().protect([card(100 + i, card_ref=f"big-{i:05d}") for i in range(2_000)], "B-2")
    with pytest.raises(StorageUnavailable) as full:
        batches.create_batch("B-2", "bureau-a", "dual-app", many, OFFICER)
    assert str(full.value) == "the database is unavailable (disk full); try again"
    with pytest.raises(AuditUnavailable) as unwritable:
        for _ in range(10_000):
            audit.record("test.filler", detail={"text": "x" * 2_000})
    assert str(unwritable.value) == "the audit log cannot be written (disk full); nothing was done"
    engine.dispose()


def test_a_sqlite_file_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "gone" / "kms.db"
    engine = store.make_engine(f"sqlite:///{path}")  # its directory does not exist (a volume not mounted)
    with pytest.raises(StorageUnavailable, match=r"^the database is unavailable \(cannot open the database file\)"):
        BatchStore(engine, SystemClock()).get_batch("B-1")


def test_a_sqlite_database_locked_past_the_busy_timeout_is_unavailable(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "BUSY_TIMEOUT", 0.2)
    url = f"sqlite:///{tmp_path / 'kms.db'}"
    engine = store.make_engine(url)
    store.upgrade(engine)
    holder = sqlite3.connect(tmp_path / "kms.db")
    holder.execute("BEGIN EXCLUSIVE")  # another process's long write transaction
    try:
        with pytest.raises(AuditUnavailable) as locked:
            AuditLog(engine, SystemClock()).record("test.locked")
        assert str(locked.value) == "the audit log cannot be written (database locked); nothing was done"
        with pytest.raises(StorageUnavailable, match=r"^the database is unavailable \(database locked\); try again$"):
            BatchStore(engine, SystemClock()).create_batch("B-1", "bureau-a", "dual-app",
                                                           SoftwarePans().protect([card(1)], "B-1"), OFFICER)
    finally:
        holder.rollback()
        holder.close()
    AuditLog(engine, SystemClock()).record("test.unlocked")  # the lock gone, the same engine writes again
    engine.dispose()


# -- PostgreSQL ----------------------------------------------------------------------------------------------------


@pytest.fixture
def pg(backend: EngineFactory) -> sa.Engine:
    """An engine on a fresh PostgreSQL schema (skipped without KMS_TEST_POSTGRES_URL), with the translation that
    store.make_engine gives every engine."""
    return store.translate_storage_faults(backend())


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_postgresql_disk_full_and_a_terminated_backend_are_unavailable(pg: sa.Engine) -> None:
    clock = SystemClock()
    audit = AuditLog(pg, clock)
    batches = BatchStore(pg, clock, audit)
    cards = SoftwarePans().protect([card(i) for i in range(3)], "B-1")
    batches.create_batch("B-1", "bureau-a", "dual-app", cards, OFFICER)
    with pg.begin() as conn:  # the server refuses new audit records as it does on a full disk (SQLSTATE 53100)
        conn.execute(sa.text("CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                             "RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full'; END $$"))
        conn.execute(sa.text("CREATE TRIGGER disk_full BEFORE INSERT ON audit_log FOR EACH ROW "
                             "EXECUTE FUNCTION disk_full()"))
    with pytest.raises(AuditUnavailable) as full:
        batches.create_batch("B-2", "bureau-a", "dual-app", cards[:1], OFFICER)
    assert str(full.value) == "the audit log cannot be written (disk full); nothing was done"
    with pytest.raises(AlreadyExists):  # a constraint is still a constraint
        batches.create_batch("B-1", "bureau-a", "dual-app", cards, OFFICER)
    with pg.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER disk_full ON audit_log"))

    # The administrator terminates the connection a store is using, in the middle of its work.
    with pg.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with pg.connect() as admin:
            assert admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
        with pytest.raises(StorageUnavailable, match=r"^the database is unavailable \((connection lost|database "
                                                     r"server shutting down)\); try again$"):
            conn.execute(sa.text("SELECT 1"))
    assert batches.get_batch("B-1").card_count == 3  # the pool replaced the connection: the store works again


def test_a_postgresql_server_that_is_not_there_is_unavailable() -> None:
    engine = store.make_engine("postgresql+psycopg://kms:kms@127.0.0.1:1/nowhere?connect_timeout=2")
    with pytest.raises(StorageUnavailable, match=r"^the database is unavailable \(cannot connect\); try again$"):
        BatchStore(engine, SystemClock()).get_batch("B-1")


def test_database_display_hides_every_password_of_the_url() -> None:
    """The userinfo password and libpq's secret query parameters (password, sslpassword, passfile) are masked;
    the rest of the URL is shown as it is."""
    shown = store.database_display("postgresql+psycopg://kms:UserInfoPw@db:5432/kms?password=QueryPw"
                                   "&sslpassword=SslPw&passfile=/home/k/.pgpass&sslmode=verify-full&PASSWORD=UpperPw")
    for secret in ("UserInfoPw", "QueryPw", "SslPw", "/home/k/.pgpass", ".pgpass", "UpperPw"):
        assert secret not in shown, shown
    assert shown.startswith("postgresql+psycopg://kms:***@db:5432/kms?") and "sslmode=verify-full" in shown
    assert store.database_display("sqlite:////srv/kms/kms.db") == "sqlite:////srv/kms/kms.db"
    engine = store.make_engine("postgresql+psycopg://kms:pw@db/kms?password=QueryPw")
    try:
        assert "QueryPw" not in store._display(engine)
    finally:
        engine.dispose()


def test_the_sqlite_lock_file_of_a_file_uri_database_is_beside_its_file(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``file:`` URI database is locked like any other file (it was not locked at all); an in-memory one has one
    process and needs no lock."""
    monkeypatch.setattr(store, "LOCK_WAIT", 0.2)
    url = f"sqlite:///file:{tmp_path / 'kms.db'}?uri=true"
    first, second = sa.create_engine(url), sa.create_engine(url)
    assert store.sqlite_lock_path(first, "x") == tmp_path / "kms.db.x.lock"
    memory = sa.create_engine("sqlite:///file:m?mode=memory&uri=true", poolclass=sa.pool.StaticPool)
    assert store.sqlite_lock_path(memory, "x") is None
    assert store.sqlite_lock_path(sa.create_engine("sqlite://"), "x") is None
    with (store.sqlite_file_lock(first, "x"), pytest.raises(StorageUnavailable, match="lock not available"),
          store.sqlite_file_lock(second, "x")):
        pass
    with store.sqlite_file_lock(second, "x"):
        assert (tmp_path / "kms.db.x.lock").stat().st_mode & 0o777 == 0o600


def test_the_sqlite_lock_file_must_not_be_a_symbolic_link(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    (tmp_path / "kms.db.x.lock").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match=r"kms\.db\.x\.lock: cannot open the lock file"), \
            store.sqlite_file_lock(engine, "x"):
        pass


def test_a_new_sqlite_database_opened_while_another_connection_holds_its_lock_waits_for_it(tmp_path: Path) -> None:
    """Switching a new database to WAL needs its lock, and SQLite says "database is locked" at once (no busy timeout)
    while another connection holds one: several processes opening a new database together failed at random. The
    engine's first connection now waits for the lock like any other statement."""
    path = tmp_path / "kms.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")  # a database in rollback-journal mode, as SQLite makes it
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(0.5, holder.execute, args=("COMMIT",)).start()
    engine = store.make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()
        holder.close()
