"""Per-station and per-bureau issuance limits (kms.issuance.limits), end to end: a development home of its own, `kms
serve` in this process with an injected clock, real mutual TLS, real worker processes and tokens, limits changed only by
set-limits ceremonies signed with the officers' approval keys."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import (
    EngineFactory,
    SoftwarePans,
    card,
    client,
    key,
    kms,
    officer,
    open_batch,
    run_ceremony,
    service_client,
)

from kms import store
from kms.cards.cardid import CardIdentity
from kms.client.ceremony import CeremonyClient
from kms.clock import FixedClock
from kms.dev.home import Home, init_home
from kms.errors import ConfigError, InvalidArgument, InvalidState, PermissionDenied, ResourceExhausted
from kms.identity import Principal
from kms.issuance import limits
from kms.issuance.batches import BatchStore
from kms.issuance.limits import DEFAULT_LIMITS, IssueCounts, LimitsPolicy
from kms.server.authz import DEFAULT_POLICY, Policy
from kms.server.serve import Service

STATION = "station-a1"
STATION_URI = "urn:kms:station:bureau-a:station-a1"
ME = Principal("station", STATION, bureau="bureau-a")
BOTH = ("hrss", "bank")
ALICE = officer("hrss", 0)
STREAM = "/kms.v1.IssuanceService/StreamBatch"
ISSUE = "/kms.v1.IssuanceService/IssueCard"
START = dt.datetime(2026, 3, 2, 2, 0, tzinfo=dt.UTC)  # 10:00 in Beijing
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def lhome(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """A home of this module's own: its limits, clock and records touch no other test's."""
    return init_home(tmp_path_factory.mktemp("limits-home"),
                     bureaus={"bureau-a": (STATION,), "bureau-b": ("station-b1",)})


@pytest.fixture(scope="module")
def clock() -> FixedClock:
    return FixedClock(START)


@pytest.fixture(scope="module")
def svc(lhome: Home, clock: FixedClock) -> Iterator[Service]:
    service = Service(lhome.config, listen="127.0.0.1:0", clock=clock)
    yield service
    service.stop(grace=0)


@pytest.fixture(autouse=True)
def _fresh_windows(clock: FixedClock) -> None:
    """Each test starts two days after the last: earlier tests' cards are out of every window."""
    clock.advance(dt.timedelta(days=2))


def set_limits(home: Home, svc: Service, domain: str, scope: str, subject: str, **values: Any) -> dict[str, Any]:
    done = run_ceremony(home, svc.port, domain, "set-limits", {"scope": scope, "subject": subject, **values})
    assert done.state == "executed", done.error
    result: dict[str, Any] = json.loads(done.result_json)
    return result


def new_batch(home: Home, svc: Service, n: int, bureau: str = "bureau-a") -> tuple[str, list[CardIdentity]]:
    batch_id = f"L-{next(_ids):04d}"
    cards = [card(next(_ids) * 1000 + i, card_ref=f"{batch_id}-{i:03d}") for i in range(n)]
    with client(home, svc.port, ALICE) as alice:
        open_batch(home, svc.port, alice, batch_id, bureau, "dual-app-v1", cards)
    return batch_id, cards


def fetch(home: Home, svc: Service, batch_id: str, *, cursor: str = "", per_message: int = 16
          ) -> tuple[list[Any], ResourceExhausted | None]:
    """The bundles a stream delivers, and the refusal it ended with (if any)."""
    got: list[Any] = []
    with service_client(home, svc, STATION) as st:
        try:
            for bundle in st.stream_batch(batch_id, cursor=cursor, per_message=per_message):
                got.append(bundle)
        except ResourceExhausted as refused:
            return got, refused
    return got, None


def records(svc: Service, kind: str, after: int = 0) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in svc.audit.records(after, kind=kind)]


def issued(home: Home, svc: Service, batch_id: str) -> int:
    with service_client(home, svc, STATION) as st:
        return int(st.batch_status(batch_id).issued)


# -- cards per hour: refused naming the limit, an alarm, a ceremony raises it ------------------------------------


