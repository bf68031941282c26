"""Development only: the cluster run (`make cluster`, scripts/cluster.py): several `kms serve` replicas on one
PostgreSQL database, sharing the domain and audit worker services, under concurrent stations and faults; then the
invariants that say nothing was lost, doubled or forged.

``Cluster`` runs, in a run directory of its own (removed at the end unless kept):

- a development home whose records are in the database URL given (a PostgreSQL schema of the run's own: the caller
  makes and drops it), with one station per bureau ``bureau-a`` … ``bureau-e``; a second station of ``bureau-e``
  (``station-e2``) is registered by register-station ceremonies through the replicas;
- ``kms worker`` services for hrss, bank and the audit signer (kms.dev.workers.split_home), and ``replicas``
  ``kms serve`` processes (r1, r2, …) on fixed loopback ports, each with ``workers:`` naming those services;
- five batches: one per bureau a to d, each streamed by that bureau's station (``kms station fetch``, a process of its
  own) through one replica, and one of bureau-e streamed by both its stations at once through two other replicas;
  both domains authorize each batch by ceremony, and the hrss authorize-batch of bureau-e's batch is executed by
  two replicas racing (the proposer's Execute sent to the two other replicas than the one it was proposed on, at
  once);
- while the stations stream: the replica serving the most streams at that moment SIGKILLed and restarted on its
  port (its stations retry UNAVAILABLE and resume from their cursors; with clients that take several endpoints
  every station is given every replica, its own first, and fails over by itself), and then the bank worker
  service stopped and started again (every replica's bank calls fail UNAVAILABLE meanwhile; the streams resume).

Then the ``check_*`` functions read the records and the stations' files and report each invariant: every card
issued exactly once (one stored bundle, one ``issuance.issued`` record, its serial), none lost (every station has
every card of its batch), none delivered twice to a station (each fetch reports as many bundles as its batch has),
every bundle a station holds byte-identical to the stored one (so a redelivered one is the first delivery), the
pair's two copies identical; one gap-free audit chain exported through a replica (``kms audit export``) that
verifies offline (``kms audit verify``), with checkpoints from several replicas when the records name them; the
raced ceremony executed once (one answer executed, the other refused InvalidState); the faults hit a replica while it
served streams and made stations retry; every process started stopped, and none left behind (/proc: no process in
a session the run's services and stations lead). A failed invariant makes ``Report.ok`` false (scripts/cluster.py
exits 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kms import config as config_mod
from kms import store
from kms.audit.log import AuditLog
from kms.cards.cardid import CardIdentity, with_luhn_digit
from kms.client.ceremony import CeremonyClient
from kms.client.service import Client
from kms.clock import SystemClock
from kms.dev.ceremonies import certificate_pem, client, officer, run_ceremony
from kms.dev.home import AUDITORS, Home, init_home
from kms.dev.pki import DevPki
from kms.dev.services import process_tree, terminate
from kms.dev.workers import SERVICES, WorkerLayout, split_home
from kms.errors import KmsError
from kms.files import private_dir, write_private
from kms.identity import Principal
from kms.issuance.batches import BatchStore, CardState
from kms.registry import DOMAINS

PROFILE = "dual-app-v1"
#: One station per bureau from the home's genesis; bureau-e gets a second station by ceremony.
BUREAUS = {f"bureau-{x}": (f"station-{x}1",) for x in "abcde"}
PAIR_BUREAU, PAIR = "bureau-e", ("station-e1", "station-e2")
AUDITOR = Principal("auditor", AUDITORS[0])
STOP_SECONDS = 60
START_SECONDS = 120
PORT_ATTEMPTS = 3
RESTARTS = 3  # attempts to start a killed replica or a stopped worker service again
CHECKPOINT_RECORDS, CHECKPOINT_SECONDS = 200, 5
STREAMS_WAIT = 30.0  # how long the replicas may take to show a stream open (kms_streams_open) before one is killed


@dataclass(frozen=True)
class Stream:
    """A station streaming a batch through one replica."""

    station: str
    bureau: str
    batch: str
    replica: int  # index into the replicas


@dataclass
class Check:
    name: str
    ok: bool | None  # None: pending (what it needs is not there yet)
    detail: str

    def line(self) -> str:
        mark = {True: "ok     ", False: "FAILED ", None: "pending"}[self.ok]
        return f"  [{mark}] {self.name}: {self.detail}"


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, ok: bool | None, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    def event(self, text: str) -> None:
        self.events.append(text)
        print(f"cluster: {text}", flush=True)

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks) and bool(self.checks)

    def text(self) -> str:
        lines = ["invariants"] + [c.line() for c in self.checks]
        lines.append(f"result: {'OK' if self.ok else 'FAILED'} ({sum(c.ok is True for c in self.checks)} ok, "
                     f"{sum(c.ok is None for c in self.checks)} pending, "
                     f"{sum(c.ok is False for c in self.checks)} failed)")
        return "\n".join(lines)


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free now (all held at once while they are picked)."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def environment() -> dict[str, str]:
    """What the services get: this process's environment, unbuffered output, no .pyc files in the tree."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}


