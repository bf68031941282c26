"""The audit log's external anchor: every signed checkpoint also in OpenBao KV v2, create-only (docs/audit.md §5).

The audit signer keeps the head it signed last in its own token, so it refuses to sign a log rewritten behind its
back; but whoever holds the audit token's PIN and can write the database can rewrite both, re-sign, and leave no trace
in either. The anchor puts every checkpoint somewhere that person cannot rewrite: the signer's process (the one that
signs it, holding the audit AppRole; never the front end) writes it to
``<mount>/data/<prefix>/checkpoints/<size, 16 digits>`` with ``cas=0``, and its policy
(``deploy/openbao/kms-audit-anchor.hcl``) grants only ``create`` on that path: an anchor, once written, can be neither
overwritten nor deleted by the role that wrote it. ``compare`` then holds an export against the anchored history
(``kms audit check-anchors``) and names the first checkpoint where they disagree.

Never blocking, never losing: a checkpoint is first written to the signer's spool directory (one file per checkpoint,
named by its size, fsynced) and only then sent. If OpenBao cannot be reached (or is sealed, or the login fails), the
checkpoint stays valid locally and waits in the spool; a thread retries the backlog every few seconds, oldest first,
and nothing after an unsent checkpoint is sent before it (anchors are written in sequence order). While OpenBao is
failing, a checkpoint does not wait for it at all (one attempt per retry period, each bounded by the client's
timeout). The backlog survives a restart of the signer and shows in ``status`` (the service's metrics
``kms_audit_anchor_backlog`` and friends). A checkpoint whose path already holds an anchor (only another signing of
the same size can get there: a second replica, a re-signed log) is never overwritten: it is moved to
``<spool>/conflicts/`` and counted, and ``kms audit check-anchors`` shows which of the two the export carries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hvac
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hvac import exceptions as bao_errors

from kms.audit.log import GENESIS, Checkpoint, checkpoint_message
from kms.config import Config
from kms.errors import ConfigError, InvalidArgument, PermissionDenied, Unavailable
from kms.files import private_dir, write_private
from kms.secrets import client_for

log = logging.getLogger(__name__)

ANCHOR_FORMAT = "kms-audit-checkpoint"  # the anchored value is the checkpoint as signed, with its key and signature
DIGITS = 16  # the size in the path, zero-padded: the names sort in sequence order
RETRY_SECONDS = 5.0
TIMEOUT_SECONDS = 3.0  # one request to OpenBao from the signer: a checkpoint never waits longer for it
SEND_AT_ONCE = 16  # anchors a checkpoint sends itself (the backlog before it first); the retry thread sends the rest
_NAME = re.compile(rf"(\d{{{DIGITS}}})\.json")
ClientSource = Callable[[], Any]  # returns an authenticated hvac.Client


def anchor_path(prefix: str, size: int) -> str:
    return f"{prefix}/checkpoints/{size:0{DIGITS}d}"


def anchor_value(checkpoint: Checkpoint) -> dict[str, Any]:
    """What is anchored for one checkpoint: its signed fields, the key's label and the signature (hex)."""
    return {"format": ANCHOR_FORMAT, "version": 1, "size": checkpoint.size, "head": checkpoint.head,
            "at": checkpoint.at, "key": checkpoint.key, "signature": checkpoint.signature.hex()}


def from_value(value: Mapping[str, Any]) -> Checkpoint:
    """An anchored value as a Checkpoint; ValueError when it is not one."""
    try:
        if value.get("format") != ANCHOR_FORMAT or value.get("version") != 1:
            raise ValueError("not an anchored checkpoint")
        return Checkpoint(int(value["size"]), str(value["head"]), str(value["at"]), str(value["key"]),
                          bytes.fromhex(str(value["signature"])))
    except (KeyError, TypeError) as error:
        raise ValueError(f"an anchored checkpoint lacks {error}") from None


