"""Development only: the services of a separated layout (kms.dev.separation) run, each as its own OS user (as root).

``SeparatedServices`` starts ``kms worker --domain hrss``, ``--domain bank`` and ``kms worker --audit``, each as its
component's user in its own directory, waits for each to say it listens, then ``kms serve`` as the front end's user
on a free loopback port; ``stop`` ends them in reverse order (SIGTERM, then the exit statuses). Their environment
is nothing of the caller's but where the PKCS#11 module and the code are: no PIN or secret can come through it.
``process_table`` is what actually ran: each service's processes from /proc with their uids, and what each user
can read as measured by ``kms.dev.separation.readability`` (and ``openbao_readability``). ``scripts/demo.py
--secrets openbao`` uses it.

``Replicas`` runs several ``kms serve`` processes of one configuration (one database), each on its own port: the
multi-endpoint client tests and the cluster run use it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kms.dev.separation import AUDIT, FRONT, SIGNERS, Layout, run_as
from kms.errors import ConfigError

STOP_SECONDS = 60
SERVE = "serve"


def terminate(proc: subprocess.Popen[str], timeout: float = STOP_SECONDS) -> int:
    """End a service this process started: SIGTERM if it still runs (it drains), SIGKILL after ``timeout`` seconds;
    its stdout pipe closed. Its exit status (-9: killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return code


def environment() -> dict[str, str]:
    """The services' whole environment: a PATH, a locale, and where the PKCS#11 module and the code are."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("KMS_PKCS11_MODULE", "PYTHONPATH"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


@dataclass(frozen=True)
class ProcessRow:
    """One service as it ran: its name, command, user, its main pid and every pid of its tree, and whether every
    one of them runs under that user (real, effective, saved and filesystem uid)."""

    component: str
    command: str
    user: str
    pid: int
    pids: tuple[int, ...]
    uids_match: bool


class SeparatedServices:
    """The three worker services and the front end of ``layout``, each as its user; logs (stderr) in ``logs``."""

    def __init__(self, layout: Layout, logs: Path) -> None:
        self.layout = layout
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.commands: dict[str, str] = {}
        self.port = 0

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def _start(self, component: str, *args: str) -> subprocess.Popen[str]:
        user = self.layout.users.of(component)
        with open(self.log(component), "w", encoding="utf-8") as err:
            proc = subprocess.Popen([sys.executable, "-m", "kms.cli", *args], cwd=self.layout.dir(component),
                                    env=environment(), text=True, stdout=subprocess.PIPE, stderr=err,
                                    stdin=subprocess.DEVNULL, **run_as(user))
        self.procs[component] = proc
        self.commands[component] = "kms " + " ".join(args[:args.index("--config")])
        return proc

    def _first_line(self, component: str) -> str:
        stdout = self.procs[component].stdout
        assert stdout is not None
        return stdout.readline().strip()

    def _tail(self, component: str) -> str:
        return self.log(component).read_text(encoding="utf-8", errors="replace").strip()[-500:]

    def start(self) -> int:
        """The workers, then the front end; returns the front end's port. ConfigError (a service's log tail) if one
        does not come up."""
        self.logs.mkdir(parents=True, exist_ok=True)
        for component in SIGNERS:
            which = ["--audit"] if component == AUDIT else ["--domain", component]
            self._start(component, "worker", *which, "--config", str(self.layout.worker_config(component)))
        for component in SIGNERS:
            line = self._first_line(component)
            if line != f"kms: worker {component} serving on unix:{self.layout.socket(component)}":
                raise ConfigError(f"the {component} worker service did not start ({line!r}): {self._tail(component)}")
        self._start(FRONT, SERVE, "--config", str(self.layout.front_config), "--listen", "127.0.0.1:0")
        line = self._first_line(FRONT)
        if not line.startswith("kms: serving on port "):
            raise ConfigError(f"kms serve did not start ({line!r}): {self._tail(FRONT)}")
        self.port = int(line.rsplit(" ", 1)[1])
        return self.port

    def stop(self) -> dict[str, int]:
        """SIGTERM to each service, front end first; their exit statuses (a service that did not end in time is
        killed: -9)."""
        return {component: terminate(proc) for component, proc in reversed(self.procs.items())}

    def processes(self) -> list[ProcessRow]:
        """Each running service's process tree, from /proc."""
        rows = []
        for component, proc in self.procs.items():
            user = self.layout.users.of(component)
            uid = run_as(user)["user"]
            pids = tuple(process_tree(proc.pid))
            matches = all(set(uids(pid)) == {uid} for pid in pids)
            rows.append(ProcessRow(component, self.commands[component], user, proc.pid, pids, matches))
        return rows


