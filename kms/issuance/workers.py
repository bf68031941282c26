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
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kms import config, logs, metrics, runtime
from kms.cards import profiles
from kms.cards.cardid import CardIdentity
from kms.cards.profiles import Profile
from kms.clock import SystemClock
from kms.errors import ConfigError, HsmError, InvalidState, KmsError
from kms.hsm.session import TokenSession
from kms.issuance import pans
from kms.issuance.sealer import DomainSealer
from kms.registry import KeyRegistry, KeyState
from kms.validation import chunks

T = TypeVar("T")
#: Master key versions a batch was authorized with: ((name, version), ...), sorted; () for the newest active.
Pins = tuple[tuple[str, int], ...]
CHUNK = 32  # cards per task: amortizes the inter-process round trip
MAX_RESTARTS = 3  # pool replacements one seal() call tolerates before giving up
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


def _init(config_path: str, domain: str) -> None:
    """Runs once in each worker process: opens the domain's token with the PIN this process resolves.
    A failure is kept and reported with the first task, so the caller learns why (not just that a process died)."""
    global _init_error, _init_args
    if _init_args is None:
        logs.configure_from_env()  # this process's log lines look like the service's (kms.logs)
    _init_args = (config_path, domain)
    try:
        _open(config_path, domain)
        _init_error = None
    except Exception as error:
        # The detail (paths, token labels) goes to this worker's log; callers hear only what kind of failure.
        log.error("%s worker could not start: %s", domain, error)
        _init_error = HsmError(f"the {domain} HSM worker could not start ({type(error).__name__})", retryable=True)


def _open(config_path: str, domain: str) -> None:
    global _worker
    cfg = config.load(Path(config_path))
    clock = SystemClock()
    registry = runtime.registry(cfg, clock)
    loaded = profiles.load_dir(cfg.profiles, profiles.master_key_names(registry))
    session = runtime.open_domain(cfg, domain)
    _worker = _Worker(domain, session, registry, loaded, clock, {})
    # Long-lived start-up objects leave the collector's view; the per-card garbage is acyclic.
    gc.freeze()


@metrics.sends_hsm_calls_on_error
def _seal_chunk(args: tuple[str, str, Sequence[Job], str, Pins]) -> list[SectionResult]:
    bureau, profile, jobs, batch, pins = args
    if _init_error is not None and _init_args is not None:
        _init(*_init_args)  # the cause may have been passing (a locked database, a busy token)
    if _init_error is not None:
        raise _init_error
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
    if _init_error is not None and _init_args is not None:
        _init(*_init_args)
    if _init_error is not None:
        raise _init_error
    assert _worker is not None, "worker not initialized"
    return function(_worker, *args), metrics.take_hsm_calls()


def _max_keys_per_card(cfg: config.Config, domain: str) -> int:
    return max([1, *(len(p.keys(domain)) for p in profiles.load_dir(cfg.profiles).values())])


class DomainPool:
    """Worker processes for one domain.

    A worker that dies (or fails to start) breaks the pool: ``seal`` then raises a retryable HsmError instead of
    waiting forever, and cards not yet returned were not issued by this call.
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
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init, initargs=self._initargs)

    def _submit(self, task: tuple[str, str, list[Job], str, Pins]) -> tuple[int, Future[list[SectionResult]]]:
        for _ in range(MAX_RESTARTS + 1):
            with self._lock:
                if self._submitted >= self._chunks_per_generation:
                    metrics.WORKER_RESTARTS.labels(self.domain, "recycled").inc()
                    retiring, self._executor = self._executor, self._new_executor()
                    retiring.shutdown(wait=False)  # its queued chunks still finish; then its processes exit
                    self._generation += 1
                    self._submitted = 0
                generation = self._generation
                try:
                    future = self._executor.submit(_seal_chunk, task)
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
        MAX_RESTARTS replacements within one call the error is raised (retryable HsmError)."""
        pending: deque[tuple[list[Job], tuple[int, Future[list[SectionResult]]]]] = deque()
        window = 4 * self.processes
        restarts = 0

        def take() -> list[SectionResult]:
            nonlocal restarts
            while True:
                _, (generation, future) = pending[0]
                try:
                    results = future.result()
                except Exception as error:
                    metrics.observe_hsm_calls_of(self.domain, error)  # e.g. a failed login
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

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(worker, *args)`` in one of this domain's workers (a ceremony's HSM step)."""
        with self._lock:
            executor = self._executor
        try:
            result, calls = executor.submit(_call, (function, args)).result()
        except BrokenProcessPool:
            self._replace_executor(self._generation)
            raise HsmError(f"a {self.domain} worker process ended during a ceremony step", retryable=True) from None
        except Exception as error:
            metrics.observe_hsm_calls_of(self.domain, error)  # e.g. a failed login
            raise
        metrics.observe_hsm_calls(self.domain, calls)
        return result

    def recycle(self) -> None:
        """Replace the workers by fresh ones (after a key changed state: no worker keeps a stale key version)."""
        with self._lock:
            retiring, self._executor = self._executor, self._new_executor()
            self._generation += 1
            self._submitted = 0
        metrics.WORKER_RESTARTS.labels(self.domain, "key-change").inc()
        retiring.shutdown(wait=False)

    def _replace_executor(self, generation: int) -> None:
        """Replace the broken pool, once: other requests that saw the same pool break find it replaced."""
        with self._lock:
            if generation != self._generation:
                return
            broken, self._executor = self._executor, self._new_executor()
            self._generation += 1
            self._submitted = 0
        metrics.WORKER_RESTARTS.labels(self.domain, "died").inc()
        log.warning("a %s worker process ended unexpectedly; its pool was replaced", self.domain)  # once
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def terminate(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
