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

import datetime as dt
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from kms import config as config_mod
from kms import logs, runtime
from kms.audit.log import GENESIS, AuditLog, Checkpoint, CheckpointLock, Seal, checkpoint_message, seal_message
from kms.clock import Clock, rfc3339
from kms.errors import (
    AuditChainBroken,
    AuditSignedHeadMoved,
    ConfigError,
    HsmError,
    HsmLoginFailed,
    KmsError,
    Unavailable,
)
from kms.hsm.errors import short_reason
from kms.hsm.labels import AUDIT_KEY, AUDIT_SIGNED_HEAD
from kms.hsm.session import TokenSession
from kms.processes import context, end_with_parent, executor_pids, retire

if TYPE_CHECKING:
    from kms.audit.anchor import Anchor

T = TypeVar("T")

log = logging.getLogger(__name__)

_session: TokenSession | None = None
_config_path: str | None = None
_init_error: KmsError | None = None
_anchor: Anchor | None = None  # audit.anchor: each checkpoint signed here is also anchored in OpenBao (anchor.py)
STARTUP_SECONDS = 120.0


def _open(config_path: str) -> None:
    """The signer process's initializer: opens the audit token (one login). A failure is kept for ``_probe``."""
    global _config_path, _init_error
    if _config_path is None:
        end_with_parent()  # logged into the audit token: this process must not outlive the service
        logs.configure_from_env()  # this process's log lines look like the service's (kms.logs)
    _config_path = config_path
    try:
        _session_open()
        _anchor_open()
        _init_error = None
    except KmsError as error:
        _init_error = error
    except Exception as error:
        _init_error = HsmError(f"the audit signer could not start ({type(error).__name__})", retryable=True)


def _session_open() -> None:
    global _session
    assert _config_path is not None
    cfg = config_mod.load(Path(_config_path))
    if cfg.audit is None:
        raise ConfigError(f"{cfg.path}: no 'audit' section")
    if cfg.audit.pin is None:  # a front end's configuration: the audit worker service holds the PIN
        raise ConfigError(f"{cfg.path}: audit.pin is not set here (workers.audit serves the signer)")
    _session = runtime.open_token(cfg.hsm, "audit", cfg.audit.token, cfg.audit.pin, cfg.secret)


def _anchor_open() -> None:
    """The anchor of ``audit.anchor``, once per process, with its retry thread (OpenBao is not needed yet)."""
    global _anchor
    if _anchor is None and _config_path is not None:
        from kms.audit.anchor import from_config

        _anchor = from_config(config_mod.load(Path(_config_path)))
        if _anchor is not None:
            _anchor.start()


def _anchor_status() -> dict[str, Any] | None:
    return _anchor.status().to_json() if _anchor is not None else None


def _ready() -> TokenSession:
    """The audit token's session, checked (a token that went away and came back shows no objects to it: the
    signed head would read as absent) and opened again if it was lost; a refused PIN is never tried again."""
    global _session, _init_error
    if _init_error is not None and not isinstance(_init_error, HsmLoginFailed):
        _open(_config_path or "")
    if _init_error is not None:
        raise _init_error
    assert _session is not None, "audit signer not initialized"
    try:
        _session.check()
        return _session
    except KmsError as error:
        log.warning("audit signer: the token session is lost (%s); opening it again", error)
    _session.close()
    try:
        assert _config_path is not None
        cfg = config_mod.load(Path(_config_path))
        runtime.module(cfg.hsm).reinitialize()
        _session_open()
    except HsmLoginFailed as error:
        _init_error = error
        raise
    except KmsError as error:  # the detail (module path, token label) to this process's log only
        log.warning("audit signer: the token cannot be opened again yet: %s", error)
        raise HsmError(f"the audit token is unavailable ({short_reason(error)})", retryable=True) from None
    assert _session is not None
    return _session


def _probe() -> int:
    _ready()
    return os.getpid()


def _signed_head() -> tuple[int, str]:
    """The last (size, head) this signer signed, kept in its own token: what the database cannot change."""
    value = _ready().read_data(AUDIT_SIGNED_HEAD)
    if value is None:
        return 0, GENESIS.hex()
    size, _, head = value.decode("ascii").partition(":")
    return int(size), head


