"""`kms bundle …`: seal bundles from a card file without the service (issuer side), and open them at a station."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kms import config as config_mod
from kms import errors
from kms.cli.common import emit, read_cards
from kms.files import private_dir, write_private


def add_parser(sub: Any) -> None:
    bundle = sub.add_parser("bundle", help="sealed bundles").add_subparsers(dest="bundle_command", required=True)
    p = bundle.add_parser("seal", help="seal bundles for the cards in a CSV file (issuer side)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--bureau", required=True)
    p.add_argument("--batch", required=True)
    p.add_argument("--profile", default="dual-app-v1")
    p.add_argument("--cards", type=Path, required=True, help="CSV: card_ref,city_code,card_serial,pan,psn,kdd")
    p.add_argument("--out", type=Path, required=True, help="directory for the .kmsb files")
    p.add_argument("--workers", type=int, help="worker processes per domain (default: from the config)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_seal)
    p = bundle.add_parser("open", help="verify bundles and unwrap their keys into the station's token")
    p.add_argument("--station-config", type=Path, required=True)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--store", action="store_true", help="keep the keys as token objects in the station's token")
    mode.add_argument("--verify-only", action="store_true",
                      help="dry run: verify and check every KCV, but record nothing (the bundle can be opened later)")
    p.add_argument("--json", action="store_true")
    p.add_argument("bundles", type=Path, nargs="+", help="bundle files or directories of *.kmsb")
    p.set_defaults(handler=_open)


def _seal(args: argparse.Namespace) -> int:
    from kms.issuance.issuer import Issuer

    if not args.batch or len(args.batch) > 64:
        raise errors.InvalidArgument("--batch", "must be 1 to 64 characters")
    if args.workers is not None and not 1 <= args.workers <= 64:
        raise errors.InvalidArgument("--workers", "must be from 1 to 64")
    cards = read_cards(args.cards)
    private_dir(args.out)
    started = time.perf_counter()
    sealed = failed = 0
    with Issuer.from_config(args.config, args.bureau, args.profile, args.workers) as issuer:
        for issued in issuer.issue(cards, args.batch):
            if issued.data is None:
                failed += 1
                print(f"kms: card {issued.card_ref}: {issued.error}", file=sys.stderr)
                continue
            write_private(args.out / f"{issued.card_ref}.kmsb", issued.data)
            sealed += 1
        keys_per_card = issuer.keys_per_card
    elapsed = time.perf_counter() - started
    doc = {"cards": sealed, "failed": failed, "keys": sealed * keys_per_card, "seconds": round(elapsed, 3),
           "cards_per_second": round(sealed / elapsed, 1) if elapsed else None}
    emit(args, doc, f"sealed {sealed} bundles ({sealed * keys_per_card} keys) in {elapsed:.2f} s"
                    f" into {args.out}" + (f"; {failed} cards failed" if failed else ""))
    return 0 if failed == 0 else 1


def _bundle_files(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(path.glob("*.kmsb"))
        else:
            yield path


def _open(args: argparse.Namespace) -> int:
    from kms import runtime, store
    from kms.clock import SystemClock
    from kms.station import Station, TrustStore

    cfg = config_mod.load_station(args.station_config)
    ledger = store.make_engine(cfg.ledger)
    store.create_station_ledger(ledger)
    reports = []
    rejected = mismatched = 0
    with runtime.open_station(cfg) as session:
        station = Station(cfg.name, cfg.bureau, cfg.domains, session, TrustStore.load(cfg.trust), ledger,
                          SystemClock())
        for path in _bundle_files(args.bundles):
            try:
                data = path.read_bytes()
            except OSError as error:
                raise errors.InvalidArgument(str(path), f"cannot read ({error.strerror})") from None
            try:
                report = station.open(data, store=args.store, verify_only=args.verify_only)
            except errors.BundleRejected as error:
                rejected += 1
                reports.append({"file": str(path), "ok": False, "error": str(error)})
                if not args.json:
                    print(f"{path}: {error}", file=sys.stderr)
                continue
            mismatched += 0 if report.ok else 1
            reports.append({"file": str(path), **report.as_json()})
            if not args.json:
                for key in report.keys:
                    mark = "ok " if key.match else "BAD"
                    print(f"{path.name}: {mark} {key.domain:4} {key.name:8} {key.algorithm} KCV {key.kcv_computed}"
                          f" (sealed {key.kcv_expected})")
    if args.json:
        print(json.dumps({"bundles": reports, "rejected": rejected, "kcv_mismatch": mismatched}, indent=2))
    elif len(reports) > 1:
        print(f"{len(reports)} bundles: {len(reports) - rejected - mismatched} ok, {rejected} rejected, "
              f"{mismatched} with KCV mismatches")
    return 0 if rejected == 0 and mismatched == 0 else errors.BundleRejected.exit_code
