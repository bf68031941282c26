"""Per-domain HSM worker processes.

Each domain's token is used only by that domain's workers. A worker process reads its own domain's PIN (the
coordinator never does), opens one session, and seals cards chunk by chunk. SoftHSM scales with processes, not
threads; and it frees destroyed session objects only at C_Finalize, so a worker is replaced after a configurable
number of keys (``recycle_after_keys``) by ending its process.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kms import config, profiles, runtime
from kms.cardid import CardIdentity
from kms.clock import SystemClock
from kms.engine import DomainSealer
from kms.errors import ConfigError, KmsError

CHUNK = 32  # cards per task: amortizes the inter-process round trip


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


_sealer: DomainSealer | None = None
_init_error: KmsError | None = None


def _init(config_path: str, domain: str, bureau: str, profile_name: str) -> None:
    """Runs once in each worker process: opens the domain's token with the PIN this process resolves.
    A failure is kept and reported on the first task (a raising initializer would make the pool respawn forever)."""
    global _init_error
    try:
        _open(config_path, domain, bureau, profile_name)
    except KmsError as error:
        _init_error = error


def _open(config_path: str, domain: str, bureau: str, profile_name: str) -> None:
    global _sealer
    cfg = config.load(Path(config_path))
    clock = SystemClock()
    registry = runtime.registry(cfg, clock)
    loaded = profiles.load_dir(cfg.profiles, profiles.master_key_names(registry))
    if profile_name not in loaded:
        raise ConfigError(f"no card profile named {profile_name!r} in {cfg.profiles}")
    session = runtime.open_domain(cfg, domain)
    _sealer = DomainSealer(domain, session, registry, loaded[profile_name], bureau, clock)
    # Long-lived start-up objects leave the collector's view; the per-card garbage is acyclic.
    gc.freeze()


def _seal_chunk(args: tuple[Sequence[Job], str]) -> list[SectionResult]:
    jobs, batch = args
    if _init_error is not None:
        raise _init_error
    assert _sealer is not None, "worker not initialized"
    pid = os.getpid()
    started = time.perf_counter()
    sections = _sealer.seal_many([(job.card, job.serial) for job in jobs], batch=batch)
    per_card = (time.perf_counter() - started) / max(1, len(jobs))
    return [
        SectionResult(job.card.card_ref, job.serial, None, section, pid, per_card) if isinstance(section, KmsError)
        else SectionResult(job.card.card_ref, job.serial, section, None, pid, per_card)
        for job, section in zip(jobs, sections, strict=True)
    ]


def _keys_per_card(cfg: config.Config, domain: str, profile_name: str) -> int:
    loaded = profiles.load_dir(cfg.profiles)
    if profile_name not in loaded:
        raise ConfigError(f"no card profile named {profile_name!r} in {cfg.profiles}")
    return max(1, len(loaded[profile_name].keys(domain)))


class DomainPool:
    """Worker processes for one domain."""

    def __init__(self, config_path: Path, domain: str, bureau: str, profile: str, processes: int | None = None):
        cfg = config.load(config_path)
        if domain not in cfg.domains:
            raise ConfigError(f"domain {domain} is not configured in {config_path}")
        self.domain = domain
        self.processes = processes or cfg.workers_per_domain
        tasks_per_worker = max(1, cfg.recycle_after_keys // (CHUNK * _keys_per_card(cfg, domain, profile)))
        ctx = multiprocessing.get_context("spawn")
        self._pool: Any = ctx.Pool(
            self.processes, initializer=_init, initargs=(str(cfg.path), domain, bureau, profile),
            maxtasksperchild=tasks_per_worker,
        )

    def seal(self, jobs: Iterable[Job], batch: str) -> Iterator[SectionResult]:
        """Sections in the order of ``jobs``."""
        chunks = ((chunk, batch) for chunk in _chunks(jobs, CHUNK))
        for results in self._pool.imap(_seal_chunk, chunks):
            yield from results

    def close(self) -> None:
        self._pool.close()
        self._pool.join()

    def terminate(self) -> None:
        self._pool.terminate()
        self._pool.join()


def _chunks(items: Iterable[Job], size: int) -> Iterator[list[Job]]:
    chunk: list[Job] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
