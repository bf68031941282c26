"""Development helpers: officers of a development home running ceremonies through the service, each signing with
their own approval key file (used by `make demo`, `make bench` and the tests)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kms import config
from kms.cardid import CardIdentity
from kms.ceremony_client import CeremonyClient
from kms.client import Client
from kms.devhome import OFFICERS, Home
from kms.identity import Principal
from kms.officers import ApprovalKeyFile


def officer(domain: str, index: int) -> Principal:
    return Principal("officer", OFFICERS[domain][index], domain=domain)


def client(home: Home, port: int, who: Principal) -> Client:
    return Client(config.load_client(home.client_config(who)), server=f"localhost:{port}", timeout=120)


def key(home: Home, who: Principal) -> ApprovalKeyFile:
    return ApprovalKeyFile(home.approval_key(who))


def run_ceremony(home: Home, port: int, domain: str, operation: str, params: Mapping[str, Any],
                 approvers: Sequence[int] = (1, 2), proposer: int = 0, execute: bool = True) -> Any:
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


def authorize_batch(home: Home, port: int, batch_id: str, domains: Sequence[str] = ("hrss", "bank")) -> list[Any]:
    """Each domain's authorize-batch ceremony: its first officer proposes and executes, its second approves."""
    return [run_ceremony(home, port, domain, "authorize-batch", {"batch_id": batch_id}, approvers=(1,))
            for domain in domains]


def open_batch(home: Home, port: int, creator: Client, batch_id: str, bureau: str, profile: str,
               cards: Sequence[CardIdentity]) -> Any:
    """CreateBatch, then both domains' authorize-batch ceremonies: the batch is open for its stations."""
    creator.create_batch(batch_id, bureau, profile, cards)
    authorize_batch(home, port, batch_id)
    return creator.batch_status(batch_id)
