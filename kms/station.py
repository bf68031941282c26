"""Station side: verify a sealed bundle, unwrap its keys into the station's own token, check every KCV.

Every reason to refuse a bundle (bad encoding, flipped byte, wrong signer, wrong bureau, unknown domain, wrong
transport key, replay) surfaces as the same opaque BundleRejected; the specific reason goes only to the local log.
Keys are unwrapped as session objects first; only when every KCV matches and the serial is recorded as opened are
they stored (on request) as token objects, so a refused bundle leaves nothing behind.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import queue
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_public_key

from kms import bundle
from kms.clock import Clock, rfc3339
from kms.errors import (
    AlreadyExists,
    BundleRejected,
    ConfigError,
    HsmError,
    InvalidArgument,
    KmsError,
    MechanismUnavailable,
    NotFound,
)
from kms.hsm import spki as sm2_spki
from kms.hsm.labels import card_key_label, key_label, unwrap_key_label
from kms.hsm.session import StationKeys, TokenSession, discard_objects, store_station_keys
from kms.hsm.types import Algorithm, SignatureAlgorithm
from kms.registry import DOMAINS, KeyKind
from kms.store import opened_bundles

log = logging.getLogger(__name__)
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


#: The DER prefix of an SM2 public key's SubjectPublicKeyInfo: id-ecPublicKey (1.2.840.10045.2.1) with the SM2 curve
#: (1.2.156.10197.1.301), then a BIT STRING of the uncompressed point 04 ‖ X ‖ Y (65 bytes). `cryptography` cannot
#: load such a key; the station keeps the DER and verifies in its token.
SM2_SPKI_PREFIX = bytes.fromhex("3059301306072A8648CE3D020106082A811CCF5501822D03420004")
SM2_SPKI_LENGTH = len(SM2_SPKI_PREFIX) + 64


def is_sm2_spki(spki: bytes) -> bool:
    """Whether ``spki`` is exactly the SubjectPublicKeyInfo of an SM2 public key (uncompressed point)."""
    return len(spki) == SM2_SPKI_LENGTH and spki.startswith(SM2_SPKI_PREFIX)


def spki_pem(spki: bytes) -> bytes:
    """A public key's SubjectPublicKeyInfo as PEM (``PUBLIC KEY``): for P-256 and for SM2 keys alike."""
    body = base64.encodebytes(spki).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN PUBLIC KEY-----\n" + b"\n".join(lines) + b"\n-----END PUBLIC KEY-----\n"


def pem_spki(pem: bytes, where: str) -> bytes:
    """The DER of a ``PUBLIC KEY`` PEM file (one key). ConfigError naming ``where`` otherwise."""
    text = pem.decode("ascii", "replace").strip().splitlines()
    if len(text) < 3 or text[0] != "-----BEGIN PUBLIC KEY-----" or text[-1] != "-----END PUBLIC KEY-----":
        raise ConfigError(f"{where}: not a PEM public key (-----BEGIN PUBLIC KEY-----)")
    try:
        return base64.b64decode("".join(text[1:-1]), validate=True)
    except ValueError:
        raise ConfigError(f"{where}: not a PEM public key (bad base64)") from None


@dataclass(frozen=True)
class TrustedKey:
    """A domain's published issuance signing key: its domain, the section signature algorithm it serves
    (bundle.SIGNATURE_ALGORITHMS, from the key's kind), its SPKI DER, and for P-256 the loaded key."""

    domain: str
    algorithm: str
    spki: bytes
    public: ec.EllipticCurvePublicKey | None = None

    @classmethod
    def of(cls, domain: str, spki: bytes, where: str) -> TrustedKey:
        if is_sm2_spki(spki):
            if not sm2_spki.on_sm2_curve(spki[len(SM2_SPKI_PREFIX) - 1:]):
                raise ConfigError(f"{where}: an SM2 public key whose point is not on the SM2 curve")
            return cls(domain, bundle.SM2_SIGNATURE_ALGORITHM, spki)
        try:
            key = load_der_public_key(spki)
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError(f"{where}: not an ECDSA P-256 or SM2 public key") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise ConfigError(f"{where}: not an ECDSA P-256 or SM2 public key")
        # its key id is over the DER as the issuer records it (uncompressed point, named curve)
        return cls(domain, bundle.SIGNATURE_ALGORITHM,
                   key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo), key)


#: An SM2 signature left for the station's token to verify: (the trusted key's SPKI, the signed bytes, r ‖ s).
Pending = tuple[bytes, bytes, bytes]