def test_a_station_over_its_cards_per_hour_is_refused_naming_the_limit_until_a_ceremony_raises_it(
        lhome: Home, svc: Service) -> None:
    start, _ = svc.audit.head()
    done = set_limits(lhome, svc, "hrss", "station", STATION_URI, cards_per_hour=20)
    assert done == {"domain": "hrss", "scope": "station", "subject": STATION_URI,
                    "values": {"cards_per_hour": 20}, **{k: done[k] for k in ("approved_by", "required")}}
    batch_id, cards = new_batch(lhome, svc, 30)

    got, refused = fetch(lhome, svc, batch_id, per_message=16)
    # 16 in the first message, 4 in the second (cut at the limit), then RESOURCE_EXHAUSTED naming the limit.
    assert [b.card_ref for b in got] == [c.card_ref for c in cards[:20]]
    assert refused is not None and refused.limit == "cards_per_hour"
    assert str(refused) == f"station {STATION_URI}: limit cards_per_hour (20) reached; 20 issued in the last hour"
    assert issued(lhome, svc, batch_id) == 20  # nothing past the limit was recorded
    [alarm] = records(svc, "alarm.limit", start)
    assert (alarm["kind"], alarm["actor"], alarm["subject"], alarm["outcome"]) == (
        "alarm.limit", STATION_URI, STREAM, "alarm")
    assert alarm["detail"] == {"method": STREAM, "limit": "cards_per_hour", "scope": "station",
                               "subject": STATION_URI, "value": 20, "used": 20}
    [changed] = records(svc, "limits.set", start)
    assert (changed["domain"], changed["subject"]) == ("hrss", f"station {STATION_URI}")
    assert changed["detail"]["values"] == {"cards_per_hour": 20}

    # One card with IssueCard: refused the same way, before any HSM work; the alarm is not repeated.
    with service_client(lhome, svc, STATION) as st, pytest.raises(ResourceExhausted, match=r"cards_per_hour \(20\)"):
        st.issue_card(batch_id, cards[20].card_ref)
    assert issued(lhome, svc, batch_id) == 20
    assert len(records(svc, "alarm.limit", start)) == 1
    # Fetching again sends the 20 stored bundles (no new issuance), then the same refusal at the first new card.
    again, refused = fetch(lhome, svc, batch_id)
    assert [b.serial for b in again] == [b.serial for b in got] and refused is not None

    # The domain raises it by ceremony: the stream goes on from its cursor, up to the new value.
    set_limits(lhome, svc, "hrss", "station", STATION_URI, cards_per_hour=25)
    more, refused = fetch(lhome, svc, batch_id, cursor=str(got[-1].sequence))
    assert [b.card_ref for b in more] == [c.card_ref for c in cards[20:25]]
    assert refused is not None and "limit cards_per_hour (25) reached; 25 issued" in str(refused)
    # "default" drops the domain's value: the defaults file's applies, and the batch completes.
    set_limits(lhome, svc, "hrss", "station", STATION_URI, cards_per_hour="default")
    rest, refused = fetch(lhome, svc, batch_id, cursor=str(more[-1].sequence))
    assert refused is None and [b.card_ref for b in rest] == [c.card_ref for c in cards[25:]]
    assert issued(lhome, svc, batch_id) == 30
    assert len({b.serial for b in got + more + rest}) == 30
    assert [r["detail"]["values"] for r in records(svc, "limits.set", start)] == [
        {"cards_per_hour": 20}, {"cards_per_hour": 25}, {"cards_per_hour": "default"}]


def test_the_window_slides_with_the_clock(lhome: Home, svc: Service, clock: FixedClock) -> None:
    set_limits(lhome, svc, "bank", "station", STATION_URI, cards_per_hour=3)
    try:
        batch_id, cards = new_batch(lhome, svc, 5)
        with service_client(lhome, svc, STATION) as st:
            for c in cards[:3]:
                st.issue_card(batch_id, c.card_ref)
            with pytest.raises(ResourceExhausted, match=r"cards_per_hour \(3\) reached; 3 issued in the last hour"):
                st.issue_card(batch_id, cards[3].card_ref)
            clock.advance(dt.timedelta(minutes=59))
            with pytest.raises(ResourceExhausted):
                st.issue_card(batch_id, cards[3].card_ref)
            clock.advance(dt.timedelta(minutes=2))  # the three cards are more than an hour old now
            st.issue_card(batch_id, cards[3].card_ref)
            st.issue_card(batch_id, cards[4].card_ref)
        assert issued(lhome, svc, batch_id) == 5
    finally:
        set_limits(lhome, svc, "bank", "station", STATION_URI, cards_per_hour="default")


