"""Honest health: what each service needs is checked, and grpc.health.v1 says so per service.

A ``HealthMonitor`` runs the checks of the service's dependencies — each domain's worker processes and their token
(``hsm.<domain>``), the ``database``, the ``audit-signer`` process and its token — every ``interval`` seconds in a
thread of its own, and once before the server starts. A dependency that fails makes every service that needs it
NOT_SERVING; when it works again, SERVING again. A dependency may have a repair (the audit signer: a dead process is
replaced): it runs right after the failure was published, so a watcher sees NOT_SERVING, then SERVING.

Every change of a dependency or a service is logged (``logging``: WARNING when it fails, INFO when it recovers) and
kept in ``transitions`` with the monitor's clock's time. Reasons name what failed in a few words, never a PIN, a key
or a path.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from grpc_health.v1 import health, health_pb2

from kms.clock import Clock, rfc3339

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: The overall status's name in grpc.health.v1 (every dependency).
OVERALL = ""


@dataclass(frozen=True)
class Dependency:
    """``check`` returns None when it works, else why not; ``repair`` (optional) tries to fix a failure and
    returns True if it did something worth checking again."""

    name: str
    check: Callable[[], str | None]
    repair: Callable[[], bool] | None = None


@dataclass(frozen=True)
class Transition:
    at: dt.datetime
    subject: str  # a dependency's name, or a service's full name ("" for the overall status)
    serving: bool
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        return {"at": rfc3339(self.at), "subject": self.subject or "(overall)",
                "status": "SERVING" if self.serving else "NOT_SERVING", **({"reason": self.reason} if self.reason
                                                                         else {})}


class HealthMonitor:
    def __init__(self, dependencies: Sequence[Dependency], needs: Mapping[str, Sequence[str]], clock: Clock,
                 interval: float = 5.0, servicer: health.HealthServicer | None = None, replica: str = "") -> None:
        """``needs``: service full name -> the dependencies it needs (the overall status "" needs all of them).
        ``servicer``: the grpc.health.v1 servicer to keep current (a new one if None). ``replica``: the service's
        ``server.replica``, which /readyz names (behind a load balancer: which replica answered)."""
        self.replica = replica
        self.servicer = servicer or health.HealthServicer()
        self._dependencies = list(dependencies)
        known = {d.name for d in self._dependencies}
        unknown = {n for names in needs.values() for n in names} - known
        if unknown:
            raise ValueError(f"unknown dependencies {sorted(unknown)}")
        self._needs = {OVERALL: tuple(sorted(known)), **{k: tuple(v) for k, v in needs.items()}}
        self._clock = clock
        self.interval = interval
        self._failing: dict[str, str] = {}  # dependency -> reason
        self._serving: dict[str, bool] = {}  # service -> published status
        self._lock = threading.Lock()  # one round at a time
        # What was published, read by ``status`` (/readyz) without waiting for a round in progress: a round may take
        # a worker's probe timeout or the audit signer's restart, longer than a load balancer waits.
        self._state = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stopping = False
        #: Every change, oldest first (dependencies and services), with the clock's time.
        self.transitions: list[Transition] = []

    def check_now(self) -> dict[str, str]:
        """One round of checks; publishes what changed. Returns the failing dependencies and why."""
        with self._lock:
            for dependency in self._dependencies:
                reason = self._run(dependency)
                if reason is not None and dependency.repair is not None:
                    self._note(dependency.name, reason)
                    self._publish()  # NOT_SERVING while it is repaired
                    try:
                        repaired = dependency.repair()
                    except Exception:
                        log.exception("health: repairing %s failed", dependency.name)
                        repaired = False
                    if repaired:
                        reason = self._run(dependency)
                self._note(dependency.name, reason)
            self._publish()
            return dict(self._failing)

    def _run(self, dependency: Dependency) -> str | None:
        try:
            return dependency.check()
        except Exception as error:  # a check that fails is a failing dependency, not a dead monitor
            log.exception("health: the check of %s failed", dependency.name)
            return f"the check failed ({type(error).__name__})"

    def _note(self, name: str, reason: str | None) -> None:
        with self._state:
            self._note_locked(name, reason)

    def _note_locked(self, name: str, reason: str | None) -> None:
        before = self._failing.get(name)
        if reason is None and name in self._failing:
            del self._failing[name]
            log.info("health: %s works again", name)
            self.transitions.append(Transition(self._clock.now(), name, True))
        elif reason is not None and before != reason:
            self._failing[name] = reason
            log.warning("health: %s is failing: %s", name, reason)
            self.transitions.append(Transition(self._clock.now(), name, False, reason))

    def _publish(self) -> None:
        with self._state:
            self._publish_locked()

    def _publish_locked(self) -> None:
        if self.stopping:
            return
        for service, needed in self._needs.items():
            serving = not any(n in self._failing for n in needed)
            if self._serving.get(service) == serving:
                continue
            first = service not in self._serving
            self._serving[service] = serving
            self.servicer.set(service, SERVING if serving else NOT_SERVING)
            if first and serving:
                continue  # starting up healthy is no transition worth a line
            missing = ", ".join(n for n in needed if n in self._failing)
            self.transitions.append(Transition(self._clock.now(), service, serving, missing))
            if serving:
                log.info("health: %s is SERVING", service or "the service")
            else:
                log.warning("health: %s is NOT_SERVING (%s)", service or "the service", missing)

    def status(self) -> tuple[bool, dict[str, str], dict[str, str]]:
        """(ready, failing dependencies and why, every service's status): what /readyz answers — as last published,
        without waiting for a round of checks in progress."""
        with self._state:
            failing = dict(self._failing)
            services = {(name or "(overall)"): ("SERVING" if ok else "NOT_SERVING")
                        for name, ok in sorted(self._serving.items())}
        if self.stopping:
            return False, {**failing, "service": "stopping"}, {k: "NOT_SERVING" for k in services}
        return not failing and bool(services), failing, services

    def start(self) -> None:
        """Check every ``interval`` seconds in a thread of its own (after a first round in this thread)."""
        self.check_now()
        self._thread = threading.Thread(target=self._loop, name="kms-health-monitor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_now()
            except Exception:
                log.exception("health: a round of checks failed")

    def drain(self) -> None:
        """The service is stopping: every service NOT_SERVING from now on (load balancers stop sending)."""
        self.stopping = True
        self.servicer.enter_graceful_shutdown()
        log.info("health: stopping; every service is NOT_SERVING")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
