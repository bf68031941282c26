"""Two `kms serve` replicas on one PostgreSQL database (docs/deployment.md, "Scale-out"): kms.server.serve.Service
twice in this process, on the shared tokens of one development home whose records are in PostgreSQL, each with its
own worker processes and its own audit signer on the one audit token (the embedded default). A batch opened through
one replica streams from the other, the batch asked again of the first comes back byte-identical, both checkpoint, and
an auditor's export through either verifies offline with checkpoints signed for both, each replica named."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import POSTGRES, card, client, drop_schema, officer, open_batch, postgres_home, service_client

from kms import store
from kms.audit.verify import verify
from kms.client.audit import AuditClient
from kms.dev.home import Home
from kms.identity import Principal
from kms.server.serve import Service

ERIN = Principal("auditor", "erin")
STATION = "station-a1"
NONCE = "ab" * 16


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Home, list[Service], sa.Engine]]:
    if not POSTGRES:
        pytest.skip("KMS_TEST_POSTGRES_URL is not set")
    home, admin = postgres_home(tmp_path_factory.mktemp("replicas-home"), bureaus={"bureau-a": (STATION,)})
    replicas: list[Service] = []
    try:
        replicas += [Service(home.config, listen="127.0.0.1:0", health_listen=None) for _ in range(2)]
        yield home, replicas, admin
    finally:
        for replica in replicas:
            replica.stop(grace=0)
        drop_schema(admin)


def _records(admin: sa.Engine, kind: str) -> list[dict[str, Any]]:
    with admin.connect() as conn:
        rows = conn.execute(sa.text("SELECT body FROM audit_log WHERE kind = :kind ORDER BY seq"), {"kind": kind})
        return [json.loads(row.body) for row in rows]


def test_two_replicas_serve_one_database_and_checkpoint_one_chain(
        cluster: tuple[Home, list[Service], sa.Engine]) -> None:
    home, (a, b), admin = cluster
    assert a.replica != b.replica and {a.replica, b.replica} <= {
        r["detail"]["replica"] for r in _records(admin, "service.started")}
    # every lock key includes the schema: service.started says which one each replica resolved
    assert {r["detail"]["schema"] for r in _records(admin, "service.started")} == {store.current_schema(admin)}
    cards = [card(940_000 + i, card_ref=f"rp-{i}") for i in range(12)]
    with client(home, a.port, officer("hrss", 0)) as alice:
        open_batch(home, a.port, alice, "B-replicas", "bureau-a", "dual-app-v1", cards)
    assert a.checkpointer is not None and b.checkpointer is not None
    first = a.checkpointer.checkpoint_now()
    with service_client(home, b, STATION) as station:
        streamed = {bundle.card_ref: bundle for bundle in station.stream_batch("B-replicas", per_message=4)}
    assert sorted(streamed) == sorted(c.card_ref for c in cards)
    second = b.checkpointer.checkpoint_now()
    assert first is not None and second is not None and second.size > first.size
    with service_client(home, a, STATION) as station:  # the batch again, of the other replica: the same bundles
        again = {bundle.card_ref: bundle for bundle in station.stream_batch("B-replicas", per_message=5)}
    assert {ref: (x.serial, x.data) for ref, x in again.items()} == {
        ref: (x.serial, x.data) for ref, x in streamed.items()}

    with service_client(home, a, ERIN) as erin:  # the export seals a checkpoint on a, after b's
        lines = [line for chunk in AuditClient(erin).export(nonce=NONCE) for line in chunk]
    checkpoints = [json.loads(line) for line in lines if line.startswith('{"type":"checkpoint"')]
    assert {c["replica"] for c in checkpoints} >= {a.replica, b.replica}
    assert [c["size"] for c in checkpoints] == sorted({c["size"] for c in checkpoints})
    public = serialization.load_pem_public_key((home.path / "audit" / "audit-v1.pem").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    verdict = verify(iter(lines), public, nonce=NONCE)
    assert verdict.ok and verdict.checkpoints == len(checkpoints), verdict.summary()
    issued = [r["subject"] for r in _records(admin, "issuance.issued") if r["subject"].startswith("B-replicas/")]
    assert sorted(issued) == sorted(f"B-replicas/{c.card_ref}" for c in cards)  # once each, whichever replica