# -- each domain's values; the smallest applies --------------------------------------------------------------------


def test_either_domain_tightens_alone_and_raising_above_the_default_takes_both(lhome: Home, svc: Service) -> None:
    # A bureau's cards per day, tightened by the bank domain alone.
    set_limits(lhome, svc, "bank", "bureau", "bureau-a", cards_per_day=12)
    batch_id, _ = new_batch(lhome, svc, 15)
    got, refused = fetch(lhome, svc, batch_id, per_message=5)
    assert len(got) == 12
    assert str(refused) == "bureau bureau-a: limit cards_per_day (12) reached; 12 issued in the last day"
    # The hrss domain's higher value does not lift the bank's: the smallest applies.
    set_limits(lhome, svc, "hrss", "bureau", "bureau-a", cards_per_day=1000)
    _, refused = fetch(lhome, svc, batch_id, cursor=str(got[-1].sequence))
    assert refused is not None and "(12) reached" in str(refused)
    # The bank domain's value for every bureau ("default") is what applies once its bureau-a value is dropped.
    set_limits(lhome, svc, "bank", "bureau", "default", cards_per_day=13)
    set_limits(lhome, svc, "bank", "bureau", "bureau-a", cards_per_day="default")
    one, refused = fetch(lhome, svc, batch_id, cursor=str(got[-1].sequence))
    assert len(one) == 1 and refused is not None and "bureau bureau-a: limit cards_per_day (13) reached" in str(refused)
    set_limits(lhome, svc, "bank", "bureau", "default", cards_per_day="default")
    rest, refused = fetch(lhome, svc, batch_id, cursor=str(one[-1].sequence))
    assert refused is None and len(rest) == 2 and issued(lhome, svc, batch_id) == 15
    set_limits(lhome, svc, "hrss", "bureau", "bureau-a", cards_per_day="default")

    # Above the defaults file's value: one domain alone changes nothing, both together do.
    default = LimitsPolicy.load().station["cards_per_hour"]
    set_limits(lhome, svc, "hrss", "station", STATION_URI, cards_per_hour=default * 2)
    assert svc.quotas.limit(ME, BOTH, "station", "cards_per_hour").value == default
    assert svc.quotas.limit(ME, ("hrss",), "station", "cards_per_hour").value == default * 2  # an hrss-only batch
    set_limits(lhome, svc, "bank", "station", STATION_URI, cards_per_hour=default * 2)
    assert svc.quotas.limit(ME, BOTH, "station", "cards_per_hour").value == default * 2
    for domain in BOTH:
        set_limits(lhome, svc, domain, "station", STATION_URI, cards_per_hour="default")
    assert svc.quotas.limit(ME, BOTH, "station", "cards_per_hour").value == default


# -- concurrent streams ------------------------------------------------------------------------------------------


class _Held:
    """Fault injection: an issuer whose sealing waits until released (a slow HSM), so that a stream stays in
    progress, holding its slot, for as long as the test needs."""

    def __init__(self, inner: Any, entered: threading.Event, release: threading.Event) -> None:
        self._inner, self._entered, self._release = inner, entered, release

    def issue(self, cards: Any, batch: str, pins: Any = None) -> Iterator[Any]:
        self._entered.set()
        assert self._release.wait(120)
        yield from self._inner.issue(cards, batch, pins)


@pytest.mark.parametrize(("scope", "subject"), [("station", STATION_URI), ("bureau", "bureau-a")])
def test_concurrent_streams(lhome: Home, svc: Service, monkeypatch: pytest.MonkeyPatch, scope: str,
                            subject: str) -> None:
    start, _ = svc.audit.head()
    set_limits(lhome, svc, "hrss", scope, subject, concurrent_streams=1)
    batch_id, cards = new_batch(lhome, svc, 6)
    entered, release = threading.Event(), threading.Event()
    real = svc.issuance.issuer
    monkeypatch.setattr(svc.issuance, "issuer", lambda bureau, profile: _Held(real(bureau, profile), entered, release))
    first: list[Any] = []
    failed: list[BaseException] = []

    def stream() -> None:
        try:
            first.extend(fetch(lhome, svc, batch_id)[0])
        except BaseException as error:  # reported by the assertion below
            failed.append(error)

    runner = threading.Thread(target=stream)
    runner.start()
    try:
        assert entered.wait(60), "the first stream did not start"
        second, refused = fetch(lhome, svc, batch_id)
        assert second == [] and refused is not None and refused.limit == "concurrent_streams"
        assert str(refused) == f"{scope} {subject}: limit concurrent_streams (1) reached; 1 stream in progress"
    finally:
        release.set()
        runner.join(120)
    assert not failed and [b.card_ref for b in first] == [c.card_ref for c in cards]
    [alarm] = records(svc, "alarm.limit", start)
    assert alarm["detail"] == {"method": STREAM, "limit": "concurrent_streams", "scope": scope, "subject": subject,
                               "value": 1, "used": 1}
    again, refused = fetch(lhome, svc, batch_id)  # the slot is free again once the stream ended
    assert refused is None and len(again) == 6
    set_limits(lhome, svc, "hrss", scope, subject, concurrent_streams="default")


