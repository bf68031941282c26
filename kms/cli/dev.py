"""`kms init` and `kms dev …`: a development home and the helpers that go with it (visibly not production)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from kms import errors
from kms.cli.common import command, commands, emit, force_option, json_option, refuse_existing, write_random_cards
from kms.validation import CARD_REF

CITY_CODE = re.compile(r"[0-9]{6}")


def add_parser(sub: Any) -> None:
    p = command(sub, "init", "create a development home: SoftHSM2 tokens, keys, dev CA, certificates, configs", """
        Create a development home (not for production): a SoftHSM2 token per domain, for the audit signer and for
        each station; master keys generated in the tokens; a development CA with certificates for officers,
        stations and an auditor; the server's, clients' and stations' configurations; and the genesis ceremony
        enrolling three officers per domain. Idempotent: an existing home is completed, never overwritten.

        The home holds PINs, SO PINs and the CA's private key: keep it out of version control.

        --profile chooses the card profiles the home gets (default: dual-app). A profile using SM4 or SM2
        (dual-app-sm, dual-app-mixed) needs the development SM token (`make sm-token`): the home then uses its
        module and writes hsm.mechanisms: softhsm2-sm-dev into every configuration.""",
                "kms init home\nkms serve --config home/kms.yaml\nkms init sm-home --profile dual-app-sm")
    p.add_argument("home", type=Path, help="the directory to create (or complete)")
    p.add_argument("--module", default="auto",
                   help="PKCS#11 module path (default: find SoftHSM2; for an SM profile, the development SM token "
                        "built by `make sm-token`)")
    p.add_argument("--profile", action="append", dest="profiles", metavar="PROFILE",
                   help="a card profile for the home: a shipped one (dual-app, dual-app-sm, dual-app-mixed) or a "
                        "profile file; repeat for several (default: dual-app)")
    p.add_argument("--port", type=int,
                   help="the port the server's configuration listens on and the clients' configurations name "
                        "(default: 7443; a new home only: an existing home keeps its own)")
    json_option(p)
    p.set_defaults(handler=_init)

    group = command(sub, "dev", "development helpers (not for production)", """
        Helpers for a development home: random card files, and revoking a development certificate.""",
                    "kms dev cards --count 100 --out cards.csv")
    dev = commands(group, "dev_command")
    p = command(dev, "cards", "write random dual-application card identities to a CSV file", """
        Write COUNT random card identities (card_ref, city_code, card_serial, pan, psn, kdd) to a new CSV file
        (mode 0600: it holds PANs). Card references are card-0000000, card-0000001, ...; PANs are 19 digits of the
        development BIN 621483 with a valid Luhn check digit. An existing file is refused unless --force.""",
                "kms dev cards --count 1000 --out cards.csv\nkms dev cards --count 10 --out b2.csv --prefix b2-")
    p.add_argument("--count", type=int, required=True, help="how many cards (1 to 10,000,000)")
    p.add_argument("--out", type=Path, required=True, help="the CSV file to write")
    p.add_argument("--city-code", default="320200", help="the cards' 6-digit city code (default: 320200)")
    p.add_argument("--prefix", default="card-", help="the card references' prefix (default: card-), so that "
                                                     "files for different batches do not share cards")
    force_option(p)
    json_option(p)
    p.set_defaults(handler=_cards)
    p = command(dev, "revoke-certificate",
                "revoke a certificate of a development home's CA: add it to pki/crl.pem (a running server applies "
                "it on the next call)", """
        Revoke a certificate the development CA of HOME issued: its serial is added to HOME/pki/crl.pem, which
        the server and the clients read (tls.crl). A running server refuses the certificate from its next call.""",
                "kms dev revoke-certificate --home home home/pki/clients/station-bureau-b-station-b1.pem")
    p.add_argument("--home", type=Path, required=True, help="the development home (made by kms init)")
    p.add_argument("certificate", type=Path, help="the certificate to revoke (PEM), e.g. HOME/pki/clients/….pem")
    json_option(p)
    p.set_defaults(handler=_revoke_certificate)


def _init(args: argparse.Namespace) -> int:
    from kms.dev import home as devhome

    port = devhome.DEFAULT_PORT if args.port is None else args.port
    if not 1 <= port <= 65535:
        raise errors.InvalidArgument("--port", "must be from 1 to 65535")
    home = devhome.init_home(args.home, module=args.module, port=port,
                             card_profiles=args.profiles or devhome.DEFAULT_PROFILES)
    emit(args, {"home": str(home.path), "config": str(home.config)},
         f"development home ready: {home.path}\n  issuer config: {home.config}\n"
         f"  station config: {home.station_config('station-a1')}")
    return 0


def _cards(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= 10_000_000:
        raise errors.InvalidArgument("--count", "must be from 1 to 10,000,000")
    if not CITY_CODE.fullmatch(args.city_code):
        raise errors.InvalidArgument("--city-code", "must be 6 digits")
    if not CARD_REF.fullmatch(f"{args.prefix}0000000"):
        raise errors.InvalidArgument("--prefix", "card references are letters, digits and . _ : - (at most 64)")
    refuse_existing(args.out, args.force)
    write_random_cards(args.out, args.count, args.city_code, args.prefix)
    emit(args, {"out": str(args.out), "cards": args.count},
         f"{args.count} cards written to {args.out}")
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
    emit(args, {"certificate": str(args.certificate), "serial": serial_text(cert), "subject": subject,
                "crl": str(pki.crl)},
         f"revoked {args.certificate} (serial {serial_text(cert)}, {subject}); {pki.crl} rewritten")
    return 0
