"""`make demo`: kms end to end on embedded defaults (SoftHSM2 + SQLite), over gRPC with mutual TLS.

1. a development home: one SoftHSM2 token per domain and per bureau station, keys generated in the tokens, the
   bureaus' transport keys handed over wrapped under each station's RSA key, a development CA with certificates
   for officers, stations and an auditor, and the genesis ceremony enrolling three officers per domain;
2. `kms serve` started (a process of its own, with one HSM worker process per domain);
3. a key ceremony of the bank domain: a new version of the issuer master key IMK-AC is imported from two
   custodians' components (each sent encrypted to the domain's custody key, each KCV checked, the joined KCV
   checked before the key becomes active), proposed by one officer and approved by two others;
4. an HRSS officer creates a batch of dual-application cards for the outsourced bureau (bureau-b), and each domain
   authorizes it in an authorize-batch ceremony (proposer + one approver per domain);
5. that bureau's station fetches the batch over mutual TLS, verifies every bundle and unwraps every key into its own
   token, recomputing every KCV; a card's UDK-AC is checked against the imported key; a tampered and a replayed
   bundle are refused;
6. the import ceremony's minutes are exported and verified offline;
7. the auditor exports the audit log and verifies it offline with the audit public key (every issued card has its
   record); the server is stopped, and a summary printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from kms import config, store
from kms.audit.verify import verify
from kms.cards import reference
from kms.ceremony import components
from kms.ceremony.officers import ApprovalKeyFile
from kms.ceremony.rules import verify_minutes
from kms.cli.common import read_cards, write_random_cards
from kms.client.audit import AuditClient
from kms.client.ceremony import CeremonyClient
from kms.client.service import Client
from kms.clock import SystemClock
from kms.dev.ceremonies import authorize_batch
from kms.dev.home import HOME_FORMAT, Home, home_format, init_home
from kms.errors import BundleRejected
from kms.files import open_private, restrict_umask
from kms.hsm.types import Algorithm, wipe
from kms.identity import Principal
from kms.runtime import open_station
from kms.station import Station, TrustStore

BUREAU, STATION = "bureau-b", "station-b1"
OFFICER = Principal("officer", "alice", domain="hrss")
AUDITOR = Principal("auditor", "erin")
HRSS = [Principal("officer", n, domain="hrss") for n in ("alice", "bob", "chen")]
BANK = [Principal("officer", n, domain="bank") for n in ("carol", "dave", "frank")]
IMPORTED = "bank-imk-ac"


def ceremonies(home: Home, address: str, who: Principal) -> tuple[Client, CeremonyClient]:
    client = Client(config.load_client(home.client_config(who)), server=address)
    return client, CeremonyClient(client)


def approve(home: Home, address: str, ceremony_id: str, approvers: list[Principal]) -> None:
    for who in approvers:
        client, cer = ceremonies(home, address, who)
        with client:
            cer.approve(ceremony_id, ApprovalKeyFile(home.approval_key(who)))


def import_master_key(home: Home, address: str) -> tuple[str, str, bytes]:
    """The bank's custodians dave and frank each hold one component; carol proposes, dave and frank approve and
    send their components, carol executes. Returns (ceremony id, result, the joined value for the final check —
    a demo-only shortcut: no real custodian ever holds both components)."""
    proposer, custodians = BANK[0], BANK[1:]
    parts = [bytearray(os.urandom(16)) for _ in custodians]
    joined = components.join(parts)
    expected = components.kcv(Algorithm.DES2, joined)
    client, cer = ceremonies(home, address, proposer)
    with client:
        ceremony = cer.propose("import-master-key", {"name": IMPORTED, "kcv": expected,
                                                     "custodians": [c.name for c in custodians]})
    approve(home, address, ceremony.ceremony_id, custodians)
    for who, part in zip(custodians, parts, strict=True):
        client, cer = ceremonies(home, address, who)
        with client:
            cer.submit_component(ceremony.ceremony_id, part, components.kcv(Algorithm.DES2, part))
        wipe(part)
    client, cer = ceremonies(home, address, proposer)
    with client:
        done = cer.execute(ceremony.ceremony_id)
    value = bytes(joined)
    wipe(joined)
    return done.ceremony_id, done.result_json, value


SERVER_LOG = "kms-serve.log"  # in the home: the server's own log (stderr), kept apart from the demo's steps


def start_server(config_path: Path, log_path: Path) -> tuple[subprocess.Popen[str], int]:
    with open_private(log_path, "w", encoding="utf-8") as log_file:  # 0600; the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "kms.cli", "serve", "--config", str(config_path), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=log_file, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("kms: serving on port "):
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}; its log: {log_path}")
    return proc, int(line.rsplit(" ", 1)[1])


def server_problems(log_path: Path) -> list[str]:
    """The lines of the server's log at WARNING or above, and tracebacks: a clean demo has none."""
    return [line for line in log_path.read_text(encoding="utf-8").splitlines()
            if " WARNING " in line or " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]


def main() -> int:
    restrict_umask()  # the home, bundles, minutes and exports written here are the user's alone (kms.files)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("demo-home"))
    parser.add_argument("--cards", type=int, default=1000)
    args = parser.parse_args()

    t0 = time.perf_counter()
    if (args.home / "kms.yaml").exists() and home_format(args.home) < HOME_FORMAT:
        print(f"{args.home} was made by an older kms; rebuilding it", file=sys.stderr)
        shutil.rmtree(args.home)
    home = init_home(args.home)
    print(f"[1/8] development home ready in {time.perf_counter() - t0:.1f} s: {home.path} "
          "(genesis: 3 officers per domain)")

    server_log = home.path / SERVER_LOG
    server, port = start_server(home.config, server_log)
    address = f"localhost:{port}"
    print(f"[2/8] kms serve listening on 127.0.0.1:{port} (mutual TLS; HSM workers: one process per domain; "
          f"its log: {server_log})")
    try:
        batch = "demo-" + dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        cards_file = home.path / f"{batch}.csv"
        write_random_cards(cards_file, args.cards)
        imported_id, imported_result, imk = import_master_key(home, address)
        print(f"[3/8] ceremony {imported_id}: {BANK[0]} proposed, {BANK[1]} and {BANK[2]} approved and each sent "
              f"one component of {IMPORTED}; executed: {imported_result}")
        cards = read_cards(cards_file)
        with Client(config.load_client(home.client_config(OFFICER)), server=address) as officer:
            officer.create_batch(batch, BUREAU, "dual-app-v1", cards)
            authorized = [c.ceremony_id for c in authorize_batch(home, port, batch)]
            status = officer.batch_status(batch)
        print(f"[4/8] {OFFICER} created batch {batch}: {status.cards} cards for {BUREAU}; authorized by "
              f"ceremonies {', '.join(authorized)}; {status.state}")

        station_cfg = config.load_station(home.station_config(STATION))
        assert station_cfg.client is not None
        ledger = store.make_engine(station_cfg.ledger)
        store.create_station_ledger(ledger)
        out = home.path / "bundles" / batch
        out.mkdir(parents=True)
        fetched = opened = total_keys = matched = 0
        first_udk_ac = ""
        t1 = time.perf_counter()
        with open_station(station_cfg) as session, Client(station_cfg.client, server=address) as client:
            station = Station(station_cfg.name, station_cfg.bureau, station_cfg.domains, session,
                              TrustStore.load(station_cfg.trust), ledger, SystemClock())
            for bundle in client.stream_batch(batch, per_message=32):
                (out / f"{bundle.card_ref}.kmsb").write_bytes(bundle.data)
                fetched += 1
                report = station.open(bundle.data)
                opened += 1
                total_keys += len(report.keys)
                matched += sum(k.match for k in report.keys)
                if not first_udk_ac:
                    first_udk_ac = next(k.kcv_computed for k in report.keys if k.name == "udk-ac")
            seconds = time.perf_counter() - t1
            issued = client.batch_status(batch).issued
            files = sorted(out.glob("*.kmsb"))
            tampered = bytearray(files[0].read_bytes())
            tampered[len(tampered) // 2] ^= 0x01
            refusals = []
            for name, data in (("tampered", bytes(tampered)), ("replayed", files[1].read_bytes())):
                try:
                    station.open(data)
                    refusals.append(f"{name}: ACCEPTED (unexpected)")
                except BundleRejected as error:
                    refusals.append(f"{name}: {error}")
        expected_udk = reference.kcv_tdes(reference.option_a(imk, cards[0].pan or "", cards[0].psn or "")).hex()
        uses_import = first_udk_ac.upper() == expected_udk.upper()
        print(f"[5/8] {STATION} of {BUREAU} fetched {fetched} bundles over mTLS and opened them into its token: "
              f"{total_keys} keys, {matched} KCV matches, {fetched / seconds:.0f} cards/s; "
              f"refusals: {'; '.join(refusals)}; card 1's UDK-AC comes from the imported IMK: {uses_import}")

        minutes_file = home.path / f"minutes-{imported_id}.json"
        client, cer = ceremonies(home, address, BANK[1])
        with client:
            minutes = cer.minutes(imported_id)
        minutes_file.write_bytes(minutes.document)
        public = serialization.load_pem_public_key((home.path / "trust" / "bank-issuance-v1.pem").read_bytes())
        checked = verify_minutes(minutes.document, minutes.signature, public)  # type: ignore[arg-type]
        print(f"[6/8] minutes of {imported_id} signed by {minutes.signing_key}, verified offline: "
              f"{checked['state']}, approvals by {', '.join(a['officer'] for a in checked['approvals'])}")

        export_file = home.path / f"audit-{batch}.jsonl"
        with Client(config.load_client(home.client_config(AUDITOR)), server=address) as auditor, \
                export_file.open("w", encoding="utf-8") as out:
            for chunk in AuditClient(auditor).export():
                out.writelines(line + "\n" for line in chunk)
        audit_key = serialization.load_pem_public_key((home.path / "audit" / "audit-v1.pem").read_bytes())
        with export_file.open(encoding="utf-8") as lines:
            verdict = verify(lines, audit_key)  # type: ignore[arg-type]
        issued_records = sum(1 for line in export_file.open(encoding="utf-8")
                             if '"kind":"issuance.issued"' in line and f'"subject":"{batch}/' in line)
        print(f"[7/8] auditor {AUDITOR.name} exported the audit log ({export_file.name}) and verified it offline with "
              f"the audit public key: {verdict.summary()}; {issued_records} issuance records for the batch")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    problems = server_problems(server_log)
    print(f"[8/8] server stopped (exit {code}); its log holds {len(problems)} warnings or errors")
    for line in problems[:5]:
        print(f"      {line}")

    keys_per_card = 15
    ok = (fetched == opened == issued == args.cards and matched == total_keys == args.cards * keys_per_card
          and all("ACCEPTED" not in r for r in refusals) and code == 0 and uses_import and verdict.ok
          and issued_records == args.cards and not problems)
    print()
    print("summary")
    print(f"  cards            {args.cards} dual-application (HRSS + PBOC debit), batch {batch} for {BUREAU}")
    print(f"  bundles          {fetched} fetched over gRPC + mTLS, {opened} opened at {STATION}")
    print(f"  keys             {total_keys} unwrapped into the station's token, {matched} KCV matches")
    print(f"  audit            {verdict.records} records, {verdict.checkpoints} signed checkpoints, verified offline"
          f" ({'OK' if verdict.ok else 'FAILED'}); {issued_records} issuance records = {fetched} bundles")
    version = json.loads(imported_result)["version"]
    print(f"  ceremonies       import of {IMPORTED} v{version} from 2 components ({imported_id}); batch authorized by "
          f"both domains ({', '.join(authorized)})")
    print(f"  throughput       {fetched / seconds:.0f} cards/s, {total_keys / seconds:.0f} keys/s "
          "(issue, record, fetch, verify, unwrap)")
    print(f"  total time       {time.perf_counter() - t0:.1f} s")
    print(f"  result           {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
