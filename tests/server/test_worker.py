"""Domain worker services end to end: `kms worker` for each domain and the audit signer as real processes on real
Unix sockets, over the development home's SoftHSM2 tokens, and `kms serve` (in this process) reaching them with a
configuration that holds no PIN (kms.dev.workers.split_home). Same OS user for all of them; the OS-user separation
has its own test."""

from __future__ import annotations

import grp
import json
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
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from helpers import ROOT, card, client, key, officer, open_batch, run_ceremony, service_client

from kms import bundle, config, store
from kms.audit.verify import verify
from kms.canonical import canonical
from kms.ceremony import components
from kms.ceremony.officers import OfficerStore, public_pem
from kms.ceremony.rules import MINUTES_FORMAT, QuorumPolicy, approval_message
from kms.ceremony.store import Ceremonies
from kms.client.audit import AuditClient
from kms.client.ceremony import CeremonyClient
from kms.clock import SystemClock
from kms.dev.home import Home
from kms.dev.workers import WorkerLayout, split_home
from kms.errors import ConfigError, InvalidArgument, Unavailable
from kms.hsm.session import TokenSession
from kms.hsm.types import Algorithm
from kms.identity import Principal
from kms.issuance.workers import Job
from kms.registry import KeyKind
from kms.server.serve import Service
from kms.station import Station, accept_transport_key, new_unwrap_key
from kms.v1 import worker_pb2 as pb

ALICE, BOB, CHEN = (officer("hrss", i) for i in range(3))
CAROL = officer("bank", 0)
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


def test_a_signing_key_is_made_and_destroyed_in_the_worker_service(home: Home, remote: Service) -> None:
    """generate-signing-key through the bank worker service (its own check of the ceremony, the key pair in its
    token, the public key back to the front end), then destroy-key of that pending version; SM2 is refused when
    proposed, the worker service finding that the standard token does not offer it."""
    registry = remote.issuance.registry
    active = registry.active("bank", KeyKind.SIGNING, "issuance")
    made = run_ceremony(home, remote.port, "bank", "generate-signing-key", {"name": "issuance"})
    assert made.state == "executed", made.error
    result = json.loads(made.result_json)
    record = registry.get("bank", KeyKind.SIGNING, "issuance", result["version"])
    assert record.public_key is not None and result["key_id"] == bundle.key_id(record.public_key)
    public = serialization.load_der_public_key(record.public_key)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    destroyed = run_ceremony(home, remote.port, "bank", "destroy-key",
                             {"kind": "signing", "name": "issuance", "version": result["version"]})
    assert destroyed.state == "executed", destroyed.error
    assert registry.active("bank", KeyKind.SIGNING, "issuance") == active  # the shared home's key signs on
    with service_client(home, remote, CAROL) as carol, pytest.raises(InvalidArgument) as caught:
        CeremonyClient(carol).propose("generate-signing-key", {"name": "issuance-sm2"})
    assert caught.value.field == "params.algorithm" and "does not offer sm2" in caught.value.reason


def test_an_import_ceremony_checks_and_joins_components_in_the_worker_service(home: Home, remote: Service) -> None:
    name = f"wrk-imp-{secrets.token_hex(3)}"
    parts = {who: bytearray(secrets.token_bytes(16)) for who in (BOB, CHEN)}
    expected = components.kcv(Algorithm.DES2, components.join(list(parts.values())))
    ceremony = run_ceremony(home, remote.port, "hrss", "import-master-key",
                            {"name": name, "kcv": expected, "custodians": ["bob", "chen"]}, execute=False)
    hrss = remote.pools.pools["hrss"]
    assert hrss.probe() is None
    restarts = hrss.restarts
    with client(home, remote.port, BOB) as c:
        bob = CeremonyClient(c)
        with pytest.raises(InvalidArgument) as wrong:  # decrypted and compared in the hrss worker service
            bob.submit_component(ceremony.ceremony_id, parts[BOB], components.kcv(Algorithm.DES2, parts[CHEN]))
        assert wrong.value.field == "kcv"
        bob.submit_component(ceremony.ceremony_id, parts[BOB], components.kcv(Algorithm.DES2, parts[BOB]))
    with client(home, remote.port, CHEN) as c:
        CeremonyClient(c).submit_component(ceremony.ceremony_id, parts[CHEN],
                                           components.kcv(Algorithm.DES2, parts[CHEN]))
    with client(home, remote.port, ALICE) as c:
        done = CeremonyClient(c).execute(ceremony.ceremony_id)
    assert done.state == "executed", done.error
    assert remote.issuance.registry.active("hrss", KeyKind.MASTER, name).kcv == expected
    assert hrss.probe() is None and hrss.restarts == restarts  # recycled after each component; none died


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


