"""Streams in progress on this server, bounded so that they can never take every handler thread.

gRPC Python serves each call on a thread of the server's pool, and a server stream (StreamBatch, an audit Export,
a health Watch, reflection) holds its thread until it ends — for as long as its client takes to read it. So the
streams in progress are counted here, in all and per principal, against two settings of kms.yaml
(kms.config.Capacity): ``server.max_streams``, fewer than ``server.threads`` so that unary calls (an officer's
GetBatchStatus, a ceremony step, a health check) always find a thread, and ``server.streams_per_principal``, so that
one station cannot take all the stream slots of the others. A stream over either is refused at once with
RESOURCE_EXHAUSTED naming the setting; the authorization interceptor (kms.server.frame) takes a slot after the
caller was authorized and gives it back when the stream ends, however it ends.

Unary calls hold a thread only while they run, but a slow one (an IssueCard the HSM takes its time over) holds it
for as long: ``server.calls_per_principal`` bounds the unary calls in progress of one principal, below the threads,
so that one caller's calls never take every thread either (``take_call``/``release_call``).

These are the operator's protection of the server; the issuance limits of kms/policies/limits.yaml
(``concurrent_streams`` per station and per bureau, kms.issuance.limits) are the key domains' policy for
StreamBatch and apply within them.
"""

from __future__ import annotations

import threading

from kms.config import Capacity
from kms.errors import ResourceExhausted


class StreamSlots:
    """The server's stream slots: ``take`` one for a principal (ResourceExhausted if none is left), ``release`` it
    when the stream ends."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._open = 0
        self._by_principal: dict[str, int] = {}
        self._calls: dict[str, int] = {}  # unary calls in progress per principal

    def take(self, principal: str) -> None:
        """One slot for a stream of ``principal`` (a principal's URI), or ResourceExhausted naming the limit that
        binds: the principal's own first, then the server's."""
        with self._lock:
            mine = self._by_principal.get(principal, 0)
            if mine >= self.capacity.streams_per_principal:
                raise ResourceExhausted(
                    f"principal {principal}: limit streams_per_principal ({self.capacity.streams_per_principal}) "
                    f"reached; {mine} stream{'s' if mine != 1 else ''} in progress", limit="streams_per_principal")
            if self._open >= self.capacity.max_streams:
                raise ResourceExhausted(
                    f"server: limit max_streams ({self.capacity.max_streams}) reached; {self._open} streams in "
                    "progress on this server; try again later", limit="max_streams")
            self._open += 1
            self._by_principal[principal] = mine + 1

    def release(self, principal: str) -> None:
        with self._lock:
            self._open -= 1
            _decrement(self._by_principal, principal)

    def take_call(self, principal: str) -> None:
        """A unary call of ``principal`` starts, or ResourceExhausted naming ``calls_per_principal``."""
        with self._lock:
            mine = self._calls.get(principal, 0)
            if mine >= self.capacity.calls_per_principal:
                raise ResourceExhausted(
                    f"principal {principal}: limit calls_per_principal ({self.capacity.calls_per_principal}) "
                    f"reached; {mine} call{'s' if mine != 1 else ''} in progress", limit="calls_per_principal")
            self._calls[principal] = mine + 1

    def release_call(self, principal: str) -> None:
        with self._lock:
            _decrement(self._calls, principal)

    def calls_in_progress(self, principal: str) -> int:
        with self._lock:
            return self._calls.get(principal, 0)

    def in_progress(self, principal: str | None = None) -> int:
        """Streams in progress on this server, or of one principal."""
        with self._lock:
            return self._open if principal is None else self._by_principal.get(principal, 0)


def _decrement(counts: dict[str, int], principal: str) -> None:
    """One less for ``principal``; a count that reaches zero leaves the map (it holds only principals in progress)."""
    left = counts[principal] - 1
    if left:
        counts[principal] = left
    else:
        del counts[principal]
