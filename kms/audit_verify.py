"""Offline verification of an audit export (JSON Lines, kms.audit): nothing but the file and the audit public key.

Checks every record's sequence number, its link to the previous record and its hash over the body as written, and
every checkpoint's signature and head. The first problem is named by sequence number and kind:

- ``edited``: a record's hash does not match its content, or its successor no longer chains to it;
- ``removed``: a sequence number is missing;
- ``inserted``: a sequence number appears twice;
- ``reordered``: records appear out of order;
- ``truncated``: the file ends before the last signed checkpoint's size;
- ``checkpoint forged``: a checkpoint's signature does not verify, or its head is not the chain's.

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

from kms.audit import GENESIS, checkpoint_message

_RECORD = re.compile(r'^\{"type":"record","seq":(\d+),"prev":"([0-9a-f]{64})","hash":"([0-9a-f]{64})","body":')
_OMITTED = re.compile(
    r'^\{"type":"omitted","seq":(\d+),"prev":"([0-9a-f]{64})","hash":"([0-9a-f]{64})","digest":"([0-9a-f]{64})"\}$')


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    checkpoints: int
    last_seq: int
    covered: int  # records covered by the last good checkpoint
    bad_seq: int | None = None
    problem: str = ""
    detail: str = ""
    filtered: bool = False
    omitted: int = 0  # records a filter left out (their digests verified in the chain)
    signed_at: str = ""  # the last checkpoint's time: an export is as recent as this

    def summary(self) -> str:
        if self.ok:
            shown = f", {self.records - self.omitted} shown and {self.omitted} left out by the filter" if (
                self.filtered) else ""
            return (f"audit log verified: {self.records} records (last {self.last_seq}){shown}, {self.checkpoints} "
                    f"signed checkpoints; complete up to the checkpoint at {self.covered}, signed {self.signed_at}")
        return f"audit log NOT verified: record {self.bad_seq}: {self.problem}: {self.detail}"


def verify(lines: Iterable[str], public_key: ec.EllipticCurvePublicKey) -> Verdict:
    """Verify an export read line by line (constant memory; one line of lookahead)."""
    state = _State()
    source = _nonempty(lines)
    current = next(source, None)
    if current is not None and current.startswith('{"type":"export"'):
        state.filtered = bool(json.loads(current).get("filtered"))
        current = next(source, None)
    while current is not None:
        following = next(source, None)
        verdict = state.feed(current, following, public_key)
        if verdict is not None:
            return verdict
        current = following
    return state.finish()


def _nonempty(lines: Iterable[str]) -> Iterator[str]:
    for raw in lines:
        line = raw.rstrip("\n")
        if line:
            yield line


class _State:
    def __init__(self) -> None:
        self.expected = 1
        self.prev = GENESIS.hex()
        self.records = 0
        self.checkpoints = 0
        self.covered = 0
        self.max_claimed = 0
        self.filtered = False
        self.last_seq = 0
        self.omitted = 0
        self.final_at = ""

    def fail(self, seq: int, problem: str, detail: str) -> Verdict:
        return Verdict(False, self.records, self.checkpoints, self.last_seq, self.covered, seq, problem, detail,
                       self.filtered)

    def feed(self, line: str, following: str | None, public_key: ec.EllipticCurvePublicKey) -> Verdict | None:
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
        self.max_claimed = max(self.max_claimed, size)
        if size == self.last_seq:
            if head != self.prev:
                return self.fail(size, "edited", f"the chain up to {size} differs from its signed checkpoint")
            self.covered, self.final_at = size, at
            return None
        if size > self.last_seq:
            return None  # judged at the end: records up to ``size`` must follow
        return self.fail(size, "reordered", f"the checkpoint at {size} comes after record {self.last_seq}")

    def finish(self) -> Verdict:
        if self.max_claimed > self.last_seq:
            return self.fail(self.last_seq + 1, "truncated",
                             f"the log ends at {self.last_seq}; a signed checkpoint covers {self.max_claimed}")
        if self.covered != self.last_seq:
            return self.fail(self.covered + 1, "truncated",
                             f"records after {self.covered} are covered by no signed checkpoint")
        if self.checkpoints == 0:
            return self.fail(1, "truncated", "the export holds no signed checkpoint")
        return Verdict(True, self.records, self.checkpoints, self.last_seq, self.covered, filtered=self.filtered,
                       omitted=self.omitted, signed_at=self.final_at)
