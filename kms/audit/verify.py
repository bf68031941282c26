"""Offline verification of an audit export (JSON Lines, kms.audit.log): nothing but the file and the audit public key.

Checks every record's sequence number, its link to the previous record and its hash over the body as written,
every checkpoint's signature and head, and the export seal that must close the file: its signature, its head, and
that the header's size, nonce and filters are the sealed ones (and the nonce the one the auditor expected, if given).
The first problem is named by sequence number and kind:

- ``edited``: a record's hash does not match its content, or its successor no longer chains to it; or the header
  says other than the seal;
- ``removed``: a sequence number is missing;
- ``inserted``: a sequence number appears twice, or a line follows the seal;
- ``reordered``: records appear out of order (a record missing in its place but found further on, however far);
- ``truncated``: the file ends before the last signed checkpoint's size, or it does not end with the seal signed
  for this request (no seal, or the seal of another nonce: an export cut back to an older checkpoint);
- ``checkpoint forged``: a checkpoint's or the seal's signature does not verify, or its head is not the chain's.

A filtered export (time range, domain, kind) carries every record the filter leaves out as an ``omitted`` line (its
body's digest; ``hash_n = SHA-256(hash_{n-1} ‖ SHA-256(body_n))``), so it is verified exactly like a full export:
complete, in order, every shown record's content, up to its signed checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kms.audit.log import EXPORT_VERSION, GENESIS, checkpoint_message, seal_message

_RECORD = re.compile(r'^\{"type":"record","seq":(\d+),"prev":"([0-9a-f]{64})","hash":"([0-9a-f]{64})","body":')
_OMITTED = re.compile(
    r'^\{"type":"omitted","seq":(\d+),"prev":"([0-9a-f]{64})","hash":"([0-9a-f]{64})","digest":"([0-9a-f]{64})"\}$')
_SEQ = re.compile(r'^\{"type":"(?:record|omitted)","seq":(\d+),')
NOT_THIS_REQUEST = "the export does not end with the checkpoint signed for this request"


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    checkpoints: int
    last_seq: int
    covered: int  # records covered by the last good checkpoint or the seal
    bad_seq: int | None = None  # None: the header
    problem: str = ""
    detail: str = ""
    filtered: bool = False
    omitted: int = 0  # records a filter left out (their digests verified in the chain)
    signed_at: str = ""  # the seal's time: when the export was made
    nonce: str = ""  # the nonce the seal was signed for
    nonce_expected: bool = False  # it was checked against the one the auditor kept apart, not only the header's

    def summary(self) -> str:
        if self.ok:
            shown = f", {self.records - self.omitted} shown and {self.omitted} left out by the filter" if (
                self.filtered) else ""
            kept = "the nonce expected" if self.nonce_expected else "the header's nonce"
            return (f"audit log verified: {self.records} records (last {self.last_seq}){shown}, {self.checkpoints} "
                    f"signed checkpoints; complete up to {self.covered}, sealed {self.signed_at} for {kept} "
                    f"{self.nonce}")
        where = "header" if self.bad_seq is None else f"record {self.bad_seq}"
        return f"audit log NOT verified: {where}: {self.problem}: {self.detail}"


def verify(lines: Iterable[str], public_key: ec.EllipticCurvePublicKey, *, nonce: str | None = None) -> Verdict:
    """Verify an export read line by line (constant memory; one line of lookahead). ``nonce``: the one the
    auditor's client sent for this export, kept apart from the file; the seal must be signed for it."""
    state = _State(nonce)
    source = _nonempty(lines)
    current = next(source, None)
    if current is None or not current.startswith('{"type":"export",'):
        return state.fail(None, "unreadable", "the export does not start with its header")
    problem = state.header(json.loads(current))  # ValueError: the header is not JSON
    if problem is not None:
        return problem
    current = next(source, None)
    while current is not None:
        following = next(source, None)
        verdict = state.feed(current, following, public_key)
        if verdict is not None:
            if state.gap is not None and _appears(state.gap[0], following, source):
                missing, found = state.gap
                return state.fail(missing, "reordered", f"record {missing} comes after record {found}")
            return verdict
        current = following
    return state.finish()


