"""Development helpers: officers of a development home running ceremonies through the service, each signing with
their own approval key file (used by `make demo`, `make bench` and the tests)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kms import config
from kms.cards.cardid import CardIdentity
from kms.ceremony.officers import ApprovalKeyFile, public_pem
from kms.client.ceremony import CeremonyClient
from kms.client.service import Client
from kms.dev.home import AUDITORS, OFFICERS, Home
from kms.dev.pki import DevPki
from kms.files import write_private
from kms.identity import Principal
from kms.v1 import ceremony_pb2, issuance_pb2


def officer(domain: str, index: int) -> Principal:
    return Principal("officer", OFFICERS[domain][index], domain=domain)


def client(home: Home, port: int, who: Principal) -> Client:
    return Client(config.load_client(home.client_config(who)), server=f"localhost:{port}", timeout=120)


def key(home: Home, who: Principal) -> ApprovalKeyFile:
    return ApprovalKeyFile(home.approval_key(who))


def run_ceremony(home: Home, port: int, domain: str, operation: str, params: Mapping[str, Any],
                 approvers: Sequence[int] = (1, 2), proposer: int = 0, execute: bool = True
                 ) -> ceremony_pb2.Ceremony:
    """Propose as the domain's officer ``proposer``, approve as each of ``approvers``, execute as the proposer."""
    with client(home, port, officer(domain, proposer)) as c:
        ceremony = CeremonyClient(c).propose(operation, params)
    for index in approvers:
        with client(home, port, officer(domain, index)) as c:
            CeremonyClient(c).approve(ceremony.ceremony_id, key(home, officer(domain, index)))
    if not execute:
        return ceremony
    with client(home, port, officer(domain, proposer)) as c:
        return CeremonyClient(c).execute(ceremony.ceremony_id)


def authorize_batch(home: Home, port: int, batch_id: str, domains: Sequence[str] = ("hrss", "bank")
                    ) -> list[ceremony_pb2.Ceremony]:
    """Each domain's authorize-batch ceremony: its first officer proposes and executes, its second approves."""
    return [run_ceremony(home, port, domain, "authorize-batch", {"batch_id": batch_id}, approvers=(1,))
            for domain in domains]


def open_batch(home: Home, port: int, creator: Client, batch_id: str, bureau: str, profile: str,
               cards: Sequence[CardIdentity]) -> issuance_pb2.BatchStatus:
    """CreateBatch, then both domains' authorize-batch ceremonies: the batch is open for its stations."""
    creator.create_batch(batch_id, bureau, profile, cards)
    authorize_batch(home, port, batch_id)
    return creator.batch_status(batch_id)


def client_config_for(home: Home, who: Principal, tag: str = "") -> Path:
    """A client configuration (clients/<who>[+tag].yaml) for ``who`` with a certificate from the home's development
    CA, in the same shape as the auditor's that ``kms init`` wrote (server, CA, revocation settings). With ``tag``,
    a new certificate and key for the same principal (a re-certification). Registering it is a ceremony's job."""
    template = yaml.safe_load(home.client_config(Principal("auditor", AUDITORS[0])).read_text())
    cred = DevPki(home.path / "pki").client(who, tag)
    path = home.client_config(who)
    path = path.with_name(path.stem + (f"+{tag}" if tag else "") + ".yaml")
    template["client"]["tls"]["cert"] = os.path.relpath(cred.cert, path.parent)
    template["client"]["tls"]["key"] = os.path.relpath(cred.key, path.parent)
    if who.role == "officer":
        if not home.approval_key(who).exists():
            ApprovalKeyFile.create(home.approval_key(who))
        template["client"]["approval_key"] = home.approval_key(who).name
    write_private(path, yaml.safe_dump(template, sort_keys=False))
    return path


def officer_params(home: Home, who: Principal, roles: Sequence[str] = ("approver",)) -> dict[str, Any]:
    """enrol-officer parameters for a new officer of a development home: an approval key file, a client
    certificate (and configuration), both made here."""
    client_config_for(home, who)
    return {"name": who.name, "roles": list(roles), "public_key": public_pem(key(home, who).public_key()),
            "certificate": DevPki(home.path / "pki").client(who).cert.read_text()}


def certificate_pem(home: Home, who: Principal, tag: str = "") -> str:
    return DevPki(home.path / "pki").client(who, tag).cert.read_text()
