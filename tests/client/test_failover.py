"""Clients over several replicas: two real `kms serve` processes (kms.dev.services.Replicas) on one PostgreSQL schema
and the same SoftHSM2 tokens, each spawning its own domain workers, both signing audit checkpoints through one audit
worker service (`kms worker --audit`). A client given both endpoints balances its calls over them; a station whose
replica is SIGKILLed mid-stream resumes from its cursor on the other and gets every card exactly once; an officer's
or auditor's command whose first endpoint is dead succeeds on the next."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import POSTGRES, card, client, drop_schema, kms, officer, open_batch, postgres_home

from kms import config
from kms.client.audit import AuditClient
from kms.client.service import Backoff, Client, Retrying
from kms.dev.home import Home
from kms.dev.services import Replicas
from kms.dev.workers import split_home
from kms.identity import Principal
from kms.v1 import issuance_pb2 as pb

pytestmark = [pytest.mark.postgres, pytest.mark.service, pytest.mark.hsm]

ALICE = officer("hrss", 0)
ERIN = Principal("auditor", "erin")
STATION = "station-a1"


@dataclass
class Cluster:
    home: Home
    replicas: Replicas
    db: sa.Engine  # on the replicas' schema, for the test's own reading

    def station(self, server: str) -> Client:
        cfg = config.load_station(self.home.station_config(STATION)).client
        assert cfg is not None
        return Client(cfg, server=server, timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not POSTGRES:
        pytest.skip("KMS_TEST_POSTGRES_URL is not set")
    sockets = Path(tempfile.mkdtemp(prefix="kmsr-", dir="/tmp"))  # short: a socket path has at most 107 bytes
    logs = tmp_path_factory.mktemp("replica-logs")
    home, db = postgres_home(tmp_path_factory.mktemp("replicas-home"),
                             {"bureau-a": (STATION,), "bureau-b": ("station-b1",)})
    try:
        layout = split_home(home.config, sockets, services=("audit",))
        with (logs / "audit.log").open("w") as err:
            signer = subprocess.Popen([sys.executable, "-m", "kms.cli", *layout.command("audit")],
                                      stdout=subprocess.PIPE, stderr=err, text=True)
        replicas = Replicas(layout.front, logs)
        try:
            assert signer.stdout is not None
            line = signer.stdout.readline()
            assert line.startswith("kms: worker audit serving on "), (line, (logs / "audit.log").read_text())
            replicas.start()
            replicas.start()
            yield Cluster(home, replicas, db)
        finally:
            replicas.stop()
            signer.terminate()
            signer.wait(timeout=60)
            if signer.stdout is not None:
                signer.stdout.close()
            shutil.rmtree(sockets, ignore_errors=True)
    finally:
        drop_schema(db)


def _open_batch(cluster: Cluster, batch_id: str, count: int) -> list[str]:
    cards = [card(900_000 + i, card_ref=f"{batch_id.lower()}-{i:04d}") for i in range(count)]
    port = cluster.replicas.running[0].port
    with client(cluster.home, port, ALICE) as alice:
        open_batch(cluster.home, port, alice, batch_id, "bureau-a", "dual-app-v1", cards)
    return [c.card_ref for c in cards]


def _dead_endpoint() -> str:
    """A loopback port nobody listens on (connection refused, as a replica that is gone)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"localhost:{s.getsockname()[1]}"


def test_calls_are_balanced_over_both_replicas(cluster: Cluster) -> None:
    batch_id = "R-BALANCE"
    _open_batch(cluster, batch_id, 2)
    first, second = cluster.replicas.running
    before = [r.sample("kms_requests_total", "GetBatchStatus") for r in (first, second)]
    with cluster.station(cluster.replicas.endpoints) as station:
        for _ in range(40):
            assert station.batch_status(batch_id).cards == 2
    served = [r.sample("kms_requests_total", "GetBatchStatus") - b for r, b in zip((first, second), before,
                                                                                    strict=True)]
    assert sum(served) == 40
    assert min(served) >= 10, served  # round_robin: each replica took its share, not one of them all


def test_a_stream_resumes_on_the_other_replica_and_every_card_arrives_once(cluster: Cluster) -> None:
    batch_id = "R-FAILOVER"
    card_refs = _open_batch(cluster, batch_id, 160)
    retries: list[tuple[Retrying, str]] = []  # each retry, and the sequence of the last bundle received before it
    received: list[pb.SealedBundle] = []
    with cluster.station(cluster.replicas.endpoints) as station:
        stream = station.stream_batch(batch_id, per_message=1,
                                      on_retry=lambda r: retries.append((r, str(received[-1].sequence))),
                                      backoff=Backoff(retries=8, first=0.2, most=1.0))
        for bundle in stream:
            received.append(bundle)
            if len(received) == 4:  # mid-stream: the replica serving it is lost
                streaming = [r for r in cluster.replicas.running if r.sample("kms_streams_open", "StreamBatch") > 0]
                assert len(streaming) == 1
                assert cluster.replicas.kill(streaming[0]) == -9
    # one retry, after the last bundle received: it went to the live replica, not again to the lost one
    assert [(r.retry, r.cursor) for r, _ in retries] == [(1, last) for _, last in retries[:1]], retries
    assert int(retries[0][1]) >= received[3].sequence
    assert [b.card_ref for b in received] == card_refs  # each card once, in order, none lost
    with cluster.db.connect() as conn:
        stored = {row.card_ref: row for row in conn.execute(sa.text(
            "SELECT card_ref, state, serial, bundle FROM batch_cards WHERE batch_id = :b"), {"b": batch_id})}
        issued = [json.loads(body)["subject"] for body, in conn.execute(sa.text(
            "SELECT body FROM audit_log WHERE kind = 'issuance.issued'"))]
    assert all(stored[b.card_ref].state == "issued" for b in received)
    # what the station holds is what was stored, byte for byte, including what the lost replica recorded
    assert all((bytes(stored[b.card_ref].bundle), stored[b.card_ref].serial) == (b.data, b.serial) for b in received)
    mine = sorted(s for s in issued if s.startswith(f"{batch_id}/"))
    assert mine == sorted(f"{batch_id}/{c}" for c in card_refs)  # each card issued exactly once


