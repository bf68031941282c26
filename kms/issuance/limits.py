"""Per-station and per-bureau issuance limits (docs/issuance-service.md, section 11).

Limits: ``cards_per_hour`` and ``cards_per_day`` (cards newly issued, in a sliding window) and
``concurrent_streams`` (StreamBatch calls in progress), each for a station and for its whole bureau.

- **Defaults** are data, kms/policies/limits.yaml (read once at start-up; its SHA-256 is in ``service.started``).
- **Changes** only by a ``set-limits`` ceremony of a key domain (kms.ceremony.operations), stored in the ``limits``
table
  per (domain, scope, subject, name). For a call, each domain whose keys the batch carries has its value: its own
  ceremony value for this station (or bureau), else its value for ``default``, else the file's. The **smallest** of
  these applies: either key owner can tighten a limit alone; raising one above the file's default takes both.
- **Counting**: cards from ``card_events`` (``issued`` events by the station's URI), so every replica on the same
  database counts every replica's cards; streams in progress in memory per server process, and on PostgreSQL also
  as numbered slots held by each replica's database session (``StreamSlots``), so that they count across replicas.
- A call over a limit is refused with ``ResourceExhausted`` naming the limit, and raises ``alarm.limit``
  (kms.audit.alarms).

Counting cost: a full count of a day's issuance is a range scan; it is made at most every ``REFRESH`` per bureau
(a snapshot up to a split time), and each check adds only the events since the split (one small indexed query).
Events that left the window since the snapshot are still counted: a limit binds at most ``REFRESH + MARGIN``
early. A stream far from every limit checks about once every ``RECHECK`` (StreamQuota.admit).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa

from kms import store
from kms.audit.alarms import AlarmPolicy, Alarms
from kms.audit.log import AuditLog
from kms.clock import Clock, rfc3339
from kms.config import read_policy
from kms.errors import ConfigError, InvalidArgument, ResourceExhausted
from kms.identity import Principal
from kms.policies import shipped
from kms.registry import DOMAINS
from kms.repository import Repository
from kms.store import card_events, limits
from kms.validation import NAME, unknown_keys

log = logging.getLogger(__name__)

DEFAULT_LIMITS = shipped("limits.yaml")
SCOPES = ("station", "bureau")
NAMES = ("cards_per_hour", "cards_per_day", "concurrent_streams")
WINDOWS = {"cards_per_hour": dt.timedelta(hours=1), "cards_per_day": dt.timedelta(days=1)}
MAX_VALUE = 1_000_000_000
DEFAULT_SUBJECT = "default"
ISSUED = "issued"  # kms.issuance.batches' card_events.event for a card recorded issued

REFRESH = dt.timedelta(seconds=10)  # how old a count snapshot may grow (clock time)
MARGIN = dt.timedelta(seconds=5)  # the snapshot's split lies this far back: a commit late by less is still counted
LIMITS_TTL = 5.0  # seconds a replica keeps the ceremony-set values before reading them again (monotonic)
RECHECK = 1.0  # seconds a stream far from every limit goes without asking the database again (monotonic)

_HHMM = re.compile(r"(\d{2}):(\d{2})")


# -- the defaults file ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LimitsPolicy:
    station: Mapping[str, int]
    bureau: Mapping[str, int]
    alarms: AlarmPolicy

    @classmethod
    def load(cls, path: Path = DEFAULT_LIMITS) -> LimitsPolicy:
        body = read_policy(path, "limits")
        _keys(path, "limits", body, {"station", "bureau", "alarms"})
        values = {}
        for scope in SCOPES:
            _keys(path, f"limits.{scope}", body[scope], set(NAMES))
            for name in NAMES:
                value = body[scope][name]
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_VALUE:
                    raise ConfigError(f"{path}: limits.{scope}.{name}: must be an integer from 0 to {MAX_VALUE}")
            values[scope] = dict(body[scope])
        alarms = body["alarms"]
        _keys(path, "limits.alarms", alarms, {"refusals", "hours"})
        _keys(path, "limits.alarms.refusals", alarms["refusals"], {"count", "seconds"})
        for name in ("count", "seconds"):
            value = alarms["refusals"][name]
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1_000_000:
                raise ConfigError(f"{path}: limits.alarms.refusals.{name}: must be an integer from 1 to 1000000")
        hours = alarms["hours"]
        _keys(path, "limits.alarms.hours", hours, {"from", "to", "timezone"})
        start = _minutes(path, "from", hours["from"])
        end = _minutes(path, "to", hours["to"])
        if start == end or start == 24 * 60:
            raise ConfigError(f"{path}: limits.alarms.hours: 'from' must be before 24:00 and differ from 'to' "
                              "(00:00 to 24:00 is all day)")
        try:
            zone = ZoneInfo(hours["timezone"]) if isinstance(hours["timezone"], str) else None
        except (ZoneInfoNotFoundError, ValueError):
            zone = None
        if zone is None:
            raise ConfigError(f"{path}: limits.alarms.hours.timezone: must be an IANA time zone, e.g. Asia/Shanghai")
        return cls(values["station"], values["bureau"],
                   AlarmPolicy(alarms["refusals"]["count"], alarms["refusals"]["seconds"], start, end, zone))


def _keys(path: Path, where: str, doc: Any, names: set[str]) -> None:
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: {where}: must be a mapping")
    for name in unknown_keys(doc, names):
        raise ConfigError(f"{path}: {where}: unknown setting {name!r}")
    for name in sorted(names - set(doc)):
        raise ConfigError(f"{path}: {where}: missing setting {name!r}")


def _minutes(path: Path, name: str, value: Any) -> int:
    """Minutes since midnight of "HH:MM" (quoted: unquoted, YAML 1.1 reads 07:00 as the number 420)."""
    match = _HHMM.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match[2]) > 59 or int(match[1]) * 60 + int(match[2]) > 24 * 60:
        raise ConfigError(f'{path}: limits.alarms.hours.{name}: must be "HH:MM" (quoted), 00:00 to 24:00')
    return int(match[1]) * 60 + int(match[2])


# -- values set by ceremonies --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    """One limit as it applies to a call: ``scope`` station or bureau, ``subject`` the station's URI or the bureau."""

    scope: str
    subject: str
    name: str
    value: int


