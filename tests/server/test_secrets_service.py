"""`kms serve` with every secret it uses in a real OpenBao server (tests/openbao.py): the domain and audit token
PINs, the database URL and the server's TLS private key, read through AppRole with the shipped policies
(deploy/openbao/); a batch issued end to end; and a canary: no PIN, secret_id, TLS key or token in the service's log,
in the errors of a start that fails, or in the audit export."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, card, client, kms, open_batch
from openbao import BaoServer

from kms import config
from kms.client.service import Client
from kms.dev.home import Home
from kms.identity import Principal

ALICE = Principal("officer", "alice", domain="hrss")
ERIN = Principal("auditor", "erin")
POLICIES = ROOT / "deploy" / "openbao"


def _serve(config_path: Path, out: Path, err: Path, *options: str) -> tuple[subprocess.Popen[bytes], int | None]:
    """`kms serve` in a process of its own; its port, or None if it stopped (a start that failed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_LOG")}
    server = subprocess.Popen([sys.executable, "-m", "kms.cli", "serve", "--config", str(config_path), "--listen",
                               "127.0.0.1:0", *options], stdout=out.open("wb"), stderr=err.open("wb"), cwd=ROOT,
                              env=env)
    for _ in range(1200):
        found = re.search(r"serving on port (\d+)", out.read_text())
        if found:
            return server, int(found.group(1))
        if server.poll() is not None:
            return server, None
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=0.1)
    raise AssertionError("kms serve did not start")


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


class Provisioned:
    """What a security officer puts into OpenBao for one embedded `kms serve` (one process tree, so one AppRole with
    the front end's, both domains' and the audit signer's policies), under a prefix of its own."""

    def __init__(self, server: BaoServer, home: Home, where: Path) -> None:
        self.prefix = f"e2e-{secrets.token_hex(3)}"
        self.pins = {name: (home.path / "pins" / f"{name}.pin").read_text().strip() for name in ("hrss", "bank",
                                                                                                  "audit")}
        doc = yaml.safe_load(home.config.read_text())
        self.tls_key = (home.config.parent / doc["server"]["tls"]["key"]).read_text()
        database = config.load(home.config).database
        for name, pin in self.pins.items():
            server.put(f"{self.prefix}/{name}", pin=pin)
        server.put(f"{self.prefix}/front/database", url=database)
        server.put(f"{self.prefix}/front/tls", key=self.tls_key)
        root = server.client()
        names = []
        for policy in ("kms-front", "kms-hrss", "kms-bank", "kms-audit"):
            hcl = (POLICIES / f"{policy}.hcl").read_text().replace("kv/data/kms/", f"kv/data/{self.prefix}/")
            names.append(f"{self.prefix}-{policy}")
            root.sys.create_or_update_policy(name=names[-1], policy=hcl)
        role = f"{self.prefix}-embedded"
        root.auth.approle.create_or_update_approle(role, token_policies=names, token_ttl="1h", token_max_ttl="24h")
        self.role_id = str(root.auth.approle.read_role_id(role)["data"]["role_id"])
        self.secret_id = str(root.auth.approle.generate_secret_id(role)["data"]["secret_id"])
        where.mkdir(mode=0o700, exist_ok=True)
        (where / "role-id").write_text(self.role_id + "\n")
        (where / "secret-id").write_text(self.secret_id + "\n")
        doc["openbao"] = {"address": server.address, "approle": {"role_id": f"file:{where / 'role-id'}",
                                                                 "secret_id": f"file:{where / 'secret-id'}"}}
        for name in ("hrss", "bank"):
            doc["domains"][name]["pin"] = f"vault:kv/{self.prefix}/{name}#pin"
        doc["audit"]["pin"] = f"vault:kv/{self.prefix}/audit#pin"
        doc["database"] = f"vault:kv/{self.prefix}/front/database#url"
        doc["server"]["tls"]["key"] = f"vault:kv/{self.prefix}/front/tls#key"
        self.doc = doc

    def write(self, home: Home, doc: dict[str, object] | None = None) -> Path:
        path = home.path / f"kms-{self.prefix}-{secrets.token_hex(2)}.yaml"  # beside kms.yaml: its relative paths
        path.write_text(yaml.safe_dump(doc or self.doc))
        return path

    def values(self) -> list[str]:
        """Every secret value that must appear nowhere: PINs, the AppRole's credentials, the TLS key's body."""
        body = "".join(line for line in self.tls_key.splitlines() if not line.startswith("-----"))
        return [*self.pins.values(), self.secret_id, self.role_id, body[:64], body[-64:]]


