"""`kms worker`: one domain's HSM workers, or the audit signer, as a service of its own on a Unix socket."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from kms import logs
from kms.cli.common import command, env_path
from kms.registry import DOMAINS


def add_parser(sub: Any) -> None:
    p = command(sub, "worker", "run one domain's HSM workers (or the audit signer) as a service for kms serve", """
        Run one domain's HSM worker processes (--domain), or the audit signer (--audit), as a service of its own,
        under its own OS user and with its own configuration and PIN, for the front end (kms serve with `workers:`
        in its kms.yaml) to reach over a Unix socket (mode 0660, in a directory this user owns; group
        worker.socket_group). Logs into the token once before it listens: a wrong PIN, label or module is one line
        naming the setting. Prints `kms: worker <name> serving on unix:PATH` on stdout once it listens; SIGTERM
        drains. Deployment: docs/deployment.md, "Domain worker services".""",
                "kms worker --domain hrss --config /etc/kms/worker-hrss.yaml --listen unix:/run/kms/hrss/worker.sock\n"
                "kms worker --audit --config /etc/kms/worker-audit.yaml")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--domain", choices=DOMAINS, help="the key domain whose workers to run")
    which.add_argument("--audit", action="store_true", help="run the audit signer")
    env_path(p, "--config", "the worker's configuration (the kms.yaml format, holding its own domain or audit)")
    p.add_argument("--listen", metavar="unix:PATH", help="the socket (default: worker.listen in the config)")
    p.add_argument("--log-format", choices=logs.FORMATS, default=os.environ.get(logs.ENV_FORMAT, "text"),
                   help="log lines on stderr: text, or one JSON object per line (default: $KMS_LOG_FORMAT or text)")
    p.add_argument("--log-level", choices=logs.LEVELS, default=os.environ.get(logs.ENV_LEVEL),
                   help="least level logged (default: $KMS_LOG_LEVEL, or info; debug with -v)")
    p.set_defaults(handler=_worker)


def _worker(args: argparse.Namespace) -> int:
    from kms.server.worker import WorkerService, run

    logs.configure(args.log_level or ("debug" if args.verbose else "info"), args.log_format)

    def ready(service: WorkerService) -> None:
        logging.getLogger("kms.server.worker").info("worker %s serving on %s", service.serves, service.listen)
        print(f"kms: worker {service.serves} serving on {service.listen}", flush=True)

    run(args.config, domain=args.domain, audit=args.audit, listen=args.listen, ready=ready)
    return 0
