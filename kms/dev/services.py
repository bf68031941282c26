"""Development only: the services of a separated layout (kms.dev.separation) run, each as its own OS user (as root).

``SeparatedServices`` starts ``kms worker --domain hrss``, ``--domain bank`` and ``kms worker --audit``, each as its
component's user in its own directory, waits for each to say it listens, then ``kms serve`` as the front end's user
on a free loopback port; ``stop`` ends them in reverse order (SIGTERM, then the exit statuses). Their environment
is nothing of the caller's but where the PKCS#11 module and the code are: no PIN or secret can come through it.
``process_table`` is what actually ran: each service's processes from /proc with their uids, and what each user
can read as measured by ``kms.dev.separation.readability`` (and ``openbao_readability``). ``scripts/demo.py
--secrets openbao`` uses it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kms.dev.separation import AUDIT, FRONT, SIGNERS, Layout, run_as
from kms.errors import ConfigError

STOP_SECONDS = 60
SERVE = "serve"


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
        codes = {}
        for component, proc in reversed(self.procs.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                codes[component] = proc.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[component] = proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        return codes

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