def _sign(size: int, head: str, at: str, digests: list[bytes], base: tuple[int, str] | None = None) -> bytes:
    """Sign a checkpoint only if the chain it names extends what this signer signed last (``_sign_head``); then
    anchor it, in this process, if ``audit.anchor`` is set (kms.audit.anchor: spooled, sent without waiting long)."""
    signature = _sign_head(size, head, digests, checkpoint_message(size, head, at), base)
    if _anchor is not None:
        _anchor.record(Checkpoint(size, head, at, AUDIT_KEY, signature))
    return signature


def _seal(size: int, head: str, at: str, nonce: str, filters: dict[str, str], digests: list[bytes],
          base: tuple[int, str] | None = None) -> bytes:
    """Sign an export's seal, under the same rule as a checkpoint: only over a chain that extends the signed head."""
    return _sign_head(size, head, digests, seal_message(size, head, at, nonce, filters), base)


def _sign_head(size: int, head: str, digests: list[bytes], message: bytes,
               base: tuple[int, str] | None = None) -> bytes:
    """Sign ``message`` (naming ``size`` and ``head``) only if that chain extends what this signer signed last:
    ``digests`` are the body digests of the records after that, and recomputing the chain from the signed head over
    them must give ``head``. A log rewritten behind the signer's back (records edited and re-chained, checkpoints
    deleted, a database reset) is refused here, so no export of it can carry a good signature over its end.
    ``base``: the signed head the caller read, which ``digests`` start from (compare and swap): if the signer signed
    anything since (another replica's checkpoint, or an earlier request of the caller's that timed out and ran on),
    AuditSignedHeadMoved, before anything is signed or anchored: the caller reads again under its lock and retries.
    Without ``base`` (an older caller), only the chain is checked."""
    session = _ready()
    signed_size, signed_head = _signed_head()
    if base is not None and (int(base[0]), str(base[1])) != (signed_size, signed_head):
        raise AuditSignedHeadMoved(f"the audit signer's signed head is at {signed_size}, not {base[0]}: another "
                                   f"checkpoint was signed since; nothing was signed")
    if size < signed_size:
        raise AuditChainBroken(f"the audit log holds {size} records, but {signed_size} were signed already")
    if len(digests) != size - signed_size:
        raise AuditChainBroken(f"the records after {signed_size} up to {size} are not all there")
    current = bytes.fromhex(signed_head)
    for digest in digests:
        current = hashlib.sha256(current + digest).digest()
    if current.hex() != head:
        raise AuditChainBroken(f"the audit chain up to {size} does not extend the head signed at {signed_size}")
    raw = session.sign_sha256(AUDIT_KEY, message)
    session.write_data(AUDIT_SIGNED_HEAD, f"{size}:{head}".encode("ascii"))
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


class Signer(Protocol):
    """What the service uses of the audit signer: a process spawned here (AuditSigner), or the audit worker
    service reached over its Unix socket (kms.server.remote.RemoteSigner, ``workers.audit`` in kms.yaml)."""

    refused: HsmLoginFailed | None
    restarts: int

    def start(self) -> None: ...

    def check(self, timeout: float = 30.0) -> str | None: ...

    def supervise(self) -> bool: ...

    def pids(self) -> list[int]: ...

    def signed_head(self) -> tuple[int, str]: ...

    def sign(self, size: int, head: str, at: str, digests: list[bytes],
             base: tuple[int, str] | None = None) -> bytes: ...

    def seal(self, size: int, head: str, at: str, nonce: str, filters: Mapping[str, str],
             digests: list[bytes], base: tuple[int, str] | None = None) -> bytes: ...

    def close(self) -> None: ...


