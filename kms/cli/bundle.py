"""`kms bundle …`: seal bundles from a card file without the service (issuer side), and open them at a station."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kms import config as config_mod
from kms import errors
from kms.cli.common import command, commands, emit, env_path, force_option, json_option, read_cards, refuse_existing
from kms.files import private_dir, write_private

if TYPE_CHECKING:
    from kms.station import OpenReport, Station


def add_parser(sub: Any) -> None:
    group = command(sub, "bundle", "sealed bundles: seal without the service, open at a station", """
        Sealed bundles: a card's keys wrapped under a bureau's transport key with their check values, signed per
        domain (docs/bundle-format.md). `seal` makes them from a card file without the service; `open` verifies
        them at a station and unwraps the keys into its token.""",
                    "kms bundle open --station-config home/stations/station-a1/station.yaml sealed/")
    bundle = commands(group, "bundle_command")
    p = command(bundle, "seal", "seal bundles for the cards in a CSV file (issuer side, without the service)", """
        Seal one bundle per card of a card file for a bureau, in this machine's domain worker processes (no
        service, no batch, no authorization: a development and bench path). Writes OUT/<card_ref>.kmsb (mode 0600);
        a bundle file that exists already is refused unless --force. A card that fails is reported on stderr and
        the others are sealed (exit 1 if any failed).""",
                "kms bundle seal --config home/kms.yaml --bureau bureau-a --batch B-0002 --cards cards.csv "
                "--out sealed/")
    env_path(p, "--config", "the issuer configuration (kms.yaml)")
    p.add_argument("--bureau", required=True, help="the bureau whose transport keys wrap the cards' keys")
    p.add_argument("--batch", required=True, help="the batch name the bundles record (1 to 64 characters)")
    p.add_argument("--profile", default="dual-app-v1", help="the card profile (default: dual-app-v1)")
    p.add_argument("--cards", type=Path, required=True, help="CSV: card_ref,city_code,card_serial,pan,psn,kdd")
    p.add_argument("--out", type=Path, required=True, help="directory for the .kmsb files")
    p.add_argument("--workers", type=int, help="worker processes per domain (default: from the config)")
    force_option(p)
    json_option(p, "the counts")
    p.set_defaults(handler=_seal)
    p = command(bundle, "open", "verify bundles and unwrap their keys into the station's token", """
        Verify sealed bundles at a station (signatures, bureau, domains, replay against the station's ledger) and
        unwrap every key into its token, recomputing each KCV. Each bundle is one line per key on stdout; a refusal
        is one line on stderr: `bundle rejected` (deliberately opaque; with -v the reason, e.g. a replay, is
        logged). Exit 0 if every bundle opened with every KCV matching, else 7.""",
                "kms bundle open --station-config home/stations/station-a1/station.yaml sealed/\n"
                "kms bundle open --station-config home/stations/station-a1/station.yaml --verify-only --json "
                "sealed/card-0000000.kmsb")
    env_path(p, "--station-config", "the station configuration (station.yaml)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--store", action="store_true", help="keep the keys as token objects in the station's token")
    mode.add_argument("--verify-only", action="store_true",
                      help="dry run: verify and check every KCV, but record nothing (the bundle can be opened later)")
    json_option(p, "a report per bundle")
    p.add_argument("bundles", type=Path, nargs="+", metavar="BUNDLE", help="bundle files or directories of *.kmsb")
    p.set_defaults(handler=_open)


def _seal(args: argparse.Namespace) -> int:
    from kms.issuance.issuer import Issuer

    if not args.batch or len(args.batch) > 64:
        raise errors.InvalidArgument("--batch", "must be 1 to 64 characters")
    if args.workers is not None and not 1 <= args.workers <= 64:
        raise errors.InvalidArgument("--workers", "must be from 1 to 64")
    cards = read_cards(args.cards)
    for card in cards:  # no silent overwrite: checked before any work
        refuse_existing(args.out / f"{card.card_ref}.kmsb", args.force)
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
    paths = list(_bundle_files(args.bundles))

    def read() -> Iterator[bytes]:
        for path in paths:
            try:
                yield path.read_bytes()
            except OSError as error:
                raise errors.InvalidArgument(str(path), f"cannot read ({error.strerror})") from None

    with runtime.open_station(cfg) as session:
        station = Station(cfg.name, cfg.bureau, cfg.domains, session, TrustStore.load(cfg.trust), ledger,
                          SystemClock(), checking_token=functools.partial(runtime.open_station, cfg))
        if args.store or args.verify_only:
            results: Iterator[OpenReport | errors.BundleRejected] = _one_by_one(
                station, read(), store=args.store, verify_only=args.verify_only)
        else:  # checked, not stored: the serials of up to 32 bundles recorded in one ledger commit
            results = station.open_many(read())
        for path, report in zip(paths, results, strict=True):
            if isinstance(report, errors.BundleRejected):
                error = report
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


def _one_by_one(station: Station, bundles: Iterator[bytes], *, store: bool, verify_only: bool
                ) -> Iterator[OpenReport | errors.BundleRejected]:
    for data in bundles:
        try:
            yield station.open(data, store=store, verify_only=verify_only)
        except errors.BundleRejected as rejected:
            yield rejected
