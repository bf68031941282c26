"""A home made and used by the kms before schema migrations, upgraded in place and served by this kms.

The old kms is commit 5a25ab4's `kms` package (tests/fixtures/kms-5a25ab4.tar.xz), unpacked and run with this venv's
python and libraries: it makes a development home (tokens, keys, officers, genesis) with its records on SQLite or in
a PostgreSQL schema, serves it with its own `kms serve`, and through that server an officer creates a batch, both
domains authorize it in ceremonies, the station issues its cards, a card is reported lost, a second batch gets an
authorization ceremony proposed and approved but not executed, and the auditor exports the log (audit records and
signed checkpoints). Then this kms: `kms serve` refuses the database with one line naming `kms db upgrade` and
changes nothing; `kms db current` says unversioned; `kms db upgrade` upgrades it; `kms serve` serves it: the cards,
the batch states and every ceremony are what the old kms left, the stored bundles come back byte for byte, the open
ceremony is executed, the second batch issued, and the audit chain the old kms wrote continues in an export that
verifies offline."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from helpers import (
    POSTGRES,
    ROOT,
    client,
    database_rows,
    kms,
    officer,
    old_kms,
    postgres_schema,
    run_ceremony,
    unpack_kms_before_migrations,
)

from kms import config, store
from kms.cli.main import main
from kms.client.ceremony import CeremonyClient
from kms.client.service import Client
from kms.dev.home import Home

HEAD = "0002_checkpoint_replica"
START_TIMEOUT = 120  # seconds for `kms serve` to say its port (a limit, not a speed target)
STATION = "station-b1"

#: Run by the old kms: its development home (one bureau, one station, to keep it short), its records in the
#: database given (PostgreSQL: the kms.yaml written first, as its own tests did; init completes the home). Each
#: set-up step runs in this process rather than in one of its own (half the time; the steps are the same).
OLD_INIT = """
import os, sys, yaml
from pathlib import Path
import kms.dev.home
from kms.dev.home import FORMAT_FILE, HOME_FORMAT, init_home
from kms.dev.pki import DevPki
from kms.files import private_dir, write_private
from kms.hsm.labels import AUDIT_TOKEN, domain_token
from kms.registry import DOMAINS

path, database = Path(sys.argv[1]), sys.argv[2]
if database != "sqlite":
    private_dir(path)
    pki = DevPki(path / "pki")
    server = pki.server()
    relative = lambda p: os.path.relpath(p, path)
    write_private(path / FORMAT_FILE, f"{HOME_FORMAT}\\n")
    write_private(path / "kms.yaml", yaml.safe_dump({
        "hsm": {"module": "auto", "softhsm2_conf": "hsm/softhsm2.conf"},
        "domains": {d: {"token": domain_token(d), "pin": f"file:pins/{d}.pin"} for d in DOMAINS},
        "database": database, "profiles": "profiles", "workers_per_domain": 1,
        "server": {"listen": "127.0.0.1:0", "tls": {"cert": relative(server.cert), "key": relative(server.key),
                                                   "ca": relative(pki.ca.cert), "crl": relative(pki.crl)}},
        "audit": {"token": AUDIT_TOKEN, "pin": "file:pins/audit.pin"},
    }, sort_keys=False))
kms.dev.home._in_own_process = lambda function, *args: function(*args)
init_home(path, bureaus={"bureau-b": ("station-b1",)})
"""

#: Run by the old kms against its own `kms serve`: what the new kms must find intact. Prints a JSON summary.
OLD_USE = """
import hashlib, json, sys
from pathlib import Path
from google.protobuf.json_format import MessageToDict
from kms import config
from kms.cli.common import read_cards, write_random_cards
from kms.client.audit import AuditClient
from kms.client.ceremony import CeremonyClient
from kms.client.service import Client
from kms.dev.ceremonies import authorize_batch, client, officer, run_ceremony
from kms.dev.home import AUDITORS, Home
from kms.identity import Principal

home, port = Home(Path(sys.argv[1])), int(sys.argv[2])
write_random_cards(home.path / "cards.csv", 8)
cards = read_cards(home.path / "cards.csv")
with client(home, port, officer("hrss", 0)) as hrss:
    hrss.create_batch("B-old", "bureau-b", "dual-app-v1", cards[:5])
    executed = [c.ceremony_id for c in authorize_batch(home, port, "B-old")]
    hrss.create_batch("B-next", "bureau-b", "dual-app-v1", cards[5:])