class AuditSigner:
    """A process of its own holding a session on the audit token, supervised.

    It starts at construction (or ``start``): the process opens the token and logs in (once) before that returns,
    so a wrong PIN, label or module stops ``kms serve`` with the setting named. If the process dies, calls raise
    Unavailable (retryable: UNAVAILABLE to clients, not INTERNAL) until ``supervise`` (the health monitor) starts
    a new one. A refused PIN is final: no process is started again and the PIN is not tried again."""

    def __init__(self, config_path: Path, *, start: bool = True) -> None:
        """``start``: start the process now (else ``start()`` does; calls before that are Unavailable)."""
        self._config = str(config_path)
        self._lock = threading.Lock()
        self.refused: HsmLoginFailed | None = None
        #: New processes started after the first one died.
        self.restarts = 0
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False  # close() was called: no process is started again
        if start:
            self.start()

    def start(self) -> None:
        """Start the process (if not running): it logs in once; raises the error naming the setting."""
        with self._lock:
            if self._executor is None:
                self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        if self.refused is not None:
            raise self.refused
        executor = ProcessPoolExecutor(1, mp_context=context(), initializer=_open, initargs=(self._config,))
        try:
            executor.submit(_probe).result(timeout=STARTUP_SECONDS)
        except HsmLoginFailed as error:
            retire(executor)
            self.refused = error  # the caller says it (kms serve: one line; supervise: logged)
            raise
        except BaseException as error:
            retire(executor)
            if isinstance(error, KmsError):
                raise
            raise HsmError(f"the audit signer could not start ({type(error).__name__})", retryable=True) from None
        return executor

    def _run(self, timeout: float, function: Callable[..., T], *args: Any) -> T:
        with self._lock:
            executor = self._executor
        if executor is None:
            if self.refused is not None:
                raise HsmLoginFailed("the audit token refused the service's PIN; an operator must fix the PIN and "
                                     "restart the service")
            raise Unavailable("the audit signer is not running; it is being restarted, try again")
        try:
            return executor.submit(function, *args).result(timeout=timeout)
        except BrokenProcessPool:
            self._lost(executor)
            raise Unavailable("the audit signer process ended; it is being restarted, try again") from None
        except TimeoutError:
            raise Unavailable("the audit signer does not answer; try again") from None
        except HsmLoginFailed as error:
            with self._lock:
                self.refused = error
                if self._executor is executor:
                    self._executor = None
            retire(executor)
            log.error("audit signer: %s; the PIN is not tried again until the service restarts", error)
            raise HsmLoginFailed("the audit token refused the service's PIN; an operator must fix the PIN and "
                                 "restart the service") from None

    def _lost(self, executor: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is not executor:
                return
            self._executor = None
        log.error("the audit signer process ended unexpectedly; checkpoints wait for its replacement")
        retire(executor)

    def pids(self) -> list[int]:
        with self._lock:
            return executor_pids(self._executor) if self._executor is not None else []

    def check(self, timeout: float = 30.0) -> str | None:
        """None if the signer process answers with a working token session, else why not (a dead process is
        noted: ``supervise`` replaces it)."""
        if self.refused is not None:
            return "the audit token refused the PIN; fix it and restart the service"
        try:
            self._run(timeout, _probe)
        except KmsError as error:  # /readyz is served without a client certificate: no path, no label
            if isinstance(error, Unavailable):
                return str(error)
            text = str(error)
            return text if text.startswith("the audit token is unavailable (") and "/" not in text \
                else f"the audit token is unavailable ({short_reason(error)})"
        return None

    def supervise(self) -> bool:
        """Start a new signer process if the last one died (one login). True if a new one was started."""
        with self._lock:
            if self._executor is not None or self.refused is not None or self._closed:
                return False
            try:
                self._executor = self._new_executor()
            except KmsError as error:
                log.error("the audit signer could not be restarted: %s", error)
                return False
            self.restarts += 1
        log.warning("audit signer restarted")
        return True

    def signed_head(self) -> tuple[int, str]:
        return self._run(60, _signed_head)

    def sign(self, size: int, head: str, at: str, digests: list[bytes],
             base: tuple[int, str] | None = None) -> bytes:
        return self._run(120, _sign, size, head, at, digests, base)

    def seal(self, size: int, head: str, at: str, nonce: str, filters: Mapping[str, str],
             digests: list[bytes], base: tuple[int, str] | None = None) -> bytes:
        return self._run(120, _seal, size, head, at, nonce, dict(filters), digests, base)

    def anchor_status(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The anchor's status in the signer process (kms.audit.anchor.AnchorStatus as JSON), None without one."""
        return self._run(timeout, _anchor_status)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)


class Checkpointer:
    """Signs the chain's head (``checkpoint_now``, every ``every_records`` records or ``every_seconds`` seconds, at
    ``stop``) and export seals, one at a time across every replica on the database (``AuditLog.checkpoint_lock``):
    the newest checkpoint, the head and the signer's signed head are read under that lock, so replicas sharing one
    audit signer never make it refuse each other's checkpoints. Each checkpoint stored names ``replica``."""

    def __init__(self, log_: AuditLog, signer: Signer, clock: Clock, *, every_records: int = 1_000,
                 every_seconds: float = 60.0, replica: str | None = None) -> None:
        self._log = log_
        self._signer = signer
        self._clock = clock
        self._every_records = every_records
        self._every_seconds = every_seconds
        self.replica = replica
        self._lock = threading.Lock()  # this process's threads first, then the database's lock across replicas
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-checkpointer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def checkpoint_now(self) -> Checkpoint | None:
        """Sign the chain's current head unless the last checkpoint already covers it; the newest checkpoint."""
        with self._lock, self._log.checkpoint_lock() as locked:
            return self._checkpoint(locked)

    def checkpoint_due(self, waited: float) -> Checkpoint | None:
        """One round of the checkpointer's thread, ``waited`` seconds after this replica's last checkpoint: sign the
        head if a checkpoint is due — ``every_records`` records past the newest checkpoint, or records past it that
        is older than ``every_seconds`` (whichever replica signed it) — judged again under the lock, so that replicas
        crossing the threshold together sign one checkpoint, not one each. The checkpoint signed, or None."""
        if not self._due(self._log.last_checkpoint(), self._log.head()[0], waited):
            return None
        with self._lock, self._log.checkpoint_lock() as locked:
            last = locked.last_checkpoint()
            if not self._due(last, locked.head()[0], waited):
                return None
            return self._checkpoint(locked)

    def _due(self, last: Checkpoint | None, size: int, waited: float) -> bool:
        behind = size - (last.size if last is not None else 0)
        if behind >= self._every_records:
            return True
        if behind <= 0 or waited < self._every_seconds:
            return False
        if last is None:
            return True
        signed_at = dt.datetime.strptime(last.at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        return (self._clock.now() - signed_at).total_seconds() >= self._every_seconds

    def seal(self, nonce: str, filters: Mapping[str, str]) -> Seal:
        """A checkpoint of the current head (as ``checkpoint_now``), then an export seal over that same head for
        ``nonce`` and ``filters``: both under one lock, so no other checkpoint moves the signed head in between."""
        with self._lock, self._log.checkpoint_lock() as locked:
            checkpoint = self._checkpoint(locked)
            size, head = (checkpoint.size, checkpoint.head) if checkpoint is not None else (0, GENESIS.hex())
            at = rfc3339(self._clock.now())
            signature = self._signed(size, lambda digests, base: self._signer.seal(size, head, at, nonce, filters,
                                                                                   digests, base))
            return Seal(size, head, at, nonce, dict(filters), AUDIT_KEY, signature)

    def _checkpoint(self, locked: CheckpointLock) -> Checkpoint | None:
        last = locked.last_checkpoint()
        size, head = locked.head()
        if size == 0 or (last is not None and last.size >= size and last.head == self._head_at(last.size)):
            return last
        at = rfc3339(self._clock.now())
        signature = self._signed(size, lambda digests, base: self._signer.sign(size, head, at, digests, base))
        checkpoint = Checkpoint(size, head, at, AUDIT_KEY, signature)
        return locked.add_checkpoint(checkpoint, replica=self.replica)

    def _signed(self, size: int, sign: Callable[[list[bytes], tuple[int, str]], bytes]) -> bytes:
        """``sign(digests, base)`` from the signer's signed head as it is now; once more if the signer says its head
        moved since it was read (a request of this replica that timed out ran on in the signer meanwhile)."""
        for attempt in (1, 2):
            base, digests = self._digests(size)
            try:
                return sign(digests, base)
            except AuditSignedHeadMoved as moved:
                if attempt == 2:
                    raise
                log.warning("audit signer: %s; reading it again", moved)
        raise AssertionError("unreachable")  # pragma: no cover

    def _digests(self, size: int) -> tuple[tuple[int, str], list[bytes]]:
        """The signer's signed head, and the body digests of the records after it up to ``size``: what it checks
        (and signs only if its signed head is still that one: a request that timed out here and ran on in the
        signer cannot make this one sign over a chain that another replica's digests no longer start from)."""
        base = self._signer.signed_head()
        return base, [hashlib.sha256(r.body.encode()).digest() for r in self._log.records(base[0], size)]

    def _head_at(self, size: int) -> str | None:
        return next((r.hash for r in self._log.records(size - 1, size)), None)

    def _run(self) -> None:
        waited = 0.0
        while not self._stop.wait(1.0):
            waited += 1.0
            try:
                if self.checkpoint_due(waited) is not None:
                    waited = 0.0
            except KmsError as error:  # e.g. the signer is being replaced: the next round tries again
                log.warning("audit checkpoint failed: %s", error)
            except Exception:  # the next round tries again; the export path signs on demand
                log.exception("audit checkpoint failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.checkpoint_now()  # the chain's end, signed
        except KmsError as error:
            log.warning("final audit checkpoint failed: %s", error)
        except Exception:
            log.exception("final audit checkpoint failed")
