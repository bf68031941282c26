"""`kms keys …` and `kms profile …`: what the key registry holds (never a value) and whether card profiles are
sound."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kms import config as config_mod
from kms.cli.common import emit


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="the key registry").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("list", help="list registered keys (never their values)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--domain", choices=("hrss", "bank"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_list)

    prof = sub.add_parser("profile", help="card profiles").add_subparsers(dest="profile_command", required=True)
    p = prof.add_parser("check", help="validate profile files (and master key references, with --config)")
    p.add_argument("paths", type=Path, nargs="+")
    p.add_argument("--config", type=Path)
    p.set_defaults(handler=_check_profiles)


def _list(args: argparse.Namespace) -> int:
    from kms import runtime
    from kms.clock import SystemClock

    cfg = config_mod.load(args.config)
    records = runtime.registry(cfg, SystemClock()).all(args.domain)
    rows = [{"domain": r.domain, "kind": r.kind.value, "name": r.name, "version": r.version,
             "algorithm": r.algorithm, "state": r.state.value, "kcv": r.kcv, "kcv_method": r.kcv_method,
             "created_at": r.created_at} for r in records]
    text = "\n".join(f"{r['domain']:5} {r['kind']:9} {r['name']:14} v{r['version']:<3} {r['algorithm']:10} "
                     f"{r['state']:8} {r['kcv'] or '-':6} {r['created_at']}" for r in rows)
    emit(args, rows, text or "no keys")
    return 0


def _check_profiles(args: argparse.Namespace) -> int:
    from kms.cards import profiles
    from kms.dev import home as devhome

    known = devhome.master_key_names(config_mod.load(args.config)) if args.config else None
    for path in args.paths:
        for file in sorted(path.glob("*.yaml")) if path.is_dir() else [path]:
            profile = profiles.load(file, known)
            counts = ", ".join(f"{d}: {len(k)} keys" for d, k in profile.domains.items())
            print(f"{file}: profile {profile.name} ok ({counts})")
    return 0
