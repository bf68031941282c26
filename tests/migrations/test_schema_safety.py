"""kms.store's schema functions where a database is not what they expect: a state that changes between the check
and the lock, PostgreSQL search_path with several schemas or none that exists, a role without the right, a table
lock held by a running kms, a revision table with two rows, a primary key changed by hand; SQLite revisions that
recreate a parent table (Alembic's batch mode) on a database with rows; the cheap check HSM worker processes make."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from helpers import POSTGRES, ROOT, database_rows, kms, postgres_schema, with_search_path

from kms import store
from kms.errors import ConfigError, Unavailable

HEAD = "0002_checkpoint_replica"
postgres = pytest.mark.skipif(not POSTGRES, reason="KMS_TEST_POSTGRES_URL is not set")


@pytest.fixture
def pg_engine() -> Iterator[tuple[sa.Engine, str]]:
    """A PostgreSQL schema's engine and the schema's name."""
    if not POSTGRES:
        pytest.skip("KMS_TEST_POSTGRES_URL is not set")
    with postgres_schema() as pg:
        made = store.make_engine(pg)
        with made.connect() as conn:
            schema = store.schema_of(conn)
        assert schema is not None
        yield made, schema
        made.dispose()


def _downgrade(engine: sa.Engine, revision: str) -> None:
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(store.MIGRATIONS))
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def _config(tmp_path: Path, url: str) -> str:
    """The least kms.yaml `kms db` loads: its database is ``url``."""
    path = tmp_path / "kms.yaml"
    path.write_text(f"hsm: {{}}\ndomains:\n  bank: {{token: t, pin: 'env:UNUSED'}}\ndatabase: '{url}'\n")
    return str(path)


def _columns(engine: sa.Engine, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns(table)}


def test_head_is_the_head_of_the_revisions() -> None:
    """store.HEAD (what require_head compares with, without Alembic) is the head of kms/migrations/versions."""
    assert store.HEAD == store._scripts().get_current_head() == HEAD


def test_creating_an_empty_database_refuses_what_it_finds_under_the_lock(engine: sa.Engine,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """require_current(create=True) saw "empty" before its lock; another process left an older schema meanwhile
    (the race made certain: its first look says empty). It refuses that schema as require_current does and changes
    nothing, rather than upgrading it."""
    store.upgrade(engine)
    _downgrade(engine, "0001_baseline")
    before = database_rows(engine)
    monkeypatch.setattr(store, "schema_status", lambda _: store.SchemaStatus(None, HEAD, "empty"))
    with pytest.raises(ConfigError) as refused:
        store.require_current(engine, create=True, config="home/kms.yaml")
    assert str(refused.value) == (f"{store._display(engine)}: the database schema is at revision 0001_baseline, this "
                                  f"kms needs {HEAD}: run `kms db upgrade --config home/kms.yaml`")
    assert database_rows(engine) == before
    # Another process that created it at head meanwhile: fine.
    monkeypatch.undo()
    store.upgrade(engine)
    monkeypatch.setattr(store, "schema_status", lambda _: store.SchemaStatus(None, HEAD, "empty"))
    assert store.require_current(engine, create=True).state == "empty"


def test_the_primary_keys_are_compared(engine: sa.Engine) -> None:
    """A primary key changed by hand (or in kms/store.py without a revision) is a difference; so is a server
    default."""
    store.upgrade(engine)
    changed = sa.MetaData()
    for table in store.metadata.sorted_tables:
        if table.name != "retired_identities":
            table.to_metadata(changed)
    sa.Table("retired_identities", changed,
             *[sa.Column(c.name, c.type, nullable=c.nullable, primary_key=c.name == "field")
               for c in store.retired_identities.columns])
    with engine.connect() as conn:
        assert store.schema_differences(conn, changed) == [
            "retired_identities has primary key (field, value), kms makes it (field)"]
    changed.tables["limits"].c.value.server_default = sa.DefaultClause("0")
    with engine.connect() as conn:
        found = store.schema_differences(conn, changed)
    assert len(found) == 2 and found[0].startswith("limits.value has default None"), found


def test_an_unversioned_database_with_another_primary_key_is_refused(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        store._baseline().create_all(conn)
        conn.execute(sa.text("DROP TABLE retired_identities"))
        conn.execute(sa.text("CREATE TABLE retired_identities (field VARCHAR(16) NOT NULL, value VARCHAR(64) NOT NULL,"
                             " shown VARCHAR(40), card_ref VARCHAR(64) NOT NULL, retired_at VARCHAR(32) NOT NULL, "
                             "retired_by VARCHAR(200) NOT NULL, PRIMARY KEY (value))"))
    before = database_rows(engine)
    with pytest.raises(ConfigError, match=r"\(retired_identities has primary key \(value\), kms makes it \(field, "
                                          r"value\)\); it is not upgraded in place"):
        store.upgrade(engine)
    assert database_rows(engine) == before


def test_two_rows_in_the_revision_table_are_a_config_error(engine: sa.Engine) -> None:
    store.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO alembic_version (version_num) VALUES ('0001_baseline')"))
    for attempt in (store.schema_status, store.upgrade, store.require_current, store.require_head):
        with pytest.raises(ConfigError, match="the schema's revision table alembic_version is not one kms writes"):
            attempt(engine)


def test_a_worker_never_creates_the_schema(url: str, tmp_path: Path) -> None:
    """`kms worker` on an empty database: refused naming `kms db upgrade` (its role need not own the tables)."""
    from kms.server.worker import dual_control_for

    cfg = SimpleNamespace(database=url, path=tmp_path / "worker.yaml", worker=None)
    with pytest.raises(ConfigError, match=r"the database schema is empty \(no kms tables\).*run `kms db upgrade"):
        dual_control_for(cast(Any, cfg), "hrss")
    engine = store.make_engine(url)
    try:
        assert store.schema_status(engine).state == "empty"
    finally:
        engine.dispose()


def test_require_head_reads_the_revision_and_refuses_as_require_current(engine: sa.Engine) -> None:
    with pytest.raises(ConfigError, match=r"the database schema is empty"):
        store.require_head(engine, config="kms.yaml")
    store.upgrade(engine)
    store.require_head(engine)
    _downgrade(engine, "0001_baseline")
    with pytest.raises(ConfigError, match=r"at revision 0001_baseline, this kms needs 0002"):
        store.require_head(engine)


def test_a_process_on_a_current_database_does_not_load_alembic(engine: sa.Engine, url: str) -> None:
    """An HSM worker process's check (runtime.registry: store.require_head) reads the revision without Alembic."""
    store.upgrade(engine)
    child = textwrap.dedent("""
        import sys
        from kms import runtime, store
        engine = store.make_engine(sys.argv[1])
        store.require_head(engine)
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("alembic", "mako")))
    """)
    done = subprocess.run([sys.executable, "-c", child, url], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout == "[]\n", done


# -- SQLite: foreign keys while a revision recreates a table -------------------------------------------------------

def _row(table: sa.Table, **given: object) -> dict[str, object]:
    row: dict[str, object] = {}
    for column in table.columns:
        if column.name in given or column.nullable:
            continue
        kind = column.type
        row[column.name] = (0 if isinstance(kind, sa.Integer) else b"" if isinstance(kind, sa.LargeBinary) else "x")
    return row | given


def _throwaway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    """kms's revisions and one more, 0003_throwaway (``body`` its upgrade()), as the revisions kms.store runs."""
    location = tmp_path / "migrations"
    shutil.copytree(store.MIGRATIONS, location, ignore=shutil.ignore_patterns("__pycache__"))
    (location / "versions" / "0003_throwaway.py").write_text(textwrap.dedent('''
        import sqlalchemy as sa
        from alembic import op

        revision = "0003_throwaway"
        down_revision = "0002_checkpoint_replica"
        branch_labels = None
        depends_on = None


        def upgrade() -> None:
        {body}


        def downgrade() -> None:
            pass
    ''').format(body=textwrap.indent(textwrap.dedent(body), "    ")))
    monkeypatch.setattr(store, "MIGRATIONS", location)


@pytest.fixture
def sqlite_with_rows(tmp_path: Path) -> Iterator[sa.Engine]:
    """A SQLite database at head with a batch and one of its cards (a child row of batches)."""
    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(store.batches.insert().values(_row(store.batches, batch_id="B-1")))
        conn.execute(store.batch_cards.insert().values(_row(store.batch_cards, batch_id="B-1", card_ref="C-1")))
    yield engine
    engine.dispose()


def test_a_revision_recreating_a_parent_table_runs_on_a_database_with_rows(
        sqlite_with_rows: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = sqlite_with_rows
    _throwaway(tmp_path, monkeypatch, """
        with op.batch_alter_table("batches", recreate="always") as batch:
            batch.add_column(sa.Column("note", sa.String(16), nullable=True))
    """)
    assert store.upgrade(engine) == (HEAD, "0003_throwaway")
    assert "note" in _columns(engine, "batches")
    with engine.connect() as conn:
        assert conn.execute(sa.select(store.batch_cards.c.card_ref)).scalars().all() == ["C-1"]
        # The connection goes back to the pool with foreign keys on, as make_engine makes it.
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_a_revision_leaving_a_dangling_foreign_key_is_refused(
        sqlite_with_rows: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = sqlite_with_rows
    before = database_rows(engine)
    _throwaway(tmp_path, monkeypatch, """
        op.execute("DELETE FROM batches")
    """)
    with pytest.raises(ConfigError, match=r"would leave rows of batch_cards whose foreign key points nowhere"):
        store.upgrade(engine)
    assert database_rows(engine) == before
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


# -- PostgreSQL: search_path, privileges, table locks ----------------------------------------------------------------

@postgres
def test_several_schemas_in_search_path_change_only_the_first() -> None:
    """Schema A at 0001, schema B empty, search_path B,A: upgrading B creates B's tables and leaves A as it was
    (an unqualified alembic_version would be A's)."""
    assert POSTGRES
    with postgres_schema() as a_url, postgres_schema() as b_url:
        a = store.make_engine(a_url)
        store.upgrade(a)
        _downgrade(a, "0001_baseline")
        names = []
        for made in (a_url, b_url):
            eng = store.make_engine(made)
            with eng.connect() as conn:
                names.append(store.schema_of(conn))
            eng.dispose()
        both = store.make_engine(with_search_path(POSTGRES, str(names[1]), str(names[0])))
        try:
            assert store.schema_status(both) == store.SchemaStatus(None, HEAD, "empty")
            assert store.upgrade(both) == (None, HEAD)
            assert store.schema_status(both) == store.SchemaStatus(HEAD, HEAD, "current")
            assert store.schema_status(a) == store.SchemaStatus("0001_baseline", HEAD, "older")
            assert "replica" not in _columns(a, "audit_checkpoints")
            b = store.make_engine(b_url)
            assert store.schema_status(b) == store.SchemaStatus(HEAD, HEAD, "current")
            b.dispose()
        finally:
            both.dispose()
            a.dispose()


@postgres
def test_a_search_path_naming_no_schema_that_exists_is_one_line(tmp_path: Path) -> None:
    assert POSTGRES
    url = with_search_path(POSTGRES, "no_such_schema_i13")
    engine = store.make_engine(url)
    try:
        for attempt in (store.schema_status, store.upgrade, store.require_current):
            with pytest.raises(ConfigError, match="the schema named by search_path does not exist"):
                attempt(engine)
    finally:
        engine.dispose()
    done = kms("db", "upgrade", "--config", _config(tmp_path, url))
    assert done.returncode == 3, done
    assert done.stderr.count("\n") == 1 and "the schema named by search_path does not exist" in done.stderr


@postgres
def test_a_role_without_the_right_gets_one_line(pg_engine: tuple[sa.Engine, str]) -> None:
    engine, schema = pg_engine
    with engine.begin() as conn:
        conn.execute(sa.text(f'REVOKE CREATE ON SCHEMA "{schema}" FROM CURRENT_USER'))
    for attempt in (store.upgrade, lambda e: store.require_current(e, create=True)):
        with pytest.raises(ConfigError, match=r"the database role may not do this \(permission denied for schema"):
            attempt(engine)
    with engine.begin() as conn:
        conn.execute(sa.text(f'GRANT CREATE ON SCHEMA "{schema}" TO CURRENT_USER'))
    store.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text(f'REVOKE SELECT ON "{schema}".alembic_version FROM CURRENT_USER'))
    for attempt in (store.schema_status, store.require_head):
        with pytest.raises(ConfigError, match=r"may not do this \(permission denied for table alembic_version\).*"
                                              r"runtime roles need SELECT on alembic_version"):
            attempt(engine)


@postgres
def test_an_upgrade_waiting_for_a_running_kms_gives_up_naming_what_to_stop(
        pg_engine: tuple[sa.Engine, str], monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _ = pg_engine
    store.upgrade(engine)
    _downgrade(engine, "0001_baseline")
    monkeypatch.setattr(store, "LOCK_TIMEOUT", "200ms")
    with engine.connect() as running:  # a kms reading audit_checkpoints in an open transaction
        running.execute(sa.text("LOCK TABLE audit_checkpoints IN ACCESS SHARE MODE"))
        with pytest.raises(Unavailable) as waited:
            store.upgrade(engine)
        running.rollback()
    assert waited.value.retryable
    assert str(waited.value).endswith("the schema upgrade waited over 200ms for a table a running kms holds: stop "
                                      "every kms serve and kms worker on this database, then run `kms db upgrade` "
                                      "again")
    assert store.schema_status(engine).state == "older"
    assert store.upgrade(engine) == ("0001_baseline", HEAD)


# -- kms db current ---------------------------------------------------------------------------------------------------

def test_db_current_on_a_mistyped_sqlite_path_makes_no_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir-typo.db"
    with pytest.raises(ConfigError, match=f"{missing}: no such database file"):
        store.make_engine(f"sqlite:///{missing}", create=False)
    done = kms("db", "current", "--config", _config(tmp_path, f"sqlite:///{missing}"))
    assert done.returncode == 3 and done.stderr.strip().endswith(f"{missing}: no such database file"), done
    assert not missing.exists()