class TrustStore:
    """The domains' published issuance signing keys: PEM files named <domain>*.pem in one directory, ECDSA P-256
    keys (verified here, in software) and SM2 keys (verified in the station's token: ``pending``)."""

    def __init__(self, keys: dict[str, TrustedKey]) -> None:
        self._keys = keys  # key id -> trusted key

    @property
    def has_sm2(self) -> bool:
        """Whether a trusted key is an SM2 key (its signatures are verified in a token)."""
        return any(key.public is None for key in self._keys.values())

    def spkis(self) -> dict[str, tuple[str, bytes]]:
        """Key id -> (domain, SubjectPublicKeyInfo DER): the store in a form another process can be given."""
        return {kid: (key.domain, key.spki) for kid, key in self._keys.items()}

    @classmethod
    def from_spkis(cls, spkis: dict[str, tuple[str, bytes]]) -> TrustStore:
        return cls({kid: TrustedKey.of(domain, spki, f"trusted key {kid}") for kid, (domain, spki) in spkis.items()})

    @classmethod
    def load(cls, directory: Path) -> TrustStore:
        keys: dict[str, TrustedKey] = {}
        for path in sorted(directory.glob("*.pem")):
            domain = next((d for d in DOMAINS if path.name.startswith(d)), None)
            if domain is None:
                raise ConfigError(f"{path}: trust store files are named after their domain (hrss*.pem, bank*.pem)")
            key = TrustedKey.of(domain, pem_spki(path.read_bytes(), str(path)), str(path))
            keys[bundle.key_id(key.spki)] = key
        if not keys:
            raise ConfigError(f"{directory}: no trusted signing keys")
        return cls(keys)

    def verify(self, section: bundle.ParsedSection, pending: list[Pending] | None = None) -> bool:
        """Whether the section is signed by a trusted key of its own domain, of the kind its algorithm names.
        An ECDSA signature is checked here; an SM2 one is added to ``pending`` for the station's token (True then
        means only that the key fits), or refused if no ``pending`` list is given."""
        entry = self._keys.get(section.key_id)
        if entry is None or entry.domain != section.domain or entry.algorithm != section.signature_algorithm:
            return False
        if entry.public is None:
            if pending is None:
                return False
            pending.append((entry.spki, section.signed_bytes, section.signature))
            return True
        r = int.from_bytes(section.signature[:32], "big")
        s = int.from_bytes(section.signature[32:], "big")
        try:
            entry.public.verify(encode_dss_signature(r, s), section.signed_bytes, _ECDSA_SHA256)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class KeyReport:
    domain: str
    name: str
    usage: str
    algorithm: str
    kcv_method: str
    kcv_expected: str
    kcv_computed: str
    label: str | None

    @property
    def match(self) -> bool:
        return self.kcv_expected == self.kcv_computed


@dataclass
class OpenReport:
    serial: str
    card_ref: str
    stored: bool
    keys: list[KeyReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.keys) and all(k.match for k in self.keys)

    def as_json(self) -> dict[str, object]:
        return {
            "serial": self.serial, "card_ref": self.card_ref, "ok": self.ok, "stored": self.stored,
            "keys": [
                {"domain": k.domain, "name": k.name, "usage": k.usage, "algorithm": k.algorithm,
                 "kcv_method": k.kcv_method, "kcv_expected": k.kcv_expected, "kcv_computed": k.kcv_computed,
                 "match": k.match, "label": k.label}
                for k in self.keys
            ],
        }


def _reject(reason: str) -> BundleRejected:
    log.info("bundle rejected: %s", reason)
    return BundleRejected()


@dataclass(frozen=True)
class _Section:
    """What opening needs of a section whose checks passed, ready for the token: its domain, its transport key's
    label, the sealed keys (wrapped key, algorithm) and what each key's report says of it (name, usage,
    algorithm, KCV method, the sealed KCV in hex)."""

    domain: str
    transport_label: str
    sealed: tuple[tuple[bytes, Algorithm], ...]
    keys: tuple[tuple[str, str, str, str, str], ...]
    wrap: str  # the signed wrap method of the section's keys (one per section, at least one key: kms.bundle)


