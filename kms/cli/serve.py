"""`kms serve` and `kms selftest`: run the issuance service; check the HSM against known-answer vectors."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from kms import config as config_mod
from kms import logs
from kms.cli.common import command, env_path, json_option
from kms.hsm.labels import SELFTEST_TOKEN


def add_parser(sub: Any) -> None:
    p = command(sub, "serve", "run the issuance service (gRPC over mutual TLS) until interrupted", """
        Run the issuance, batch, card, ceremony and audit services over gRPC with mutual TLS, with one HSM worker
        process per domain (workers_per_domain) and the audit signer, until Ctrl-C or SIGTERM. Prints `kms: serving
        on port N` on stdout once it listens. Operating it (supervision, health, backup, certificates):
        docs/operations.md.""",
                "kms serve --config home/kms.yaml\nKMS_CONFIG=/etc/kms/kms.yaml kms serve --listen 0.0.0.0:7443")
    env_path(p, "--config", "the issuer configuration (kms.yaml)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="the address to listen on (default: server.listen in the config; port 0 picks one)")
    p.add_argument("--health-listen", metavar="HOST:PORT|off",
                   help="the HTTP listener for /healthz, /readyz and /metrics (default: server.health_listen in the "
                        "config, else loopback on the gRPC port + 1)")
    p.add_argument("--log-format", choices=logs.FORMATS, default=os.environ.get(logs.ENV_FORMAT, "text"),
                   help="log lines on stderr: text, or one JSON object per line (default: $KMS_LOG_FORMAT or text)")
    p.add_argument("--log-level", choices=logs.LEVELS, default=os.environ.get(logs.ENV_LEVEL),
                   help="least level logged (default: $KMS_LOG_LEVEL, or info; debug with -v)")
    p.set_defaults(handler=_serve)

    p = command(sub, "selftest", "run known-answer derivation vectors through the HSM", """
        Run known-answer derivation vectors (tests/vectors/derivation.json) through an HSM: by default a temporary
        SoftHSM2 token; with --config, that configuration's domain token, using session objects only. One line
        per case, PASS, FAIL or SKIP (a mechanism the HSM lacks); exit 0 only if nothing failed. SM4 cases run
        in the HSM when its mechanism profile (--mechanisms, or the configuration's hsm.mechanisms) and token offer
        SM4.""",
                "kms selftest --vectors tests/vectors/derivation.json")
    p.add_argument("--vectors", type=Path, required=True, help="the vectors file (JSON)")
    p.add_argument("--config", type=Path, metavar="FILE", help="use this configuration's token (session objects only)")
    p.add_argument("--domain", choices=("hrss", "bank"), default="bank", help="which domain's token, with --config")
    p.add_argument("--module", help="PKCS#11 module for the temporary token (default: find SoftHSM2)")
    p.add_argument("--mechanisms", metavar="PROFILE", default="pkcs11-standard",
                   help="the temporary token's mechanism profile, e.g. softhsm2-sm-dev (default: pkcs11-standard)")
    json_option(p, "the results")
    p.set_defaults(handler=_selftest)


def _serve(args: argparse.Namespace) -> int:
    from kms.server.serve import FROM_CONFIG, Service, serve

    # The service's log: timestamps and levels on stderr, text or JSON (kms.logs); stdout keeps the line below.
    logs.configure(args.log_level or ("debug" if args.verbose else "info"), args.log_format)

    def ready(service: Service) -> None:
        served = logging.getLogger("kms.server.serve")
        if service.http is not None:
            served.info("health and metrics on %s (/healthz, /readyz, /metrics)", service.http.url)
        served.info("serving on port %d as replica %s", service.port, service.replica)
        print(f"kms: serving on port {service.port}", flush=True)

    health = FROM_CONFIG if args.health_listen is None else (None if args.health_listen == "off"
                                                             else args.health_listen)
    serve(args.config, listen=args.listen, health_listen=health, ready=ready)
    return 0


def _selftest(args: argparse.Namespace) -> int:
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
        hsm = config_mod.HsmConfig(module=args.module or "auto", softhsm2_conf=conf,
                                   mechanisms=config_mod.mechanism_profile(args.mechanisms, "--mechanisms"))
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
