"""`kms keys …` and `kms profile …`: what the key registry holds (never a value) and whether card profiles are
sound."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kms import config as config_mod
from kms.cli.common import command, commands, emit, env_path, json_option


def add_parser(sub: Any) -> None:
    group = command(sub, "keys", "the key registry (never key values)", """
        What the key registry holds: each key's domain, kind, name, version, algorithm, state and check value.
        Never a key's value.""", "kms keys list --config home/kms.yaml --domain bank")
    keys = commands(group, "keys_command")
    p = command(keys, "list", "list registered keys (never their values)", """
        List the keys the registry of the issuer configuration's database holds, per domain: kind, name, version,
        algorithm, state, KCV and creation time.""",
                "kms keys list --config home/kms.yaml\nkms keys list --config home/kms.yaml --json | jq -r '.[].name'")
    env_path(p, "--config", "the issuer configuration (kms.yaml)")
    p.add_argument("--domain", choices=("hrss", "bank"), help="only this domain's keys")
    json_option(p, "the keys")
    p.set_defaults(handler=_list)

    group = command(sub, "profile", "card profiles", """
        Card profiles: for each domain, the keys a card gets (data in kms/policies/profiles/*.yaml).""",
                    "kms profile check kms/policies/profiles")
    prof = commands(group, "profile_command")
    p = command(prof, "check", "validate profile files (and master key references, with --config)", """
        Load and validate card profiles: recipes, their parameters, each domain's transport and signature
        algorithms, unknown fields, pan_luhn; with --config, also that every master key a profile names exists in
        the registry. A bad profile is one line naming the file, the line and the reason (exit 3).""",
                "kms profile check home/profiles --config home/kms.yaml")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="profile files or directories of *.yaml")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="also check master key references against this issuer configuration's registry")
    json_option(p, "the profiles checked")
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
    checked: list[dict[str, Any]] = []
    for path in args.paths:
        for file in sorted(path.glob("*.yaml")) if path.is_dir() else [path]:
            profile = profiles.load(file, known)
            checked.append({"file": str(file), "profile": profile.name, "pan_luhn": profile.pan_luhn,
                            "keys": {d: len(k) for d, k in profile.domains.items()},
                            "transport": {d: profile.transport(d).value for d in profile.domains},
                            "signature": {d: profile.signature(d).value for d in profile.domains}})
    emit(args, checked, "\n".join(
        f"{c['file']}: profile {c['profile']} ok ({', '.join(f'{d}: {n} keys' for d, n in c['keys'].items())}); "
        + "; ".join(f"{d}: {c['transport'][d]} transport, {c['signature'][d]} signature" for d in c["keys"])
        for c in checked) or "no profiles found")
    return 0