# -- the command line --------------------------------------------------------------------------------------------


def test_station_fetch_stops_at_the_limit_with_its_own_exit_status(lhome: Home, svc: Service, tmp_path: Path) -> None:
    set_limits(lhome, svc, "hrss", "station", STATION_URI, cards_per_day=4)
    try:
        batch_id, cards = new_batch(lhome, svc, 6)
        out = tmp_path / "bundles"
        result = kms("station", "fetch", "--station-config", str(lhome.station_config(STATION)),
                     "--server", f"localhost:{svc.port}", "--batch-id", batch_id, "--out", str(out))
        assert result.returncode == ResourceExhausted.exit_code == 11
        assert result.stderr.strip().splitlines()[-1] == (
            f"kms: error: station {STATION_URI}: limit cards_per_day (4) reached; 4 issued in the last day")
        assert sorted(p.stem for p in out.glob("*.kmsb")) == [c.card_ref for c in cards[:4]]
    finally:
        set_limits(lhome, svc, "hrss", "station", STATION_URI, cards_per_day="default")


# -- changed only by ceremony ------------------------------------------------------------------------------------


def test_limits_change_only_by_a_ceremony_with_its_quorum(lhome: Home, svc: Service) -> None:
    # No RPC is about limits: the policy lists none, so any such call would be denied by default.
    assert not [m for m in Policy.load(DEFAULT_POLICY).methods if "limit" in m.lower()]
    # A ceremony short of its quorum (2 approvers) cannot run; nothing changes.
    short = run_ceremony(lhome, svc.port, "hrss", "set-limits",
                         {"scope": "station", "subject": STATION_URI, "cards_per_hour": 1}, approvers=(1,),
                         execute=False)
    assert short.required == 2
    with client(lhome, svc.port, ALICE) as alice, pytest.raises(InvalidState, match="1 of the 2 approvals"):
        CeremonyClient(alice).execute(short.ceremony_id)
    assert svc.quotas.limit(ME, BOTH, "station", "cards_per_hour").value == DEFAULT_POLICY_VALUES["cards_per_hour"]
    # A station cannot propose one.
    with service_client(lhome, svc, STATION) as st, pytest.raises(PermissionDenied, match="may not call"):
        CeremonyClient(st).propose("set-limits", {"scope": "station", "subject": STATION_URI, "cards_per_hour": 9})
    # The defaults file: read at start-up, its digest in service.started.
    started = records(svc, "service.started")[-1]
    assert started["detail"]["policies"]["limits"] == hashlib.sha256(DEFAULT_LIMITS.read_bytes()).hexdigest()


DEFAULT_POLICY_VALUES = dict(LimitsPolicy.load().station)


@pytest.mark.parametrize(("params", "field", "reason"), [
    ({"scope": "planet", "subject": "default", "cards_per_hour": 1}, "params.scope", "must be one of station, bureau"),
    ({"scope": "station", "subject": "bureau-a", "cards_per_hour": 1}, "params.subject", "station's URI"),
    ({"scope": "station", "subject": "urn:kms:officer:hrss:alice", "cards_per_hour": 1}, "params.subject", "URI"),
    ({"scope": "bureau", "subject": "Bureau A", "cards_per_hour": 1}, "params.subject", "bureau's name"),
    ({"scope": "bureau", "subject": "bureau-a", "cards_per_hour": -1}, "params.cards_per_hour", "whole number"),
    ({"scope": "bureau", "subject": "bureau-a", "cards_per_day": "lots"}, "params.cards_per_day", "whole number"),
    ({"scope": "bureau", "subject": "bureau-a"}, "params", "name at least one limit"),
    ({"scope": "bureau", "subject": "bureau-a", "cards_per_week": 5}, "params.cards_per_week", "not a parameter"),
    ({"subject": "bureau-a", "cards_per_day": 5}, "params.scope", "is required"),
])
def test_set_limits_parameters_are_checked_when_proposed(lhome: Home, svc: Service, params: dict[str, Any],
                                                         field: str, reason: str) -> None:
    with client(lhome, svc.port, ALICE) as alice, pytest.raises(InvalidArgument) as refused:
        CeremonyClient(alice).propose("set-limits", params)
    assert refused.value.field == field and reason in refused.value.reason