class Service:
    """One `kms` service process (a worker service or a replica): started, waited for its first stdout line, its
    stderr in ``log``; restartable with the same arguments."""

    def __init__(self, name: str, args: Sequence[str], log: Path, ready: str,
                 on_start: Callable[[int, str], None] | None = None) -> None:
        self.name, self.args, self.log, self.ready = name, list(args), log, ready
        self.on_start = on_start  # told each process started (its pid leads a session of its own)
        #: Held while a fault thread kills, stops or starts it, and by ``Cluster.close`` while stopping it.
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0
        self.codes: list[int] = []  # exit statuses of the runs that ended

    def start(self) -> None:
        with self.log.open("a", encoding="utf-8") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "kms.cli", *self.args], stdout=subprocess.PIPE,
                                         stderr=err, stdin=subprocess.DEVNULL, text=True, env=environment(),
                                         start_new_session=True)
        if self.on_start is not None:
            self.on_start(self.proc.pid, self.name)
        self.starts += 1
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout, START_SECONDS)
        if not line.startswith(self.ready):
            self.kill(record=False)  # a start that failed is not one of the runs the report counts
            raise KmsError(f"{self.name} did not start ({line.strip()!r}); its log: {self.log}\n{tail(self.log)}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self, record: bool = True) -> int:
        """SIGKILL (its whole tree: a killed replica leaves no worker of its own behind), then its status."""
        assert self.proc is not None
        for pid in reversed(process_tree(self.proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        code = self.proc.wait()
        if not record:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            return code
        return self._ended(code)

    def stop(self) -> int | None:
        """SIGTERM (it drains), SIGKILL after STOP_SECONDS; its exit status (None: not running)."""
        if self.proc is None or self.proc.returncode is not None:
            return None
        return self._ended(terminate(self.proc, STOP_SECONDS))

    def _ended(self, code: int) -> int:
        self.codes.append(code)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


def _readline(stream: Any, seconds: float) -> str:
    """The first line of a child's stdout, or "" after ``seconds``."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(seconds)
    return got[0] if got else ""


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def make_cards(batch: str, n: int) -> list[CardIdentity]:
    """``n`` cards of one batch, distinct from every other batch's (the batch's name is in the reference and seeds
    the numbers)."""
    seed = int.from_bytes(batch.encode()[-6:], "big")
    cards = []
    for i in range(n):
        v = (seed * 1_000_003 + i * 7_919) % 10**12
        cards.append(CardIdentity(card_ref=f"{batch}-{i:06d}", city_code="320200",
                                  card_serial=f"{(seed + i) % 16**16:016X}",
                                  pan=with_luhn_digit(f"621483{v:012d}"), psn=f"{i % 100:02d}",
                                  kdd=f"{(seed * 31 + i) % 16**20:020X}"))
    return cards


def several_endpoints_supported() -> bool:
    """Whether this kms's clients take several endpoints (``--server a,b,c``; the clients work of issue 13): then
    every station is given every replica, its own first, and fails over by itself."""
    return hasattr(config_mod, "endpoints")


def replica_names_supported() -> bool:
    """Whether this kms has ``server.replica`` (the replicas work of issue 13): then each replica is named."""
    return "replica" in {f.name for f in dataclasses.fields(config_mod.ServerConfig)}


class Cluster:
    """The run's home, worker services and replicas (see the module's docstring). ``start`` brings them up;
    ``close`` stops whatever runs (always call it)."""

    def __init__(self, run_dir: Path, database: str, *, replicas: int = 3, log: Callable[[str], None] = print,
                 session_log: Path | None = None) -> None:
        self.dir = run_dir
        #: The sessions of the processes the run started (each service and station leads one of its own; what they
        #: start stays in it, even re-parented to init): what ``leftovers`` looks for, and what ``kill_groups`` ends.
        self.sessions: set[int] = set()
        self.session_log = session_log  # each session id appended, one a line, as it starts (for a caller's check)
        #: Set by ``close`` before it stops anything; a fault thread kills, stops or starts a service only under
        #: that service's ``lock`` (which ``close`` takes to stop it) and only while this is not set, so nothing is
        #: started again once the run is being stopped. (A lock per service: one fault's restart, which can take a
        #: while, does not hold up the other fault.)
        self.stopping = threading.Event()
        self.faults: list[threading.Thread] = []
        self.database = database
        self.count = replicas
        self.log = log
        self.home: Home | None = None
        self.layout: WorkerLayout | None = None
        self.workers: dict[str, Service] = {}
        self.replicas: list[Service] = []
        self.ports: list[int] = []
        self.health_ports: list[int] = []
        self.sockets: Path | None = None

    # -- bringing it up ----------------------------------------------------------------------------------------

    def make_home(self) -> Home:
        started = time.perf_counter()
        self.home = init_home(self.dir / "home", bureaus=BUREAUS, database=self.database)
        self.log(f"development home in {time.perf_counter() - started:.0f} s: tokens for hrss, bank, the audit "
                 f"signer and {len(BUREAUS)} stations, records in PostgreSQL ({store.database_display(self.database)})")
        return self.home

    def start(self) -> None:
        home = self.home or self.make_home()
        logs = private_dir(self.dir / "logs")
        # Unix socket paths are short (at most 107 bytes): under /tmp, in a directory of the run's own.
        sockets = self.sockets = Path(tempfile.mkdtemp(prefix="kms-cluster-", dir="/tmp"))
        self.layout = split_home(home.config, sockets)
        for name in SERVICES:
            service = Service(f"worker {name}", self.layout.command(name), logs / f"worker-{name}.log",
                              f"kms: worker {name} serving on ", self.started)
            service.start()
            self.workers[name] = service
        named = replica_names_supported()
        front = yaml.safe_load(self.layout.front.read_text(encoding="utf-8"))
        ports = free_ports(2 * self.count)
        for i in range(self.count):
            doc = json.loads(json.dumps(front))
            if named:
                doc["server"]["replica"] = f"r{i + 1}"
            # Checkpoints often enough that each replica signs some in a short run.
            doc["audit"].update(checkpoint_records=CHECKPOINT_RECORDS, checkpoint_seconds=CHECKPOINT_SECONDS)
            path = home.path / f"replica-{i + 1}.yaml"
            write_private(path, yaml.safe_dump(doc, sort_keys=False))
            self.ports.append(ports[2 * i])
            self.health_ports.append(ports[2 * i + 1])
            self.replicas.append(Service(f"replica r{i + 1}", self._serve_args(path, i), logs / f"replica-{i + 1}.log",
                                         "kms: serving on port ", self.started))
        for i, r in enumerate(self.replicas):  # one after the other: the first one to start creates the schema
            for attempt in range(PORT_ATTEMPTS):
                try:
                    r.start()
                    break
                except KmsError:  # a port picked free was taken meanwhile by another process: other ports
                    if attempt == PORT_ATTEMPTS - 1 or "address already in use" not in tail(r.log, 3):
                        raise
                    self.ports[i], self.health_ports[i] = free_ports(2)
                    r.args = self._serve_args(home.path / f"replica-{i + 1}.yaml", i)
        self.log(f"worker services hrss, bank, audit on Unix sockets in {sockets}; {self.count} replicas of kms serve "
                 f"on 127.0.0.1:{', '.join(map(str, self.ports))} sharing them"
                 f"{' (server.replica r1..)' if named else ''}")

    def started(self, pid: int, name: str) -> None:
        """A process of the run started, in a session of its own (``pid``)."""
        self.sessions.add(pid)
        if self.session_log is not None:
            with self.session_log.open("a", encoding="utf-8") as out:
                out.write(f"{pid} {name}\n")

    def _serve_args(self, config: Path, i: int) -> list[str]:
        return ["serve", "--config", str(config), "--listen", f"127.0.0.1:{self.ports[i]}", "--health-listen",
                f"127.0.0.1:{self.health_ports[i]}"]

    def address(self, i: int) -> str:
        return f"localhost:{self.ports[i]}"

    def addresses(self, first: int) -> str:
        """Every replica's address, ``first``'s first (``--server`` for clients that take several)."""
        order = [first, *(i for i in range(self.count) if i != first)]
        return ",".join(self.address(i) for i in order)

    def metrics_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.health_ports[i]}/metrics"

    # -- stopping ----------------------------------------------------------------------------------------------

    def close(self) -> dict[str, int | None]:
        """The fault threads told to stop and waited for (bounded: a restart under way holds its service's lock, and
        stopping that service waits for it); then the replicas (they drain and sign the chain's end), then the worker
        services; exit statuses."""
        self.stopping.set()
        for t in self.faults:
            t.join(STOP_SECONDS)
        codes: dict[str, int | None] = {}
        for service in [*self.replicas, *reversed(list(self.workers.values()))]:
            with service.lock:
                if service.proc is not None and service.proc.poll() is None:
                    codes[service.name] = service.stop()
        if self.sockets is not None:
            shutil.rmtree(self.sockets, ignore_errors=True)
        return codes

    def kill_groups(self) -> list[int]:
        """The last resort, after ``close`` and the checks (or when they were interrupted: SIGTERM, an error):
        every process group the run started SIGKILLed; the groups that still had a process."""
        hit = []
        for group in sorted(self.sessions):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
                hit.append(group)
        return hit

    # -- clients -----------------------------------------------------------------------------------------------

    def client(self, who: Principal, replica: int) -> Client:
        assert self.home is not None
        return client(self.home, self.ports[replica], who)

    def ceremony(self, domain: str, operation: str, params: dict[str, Any], replica: int,
                 approvers: Sequence[int] = (1, 2), execute: bool = True) -> Any:
        assert self.home is not None
        return run_ceremony(self.home, self.ports[replica], domain, operation, params, approvers=approvers,
                            execute=execute)

    def add_station(self, bureau: str, station: str, like: str, replica: int) -> Path:
        """A second station of ``bureau``: its certificate from the development CA, its configuration (a copy of
        ``like``'s with its own name and certificate; it fetches bundles, it does not open them), and each domain's
        register-station ceremony."""
        assert self.home is not None
        who = Principal("station", station, bureau=bureau)
        cred = DevPki(self.home.path / "pki").client(who)
        source = self.home.station_config(like)
        path = self.home.station_config(station)
        private_dir(path.parent)
        doc = yaml.safe_load(source.read_text(encoding="utf-8"))
        doc["station"] = station
        doc["client"]["tls"]["cert"] = os.path.relpath(cred.cert, path.parent)
        doc["client"]["tls"]["key"] = os.path.relpath(cred.key, path.parent)
        write_private(path, yaml.safe_dump(doc, sort_keys=False))
        for domain in DOMAINS:
            self.ceremony(domain, "register-station", {"bureau": bureau, "station": station,
                                                       "certificate": certificate_pem(self.home, who)}, replica)
        return path

    def open_batch(self, batch: str, bureau: str, cards: list[CardIdentity], replica: int,
                   race: bool = False) -> dict[str, Any]:
        """CreateBatch, then each domain's authorize-batch; with ``race``, the hrss one is executed by two replicas
        at once (what came back from each)."""
        with self.client(officer("hrss", 0), replica) as c:
            c.create_batch(batch, bureau, PROFILE, cards)
        raced: dict[str, Any] = {}
        for domain in DOMAINS:
            if race and domain == "hrss":
                raced = self.race_execute(domain, batch, replica)
            else:
                self.ceremony(domain, "authorize-batch", {"batch_id": batch}, replica, approvers=(1,))
        return raced

    def race_execute(self, domain: str, batch: str, replica: int) -> dict[str, Any]:
        """authorize-batch proposed and approved through ``replica``, then Execute sent by its proposer to the next
        two replicas at the same moment; per replica what it answered."""
        ceremony = self.ceremony(domain, "authorize-batch", {"batch_id": batch}, replica, approvers=(1,),
                                 execute=False)
        racers = [(replica + 1) % self.count, (replica + 2) % self.count]
        clients = [self.client(officer(domain, 0), i) for i in racers]
        barrier = threading.Barrier(len(clients))
        answers: dict[str, str] = {}

        def execute(i: int, c: Client) -> None:
            try:
                with c:
                    barrier.wait(30)
                    done = CeremonyClient(c).execute(ceremony.ceremony_id)
                    answers[f"r{i + 1}"] = f"executed ({done.state})"
            except KmsError as error:
                answers[f"r{i + 1}"] = f"refused: {type(error).__name__}: {error}"

        threads = [threading.Thread(target=execute, args=(i, c)) for i, c in zip(racers, clients, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        with self.client(officer(domain, 0), replica) as c:
            state = CeremonyClient(c).get(ceremony.ceremony_id).state
        return {"ceremony": ceremony.ceremony_id, "answers": answers, "state": state}


# -- station processes ---------------------------------------------------------------------------------------------

class Fetch:
    """`kms station fetch` of one stream, a process of its own (no --open: the run is about issuance)."""

    def __init__(self, cluster: Cluster, stream: Stream, out: Path, log: Path) -> None:
        assert cluster.home is not None
        self.stream, self.out, self.log = stream, out, log
        self.config = cluster.home.station_config(stream.station)
        args = ["station", "fetch", "--station-config", str(self.config), "--batch-id", stream.batch,
                "--out", str(out), "--server", cluster.addresses(stream.replica) if several_endpoints_supported()
                else cluster.address(stream.replica), "--retries", "60",
                "--retry-for", "240", "--json"]
        with log.open("w", encoding="utf-8") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "kms.cli", *args], stdout=subprocess.PIPE,
                                         stderr=err, stdin=subprocess.DEVNULL, text=True, env=environment(),
                                         start_new_session=True)
        cluster.started(self.proc.pid, f"fetch {stream.station}")

    def received(self) -> int:
        try:
            return sum(1 for _ in self.out.glob("*.kmsb"))
        except OSError:
            return 0

    def wait(self, seconds: float) -> tuple[int, dict[str, Any]]:
        try:
            out, _ = self.proc.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        try:
            doc = json.loads(out) if out.strip() else {}
        except ValueError:
            doc = {}
        return self.proc.returncode, doc

    def retries(self) -> int:
        return sum(" retry " in line for line in tail(self.log, 10_000).splitlines())


# -- the run -------------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    cards: int = 1000  # per batch
    replicas: int = 3
    kill_at: float = 0.3  # a replica is killed once the stations together hold this share of what they receive
    worker_restart_at: float = 0.5  # the bank worker service restarts once the stations hold this share in all
    seconds: float = 900.0  # the streams' time limit (--small: scripts/cluster.py SMALL_SECONDS)


def streams(plan: Plan, stamp: str) -> list[Stream]:
    """Four stations on four batches (r1, r2, r3, r1), and the pair of bureau-e on one batch (r2 and r3)."""
    found = [Stream(f"station-{x}1", f"bureau-{x}", f"cl-{stamp}-{x}", i % plan.replicas)
             for i, x in enumerate("abcd")]
    pair_batch = f"cl-{stamp}-e"
    found += [Stream(s, PAIR_BUREAU, pair_batch, (1 + k) % plan.replicas) for k, s in enumerate(PAIR)]
    return found


def run(cluster: Cluster, plan: Plan, report: Report) -> dict[str, Any]:
    """Batches, ceremonies, the concurrent streams and the faults; what ``check`` needs."""
    assert cluster.home is not None
    stamp = time.strftime("%H%M%S", time.gmtime())
    plan_streams = streams(plan, stamp)
    cluster.add_station(PAIR_BUREAU, PAIR[1], PAIR[0], replica=0)
    report.event(f"{PAIR[1]} registered for {PAIR_BUREAU} by register-station ceremonies of both domains")
    batches: dict[str, tuple[str, list[CardIdentity]]] = {}
    for s in plan_streams:
        if s.batch not in batches:
            batches[s.batch] = (s.bureau, make_cards(s.batch, plan.cards))
    raced: dict[str, Any] = {}
    for i, (batch, (bureau, cards)) in enumerate(batches.items()):
        got = cluster.open_batch(batch, bureau, cards, replica=i % cluster.count, race=bureau == PAIR_BUREAU)
        raced = raced or got
    report.event(f"{len(batches)} batches of {plan.cards} cards created and authorized by both domains; the hrss "
                 f"authorize-batch {raced['ceremony']} executed by two replicas racing: "
                 + "; ".join(f"{k}: {v}" for k, v in sorted(raced["answers"].items())))
    out = private_dir(cluster.dir / "stations")
    logs = cluster.dir / "logs"
    fetches = [Fetch(cluster, s, out / f"{s.station}-{s.batch}", logs / f"fetch-{s.station}.log")
               for s in plan_streams]
    started = time.perf_counter()
    listed = " (each given every replica, this one first)" if several_endpoints_supported() else ""
    report.event(f"{len(fetches)} stations streaming at once{listed}: "
                 + ", ".join(f"{s.station} {s.batch} via r{s.replica + 1}" for s in plan_streams))
    faults = _faults(cluster, plan, fetches, report)
    results = [f.wait(max(1.0, plan.seconds - (time.perf_counter() - started))) for f in fetches]
    seconds = time.perf_counter() - started
    for t in faults:
        t.join(STOP_SECONDS)
    retries = {f.stream.station: f.retries() for f in fetches}
    report.event(f"streams ended in {seconds:.1f} s: "
                 + ", ".join(f"{f.stream.station} exit {code} ({doc.get('fetched', '?')} bundles, "
                             f"{retries[f.stream.station]} retries)"
                             for f, (code, doc) in zip(fetches, results, strict=True)))
    total = sum(len(c) for _, c in batches.values())
    report.figures["stream_seconds"] = round(seconds, 2)
    report.figures["cards"] = total
    report.figures["cards_per_second"] = round(total / seconds, 1)
    return {"batches": batches, "fetches": fetches, "results": results, "raced": raced, "retries": retries,
            "faults_done": not any(t.is_alive() for t in faults)}


def restart(cluster: Cluster, service: Service, report: Report) -> bool:
    """Start ``service`` again; a start that fails is tried again (RESTARTS times in all, as a supervisor such as
    systemd's Restart=on-failure would), each failure reported as an event and counted. Never once the cluster is
    stopping (checked under the service's lock, which ``close`` takes to stop it): whether it was started."""
    for attempt in range(1, RESTARTS + 1):
        with service.lock:
            if cluster.stopping.is_set():
                report.event(f"{service.name} not started again: the run is stopping")
                return False
            try:
                service.start()
                return True
            except KmsError as error:
                report.figures["failed_restarts"] = report.figures.get("failed_restarts", 0) + 1
                first = str(error).splitlines()[-1] if str(error).strip() else type(error).__name__
                report.event(f"{service.name} did not start again (attempt {attempt} of {RESTARTS}): {first}")
                if attempt == RESTARTS:
                    raise
        cluster.stopping.wait(2.0)
    return False


def _faults(cluster: Cluster, plan: Plan, fetches: list[Fetch], report: Report) -> list[threading.Thread]:
    """The faults, each in a thread of its own while the stations stream: once the stations together hold
    plan.kill_at of what they are to receive, the replica serving the most streams (its kms_streams_open; r1 first
    on a tie) is SIGKILLed and restarted on its port; the bank worker service is stopped and started again once the
    stations together hold plan.worker_restart_at, and not before that kill (a worker restart breaks every stream,
    and resumed streams may land anywhere).

    The victim is chosen by what each replica serves at that moment, not fixed: stations given every replica
    balance their calls (gRPC round robin), so the replica a station names first need not be the one serving its
    stream, and a fixed victim was found serving none."""
    expected = plan.cards * len(fetches)
    killed = threading.Event()  # set once the kill is done (or given up): the worker restart waits for it, not for
    # the replica's restart (a few seconds, in which a small run's streams could end)

    def running() -> bool:
        return any(f.proc.poll() is None for f in fetches)

    def held() -> int:
        return sum(f.received() for f in fetches)

    def kill_one() -> None:
        try:
            kill_one_now()
        finally:
            killed.set()

    def kill_one_now() -> None:
        while running() and held() < plan.kill_at * expected:
            if cluster.stopping.wait(0.02):
                return
        if not running():
            return
        # The victim must be serving a stream when it is killed: wait for some replica's kms_streams_open, bounded.
        deadline = time.monotonic() + STREAMS_WAIT
        serving = [streams_open(cluster.metrics_url(i)) for i in range(len(cluster.replicas))]
        while max(serving) <= 0 and running() and time.monotonic() < deadline and not cluster.stopping.wait(0.05):
            serving = [streams_open(cluster.metrics_url(i)) for i in range(len(cluster.replicas))]
        victim = serving.index(max(serving))
        name = f"r{victim + 1}"
        report.figures["killed_replica"] = victim
        report.figures["killed_streams_open"] = serving[victim]
        holding = held()
        with cluster.replicas[victim].lock:
            if cluster.stopping.is_set():
                return
            code = cluster.replicas[victim].kill()
        report.event(f"{name} SIGKILLed mid-stream (exit {code}; {serving[victim]:g} streams open on it, "
                     f"{', '.join(f'r{i + 1} {n:g}' for i, n in enumerate(serving))} in all; the stations held "
                     f"{holding} of {expected} bundles; theirs resume from their cursors"
                     + (" on another replica" if several_endpoints_supported() else " once it is back") + ")")
        report.figures["killed_mid_stream"] = serving[victim] > 0 and running()
        killed.set()
        if cluster.stopping.wait(1.0) or not restart(cluster, cluster.replicas[victim], report):
            return
        report.event(f"{name} restarted on port {cluster.ports[victim]}")

    def restart_bank() -> None:
        while not killed.is_set() and running():
            if cluster.stopping.wait(0.02):
                return
        while running() and sum(f.received() for f in fetches) < plan.worker_restart_at * expected:
            if cluster.stopping.wait(0.02):
                return
        if not running():
            return
        held = sum(f.received() for f in fetches)
        with cluster.workers["bank"].lock:
            if cluster.stopping.is_set():
                return
            code = cluster.workers["bank"].stop()
        report.event(f"bank worker service stopped mid-run (exit {code}; the stations held {held} of {expected} "
                     "bundles)")
        report.figures["worker_restart_mid_stream"] = running()
        if cluster.stopping.wait(1.0) or not restart(cluster, cluster.workers["bank"], report):
            return
        report.event("bank worker service started again on its socket; the replicas reconnect to it")

    def guarded(action: Callable[[], None]) -> Callable[[], None]:
        def run_it() -> None:
            try:
                action()
            except BaseException as error:  # reported as a failed invariant
                report.figures["fault_error"] = f"{type(error).__name__}: {error}"
                report.event(f"a fault could not be injected: {error}")
        return run_it

    threads = [threading.Thread(target=guarded(a), name=f"cluster-{a.__name__}") for a in (kill_one, restart_bank)]
    cluster.faults = threads
    for t in threads:
        t.start()
    return threads


def streams_open(url: str) -> float:
    """A replica's kms_streams_open (every method added up), from its /metrics; 0 when it does not answer."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urlopen(url, timeout=5) as answer:  # noqa: S310 - a loopback URL this run made
            text = answer.read().decode()
    except OSError:
        return 0.0
    return sum(float(sample.value) for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "kms_streams_open")


# -- the invariants ------------------------------------------------------------------------------------------------

def check_issuance(cluster: Cluster, done: dict[str, Any], report: Report) -> None:
    """Every card issued exactly once, none lost, every station's bundle the stored one, the pair's copies equal."""
    engine = store.make_engine(cluster.database)
    try:
        clock = SystemClock()
        audit = AuditLog(engine, clock)
        batches_store = BatchStore(engine, clock, audit)
        stored: dict[str, dict[str, tuple[str, bytes]]] = {}
        not_issued: list[str] = []
        for batch in done["batches"]:
            records, after = {}, -1
            while page := batches_store.cards_after(batch, after, 500):
                for r in page:
                    if r.state is CardState.ISSUED and r.bundle is not None and r.serial is not None:
                        records[r.card_ref] = (r.serial, r.bundle)
                    else:
                        not_issued.append(f"{batch}/{r.card_ref} {r.state.value}")
                after = page[-1].sequence
            stored[batch] = records
        total = sum(len(c) for _, c in done["batches"].values())
        issued = sum(len(r) for r in stored.values())
        issued_records: dict[str, list[str]] = {}
        redelivered = 0
        for rec in audit.records(kind="issuance"):
            body = json.loads(rec.body)
            if body["kind"] == "issuance.issued":
                issued_records.setdefault(body["subject"], []).append(body["detail"]["serial"])
            elif body["kind"] == "issuance.redelivered":
                redelivered += 1
    finally:
        engine.dispose()
    doubled = [s for s, serials in issued_records.items() if len(serials) != 1]
    wrong_serial = [f"{b}/{ref}" for b, recs in stored.items() for ref, (serial, _) in recs.items()
                    if issued_records.get(f"{b}/{ref}") != [serial]]
    stray = [s for s in issued_records if s.split("/", 1)[0] in done["batches"]
             and s.split("/", 1)[1] not in stored.get(s.split("/", 1)[0], {})]
    report.add("every card issued exactly once",
               issued == total and not not_issued and not doubled and not wrong_serial and not stray,
               f"{issued} of {total} cards issued, each with one stored bundle and one issuance.issued record "
               f"naming its serial" + _problems(not_issued=not_issued, doubled=doubled, wrong_serial=wrong_serial,
                                               stray=stray))
    lost, differ, received = [], [], 0
    for f, (code, _) in zip(done["fetches"], done["results"], strict=True):
        records = stored.get(f.stream.batch, {})
        refs = {c.card_ref for c in done["batches"][f.stream.batch][1]}
        for ref in sorted(refs):
            path = f.out / f"{ref}.kmsb"
            if not path.exists():
                lost.append(f"{f.stream.station}: {ref}")
                continue
            received += 1
            if ref in records and path.read_bytes() != records[ref][1]:
                differ.append(f"{f.stream.station}: {ref}")
        if code != 0:
            lost.append(f"{f.stream.station}: kms station fetch exit {code}: {tail(f.log, 2)}")
    report.add("none lost", not lost,
               f"{received} bundles received by {len(done['fetches'])} stations, every card of each station's batch"
               + _problems(lost=lost))
    # A bundle received twice overwrites the first file (atomically): only the count each fetch reports shows it.
    # A stream resumed after the last bundle received never sends one again to that station.
    twice = [f"{f.stream.station}: {doc.get('fetched', 'no report')} for {len(done['batches'][f.stream.batch][1])} "
             f"cards" for f, (_, doc) in zip(done["fetches"], done["results"], strict=True)
             if doc.get("fetched") != len(done["batches"][f.stream.batch][1])]
    report.add("no bundle delivered twice to a station", not twice,
               f"each of the {len(done['fetches'])} kms station fetch runs reports as many bundles fetched as its "
               "batch has cards (its resumed streams started after the last bundle received)"
               + _problems(miscounted=twice))
    pair = [f for f in done["fetches"] if f.stream.bureau == PAIR_BUREAU]
    pair_same = [ref for ref in sorted(stored.get(pair[0].stream.batch, {}))
                 if (pair[0].out / f"{ref}.kmsb").exists() and (pair[1].out / f"{ref}.kmsb").exists()
                 and (pair[0].out / f"{ref}.kmsb").read_bytes() == (pair[1].out / f"{ref}.kmsb").read_bytes()]
    pair_total = len(done["batches"][pair[0].stream.batch][1])
    report.add("a redelivered bundle is byte-identical to the first delivery",
               not differ and len(pair_same) == pair_total,
               f"every bundle each station holds equals the stored one; {PAIR[0]} and {PAIR[1]} of {PAIR_BUREAU} "
               f"hold identical bundles for {len(pair_same)} of {pair_total} cards of their shared batch; "
               f"{redelivered} issuance.redelivered records (a card sent again: to the other station of the pair, "
               f"or after a broken stream)" + _problems(differ=differ))


def check_audit(cluster: Cluster, report: Report) -> None:
    """One gap-free chain: an auditor's export through a replica, verified offline; checkpoints by several
    replicas when checkpoints name their replica."""
    assert cluster.home is not None
    export = cluster.dir / "audit-export.jsonl"
    export.unlink(missing_ok=True)
    auditor = cluster.home.client_config(AUDITOR)
    done = _kms(["audit", "export", "--client", str(auditor), "--server", cluster.address(1), "--out", str(export),
                 "--json"])
    if done.returncode != 0:
        report.add("one audit chain that verifies offline", False,
                   f"kms audit export exit {done.returncode}: {done.stderr.strip()[-300:]}")
        return
    verified = _kms(["audit", "verify", str(export), "--public-key",
                     str(cluster.home.path / "audit" / "audit-v1.pem"), "--json"])
    try:
        verdict = json.loads(verified.stdout)
    except ValueError:
        verdict = {"ok": False, "problem": verified.stderr.strip()}
    seqs, replicas, checkpoints = [], set(), 0
    with export.open(encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)
            if doc.get("type") == "record":
                seqs.append(int(doc["seq"]))
            elif doc.get("type") == "checkpoint":
                checkpoints += 1
                if doc.get("replica"):
                    replicas.add(doc["replica"])
    gap_free = seqs == list(range(1, len(seqs) + 1))
    report.add("one gap-free audit chain that verifies offline",
               verified.returncode == 0 and bool(verdict.get("ok")) and gap_free and checkpoints > 0,
               f"kms audit export via r2 + kms audit verify: {verdict.get('records')} records (seq 1.."
               f"{seqs[-1] if seqs else 0}, {'no gap' if gap_free else 'GAPS'}), {checkpoints} signed checkpoints, "
               f"{'verified' if verdict.get('ok') else 'NOT verified: ' + str(verdict.get('problem'))}")
    if replicas:
        report.add("checkpoints from several replicas", len(replicas) >= 2,
                   f"checkpoints signed by {', '.join(sorted(replicas))}")
    else:
        report.add("checkpoints from several replicas", None,
                   "the export's checkpoints name no replica: this kms has no audit_checkpoints.replica yet "
                   "(issue 13, replicas); the chain's checkpoints verify whoever signed them")
    report.figures["audit_records"] = verdict.get("records")
    report.figures["audit_checkpoints"] = checkpoints


def check_ceremony(cluster: Cluster, raced: dict[str, Any], report: Report) -> None:
    """The raced ceremony: both racers answered, one executed it and the other was refused InvalidState (it was
    executing or executed); it is executed, with one ceremony.executing and one ceremony.executed record."""
    engine = store.make_engine(cluster.database)
    try:
        kinds = [json.loads(r.body)["kind"] for r in AuditLog(engine, SystemClock()).records(kind="ceremony")
                 if json.loads(r.body)["subject"] == raced["ceremony"]]
    finally:
        engine.dispose()
    answers = list(raced["answers"].values())
    wins = [a for a in answers if a.startswith("executed")]
    refused = [a for a in answers if a.startswith("refused: InvalidState")]
    executed, executing = kinds.count("ceremony.executed"), kinds.count("ceremony.executing")
    report.add("the raced ceremony executed once",
               raced["state"] == "executed" and len(answers) == 2 and len(wins) == 1 and len(refused) == 1
               and executed == 1 and executing == 1,
               f"{raced['ceremony']} is {raced['state']}; "
               + "; ".join(f"{k}: {v}" for k, v in sorted(raced["answers"].items()))
               + f"; {executing} ceremony.executing and {executed} ceremony.executed records"
               + ("" if len(answers) == 2 else f"; PROBLEMS: {2 - len(answers)} racer(s) gave no answer"))


def check_faults(done: dict[str, Any], report: Report) -> None:
    """A replica killed while serving streams (its kms_streams_open > 0) and restarted, the bank worker restarted
    while stations streamed, and some station's stream broke and was retried."""
    f = report.figures
    victim = f"r{f['killed_replica'] + 1}" if "killed_replica" in f else "a replica"
    retried = sum(done["retries"].values())
    report.add("faults injected mid-stream",
               bool(f.get("killed_mid_stream")) and bool(f.get("worker_restart_mid_stream")) and done["faults_done"]
               and "fault_error" not in f and retried > 0,
               f"{victim} SIGKILLed while it served {f.get('killed_streams_open', 0):g} streams, and restarted; "
               f"the bank worker service restarted while stations streamed; {retried} retries logged by the stations"
               + (f"; {f['fault_error']}" if "fault_error" in f else "")
               + (f"; {f['failed_restarts']} start(s) failed and were tried again" if f.get("failed_restarts")
                  else "")
               + ("" if f.get("killed_mid_stream") else f"; {victim} was NOT killed mid-stream")
               + ("" if f.get("worker_restart_mid_stream") else "; the worker was NOT restarted mid-stream")
               + ("" if retried else "; NO station retried: no stream was broken"))


def check_stopped(cluster: Cluster, codes: dict[str, int | None], run_dir: Path, report: Report) -> None:
    """Every service ended with status 0 when stopped (the killed replica's first run: -9), nothing of the run
    still running."""
    bad = {name: code for name, code in codes.items() if code != 0}
    for worker in cluster.workers.values():  # a worker service stopped mid-run ends as cleanly
        bad.update({f"{worker.name} (run {i + 1})": code for i, code in enumerate(worker.codes[:-1]) if code != 0})
    victim = report.figures.get("killed_replica", 0)
    killed = cluster.replicas[victim].codes[:1] if cluster.replicas else []
    left = leftovers(cluster.sessions, descendants=True)
    logs = sorted((run_dir / "logs").glob("*.log"))
    texts = {p.name: p.read_text(encoding="utf-8", errors="replace") for p in logs if not p.name.startswith("fetch-")}
    tracebacks = [name for name, text in texts.items() if "Traceback" in text]
    failed = {name: text.count("checkpoint failed") for name, text in texts.items() if "checkpoint failed" in text}
    warnings = sum(text.count(" WARNING ") for text in texts.values())
    report.add("no process left behind",
               not bad and not left and killed == [-signal.SIGKILL],
               f"{len(codes)} services stopped by SIGTERM, each exit 0; r{victim + 1}'s first run ended by SIGKILL "
               f"({killed[0] if killed else 'not killed'}); no process of the run left in /proc"
               + _problems(exit=[f"{k} {v}" for k, v in bad.items()], left=left))
    report.add("services' logs hold no traceback", not tracebacks,
               f"{len(texts)} service logs read; {warnings} warnings (a killed replica's and a stopped worker's "
               f"callers log theirs); failed checkpoint attempts: "
               f"{', '.join(f'{k} {v}' for k, v in failed.items()) or 'none'}" + _problems(tracebacks=tracebacks))


def _stat(pid: int | str) -> tuple[str, int, int] | None:
    """A process's state, parent and session id (/proc/<pid>/stat), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[3])


def ancestors(pid: int | None = None) -> set[int]:
    """``pid`` (default: this process) and the processes it descends from (make, timeout, /usr/bin/time, sh -c,
    pytest …)."""
    found: set[int] = set()
    current = os.getpid() if pid is None else pid
    while current > 0 and current not in found:
        found.add(current)
        stat = _stat(current)
        if stat is None:
            break
        current = stat[1]
    return found


def leftovers(sessions: Collection[int], *, descendants: bool = False) -> list[str]:
    """Processes still running that belong to the run: any in one of ``sessions`` (each service and station the
    run started leads a session of its own, and what it starts stays in it even when re-parented to init), and
    with ``descendants`` this process's own descendants; zombies too when this process or one of its descendants
    has not reaped them (not those re-parented to init, which are ended); never this process nor its ancestors
    (a ``make``, ``timeout`` or ``time`` that started it, whatever their command line names)."""
    skip = ancestors()
    mine = set(process_tree(os.getpid())) - skip if descendants else set()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        pid = int(entry.name)
        stat = _stat(pid)
        if stat is None or (stat[2] not in sessions and pid not in mine):
            continue
        if stat[0] == "Z" and stat[1] not in mine and stat[1] != os.getpid():
            continue  # ended, re-parented to init (or a subreaper) which has not reaped it yet: nothing left running
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if pid in mine and stat[2] not in sessions and "multiprocessing.resource_tracker" in cmd:
            continue  # this process's own (Python's, for the home's set-up processes): it ends with this process
        found.append(f"{pid} (zombie)" if stat[0] == "Z" else f"{pid} {cmd[:100] or f'(state {stat[0]}, exiting)'}")
    return found


def _problems(**named: list[str]) -> str:
    parts = [f"{name.replace('_', ' ')}: {', '.join(items[:5])}{' …' if len(items) > 5 else ''} ({len(items)})"
             for name, items in named.items() if items]
    return ("; PROBLEMS: " + "; ".join(parts)) if parts else ""


def _kms(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kms.cli", *args], capture_output=True, text=True, timeout=600,
                          check=False, env=environment())


def cluster_run(run_dir: Path, database: str, plan: Plan, report: Report, session_log: Path | None = None
                ) -> Report:
    """The whole run: home, services, streams and faults, the invariants (``report``). ``session_log``: where each
    session the run starts is appended (see ``Cluster``)."""
    cluster = Cluster(run_dir, database, replicas=plan.replicas, log=report.event, session_log=session_log)
    done: dict[str, Any] | None = None
    codes: dict[str, int | None] = {}
    try:
        try:
            cluster.start()
            done = run(cluster, plan, report)
            check_issuance(cluster, done, report)
            check_audit(cluster, report)
            check_ceremony(cluster, done["raced"], report)
            check_faults(done, report)
        except KmsError as error:
            report.add("the run", False, f"{type(error).__name__}: {error}")
        finally:  # also on SIGTERM (scripts/cluster.py makes it SystemExit) and Ctrl-C
            codes = cluster.close()
            if done is not None:
                for f in done["fetches"]:
                    if f.proc.poll() is None:
                        f.proc.kill()
                        f.proc.wait()
        check_stopped(cluster, codes, run_dir, report)
    finally:
        cluster.kill_groups()  # whatever is left (reported above when the run got that far)
    return report



# -- the contention figures (scripts/cluster.py --bench) -----------------------------------------------------------

BENCH_STATIONS = (("station-a1", "bureau-a"), ("station-b1", "bureau-b"), ("station-c1", "bureau-c"))
BENCH_WARMUP = 32
#: Sums read from each replica's /metrics before and after a timed side: HSM time (as the worker services report
#: it with their results), audit appends, the head row's lock, records appended.
SCRAPED = {"hsm": "kms_hsm_call_seconds_sum", "append": "kms_audit_append_seconds_sum",
           "head": "kms_audit_head_lock_seconds_sum", "appends": "kms_audit_append_seconds_count",
           "records": "kms_audit_records_appended_total"}


def scrape(url: str) -> dict[str, float]:
    """The SCRAPED sums of one replica's /metrics (every label set added up)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=30) as answer:  # noqa: S310 - a loopback URL this run made
        text = answer.read().decode()
    names = {v: k for k, v in SCRAPED.items()}
    found = dict.fromkeys(SCRAPED, 0.0)
    for domain in DOMAINS:
        found[f"hsm_{domain}"] = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                found[names[sample.name]] += float(sample.value)
                if sample.name == SCRAPED["hsm"] and sample.labels.get("domain") in DOMAINS:
                    found[f"hsm_{sample.labels['domain']}"] += float(sample.value)
    return found


@dataclass
class Side:
    """One timed side of the bench: ``replicas`` replicas serving the bench stations' batches at once."""

    replicas: int
    seconds: float
    cards: int
    records: int  # audit records appended meanwhile (the chain's head moved by this much)
    spent: dict[str, float]  # SCRAPED deltas, summed over the replicas

    @property
    def cards_per_second(self) -> float:
        return self.cards / self.seconds

    @property
    def appends_per_second(self) -> float:
        return self.records / self.seconds


def bench_side(cluster: Cluster, replicas: int, cards: int, tag: str) -> Side:
    """The bench stations' batches (``cards`` each; made and authorized first, not timed), streamed at once, station
    j through replica j mod ``replicas``; timed from the moment they all start until the last bundle."""
    batches = []
    for station, bureau in BENCH_STATIONS:
        batch = f"bn-{tag}-{bureau[-1]}"
        cluster.open_batch(batch, bureau, make_cards(batch, cards), replica=0)
        batches.append((station, batch))
    engine = store.make_engine(cluster.database)
    try:
        audit = AuditLog(engine, SystemClock())
        before = [scrape(cluster.metrics_url(i)) for i in range(cluster.count)]
        head_before = audit.head()[0]
        received, failures = stream_all(cluster, [(s, b, j % replicas) for j, (s, b) in enumerate(batches)])
        seconds = received.pop("seconds")
        head_after = audit.head()[0]
        after = [scrape(cluster.metrics_url(i)) for i in range(cluster.count)]
    finally:
        engine.dispose()
    if failures or sum(received.values()) != cards * len(batches):
        raise KmsError(f"bench side with {replicas} replicas: {sum(received.values())} of {cards * len(batches)} "
                       f"bundles received; {'; '.join(failures)}")
    spent = {k: sum(a[k] - b[k] for a, b in zip(after, before, strict=True)) for k in before[0]}
    return Side(replicas, seconds, cards * len(batches), head_after - head_before, spent)


def stream_all(cluster: Cluster, jobs: Sequence[tuple[str, str, int]]) -> tuple[dict[str, float], list[str]]:
    """Each (station, batch, replica) streamed in a thread of its own, all released together; bundles received per
    batch, and "seconds": from the release to the last bundle."""
    assert cluster.home is not None
    clients = []
    for station, _, replica in jobs:
        cfg = config_mod.load_station(cluster.home.station_config(station)).client
        assert cfg is not None
        clients.append(Client(cfg, server=cluster.address(replica), timeout=600))
    barrier = threading.Barrier(len(jobs) + 1)
    received: dict[str, float] = {}
    failures: list[str] = []

    def stream(c: Client, batch: str) -> None:
        n = 0
        try:
            barrier.wait(60)
            for _ in c.stream_batch(batch, per_message=32):
                n += 1
        except KmsError as error:
            failures.append(f"{batch}: {error}")
        received[batch] = n

    try:
        threads = [threading.Thread(target=stream, args=(c, batch)) for c, (_, batch, _) in zip(clients, jobs,
                                                                                                strict=True)]
        for t in threads:
            t.start()
        barrier.wait(60)
        started = time.perf_counter()
        for t in threads:
            t.join()
        received["seconds"] = time.perf_counter() - started
    finally:
        for c in clients:
            c.close()
    return received, failures


def append_rate(database: str, writers: int, records: int) -> tuple[float, float]:
    """Audit appends/s with ``writers`` processes appending at once to the chain (``records`` in all, one per
    transaction, as replicas' stores do), and the seconds spent taking the head row's lock, summed."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(writers, mp_context=ctx) as pool:
        go = manager.Event()
        ready = [manager.Event() for _ in range(writers)]
        futures = [pool.submit(_appender, database, records // writers, go, r) for r in ready]
        for r in ready:
            r.wait(120)
        started = time.perf_counter()
        go.set()
        head = sum(f.result() for f in futures)
        seconds = time.perf_counter() - started
    return (records // writers) * writers / seconds, head


def _appender(database: str, n: int, go: Any, ready: Any) -> float:
    """In a process of its own: ``n`` audit records, one per transaction, once ``go`` is set; the seconds taken
    locking the head row (kms_audit_head_lock_seconds of this process)."""
    from prometheus_client import REGISTRY

    engine = store.make_engine(database)
    audit = AuditLog(engine, SystemClock())
    audit.record("bench.warmup")
    base = REGISTRY.get_sample_value("kms_audit_head_lock_seconds_sum") or 0.0
    ready.set()
    go.wait(120)
    for i in range(n):
        audit.record("bench.append", subject=f"r-{os.getpid()}-{i}", detail={"i": i})
    engine.dispose()
    return float((REGISTRY.get_sample_value("kms_audit_head_lock_seconds_sum") or 0.0) - base)


def bench(run_dir: Path, database: str, *, rounds: int, cards: int, append_records: int,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """The contention figures: per round, the sides with 1, 2 and 3 replicas in a rotating order (so that drift
    hits them alike), then the audit append rate with 1, 2 and 3 writing processes. The figures, as JSON."""
    cluster = Cluster(run_dir, database, replicas=3, log=log)
    sides: dict[int, list[Side]] = {1: [], 2: [], 3: []}
    appends: dict[int, list[tuple[float, float]]] = {1: [], 2: [], 3: []}
    try:
        cluster.start()
        for i in range(cluster.count):  # each replica's channels and the workers warm before any timing
            bench_side_warmup(cluster, i)
        log(f"warmed up: each replica streamed a {BENCH_WARMUP}-card batch")
        for r in range(rounds):
            order = [1, 2, 3][r % 3:] + [1, 2, 3][:r % 3]
            for k in order:
                side = bench_side(cluster, k, cards, f"{r}{k}")
                sides[k].append(side)
                log(f"round {r + 1}, {k} replica{'s' * (k > 1)}: {side.cards_per_second:.1f} cards/s, "
                    f"{side.appends_per_second:.0f} audit records/s, head lock {side.spent['head']:.2f} s of "
                    f"{side.seconds:.1f} s")
            for k in order:
                rate, head = append_rate(database, k, append_records)
                appends[k].append((rate, head))
                log(f"round {r + 1}, {k} appending process{'es' * (k > 1)}: {rate:.0f} appends/s, head lock "
                    f"{head:.2f} s in all")
    finally:
        try:
            codes = cluster.close()
        finally:
            cluster.kill_groups()
    bad = {name: code for name, code in codes.items() if code != 0}
    if bad:
        raise KmsError(f"bench: services did not stop cleanly: {bad}")
    return bench_summary(sides, appends, cards)


def bench_side_warmup(cluster: Cluster, replica: int) -> None:
    station, bureau = BENCH_STATIONS[0]
    batch = f"bn-warm-{replica}"
    cluster.open_batch(batch, bureau, make_cards(batch, BENCH_WARMUP), replica=0)
    received, failures = stream_all(cluster, [(station, batch, replica)])
    if failures or received.get(batch) != BENCH_WARMUP:
        raise KmsError(f"bench warm-up through r{replica + 1}: {received}; {'; '.join(failures)}")


def bench_summary(sides: dict[int, list[Side]], appends: dict[int, list[tuple[float, float]]], cards: int
                  ) -> dict[str, Any]:
    import statistics

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 4)

    doc: dict[str, Any] = {"cards_per_side": cards * len(BENCH_STATIONS), "stations": len(BENCH_STATIONS),
                           "rounds": len(sides[1]), "replicas": {}}
    for k, runs in sides.items():
        per_card = {key: med([s.spent[key] / s.cards * 1000 for s in runs])
                    for key in ("hsm", "append", "head", *(f"hsm_{d}" for d in DOMAINS))}
        doc["replicas"][str(k)] = {
            "cards_per_second": med([s.cards_per_second for s in runs]),
            "cards_per_second_rounds": [round(s.cards_per_second, 2) for s in runs],
            "audit_records_per_second": med([s.appends_per_second for s in runs]),
            "ms_per_card": {"wall": med([s.seconds / s.cards * 1000 for s in runs]),
                            "hsm_busy": per_card["hsm"], "audit_append": per_card["append"],
                            "audit_head_lock": per_card["head"],
                            **{f"hsm_{d}": per_card[f"hsm_{d}"] for d in DOMAINS}},
            # The busier domain's worker process: the share of the wall time its HSM calls took (1.0: that worker,
            # shared by the replicas, is the bottleneck).
            "hsm_busiest_share": med([max(s.spent[f"hsm_{d}"] for d in DOMAINS) / s.seconds for s in runs]),
            "head_lock_share_of_append": med([s.spent["head"] / s.spent["append"] if s.spent["append"] else 0.0
                                              for s in runs]),
            "appends_per_second": med([a for a, _ in appends[k]]),
            "appends_per_second_rounds": [round(a, 1) for a, _ in appends[k]],
            "append_head_lock_seconds": med([h for _, h in appends[k]]),
        }
    ratios = [three.cards_per_second / one.cards_per_second for one, three in zip(sides[1], sides[3], strict=True)]
    append_ratios = [three[0] / one[0] for one, three in zip(appends[1], appends[3], strict=True)]
    doc["ratio_3_vs_1"] = {"cards": med(ratios), "cards_rounds": [round(r, 4) for r in ratios],
                           "appends": med(append_ratios), "goal": 0.9, "met": statistics.median(ratios) >= 0.9}
    return doc


def bench_table(doc: dict[str, Any]) -> str:
    """The figures as a short table (medians of the rounds)."""
    rows = ["| replicas | cards/s | audit records/s | per card: wall | HSM hrss + bank | busier worker busy "
            "| audit append | head lock wait | appends/s, k writers |", "|---|---|---|---|---|---|---|---|---|"]
    for k, f in doc["replicas"].items():
        ms = f["ms_per_card"]
        rows.append(f"| {k} | {f['cards_per_second']:.1f} | {f['audit_records_per_second']:.0f} | "
                    f"{ms['wall']:.1f} ms | {ms['hsm_hrss']:.1f} + {ms['hsm_bank']:.1f} ms | "
                    f"{f['hsm_busiest_share']:.0%} of the time | {ms['audit_append']:.2f} ms | "
                    f"{ms['audit_head_lock']:.2f} ms | {f['appends_per_second']:.0f} |")
    r = doc["ratio_3_vs_1"]
    rows.append(f"\n3 replicas / 1: {r['cards']:.1%} of the cards/s (per round: "
                f"{', '.join(f'{x:.1%}' for x in r['cards_rounds'])}; goal >= 90 %: "
                f"{'met' if r['met'] else 'NOT met'}); audit appends with 3 writers / 1: {r['appends']:.1%}")
    return "\n".join(rows)
