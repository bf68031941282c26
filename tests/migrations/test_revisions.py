"""The schema's revisions (kms/migrations) and the store's view of them (kms.store.schema_status, upgrade,
require_current), on SQLite and on PostgreSQL: the head revision is exactly ``kms.store.metadata`` (so nobody
changes the tables without a revision), the baseline is exactly what the kms before migrations made (its own
``create_all``, run from tests/fixtures/kms-5a25ab4.tar.xz), each state is told apart and refused as it should be,
and replicas upgrading at once wait for each other."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from helpers import database_rows, old_kms, unpack_kms_before_migrations

from kms import store
from kms.errors import ConfigError

HEAD = "0002_checkpoint_replica"


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack_kms_before_migrations(tmp_path_factory.mktemp("kms-5a25ab4"))


def _differences(engine: sa.Engine, target: sa.MetaData) -> list[str]:
    with engine.connect() as conn:
        return store.schema_differences(conn, target)


def _alembic(engine: sa.Engine, do: str, revision: str) -> None:
    """Alembic's own command (``upgrade``, ``downgrade`` or ``stamp``) on kms's revisions, in one transaction."""
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(store.MIGRATIONS))
        cfg.attributes["connection"] = conn
        getattr(command, do)(cfg, revision)


def test_the_head_revision_is_exactly_the_tables_of_kms_store(engine: sa.Engine) -> None:
    """Change a table in kms/store.py without a revision (or the reverse) and this fails, naming the difference."""
    assert store.schema_status(engine) == store.SchemaStatus(None, HEAD, "empty")
    assert store.upgrade(engine) == (None, HEAD)
    assert store.schema_status(engine) == store.SchemaStatus(HEAD, HEAD, "current")
    assert _differences(engine, store.metadata) == []
    # The comparison does see a difference (so the assertion above can fail): one column less than kms's tables.
    changed = sa.MetaData()
    for table in store.metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["audit_checkpoints"].append_column(sa.Column("extra", sa.Integer, nullable=True))
    assert _differences(engine, changed) == ["lacks audit_checkpoints.extra"]


def test_the_baseline_is_exactly_the_schema_the_kms_before_migrations_made(engine: sa.Engine, url: str,
                                                                          old_tree: Path) -> None:
    create = "import sys; from kms import store; store.create_all(store.make_engine(sys.argv[1]))"
    made = old_kms(old_tree, "-c", create, url)
    assert made.returncode == 0, made.stderr
    assert store.schema_status(engine) == store.SchemaStatus(None, HEAD, "unversioned")
    assert _differences(engine, store._baseline()) == []
    assert _differences(engine, store.metadata) == ["lacks audit_checkpoints.replica"]
    assert store.upgrade(engine) == (None, HEAD)
    assert _differences(engine, store.metadata) == []
    columns = {c["name"]: c for c in sa.inspect(engine).get_columns("audit_checkpoints")}
    assert columns["replica"]["nullable"] and columns["replica"]["type"].length == 64


def test_every_revision_goes_down_and_up_again(engine: sa.Engine) -> None:
    store.upgrade(engine)
    _alembic(engine, "downgrade", "0001_baseline")
    assert store.schema_status(engine) == store.SchemaStatus("0001_baseline", HEAD, "older")
    assert _differences(engine, store._baseline()) == []
    _alembic(engine, "downgrade", "base")
    assert sa.inspect(engine).get_table_names() == ["alembic_version"]
    assert store.schema_status(engine).state == "empty"
    assert store.upgrade(engine) == (None, HEAD)
    assert _differences(engine, store.metadata) == []


def test_each_state_is_refused_with_one_line_naming_what_to_do(engine: sa.Engine) -> None:
    shown = engine.url.render_as_string(hide_password=True)
    # Empty: refused where nothing may create it, created at head where it may (kms serve, kms worker, kms init).
    with pytest.raises(ConfigError) as empty:
        store.require_current(engine, config="/etc/kms/kms.yaml")
    assert str(empty.value) == (f"{shown}: the database schema is empty (no kms tables), this kms needs {HEAD}: run "
                                "`kms db upgrade --config /etc/kms/kms.yaml`")
    assert sa.inspect(engine).get_table_names() == []
    assert store.require_current(engine, create=True).state == "empty"
    assert store.require_current(engine) == store.SchemaStatus(HEAD, HEAD, "current")

    # Older: an earlier revision of this kms.
    _alembic(engine, "downgrade", "0001_baseline")
    with pytest.raises(ConfigError) as older:
        store.require_current(engine, create=True, config="home/kms.yaml")
    assert str(older.value) == (f"{shown}: the database schema is at revision 0001_baseline, this kms needs {HEAD}: "
                                "run `kms db upgrade --config home/kms.yaml`")
    assert store.upgrade(engine) == ("0001_baseline", HEAD)
    assert store.upgrade(engine) == (HEAD, HEAD)  # nothing to do

    # Newer: a revision a later kms wrote. Refused by every function, and left as it is.
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0007_from_a_later_kms'"))
    before = database_rows(engine)
    assert store.schema_status(engine) == store.SchemaStatus("0007_from_a_later_kms", HEAD, "newer")
    message = (f"{shown}: the database schema (revision 0007_from_a_later_kms) is newer than this kms ({HEAD}); "
               "upgrade kms")
    for attempt in (lambda: store.require_current(engine, create=True), lambda: store.upgrade(engine)):
        with pytest.raises(ConfigError) as newer:
            attempt()
        assert str(newer.value) == message
    assert database_rows(engine) == before
    for error in (empty, older, newer):
        assert "\n" not in str(error.value)

    # Unversioned: tables, no revision (a kms before migrations).
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE alembic_version"))
    with pytest.raises(ConfigError, match=r": the database schema is from a kms before schema migrations \(no revision "
                                          r"recorded\), this kms needs 0002_checkpoint_replica: run `kms db upgrade"):
        store.require_current(engine, create=True)


def test_an_unversioned_database_gets_what_its_kms_would_have_added_and_nothing_else(engine: sa.Engine) -> None:
    """A kms before migrations added missing tables and indexes at its start (a home made by an even older one); the
    baseline check does the same before the stamp. Any other difference refuses the database, changing nothing."""
    baseline = store._baseline()
    with engine.begin() as conn:
        baseline.create_all(conn)
        conn.execute(sa.text("DROP TABLE limits"))
        conn.execute(sa.text("DROP INDEX ix_card_events_issued"))
    assert _differences(engine, baseline) == ["lacks table limits", "lacks index ix_card_events_issued on card_events"]
    assert store.upgrade(engine) == (None, HEAD)
    assert _differences(engine, store.metadata) == []

    with engine.begin() as conn:  # back to unversioned, then a schema no kms made
        conn.execute(sa.text("DROP TABLE alembic_version"))
        conn.execute(sa.text("ALTER TABLE audit_checkpoints DROP COLUMN replica"))
        conn.execute(sa.text("ALTER TABLE batch_cards ADD COLUMN pan VARCHAR(19)"))
        conn.execute(sa.text("DROP TABLE consents"))
    before = database_rows(engine)
    with pytest.raises(ConfigError) as refused:
        store.upgrade(engine)
    assert str(refused.value) == (
        f"{engine.url.render_as_string(hide_password=True)}: this database was made by an older kms and its schema is "
        "not the one schema migrations start from (has batch_cards.pan, which kms does not make); it is not upgraded "
        "in place: create a new one")
    assert database_rows(engine) == before  # consents not added: nothing at all


def test_replicas_upgrading_one_database_at_once_wait_for_each_other(url: str) -> None:
    """Three processes' engines upgrade an empty database at the same moment: one creates the schema, the others
    then find it current (PostgreSQL: the advisory lock; SQLite: the write lock BEGIN IMMEDIATE takes)."""
    engines = [store.make_engine(url) for _ in range(3)]
    start = threading.Barrier(len(engines))
    results: list[object] = []

    def run(engine: sa.Engine) -> None:
        start.wait()
        try:
            results.append(store.upgrade(engine))
        except Exception as error:  # the assertion below shows it
            results.append(error)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert sorted(results, key=repr) == [(HEAD, HEAD), (HEAD, HEAD), (None, HEAD)], results
        assert _differences(engines[0], store.metadata) == []
    finally:
        for e in engines:
            e.dispose()