def test_set_limits_from_the_command_line_takes_numbers_as_text(lhome: Home, svc: Service) -> None:
    """`kms ceremony propose … set-limits cards_per_hour=7` sends "7": the service stores the number 7."""
    proposed = kms("ceremony", "propose", "--client", str(lhome.client_config(ALICE)), "--server",
                   f"localhost:{svc.port}", "--json", "set-limits", "scope=bureau", "subject=bureau-b",
                   "cards_per_hour=7", check=True)
    ceremony_id = json.loads(proposed.stdout)["ceremony_id"]
    for index in (1, 2):
        with client(lhome, svc.port, officer("hrss", index)) as c:
            CeremonyClient(c).approve(ceremony_id, key(lhome, officer("hrss", index)))
    with client(lhome, svc.port, ALICE) as alice:
        done = CeremonyClient(alice).execute(ceremony_id)
    assert json.loads(done.params_json)["cards_per_hour"] == 7
    b1 = Principal("station", "station-b1", bureau="bureau-b")
    assert svc.quotas.limit(b1, BOTH, "bureau", "cards_per_hour").value == 7
    set_limits(lhome, svc, "hrss", "bureau", "bureau-b", cards_per_hour="default")


# -- the defaults file -------------------------------------------------------------------------------------------


def _limits_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "limits.yaml"
    path.write_text(text)
    return path


GOOD = DEFAULT_LIMITS.read_text()


@pytest.mark.parametrize(("change", "message"), [
    (("concurrent_streams: 4", "concurrent_streams: 4\n    cards_per_week: 5"),
     "limits.station: unknown setting 'cards_per_week'"),
    (("    cards_per_day: 2000000\n", ""), "limits.bureau: missing setting 'cards_per_day'"),
    (("cards_per_hour: 100000", "cards_per_hour: -1"), "limits.station.cards_per_hour: must be an integer"),
    (('from: "00:00"', "from: 7:30"), 'limits.alarms.hours.from: must be "HH:MM" (quoted)'),  # YAML 1.1: 450
    (('to: "24:00"', 'to: "24:30"'), 'limits.alarms.hours.to: must be "HH:MM"'),
    (("timezone: Asia/Shanghai", "timezone: Mars/Olympus"), "limits.alarms.hours.timezone: must be an IANA"),
    (("count: 20", "count: 0"), "limits.alarms.refusals.count: must be an integer from 1"),
    (("version: 1", "version: 2"), "expected 'version: 1' and 'limits'"),
])
def test_a_bad_defaults_file_is_refused_naming_file_and_setting(tmp_path: Path, change: tuple[str, str],
                                                                message: str) -> None:
    assert change[0] in GOOD
    path = _limits_file(tmp_path, GOOD.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError) as refused:
        LimitsPolicy.load(path)
    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value)


def test_the_shipped_defaults_leave_development_and_bench_volumes_alone() -> None:
    policy = LimitsPolicy.load()
    assert policy.station["cards_per_hour"] >= 20_000 and policy.station["concurrent_streams"] >= 2
    assert all(policy.bureau[n] >= policy.station[n] for n in limits.NAMES)
    assert policy.alarms.within_hours(START) and policy.alarms.within_hours(START + dt.timedelta(hours=12))


# -- counting on both databases ----------------------------------------------------------------------------------


def _issue(bstore: BatchStore, batch_id: str, bureau: str, cards: Sequence[CardIdentity], by: str) -> None:
    batch = bstore.create_batch(batch_id, bureau, "dual-app-v1", cards, "urn:kms:officer:hrss:alice")
    for domain in BOTH:
        bstore.authorize(batch_id, domain, f"C-{domain}-{batch_id}", batch.cards_digest, BOTH)
    stored = [bstore.card(batch_id, c.card_ref).identity for c in cards]  # as sealed: the PAN protected
    assert all(bstore.record_issued_many(batch_id, [(c, f"S-{c.card_ref}", b"bundle") for c in stored], by=by))


