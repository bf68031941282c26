"""`make cluster`: the cluster run — 3 `kms serve` replicas on the local PostgreSQL sharing the hrss, bank and audit
worker services, 4 stations streaming 4 batches at once plus 2 stations of one bureau on one batch, a replica
SIGKILLed mid-stream and restarted, a ceremony executed by two replicas racing, a domain worker service restarted;
then the invariants, printed (kms.dev.cluster). Exit 1 if any is broken, 2 if the run could not be set up.

Each run makes a PostgreSQL schema of its own in --database (default $KMS_TEST_POSTGRES_URL, else the local
kms_test database) and drops it at the end, and works in a run directory (default: a new one under .cluster/,
removed at the end unless --keep, or kept when the run failed, for its logs).

--small is the CI size (tests/test_cluster.py): the same topology and faults, fewer cards per batch.

--bench: the contention figures instead (issue 13, item 4) — issuance cards/s and audit appends/s with 1, 2 and 3
replicas on PostgreSQL side by side in one run, sharing the worker services; where the time goes (the audit head
row's lock wait, HSM time in the worker services, gRPC and the rest); the ratio of 3 replicas to 1 (goal >= 90 %).
Written to .bench/cluster.json and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kms.dev.cluster import Plan, Report, bench, bench_table, cluster_run
from kms.files import restrict_umask, write_private

DEFAULT_DATABASE = "postgresql+psycopg://kms:kms@127.0.0.1:5432/kms_test"
FULL_CARDS, SMALL_CARDS = 1000, 120
#: --small's time limit for the streams: with set-up and stopping, well below tests/test_cluster.py's TIMEOUT.
SMALL_SECONDS = 360.0


def terminated(signum: int, frame: object) -> None:
    """SIGTERM (a timeout, a CI job cancelled) takes the path Ctrl-C takes: the finally blocks stop every service
    and station the run started, kill what is left of their process groups and drop the run's schema. A second
    SIGTERM meanwhile is ignored, so that this clean-up is not cut short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("cluster: SIGTERM: stopping what the run started", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


@contextmanager
def schema(admin_url: str, prefix: str = "cluster") -> Iterator[str]:
    """A PostgreSQL schema of the run's own: the URL of the run's database (its search_path set to it); dropped
    at the end, whatever happened."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    print(f"cluster: schema {name} (dropped at the end)", flush=True)
    admin = sa.create_engine(admin_url)
    for attempt in (1, 2):
        try:
            with admin.begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
            break
        except sa.exc.OperationalError as error:
            if attempt == 1 and start_local_postgres(admin_url):
                continue
            admin.dispose()
            print(f"cluster: cannot reach PostgreSQL at {sa.engine.make_url(admin_url).render_as_string()}: "
                  f"{str(error.orig).strip().splitlines()[0]} (start it: pg_ctlcluster 15 main start)",
                  file=sys.stderr)
            raise SystemExit(2) from None
    joiner = "&" if "?" in admin_url else "?"
    try:
        yield f"{admin_url}{joiner}options=-csearch_path%3D{name}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        admin.dispose()


def start_local_postgres(url: str) -> bool:
    """The local PostgreSQL clusters that are down started (Debian's pg_ctlcluster), when the URL names this host;
    whether any was."""
    if sa.engine.make_url(url).host not in ("127.0.0.1", "localhost", "::1") or shutil.which("pg_lsclusters") is None:
        return False
    listed = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=False).stdout
    started = False
    for line in listed.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3] == "down":
            print(f"cluster: starting the local PostgreSQL (pg_ctlcluster {fields[0]} {fields[1]} start)", flush=True)
            started |= subprocess.run(["pg_ctlcluster", fields[0], fields[1], "start"], check=False).returncode == 0
    if started:
        time.sleep(2.0)
    return started


def run_dir(args: argparse.Namespace) -> Path:
    if args.run_dir is not None:
        if args.run_dir.exists() and any(args.run_dir.iterdir()):
            raise SystemExit(f"cluster: {args.run_dir} is not empty")
        args.run_dir.mkdir(parents=True, exist_ok=True)
        return args.run_dir.resolve()
    base = Path(".cluster")
    base.mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="run-", dir=base)).resolve()


def main() -> int:
    restrict_umask()
    signal.signal(signal.SIGTERM, terminated)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help=f"the CI size: {SMALL_CARDS} cards per batch")
    parser.add_argument("--cards", type=int, help=f"cards per batch (default {FULL_CARDS}, --small {SMALL_CARDS})")
    parser.add_argument("--database", default=os.environ.get("KMS_TEST_POSTGRES_URL") or DEFAULT_DATABASE,
                        help="a PostgreSQL URL the run may create a schema in (default: $KMS_TEST_POSTGRES_URL, "
                             f"else {DEFAULT_DATABASE})")
    parser.add_argument("--run-dir", type=Path, help="an empty directory for the run (default: a new one under "
                                                     ".cluster/)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (home, logs, bundles)")
    parser.add_argument("--sessions-file", type=Path,
                        help="append the session id of every service and station the run starts to this file, one "
                             "a line (tests/test_cluster.py: to look for and end what is left of the run)")
    parser.add_argument("--bench", action="store_true", help="the contention figures with 1, 2 and 3 replicas")
    parser.add_argument("--bench-cards", type=int, default=200,
                        help="cards per station, round and side: 3 stations at once (default 200)")
    parser.add_argument("--bench-rounds", type=int, default=3, help="bench rounds (default 3)")
    parser.add_argument("--append-records", type=int, default=1200,
                        help="audit records appended per round and side of the append figure (default 1200)")
    parser.add_argument("--summary", type=Path, default=Path(".bench/cluster.json"),
                        help="where --bench writes its figures (default .bench/cluster.json)")
    args = parser.parse_args()
    if not args.database.startswith("postgresql"):
        parser.error("--database must be a PostgreSQL URL (postgresql+psycopg://...)")
    cards = args.cards or (SMALL_CARDS if args.small else FULL_CARDS)
    if cards < 50:
        parser.error("--cards must be at least 50 (the faults happen mid-stream)")
    t0 = time.perf_counter()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ok = False
    directory: Path | None = None
    try:
        with schema(args.database) as url:
            directory = run_dir(args)
            if args.bench:
                print(f"cluster --bench: run in {directory}; {args.bench_rounds} rounds, {args.bench_cards} cards "
                      f"per station and side", flush=True)
                doc = bench(directory, url, rounds=args.bench_rounds, cards=args.bench_cards,
                            append_records=args.append_records, log=lambda line: print(f"cluster: {line}",
                                                                                       flush=True))
                doc.update(started_at=started_at, seconds=round(time.perf_counter() - t0, 1), cpus=os.cpu_count(),
                           load_average=[round(x, 2) for x in os.getloadavg()])
                args.summary.parent.mkdir(parents=True, exist_ok=True)
                write_private(args.summary, json.dumps(doc, indent=2) + "\n")
                print()
                print(bench_table(doc))
                print(f"figures in {args.summary}")
                ok = True
            else:
                print(f"cluster: run in {directory}; {cards} cards per batch"
                      f"{' (--small)' if args.small else ''}", flush=True)
                plan = Plan(cards=cards, seconds=SMALL_SECONDS) if args.small else Plan(cards=cards)
                report = cluster_run(directory, url, plan, Report(), session_log=args.sessions_file)
                print()
                print(report.text())
                ok = report.ok
    finally:
        keep = directory is not None and (args.keep or not ok)
        if directory is not None and not keep:
            shutil.rmtree(directory, ignore_errors=True)
        print(f"cluster: done in {time.perf_counter() - t0:.0f} s"
              + (f"; the run directory (home, logs, bundles) is kept: {directory}" if keep else ""), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
