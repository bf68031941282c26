"""Per-domain HSM worker processes.

Each domain's token is used only by that domain's workers. A worker process reads its own domain's PIN (the
coordinator never does), opens one session, and seals cards chunk by chunk. SoftHSM scales with processes, not
threads; and it frees destroyed session objects only at C_Finalize, so a worker is replaced after a configurable
number of keys (``recycle_after_keys``) by ending its process.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kms import config, logs, metrics, runtime
from kms.cards import profiles
from kms.cards.cardid import CardIdentity
from kms.cards.profiles import Profile
from kms.clock import SystemClock
from kms.errors import ConfigError, HsmError, HsmLoginFailed, InvalidState, KmsError
from kms.hsm.errors import short_reason
from kms.hsm.session import TokenSession
from kms.issuance import pans
from kms.issuance.sealer import DomainSealer
from kms.processes import context, end_with_parent, executor_pids, retire
from kms.registry import KeyRegistry, KeyState
from kms.validation import chunks

T = TypeVar("T")
#: Master key versions a batch was authorized with: ((name, version), ...), sorted; () for the newest active.
Pins = tuple[tuple[str, int], ...]
CHUNK = 32  # cards per task: amortizes the inter-process round trip
MAX_RESTARTS = 3  # pool replacements one seal() call tolerates before giving up
STARTUP_SECONDS = 120.0  # a new pool's first process: spawned, the configuration and profiles loaded, logged in
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    card: CardIdentity
    serial: str


@dataclass(frozen=True)
class SectionResult:
    card_ref: str
    serial: str
    section: bytes | None  # canonical section, or None with error set
    error: KmsError | None = None
    worker: int = 0  # the worker's process id, for diagnostics
    seconds: float = 0.0  # worker time per card over its chunk (HSM and encoding)
    hsm_calls: tuple[metrics.HsmCall, ...] = ()  # the worker's timed HSM calls since its last results (kms.metrics)


@dataclass
class _Worker:
    domain: str
    session: TokenSession
    registry: KeyRegistry
    profiles: dict[str, Profile]
    clock: SystemClock
    sealers: dict[tuple[str, str, Pins], DomainSealer]

    def sealer(self, bureau: str, profile: str, pins: Pins = ()) -> DomainSealer:
        sealer = self.sealers.get((bureau, profile, pins))
        if sealer is None:
            if profile not in self.profiles:
                raise ConfigError(f"no card profile named {profile!r}")
            sealer = DomainSealer(self.domain, self.session, self.registry, self.profiles[profile], bureau,
                                  self.clock, dict(pins))
            self.sealers[(bureau, profile, pins)] = sealer
        return sealer


_worker: _Worker | None = None
_init_error: KmsError | None = None
_init_args: tuple[str, str] | None = None
#: Shared by the processes of one pool (DomainPool): a lock that lets one of them log in at a time, and an event set
#: once the token refused the PIN to any of them — then no other presents it (a real HSM locks its user PIN after a
#: few failures, however many workers a domain has). None outside a pool's processes.
_logins: tuple[Any, Any] | None = None
#: How long a process waits for another's login before giving up (retryable): a process killed while logging in
#: takes the lock with it until its pool is replaced, with a new lock.
LOGIN_WAIT_SECONDS = 60.0


def _login(cfg: config.Config, domain: str) -> TokenSession:
    """The domain's token session (runtime.open_domain: one C_Login), unless another process of the pool had the
    PIN refused already; one process of the pool at a time."""
    if _logins is None:
        return runtime.open_domain(cfg, domain)
    lock, refused = _logins
    if not lock.acquire(timeout=LOGIN_WAIT_SECONDS):
        raise HsmError(f"the {domain} token: another worker's login does not end", retryable=True)
    try:
        if refused.is_set():
            raise HsmLoginFailed(f"domains.{domain}.pin: the token refused the PIN to another {domain} worker; it is "
                                 "not presented again")
        try:
            return runtime.open_domain(cfg, domain)
        except HsmLoginFailed:
            refused.set()
            raise
    finally:
        lock.release()


def _init(config_path: str, domain: str, logins: tuple[Any, Any] | None = None) -> None:
    """Runs once in each worker process: opens the domain's token with the PIN this process resolves.
    A failure is kept and reported with the first task (``_probe`` at the pool's start), so the caller learns why,
    not just that a process died. A refused PIN is final for this process: it is never tried again."""
    global _init_error, _init_args, _logins
    if _init_args is None:
        end_with_parent()  # logged into a token: this process must not outlive the service
        logs.configure_from_env()  # this process's log lines look like the service's (kms.logs)
        _logins = logins
    _init_args = (config_path, domain)
    try:
        _open(config_path, domain)
        _init_error = None
    except KmsError as error:  # ours name the setting (runtime.open_token) and carry no secret
        log.debug("%s worker could not start: %s", domain, error)  # the pool reports it, once
        _init_error = error
    except Exception as error:
        log.error("%s worker could not start: %s", domain, error)
        _init_error = HsmError(f"the {domain} HSM worker could not start ({type(error).__name__})", retryable=True)


def _open(config_path: str, domain: str) -> None:
    global _worker
    cfg = config.load(Path(config_path))
    clock = SystemClock()
    registry = runtime.registry(cfg, clock)
    loaded = profiles.load_dir(cfg.profiles, profiles.master_key_names(registry))
    session = _login(cfg, domain)
    _worker = _Worker(domain, session, registry, loaded, clock, {})
    # Long-lived start-up objects leave the collector's view; the per-card garbage is acyclic.
    gc.freeze()


def _ready() -> _Worker:
    """This process's worker, opened again if its start failed for a passing cause (a locked database, a busy
    token); a refused PIN is raised again without another login."""
    if _init_error is not None and _init_args is not None and not isinstance(_init_error, HsmLoginFailed):
        _init(*_init_args)
    if _init_error is not None:
        raise _init_error
    assert _worker is not None, "worker not initialized"
    return _worker


def _reopened() -> bool:
    """After a failure: False if the session still reaches its token (the failure was the request's); True once
    the session was opened again — the module initialized again (C_Finalize/C_Initialize: SoftHSM2 sees a token
    directory moved away and back only then) and the PIN presented once more. A retryable HsmError if the token
    cannot be reached now; HsmLoginFailed (kept: never tried again) if it refused the PIN."""
    global _init_error
    worker = _ready()
    try:
        worker.session.check()
        return False
    except KmsError as error:
        log.warning("%s worker: the token session is lost (%s); opening it again", worker.domain, error)
    assert _init_args is not None
    worker.session.close()
    worker.sealers.clear()
    _pan_labels.clear()
    try:
        cfg = config.load(Path(_init_args[0]))
        runtime.module(cfg.hsm).reinitialize()
        worker.session = _login(cfg, worker.domain)
    except HsmLoginFailed as error:
        _init_error = error
        raise
    except KmsError as error:
        log.warning("%s worker: the token cannot be opened again yet: %s", worker.domain, error)
        raise HsmError(f"the {worker.domain} token is unavailable ({short_reason(error)})", retryable=True) from None
    log.warning("%s worker: token session opened again", worker.domain)
    return True


@metrics.sends_hsm_calls_on_error
def _probe() -> int:
    """A pool's start and the health monitor: this worker's token session works (opened again if it was lost).
    Returns the process id."""
    _ready()
    _reopened()
    return os.getpid()


@metrics.sends_hsm_calls_on_error
def _seal_chunk(args: tuple[str, str, Sequence[Job], str, Pins]) -> list[SectionResult]:
    """Seal a chunk; if it fails because the token session was lost (checked by ``_reopened``), the session is
    opened again and the chunk sealed once more (nothing of a chunk is issued before it returns)."""
    _ready()
    try:
        results = _seal_chunk_once(args)
    except HsmLoginFailed:
        raise
    except KmsError:
        if not _reopened():
            raise
        return _seal_chunk_once(args)
    if any(isinstance(r.error, HsmError) for r in results) and _reopened():
        return _seal_chunk_once(args)
    return results


def _seal_chunk_once(args: tuple[str, str, Sequence[Job], str, Pins]) -> list[SectionResult]:
    bureau, profile, jobs, batch, pins = args
    assert _worker is not None, "worker not initialized"
    sealer = _worker.sealer(bureau, profile, pins)
    # A key may have changed state since this sealer resolved it (a ceremony on any replica): checked per chunk.
    states = _worker.registry.states(sealer.key_labels)
    stale = [label for label in sealer.key_labels if states.get(label) is not KeyState.ACTIVE]
    if stale:
        _worker.sealers.pop((bureau, profile, pins), None)
        sealer = _worker.sealer(bureau, profile, pins)  # re-resolved: raises if no active version remains
    pid = os.getpid()
    started = time.perf_counter()
    # The bank's workers open the protected PANs of the cards here, to derive their keys (kms.issuance.pans).
    opened = [_open_pan(job.card, batch) for job in jobs] if _worker.domain == pans.DOMAIN \
        else [job.card for job in jobs]
    sealed = iter(sealer.seal_many([(card, job.serial) for card, job in zip(opened, jobs, strict=True)
                                    if not isinstance(card, KmsError)], batch=batch))
    sections = [card if isinstance(card, KmsError) else next(sealed) for card in opened]
    per_card = (time.perf_counter() - started) / max(1, len(jobs))
    results = [
        SectionResult(job.card.card_ref, job.serial, None, section, pid, per_card) if isinstance(section, KmsError)
        else SectionResult(job.card.card_ref, job.serial, section, None, pid, per_card)
        for job, section in zip(jobs, sections, strict=True)
    ]
    if results:  # the HSM timings travel with the chunk's first result; the parent observes them
        results[0] = dataclasses.replace(results[0], hsm_calls=metrics.take_hsm_calls())
    return results


_pan_labels: dict[int, str] = {}  # the bank's PAN data key label per version, looked up once per process


def _open_pan(card: CardIdentity, batch: str) -> CardIdentity | KmsError:
    assert _worker is not None
    try:
        return pans.open_card(_worker, card, batch, _pan_labels)
    except KmsError as error:
        if error.retryable:
            raise
        return error  # this card fails; the others of the chunk go on


#: What a worker runs for the coordinator (``DomainPool.call``), and nothing else: the ceremonies' HSM steps and the
#: protection of new PANs. Opening a PAN (kms.issuance.pans.open_card) is not among them: it happens only inside
#: sealing, so no call returns a clear PAN to the coordinator.
WORKER_STEPS = frozenset({
    "kms.ceremony.keyops.check_component", "kms.ceremony.keyops.sign", "kms.ceremony.keyops.create_key",
    "kms.ceremony.keyops.export_components", "kms.ceremony.keyops.transport_key_for_rsa",
    "kms.ceremony.keyops.discard_key", "kms.ceremony.keyops.destroy_key",
    "kms.ceremony.keyops.generate_signing_key", "kms.ceremony.keyops.signature_algorithms",
    "kms.issuance.pans.protect_pans",
})


@metrics.sends_hsm_calls_on_error
def _call(task: tuple[Callable[..., T], tuple[Any, ...]]) -> tuple[T, tuple[metrics.HsmCall, ...]]:
    """A ceremony step (kms.ceremony.keyops) in this domain's worker, with its session and registry: only
    WORKER_STEPS. Its result, with the HSM calls timed since the last results (kms.metrics)."""
    function, args = task
    name = f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', '')}"
    if name not in WORKER_STEPS:
        raise InvalidState(f"{name} is not a step a {_init_args[1] if _init_args else ''} worker runs")
    worker = _ready()
    try:
        return function(worker, *args), metrics.take_hsm_calls()
    except HsmLoginFailed:
        raise
    except KmsError:
        # Not run again (a ceremony step may have changed the token): the session is opened again for the next
        # call if it was lost, and the caller may retry.
        if _reopened():
            raise HsmError(f"the {worker.domain} token session was lost during the step; it was opened again, "
                           "try again", retryable=True) from None
        raise


class Pool(Protocol):
    """What the service uses of one domain's workers: processes spawned here (DomainPool), or a domain worker
    service reached over its Unix socket (kms.server.remote.RemotePool, ``workers.<domain>`` in kms.yaml)."""

    domain: str
    #: The PIN refusal that stopped the workers, if any (nothing tries the PIN again until they are restarted).
    refused: HsmLoginFailed | None
    #: Replacements of worker processes that died or could not start.
    restarts: int

    def start(self) -> None: ...

    def seal(self, jobs: Iterable[Job], batch: str, bureau: str, profile: str, pins: Pins = ()
             ) -> Iterator[SectionResult]: ...

    def call(self, function: Callable[..., T], *args: Any, ceremony: str = "") -> T:
        """``function(worker, *args)``; ``ceremony``: the ceremony a key-changing step executes (a worker service
        checks it against its approvals, kms.ceremony.binding)."""

    def probe(self, timeout: float = 30.0) -> str | None: ...

    def pids(self) -> list[int]: ...

    def recycle(self) -> None: ...

    def close(self) -> None: ...

    def terminate(self) -> None: ...


def _max_keys_per_card(cfg: config.Config, domain: str) -> int:
    return max([1, *(len(p.keys(domain)) for p in profiles.load_dir(cfg.profiles).values())])


class DomainPool:
    """Worker processes for one domain.

    The first process starts, opens the token and logs in before any other (``start``, and each replacement of
    the processes): with a wrong PIN, label or module that is one attempt, and the error names the setting. A
    refused PIN is final: the pool starts no process and tries no login again (HsmLoginFailed, not retryable) until
    the service is restarted. A worker that dies (or fails to start) breaks the pool: ``seal`` then raises a
    retryable HsmError instead of waiting forever, and cards not yet returned were not issued by this call.
    """

    def __init__(self, config_path: Path, domain: str, processes: int | None = None):
        cfg = config.load(config_path)
        if domain not in cfg.domains:
            raise ConfigError(f"domain {domain} is not configured in {config_path}")
        self.domain = domain
        self.processes = processes or cfg.workers_per_domain
        # Recycling: after this many chunks the pool's processes are replaced by fresh ones (C_Finalize frees
        # SoftHSM's destroyed session objects). Done here rather than with max_tasks_per_child, which can
        # deadlock in CPython 3.11.
        self._chunks_per_generation = self.processes * max(
            1, cfg.recycle_after_keys // (CHUNK * _max_keys_per_card(cfg, domain)))
        self._initargs = (str(cfg.path), domain)
        self._lock = threading.Lock()  # several request threads may submit at once
        self._submitted = 0
        self._generation = 0
        self._executor: ProcessPoolExecutor | None = None  # started by start() or the first task
        self._closed = False
        #: The PIN refusal that stopped this pool (the detail, for the log and the health report), if any.
        self.refused: HsmLoginFailed | None = None
        self._refused_event = context().Event()  # set by the process whose login was refused (_login)
        #: Replacements of the processes after one died or could not start (recycling not counted).
        self.restarts = 0
        self._last_ok = 0.0  # time.monotonic() of the last chunk or probe that succeeded

    def start(self) -> None:
        """Start the first process and log in (if not done yet): raises the error that names the setting."""
        with self._lock:
            if self._executor is None:
                self._executor = self._new_executor(detailed=True)

    def _refusal(self) -> HsmLoginFailed:
        return HsmLoginFailed(f"the {self.domain} domain's token refused the service's PIN; an operator must fix "
                              "the PIN and restart the service")

    def _refuse(self, error: HsmLoginFailed) -> HsmLoginFailed:
        """A refused PIN: remembered, the processes stopped (none tries it again); the caller's error."""
        with self._lock:
            self._refused_event.set()
            if self.refused is None:
                self.refused = error
                log.error("%s workers stopped: %s; the PIN is not tried again until the service restarts",
                          self.domain, error)
            executor, self._executor = self._executor, None
        if executor is not None:
            retire(executor)
        return self._refusal()

    def _new_executor(self, detailed: bool = False) -> ProcessPoolExecutor:
        """A new pool whose first process has opened the token (one login); others start as chunks come. Called
        with the lock held. ``detailed``: a failure is raised as the worker gave it, naming the setting (start-up,
        for the operator); otherwise it is logged and callers (clients) hear only what kind of failure."""
        if self.refused is not None:
            raise self._refusal()
        if self._closed:
            raise HsmError(f"the {self.domain} workers are stopping", retryable=True)
        # A lock per generation: a process killed while logging in breaks only its own pool.
        executor = ProcessPoolExecutor(self.processes, mp_context=context(), initializer=_init,
                                       initargs=(*self._initargs, (context().Lock(), self._refused_event)))
        try:
            executor.submit(_probe).result(timeout=STARTUP_SECONDS)
        except HsmLoginFailed as error:
            metrics.observe_hsm_calls_of(self.domain, error)  # the refused login
            retire(executor)
            if self.refused is None:
                self.refused = error  # the caller says it (kms serve: one line; later: logged by who replaced)
            raise error from None
        except BaseException as error:
            metrics.observe_hsm_calls_of(self.domain, error)
            retire(executor)
            if isinstance(error, KmsError) and (detailed or error.retryable):
                raise  # for the operator; or the worker's own "could not start (<kind>)", already retryable
            if isinstance(error, KmsError):
                log.error("a %s worker process could not start: %s", self.domain, error)
            raise HsmError(f"the {self.domain} HSM worker could not start ({type(error).__name__})",
                           retryable=True) from None
        self._last_ok = time.monotonic()
        return executor

    def _current(self) -> tuple[int, ProcessPoolExecutor]:
        """The generation and executor to submit to, started if there is none. Called with the lock held."""
        if self._executor is None:
            self._executor = self._new_executor()
        return self._generation, self._executor

    def _submit(self, task: tuple[str, str, list[Job], str, Pins]) -> tuple[int, Future[list[SectionResult]]]:
        for _ in range(MAX_RESTARTS + 1):
            with self._lock:
                if self._executor is not None and self._submitted >= self._chunks_per_generation:
                    metrics.WORKER_RESTARTS.labels(self.domain, "recycled").inc()
                    retiring, self._executor = self._executor, self._new_executor()
                    retire(retiring, cancel=False)  # its queued chunks still finish; then its processes exit
                    self._generation += 1
                    self._submitted = 0
                generation, executor = self._current()
                try:
                    future = executor.submit(_seal_chunk, task)
                except BrokenProcessPool:  # a worker died since the last submission
                    pass
                else:
                    self._submitted += 1
                    return generation, future
            self._replace_executor(generation)
        raise HsmError(f"{self.domain} worker processes keep ending unexpectedly", retryable=True)

    def seal(self, jobs: Iterable[Job], batch: str, bureau: str, profile: str, pins: Pins = ()
             ) -> Iterator[SectionResult]:
        """Sections in the order of ``jobs``; a bounded number of chunks in flight.

        If a worker dies, the pool is replaced by fresh processes and the chunks not yet returned are sealed
        again (a section that was never returned was never issued, so nothing is issued twice); after
        MAX_RESTARTS replacements within one call the error is raised (retryable HsmError). A refused PIN ends
        the call with HsmLoginFailed (FAILED_PRECONDITION: clients do not retry it)."""
        pending: deque[tuple[list[Job], tuple[int, Future[list[SectionResult]]]]] = deque()
        window = 4 * self.processes
        restarts = 0

        def take() -> list[SectionResult]:
            nonlocal restarts
            while True:
                _, (generation, future) = pending[0]
                try:
                    results = future.result()
                except HsmLoginFailed as error:
                    metrics.observe_hsm_calls_of(self.domain, error)  # the failed login
                    raise self._refuse(error) from None
                except Exception as error:
                    metrics.observe_hsm_calls_of(self.domain, error)
                    if not isinstance(error, BrokenProcessPool):
                        raise
                    restarts += 1
                    if restarts > MAX_RESTARTS:
                        raise HsmError(f"{self.domain} worker processes keep ending unexpectedly; the cards not "
                                       "yet returned were not issued", retryable=True) from None
                    self._replace_executor(generation)
                    for i, (retry_chunk, _) in enumerate(list(pending)):
                        pending[i] = (retry_chunk, self._submit((bureau, profile, retry_chunk, batch, pins)))
                    continue
                pending.popleft()
                self._last_ok = time.monotonic()
                for result in results:
                    metrics.observe_hsm_calls(self.domain, result.hsm_calls)
                return results

        try:
            for chunk in chunks(jobs, CHUNK):
                pending.append((chunk, self._submit((bureau, profile, chunk, batch, pins))))
                while len(pending) >= window:
                    yield from take()
            while pending:
                yield from take()
        finally:
            for _, (_, future) in pending:
                future.cancel()

    def call(self, function: Callable[..., T], *args: Any, ceremony: str = "") -> T:
        """Run ``function(worker, *args)`` in one of this domain's workers (a ceremony's HSM step). ``ceremony`` is
        not checked here: processes spawned by the front end trust it (the check is at the worker service's
        boundary, kms.server.worker)."""
        try:
            with self._lock:  # submitted under the lock: never to a pool being retired (recycled, replaced)
                generation, executor = self._current()
                future = executor.submit(_call, (function, args))
            result, calls = future.result()
        except HsmLoginFailed as error:
            metrics.observe_hsm_calls_of(self.domain, error)  # the failed login
            raise self._refuse(error) from None
        except BrokenProcessPool:
            self._replace_executor(generation)
            raise HsmError(f"a {self.domain} worker process ended during a ceremony step", retryable=True) from None
        except Exception as error:
            metrics.observe_hsm_calls_of(self.domain, error)  # e.g. a failed login
            raise
        metrics.observe_hsm_calls(self.domain, calls)
        return result

    def probe(self, timeout: float = 30.0) -> str | None:
        """For the health monitor: None if a worker answers with a working token session (opened again if it was
        lost; a dead pool is replaced), else why not, in a few words (no PIN, no key). A worker busy with chunks
        for longer than ``timeout`` counts as working if a chunk came back within that time."""
        if self.refused is not None:
            return "the token refused the PIN; fix it and restart the service"
        try:
            with self._lock:  # submitted under the lock: never to a pool being retired (recycled, replaced)
                generation, executor = self._current()
                try:
                    future: Future[int] | None = executor.submit(_probe)
                except BrokenProcessPool:
                    future = None
            if future is None:
                self._replace_executor(generation)
                return None if self._executor is not None else "the worker processes could not be started"
            try:
                future.result(timeout=timeout)
            except BrokenProcessPool:
                self._replace_executor(generation)
                return None if self._executor is not None else "the worker processes could not be started"
            except TimeoutError:
                future.cancel()
                return None if time.monotonic() - self._last_ok < timeout else "the workers do not answer"
        except HsmLoginFailed as error:
            self._refuse(error)
            return "the token refused the PIN; fix it and restart the service"
        except KmsError as error:
            return f"the token is unavailable ({short_reason(error)})"
        self._last_ok = time.monotonic()
        return None

    def pids(self) -> list[int]:
        """The ids of this pool's current worker processes."""
        with self._lock:
            return executor_pids(self._executor) if self._executor is not None else []

    def recycle(self) -> None:
        """Replace the workers by fresh ones (after a key changed state: no worker keeps a stale key version)."""
        with self._lock:
            if self._executor is None:
                return
            retiring, self._executor = self._executor, self._new_executor()
            self._generation += 1
            self._submitted = 0
        metrics.WORKER_RESTARTS.labels(self.domain, "key-change").inc()
        retire(retiring, cancel=False)

    def _replace_executor(self, generation: int) -> None:
        """Replace the broken pool, once: other requests that saw the same pool break find it replaced. If the
        new one cannot start, there is none until the next task or probe tries again."""
        with self._lock:
            if generation != self._generation:
                return
            broken, self._executor = self._executor, None
            self._generation += 1
            self._submitted = 0
            self.restarts += 1
            if broken is not None:
                retire(broken)
            try:
                self._executor = self._new_executor()
            except KmsError as error:
                log.error("the %s worker processes could not be restarted: %s", self.domain, error)
        metrics.WORKER_RESTARTS.labels(self.domain, "died").inc()
        log.warning("a %s worker process ended unexpectedly; its pool was replaced", self.domain)  # once

    def close(self) -> None:
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def terminate(self) -> None:
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            retire(executor)