def test_issue_counts_by_station_and_bureau_and_window(backend: EngineFactory) -> None:
    engine = backend()
    clock = FixedClock(START)
    bstore = BatchStore(engine, clock, pans=SoftwarePans())
    a1, a2 = "urn:kms:station:bureau-a:a1", "urn:kms:station:bureau-a:a2"
    _issue(bstore, "B-1", "bureau-a", [card(i, card_ref=f"one-{i}") for i in range(3)], a1)
    clock.advance(dt.timedelta(hours=2))
    _issue(bstore, "B-2", "bureau-a", [card(10 + i, card_ref=f"two-{i}") for i in range(2)], a2)
    _issue(bstore, "B-3", "bureau-ab", [card(20 + i, card_ref=f"three-{i}") for i in range(4)],
           "urn:kms:station:bureau-ab:a1")  # another bureau whose name starts alike
    counts = IssueCounts(engine, clock)
    hour, day = counts.of("bureau-a")
    assert (hour.get(a1, 0), hour[a2], day[a1], day[a2]) == (0, 2, 3, 2)
    # Cards issued after the snapshot are counted at once, by the small query since its split.
    _issue(bstore, "B-4", "bureau-a", [card(30, card_ref="four-0")], a1)
    hour, day = counts.of("bureau-a")
    assert (hour[a1], day[a1]) == (1, 4)
    clock.advance(dt.timedelta(days=1, minutes=1))
    hour, day = counts.of("bureau-a")
    assert sum(hour.values()) == 0 and sum(day.values()) == 0
    with engine.connect() as conn:
        names = {i["name"] for i in sa.inspect(conn).get_indexes("card_events")}
    assert "ix_card_events_issued" in names
    store.upgrade(engine)  # again: the index is there already, nothing fails


def test_the_count_queries_search_the_issued_index() -> None:
    """SQLite's plan for each count: a search of ix_card_events_issued (a range by event and time), not a scan."""
    engine = store.make_engine("sqlite://")
    store.upgrade(engine)
    counts = IssueCounts(engine, FixedClock(START))
    statements: list[tuple[str, Any]] = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda conn, cursor, statement, parameters, *rest: statements.append((statement, parameters)))
    counts.of("bureau-a")
    counts.of("bureau-a")
    assert len(statements) == 3  # the snapshot, then only the events since its split, twice
    with engine.connect() as conn:
        for statement, parameters in statements[:2]:
            plan = " ".join(str(row) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters))
            assert "USING COVERING INDEX ix_card_events_issued (event=? AND at>?" in plan, plan


def test_a_stream_far_from_its_limits_asks_about_once_a_second_and_near_one_before_every_message(
        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = store.make_engine("sqlite://")
    store.upgrade(engine)
    quotas = limits.Quotas(engine, FixedClock(START), LimitsPolicy.load())
    asked: list[int] = []
    real = quotas.allowance

    def counted(*args: Any) -> limits.Allowance:
        asked.append(1)
        return real(*args)

    monkeypatch.setattr(quotas, "allowance", counted)
    far = quotas.stream(ME, BOTH, STREAM)
    for _ in range(10):
        assert far.admit(32) == 32
        far.recorded(32, 32)
    assert len(asked) == 1  # 320 of 100,000: one query
    now = limits.time.monotonic()
    monkeypatch.setattr(limits.time, "monotonic", lambda: now + limits.RECHECK)
    assert far.admit(32) == 32 and len(asked) == 2  # a second later it asks again
    far.close()
    asked.clear()
    quotas.store.set("hrss", {"scope": "station", "subject": STATION_URI, "cards_per_hour": 40}, "C-test")
    near = quotas.stream(ME, BOTH, STREAM)
    assert near.admit(8) == 8 and len(asked) == 1  # the first message asks
    near.recorded(8, 8)
    assert near.admit(8) == 8 and len(asked) == 1  # 16 of the 40 learned: still under half, no query
    near.recorded(8, 8)
    assert near.admit(8) == 8 and len(asked) == 2  # 24 of 40: past half, it asks before every message
    near.close()
