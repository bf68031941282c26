"""Anomaly alarms: audit records of kind ``alarm.*`` that an auditor finds with ``kms audit export --kind alarm``
(docs/issuance-service.md, section 11).

- ``alarm.limit``: a station tripped one of its or its bureau's limits (kms.issuance.limits); at most one per station,
limit
  and value per hour (each refused call is in the log anyway, as ``request.refused``).
- ``alarm.refusals``: a principal (or ``unauthenticated``) collected ``count`` refusals within ``seconds``; at most
  one per principal per window.
- ``alarm.outside-batch``: a station asked for cards of a batch that is not its bureau's (or does not exist), or for
  a card its batch does not list; every time.
- ``alarm.hours``: a station called outside the configured hours; at most one per station per hour.

A record names the principal (``actor``), the method (``subject`` and ``detail.method``) and the numbers, never card
data beyond a ``card_ref``. The counting and the "at most one" memory are per server process (not shared between
replicas). Alarms only record: the call goes on (or is refused) as it would without them. An alarm that cannot be
recorded is logged as an error and the call is not failed for it.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from kms.audit.log import AuditLog, mask_pan
from kms.clock import Clock
from kms.identity import Principal
from kms.validation import CARD_REF

log = logging.getLogger(__name__)

#: How long an alarm of the same kind about the same thing is not repeated (limit, hours).
REPEAT_AFTER = dt.timedelta(hours=1)
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")  # batch ids and card_refs (kms.cards.cardid)
_DIGITS = re.compile(r"\d{12,19}")

#: The statuses of refusals, i.e. of calls the service turned down (not the caller's own cancellation or deadline,
#: nor the service's failures).
REFUSAL_STATUSES = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_ARGUMENT", "NOT_FOUND",
                              "ALREADY_EXISTS", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE"})


@dataclass(frozen=True)
class AlarmPolicy:
    """The alarm thresholds of kms/policies/limits.yaml: ``refusals`` within ``refusal_seconds``; the hours stations
    may call, from ``hours_from`` (inclusive) to ``hours_to`` (exclusive), in minutes since midnight in ``timezone``
    (a window across midnight, e.g. 22:00 to 06:00, is allowed; 00:00 to 24:00 is all day)."""

    refusals: int
    refusal_seconds: int
    hours_from: int
    hours_to: int
    timezone: ZoneInfo

    def within_hours(self, moment: dt.datetime) -> bool:
        local = moment.astimezone(self.timezone)
        minute = local.hour * 60 + local.minute
        if self.hours_from < self.hours_to:
            return self.hours_from <= minute < self.hours_to
        return minute >= self.hours_from or minute < self.hours_to

    def hours(self) -> str:
        return f"{_hhmm(self.hours_from)}-{_hhmm(self.hours_to)} {self.timezone.key}"


def _reference(value: str) -> str:
    """A batch id or card_ref as the caller sent it, for a record: only if it is one, and a run of 12 to 19 digits
    masked like a PAN (kms.server.frame.scrub), since a caller can put anything in a request."""
    if not CARD_REF.fullmatch(value):  # batch ids and card_refs
        return "(not a valid reference)"
    return _DIGITS.sub(lambda m: mask_pan(m.group(0)), value)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


class Alarms:
    """Writes alarm records to the audit log; thread-safe (one instance serves every request of a process)."""

    def __init__(self, audit: AuditLog | None, clock: Clock, policy: AlarmPolicy) -> None:
        self._audit = audit
        self._clock = clock
        self.policy = policy
        self._lock = threading.Lock()
        self._refusals: dict[str, deque[dt.datetime]] = {}
        self._last: dict[tuple[str, ...], dt.datetime] = {}  # (kind, actor, ...) → when it was last raised

    # -- the four alarms ---------------------------------------------------------------------------------------

    def limit(self, station: Principal, method: str, *, limit: str, scope: str, subject: str, value: int,
              used: int) -> None:
        """``station`` was refused because ``limit`` of ``scope`` ``subject`` (the station's URI or its bureau) is
        ``value`` and ``used`` are taken (cards in the window, or streams in progress)."""
        if self._first(("limit", station.uri(), scope, subject, limit, str(value)), REPEAT_AFTER):
            self._record("alarm.limit", station.uri(), method, {
                "limit": limit, "scope": scope, "subject": subject, "value": value, "used": used})

    def refused(self, actor: str, method: str, status: str) -> None:
        """A call of ``actor`` (a principal URI or "unauthenticated") ended with ``status``."""
        if status not in REFUSAL_STATUSES:
            return
        now = self._clock.now()
        window = dt.timedelta(seconds=self.policy.refusal_seconds)
        with self._lock:
            times = self._refusals.setdefault(actor, deque(maxlen=self.policy.refusals))
            times.append(now)
            if len(times) < self.policy.refusals or now - times[0] > window:
                return
            last = self._last.get(("refusals", actor))
            if last is not None and dt.timedelta(0) <= now - last < window:
                return
            self._last[("refusals", actor)] = now
        self._record("alarm.refusals", actor, method, {
            "refusals": len(times), "seconds": self.policy.refusal_seconds, "last_status": status})

    def called(self, principal: Principal, method: str) -> None:
        """Every authorized call: a station calling outside the configured hours raises ``alarm.hours``."""
        if principal.role != "station":
            return
        now = self._clock.now()
        if self.policy.within_hours(now):
            return
        if self._first(("hours", principal.uri()), REPEAT_AFTER):
            self._record("alarm.hours", principal.uri(), method, {
                "local_time": now.astimezone(self.policy.timezone).strftime("%H:%M"), "hours": self.policy.hours()})

    def outside_batch(self, station: Principal, method: str, batch_id: str, card_ref: str | None = None) -> None:
        """``station`` asked for cards of ``batch_id`` that is not its bureau's or does not exist (no ``card_ref``),
        or for ``card_ref``, which ``batch_id`` does not list."""
        detail: dict[str, Any] = {"batch_id": _reference(batch_id)}
        if card_ref is None:
            detail["reason"] = "the batch is not the station's bureau's, or does not exist"
        else:
            detail.update(card_ref=_reference(card_ref), reason="the batch does not list the card")
        self._record("alarm.outside-batch", station.uri(), method, detail)

    # -- helpers -----------------------------------------------------------------------------------------------

    def _first(self, key: tuple[str, ...], repeat_after: dt.timedelta) -> bool:
        """Whether an alarm about ``key`` is due: none yet, or the last one is ``repeat_after`` old."""
        now = self._clock.now()
        with self._lock:
            last = self._last.get(key)
            if last is not None and dt.timedelta(0) <= now - last < repeat_after:
                return False
            self._last[key] = now
            return True

    def _record(self, kind: str, actor: str, method: str, detail: Mapping[str, Any]) -> None:
        log.warning("%s: %s on %s %s", kind, actor, method, dict(detail))
        if self._audit is None:
            return
        try:
            self._audit.record(kind, actor=actor, subject=method, outcome="alarm",
                               detail={"method": method, **detail})
        except Exception:
            log.error("the %s alarm about %s could not be recorded in the audit log", kind, actor)