def uids(pid: int) -> tuple[int, ...]:
    """Real, effective, saved and filesystem uid of a process, from /proc (empty if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except OSError:
        return ()
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return tuple(int(v) for v in line.split()[1:])
    return ()


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text(encoding="utf-8")
            except OSError:
                continue
            ppid = int(fields.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += sorted(children.get(current, []))
    return found


def process_table(rows: Sequence[ProcessRow], matrix: Mapping[str, Mapping[str, bool]]) -> str:
    """A Markdown table: a row per service — its user, its pids (the main one first), whether they all run under
    that user, and the secrets that user can read (``matrix``: secret -> user -> readable, as measured)."""
    lines = ["| service | user | pids | uids | can read |", "|---|---|---|---|---|"]
    for row in rows:
        readable = [name for name, by in matrix.items() if by.get(row.user)]
        others = f" (+{len(row.pids) - 1} worker processes)" if len(row.pids) > 1 else ""
        lines.append(f"| {row.command} | {row.user} | {row.pid}{others} | "
                     f"{'all ' + row.user if row.uids_match else 'MIXED'} | {', '.join(readable) or '-'} |")
    return "\n".join(lines)


# -- several replicas of one configuration (tests, the cluster run) -------------------------------------------------


@dataclass
class Replica:
    """One ``kms serve`` process of a Replicas: its gRPC port, its /metrics listener's URL and its log (stderr)."""

    index: int
    process: subprocess.Popen[str]
    port: int
    http: str
    log: Path

    @property
    def endpoint(self) -> str:
        return f"localhost:{self.port}"

    def metrics(self) -> str:
        """Its /metrics page (Prometheus text)."""
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=30) as reply:  # noqa: S310 (http: of our own)
            return str(reply.read().decode("utf-8"))

    def sample(self, metric: str, method: str) -> float:
        """The sum of ``metric``'s samples for a service method named by its short name (e.g. "GetBatchStatus"):
        ``kms_requests_total`` (calls answered, any status), ``kms_streams_open`` (streams in progress)."""
        total = 0.0
        for line in self.metrics().splitlines():
            labels = re.fullmatch(rf'{metric}\{{(.*)\}} (\S+)', line)
            if labels and re.search(rf'(^|,)method="[^"]*/{method}"', labels.group(1)):
                total += float(labels.group(2))
        return total


class Replicas:
    """Replicas of the service: ``kms serve --config CONFIG`` processes, each on a free loopback port with its health
    and metrics listener on another, all on CONFIG's database (PostgreSQL for several at once) and its tokens or
    worker services. ``start`` adds one and waits until it serves; ``endpoints`` is what a client lists
    (``localhost:P1,localhost:P2``); ``kill`` sends one a signal (SIGKILL: a replica lost mid-call); ``stop`` ends
    those still running (SIGTERM, then SIGKILL after STOP_SECONDS) and returns their exit statuses. Their spawned
    HSM workers die with them (kms.processes); ``restart`` starts a replica again on the ports of one that ended.
    ``env``: their environment (default: this process's)."""

    def __init__(self, config: Path, logs: Path, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.logs = logs
        self.env = dict(os.environ if env is None else env)
        self.replicas: list[Replica] = []

    def start(self, port: int = 0, http_port: int = 0) -> Replica:
        """One more replica (on ``port`` and ``http_port``, 0: free ones), serving once this returns; ConfigError
        (its log's tail) if it does not come up."""
        self.logs.mkdir(parents=True, exist_ok=True)
        index = len(self.replicas)
        log = self.logs / f"replica-{index}.log"
        with open(log, "w", encoding="utf-8") as err:
            proc = subprocess.Popen([sys.executable, "-m", "kms.cli", SERVE, "--config", str(self.config),
                                     "--listen", f"127.0.0.1:{port}", "--health-listen", f"127.0.0.1:{http_port}"],
                                    env=self.env, text=True, stdout=subprocess.PIPE, stderr=err,
                                    stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("kms: serving on port "):
            proc.kill()
            proc.wait()
            proc.stdout.close()
            raise ConfigError(f"replica {index} did not start ({line!r}): "
                              f"{log.read_text(encoding='utf-8', errors='replace').strip()[-500:]}")
        http = re.search(r"health and metrics on (http://\S+) ", log.read_text(encoding="utf-8"))
        replica = Replica(index, proc, int(line.rsplit(" ", 1)[1]), http.group(1) if http else "", log)
        self.replicas.append(replica)
        return replica

    def restart(self, replica: Replica) -> Replica:
        """A new replica on the ports of ``replica``, which has ended (killed or stopped): clients that list its
        endpoint reach it again."""
        assert replica.process.poll() is not None, "the replica still runs"
        return self.start(replica.port, int(replica.http.rsplit(":", 1)[1]))

    @property
    def running(self) -> list[Replica]:
        return [r for r in self.replicas if r.process.poll() is None]

    @property
    def endpoints(self) -> str:
        """The running replicas' endpoints, as ``--server`` and ``client.server`` take them."""
        return ",".join(r.endpoint for r in self.running)

    def kill(self, replica: Replica, sig: int = signal.SIGKILL) -> int:
        """Send ``replica`` ``sig`` and wait for it to end; its exit status."""
        replica.process.send_signal(sig)
        return replica.process.wait(timeout=STOP_SECONDS)

    def stop(self) -> dict[int, int]:
        """SIGTERM to each replica still running, then their exit statuses (-9: killed, here or before)."""
        for replica in self.running:  # all drain at once
            replica.process.send_signal(signal.SIGTERM)
        return {replica.index: terminate(replica.process) for replica in self.replicas}
