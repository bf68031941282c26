"""`kms db …`: the records database's schema, against this kms's revisions (kms/migrations): where it stands, and
upgrading it in place."""

from __future__ import annotations

import argparse
from typing import Any

from kms import config as config_mod
from kms.cli.common import command, commands, emit, env_path, json_option


def add_parser(sub: Any) -> None:
    group = command(sub, "db", "the records database's schema (revisions, upgrade)", """
        The records database's schema against this kms's revisions (Alembic, shipped in kms/migrations). kms serve
        and kms worker refuse a database whose schema is at another revision with one line naming `kms db upgrade`;
        kms serve (and kms init) create an empty one themselves; kms worker never does. Upgrading:
        docs/operations.md, "Upgrading kms (schema migrations)".""",
                    "kms db current --config home/kms.yaml\nkms db upgrade --config home/kms.yaml")
    db = commands(group, "db_command")
    p = command(db, "current", "the schema's revision, this kms's, and whether it must be upgraded", """
        Print the revision the database's schema is at, the revision this kms needs (head) and the state: current;
        older (run kms db upgrade); newer (written by a later kms: upgrade kms); unversioned (made by a kms before
        schema migrations: run kms db upgrade); empty (no kms tables: kms serve creates them). Reads only; exit 0
        whatever the state.""",
                "kms db current --config home/kms.yaml\nkms db current --config home/kms.yaml --json | jq -r .state")
    env_path(p, "--config", "the issuer configuration (kms.yaml) naming the database")
    json_option(p, "revision, head, state and database")
    p.set_defaults(handler=_current)

    p = command(db, "upgrade", "upgrade the database's schema to this kms's revision, in place", """
        Upgrade the database's schema to this kms's revision (head), in one transaction (PostgreSQL: under an
        advisory lock, so replicas starting meanwhile wait): an empty database is created, a database made by a kms
        before schema migrations is first checked against their baseline (a schema that differs otherwise is refused,
        naming the differences). Stop every kms serve and kms worker on the database first and back it up
        (docs/operations.md). Prints "upgraded from X to Y" or "already at Y". A database at a revision this kms does
        not know (a later kms's) is refused (exit 3).""",
                "kms db upgrade --config home/kms.yaml\nkms db upgrade --config /etc/kms/kms.yaml --json")
    env_path(p, "--config", "the issuer configuration (kms.yaml) naming the database")
    json_option(p, "from, to, the state before and the database")
    p.set_defaults(handler=_upgrade)


def _current(args: argparse.Namespace) -> int:
    from kms import store

    database = config_mod.load(args.config).database
    engine = store.make_engine(database, create=False)  # reads only: a mistyped SQLite path is not made
    try:
        status = store.schema_status(engine)
    finally:
        engine.dispose()
    doc = {"revision": status.current, "head": status.head, "state": status.state,
           "database": store.database_display(database)}
    advice = {"current": "", "older": ": run kms db upgrade", "unversioned": ": run kms db upgrade",
              "newer": ": upgrade kms", "empty": ": kms serve or kms db upgrade creates it"}[status.state]
    emit(args, doc, f"revision {status.current or 'none'}, head {status.head}: {status.state}{advice}")
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    from kms import store

    database = config_mod.load(args.config).database
    engine = store.make_engine(database)
    try:
        before = store.schema_status(engine)
        start, head = store.upgrade(engine)
    finally:
        engine.dispose()
    if start == head:
        text = f"already at {head}"
    elif start is None and before.state == "empty":
        text = f"created the schema at {head}"
    else:
        text = f"upgraded from {start or 'unversioned (' + store.BASELINE + ')'} to {head}"
    emit(args, {"from": start, "to": head, "state_before": before.state, "database": store.database_display(database)},
         text)
    return 0