def check_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of a ``set-limits`` ceremony, checked and normalized (what the approvers sign): ``scope``
    (station or bureau), ``subject`` (a station URI or a bureau name, as the scope says, or "default") and one or
    more limit names, each a whole number (a decimal string is taken too: the command line sends text) or
    "default" (drop this domain's value: the next one down applies)."""
    for name in sorted(set(params) - {"scope", "subject", *NAMES}):
        raise InvalidArgument(f"params.{name}", "is not a parameter of this operation")
    for name in ("scope", "subject"):
        if name not in params:
            raise InvalidArgument(f"params.{name}", "is required")
    scope = params["scope"]
    if scope not in SCOPES:
        raise InvalidArgument("params.scope", f"must be one of {', '.join(SCOPES)}")
    subject = params["subject"]
    if not isinstance(subject, str):
        raise InvalidArgument("params.subject", "must be text")
    if subject != DEFAULT_SUBJECT:
        if scope == "station":
            parts = subject.split(":")
            if (len(parts) != 5 or parts[:3] != ["urn", "kms", "station"]
                    or not all(NAME.fullmatch(p) for p in parts[3:])):
                raise InvalidArgument("params.subject", "must be a station's URI (urn:kms:station:<bureau>:<name>) "
                                                        "or default")
        elif not NAME.fullmatch(subject):
            raise InvalidArgument("params.subject", "must be a bureau's name or default")
    values: dict[str, Any] = {}
    for name in NAMES:
        if name not in params:
            continue
        value = params[name]
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
            value = int(value)
        if value != DEFAULT_SUBJECT and (not isinstance(value, int) or isinstance(value, bool)
                                         or not 0 <= value <= MAX_VALUE):
            raise InvalidArgument(f"params.{name}", f"must be a whole number from 0 to {MAX_VALUE}, or default")
        values[name] = value
    if not values:
        raise InvalidArgument("params", f"name at least one limit: {', '.join(NAMES)}")
    return {"scope": scope, "subject": subject, **values}


class LimitStore(Repository):
    """The ``limits`` table: values set by ``set-limits`` ceremonies, per domain. Read through a cache kept
    ``LIMITS_TTL`` seconds (a change made through this object is seen at once; another replica's within the TTL)."""

    def __init__(self, engine: sa.Engine, clock: Clock, audit: AuditLog | None = None) -> None:
        super().__init__(engine, clock, audit)
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, str, str, str], int] | None = None
        self._read_at = 0.0

    def set(self, domain: str, params: Mapping[str, Any], ceremony_id: str) -> dict[str, Any]:
        """Store a checked ``set-limits`` ceremony's values for ``domain``; returns what now stands."""
        scope, subject = params["scope"], params["subject"]
        now = rfc3339(self._clock.now())
        with self._engine.begin() as conn:
            for name in NAMES:
                if name not in params:
                    continue
                where = (limits.c.domain == domain, limits.c.scope == scope, limits.c.subject == subject,
                         limits.c.name == name)
                conn.execute(limits.delete().where(*where))
                if params[name] != DEFAULT_SUBJECT:
                    conn.execute(limits.insert().values(domain=domain, scope=scope, subject=subject, name=name,
                                                        value=params[name], ceremony_id=ceremony_id, at=now))
            if self._audit is not None:
                self._audit.append(conn, "limits.set", domain=domain, subject=f"{scope} {subject}", detail={
                    "scope": scope, "subject": subject, "ceremony_id": ceremony_id,
                    "values": {name: params[name] for name in NAMES if name in params}})
        with self._lock:
            self._rows = None  # read again at the next call
        return {"domain": domain, "scope": scope, "subject": subject,
                "values": {name: params[name] for name in NAMES if name in params}}

    def rows(self) -> dict[tuple[str, str, str, str], int]:
        """Every ceremony-set value, by (domain, scope, subject, name)."""
        with self._lock:
            if self._rows is not None and time.monotonic() - self._read_at < LIMITS_TTL:
                return self._rows
        with self._engine.connect() as conn:
            rows = {(r.domain, r.scope, r.subject, r.name): int(r.value) for r in conn.execute(sa.select(limits))}
        with self._lock:
            self._rows, self._read_at = rows, time.monotonic()
        return rows