@dataclass(frozen=True)
class _Checked:
    """A bundle for this station, every section signed by its domain's key (``check``); small, so that the
    checking process hands it back cheaply."""

    serial: str
    card_ref: str
    sections: tuple[_Section, ...]
    #: SM2 signatures still to be verified in a token of the station's before any key is unwrapped
    pending: tuple[Pending, ...] = ()


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check(data: bytes, bureau: str, domains: tuple[str, ...], trust: TrustStore) -> _Checked:
    """Parse a bundle and check it is for this station (bureau, domains), every key's KCV method is its
    algorithm's, and every section is signed by its domain's key: ECDSA signatures verified here, SM2 ones
    returned as ``pending`` for the station's token (``Station._verify_pending``). Raises _Refused with the reason
    (for the local log only) otherwise."""
    try:
        parsed = bundle.parse(data)
    except BundleRejected:
        raise _Refused("malformed or not canonical") from None
    names = [s.domain for s in parsed.sections]
    pending: list[Pending] = []
    for section in parsed.sections:
        if section.domains != names:
            raise _Refused("sections missing from or added to the bundle")
        if section.domain not in domains:
            raise _Refused(f"section for domain {section.domain} this station is not registered for")
        if section.bureau != bureau:
            raise _Refused("section for another bureau")
        if any(bundle.KCV_METHODS.get(k.algorithm) != k.kcv_method for k in section.keys):
            raise _Refused("a key's KCV method is not its algorithm's")
        if not trust.verify(section, pending):
            raise _Refused("signature")
    return _Checked(parsed.serial, parsed.card_ref, tuple(_section(s) for s in parsed.sections), tuple(pending))


def _section(section: bundle.ParsedSection) -> _Section:
    # the algorithms are DES2 or SM4 here (their KCV methods were checked)
    return _Section(
        section.domain,
        key_label(section.domain, KeyKind.TRANSPORT, section.transport_key, section.transport_key_version),
        tuple((k.wrapped, Algorithm(k.algorithm)) for k in section.keys),
        tuple((k.name, k.usage, k.algorithm, k.kcv_method, bundle.hexs(k.kcv)) for k in section.keys),
        section.keys[0].wrap)


def verify_sm2(session: TokenSession, checked: _Checked) -> _Checked:
    """A checked bundle with its SM2 signatures verified in ``session``'s token (C_Verify with SM2-SM3 on the
    trusted public key); _Refused if one does not verify. A retryable HsmError or MechanismUnavailable (the token
    or the station's mechanism profile, not the bundle: it trusts SM2 keys) is raised as it is."""
    for spki, message, signature in checked.pending:
        try:
            valid = session.verify(spki, message, signature, SignatureAlgorithm.SM2_SM3)
        except HsmError as error:
            if error.retryable or isinstance(error, MechanismUnavailable):
                raise
            raise _Refused("SM2 signature could not be verified") from None
        if not valid:
            raise _Refused("signature")
    return dataclasses.replace(checked, pending=())


# -- the checking process of Station.open_many: parsing and signatures, pipelined with the token's work -----------

#: Opens a session on the station's token in another process (the checking process): it is pickled to a spawned
#: process, so a picklable callable such as ``functools.partial(runtime.open_station, config)`` (the same module
#: and PIN reference as the station's; the PIN is resolved in that process).
TokenOpener = Callable[[], TokenSession]

_NOTICE = -1  # the sequence number of a message from the checking process that answers no chunk
_SEND_BUFFER = 1 << 20  # bytes the station's end of the pipe holds (the kernel may cap it: net.core.wmem_max)
#: Seconds the station waits for an answer of its checking process before it takes the process for hung (a token
#: call that never returns, a stopped process), stops it and checks the chunk itself. Generous: the first answer
#: includes starting the process and, for SM2, opening its token session.
_ANSWER_WAIT = 60.0


class _AnswerLost(Exception):
    """The answer to a ticket cannot come: it was dropped as stale (another open_many took a later one)."""


