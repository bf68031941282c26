"""`make demo`: the card key engine end to end on embedded defaults (SoftHSM2 + SQLite).

1. a development home (one SoftHSM2 token per domain and one for bureau-a's station; keys generated in the tokens;
   the bureau's transport keys handed over wrapped under the station's RSA key),
2. a batch of dual-application cards sealed by each domain's own worker process into signed bundles,
3. every bundle verified at the station and unwrapped into the station's token, every KCV recomputed,
4. a tampered bundle and a replayed bundle refused,
and a summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

from kms import config, store
from kms.cli import read_cards, write_random_cards
from kms.clock import SystemClock
from kms.devhome import init_home
from kms.errors import BundleRejected
from kms.issuer import Issuer
from kms.runtime import open_station
from kms.station import Station, TrustStore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("demo-home"))
    parser.add_argument("--cards", type=int, default=1000)
    parser.add_argument("--bureau", default="bureau-a")
    args = parser.parse_args()

    t0 = time.perf_counter()
    home = init_home(args.home)
    print(f"[1/4] development home ready in {time.perf_counter() - t0:.1f} s: {home.path}")

    batch = "demo-" + dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    cards_file = home.path / f"{batch}.csv"
    write_random_cards(cards_file, args.cards)
    cards = read_cards(cards_file)
    out = home.path / "bundles" / batch
    out.mkdir(parents=True)
    with Issuer(home.config, args.bureau, "dual-app-v1") as issuer:
        keys_per_card = issuer.keys_per_card
        started = time.perf_counter()
        sealed = 0
        for issued in issuer.issue(cards, batch):
            if issued.data is None:
                print(f"      card {issued.card_ref} refused: {issued.error}", file=sys.stderr)
                continue
            (out / f"{issued.card_ref}.kmsb").write_bytes(issued.data)
            sealed += 1
        seal_seconds = time.perf_counter() - started
    print(f"[2/4] sealed {sealed} bundles ({sealed * keys_per_card} keys) for {args.bureau}, batch {batch}: "
          f"{sealed / seal_seconds:.0f} cards/s, {sealed * keys_per_card / seal_seconds:.0f} keys/s "
          "(including worker start-up)")

    station_cfg = config.load_station(home.station_config("station-a1"))
    ledger = store.make_engine(station_cfg.ledger)
    store.create_station_ledger(ledger)
    files = sorted(out.glob("*.kmsb"))
    opened = matched = total_keys = 0
    t2 = time.perf_counter()
    with open_station(station_cfg) as session:
        station = Station(station_cfg.name, station_cfg.bureau, station_cfg.domains, session,
                          TrustStore.load(station_cfg.trust), ledger, SystemClock())
        for path in files:
            report = station.open(path.read_bytes())
            opened += 1
            total_keys += len(report.keys)
            matched += sum(k.match for k in report.keys)
        open_seconds = time.perf_counter() - t2
        print(f"[3/4] station {station_cfg.name} opened {opened} bundles: {total_keys} keys unwrapped into token "
              f"{station_cfg.token!r}, {matched} KCVs match ({opened / open_seconds:.0f} bundles/s)")

        tampered = bytearray(files[0].read_bytes())
        tampered[len(tampered) // 2] ^= 0x01
        refusals = []
        for name, data in (("tampered", bytes(tampered)), ("replayed", files[1].read_bytes())):
            try:
                station.open(data)
                refusals.append(f"{name}: ACCEPTED (unexpected)")
            except BundleRejected as error:
                refusals.append(f"{name}: {error}")
        print(f"[4/4] refusals: {'; '.join(refusals)}")

    ok = sealed == opened == args.cards and matched == total_keys == args.cards * keys_per_card
    ok = ok and all("ACCEPTED" not in r for r in refusals)
    print()
    print("summary")
    print(f"  cards            {args.cards} dual-application (HRSS + PBOC debit)")
    print(f"  bundles          {sealed} sealed, {opened} opened at the station")
    print(f"  keys             {total_keys} unwrapped ({keys_per_card} per card), {matched} KCV matches")
    print(f"  sealing          {sealed / seal_seconds:.0f} cards/s, {sealed * keys_per_card / seal_seconds:.0f} keys/s")
    print(f"  total time       {time.perf_counter() - t0:.1f} s")
    print(f"  result           {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
