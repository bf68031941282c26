"""`kms station …`: a personalization station fetches a batch's bundles (and opens them into its token), shows its
unwrap public key, and takes a transport key a ceremony left for it."""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kms import config as config_mod
from kms import errors
from kms.cli.common import Progress, client_for, command, commands, emit, env_path, json_option, server_option
from kms.files import private_dir, write_private
from kms.registry import DOMAINS

#: `kms station fetch`'s retries of UNAVAILABLE by default: 8 in a row, for at most 5 minutes without progress.
RETRIES, RETRY_FOR = 8, 300.0


def add_parser(sub: Any) -> None:
    group = command(sub, "station", "personalization station", """
        A personalization station: fetch a batch's sealed bundles (and open them into the station's token), show
        its unwrap public key, take a transport key a ceremony left for it. The station configuration's client
        section says how to reach the service.""",
                    "kms station fetch --station-config home/stations/station-b1/station.yaml --batch-id B-0001 "
                    "--out bundles/ --open")
    station = commands(group, "station_command")
    p = command(station, "fetch", "fetch a batch's sealed bundles into a directory", """
        Stream a batch's sealed bundles from the service into OUT/<card_ref>.kmsb (mode 0600), resuming the stream
        where it broke off when the service is briefly unavailable (on another replica when --server or the
        configuration lists several and one is gone). With --open, verify each bundle and unwrap its
        keys into the station's token, recomputing every KCV (exit 7 if any is refused or mismatches). Cards the
        batch holds that this fetch did not receive (e.g. waiting for chip data) are counted on stderr; progress,
        with rate and time left, goes to stderr too.""",
                "kms station fetch --station-config home/stations/station-b1/station.yaml --batch-id B-0001 "
                "--out bundles/ --open")
    env_path(p, "--station-config", "the station configuration (station.yaml)")
    p.add_argument("--batch-id", required=True, help="the batch to fetch")
    p.add_argument("--out", type=Path, required=True, help="the directory for the bundles (created 0700)")
    p.add_argument("--open", action="store_true", help="also verify and open each bundle into the station's token")
    server_option(p)
    json_option(p, "the counts")
    p.add_argument("--retries", type=_count, default=RETRIES, metavar="N",
                   help="when the service is unavailable (exit 12: its database, its HSM workers or the network), "
                        "retry up to N times in a row, with exponential backoff and jitter, resuming after the last "
                        f"bundle received; 0: do not retry (default {RETRIES})")
    p.add_argument("--retry-for", type=_seconds, default=RETRY_FOR, metavar="SECONDS",
                   help=f"give up retrying once SECONDS passed without a bundle received (default {RETRY_FOR:g})")
    p.set_defaults(handler=_fetch)
    p = command(station, "unwrap-key", "a new single-use RSA public key for one transport key hand-off (PEM)", """
        Make a new RSA key pair in the station's token for one hand-off of a domain's transport key and print its
        public key (PEM; its SHA-256 on stderr, for the officers to compare with the proposal's
        public_key_sha256). The register-transport-key ceremony (method=rsa-oaep) names it; the station destroys
        the pair as soon as it has unwrapped that one key (kms station accept-transport-key), so a key that was
        used once cannot be named again: run this for each hand-off. --list shows the domain's keys no hand-off
        has used yet; --discard destroys one of them (a ceremony abandoned: a hand-off proposed to it can then no
        longer be accepted).""",
                "kms station unwrap-key --station-config home/stations/station-b1/station.yaml --domain bank "
                "> station-b1-bank.pem")
    env_path(p, "--station-config", "the station configuration (station.yaml)")
    p.add_argument("--domain", required=True, choices=DOMAINS, help="the domain whose transport key it receives")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--list", action="store_true",
                       help="make no key: list the domain's unused single-use keys (label and SHA-256)")
    which.add_argument("--discard", metavar="SHA256",
                       help="make no key: destroy the unused single-use key whose public key has this SHA-256")
    json_option(p, "the key (domain, station, label, pem, sha256); with --list, the keys; with --discard, its label")
    p.set_defaults(handler=_unwrap_key)
    p = command(station, "accept-transport-key",
                "take the transport key a ceremony left for this station into its token, check the KCV and confirm "
                "it (which activates the key)", """
        Take the transport key (AES256 or SM4) a register-transport-key ceremony left for this station (wrapped to
        the single-use unwrap key the proposal named) into its token, check its KCV against the issuer's, and
        confirm it, which activates the key. The unwrap key pair is destroyed once it has unwrapped the key (also
        when the KCV differs), so the wrapped bytes cannot be unwrapped again.""",
                "kms station accept-transport-key --station-config home/stations/station-b1/station.yaml "
                "--domain bank")
    env_path(p, "--station-config", "the station configuration (station.yaml)")
    p.add_argument("--domain", required=True, choices=DOMAINS, help="the domain whose transport key it is")
    server_option(p)
    json_option(p)
    p.set_defaults(handler=_accept_transport_key)