@dataclass(frozen=True)
class AnchorStatus:
    """What the signer's anchor reports (metrics, logs): checkpoints waiting in the spool, the size anchored last by
    this process, checkpoints refused because their path was taken, and the last failure (empty once it works)."""

    backlog: int = 0
    anchored: int = 0
    conflicts: int = 0
    error: str = ""
    oldest: int = 0  # the size of the oldest checkpoint waiting (0: none)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Anchor:
    """Writes signed checkpoints to OpenBao KV v2, create-only, in sequence order, through a spool directory.

    ``client``: an authenticated hvac.Client, or a function that returns one (called when first needed and again
    after a refusal that a new login may cure, e.g. an expired token). ``clock``: monotonic seconds (injectable)."""

    def __init__(self, client: Any, *, mount: str, prefix: str, spool: Path, retry_seconds: float = RETRY_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._source: ClientSource | None = client if callable(client) and not isinstance(client, hvac.Client) \
            else None
        self._client: Any = None if self._source is not None else client
        self.mount, self.prefix = mount, prefix
        self.spool = private_dir(spool)
        self._conflicts_dir = self.spool / "conflicts"
        self._retry = retry_seconds
        self._clock = clock
        self._spooling = threading.Lock()  # writing to the spool: short
        self._sending = threading.Lock()  # sending the backlog: a checkpoint never waits for it (record)
        self._failed_at: float | None = None  # when the last attempt failed: none before retry_seconds have passed
        self._anchored = 0
        self._error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the signer's side -----------------------------------------------------------------------------------------

    def record(self, checkpoint: Checkpoint) -> None:
        """Spool ``checkpoint`` (durably), then send the backlog (at most ``SEND_AT_ONCE`` of it: the retry thread
        sends the rest) — unless OpenBao failed less than a retry period ago, or the retry thread is sending right
        now. Never raises for OpenBao: a checkpoint is valid whether or not it is anchored yet."""
        with self._spooling:
            name = self.spool / f"{checkpoint.size:0{DIGITS}d}.json"
            text = json.dumps(anchor_value(checkpoint), sort_keys=True)
            try:
                if not name.exists():
                    write_private(name, text)
                elif name.read_text(encoding="utf-8") != text:  # the same size signed again while still waiting
                    kept = self._conflicts_dir / f"{name.stem}.{secrets.token_hex(4)}.json"
                    write_private(kept, text)
                    log.error("audit anchor: a checkpoint at %d was signed again while the first is still waiting to "
                              "be anchored; the second is kept in %s", checkpoint.size, kept)
                _fsync_dir(name.parent)
            except OSError as error:  # the checkpoint cannot be kept for its anchor: it is not given out
                raise Unavailable(f"the audit anchor spool {self.spool} cannot be written ({error.strerror})"
                                  ) from None
        if self._failed_at is not None and self._clock() - self._failed_at < self._retry:
            return
        if self._sending.acquire(blocking=False):
            try:
                self._flush_locked(SEND_AT_ONCE)
            finally:
                self._sending.release()

    def flush(self) -> AnchorStatus:
        """Send the whole backlog now, oldest first, stopping at the first one that cannot be sent; the status
        after."""
        with self._sending:
            self._flush_locked()
        return self.status()

    def status(self) -> AnchorStatus:
        pending = self._pending()
        conflicts = sum(1 for p in self._conflicts_dir.iterdir() if p.is_file()) if self._conflicts_dir.is_dir() \
            else 0
        oldest = int(pending[0].name[:DIGITS]) if pending else 0
        return AnchorStatus(len(pending), self._anchored, conflicts, self._error, oldest)

    def start(self) -> None:
        """Retry the backlog every ``retry_seconds`` in a thread of this process (the signer's)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-anchor", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=TIMEOUT_SECONDS * 2)

    def _run(self) -> None:
        while not self._stop.wait(self._retry):
            try:
                with self._sending:
                    if self._pending():
                        self._flush_locked()
            except Exception:  # the next round tries again; the spool keeps every checkpoint
                log.exception("audit anchor: the backlog could not be sent")

    # -- holding the sending lock -----------------------------------------------------------------------------------

    def _pending(self) -> list[Path]:
        return sorted(p for p in self.spool.iterdir() if _NAME.fullmatch(p.name))

    def _flush_locked(self, limit: int | None = None) -> None:
        pending = self._pending()
        for path in pending[:limit]:
            try:
                value = json.loads(path.read_text(encoding="utf-8"))
                int(value["size"])
            except (ValueError, KeyError, TypeError):  # not written by this module (its writes are atomic)
                log.error("audit anchor: %s is not a spooled checkpoint; moved to %s", path, self._set_aside(path))
                continue
            outcome = self._send(value)
            if outcome == "sent":
                path.unlink()
                self._anchored = int(value["size"])
            elif outcome == "taken":
                log.error("audit anchor: a checkpoint at %d was signed, but an anchor at %d exists already; it is "
                          "kept in %s, and kms audit check-anchors shows which one an export carries",
                          value["size"], value["size"], self._set_aside(path))
            else:
                if self._failed_at is None or outcome != self._error:
                    log.warning("audit anchor: %s; %d checkpoint(s) wait in %s and are sent in order once it works",
                                outcome, len(pending) - pending.index(path), self.spool)
                self._error, self._failed_at = outcome, self._clock()
                return
        if self._failed_at is not None:
            log.info("audit anchor: the backlog is written (anchored up to %d)", self._anchored)
        self._error, self._failed_at = "", None

    def _set_aside(self, path: Path) -> Path:
        """Move a spooled file to conflicts/ under a name no other file there has; the new path."""
        private_dir(self._conflicts_dir)
        target = self._conflicts_dir / path.name
        if target.exists():
            target = self._conflicts_dir / f"{path.stem}.{secrets.token_hex(4)}.json"
        path.replace(target)
        return target

    def _send(self, value: dict[str, Any]) -> str:
        """"sent", "taken" (an anchor exists at that path), or why it could not be sent (kept for a retry)."""
        path = anchor_path(self.prefix, int(value["size"]))
        for attempt in (1, 2):
            try:
                client = self._connected()
                client.secrets.kv.v2.create_or_update_secret(path=path, secret=value, cas=0,
                                                             mount_point=self.mount)
                return "sent"
            except bao_errors.InvalidRequest as error:
                if "check-and-set" in str(error):
                    return "taken"
                return f"OpenBao refused the anchor ({_first_line(error)})"
            except bao_errors.Forbidden:
                # A create-only role is refused an existing path, and an expired token everything: log in again
                # once, then ask OpenBao whether this role may create here at all.
                if attempt == 1 and self._source is not None:
                    self._client = None
                    continue
                return "taken" if self._may_create(path) else (
                    f"the audit anchor role may not create {self.mount}/data/{path} (see "
                    "deploy/openbao/kms-audit-anchor.hcl)")
            except bao_errors.VaultDown:
                return "OpenBao is sealed"
            except bao_errors.VaultError as error:
                return f"OpenBao failed ({type(error).__name__})"
            except ConfigError as error:
                return str(error)
            except Exception as error:  # requests' connection errors and timeouts
                return f"OpenBao cannot be reached ({type(error).__name__})"
        return "unreachable"  # pragma: no cover - the loop returns

    def _connected(self) -> Any:
        if self._client is None:
            assert self._source is not None
            self._client = self._source()
        return self._client

    def _may_create(self, path: str) -> bool:
        try:
            answer = self._connected().adapter.post("/v1/sys/capabilities-self",
                                                    json={"paths": [f"{self.mount}/data/{path}"]})
            return "create" in answer["data"]["capabilities"]
        except Exception:
            return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


# -- the connection ----------------------------------------------------------------------------------------------


def connector(cfg: Config, *, timeout: float = TIMEOUT_SECONDS) -> ClientSource:
    """A function returning an hvac.Client logged in with the AppRole of the configuration's ``openbao`` block,
    whose requests time out after ``timeout`` seconds: an anchor write never holds a checkpoint for long.

    The login is this process's shared kms.secrets client's (``client_for``: login, token renewal, a wrapped
    secret_id unwrapped once — a second client of its own would try the spent wrapping token again); the client
    returned carries its token with a timeout of its own. Called again after a refusal (an expired token), it asks
    the shared client, which renews or logs in again."""
    if cfg.openbao is None:
        raise ConfigError(f"{cfg.path}: audit.anchor needs the top-level 'openbao' block")
    settings = cfg.openbao
    verify: bool | str = str(settings.ca_cert) if settings.ca_cert is not None else True

    def connect() -> Any:
        shared = client_for(settings).client()
        return hvac.Client(url=settings.address, token=shared.token, verify=verify, timeout=timeout)
    return connect


def from_config(cfg: Config) -> Anchor | None:
    """The signer's anchor from ``audit.anchor`` (None when the section has none)."""
    if cfg.audit is None or cfg.audit.anchor is None:
        return None
    settings = cfg.audit.anchor
    assert settings.spool is not None
    return Anchor(connector(cfg), mount=settings.mount, prefix=settings.prefix, spool=settings.spool)


# -- the auditor's side: read the anchors, compare an export ---------------------------------------------------------


def read_anchors(client: Any, mount: str, prefix: str, *, upto: int | None = None,
                 created: dict[int, str] | None = None) -> dict[int, Checkpoint]:
    """The anchored checkpoints by size (those up to ``upto`` and the first one after it, if given; the auditor's
    check reads them all). ``created``, if given, is filled with OpenBao's own creation time of each (information
    only: ``compare`` never decides by a time). Raises
    PermissionDenied (the token may not list or read them), Unavailable (OpenBao cannot be reached) or
    InvalidArgument (an anchor is not an anchored checkpoint)."""
    folder = f"{prefix}/checkpoints"
    try:
        try:
            keys = client.secrets.kv.v2.list_secrets(path=folder, mount_point=mount)["data"]["keys"]
        except bao_errors.InvalidPath:
            return {}  # nothing anchored yet
        sizes = sorted(int(k) for k in keys if re.fullmatch(r"\d+", k))
        if upto is not None:
            after = [s for s in sizes if s > upto][:1]
            sizes = [s for s in sizes if s <= upto] + after
        found = {}
        for size in sizes:
            answer = client.secrets.kv.v2.read_secret_version(path=anchor_path(prefix, size), mount_point=mount,
                                                               raise_on_deleted_version=True)["data"]
            value = answer["data"]
            if created is not None:
                created[size] = str((answer.get("metadata") or {}).get("created_time", ""))
            try:
                checkpoint = from_value(value)
            except ValueError as error:
                raise InvalidArgument("anchor", f"{mount}/{anchor_path(prefix, size)}: {error}") from None
            if checkpoint.size != size:
                raise InvalidArgument("anchor", f"{mount}/{anchor_path(prefix, size)} holds the checkpoint at "
                                                f"{checkpoint.size}")
            found[size] = checkpoint
        return found
    except bao_errors.Forbidden:
        raise PermissionDenied(f"OpenBao refused to list or read {mount}/{folder} (see "
                               "deploy/openbao/kms-auditor.hcl)") from None
    except bao_errors.VaultDown:
        raise Unavailable("OpenBao is sealed; try again once it is unsealed") from None
    except bao_errors.VaultError as error:
        raise Unavailable(f"OpenBao failed ({type(error).__name__}); try again") from None
    except (InvalidArgument, PermissionDenied):
        raise
    except OSError as error:  # requests' connection errors are OSErrors
        raise Unavailable(f"OpenBao cannot be reached ({type(error).__name__}); try again") from None


@dataclass(frozen=True)
class AnchorVerdict:
    ok: bool
    compared: int  # checkpoints compared (anchored or in the export, up to the export's end, or ``until``)
    anchors: int  # anchors read
    last_seq: int  # the export's last record
    newest: int  # the newest anchor's size (0: none)
    bad_size: int | None = None
    problem: str = ""  # head, signature, missing in export, missing in anchor, anchor forged, nothing compared
    detail: str = ""
    later: int = 0  # anchors after the export's end (or after ``until``)
    before: int = 0  # the export's checkpoints before the first anchor (signed before anchoring began)
    until: int | None = None  # the auditor compared only up to this size (--until)
    omitted: int = 0  # records the export omits (a filtered export: only their digests are chained)

    def summary(self) -> str:
        if self.ok:
            before = f"; {self.before} checkpoints from before the first anchor not compared" if self.before else ""
            until = (f"; compared only up to {self.until} as asked (--until): {self.later} later anchors not "
                     "checked") if self.until is not None else ""
            omitted = (f"; a filtered export: {self.omitted} records omitted (their digests chained, their "
                       "contents not shown)") if self.omitted else ""
            return (f"anchors agree: {self.compared} checkpoints compared up to record {self.last_seq} "
                    f"({self.anchors} anchors read; newest anchor at {self.newest}{before}{until}{omitted})")
        return f"audit log NOT anchored: checkpoint {self.bad_size}: {self.problem}: {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "compared": self.compared, "anchors": self.anchors, "last_seq": self.last_seq,
                "newest_anchor": self.newest, "before_first_anchor": self.before, "bad_size": self.bad_size,
                "problem": self.problem or None, "detail": self.detail or None, "until": self.until,
                "later_anchors": self.later, "omitted": self.omitted}