def test_a_killed_audit_worker_service_fails_the_audit_service_until_it_is_back(home: Home, workers: Workers,
                                                                                remote: Service) -> None:
    workers.stop("audit", signal.SIGKILL)
    assert remote.health.check_now() == {"audit-signer": "the worker service cannot be reached"}
    services = remote.health.status()[2]
    assert services["kms.v1.AuditService"] == "NOT_SERVING" and services["kms.v1.IssuanceService"] == "SERVING"
    assert remote.checkpointer is not None
    size = remote.audit.record("test.marker")  # a record no checkpoint covers yet
    with pytest.raises(Unavailable, match="the audit worker service is unavailable"):
        remote.checkpointer.checkpoint_now()
    workers.start("audit")
    assert remote.health.check_now() == {}
    signed = remote.checkpointer.checkpoint_now()  # signed by the audit worker service again
    assert signed is not None and signed.size >= size


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
    if os.geteuid() == 0:  # only root can give a directory to another user
        theirs = sockets / "theirs"
        theirs.mkdir(mode=0o750)
        os.chown(theirs, 65534, -1)
        done = _worker("--domain", "hrss", "--config", str(workers.layout.workers["hrss"]), "--listen",
                       f"unix:{theirs / 'w.sock'}")
        assert done.returncode == 3 and f"{theirs} is not owned by this worker's user" in done.stderr, done.stderr
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
        assert (sockets / "grouped").stat().st_gid == os.getegid()  # the directory it made: the front end's too
    finally:
        assert grouped.stop("hrss") == 0


def test_sigterm_drains_and_removes_the_socket(workers: Workers) -> None:
    socket = workers.socket("audit")
    assert workers.stop("audit") == 0
    assert not socket.exists()
    workers.start("audit")


# -- dual control in the worker service (kms.ceremony.binding) ------------------------------------------------------


def test_escrow_and_transport_ceremonies_run_through_the_worker_services(home: Home, remote: Service,
                                                                       station_session: TokenSession) -> None:
    name = f"wrk-esc-{secrets.token_hex(3)}"
    made = run_ceremony(home, remote.port, "hrss", "generate-master-key", {"name": name, "escrow": "yes"})
    assert made.state == "executed", made.error
    done = run_ceremony(home, remote.port, "hrss", "export-master-key",
                        {"name": name, "version": 1, "recipients": ["bob", "chen"]}, approvers=(1, 2))
    assert done.state == "executed", done.error
    parts = []
    for who in (BOB, CHEN):  # each component sealed to the approval key the worker trusts for that officer
        with client(home, remote.port, who) as c:
            parts.append(CeremonyClient(c).fetch_component(done.ceremony_id, key(home, who), who.uri())[0])
    kcv = components.kcv(Algorithm.DES2, components.join(parts))
    assert kcv == remote.issuance.registry.active("hrss", KeyKind.MASTER, name).kcv
    exported = run_ceremony(home, remote.port, "hrss", "register-transport-key",
                            {"bureau": "bureau-b", "method": "export-components", "recipients": ["bob", "chen"]})
    assert exported.state == "executed", exported.error  # create_key, then export_components of that version
    pem = new_unwrap_key(station_session, "station-a1", "hrss").pem  # the session-wide station-a1 session
    handed = run_ceremony(home, remote.port, "hrss", "register-transport-key",
                          {"bureau": "bureau-a", "station": "station-a1", "method": "rsa-oaep", "public_key": pem})
    assert handed.state == "executed", handed.error
    result = json.loads(handed.result_json)
    assert result["handed_to"] == "urn:kms:station:bureau-a:station-a1"
    with service_client(home, remote, "station-a1") as a1:  # the station takes it (as a bureau would)
        handoff = CeremonyClient(a1).fetch_transport_key("hrss")
        assert handoff.version == result["version"]
        kcv = accept_transport_key(station_session, "station-a1", "hrss", handoff.label, handoff.wrapped_key,
                                   handoff.kcv, unwrap_key_sha256=handoff.unwrap_key_sha256)
        CeremonyClient(a1).confirm_transport_key("hrss", handoff.version, kcv)