def _nonempty(lines: Iterable[str]) -> Iterator[str]:
    for raw in lines:
        line = raw.rstrip("\n")
        if line:
            yield line


def _appears(seq: int, following: str | None, rest: Iterator[str]) -> bool:
    """Whether record ``seq`` is further on: a record missing in its place but found later was moved, not removed."""
    for line in (following, *rest) if following is not None else rest:
        match = _SEQ.match(line)
        if match is not None and int(match.group(1)) == seq:
            return True
    return False


class _State:
    def __init__(self, nonce: str | None) -> None:
        self.expected = 1
        self.prev = GENESIS.hex()
        self.records = 0
        self.checkpoints = 0
        self.covered = 0
        self.max_claimed = 0
        self.filtered = False
        self.last_seq = 0
        self.omitted = 0
        self.expected_nonce = nonce
        self.announced: tuple[object, object, object, object] = (None, None, None, None)  # the header's
        self.seal: tuple[int, str, str, dict[str, str]] | None = None  # size, at, nonce, filters
        self.gap: tuple[int, int] | None = None  # (missing, found in its place), when a record is missing

    def fail(self, seq: int | None, problem: str, detail: str) -> Verdict:
        return Verdict(False, self.records, self.checkpoints, self.last_seq, self.covered, seq, problem, detail,
                       self.filtered)

    def header(self, doc: object) -> Verdict | None:
        if not isinstance(doc, dict) or doc.get("version") != EXPORT_VERSION:
            version = doc.get("version") if isinstance(doc, dict) else None
            return self.fail(None, "unreadable", f"export format version {version} is not {EXPORT_VERSION} "
                                                 "(exports end with a seal signed for their request since 2)")
        self.announced = (doc.get("size"), doc.get("nonce"), doc.get("filtered"), doc.get("filters"))
        self.filtered = bool(doc.get("filtered"))
        return None

    def feed(self, line: str, following: str | None, public_key: ec.EllipticCurvePublicKey) -> Verdict | None:
        if self.seal is not None:
            return self.fail(self.last_seq + 1, "inserted", "a line follows the export seal")
        match = _RECORD.match(line)
        if match is not None and line.endswith("}"):
            body = line[match.end():-1].encode()
            return self._record(int(match.group(1)), match.group(2), match.group(3), hashlib.sha256(body).digest(),
                                body, following)
        omitted = _OMITTED.match(line)
        if omitted is not None:
            return self._record(int(omitted.group(1)), omitted.group(2), omitted.group(3),
                                bytes.fromhex(omitted.group(4)), None, following)
        if line.startswith('{"type":"checkpoint"'):
            return self._checkpoint(line, public_key)
        if line.startswith('{"type":"export-seal"'):
            return self._seal(line, public_key)
        return self.fail(self.expected, "unreadable", "a line is neither a record nor a checkpoint")

    def _record(self, seq: int, prev: str, digest: str, body_digest: bytes, body: bytes | None,
                following: str | None) -> Verdict | None:
        """One record, shown (``body``) or omitted by a filter (its body's digest only)."""
        if seq < self.expected:
            if seq == self.last_seq:
                return self.fail(seq, "inserted", f"sequence number {seq} appears twice")
            return self.fail(seq, "reordered", f"record {seq} comes after record {self.last_seq}")
        if seq > self.expected:
            nxt = (_RECORD.match(following) or _OMITTED.match(following)) if following else None
            if nxt is not None and int(nxt.group(1)) == self.expected:
                return self.fail(self.expected, "reordered", f"record {self.expected} comes after record {seq}")
            self.gap = (self.expected, seq)  # verify() looks further on before calling it removed
            return self.fail(self.expected, "removed", f"record {self.expected} is missing (next is {seq})")
        if hashlib.sha256(bytes.fromhex(prev) + body_digest).hexdigest() != digest:
            return self.fail(seq, "edited", "its hash does not match its content")
        if prev != self.prev:
            return self.fail(seq - 1, "edited", f"record {seq} no longer chains to it")
        # Canonical bodies sort their keys: the top-level "seq" is the last one (only "subject", a string, follows).
        at = body.rfind(b',"seq":') if body is not None else 0
        if body is not None and (at < 0 or not body.startswith(f',"seq":{seq},"subject":'.encode(), at)):
            return self.fail(seq, "edited", "its body names another sequence number")
        if body is None:
            self.omitted += 1
        self.prev, self.expected, self.last_seq = digest, seq + 1, seq
        self.records += 1
        return None

    def _checkpoint(self, line: str, public_key: ec.EllipticCurvePublicKey) -> Verdict | None:
        try:
            doc = json.loads(line)
            size, head, at, signature = int(doc["size"]), str(doc["head"]), str(doc["at"]), bytes.fromhex(
                doc["signature"])
        except (ValueError, KeyError, TypeError):
            return self.fail(self.expected, "checkpoint forged", "a checkpoint is unreadable")
        try:
            public_key.verify(signature, checkpoint_message(size, head, at), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return self.fail(size, "checkpoint forged", f"the checkpoint at {size} is not signed by this key")
        self.checkpoints += 1
        return self._covers(size, head, "checkpoint")

    def _seal(self, line: str, public_key: ec.EllipticCurvePublicKey) -> Verdict | None:
        try:
            doc = json.loads(line)
            size, head, at, nonce, signature = (int(doc["size"]), str(doc["head"]), str(doc["at"]), str(doc["nonce"]),
                                                bytes.fromhex(doc["signature"]))
            filters = {str(k): str(v) for k, v in dict(doc["filters"]).items()}
            message = seal_message(size, head, at, nonce, filters)
        except (ValueError, KeyError, TypeError):
            return self.fail(self.expected, "checkpoint forged", "the export seal is unreadable")
        try:
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return self.fail(size, "checkpoint forged", f"the export seal at {size} is not signed by this key")
        self.seal = (size, at, nonce, filters)
        return self._covers(size, head, "export seal")

    def _covers(self, size: int, head: str, what: str) -> Verdict | None:
        """A signed (size, head) after the records: it must name the chain as it stands."""
        self.max_claimed = max(self.max_claimed, size)
        if size == self.last_seq:
            if head != self.prev:
                return self.fail(size, "edited", f"the chain up to {size} differs from its signed {what}")
            self.covered = size
            return None
        if size > self.last_seq:
            return None  # judged at the end: records up to ``size`` must follow
        return self.fail(size, "reordered", f"the {what} at {size} comes after record {self.last_seq}")

    def finish(self) -> Verdict:
        if self.max_claimed > self.last_seq:
            return self.fail(self.last_seq + 1, "truncated",
                             f"the log ends at {self.last_seq}; a signed checkpoint covers {self.max_claimed}")
        if self.covered != self.last_seq:
            return self.fail(self.covered + 1, "truncated",
                             f"records after {self.covered} are covered by no signed checkpoint")
        if self.seal is None:
            return self.fail(self.last_seq + 1, "truncated", f"{NOT_THIS_REQUEST} (it has no export seal)")
        size, at, nonce, filters = self.seal
        announced_size, announced_nonce, filtered, announced_filters = self.announced
        # The nonce kept apart proves the most; without it, the header's (which the export command checked as it
        # wrote it) still tells this request's seal from an older one spliced on.
        if self.expected_nonce is not None and self.expected_nonce != nonce:
            return self.fail(size + 1, "truncated", f"{NOT_THIS_REQUEST} (it is sealed for nonce {nonce}, not the "
                                                    f"expected {self.expected_nonce})")
        if announced_nonce != nonce:
            header = f"not the header's {announced_nonce}" if announced_nonce else "and the header names none"
            return self.fail(size + 1, "truncated", f"{NOT_THIS_REQUEST} (it is sealed for nonce {nonce}, {header})")
        if isinstance(announced_size, int) and announced_size > size:
            return self.fail(size + 1, "truncated", f"the header announces {announced_size} records; the export "
                                                    f"is sealed at {size}")
        if announced_size != size:
            return self.fail(None, "edited", f"its size {announced_size} is not the sealed size {size}")
        if announced_filters != filters or filtered is not bool(filters):
            return self.fail(None, "edited", "its filters are not the sealed ones")
        return Verdict(True, self.records, self.checkpoints, self.last_seq, self.covered, filtered=bool(filters),
                       omitted=self.omitted, signed_at=at, nonce=nonce,
                       nonce_expected=self.expected_nonce is not None)
