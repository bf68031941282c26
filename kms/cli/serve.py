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
from kms.hsm.labels import SELFTEST_TOKEN


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the issuance service (gRPC over mutual TLS) until interrupted")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--listen", help="host:port (default: server.listen in the config; port 0 picks one)")
    p.add_argument("--health-listen", metavar="HOST:PORT|off",
                   help="the HTTP listener for /healthz, /readyz and /metrics (default: server.health_listen in the "
                        "config, else loopback on the gRPC port + 1)")
    p.add_argument("--log-format", choices=logs.FORMATS, default=os.environ.get(logs.ENV_FORMAT, "text"),
                   help="log lines on stderr: text, or one JSON object per line (default: $KMS_LOG_FORMAT or text)")
    p.add_argument("--log-level", choices=logs.LEVELS, default=os.environ.get(logs.ENV_LEVEL),
                   help="least level logged (default: $KMS_LOG_LEVEL, or info; debug with -v)")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("selftest", help="run known-answer derivation vectors through the HSM")
    p.add_argument("--vectors", type=Path, required=True)
    p.add_argument("--config", type=Path, help="use this configuration's token (session objects only)")
    p.add_argument("--domain", choices=("hrss", "bank"), default="bank", help="which domain's token, with --config")
    p.add_argument("--module", help="PKCS#11 module for the temporary token (default: find SoftHSM2)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_selftest)


def _serve(args: argparse.Namespace) -> int:
    from kms.server.serve import FROM_CONFIG, Service, serve

    # The service's log: timestamps and levels on stderr, text or JSON (kms.logs); stdout keeps the line below.
    logs.configure(args.log_level or ("debug" if args.verbose else "info"), args.log_format)

    def ready(service: Service) -> None:
        served = logging.getLogger("kms.server.serve")
        if service.http is not None:
            served.info("health and metrics on %s (/healthz, /readyz, /metrics)", service.http.url)
        served.info("serving on port %d", service.port)
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
