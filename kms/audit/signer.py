"""Signed checkpoints of the audit chain (kms.audit.log), by the audit signing key in a token of its own.

Only the signer's own process reads the audit token's PIN (as each domain's workers alone read theirs); the
service hands it checkpoint messages and gets signatures back. The ``Checkpointer`` signs the chain's head every
``checkpoint_records`` records or ``checkpoint_seconds`` seconds, whichever comes first, and on demand.

An export starts with ``Checkpointer.seal``: under one lock it signs a checkpoint of the current head (stored, as
any other) and then the export's seal (kms.audit.log.Seal) over that same head, the request's nonce and filters. The
seal is not stored; it is the export's last line, so an export cut back to an older checkpoint, or ending with the
seal of another request, does not verify. A seal is signed under the same rule as a checkpoint: only over a chain
that extends the head this signer signed last.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import threading
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from kms import config as config_mod
from kms import logs, runtime
from kms.audit.log import GENESIS, AuditLog, Checkpoint, Seal, checkpoint_message, seal_message
from kms.clock import Clock, rfc3339
from kms.errors import AuditChainBroken, ConfigError
from kms.hsm.labels import AUDIT_KEY, AUDIT_SIGNED_HEAD
from kms.hsm.session import TokenSession

log = logging.getLogger(__name__)

_session: TokenSession | None = None


def _open(config_path: str) -> None:
    global _session
    logs.configure_from_env()  # this process's log lines look like the service's (kms.logs)
    cfg = config_mod.load(Path(config_path))
    if cfg.audit is None:
        raise ConfigError(f"{cfg.path}: no 'audit' section")
    _session = runtime.module(cfg.hsm).open(cfg.audit.token, cfg.audit.pin.resolve())


def _signed_head() -> tuple[int, str]:
    """The last (size, head) this signer signed, kept in its own token: what the database cannot change."""
    assert _session is not None, "audit signer not initialized"
    value = _session.read_data(AUDIT_SIGNED_HEAD)
    if value is None:
        return 0, GENESIS.hex()
    size, _, head = value.decode("ascii").partition(":")
    return int(size), head


def _sign(size: int, head: str, at: str, digests: list[bytes]) -> bytes:
    """Sign a checkpoint only if the chain it names extends what this signer signed last (``_extends``)."""
    return _sign_head(size, head, digests, checkpoint_message(size, head, at))


def _seal(size: int, head: str, at: str, nonce: str, filters: dict[str, str], digests: list[bytes]) -> bytes:
    """Sign an export's seal, under the same rule as a checkpoint: only over a chain that extends the signed head."""
    return _sign_head(size, head, digests, seal_message(size, head, at, nonce, filters))


def _sign_head(size: int, head: str, digests: list[bytes], message: bytes) -> bytes:
    """Sign ``message`` (naming ``size`` and ``head``) only if that chain extends what this signer signed last:
    ``digests`` are the body digests of the records after that, and recomputing the chain from the signed head over
    them must give ``head``. A log rewritten behind the signer's back (records edited and re-chained, checkpoints
    deleted, a database reset) is refused here, so no export of it can carry a good signature over its end."""
    assert _session is not None, "audit signer not initialized"
    signed_size, signed_head = _signed_head()
    if size < signed_size:
        raise AuditChainBroken(f"the audit log holds {size} records, but {signed_size} were signed already")
    if len(digests) != size - signed_size:
        raise AuditChainBroken(f"the records after {signed_size} up to {size} are not all there")
    current = bytes.fromhex(signed_head)
    for digest in digests:
        current = hashlib.sha256(current + digest).digest()
    if current.hex() != head:
        raise AuditChainBroken(f"the audit chain up to {size} does not extend the head signed at {signed_size}")
    raw = _session.sign_sha256(AUDIT_KEY, message)
    _session.write_data(AUDIT_SIGNED_HEAD, f"{size}:{head}".encode("ascii"))
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


class AuditSigner:
    """A process of its own holding a session on the audit token."""

    def __init__(self, config_path: Path) -> None:
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_open,
                                         initargs=(str(config_path),))

    def signed_head(self) -> tuple[int, str]:
        return self._pool.submit(_signed_head).result(timeout=60)

    def sign(self, size: int, head: str, at: str, digests: list[bytes]) -> bytes:
        return self._pool.submit(_sign, size, head, at, digests).result(timeout=120)

    def seal(self, size: int, head: str, at: str, nonce: str, filters: Mapping[str, str],
             digests: list[bytes]) -> bytes:
        return self._pool.submit(_seal, size, head, at, nonce, dict(filters), digests).result(timeout=120)

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
            return self._checkpoint()

    def seal(self, nonce: str, filters: Mapping[str, str]) -> Seal:
        """A checkpoint of the current head (as ``checkpoint_now``), then an export seal over that same head for
        ``nonce`` and ``filters``: both under one lock, so no other checkpoint moves the signed head in between."""
        with self._lock:
            checkpoint = self._checkpoint()
            size, head = (checkpoint.size, checkpoint.head) if checkpoint is not None else (0, GENESIS.hex())
            at = rfc3339(self._clock.now())
            signature = self._signer.seal(size, head, at, nonce, filters, self._digests(size))
            return Seal(size, head, at, nonce, dict(filters), AUDIT_KEY, signature)

    def _checkpoint(self) -> Checkpoint | None:
        last = self._log.last_checkpoint()
        size, head = self._log.head()
        if size == 0 or (last is not None and last.size >= size and last.head == self._head_at(last.size)):
            return last
        at = rfc3339(self._clock.now())
        checkpoint = Checkpoint(size, head, at, AUDIT_KEY,
                                self._signer.sign(size, head, at, self._digests(size)))
        return self._log.add_checkpoint(checkpoint)

    def _digests(self, size: int) -> list[bytes]:
        """The body digests of the records after the signer's signed head, up to ``size``: what it checks."""
        signed_size, _ = self._signer.signed_head()
        return [hashlib.sha256(r.body.encode()).digest() for r in self._log.records(signed_size, size)]

    def _head_at(self, size: int) -> str | None:
        return next((r.hash for r in self._log.records(size - 1, size)), None)

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