# -- counting ------------------------------------------------------------------------------------------------------


@dataclass
class _Snapshot:
    split: dt.datetime  # counts below are of events before this time
    taken: dt.datetime  # clock time it was made
    taken_mono: float
    hour: dict[str, int]  # station URI → cards issued in [split - 1 h, split)
    day: dict[str, int]  # station URI → cards issued in [split - 1 d, split)


class IssueCounts:
    """Cards issued by each station of a bureau in the last hour and day, from ``card_events``."""

    def __init__(self, engine: sa.Engine, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshots: dict[str, _Snapshot] = {}

    def of(self, bureau: str) -> tuple[dict[str, int], dict[str, int]]:
        """(cards per station URI in the last hour, in the last day) for the stations of ``bureau``."""
        now = self._clock.now()
        with self._lock:
            snap = self._snapshots.get(bureau)
        if (snap is None or not snap.taken <= now < snap.taken + REFRESH
                or time.monotonic() - snap.taken_mono >= REFRESH.total_seconds()):
            snap = self._snapshot(bureau, now)
            with self._lock:
                self._snapshots[bureau] = snap
        since = self._count(bureau, rfc3339(snap.split), None, None)
        hour = {s: snap.hour.get(s, 0) + since[0].get(s, 0) for s in {*snap.hour, *since[0]}}
        day = {s: snap.day.get(s, 0) + since[0].get(s, 0) for s in {*snap.day, *since[0]}}
        return hour, day

    def _snapshot(self, bureau: str, now: dt.datetime) -> _Snapshot:
        split = now - MARGIN
        hour, day = self._count(bureau, rfc3339(split - WINDOWS["cards_per_day"]), rfc3339(split),
                                rfc3339(split - WINDOWS["cards_per_hour"]))
        return _Snapshot(split, now, time.monotonic(), hour, day)

    def _count(self, bureau: str, since: str, before: str | None, hour_since: str | None
               ) -> tuple[dict[str, int], dict[str, int]]:
        """Issued events per station of the bureau with ``since <= at < before``: (those at or after
        ``hour_since``, all). One range scan of ix_card_events_issued (event, at, by)."""
        prefix = f"urn:kms:station:{bureau}:"
        params: dict[str, str | None] = {"since": since, "lo": prefix, "hi": prefix[:-1] + ";"}  # ';' follows ':'
        if before is None:
            query = _SINCE
        else:
            query = _SNAPSHOT
            params.update(before=before, hour=hour_since)
        with self._engine.connect() as conn:
            rows = conn.execute(query, params).all()
        return {r[0]: int(r[1] or 0) for r in rows}, {r[0]: int(r[2]) for r in rows}


def _statements() -> tuple[sa.Select[Any], sa.Select[Any]]:
    """Built once (a stream checks once per message): the snapshot, and the events since its split."""
    at, by = card_events.c.at, card_events.c.by
    of_bureau = (card_events.c.event == ISSUED, at >= sa.bindparam("since"), by >= sa.bindparam("lo"),
                 by < sa.bindparam("hi"))
    snapshot = (sa.select(by, sa.func.sum(sa.case((at >= sa.bindparam("hour"), 1), else_=0)), sa.func.count())
                .where(*of_bureau, at < sa.bindparam("before")).group_by(by))
    return snapshot, sa.select(by, sa.func.count(), sa.func.count()).where(*of_bureau).group_by(by)


_SNAPSHOT, _SINCE = _statements()


# -- the limits applied ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allowance:
    """How many more cards a station may be issued now, and the limit that binds (``used`` of its ``value``)."""

    left: int
    limit: Limit
    used: int


class Quotas:
    """The limits of kms/policies/limits.yaml and the ``limits`` table, applied to stations' calls."""

    def __init__(self, engine: sa.Engine, clock: Clock, policy: LimitsPolicy, audit: AuditLog | None = None,
                 alarms: Alarms | None = None) -> None:
        self.policy = policy
        self.store = LimitStore(engine, clock, audit)
        self.counts = IssueCounts(engine, clock)
        self.alarms = alarms
        self._lock = threading.Lock()
        self._streams: dict[tuple[str, str], int] = {}  # (scope, subject) → streams in progress in this process
        #: PostgreSQL: the streams of every replica on the database (StreamSlots); SQLite: this process's only.
        self.slots = StreamSlots(engine) if engine.dialect.name == "postgresql" else None

    def limit(self, station: Principal, domains: Iterable[str], scope: str, name: str) -> Limit:
        """The value of one limit for a call of ``station`` that hands out keys of ``domains``."""
        subject = station.uri() if scope == "station" else str(station.bureau)
        rows = self.store.rows()
        default = (self.policy.station if scope == "station" else self.policy.bureau)[name]
        values = [rows.get((d, scope, subject, name), rows.get((d, scope, DEFAULT_SUBJECT, name), default))
                  for d in (tuple(domains) or DOMAINS)]
        return Limit(scope, subject, name, min(values))

    def allowance(self, station: Principal, domains: Iterable[str]) -> Allowance:
        """The cards ``station`` may still be issued (0 or more) under every card limit: one indexed query."""
        domains = tuple(domains)
        hour, day = self.counts.of(str(station.bureau))
        used = {("station", "cards_per_hour"): hour.get(station.uri(), 0),
                ("station", "cards_per_day"): day.get(station.uri(), 0),
                ("bureau", "cards_per_hour"): sum(hour.values()), ("bureau", "cards_per_day"): sum(day.values())}
        tightest: Allowance | None = None
        for (scope, name), count in used.items():
            limit = self.limit(station, domains, scope, name)
            if tightest is None or limit.value - count < tightest.left:
                tightest = Allowance(limit.value - count, limit, count)
        assert tightest is not None
        return Allowance(max(0, tightest.left), tightest.limit, tightest.used)

    def exceeded(self, station: Principal, method: str, limit: Limit, used: int) -> ResourceExhausted:
        """The error for a call over ``limit``, after raising ``alarm.limit``."""
        if self.alarms is not None:
            self.alarms.limit(station, method, limit=limit.name, scope=limit.scope, subject=limit.subject,
                              value=limit.value, used=used)
        if limit.name == "concurrent_streams":
            what = f"{used} stream{'s' if used != 1 else ''} in progress"
        else:
            what = f"{used} issued in the last {'hour' if limit.name == 'cards_per_hour' else 'day'}"
        return ResourceExhausted(f"{limit.scope} {limit.subject}: limit {limit.name} ({limit.value}) reached; {what}",
                                 limit=limit.name)

    def require_card(self, station: Principal, domains: Iterable[str], method: str) -> None:
        """Before one card is sealed (IssueCard): ResourceExhausted if any card limit is reached."""
        allowance = self.allowance(station, domains)
        if allowance.left < 1:
            raise self.exceeded(station, method, allowance.limit, allowance.used)

    def stream(self, station: Principal, domains: Iterable[str], method: str) -> StreamQuota:
        """A stream's quota, holding one of the station's and its bureau's concurrent streams until ``close()``;
        ResourceExhausted if either has none left. On PostgreSQL the streams of every replica on the database
        count (``StreamSlots``); on SQLite, this process's."""
        domains = tuple(domains)
        taken: list[tuple[str, str, Slot | None]] = []
        with self._lock:
            for scope in SCOPES:
                limit = self.limit(station, domains, scope, "concurrent_streams")
                key = (scope, limit.subject)
                running = self._streams.get(key, 0)
                slot: Slot | None = None
                if running < limit.value and self.slots is not None:
                    slot = self.slots.take(scope, limit.subject, limit.value)
                    if slot is None:  # every slot is held, by this replica's streams and other replicas'
                        running = limit.value
                if running >= limit.value:
                    break
                taken.append((scope, limit.subject, slot))
            else:
                for scope, subject, _ in taken:
                    self._streams[(scope, subject)] = self._streams.get((scope, subject), 0) + 1
                return StreamQuota(self, station, domains, method, taken)
            self._give_back(taken)
        raise self.exceeded(station, method, limit, running)

    def _release(self, taken: list[tuple[str, str, Slot | None]]) -> None:
        with self._lock:
            for scope, subject, _ in taken:
                key = (scope, subject)
                self._streams[key] -= 1
                if not self._streams[key]:
                    del self._streams[key]
            self._give_back(taken)

    def _give_back(self, taken: list[tuple[str, str, Slot | None]]) -> None:
        if self.slots is not None:
            for scope, subject, slot in taken:
                if slot is not None:
                    self.slots.release(scope, subject, slot)

    def close(self) -> None:
        """Let go of the database session that holds this replica's stream slots (PostgreSQL)."""
        if self.slots is not None:
            self.slots.close()


#: Slots a limit of concurrent streams is counted in across replicas: a larger limit binds only per replica (no
#: replica serves more than 1023 streams at once, ``server.max_streams``).
MAX_SLOTS = 1024


@dataclass(eq=False)
class Slot:
    """A running stream's slot of ``scope`` ``subject``'s limit of ``value``: its number, and which of the replica's
    slot sessions holds it (each session lost gets the next number). A slot of a session lost since is given back
    by nobody: it went with its session, and the same number may be another stream's now; the replica takes such a
    slot again on its new session (``StreamSlots._retake``), maybe under another number."""

    scope: str
    subject: str
    value: int
    number: int
    session: int


#: The "slot" of a limit too large to be counted across replicas (MAX_SLOTS): nothing to give back.
UNCOUNTED = Slot("", "", 0, -1, -1)


class StreamSlots:
    """Concurrent streams across every replica on one PostgreSQL database: a stream in progress holds one numbered
    slot of its station and one of its bureau (slots ``0 .. value-1`` of the limit), each an advisory lock
    (``store.try_lock_slot``: a 64-bit key of schema, scope, subject and slot) of one database session this replica
    keeps for them, tried one by one from slot 0 (one query each: a limit of ``value`` costs at most ``value``
    queries to refuse). A replica that dies, or loses that session, frees its slots with it (its streams are being
    resumed elsewhere anyway). A replica that lives on takes the slots of its running streams again on its new
    session, when it next takes a slot (those it finds all held by then run on uncounted until they end). Each
    session has a number: a slot is given back only to the session that holds it. A slot is taken on a session
    found dead by the attempt once more on a new one; giving one back on a dead session is nothing to do (the lock
    is gone) and is logged, never raised. Called under ``Quotas``' lock."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._conn: sa.Connection | None = None
        self._session = 0  # the number of the current session (one more for each session lost)
        self._held: dict[tuple[str, str], set[int]] = {}  # slot numbers the current session holds
        self._live: set[Slot] = set()  # the running streams' slots the current session holds
        self._orphans: set[Slot] = set()  # the running streams' slots of a session lost, to be taken again

    def take(self, scope: str, subject: str, value: int) -> Slot | None:
        """A free slot of ``subject``'s limit (held until ``release``), or None if all ``value`` are held."""
        if value > MAX_SLOTS:
            return UNCOUNTED  # not counted across replicas (MAX_SLOTS); nothing to give back
        for attempt in (1, 2):
            fresh = self._conn is None
            try:
                conn = self._connection()
                if self._orphans:
                    self._retake(conn)
                slot = Slot(scope, subject, value, -1, self._session)
                if self._lock_free(conn, slot):
                    return slot
                return None
            except Exception as error:
                self._lost()
                if fresh or attempt == 2:
                    raise
                log.warning("stream slots: the database session was lost (%s); taking the slot on a new one",
                            type(error).__name__)
        raise AssertionError("unreachable")  # pragma: no cover

    def _lock_free(self, conn: sa.Connection, slot: Slot) -> bool:
        """Give ``slot`` the first number of its limit no session holds, on this session; False if there is none."""
        held = self._held.setdefault((slot.scope, slot.subject), set())
        for number in range(slot.value):
            if number not in held and store.try_lock_slot(conn, slot.scope, slot.subject, number):
                held.add(number)
                slot.number, slot.session = number, self._session
                self._live.add(slot)
                return True
        if not held:
            del self._held[(slot.scope, slot.subject)]
        return False

    def _retake(self, conn: sa.Connection) -> None:
        """The running streams' slots of a session lost, taken again on this one (any free number of their limit)."""
        missed = 0
        for slot in sorted(self._orphans, key=lambda s: s.number):
            missed += not self._lock_free(conn, slot)  # (if the session fails here, the rest stay orphans)
            self._orphans.discard(slot)
        if missed:
            log.warning("stream slots: %d running stream(s) found their slots taken after the database session was "
                        "lost; they run on uncounted across replicas until they end", missed)

    def release(self, scope: str, subject: str, slot: Slot) -> None:
        self._orphans.discard(slot)
        if slot not in self._live or slot.session != self._session:  # UNCOUNTED, or its session was lost
            return
        self._live.discard(slot)
        held = self._held.get((scope, subject), set())
        held.discard(slot.number)
        if not held:
            self._held.pop((scope, subject), None)
        try:
            assert self._conn is not None
            store.unlock_slot(self._conn, scope, subject, slot.number)
        except Exception as error:  # the session is lost, and the lock with it: nothing left to give back
            self._lost()
            log.warning("stream slots: the database session was lost (%s) giving back a slot",
                        type(error).__name__)

    def _connection(self) -> sa.Connection:
        if self._conn is None:
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")  # no transaction stays
            try:
                store.keep_session(conn)
            except Exception:
                conn.invalidate()
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _lost(self) -> None:
        """The session is gone (or unusable), and every slot it held with it: the running streams' slots are taken
        again on the next session."""
        conn, self._conn = self._conn, None
        self._session += 1
        self._held.clear()
        self._orphans |= self._live
        self._live.clear()
        if conn is not None:
            with contextlib.suppress(Exception):  # a connection already broken
                conn.invalidate()
                conn.close()

    def close(self) -> None:
        self._lost()
        self._orphans.clear()


class StreamQuota:
    """The card limits as one stream applies them. The stream feeds the workers only while ``may_feed()``: cards
    fed but not yet recorded never exceed the allowance known (so no HSM work is done far past a limit); and before
    each message's new bundles are recorded, ``admit(n)`` says how many of them may be: the message carries those,
    then the stream ends with ``error``. ``admit`` asks the database (one indexed query) unless the allowance it
    learned less than ``RECHECK`` seconds ago is still more than twice what the stream has used of it since, message
    included: far from every limit, a stream asks about once a second, near one before every message."""

    def __init__(self, quotas: Quotas, station: Principal, domains: tuple[str, ...], method: str,
                 taken: list[tuple[str, str, Slot | None]]) -> None:
        self._quotas = quotas
        self._station = station
        self._domains = domains
        self._method = method
        self._taken = taken
        self._fed = 0
        self._recorded = 0
        self._last: Allowance | None = None
        self._asked_at = 0.0  # monotonic time of the last query
        self._asked_recorded = 0  # self._recorded then

    def _ask(self) -> Allowance:
        self._last = self._quotas.allowance(self._station, self._domains)
        self._asked_at, self._asked_recorded = time.monotonic(), self._recorded
        return self._last

    def _available(self) -> int:
        """The allowance last learned, less what this stream recorded since."""
        assert self._last is not None
        return self._last.left - (self._recorded - self._asked_recorded)

    def may_feed(self) -> bool:
        """Whether one more card may go to the workers (asking the database again only when the allowance known
        is taken up by the cards in flight)."""
        if self._last is None or self._fed - self._recorded >= self._available():
            self._ask()
        if self._fed - self._recorded >= self._available():
            return False
        self._fed += 1
        return True

    def admit(self, count: int) -> int:
        """How many of ``count`` new bundles may be recorded now (before the message is recorded)."""
        if count == 0:
            return 0
        if (self._last is not None and time.monotonic() - self._asked_at < RECHECK
                and 2 * (self._recorded - self._asked_recorded + count) <= self._last.left):
            return count
        return min(count, self._ask().left)

    def recorded(self, count: int, fed: int) -> None:
        """``count`` of ``fed`` sealed cards were recorded issued (the others were discarded: still pending)."""
        self._recorded += count
        self._fed -= fed - count

    def error(self) -> ResourceExhausted:
        """The refusal that ends the stream, naming the limit that binds and its count now, after the stream's
        last message was recorded (with ``alarm.limit``)."""
        now = self._ask()
        return self._quotas.exceeded(self._station, self._method, now.limit, now.used)

    def close(self) -> None:
        taken, self._taken = self._taken, []
        self._quotas._release(taken)