def _fetch(args: argparse.Namespace) -> int:
    from kms import runtime, store
    from kms.client.service import Backoff, Retrying, retry_unavailable
    from kms.clock import SystemClock
    from kms.station import OpenReport, Station, TrustStore

    private_dir(args.out)
    cfg = config_mod.load_station(args.station_config)
    started = time.perf_counter()
    fetched = opened = keys = matched = 0
    session = station = None
    if args.open:
        ledger = store.make_engine(cfg.ledger)
        store.create_station_ledger(ledger)
        session = runtime.open_station(cfg)
        station = Station(cfg.name, cfg.bureau, cfg.domains, session, TrustStore.load(cfg.trust), ledger,
                          SystemClock(), checking_token=functools.partial(runtime.open_station, cfg))
    backoff = Backoff(retries=args.retries, seconds=args.retry_for)
    progress: Progress | None = None

    def retrying(retry: Retrying) -> None:  # one line on stderr per retry, apart from the progress line
        if progress is not None and progress.enabled and sys.stderr.isatty():  # end the redrawn line
            print(file=sys.stderr)
        where = f"resuming after cursor {retry.cursor}" if retry.cursor else "from the start"
        print(f"kms: {retry.error}; retry {retry.retry} of {retry.retries} in {retry.delay:.1f} s, {where}",
              file=sys.stderr, flush=True)

    try:
        with retry_unavailable(lambda: client_for(args.station_config, args.server), backoff, retrying) as client:
            total = retry_unavailable(lambda: client.batch_status(args.batch_id).cards, backoff, retrying)
            progress = bar = Progress(total, unit="bundles")

            def received() -> Iterator[bytes]:
                nonlocal fetched
                for bundle in client.stream_batch(args.batch_id, backoff=backoff, on_retry=retrying):
                    write_private(args.out / f"{bundle.card_ref}.kmsb", bundle.data)
                    fetched += 1
                    bar.update(fetched)
                    yield bundle.data

            if station is None:
                for _ in received():
                    pass
            else:
                # opened as they arrive, their serials recorded in one ledger commit per 32 bundles (a stream that
                # fails mid-way has every bundle it gave opened before its error surfaces)
                for result in station.open_many(received()):
                    if isinstance(result, OpenReport):  # a refused bundle is not counted as opened
                        opened += 1
                        keys += len(result.keys)
                        matched += sum(k.match for k in result.keys)
            progress.update(fetched, final=True)
            progress.done()
            if fetched < total:
                print(f"kms: {total - fetched} of {total} cards of batch {args.batch_id} were not issued in this "
                      "fetch (cards waiting for chip data at the station, or issued to another request after "
                      "this stream passed them); see kms batch show",
                      file=sys.stderr)
    finally:
        if session is not None:
            session.close()
    seconds = time.perf_counter() - started
    doc = {"batch_id": args.batch_id, "fetched": fetched, "opened": opened, "keys": keys, "kcv_matches": matched,
           "seconds": round(seconds, 3), "bundles_per_second": round(fetched / seconds, 1) if seconds else None}
    text = f"fetched {fetched} bundles of batch {args.batch_id} into {args.out} in {seconds:.1f} s"
    if args.open:
        text += f"; opened {opened}: {keys} keys, {matched} KCV matches"
    emit(args, doc, text)
    return 0 if not args.open or (opened == fetched and matched == keys) else errors.BundleRejected.exit_code


def _count(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to 1000")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86_400:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 86400")
    return value


def _unwrap_key(args: argparse.Namespace) -> int:
    from kms import runtime
    from kms.station import discard_unwrap_key, new_unwrap_key, unused_unwrap_keys

    cfg = config_mod.load_station(args.station_config)
    if args.list:
        with runtime.open_station(cfg) as session:
            unused = unused_unwrap_keys(session, cfg.name, args.domain)
        emit(args, [{"label": k.label, "sha256": k.sha256} for k in unused],
             "\n".join(f"{k.label}  SHA-256 {k.sha256}" for k in unused)
             or f"{cfg.name} holds no unused {args.domain} unwrap key")
        return 0
    if args.discard is not None:
        with runtime.open_station(cfg) as session:
            label = discard_unwrap_key(session, cfg.name, args.domain, args.discard)
        emit(args, {"domain": args.domain, "station": cfg.name, "discarded": label},
             f"{cfg.name}'s unused {args.domain} unwrap key {label} destroyed")
        return 0
    with runtime.open_station(cfg) as session:
        made = new_unwrap_key(session, cfg.name, args.domain)
    if made.retired:
        print(f"kms: {cfg.name}'s long-lived {args.domain} unwrap key {made.retired} (a kms before single-use keys) "
              "destroyed: a hand-off still pending for it must be proposed again to the new key", file=sys.stderr)
    if args.json:
        emit(args, {"domain": args.domain, "station": cfg.name, "label": made.label, "pem": made.pem,
                    "sha256": made.sha256, "retired": made.retired or None}, "")
    else:
        print(made.pem, end="")
        print(f"kms: {cfg.name}'s single-use {args.domain} unwrap key {made.label}, SHA-256 {made.sha256}",
              file=sys.stderr)
    return 0


def _accept_transport_key(args: argparse.Namespace) -> int:
    from kms import runtime
    from kms.client.ceremony import CeremonyClient
    from kms.hsm.types import Algorithm
    from kms.station import accept_transport_key

    cfg = config_mod.load_station(args.station_config)
    with client_for(args.station_config, args.server) as client:
        cer = CeremonyClient(client)
        handoff = cer.fetch_transport_key(args.domain)
        try:
            algorithm = Algorithm(handoff.algorithm or Algorithm.AES256.value)
        except ValueError:
            raise errors.InvalidArgument("algorithm", f"the hand-off names an unknown algorithm "
                                                      f"{handoff.algorithm!r}") from None
        with runtime.open_station(cfg) as session:
            kcv = accept_transport_key(session, cfg.name, args.domain, handoff.label, handoff.wrapped_key,
                                       handoff.kcv, algorithm, handoff.unwrap_key_sha256)
        confirmed = cer.confirm_transport_key(args.domain, handoff.version, kcv)
    emit(args, {"domain": confirmed.domain, "bureau": confirmed.bureau, "label": confirmed.label,
                "algorithm": algorithm.value, "kcv": kcv},
         f"{confirmed.label} ({algorithm.value}) is in {cfg.name}'s token (KCV {kcv}, the issuer's) and now active; "
         "its single-use unwrap key is destroyed")
    return 0
