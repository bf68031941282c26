"""Domain worker services end to end: `kms worker` for each domain and the audit signer as real processes on real
Unix sockets, over the development home's SoftHSM2 tokens, and `kms serve` (in this process) reaching them with a
configuration that holds no PIN (kms.dev.workers.split_home). Same OS user for all of them; the OS-user separation
has its own test."""

from __future__ import annotations

import grp
import os
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import ROOT, card, open_batch, run_ceremony, service_client

from kms import config
from kms.audit.verify import verify
from kms.client.audit import AuditClient
from kms.client.ceremony import CeremonyClient
from kms.dev.home import Home
from kms.dev.workers import WorkerLayout, split_home
from kms.errors import ConfigError, Unavailable
from kms.identity import Principal
from kms.issuance.workers import Job
from kms.registry import KeyKind
from kms.server.serve import Service
from kms.station import Station
from kms.v1 import worker_pb2 as pb

ALICE = Principal("officer", "alice", domain="hrss")
CAROL = Principal("officer", "carol", domain="bank")
ERIN = Principal("auditor", "erin")


class Workers:
    """The worker services of a split home, each a `kms worker` process."""

    def __init__(self, layout: WorkerLayout, logs: Path) -> None:
        self.layout = layout
        self.logs = logs  # each service's stderr (a pipe nobody reads could fill up and stop it)
        self.processes: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str) -> subprocess.Popen[str]:
        log = self.logs / f"{name}.log"
        with log.open("a") as stderr:
            process = subprocess.Popen([sys.executable, "-m", "kms.cli", *self.layout.command(name)], cwd=ROOT,
                                       stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line == f"kms: worker {name} serving on {self.layout.sockets[name]}\n", (line, log.read_text())
        self.processes[name] = process
        return process

    def socket(self, name: str) -> Path:
        return Path(self.layout.sockets[name][len("unix:"):])

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int:
        process = self.processes.pop(name)
        process.send_signal(sig)
        code = process.wait(timeout=120)
        assert process.stdout is not None
        process.stdout.close()
        return code


@pytest.fixture(scope="module")
def sockets() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kmsw-", dir="/tmp"))  # short: a socket path has at most 107 bytes
    yield path
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if not child.is_dir() else child.rmdir()
    path.rmdir()


@pytest.fixture(scope="module")
def workers(home: Home, sockets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    running = Workers(split_home(home.config, sockets), tmp_path_factory.mktemp("worker-logs"))
    for name in ("hrss", "bank", "audit"):
        running.start(name)
    yield running
    for name in list(running.processes):
        running.stop(name)


@pytest.fixture(scope="module")
def remote(workers: Workers) -> Iterator[Service]:
    """`kms serve` over the worker services, from the front end's configuration (no PIN)."""
    svc = Service(workers.layout.front, listen="127.0.0.1:0", health_listen=None, health_interval=3600)
    yield svc
    svc.stop(grace=0)


def _cards(n: int, start: int) -> list:
    return [card(start + i, card_ref=f"wrk-{start + i:06d}") for i in range(n)]


def test_the_front_end_configuration_holds_no_pin_and_spawns_nothing(workers: Workers, remote: Service) -> None:
    front = config.load(workers.layout.front)
    assert all(d.pin is None for d in front.domains.values()) and front.audit is not None and front.audit.pin is None
    assert set(front.workers) == {"hrss", "bank", "audit"}
    assert "pin" not in workers.layout.front.read_text()
    assert remote.child_pids() == []  # no worker or signer process of its own
    for name, path in workers.layout.workers.items():  # each worker's configuration: its own PIN only
        own = config.load(path)
        assert (set(own.domains) == ({name} if name != "audit" else set())) and own.worker is not None


def test_issuance_end_to_end_through_worker_services(home: Home, remote: Service, station: Station) -> None:
    batch = f"B-{secrets.token_hex(4)}"
    with service_client(home, remote, ALICE) as alice:  # CreateBatch: the bank worker service protects the PANs
        open_batch(home, remote.port, alice, batch, "bureau-a", "dual-app-v1", _cards(70, 100_000))
    with service_client(home, remote, "station-a1") as st:
        bundles = list(st.stream_batch(batch, per_message=8))
        assert st.batch_status(batch).issued == 70
    assert [b.card_ref for b in bundles] == [f"wrk-{100_000 + i:06d}" for i in range(70)]
    for b in bundles:
        report = station.open(b.data)
        assert report.ok and len(report.keys) == 15 and report.card_ref == b.card_ref


def test_ceremony_key_operations_run_in_the_worker_services(home: Home, remote: Service) -> None:
    name = f"wrk-mk-{secrets.token_hex(3)}"
    done = run_ceremony(home, remote.port, "bank", "generate-master-key", {"name": name, "algorithm": "AES256"})
    assert done.state == "executed", done.error
    assert remote.issuance.registry.active("bank", KeyKind.MASTER, name).kcv
    with service_client(home, remote, CAROL) as carol:  # the minutes, signed by the bank worker service
        minutes = CeremonyClient(carol).minutes(done.ceremony_id)
    signing = remote.issuance.registry.active("bank", KeyKind.SIGNING, "issuance")
    assert signing.public_key is not None
    public = serialization.load_der_public_key(signing.public_key)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(minutes.signature, minutes.document, ec.ECDSA(hashes.SHA256()))


def test_the_audit_export_is_sealed_by_the_audit_worker_service(home: Home, remote: Service) -> None:
    with service_client(home, remote, ERIN) as erin:
        lines = [line for chunk in AuditClient(erin).export() for line in chunk]
    public = serialization.load_pem_public_key((home.path / "audit" / "audit-v1.pem").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    verdict = verify(lines, public)
    assert verdict.ok, verdict


def test_the_socket_is_0660_in_a_directory_of_its_own(workers: Workers) -> None:
    for name in ("hrss", "bank", "audit"):
        path = workers.socket(name)
        info = path.stat()
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660, oct(info.st_mode)
        assert info.st_uid == os.geteuid()
        directory = path.parent.stat()
        assert stat.S_IMODE(directory.st_mode) == 0o750 and directory.st_uid == os.geteuid()


def _stub(workers: Workers, name: str) -> tuple[grpc.Channel, grpc.UnaryUnaryMultiCallable]:
    channel = grpc.insecure_channel(workers.layout.sockets[name])
    return channel, channel.unary_unary("/kms.v1.DomainWorker/KeyOperation")


def test_garbage_and_unknown_operations_are_refused_invalid_argument(workers: Workers) -> None:
    channel = grpc.insecure_channel(workers.layout.sockets["hrss"])
    with channel:
        raw = channel.unary_unary("/kms.v1.DomainWorker/KeyOperation")
        cases = {
            b"\xff\xff\xff\xff": "request: cannot be parsed",  # not a message at all
            b"": "operation: must be one of check_component, sign, ",  # no operation
            b"\xfa\x06\x03abc": "operation: must be one of ",  # field 95: an operation this worker does not know
            pb.KeyOperationRequest(sign=pb.SignDocument(label="kms/hrss/signing/issuance/v1", message=b"x"))
            .SerializeToString(): "message: is not the minutes of a hrss ceremony",  # sections are not signed
            pb.KeyOperationRequest(sign=pb.SignDocument(label="kms/bank/signing/issuance/v1", message=b"{}"))
            .SerializeToString(): "label: must be a hrss signing key",
            pb.KeyOperationRequest(destroy_key=pb.KeyRef(kind="rootkit", name="x", version=1))
            .SerializeToString(): "kind: must be one of ",
        }
        for request, message in cases.items():
            with pytest.raises(grpc.RpcError) as raised:
                raw(request, timeout=30)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, raised.value)
            assert raised.value.details().startswith(message), (request, raised.value.details())
        seal = channel.unary_unary("/kms.v1.DomainWorker/SealChunk")
        bad = pb.SealChunkRequest(batch="B-1", bureau="bureau-a", profile="dual-app-v1", jobs=[
            pb.Job(serial="S-1", card=pb.CardFields(card_ref="../../etc"))])
        with pytest.raises(grpc.RpcError) as raised:
            seal(bad.SerializeToString(), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith("card_ref: ")
        with pytest.raises(grpc.RpcError) as raised:  # no method by any other name
            channel.unary_unary("/kms.v1.DomainWorker/Run")(b"", timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_killed_worker_service_is_unavailable_then_back(home: Home, workers: Workers, remote: Service) -> None:
    batch = f"B-{secrets.token_hex(4)}"
    with service_client(home, remote, ALICE) as alice:
        open_batch(home, remote.port, alice, batch, "bureau-a", "dual-app-v1", _cards(10, 110_000))
    assert remote.health.check_now() == {}
    workers.stop("hrss", signal.SIGKILL)  # its worker processes end with it (kms.processes)
    failing = remote.health.check_now()
    assert failing == {"hsm.hrss": "the worker service cannot be reached"}, failing
    ready, _, services = remote.health.status()
    assert not ready and services["kms.v1.IssuanceService"] == services["kms.v1.CeremonyService"] == "NOT_SERVING"
    assert services["kms.v1.CardService"] == services["kms.v1.AuditService"] == "SERVING"  # they need no hrss token
    with service_client(home, remote, "station-a1") as st, pytest.raises(Unavailable):
        list(st.stream_batch(batch, retries=0))
    with pytest.raises(Unavailable, match="the hrss worker service is unavailable"):
        list(remote.pools.pools["hrss"].seal([Job(card(1), "S-1")], batch, "bureau-a", "dual-app-v1"))
    workers.start("hrss")  # the socket its predecessor left is found stale and replaced
    assert remote.health.check_now() == {}
    assert remote.health.status()[0]
    with service_client(home, remote, "station-a1") as st:
        assert len(list(st.stream_batch(batch))) == 10


def test_the_front_end_stops_its_start_when_a_worker_service_does_not_answer(home: Home, sockets: Path) -> None:
    doc = yaml.safe_load((home.path / "front.yaml").read_text())
    doc["workers"]["bank"] = f"unix:{sockets / 'nobody' / 'worker.sock'}"
    path = home.path / "front-nobody.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"workers\.bank unix:.*/nobody/worker\.sock: the worker service does not "
                                          "answer"):
        Service(path, listen="127.0.0.1:0", health_listen=None)


def _worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kms.cli", "worker", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_a_worker_refuses_to_start_on_a_wrong_pin_or_an_open_socket_directory(workers: Workers, tmp_path: Path,
                                                                               sockets: Path) -> None:
    doc = yaml.safe_load(workers.layout.workers["bank"].read_text())
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("000000\n")
    doc["domains"]["bank"]["pin"] = f"file:{wrong}"
    path = workers.layout.workers["bank"].with_name("worker-bank-wrong.yaml")
    path.write_text(yaml.safe_dump(doc))
    listen = f"unix:{sockets / 'wrong' / 'w.sock'}"
    done = _worker("--domain", "bank", "--config", str(path), "--listen", listen)
    assert done.returncode == 6 and done.stdout == "", done.stderr
    assert done.stderr.strip().splitlines()[-1] == "kms: error: domains.bank.pin: the token kms-bank refused the PIN"
    assert not (sockets / "wrong" / "w.sock").exists()

    open_dir = sockets / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    done = _worker("--domain", "hrss", "--config", str(workers.layout.workers["hrss"]), "--listen",
                   f"unix:{open_dir / 'w.sock'}")
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(f"{open_dir} is writable by every user; give the socket a "
                                                         "directory of its own")
    done = _worker("--domain", "hrss", "--config", str(workers.layout.workers["hrss"]))  # its socket is taken
    assert done.returncode == 3 and "another process listens there" in done.stderr, done.stderr
    done = _worker("--domain", "bank", "--config", str(workers.layout.front))  # the front end's: no PIN
    assert done.returncode == 3 and "domains.bank.pin is not set" in done.stderr, done.stderr


def test_the_socket_is_given_to_the_socket_group(workers: Workers, sockets: Path) -> None:
    doc = yaml.safe_load(workers.layout.workers["hrss"].read_text())
    doc["worker"] = {"listen": f"unix:{sockets / 'grouped' / 'w.sock'}", "socket_group": "kms-no-such-group"}
    path = workers.layout.workers["hrss"].with_name("worker-hrss-grouped.yaml")
    path.write_text(yaml.safe_dump(doc))
    done = _worker("--domain", "hrss", "--config", str(path))
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "kms: error: worker.socket_group: no group named 'kms-no-such-group'"
    doc["worker"]["socket_group"] = grp.getgrgid(os.getegid()).gr_name
    path.write_text(yaml.safe_dump(doc))
    grouped = Workers(WorkerLayout(workers.layout.front, {"hrss": path}, {"hrss": doc["worker"]["listen"]}),
                      workers.logs)
    grouped.start("hrss")
    try:
        info = (sockets / "grouped" / "w.sock").stat()
        assert info.st_gid == os.getegid() and stat.S_IMODE(info.st_mode) == 0o660
    finally:
        assert grouped.stop("hrss") == 0


def test_sigterm_drains_and_removes_the_socket(workers: Workers) -> None:
    socket = workers.socket("audit")
    assert workers.stop("audit") == 0
    assert not socket.exists()
    workers.start("audit")