pending = run_ceremony(home, port, "hrss", "authorize-batch", {"batch_id": "B-next"}, approvers=(1,), execute=False)
station = config.load_station(home.station_config("station-b1"))
with Client(station.client, server=f"localhost:{port}") as s:
    bundles = {b.card_ref: hashlib.sha256(b.data).hexdigest() for b in s.stream_batch("B-old", per_message=2)}
lost = cards[0].card_ref
with client(home, port, officer("hrss", 0)) as hrss:
    hrss.report_lost(lost, "hrss", "reported lost at the counter")
    seen = {
        "batches": {b: MessageToDict(hrss.batch_status(b)) for b in ("B-old", "B-next")},
        "cards": {c.card_ref: MessageToDict(hrss.get_card(c.card_ref)) for c in cards[:5]},
        "ceremonies": {i: MessageToDict(CeremonyClient(hrss).get(i)) for i in [*executed[:1], pending.ceremony_id]},
    }
with Client(config.load_client(home.client_config(Principal("auditor", AUDITORS[0]))),
            server=f"localhost:{port}") as auditor:
    lines = [line for chunk in AuditClient(auditor).export() for line in chunk]
(home.path / "old-export.jsonl").write_text("".join(line + "\\n" for line in lines))
print(json.dumps({"executed": executed, "pending": pending.ceremony_id, "bundles": bundles, "lost": lost,
                  "seen": seen}))