def _objects(home: Home) -> int:
    """The hrss token's object count, read in a process of its own: this test process may hold a logged-in session
    on that token already (another test's fixture), and SoftHSM refuses a second login in one process."""
    code = ("import sys; from pathlib import Path; from kms import config, runtime\n"
            "with runtime.open_domain(config.load(Path(sys.argv[1])), 'hrss') as session:\n"
            "    print(len(session.objects()))")
    done = subprocess.run([sys.executable, "-c", code, str(home.config)], capture_output=True, text=True,
                          timeout=120, check=True)
    return int(done.stdout.strip())


def _set_state(home: Home, ceremony_id: str, state: str) -> None:
    """What a taken-over front end can do: write the database (here: mark a ceremony as executing)."""
    engine = store.make_engine(config.load(home.config).database)
    try:
        with engine.begin() as conn:
            conn.execute(store.ceremonies.update().where(store.ceremonies.c.ceremony_id == ceremony_id)
                         .values(state=state))
    finally:
        engine.dispose()


def _denied(call: grpc.UnaryUnaryMultiCallable, request: pb.KeyOperationRequest, reason: str) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        call(request.SerializeToString(), timeout=60)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, raised.value.details()
    assert reason in raised.value.details(), raised.value.details()


def test_a_taken_over_front_end_cannot_change_keys_through_the_worker(home: Home, workers: Workers,
                                                                     remote: Service) -> None:
    name = f"wrk-own-{secrets.token_hex(3)}"
    assert run_ceremony(home, remote.port, "hrss", "generate-master-key",
                        {"name": name, "escrow": "yes"}).state == "executed"
    attacker = ec.generate_private_key(ec.SECP256R1())
    attacker_pem = public_pem(attacker.public_key())
    before = _objects(home)
    versions = len(remote.issuance.registry.versions("hrss", KeyKind.MASTER, name))
    channel, call = _stub(workers, "hrss")
    export = pb.ExportComponents(kind="master", name=name, version=1, ceremony_id="C-0000000000000000",
                                 recipients=[pb.Recipient(uri=BOB.uri(), public_key_pem=attacker_pem),
                                             pb.Recipient(uri=CHEN.uri(), public_key_pem=attacker_pem)])
    with channel:
        # No ceremony at all.
        _denied(call, pb.KeyOperationRequest(export_components=export), "must name the ceremony")
        _denied(call, pb.KeyOperationRequest(create_key=pb.CreateKey(kind="master", name="evil", algorithm="AES256")),
                "must name the ceremony")
        # A ceremony that does not exist, and one of the other domain.
        _denied(call, pb.KeyOperationRequest(export_components=export, ceremony_id="C-0000000000000000"),
                "no such ceremony")
        bank = run_ceremony(home, remote.port, "bank", "generate-master-key", {"name": f"{name}-b"}, execute=False)
        _set_state(home, bank.ceremony_id, "executing")
        _denied(call, pb.KeyOperationRequest(create_key=pb.CreateKey(
            kind="master", name=f"{name}-b", algorithm="DES2"), ceremony_id=bank.ceremony_id), "of the bank domain")
        # An export proposal with one approval of the two it needs, marked executing in the database.
        params = {"name": name, "version": 1, "recipients": ["bob", "chen"]}
        half = run_ceremony(home, remote.port, "hrss", "export-master-key", params, approvers=(1,), execute=False)
        request = pb.KeyOperationRequest(export_components=pb.ExportComponents(
            kind="master", name=name, version=1, ceremony_id=half.ceremony_id,
            recipients=[pb.Recipient(uri=BOB.uri(), public_key_pem=attacker_pem)]), ceremony_id=half.ceremony_id)
        _denied(call, request, "not executing")  # still open
        _set_state(home, half.ceremony_id, "executing")
        _denied(call, request, "1 of the 2 approvals")
        # An officer inserted into the database only (the front end can write it) approving: counts for nothing.
        mallory = Principal("officer", "mallory", domain="hrss")
        engine = store.make_engine(config.load(home.config).database)
        OfficerStore(engine, SystemClock()).enrol(mallory, ("approver", "key-custodian"), attacker_pem,
                                                  half.ceremony_id, cert_sha256="0" * 64)
        record = Ceremonies(engine, SystemClock(), QuorumPolicy.load(), OfficerStore(engine, SystemClock())).get(
            half.ceremony_id)
        signature = attacker.sign(approval_message(record.proposal), ec.ECDSA(hashes.SHA256()))
        with engine.begin() as conn:
            conn.execute(store.ceremony_approvals.insert().values(
                ceremony_id=half.ceremony_id, officer=mallory.uri(), signature=signature, at="2026-01-01T00:00:00Z"))
        try:
            _denied(call, request, "mallory")
        finally:  # the home is shared with other modules: mallory goes again
            with engine.begin() as conn:
                conn.execute(store.officers.delete().where(store.officers.c.principal == mallory.uri()))
            engine.dispose()
        # A properly approved export, executing, asked for with other recipients' keys: refused.
        full = run_ceremony(home, remote.port, "hrss", "export-master-key", params, execute=False)
        _set_state(home, full.ceremony_id, "executing")
        swapped = pb.ExportComponents(kind="master", name=name, version=1, ceremony_id=full.ceremony_id,
                                      recipients=[pb.Recipient(uri=BOB.uri(), public_key_pem=attacker_pem),
                                                  pb.Recipient(uri=CHEN.uri(), public_key_pem=attacker_pem)])
        _denied(call, pb.KeyOperationRequest(export_components=swapped, ceremony_id=full.ceremony_id),
                "recipients is not what the approved proposal says")
        # ... nor may that ceremony run another step (a transport key wrapped under the attacker's RSA key).
        spki = rsa.generate_private_key(65537, 2048).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        rogue = pb.KeyOperationRequest(transport_key_for_rsa=pb.TransportKeyForRsa(
            bureau="bureau-a", recipient_spki=spki), ceremony_id=full.ceremony_id)
        _denied(call, rogue, "export-master-key does not run transport_key_for_rsa")
        # A generate ceremony approved for one name, asked to make another; and an executed one replayed.
        gen = run_ceremony(home, remote.port, "hrss", "generate-master-key", {"name": f"{name}-g"}, execute=False)
        _set_state(home, gen.ceremony_id, "executing")
        _denied(call, pb.KeyOperationRequest(create_key=pb.CreateKey(
            kind="master", name=f"{name}-x", algorithm="DES2", activate=True), ceremony_id=gen.ceremony_id),
            "name is not what the approved proposal says")
        _denied(call, pb.KeyOperationRequest(destroy_key=pb.KeyRef(kind="master", name=name, version=1),
                                             ceremony_id=gen.ceremony_id), "does not run destroy_key")
        # The domain's signing key signs no section (its signed bytes are no JSON) and no minutes quoting an approval
        # by a key the worker does not trust (the front end could make those up).
        label = remote.issuance.registry.active("hrss", KeyKind.SIGNING, "issuance").label
        section = bundle.SIGNING_CONTEXT + canonical({"format": MINUTES_FORMAT, "domain": "hrss"})
        with pytest.raises(grpc.RpcError) as raised:
            call(pb.KeyOperationRequest(sign=pb.SignDocument(label=label, message=section)).SerializeToString(),
                 timeout=60)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        engine = store.make_engine(config.load(home.config).database)
        proposal = Ceremonies(engine, SystemClock(), QuorumPolicy.load(), OfficerStore(engine, SystemClock())).get(
            gen.ceremony_id)
        engine.dispose()
        forged = canonical({
            "format": MINUTES_FORMAT, "version": 1, "ceremony_id": gen.ceremony_id, "domain": "hrss",
            "operation": "generate-master-key", "proposal": proposal.encoding.decode(), "digest": proposal.digest,
            "approvals": [{"officer": who.uri(), "at": "2026-01-01T00:00:00Z", "public_key": attacker_pem,
                           "signature": attacker.sign(approval_message(proposal.proposal),
                                                      ec.ECDSA(hashes.SHA256())).hex()} for who in (BOB, CHEN)],
            "state": "executed", "result": {}})
        _denied(call, pb.KeyOperationRequest(sign=pb.SignDocument(label=label, message=forged)),
                "under a key this worker does not trust")
        _set_state(home, full.ceremony_id, "executed")
        _denied(call, pb.KeyOperationRequest(export_components=swapped, ceremony_id=full.ceremony_id),
                "executed, not executing")
    for made in (bank, half, gen):  # what the test left executing, closed
        _set_state(home, made.ceremony_id, "cancelled")
    assert _objects(home) == before  # nothing made, exported or destroyed in the token
    assert len(remote.issuance.registry.versions("hrss", KeyKind.MASTER, name)) == versions
    assert not remote.issuance.registry.versions("hrss", KeyKind.MASTER, f"{name}-x")
    log = (workers.logs / "hrss.log").read_text()
    assert "refused a key operation" in log and "mallory" in log