def test_a_command_whose_first_endpoint_is_dead_succeeds_on_the_next(cluster: Cluster, tmp_path: Path) -> None:
    batch_id = "R-DEADFIRST"
    _open_batch(cluster, batch_id, 3)
    server = f"{_dead_endpoint()},{cluster.replicas.endpoints}"
    fetched = kms("station", "fetch", "--station-config", str(cluster.home.station_config(STATION)), "--server",
                  server, "--batch-id", batch_id, "--out", str(tmp_path / "bundles"), "--json")
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout)["fetched"] == 3 and "retry" not in fetched.stderr  # no call went to the dead one
    shown = kms("batch", "show", "--client", str(cluster.home.client_config(ALICE)), "--server", server,
                "--batch-id", batch_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["batch_id"] == batch_id
    env_server = kms("batch", "show", "--client", str(cluster.home.client_config(ALICE)), "--batch-id", batch_id,
                     env={"KMS_SERVER": server})
    assert env_server.returncode == 0, env_server.stderr
    with Client(config.load_client(cluster.home.client_config(ERIN)), server=server) as erin:
        # its certificate could not be checked against the CRL: left out of the channel, not tried on every call
        assert erin.target.addresses == tuple(("127.0.0.1", r.port) for r in cluster.replicas.running)
        assert AuditClient(erin).head().size > 0


def test_a_malformed_server_list_is_one_line(cluster: Cluster) -> None:
    live = cluster.replicas.endpoints.split(",")[0]
    for server, reason in [(f"{live},", "an empty endpoint (two commas in a row, or one at an end)"),
                           (f"{live},{live}", f"{live} is listed twice"),
                           (f"{live},localhost", "'localhost' has no port (host:port)")]:
        result = kms("batch", "show", "--client", str(cluster.home.client_config(ALICE)), "--server", server,
                     "--batch-id", "x", env={"KMS_SERVER": ""})
        assert result.returncode == 2
        assert result.stderr.splitlines()[-1] == f"kms batch show: error: argument --server: {reason}"


def test_a_replica_restarted_on_its_address_is_balanced_to_again(cluster: Cluster) -> None:
    """After the failover test one replica is gone: started again on its ports, a client listing both endpoints
    (as the station's configuration would) uses it again."""
    batch_id = "R-RESTART"
    _open_batch(cluster, batch_id, 1)
    gone = [r for r in cluster.replicas.replicas if r.process.poll() is not None]
    if not gone:  # this test run alone
        gone = [cluster.replicas.running[1]]
        cluster.replicas.kill(gone[0])
    back = cluster.replicas.restart(gone[0])
    assert (back.port, back.http) == (gone[0].port, gone[0].http)
    listed = ",".join(r.endpoint for r in cluster.replicas.running)
    with cluster.station(listed) as station:
        for _ in range(20):
            station.batch_status(batch_id)
    assert back.sample("kms_requests_total", "GetBatchStatus") >= 5  # a fresh process: all of these are its own


def test_a_replica_down_when_the_client_started_is_used_once_it_is_back(cluster: Cluster) -> None:
    """A rolling restart under a running fetch: the station's client starts while one replica is down (with a CRL its
    address is left out, its certificate unchecked), that replica comes back, then the one serving the stream is
    lost: after the UNAVAILABLE the client checks the endpoints again and the stream completes on the one back."""
    for gone in [r for r in cluster.replicas.replicas if r.process.poll() is not None][:2 - len(
            cluster.replicas.running)]:  # after the other tests (or alone): two replicas running
        cluster.replicas.restart(gone)
    first, second = cluster.replicas.running[:2]
    listed = f"{first.endpoint},{second.endpoint}"
    batch_id = "R-ROLLING"
    card_refs = _open_batch(cluster, batch_id, 160)
    assert cluster.replicas.kill(second) == -9
    received: list[pb.SealedBundle] = []
    retries: list[Retrying] = []
    with cluster.station(listed) as station:
        assert station.target.addresses == (("127.0.0.1", first.port),)  # the one up at start
        back = cluster.replicas.restart(second)  # back on its address while the client keeps its channel
        for bundle in station.stream_batch(batch_id, per_message=1, on_retry=retries.append,
                                           backoff=Backoff(retries=4, first=0.2, most=1.0)):
            received.append(bundle)
            if len(received) == 4:  # mid-stream: the replica serving it (the only one in the channel) is lost
                assert cluster.replicas.kill(first) == -9
        assert station.target.addresses == (("127.0.0.1", back.port),)  # checked again, then used
    assert retries and all(r.cursor for r in retries), retries  # it did break, and resumed from its cursor
    assert [b.card_ref for b in received] == card_refs  # each card once, in order, none lost
