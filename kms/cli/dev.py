"""`kms init` and `kms dev …`: a development home and the helpers that go with it (visibly not production)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kms import errors
from kms.cli.common import emit, write_random_cards


def add_parser(sub: Any) -> None:
    p = sub.add_parser("init", help="create a development home: SoftHSM2 tokens, keys, configuration")
    p.add_argument("home", type=Path)
    p.add_argument("--module", default="auto", help="PKCS#11 module path (default: find SoftHSM2)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_init)

    dev = sub.add_parser("dev", help="development helpers").add_subparsers(dest="dev_command", required=True)
    p = dev.add_parser("cards", help="write random dual-application card identities to a CSV file")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--city-code", default="320200")
    p.set_defaults(handler=_cards)
    p = dev.add_parser("revoke-certificate",
                       help="revoke a certificate of a development home's CA: add it to pki/crl.pem (a running "
                            "server applies it on the next call)")
    p.add_argument("--home", type=Path, required=True, help="the development home (made by kms init)")
    p.add_argument("certificate", type=Path, help="the certificate to revoke (PEM), e.g. HOME/pki/clients/….pem")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_revoke_certificate)


def _init(args: argparse.Namespace) -> int:
    from kms.dev import home as devhome

    home = devhome.init_home(args.home, module=args.module)
    emit(args, {"home": str(home.path), "config": str(home.config)},
         f"development home ready: {home.path}\n  issuer config: {home.config}\n"
         f"  station config: {home.station_config('station-a1')}")
    return 0


def _cards(args: argparse.Namespace) -> int:
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
    emit(args, {"certificate": str(args.certificate), "serial": serial_text(cert), "subject": subject,
                "crl": str(pki.crl)},
         f"revoked {args.certificate} (serial {serial_text(cert)}, {subject}); {pki.crl} rewritten")
    return 0