def _send_buffer(conn: Any, size: int) -> None:
    """Ask for a larger send buffer on a pipe end (a Unix socket pair); the default is kept if it is refused."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as end:
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class _Checker:
    """The checking process of a station's ``open_many``: it parses and verifies the chunks sent to it over a
    pipe, in order, and answers with each bundle checked or the reason it is refused. A pipe and a process, no
    thread in the station's process (a thread would take the GIL from the token calls). With a ``token`` opener
    and SM2 keys in the trust store it opens a session of its own on the station's token (SoftHSM sessions cannot
    be shared across processes) and verifies SM2 signatures there too; if it cannot, it says so once (a warning
    in the station's log) and leaves them ``pending`` for the station's process. It ends when the station closes
    it, or when the station's process ends (its pipe closes)."""

    def __init__(self, bureau: str, domains: tuple[str, ...], trust: TrustStore, token: TokenOpener | None = None
                 ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        _send_buffer(self._conn, _SEND_BUFFER)  # a chunk goes into the pipe at once, not as the reader takes it
        opener = token if trust.has_sm2 else None
        self._process = ctx.Process(target=_checker_main, args=(child, bureau, domains, trust.spkis(), opener),
                                    name="kms-station-checker", daemon=True)
        self._process.start()
        child.close()
        self._sent = 0
        self._latest = -1  # the latest ticket answered
        self._answers: dict[int, list[_Checked | str]] = {}

    def submit(self, block: list[bytes]) -> _Ticket:
        """Send bundles to be checked; returns their ticket for ``result`` (only this checking process answers
        it). The checking process reads requests as they come (a thread of its own), so this never waits for it to
        finish checking what was sent before, and it never waits on this process reading its answers."""
        self._conn.send((self._sent, block))
        self._sent += 1
        return _Ticket(self, self._sent - 1)

    def result(self, ticket: _Ticket) -> list[_Checked | str]:
        """The answer to ``ticket``: EOFError or OSError if the checking process is gone, TimeoutError if it does
        not answer within ``_ANSWER_WAIT`` seconds, _AnswerLost if the answer was dropped. Answers to earlier
        tickets nobody took (an open_many left early) are dropped."""
        if ticket.checker is not self:
            raise _AnswerLost("a ticket of another checking process")
        seq = ticket.seq
        deadline = time.monotonic() + _ANSWER_WAIT
        while seq not in self._answers:
            if seq <= self._latest:
                raise _AnswerLost("the answer was dropped as stale")
            if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("the checking process did not answer")
            self._take()
        for stale in [t for t in self._answers if t < seq]:
            del self._answers[stale]
        return self._answers.pop(seq)

    def _take(self) -> None:
        seq, results = self._conn.recv()
        self._latest = max(self._latest, seq)
        if seq == _NOTICE:
            log.warning("SM2 signatures are verified in the station's own process: its checking process cannot "
                        "use the station's token (%s)", results)
            return
        self._answers[seq] = cast(list[_Checked | str], results)

    def close(self) -> None:
        self._conn.close()  # the checking process reads EOF and ends
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    @property
    def pid(self) -> int | None:
        return self._process.pid


@dataclass(frozen=True)
class _Ticket:
    """Bundles sent to a checking process: the process that answers them and their sequence number there."""

    checker: _Checker
    seq: int


def _checker_main(conn: Any, bureau: str, domains: tuple[str, ...], spkis: dict[str, tuple[str, bytes]],
                  token: TokenOpener | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt is the station's to handle
    trust = TrustStore.from_spkis(spkis)
    requests: queue.SimpleQueue[tuple[int, list[bytes]] | None] = queue.SimpleQueue()

    def read() -> None:  # requests are read as they come, so that the station never waits to send one
        # EOF or OSError: the station closed the pipe, or its process ended; anything else: a request that cannot
        # be read (the pipe is out of step). No more requests either way: the station checks the rest itself.
        with contextlib.suppress(BaseException):
            while True:
                requests.put(conn.recv())
        requests.put(None)

    # the reader takes the GIL from the checks within a millisecond (not the default 5 ms), so that a chunk the
    # station sends (larger than a pipe holds) does not keep it waiting
    sys.setswitchinterval(0.001)
    # reading before the token is opened: a login that takes long (or never ends) must not keep the station
    # waiting to send a chunk (it stops waiting for answers after _ANSWER_WAIT and checks the chunk itself)
    threading.Thread(target=read, name="kms-station-checker-requests", daemon=True).start()
    session: TokenSession | None = None
    if token is not None:
        try:  # one login, as the station's own (the same PIN reference): no retry if the token refuses it
            session = token()
        except Exception as error:
            conn.send((_NOTICE, _why(error)))
    try:
        while (request := requests.get()) is not None:
            seq, block = request
            results: list[_Checked | str] = []
            for data in block:
                try:
                    checked = check(data, bureau, domains, trust)
                    if checked.pending and session is not None:
                        try:
                            checked = verify_sm2(session, checked)
                        except HsmError as error:  # the token, not the bundle: the station verifies from now on
                            conn.send((_NOTICE, _why(error)))
                            session.close()
                            session = None
                    results.append(checked)
                except _Refused as refused:
                    results.append(refused.reason)
            conn.send((seq, results))
    except OSError:  # the station's process ended
        return
    finally:
        if session is not None:
            session.close()


def _why(error: Exception) -> str:
    """Why the checking process cannot use the token, for the station's log: kms errors are written to be shown
    (no PIN, no key material); anything else only by its kind."""
    return f"{type(error).__name__}: {error}" if isinstance(error, KmsError) else type(error).__name__


class Station:
    def __init__(
        self,
        name: str,
        bureau: str,
        domains: tuple[str, ...],
        session: TokenSession,
        trust: TrustStore,
        ledger: sa.Engine,
        clock: Clock,
        *,
        check_ahead: bool = True,
        checking_token: TokenOpener | None = None,
    ) -> None:
        """``check_ahead``: ``open_many`` checks the next chunk in a checking process while the token works (False:
        every check in this process). ``checking_token``: opens a session on this station's token in that process
        (``TokenOpener``), where SM2 signatures are then verified too; without it (or if it fails) they are verified
        in this process's token."""
        self.name = name
        self.bureau = bureau
        self.domains = domains
        self._session = session
        self._trust = trust
        self._ledger = ledger
        self._clock = clock
        self._check_ahead = check_ahead
        self._checking_token = checking_token
        self._checker: _Checker | None = None

    def close(self) -> None:
        """Stop the checking process of ``open_many``, if one was started (it also ends with this process)."""
        if self._checker is not None:
            checker, self._checker = self._checker, None
            checker.close()

    def __enter__(self) -> Station:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, data: bytes, *, store: bool = False, verify_only: bool = False) -> OpenReport:
        """Verify one bundle and unwrap its keys into this station's token, recomputing every KCV.

        Then, unless ``verify_only``, record its serial as opened (a second open is a replay) and, with ``store``,
        keep the keys as token objects labelled card/<card_ref>/<domain>/<key>. ``verify_only`` is a dry run:
        nothing is recorded or kept.

        Raises BundleRejected for any reason to distrust the bundle; AlreadyExists if the card's keys are already
        stored here; a retryable HsmError if the token failed (the bundle may be fine); MechanismUnavailable if the
        station's token or mechanism profile lacks SM2 or SM4 for a section whose key it trusts (its configuration).
        Returns a report whose ``ok`` is False only if a recomputed KCV differs from the sealed one (then nothing is
        kept or recorded).
        """
        if store and verify_only:
            raise InvalidArgument("store", "cannot store keys in a verify-only open")
        parsed = self._checked(data)
        if verify_only:
            if self._seen(parsed.serial):
                raise _reject("replay")
            return self._unwrap_all(parsed, store=False)[0]
        return self._open_recorded(parsed, store)

    def open_many(self, bundles: Iterable[bytes], *, chunk: int = 32) -> Iterator[OpenReport | BundleRejected]:
        """Open bundles as ``open(data)`` does (keys checked, not stored), but record the opened serials of up to
        ``chunk`` bundles in one ledger transaction: one commit, i.e. one sync to disk, per chunk rather than per
        bundle — on a disk with slow syncs most of what opening one bundle costs.

        Pipelined: while the token unwraps one chunk's keys, the next chunk is parsed and its signatures verified
        in a checking process of this station's (started when a second chunk arrives, with ``check_ahead``; threads
        would wait for each other's GIL), SM2 signatures too if it has a ``checking_token``: a chunk is read from
        ``bundles`` before the one before it is opened. The first chunk is checked here, or, if the checking
        process is already running (an earlier ``open_many``), partly here and partly there (``_first``). Every
        bundle is still checked before its keys are unwrapped; if the checking process fails, the chunk is checked
        here.

        Yields, in order, each bundle's report (``ok`` False: a KCV mismatch, not recorded) or the BundleRejected
        that refused it, once its chunk is committed. A replay is refused before any token work, also within a
        chunk. An error that is not about one bundle (a retryable HsmError, MechanismUnavailable, the ledger) ends
        the iteration: nothing of the unfinished chunk is recorded, and every bundle yielded before it is. If
        ``bundles`` itself fails (a stream or a file that cannot be read, or an interrupt while it reads), the
        bundles it gave before are opened and yielded first, then its error is raised: as with ``open`` one bundle
        at a time, every bundle received is opened.
        """
        if chunk < 1:
            raise InvalidArgument("chunk", "must be at least 1")
        source = iter(bundles)
        pending: tuple[list[bytes], list[_Part]] | None = None  # read, not yet opened
        while True:
            block, failure = _take(source, chunk)
            job = None
            if block:  # checked ahead in the checking process while the chunk before it is opened
                job = (block, [(block, self._submit(block))] if pending is not None else self._first(block))
            if pending is not None:
                yield from self._open_chunk(*pending)
            pending = job
            if failure is not None or len(block) < chunk:
                if pending is not None:
                    yield from self._open_chunk(*pending)
                if failure is not None:
                    raise failure
                return

    def _first(self, block: list[bytes]) -> list[_Part]:
        """The first chunk of an ``open_many``: checked here, or, if the checking process is already running (an
        earlier ``open_many``), its first bundles here and the rest there meanwhile, in two parts, so that the
        token starts on the first bundles while the checking process checks the rest."""
        if self._checker is None or len(block) <= _FIRST_HERE:
            return [(block, None)]
        here, soon, later = block[:_FIRST_HERE], block[_FIRST_HERE:3 * _FIRST_HERE], block[3 * _FIRST_HERE:]
        return [(here, None), (soon, self._submit(soon)), *([(later, self._submit(later))] if later else [])]

    def _submit(self, block: list[bytes]) -> _Ticket | None:
        """``block`` checked in the checking process (started on first use), or None: checked here."""
        if not self._check_ahead:
            return None
        try:
            if self._checker is None:
                self._checker = _Checker(self.bureau, self.domains, self._trust, self._checking_token)
            return self._checker.submit(block)
        except Exception as error:
            log.warning("bundle checks in-process: the checking process is unavailable (%s)", type(error).__name__)
            self._check_ahead = False
            self.close()
            return None
        except BaseException:  # an interrupt, maybe mid-message: the pipe cannot be trusted to be in step
            self.close()
            raise

    def _check_block(self, block: list[bytes], ahead: _Ticket | None
                     ) -> list[_Checked | BundleRejected]:
        # only the checking process that was sent the block answers for it (not one started after a close)
        if ahead is not None and ahead.checker is self._checker and self._checker is not None:
            try:
                results = self._checker.result(ahead)
            except _AnswerLost:
                log.warning("bundle checks in-process: the checking process's answer was dropped")
            except Exception as error:
                log.warning("bundle checks in-process: the checking process failed (%s)", type(error).__name__)
                self._check_ahead = False
                self.close()
            except BaseException:  # an interrupt, maybe mid-message: the pipe cannot be trusted to be in step
                self.close()
                raise
            else:
                return [_reject(r) if isinstance(r, str) else self._pending_checked(r) for r in results]
        checked: list[_Checked | BundleRejected] = []
        for data in block:
            try:
                checked.append(self._checked(data))
            except BundleRejected as rejected:
                checked.append(rejected)
        return checked

    def _pending_checked(self, checked: _Checked) -> _Checked | BundleRejected:
        """A bundle the checking process checked, its SM2 signatures (if any) verified in this station's token."""
        try:
            return self._verify_pending(checked)
        except BundleRejected as rejected:
            return rejected

    def _open_chunk(self, block: list[bytes], parts: list[_Part]) -> list[OpenReport | BundleRejected]:
        try:
            return self._open_chunk_once(parts)
        except sa.exc.IntegrityError:
            # Another process recorded one of these serials after this one looked: the chunk was rolled back
            # (nothing stored, nothing recorded), so each bundle is opened again on its own.
            results: list[OpenReport | BundleRejected] = []
            for data in block:
                try:
                    results.append(self.open(data))
                except BundleRejected as rejected:
                    results.append(rejected)
            return results

    def _open_chunk_once(self, parts: list[_Part]) -> list[OpenReport | BundleRejected]:
        """Open a chunk's parts in order, in one ledger transaction: each part's checks taken (here or from the
        checking process), its serials looked up in one statement, its keys unwrapped; then every opened serial
        recorded in one statement and one commit."""
        results: list[OpenReport | BundleRejected] = []
        with self._ledger.begin() as conn:
            claimed: set[str] = set()
            rows = []
            opened_at = rfc3339(self._clock.now())
            for part in parts:
                checked = self._check_block(*part)
                serials = [p.serial for p in checked if isinstance(p, _Checked)]
                claimed.update(conn.execute(
                    sa.select(opened_bundles.c.serial).where(opened_bundles.c.serial.in_(serials))).scalars())
                for parsed in checked:
                    try:
                        if isinstance(parsed, BundleRejected):
                            raise parsed
                        if parsed.serial in claimed:
                            raise _reject("replay")
                        report = self._unwrap_all(parsed, store=False)[0]
                    except BundleRejected as rejected:
                        results.append(rejected)
                        continue
                    results.append(report)
                    if report.ok:
                        claimed.add(parsed.serial)
                        rows.append({"serial": parsed.serial, "card_ref": parsed.card_ref, "opened_at": opened_at})
            if rows:
                conn.execute(opened_bundles.insert(), rows)
        return results

    def _checked(self, data: bytes) -> _Checked:
        """The checked bundle, if it is for this station and every section is signed by its domain's key (SM2
        signatures verified in this station's token)."""
        try:
            checked = check(data, self.bureau, self.domains, self._trust)
        except _Refused as refused:
            raise _reject(refused.reason) from None
        return self._verify_pending(checked)

    def _verify_pending(self, checked: _Checked) -> _Checked:
        """A checked bundle's SM2 signatures (if any: ECDSA-only bundles pass straight through) verified in this
        station's token; BundleRejected if one does not verify."""
        if not checked.pending:
            return checked
        try:
            return verify_sm2(self._session, checked)
        except _Refused as refused:
            raise _reject(refused.reason) from None

    def _open_recorded(self, parsed: _Checked, store: bool) -> OpenReport:
        """Open in one ledger transaction: the serial is claimed first (a replay is refused before any token work,
        with one statement rather than a look-up and an insert), the keys are unwrapped and checked, and stored
        if asked; a KCV mismatch, a refusal or an error rolls the claim back, and no stored key outlives a
        transaction that did not commit."""
        stored: list[object] = []
        try:
            with self._ledger.begin() as conn:
                try:
                    conn.execute(opened_bundles.insert().values(
                        serial=parsed.serial, card_ref=parsed.card_ref, opened_at=rfc3339(self._clock.now())
                    ))
                except sa.exc.IntegrityError:
                    raise _reject("replay") from None
                report, unwrapped = self._unwrap_all(parsed, store)
                if not report.ok:
                    raise _Unmatched(report)
                if store:
                    stored = self._store(parsed, unwrapped)
            return report
        except _Unmatched as unmatched:
            return unmatched.report
        except BaseException:
            discard_objects(stored)  # the ledger rolled back: keep no keys it does not account for
            raise

    def _unwrap_all(self, parsed: _Checked, store: bool) -> tuple[OpenReport, list[StationKeys]]:
        """Unwrap every section's keys (the token keeps none of them) and report their KCVs; a report that is not
        ok names no labels and says nothing is stored. The checked keys, for ``_store``."""
        unwrapped = [self._unwrap(section) for section in parsed.sections]
        kcvs = [[kcv.hex().upper() for kcv in keys.kcvs] for keys in unwrapped]
        ok = all(computed == expected for section, computed_section in zip(parsed.sections, kcvs, strict=True)
                 for (*_, expected), computed in zip(section.keys, computed_section, strict=True))
        labelled = store and ok
        report = OpenReport(serial=parsed.serial, card_ref=parsed.card_ref, stored=labelled, keys=[
            KeyReport(section.domain, name, usage, algorithm, method, expected, computed,
                      card_key_label(parsed.card_ref, section.domain, name) if labelled else None)
            for section, computed_section in zip(parsed.sections, kcvs, strict=True)
            for (name, usage, algorithm, method, expected), computed in zip(section.keys, computed_section,
                                                                            strict=True)])
        return report, unwrapped

    def _unwrap(self, section: _Section) -> StationKeys:
        try:
            # The signed wrap method must be the one the station's transport key unwraps by: a section that says
            # SM4-ECB is never unwrapped by AES key wrap (or the other way round) because the key happens to be AES.
            if self._session.transport_wrap(section.transport_label) != section.wrap:
                raise _reject("the section's wrap method is not its transport key's")
            return self._session.unwrap_card_keys(section.transport_label, section.sealed)
        except HsmError as error:
            if error.retryable or isinstance(error, MechanismUnavailable):
                raise  # the token or this station's mechanism profile (the section's signature was verified)
            raise _reject("unwrap") from None

    def _seen(self, serial: str) -> bool:
        with self._ledger.connect() as conn:
            return conn.execute(
                sa.select(opened_bundles.c.serial).where(opened_bundles.c.serial == serial)
            ).first() is not None

    def _store(self, parsed: _Checked, unwrapped: list[StationKeys]) -> list[object]:
        groups = [(keys, [card_key_label(parsed.card_ref, section.domain, name) for name, *_ in section.keys])
                  for section, keys in zip(parsed.sections, unwrapped, strict=True)]
        taken = [label for _, labels in groups for label in labels if self._session.has_key(label)]
        if taken:
            raise AlreadyExists(f"keys of card {parsed.card_ref} are already stored at this station "
                                f"({taken[0]}); remove them before storing another bundle for the card")
        return store_station_keys(self._session, groups)


def _take(source: Iterator[bytes], n: int) -> tuple[list[bytes], BaseException | None]:
    """Up to ``n`` items of ``source`` (fewer: it ended), and the error it raised, if any (an interrupt too)."""
    block: list[bytes] = []
    try:
        for data in source:
            block.append(data)
            if len(block) == n:
                break
    except BaseException as error:
        return block, error
    return block, None


#: Bundles to open and where they are checked: here (None) or the checking process's ticket for them.
_Part = tuple[list[bytes], _Ticket | None]
#: Bundles of an open_many's first chunk checked in the station's process when its checking process is running.
_FIRST_HERE = 4


class _Unmatched(Exception):
    """A recomputed KCV differs from the sealed one: the open's transaction is rolled back, the report returned."""

    def __init__(self, report: OpenReport) -> None:
        super().__init__("KCV mismatch")
        self.report = report


# -- transport keys handed over to this station ---------------------------------------------------------------------


@dataclass(frozen=True)
class UnwrapKey:
    """A station's RSA key pair for one transport key hand-off: its label, public key (PEM) and the SHA-256 of that
    public key (SubjectPublicKeyInfo DER, hex), what the officers' proposal names and its approvers compare."""

    label: str
    pem: str
    sha256: str
    retired: str = ""  # the long-lived pair of a kms before single-use keys, destroyed when this one was made


def spki_sha256(spki: bytes) -> str:
    """The fingerprint of a hand-off public key: SHA-256 of its SubjectPublicKeyInfo DER, lowercase hex."""
    return hashlib.sha256(spki).hexdigest()


def new_unwrap_key(session: TokenSession, station: str, domain: str) -> UnwrapKey:
    """A fresh RSA key pair in the station's token for one hand-off of a domain's transport key (single use: the
    station destroys it once it unwrapped that key, kms.hsm.session.TokenSession.accept_transport_key).

    The station's long-lived pair for the domain (``kms/station/<station>/unwrap/<domain>``, from a kms before
    single-use keys) is destroyed here, once the new pair exists: every transport key ever handed off under it could
    otherwise be unwrapped again from its saved hand-off bytes with the station's PIN (review F1), and the service
    hands off nothing more to a key that received a transport key already. A hand-off still pending for it can no
    longer be accepted: it is proposed again to the new key (docs/operations.md)."""
    label = unwrap_key_label(station, domain, secrets.token_hex(8))
    spki = session.generate_unwrap_keypair(label)
    legacy = unwrap_key_label(station, domain)
    retired = legacy if session.retire_unwrap_pair(legacy) else ""
    return UnwrapKey(label, spki_pem(spki).decode(), spki_sha256(spki), retired)


def unwrap_key_for(session: TokenSession, station: str, domain: str, sha256: str) -> str:
    """The label of the station's hand-off key pair whose public key has this SHA-256 (empty: a hand-off made before
    single-use keys, to the station's long-lived pair). NotFound if the station has no such key: it was used (and
    destroyed) already, or it was made in another token."""
    legacy = unwrap_key_label(station, domain)
    if not sha256:
        if session.has_public_key(legacy):
            return legacy
        raise NotFound(f"{station} holds no {domain} unwrap key for this hand-off (it was used already)")
    for label, spki in session.unwrap_keys(legacy).items():
        if spki_sha256(spki) == sha256.lower():
            return label
    raise NotFound(f"{station} holds no {domain} unwrap key with SHA-256 {sha256} (each is used once and then "
                   "destroyed; make a new one with kms station unwrap-key for a new ceremony)")


def unused_unwrap_keys(session: TokenSession, station: str, domain: str) -> list[UnwrapKey]:
    """The station's single-use hand-off keys for ``domain`` that no hand-off has used yet (``kms station unwrap-key
    --list``): a key made for a ceremony that was abandoned stays until it is discarded."""
    legacy = unwrap_key_label(station, domain)
    return [UnwrapKey(label, spki_pem(spki).decode(), spki_sha256(spki))
            for label, spki in session.unwrap_keys(legacy).items() if label != legacy]


def discard_unwrap_key(session: TokenSession, station: str, domain: str, sha256: str) -> str:
    """Destroy both halves of the unused single-use hand-off key whose public key has this SHA-256 (``kms station
    unwrap-key --discard``); returns its label. A hand-off proposed to it can then no longer be accepted (the
    ceremony is proposed again to a new key). InvalidArgument naming ``--discard`` for a value that is not a
    SHA-256; NotFound if the station holds no such key."""
    if len(sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha256):
        raise InvalidArgument("--discard", "must be the SHA-256 of an unwrap key's public key (64 hex digits)")
    # Only a key --list shows: not the long-lived pair of a station made before single-use keys (unwrap_key_for
    # would find it by its SHA-256 too), which a hand-off made to it may still be waiting for.
    for key in unused_unwrap_keys(session, station, domain):
        if key.sha256 == sha256.lower():
            session.retire_unwrap_pair(key.label)
            return key.label
    raise NotFound(f"{station} holds no unused single-use {domain} unwrap key with SHA-256 {sha256} (kms station "
                   "unwrap-key --list shows them)")


def accept_transport_key(session: TokenSession, station: str, domain: str, label: str, wrapped: bytes,
                         issuer_kcv: str, algorithm: Algorithm = Algorithm.AES256, unwrap_key_sha256: str = "") -> str:
    """Unwrap a transport key (AES-256, or SM4) sent to this station into its token (unwrap only) with the hand-off
    key pair whose public key has SHA-256 ``unwrap_key_sha256``, and check its KCV against the issuer's; on a
    mismatch the station's copy is removed and HsmError raised. The hand-off key pair is destroyed in both cases
    (single use). Returns the KCV."""
    unwrap_label = unwrap_key_for(session, station, domain, unwrap_key_sha256)
    kcv = (session.accept_transport_key(unwrap_label, wrapped, label) if algorithm is Algorithm.AES256
           else session.accept_transport_key(unwrap_label, wrapped, label, algorithm=algorithm)).hex().upper()
    if kcv != issuer_kcv.upper():
        session.destroy(label)
        raise HsmError(f"transport key {label}: the KCV at the station differs from the issuer's; key removed")
    return kcv