_RECORD = re.compile(r'^\{"type":"record","seq":(\d+),"prev":"[0-9a-f]{64}","hash":"[0-9a-f]{64}","body":')
_OMITTED = re.compile(r'^\{"type":"omitted","seq":(\d+),.*"digest":"([0-9a-f]{64})"\}$')


def compare(lines: Iterable[str], anchors: Mapping[int, Checkpoint],
            public_key: ec.EllipticCurvePublicKey | None = None, *, until: int | None = None,
            created: Mapping[int, str] | None = None) -> AnchorVerdict:
    """Hold an export (its lines) against every anchored checkpoint. Named first: the first checkpoint where the
    history differs (``head``, ``anchor forged``); then an anchor beyond the export's end (``missing in export``);
    if the history agrees, the first other disagreement. The kinds:

    - ``head``: the chain the export carries, recomputed from its records, is not the anchored head at that size;
    - ``signature``: the export's checkpoint at that size has the anchored head but another time or signature (the
      same head signed twice: a second replica, or the key used outside the signer);
    - ``missing in export``: a checkpoint was anchored at that size but the export carries none there, or the export
      ends before an anchor: the log was cut back, or the export is older than that anchor. Only the auditor can
      tell the two apart, and says so with ``until`` (compare only up to that size; the verdict says so). No time
      the export or an anchor carries decides it: both are signed by whoever holds the audit PIN;
    - ``missing in anchor``: the export carries a checkpoint that was never anchored (forged, or still in the
      signer's backlog: ``kms_audit_anchor_backlog``);
    - ``anchor forged``: with ``public_key``, an anchor not signed by the audit key;
    - ``nothing compared``: anchors exist but none is within the export (or ``until``).

    ``created``: OpenBao's own creation time of each anchor (information shown in the verdict, never used to
    decide). The export's own integrity (links, hashes, signatures, seal) is ``kms audit verify``'s; run it
    first."""
    read, beyond, newest = len(anchors), 0, max(anchors) if anchors else 0
    if until is not None:
        beyond = sum(1 for s in anchors if s > until)
        anchors = {s: a for s, a in anchors.items() if s <= until}
    wanted = set(anchors)
    heads: dict[int, str] = {}
    exported: dict[int, Checkpoint] = {}
    prev, last, omitted = GENESIS, 0, 0
    for raw in lines:
        line = raw.rstrip("\n")
        match = _RECORD.match(line)
        if match is not None and line.endswith("}"):
            seq, digest = int(match.group(1)), hashlib.sha256(line[match.end():-1].encode()).digest()
        elif (skipped := _OMITTED.match(line)) is not None:
            seq, digest = int(skipped.group(1)), bytes.fromhex(skipped.group(2))
            omitted += 1
        elif line.startswith('{"type":"checkpoint"'):
            doc = json.loads(line)
            cp = Checkpoint(int(doc["size"]), str(doc["head"]), str(doc["at"]), str(doc["key"]),
                            bytes.fromhex(doc["signature"]))
            exported.setdefault(cp.size, cp)
            continue
        else:
            continue
        prev = hashlib.sha256(prev + digest).digest()
        last = seq
        if seq in wanted:
            heads[seq] = prev.hex()
    end = last if until is None else min(last, until)
    # Checkpoints signed before anchoring began (audit.anchor set on a running deployment) have no anchor to meet:
    # compared is what follows the first anchor. With no anchor at all, nothing is skipped (a wrong mount or prefix
    # must not pass for agreement).
    first = min(anchors) if anchors else 0
    within = sorted({s for s in anchors if s <= end} | {s for s in exported if first <= s <= end})
    later = sorted(s for s in anchors if s > last)

    def bad(size: int, problem: str, detail: str, compared: int) -> AnchorVerdict:
        return AnchorVerdict(False, compared, read, last, newest, size, problem, detail, len(later),
                             until=until, omitted=omitted)

    # First the history: the first checkpoint where the chain differs from the anchored one (or an anchor is forged);
    # then the cut back; only where the history agrees, the first checkpoint missing on either side or signed twice.
    # A log rewritten and re-signed throughout is so named where its chain departs from the anchors.
    for count, size in enumerate(within, start=1):
        anchor, mine = anchors.get(size), exported.get(size)
        if anchor is None:
            continue
        if public_key is not None and not _signed(anchor, public_key):
            return bad(size, "anchor forged", f"the anchor at {size} is not signed by the audit key", count)
        if heads.get(size) != anchor.head:
            return bad(size, "head", f"the export's chain at {size} is {heads.get(size, 'absent')}, the anchored "
                                     f"head is {anchor.head}", count)
        if mine is not None and mine.head != anchor.head:
            return bad(size, "head", f"the export's checkpoint at {size} names head {mine.head}, the anchored head "
                                     f"is {anchor.head}", count)
    if later:
        cut = later[0]
        when = f", created in OpenBao {created[cut]}" if created and cut in created else ""
        advice = ("" if until is not None else
                  f"; if this export is older than that anchor, compare it with --until {last}")
        return bad(cut, "missing in export", f"the export ends at record {last}, but a checkpoint at {cut} was "
                                             f"anchored{when} ({len(later)} anchors after the export's end): the log "
                                             f"was cut back, or the export is older than anchor {cut}{advice}",
                   len(within))
    if read and not any(s <= end for s in anchors):
        return bad(first or newest, "nothing compared", f"{read} anchors exist but none is within the export (up "
                                                        f"to record {end}): nothing was compared", 0)
    for count, size in enumerate(within, start=1):
        anchor, mine = anchors.get(size), exported.get(size)
        if anchor is None:
            after = " (nothing is anchored there at all: check the mount and prefix)" if not anchors else (
                " after the newest anchor (the signer's anchor backlog may not be written yet)" if size > newest
                else "")
            return bad(size, "missing in anchor", f"the export's checkpoint at {size} was never anchored{after}",
                       count)
        if mine is None:
            return bad(size, "missing in export", f"a checkpoint was anchored at {size} (signed {anchor.at}); the "
                                                  "export carries none there", count)
        if (mine.signature, mine.at, mine.key) != (anchor.signature, anchor.at, anchor.key):
            return bad(size, "signature", f"the export's checkpoint at {size} (signed {mine.at}) is not the anchored "
                                          f"one (signed {anchor.at}), though the head is the same", count)
    return AnchorVerdict(True, len(within), read, last, newest, later=beyond,
                         before=sum(1 for s in exported if s < first), until=until, omitted=omitted)


def _signed(checkpoint: Checkpoint, public_key: ec.EllipticCurvePublicKey) -> bool:
    try:
        public_key.verify(checkpoint.signature, checkpoint_message(checkpoint.size, checkpoint.head, checkpoint.at),
                          ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError):
        return False
