"""The ``kms`` command line. Errors: one line on stderr, exit status from kms.errors."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kms import config as config_mod
from kms import errors
from kms.cli import audit as cli_audit
from kms.cli import ceremony as cli_ceremony
from kms.files import open_private, private_dir, restrict_umask, write_private
from kms.hsm.labels import SELFTEST_TOKEN

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kms", description="HSM-backed key management for social security cards")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a development home: SoftHSM2 tokens, keys, configuration")
    p.add_argument("home", type=Path)
    p.add_argument("--module", default="auto", help="PKCS#11 module path (default: find SoftHSM2)")
    p.add_argument("--json", action="store_true")

    keys = sub.add_parser("keys", help="the key registry").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("list", help="list registered keys (never their values)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--domain", choices=("hrss", "bank"))
    p.add_argument("--json", action="store_true")

    prof = sub.add_parser("profile", help="card profiles").add_subparsers(dest="profile_command", required=True)
    p = prof.add_parser("check", help="validate profile files (and master key references, with --config)")
    p.add_argument("paths", type=Path, nargs="+")
    p.add_argument("--config", type=Path)

    dev = sub.add_parser("dev", help="development helpers").add_subparsers(dest="dev_command", required=True)
    p = dev.add_parser("cards", help="write random dual-application card identities to a CSV file")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--city-code", default="320200")
    p = dev.add_parser("revoke-certificate",
                       help="revoke a certificate of a development home's CA: add it to pki/crl.pem (a running "
                            "server applies it on the next call)")
    p.add_argument("--home", type=Path, required=True, help="the development home (made by kms init)")
    p.add_argument("certificate", type=Path, help="the certificate to revoke (PEM), e.g. HOME/pki/clients/….pem")
    p.add_argument("--json", action="store_true")

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
    p = bundle.add_parser("open", help="verify bundles and unwrap their keys into the station's token")
    p.add_argument("--station-config", type=Path, required=True)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--store", action="store_true", help="keep the keys as token objects in the station's token")
    mode.add_argument("--verify-only", action="store_true",
                      help="dry run: verify and check every KCV, but record nothing (the bundle can be opened later)")
    p.add_argument("--json", action="store_true")
    p.add_argument("bundles", type=Path, nargs="+", help="bundle files or directories of *.kmsb")

    p = sub.add_parser("serve", help="run the issuance service (gRPC over mutual TLS) until interrupted")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--listen", help="host:port (default: server.listen in the config; port 0 picks one)")

    batch = sub.add_parser("batch", help="issuance batches (officers)").add_subparsers(dest="batch_command",
                                                                                   required=True)
    p = batch.add_parser("create", help="authorize a batch of cards for a bureau")
    p.add_argument("--client", type=Path, required=True, help="an officer's client configuration")
    p.add_argument("--batch-id", required=True)
    p.add_argument("--bureau", required=True)
    p.add_argument("--profile", default="dual-app-v1")
    p.add_argument("--cards", type=Path, required=True, help="CSV: card_ref,city_code,card_serial,pan,psn,kdd")
    p.add_argument("--server", help="host:port, instead of the client configuration's")
    p.add_argument("--json", action="store_true")
    p = batch.add_parser("show", help="a batch's status")
    p.add_argument("--client", type=Path, required=True, help="a client or station configuration")
    p.add_argument("--batch-id", required=True)
    p.add_argument("--server")
    p.add_argument("--json", action="store_true")
    p = batch.add_parser("reissue", help="consent (for your domain) to revoke a spoiled card's chip binding and "
                                         "bundle so it can be issued again; done once every domain consented")
    p.add_argument("--client", type=Path, required=True, help="an officer's client configuration")
    p.add_argument("--batch-id", required=True)
    p.add_argument("--card-ref", required=True)
    p.add_argument("--server")

    card = sub.add_parser("card", help="card lifecycle (officers; show also auditors)").add_subparsers(
        dest="card_command", required=True)
    for name, text in (("lost", "report an application of a card lost (挂失)"),
                       ("unlost", "cancel the loss report of an application (解挂)"),
                       ("replace", "record a replacement card (补换): the old card is revoked, its identities retired"),
                       ("cancel", "cancel (销卡) or close (销户) an application of a card; hrss first"),
                       ("show", "a card's state per application and its history")):
        p = card.add_parser(name, help=text)
        p.add_argument("--client", type=Path, required=True, help="an officer's or auditor's client configuration")
        p.add_argument("--card-ref", required=True, help="the card (for replace: the old card)")
        if name in ("lost", "unlost", "cancel"):
            p.add_argument("--application", required=True, choices=("hrss", "bank"))
        if name == "replace":
            p.add_argument("--new-card-ref", required=True, help="the replacement card, a card of some batch")
        if name == "cancel":
            p.add_argument("--kind", required=True, choices=("cancel-card", "close-account"),
                           help="cancel-card (销卡) or close-account (销户)")
        if name != "show":
            p.add_argument("--reason", required=True, help="why; recorded with the change")
        p.add_argument("--server")
        p.add_argument("--json", action="store_true")

    cli_ceremony.add_parser(sub)
    cli_audit.add_parser(sub)

    station = sub.add_parser("station", help="personalization station").add_subparsers(dest="station_command",
                                                                                       required=True)
    p = station.add_parser("fetch", help="fetch a batch's sealed bundles into a directory")
    p.add_argument("--station-config", type=Path, required=True)
    p.add_argument("--batch-id", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--open", action="store_true", help="also verify and open each bundle into the station's token")
    p.add_argument("--server")
    p.add_argument("--json", action="store_true")
    cli_ceremony.add_station_parsers(station)

    p = sub.add_parser("selftest", help="run known-answer derivation vectors through the HSM")
    p.add_argument("--vectors", type=Path, required=True)
    p.add_argument("--config", type=Path, help="use this configuration's token (session objects only)")
    p.add_argument("--domain", choices=("hrss", "bank"), default="bank", help="which domain's token, with --config")
    p.add_argument("--module", help="PKCS#11 module for the temporary token (default: find SoftHSM2)")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    restrict_umask()  # whatever kms writes, and the processes it starts write, is the user's alone (kms.files)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="kms: %(message)s")
    handler = _COMMANDS[args.command]
    try:
        return handler(args)
    except errors.KmsError as error:
        print(f"kms: error: {error}", file=sys.stderr)
        return errors.exit_code(error)
    except KeyboardInterrupt:
        print("kms: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # an unexpected failure: say what kind, never what data
        log.debug("unexpected error", exc_info=True)
        print(f"kms: internal error ({type(error).__name__}); run with -v for details", file=sys.stderr)
        return 1


def _emit(args: argparse.Namespace, doc: Any, text: str) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True) if getattr(args, "json", False) else text)


# -- commands -------------------------------------------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    from kms.dev import home as devhome

    home = devhome.init_home(args.home, module=args.module)
    _emit(args, {"home": str(home.path), "config": str(home.config)},
          f"development home ready: {home.path}\n  issuer config: {home.config}\n"
          f"  station config: {home.station_config('station-a1')}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from kms import runtime
    from kms.clock import SystemClock

    cfg = config_mod.load(args.config)
    records = runtime.registry(cfg, SystemClock()).all(args.domain)
    rows = [{"domain": r.domain, "kind": r.kind.value, "name": r.name, "version": r.version,
             "algorithm": r.algorithm, "state": r.state.value, "kcv": r.kcv, "kcv_method": r.kcv_method,
             "created_at": r.created_at} for r in records]
    text = "\n".join(f"{r['domain']:5} {r['kind']:9} {r['name']:14} v{r['version']:<3} {r['algorithm']:10} "
                     f"{r['state']:8} {r['kcv'] or '-':6} {r['created_at']}" for r in rows)
    _emit(args, rows, text or "no keys")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from kms.cards import profiles
    from kms.dev import home as devhome

    known = devhome.master_key_names(config_mod.load(args.config)) if args.config else None
    for path in args.paths:
        for file in sorted(path.glob("*.yaml")) if path.is_dir() else [path]:
            profile = profiles.load(file, known)
            counts = ", ".join(f"{d}: {len(k)} keys" for d, k in profile.domains.items())
            print(f"{file}: profile {profile.name} ok ({counts})")
    return 0


def _cmd_dev(args: argparse.Namespace) -> int:
    if args.dev_command == "revoke-certificate":
        return _revoke_certificate(args)
    if not 1 <= args.count <= 10_000_000:
        raise errors.InvalidArgument("--count", "must be from 1 to 10,000,000")
    write_random_cards(args.out, args.count, args.city_code)
    print(f"{args.count} cards written to {args.out}")
    return 0


def _revoke_certificate(args: argparse.Namespace) -> int:
    from kms.dev.pki import DevPki
    from kms.revocation import serial_text

    pki_dir = args.home / "pki"
    if not (pki_dir / "ca.key").is_file():
        raise errors.ConfigError(f"{args.home}: not a development home (no pki/ca.key)")
    pki = DevPki(pki_dir)
    cert = pki.revoke(args.certificate)
    subject = cert.subject.rfc4514_string()
    _emit(args, {"certificate": str(args.certificate), "serial": serial_text(cert), "subject": subject,
                 "crl": str(pki.crl)},
          f"revoked {args.certificate} (serial {serial_text(cert)}, {subject}); {pki.crl} rewritten")
    return 0


def write_random_cards(path: Path, count: int, city_code: str = "320200") -> None:
    with open_private(path, "w", newline="", encoding="utf-8") as f:  # PANs: the owner's alone
        writer = csv.writer(f)
        writer.writerow(CARD_COLUMNS)
        for i in range(count):
            writer.writerow([
                f"card-{i:07d}", city_code, secrets.token_hex(8).upper(),
                "621483" + f"{secrets.randbelow(10**13):013d}", f"{secrets.randbelow(100):02d}",
                secrets.token_hex(10).upper(),
            ])


CARD_COLUMNS = ("card_ref", "city_code", "card_serial", "pan", "psn", "kdd")


def read_cards(path: Path) -> list[Any]:
    from kms.cards.cardid import CardIdentity

    cards = []
    seen: dict[str, int] = {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for line, row in enumerate(reader, start=2):
                try:
                    card = CardIdentity.from_mapping({k: v for k, v in row.items() if v not in (None, "")})
                except errors.InvalidArgument as error:
                    raise errors.InvalidArgument(f"{path}:{line}: {error.field}", error.reason) from None
                if card.card_ref in seen:
                    raise errors.InvalidArgument(f"{path}:{line}: card_ref",
                                                 f"{card.card_ref} already appears on line {seen[card.card_ref]}")
                seen[card.card_ref] = line
                cards.append(card)
    except OSError as error:
        raise errors.ConfigError(f"{path}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise errors.InvalidArgument(str(path), "not UTF-8 text") from None
    return cards


def _cmd_bundle(args: argparse.Namespace) -> int:
    return _bundle_seal(args) if args.bundle_command == "seal" else _bundle_open(args)


def _bundle_seal(args: argparse.Namespace) -> int:
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
    _emit(args, doc, f"sealed {sealed} bundles ({sealed * keys_per_card} keys) in {elapsed:.2f} s"
                     f" into {args.out}" + (f"; {failed} cards failed" if failed else ""))
    return 0 if failed == 0 else 1


def _bundle_files(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(path.glob("*.kmsb"))
        else:
            yield path


def _bundle_open(args: argparse.Namespace) -> int:
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


def _cmd_selftest(args: argparse.Namespace) -> int:
    from kms import runtime
    from kms.cards import selftest
    from kms.hsm import softhsm

    vectors = selftest.load_vectors(args.vectors)
    if args.config:
        cfg = config_mod.load(args.config)
        with runtime.open_domain(cfg, args.domain) as session:
            return _run_selftest(args, session, vectors)
    with tempfile.TemporaryDirectory(prefix="kms-selftest-") as tmp:
        conf = softhsm.write_conf(Path(tmp))
        pins = Path(tmp) / "pins"
        softhsm.ensure_token(conf, SELFTEST_TOKEN, pins / "user.pin", pins / "so.pin")
        hsm = config_mod.HsmConfig(module=args.module or "auto", softhsm2_conf=conf)
        pin = (pins / "user.pin").read_text(encoding="utf-8").strip()
        with runtime.module(hsm).open(SELFTEST_TOKEN, pin) as session:
            return _run_selftest(args, session, vectors)


def _run_selftest(args: argparse.Namespace, session: Any, vectors: dict[str, Any]) -> int:
    from kms.cards.selftest import SelfTest

    test = SelfTest(session)
    try:
        results = list(test.run(vectors))
    finally:
        test.close()
    failed = sum(r.failed for r in results)
    if args.json:
        print(json.dumps({"token": session.token_label, "failed": failed, "cases": [
            {"case": r.case, "source": r.source, "status": r.status, "detail": r.detail} for r in results]},
            indent=2))
    else:
        labels = {"pass": "PASS", "fail": "FAIL", "unsupported": "SKIP"}
        for r in results:
            print(f"{labels[r.status]} {r.case:14} {r.detail}  [{r.source}]")
        print(f"{len(results)} cases: {sum(r.status == 'pass' for r in results)} passed, {failed} failed, "
              f"{sum(r.status == 'unsupported' for r in results)} not supported by this HSM")
    if not results:
        print("kms: error: no vectors in the file", file=sys.stderr)
        return 1
    return 0 if failed == 0 else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    from kms.server.serve import serve

    def ready(port: int) -> None:
        print(f"kms: serving on port {port}", flush=True)

    serve(args.config, listen=args.listen, ready=ready)
    return 0


def _client_for(path: Path, server: str | None) -> Any:
    from kms.client.service import Client

    doc = config_mod.load_station(path).client if _is_station_config(path) else config_mod.load_client(path)
    if doc is None:
        raise errors.ConfigError(f"{path}: no 'client' section")
    return Client(doc, server=server)


def _is_station_config(path: Path) -> bool:
    import yaml

    try:
        return "station" in (yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False


def _status_doc(status: Any) -> dict[str, Any]:
    return {"batch_id": status.batch_id, "bureau": status.bureau, "profile": status.profile, "cards": status.cards,
            "issued": status.issued, "state": status.state, "created_by": status.created_by,
            "created_at": status.created_at}


def _cmd_batch(args: argparse.Namespace) -> int:
    with _client_for(args.client, args.server) as client:
        if args.batch_command == "create":
            status = client.create_batch(args.batch_id, args.bureau, args.profile, read_cards(args.cards))
        elif args.batch_command == "show":
            status = client.batch_status(args.batch_id)
        else:
            reply = client.reissue(args.batch_id, args.card_ref)
            if reply.awaiting:
                print(f"card {reply.card_ref} of batch {args.batch_id}: your domain's consent to re-issue it is "
                      f"recorded; awaiting the {' and '.join(reply.awaiting)} domain's consent")
            else:
                print(f"card {reply.card_ref} of batch {args.batch_id} is {reply.state} again")
            return 0
    doc = _status_doc(status)
    _emit(args, doc, f"batch {doc['batch_id']}: {doc['cards']} cards for {doc['bureau']} ({doc['profile']}), "
                     f"{doc['issued']} issued, {doc['state']}; created by {doc['created_by']} at {doc['created_at']}")
    return 0


def _card_doc(reply: Any) -> dict[str, Any]:
    return {
        "card_ref": reply.card_ref, "replaced_by": reply.replaced_by or None, "replaces": reply.replaces or None,
        "applications": {a.application: {"state": a.state, "since": a.since or None} for a in reply.applications},
        "records": [{"batch_id": r.batch_id, "state": r.state, "serial": r.serial or None} for r in reply.records],
        "history": [{"application": e.application or None, "event": e.event, "from": e.from_state or None,
                     "to": e.to_state or None, "reason": e.reason, "detail": e.detail, "at": e.at, "by": e.by}
                    for e in reply.history],
        "awaiting_consent": list(reply.awaiting_consent),
    }


def _cmd_card(args: argparse.Namespace) -> int:
    with _client_for(args.client, args.server) as client:
        if args.card_command == "lost":
            reply = client.report_lost(args.card_ref, args.application, args.reason)
        elif args.card_command == "unlost":
            reply = client.cancel_loss_report(args.card_ref, args.application, args.reason)
        elif args.card_command == "replace":
            reply = client.replace_card(args.card_ref, args.new_card_ref, args.reason)
        elif args.card_command == "cancel":
            reply = client.cancel_application(args.card_ref, args.application, args.kind, args.reason)
        else:
            reply = client.get_card(args.card_ref)
    doc = _card_doc(reply)
    lines = [f"card {doc['card_ref']}: " + ", ".join(f"{a} {s['state']}" for a, s in doc["applications"].items())
             + (f"; replaced by {doc['replaced_by']}" if doc["replaced_by"] else "")
             + (f"; replaces {doc['replaces']}" if doc["replaces"] else "")
             + (f"; replacement awaiting the {' and '.join(doc['awaiting_consent'])} domain's consent"
                if doc["awaiting_consent"] else "")]
    if args.card_command == "show":
        lines += [f"  record {r['batch_id']}: {r['state']}" + (f" (bundle {r['serial']})" if r["serial"] else "")
                  for r in doc["records"]]
        lines += [f"  {e['at']} {e['event']}" + (f" ({e['application']})" if e["application"] else "")
                  + f" by {e['by']}: {e['reason']}" + (f" [{e['detail']}]" if e["detail"] else "")
                  for e in doc["history"]]
    _emit(args, doc, "\n".join(lines))
    return 0


def _cmd_station(args: argparse.Namespace) -> int:
    if args.station_command != "fetch":
        return cli_ceremony.run_station(args, _client_for)
    from kms import runtime, store
    from kms.clock import SystemClock
    from kms.station import Station, TrustStore

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
                          SystemClock())
    try:
        with _client_for(args.station_config, args.server) as client:
            total = client.batch_status(args.batch_id).cards
            progress = _Progress(total, enabled=not args.json and sys.stderr.isatty())
            for bundle in client.stream_batch(args.batch_id):
                write_private(args.out / f"{bundle.card_ref}.kmsb", bundle.data)
                fetched += 1
                if station is not None:
                    try:
                        report = station.open(bundle.data)
                    except errors.BundleRejected:
                        report = None
                    if report is not None:
                        opened += 1
                        keys += len(report.keys)
                        matched += sum(k.match for k in report.keys)
                progress.update(fetched)
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
    _emit(args, doc, text)
    return 0 if not args.open or (opened == fetched and matched == keys) else errors.BundleRejected.exit_code


class _Progress:
    """A one-line progress bar on stderr (only on a terminal)."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total, self.enabled, self._last = max(total, 1), enabled, -1

    def update(self, count: int) -> None:
        percent = count * 100 // self.total
        if self.enabled and percent != self._last:
            self._last = percent
            bar = "#" * (percent // 4)
            print(f"\r[{bar:<25}] {count}/{self.total}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def _cmd_ceremony(args: argparse.Namespace) -> int:
    return cli_ceremony.run(args, _client_for)


def _cmd_audit(args: argparse.Namespace) -> int:
    return cli_audit.run(args, _client_for)


_COMMANDS = {
    "init": _cmd_init, "keys": _cmd_keys, "profile": _cmd_profile, "dev": _cmd_dev, "bundle": _cmd_bundle,
    "selftest": _cmd_selftest, "serve": _cmd_serve, "batch": _cmd_batch, "station": _cmd_station,
    "card": _cmd_card, "ceremony": _cmd_ceremony, "audit": _cmd_audit,
}

if __name__ == "__main__":
    sys.exit(main())
