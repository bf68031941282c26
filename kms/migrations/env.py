"""Alembic's environment for kms's records database.

``kms.store.upgrade`` runs the revisions on the connection it passes in ``config.attributes["connection"]``, inside
the transaction it holds (under its lock): nothing here begins or commits one then. Alembic's own command line
(developers only: alembic.ini beside this file) names the database with ``-x database=URL``."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from kms import store


def _run(connection: sa.Connection, schema: str | None) -> None:
    # The revision table is named with its schema (kms.store.schema_of): with several schemas in PostgreSQL's
    # search_path, an unqualified alembic_version could be another schema's.
    context.configure(connection=connection, target_metadata=store.metadata, compare_type=True,
                      version_table_schema=schema,
                      render_as_batch=True)  # SQLite alters a table by copying it: autogenerate writes batch ops
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    if context.is_offline_mode():
        raise SystemExit("kms's revisions run on a database connection only (no --sql)")
    given = context.config.attributes.get("connection")
    if given is not None:
        _run(given, context.config.attributes.get("version_table_schema"))
        return
    url = context.get_x_argument(as_dictionary=True).get("database")
    if not url:
        raise SystemExit("name the database: alembic -c kms/migrations/alembic.ini -x database=URL …")
    engine = store.make_engine(url)
    try:
        with engine.begin() as connection:
            _run(connection, store.schema_of(connection))
    finally:
        engine.dispose()


_main()
