"""Signed checkpoints of the audit chain (kms.audit), by the audit signing key in a token of its own.

Only the signer's own process reads the audit token's PIN (as each domain's workers alone read theirs); the
service hands it checkpoint messages and gets signatures back. The ``Checkpointer`` signs the chain's head every
``checkpoint_records`` records or ``checkpoint_seconds`` seconds, whichever comes first, and on demand (an export
starts with one, so an export always ends with a checkpoint covering every record in it).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from kms import config as config_mod
from kms import runtime
from kms.audit import AuditLog, Checkpoint, checkpoint_message
from kms.clock import Clock, rfc3339
from kms.errors import ConfigError
from kms.hsm import TokenSession

AUDIT_KEY_LABEL = "kms/audit/signing/audit/v1"
log = logging.getLogger("kms.audit")

_session: TokenSession | None = None


def _open(config_path: str) -> None:
    global _session
    cfg = config_mod.load(Path(config_path))
    if cfg.audit is None:
        raise ConfigError(f"{cfg.path}: no 'audit' section")
    _session = runtime.module(cfg.hsm).open(cfg.audit.token, cfg.audit.pin.resolve())


def _sign(message: bytes) -> bytes:
    assert _session is not None, "audit signer not initialized"
    raw = _session.sign_sha256(AUDIT_KEY_LABEL, message)
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


class AuditSigner:
    """A process of its own holding a session on the audit token."""

    def __init__(self, config_path: Path) -> None:
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_open,
                                         initargs=(str(config_path),))

    def sign(self, message: bytes) -> bytes:
        return self._pool.submit(_sign, message).result(timeout=60)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Checkpointer:
    def __init__(self, log_: AuditLog, signer: AuditSigner, clock: Clock, *, every_records: int = 1_000,
                 every_seconds: float = 60.0) -> None:
        self._log = log_
        self._signer = signer
        self._clock = clock
        self._every_records = every_records
        self._every_seconds = every_seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-checkpointer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def checkpoint_now(self) -> Checkpoint | None:
        """Sign the chain's current head unless the last checkpoint already covers it; the newest checkpoint."""
        with self._lock:
            last = self._log.last_checkpoint()
            size, head = self._log.head()
            if size == 0 or (last is not None and last.size >= size):
                return last
            at = rfc3339(self._clock.now())
            checkpoint = Checkpoint(size, head, at, AUDIT_KEY_LABEL,
                                    self._signer.sign(checkpoint_message(size, head, at)))
            self._log.add_checkpoint(checkpoint)
            return checkpoint

    def _run(self) -> None:
        waited = 0.0
        while not self._stop.wait(1.0):
            waited += 1.0
            try:
                last = self._log.last_checkpoint()
                size, _ = self._log.head()
                behind = size - (last.size if last is not None else 0)
                if behind >= self._every_records or (behind > 0 and waited >= self._every_seconds):
                    self.checkpoint_now()
                    waited = 0.0
            except Exception:  # the next round tries again; the export path signs on demand
                log.exception("audit checkpoint failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.checkpoint_now()  # the chain's end, signed
        except Exception:
            log.exception("final audit checkpoint failed")