"""


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack_kms_before_migrations(tmp_path_factory.mktemp("kms-5a25ab4"))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    """"sqlite" (the home's own kms.db), or the URL of a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    if not POSTGRES:
        pytest.skip("KMS_TEST_POSTGRES_URL is not set")
    with postgres_schema() as url:
        yield url


def _serve(python_path: Path | None, home: Path) -> tuple[subprocess.Popen[str], int]:
    """`kms serve` on a port of its own: the old kms's (``python_path``) or this one's."""
    env = None
    if python_path is not None:
        import os

        env = dict(os.environ, PYTHONPATH=str(python_path))
    server = subprocess.Popen([sys.executable, "-m", "kms.cli", "serve", "--config", str(home / "kms.yaml"),
                               "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, cwd=home, env=env)
    assert server.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(server.stdout.readline() if server.stdout else ""), daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT)  # a server that hangs before its first line fails the test
    except queue.Empty:
        line = f"nothing within {START_TIMEOUT} s"
    if not line.startswith("kms: serving on port "):
        server.kill()
        server.wait()
        pytest.fail(f"kms serve did not start: {line!r}")
    return server, int(line.rsplit(" ", 1)[1])


def _stop(server: subprocess.Popen[str]) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        code = server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()  # not left behind
        server.wait()
        pytest.fail("kms serve did not stop within 120 s of SIGTERM")
    assert code == 0


def _records(export: Path) -> tuple[list[str], list[tuple[Any, ...]]]:
    """An export's record lines as written, and its checkpoints as (size, head, signature)."""
    records, checkpoints = [], []
    for line in export.read_text().splitlines():
        doc = json.loads(line)
        if doc["type"] == "record":
            records.append(line)
        elif doc["type"] == "checkpoint":
            checkpoints.append((doc["size"], doc["head"], doc["signature"]))
    return records, checkpoints


def _db(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert main(["db", *args]) == 0
    return capsys.readouterr().out


def test_a_home_of_the_kms_before_migrations_is_refused_upgraded_and_served(
        old_tree: Path, database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "home"
    made = old_kms(old_tree, "-c", OLD_INIT, str(path), database, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    home = Home(path)
    old_server, port = _serve(old_tree, path)
    try:
        used = old_kms(old_tree, "-c", OLD_USE, str(path), str(port), cwd=tmp_path)
        assert used.returncode == 0, used.stderr
    finally:
        _stop(old_server)  # SIGTERM: its checkpointer signs a last checkpoint
    old = json.loads(used.stdout)
    assert len(old["bundles"]) == 5

    cfg = config.load(home.config)
    engine = store.make_engine(cfg.database)
    try:
        before = database_rows(engine)
        assert "alembic_version" not in before and before["audit_checkpoints"][2]

        # This kms's `kms serve`: one line naming `kms db upgrade`, exit 3, nothing changed.
        refused = subprocess.run([sys.executable, "-m", "kms.cli", "serve", "--config", str(home.config),
                                  "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert refused.returncode == 3 and refused.stdout == ""
        assert refused.stderr.splitlines() == [
            f"kms: error: {store.database_display(cfg.database)}: the database schema is from a kms before schema "
            f"migrations (no revision recorded), this kms needs {HEAD}: run `kms db upgrade --config {home.config}`"]
        assert database_rows(engine) == before

        # `kms db …` (in this process: the command line's main, without a python start each).
        assert _db(capsys, "current", "--config", str(home.config), "--json") == json.dumps(
            {"database": store.database_display(cfg.database), "head": HEAD, "revision": None,
             "state": "unversioned"}, indent=2) + "\n"
        assert _db(capsys, "upgrade", "--config", str(home.config)) == \
            f"upgraded from unversioned (0001_baseline) to {HEAD}\n"
        assert _db(capsys, "current", "--config", str(home.config)) == f"revision {HEAD}, head {HEAD}: current\n"
        assert _db(capsys, "upgrade", "--config", str(home.config)) == f"already at {HEAD}\n"
        after = database_rows(engine)
        assert after["audit_checkpoints"][0][-1] == "replica"
        # Every row the old kms wrote is still there, as it was (the checkpoints with replica NULL).
        for table, (_, _, rows) in before.items():
            assert after[table][2] == (rows if table != "audit_checkpoints" else [(*r, None) for r in rows]), table
        with engine.connect() as conn:
            assert store.schema_differences(conn, store.metadata) == []
    finally:
        engine.dispose()

    server, port = _serve(None, path)
    try:
        with client(home, port, officer("hrss", 0)) as hrss:
            seen = old["seen"]
            assert {b: MessageToDict(hrss.batch_status(b)) for b in seen["batches"]} == seen["batches"]
            assert {c: MessageToDict(hrss.get_card(c)) for c in seen["cards"]} == seen["cards"]
            ceremonies = CeremonyClient(hrss)
            assert {i: MessageToDict(ceremonies.get(i)) for i in seen["ceremonies"]} == seen["ceremonies"]
            assert seen["ceremonies"][old["pending"]]["state"] == "open"
            assert seen["cards"][old["lost"]]["applications"][0]["state"] == "lost"
            # The ceremony the old kms left open is executed by this one; the bank domain's is new.
            assert ceremonies.execute(old["pending"]).state == "executed"
        run_ceremony(home, port, "bank", "authorize-batch", {"batch_id": "B-next"}, approvers=(1,))
        station = config.load_station(home.station_config(STATION))
        assert station.client is not None
        with Client(station.client, server=f"localhost:{port}") as s:
            again = {b.card_ref: b.data for b in s.stream_batch("B-old")}
            fresh = {b.card_ref: b.data for b in s.stream_batch("B-next")}
            assert s.batch_status("B-next").issued == 3
        # The stored bundles, byte for byte (the lost card is not sent again).
        import hashlib

        assert {r: hashlib.sha256(d).hexdigest() for r, d in again.items()} == \
            {r: h for r, h in old["bundles"].items() if r != old["lost"]}
        assert len(fresh) == 3

        auditor = str(home.path / "clients" / "auditor-erin.yaml")
        export = tmp_path / "audit.jsonl"
        exported = json.loads(kms("audit", "export", "--client", auditor, "--server", f"localhost:{port}", "-o",
                                  str(export), "--json", check=True).stdout)
        kms("audit", "verify", str(export), "--public-key", str(home.path / "audit" / "audit-v1.pem"), "--nonce",
            exported["nonce"], check=True)
    finally:
        _stop(server)
    old_records, old_checkpoints = _records(home.path / "old-export.jsonl")
    records, checkpoints = _records(export)
    assert records[:len(old_records)] == old_records  # the old chain, as written, continued
    assert len(records) > len(old_records)
    assert set(old_checkpoints) < set(checkpoints)  # the old kms's signed checkpoints, and this one's
    assert sum('"kind":"issuance.issued"' in line for line in records) == 5 + 3
