"""Development only: a development home's configuration split for worker services (``kms worker``).

``split_home`` writes, beside the home's kms.yaml, the front end's configuration (``front.yaml``: no PIN, a
``workers`` block naming one socket per domain and the audit signer) and one configuration per worker service
(``worker-hrss.yaml``, ``worker-bank.yaml``, ``worker-audit.yaml``), each holding only its own domain (or the audit
section) with its PIN. Tests, the bench and the OS-user separation build on it; production configurations are
written by hand (docs/deployment.md, "Domain worker services").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kms.files import write_private
from kms.registry import DOMAINS

#: The worker services of a split home: each domain, and the audit signer.
SERVICES = (*DOMAINS, "audit")


@dataclass(frozen=True)
class WorkerLayout:
    front: Path  # the front end's kms.yaml (no PIN)
    workers: dict[str, Path]  # hrss, bank, audit -> that worker service's configuration
    sockets: dict[str, str]  # hrss, bank, audit -> unix:PATH

    def command(self, name: str) -> list[str]:
        """The arguments of ``kms`` that run the worker service ``name``."""
        which = ["--audit"] if name == "audit" else ["--domain", name]
        return ["worker", *which, "--config", str(self.workers[name])]


def split_home(config: Path, sockets: Path, services: tuple[str, ...] = SERVICES) -> WorkerLayout:
    """Configurations for ``services`` as worker services (the others stay spawned by the front end), their sockets
    ``<sockets>/<name>/worker.sock`` (short: a socket path has at most 107 bytes)."""
    doc: dict[str, Any] = yaml.safe_load(config.read_text(encoding="utf-8"))
    base = {k: v for k, v in doc.items() if k not in ("domains", "server", "audit", "workers", "worker")}
    socket_of = {name: f"unix:{sockets.absolute() / name / 'worker.sock'}" for name in services}
    front = dict(doc)
    front["domains"] = {d: ({"token": body["token"]} if d in services else body) for d, body in doc["domains"].items()}
    if "audit" in services and "audit" in doc:
        front["audit"] = {k: v for k, v in doc["audit"].items() if k != "pin"}
    front["workers"] = socket_of
    made = {"front": _write(config.parent / "front.yaml", front)}
    for name in services:
        own = {**base, "audit": doc["audit"]} if name == "audit" else {**base, "domains": {name: doc["domains"][name]}}
        own["worker"] = {"listen": socket_of[name]}
        officers = config.parent / f"officers-{name}.yaml"  # written at genesis (kms.dev.home.Home.officers_file)
        if name != "audit" and officers.exists():
            own["worker"]["officers"] = str(officers.absolute())
        made[name] = _write(config.parent / f"worker-{name}.yaml", own)
    return WorkerLayout(made["front"], {name: made[name] for name in services}, socket_of)


def _write(path: Path, doc: dict[str, Any]) -> Path:
    write_private(path, yaml.safe_dump(doc, sort_keys=False))
    return path