@pytest.fixture
def provisioned(openbao: BaoServer, home: Home, tmp_path: Path) -> Iterator[Provisioned]:
    made = Provisioned(openbao, home, tmp_path / "openbao")
    yield made
    for path in home.path.glob(f"kms-{made.prefix}-*.yaml"):
        path.unlink()


def _station(home: Home, port: int) -> Client:
    cfg = config.load_station(home.station_config("station-a1")).client
    assert cfg is not None
    return Client(cfg, server=f"localhost:{port}", timeout=120)


def test_kms_serve_with_every_secret_from_openbao_issues_a_batch(home: Home, openbao: BaoServer,
                                                                 provisioned: Provisioned, tmp_path: Path) -> None:
    path = provisioned.write(home)
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    server, port = _serve(path, out, err, "--log-format", "json", "--log-level", "debug")
    assert port is not None, err.read_text()
    batch = f"V-{secrets.token_hex(4)}"
    cards = [card(880_000 + i, card_ref=f"v-{secrets.token_hex(3)}-{i}") for i in range(6)]
    export = tmp_path / "audit.jsonl"
    try:
        # The server presents the certificate whose key came from OpenBao: the mutual TLS handshake proves it.
        with client(home, port, ALICE) as alice:
            status = open_batch(home, port, alice, batch, "bureau-a", "dual-app-v1", cards)
        assert status.cards == len(cards)
        with _station(home, port) as station:  # sealed by both domains' workers, each with its PIN from OpenBao
            bundles = list(station.stream_batch(batch, per_message=3))
        assert [b.card_ref for b in bundles] == [c.card_ref for c in cards]
        kms("audit", "export", "--client", str(home.client_config(ERIN)), "--server", f"localhost:{port}",
            "-o", str(export), check=True)
    finally:
        _stop(server)
    assert server.returncode == 0, err.read_text()
    logged = out.read_text() + err.read_text()
    assert any("openbao: logged in" in json.loads(line)["message"] for line in err.read_text().splitlines())
    exported = export.read_text()
    assert f'"batch_id":"{batch}"' in exported.replace(" ", "")  # the export holds this batch's records
    for value in provisioned.values():
        assert value not in logged, "a secret is in the service's log"
        assert value not in exported, "a secret is in the audit export"


def test_a_start_that_cannot_read_its_secrets_says_which_and_why(home: Home, openbao: BaoServer,
                                                                 provisioned: Provisioned, tmp_path: Path) -> None:
    """Denied (the bank's PIN where the role may not read), missing, OpenBao down: one line each, naming the
    reference or the address; no secret in it."""
    cases = {}
    denied = yaml.safe_load(yaml.safe_dump(provisioned.doc))
    denied["domains"]["bank"]["pin"] = "vault:kv/kms-elsewhere/bank#pin"
    cases["denied"] = (denied, 3, "domains.bank.pin: secret reference vault:kv/kms-elsewhere/bank#pin: OpenBao at "
                                  f"{openbao.address} denied reading kv/data/kms-elsewhere/bank (403)")
    missing = yaml.safe_load(yaml.safe_dump(provisioned.doc))
    missing["audit"]["pin"] = f"vault:kv/{provisioned.prefix}/audit#so_pin"
    cases["missing"] = (missing, 3, f"audit.pin: secret reference vault:kv/{provisioned.prefix}/audit#so_pin: the "
                                    f"secret kv/{provisioned.prefix}/audit has no field 'so_pin' (fields: pin)")
    down = yaml.safe_load(yaml.safe_dump(provisioned.doc))
    down["openbao"]["address"] = "http://127.0.0.1:9"  # the discard port: nothing listens
    cases["down"] = (down, 15, f"secret reference vault:kv/{provisioned.prefix}/front/database#url: openbao.approle: "
                               "login: OpenBao at http://127.0.0.1:9 is unavailable (connection refused)")
    for name, (doc, code, expected) in cases.items():
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        server, port = _serve(provisioned.write(home, doc), out, err)
        if port is not None:
            _stop(server)
        assert port is None and server.returncode == code, (name, err.read_text())
        text = err.read_text()
        assert expected in text, (name, text)
        for value in provisioned.values():
            assert value not in text + out.read_text(), name
