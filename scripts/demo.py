"""`make demo`: kms end to end on embedded defaults (SoftHSM2 + SQLite), over gRPC with mutual TLS.

1. a development home: one SoftHSM2 token per domain and per bureau station, keys generated in the tokens, the
   bureaus' transport keys handed over wrapped under each station's RSA key, a development CA with certificates
   for officers, stations and an auditor;
2. `kms serve` started (a process of its own, with one HSM worker process per domain);
3. an HRSS officer authorizes a batch of dual-application cards for the outsourced bureau (bureau-b);
4. that bureau's station fetches the batch over mutual TLS, verifies every bundle and unwraps every key into its own
   token, recomputing every KCV; a tampered and a replayed bundle are refused;
5. the server is stopped, and a summary printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kms import config, store
from kms.cli import read_cards, write_random_cards
from kms.client import Client
from kms.clock import SystemClock
from kms.devhome import init_home
from kms.errors import BundleRejected
from kms.identity import Principal
from kms.runtime import open_station
from kms.station import Station, TrustStore

BUREAU, STATION = "bureau-b", "station-b1"
OFFICER = Principal("officer", "alice", domain="hrss")


def start_server(config_path: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kms.cli", "serve", "--config", str(config_path), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("kms: serving on port "):
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, int(line.rsplit(" ", 1)[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("demo-home"))
    parser.add_argument("--cards", type=int, default=1000)
    args = parser.parse_args()

    t0 = time.perf_counter()
    home = init_home(args.home)
    print(f"[1/5] development home ready in {time.perf_counter() - t0:.1f} s: {home.path}")

    server, port = start_server(home.config)
    address = f"localhost:{port}"
    print(f"[2/5] kms serve listening on 127.0.0.1:{port} (mutual TLS; HSM workers: one process per domain)")
    try:
        batch = "demo-" + dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        cards_file = home.path / f"{batch}.csv"
        write_random_cards(cards_file, args.cards)
        with Client(config.load_client(home.client_config(OFFICER)), server=address) as officer:
            status = officer.create_batch(batch, BUREAU, "dual-app-v1", read_cards(cards_file))
        print(f"[3/5] {OFFICER} authorized batch {batch}: {status.cards} cards for {BUREAU}")

        station_cfg = config.load_station(home.station_config(STATION))
        assert station_cfg.client is not None
        ledger = store.make_engine(station_cfg.ledger)
        store.create_station_ledger(ledger)
        out = home.path / "bundles" / batch
        out.mkdir(parents=True)
        fetched = opened = total_keys = matched = 0
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
        print(f"[4/5] {STATION} of {BUREAU} fetched {fetched} bundles over mTLS and opened them into its token: "
              f"{total_keys} keys, {matched} KCV matches, {fetched / seconds:.0f} cards/s; "
              f"refusals: {'; '.join(refusals)}")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    print(f"[5/5] server stopped (exit {code})")

    keys_per_card = 15
    ok = (fetched == opened == issued == args.cards and matched == total_keys == args.cards * keys_per_card
          and all("ACCEPTED" not in r for r in refusals) and code == 0)
    print()
    print("summary")
    print(f"  cards            {args.cards} dual-application (HRSS + PBOC debit), batch {batch} for {BUREAU}")
    print(f"  bundles          {fetched} fetched over gRPC + mTLS, {opened} opened at {STATION}")
    print(f"  keys             {total_keys} unwrapped into the station's token, {matched} KCV matches")
    print(f"  throughput       {fetched / seconds:.0f} cards/s, {total_keys / seconds:.0f} keys/s "
          "(issue, record, fetch, verify, unwrap)")
    print(f"  total time       {time.perf_counter() - t0:.1f} s")
    print(f"  result           {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
