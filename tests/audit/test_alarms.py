"""Anomaly alarms (kms.audit.alarms), end to end: a development home of its own, `kms serve` in this process with an
injected clock and a limits file with office hours, real mutual TLS; the alarms found with `kms audit export --kind
alarm`, and the export verified with `kms audit verify`."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from helpers import card, client, kms, officer, open_batch, run_ceremony, service_client

from kms.audit.alarms import AlarmPolicy
from kms.cards.cardid import CardIdentity
from kms.clock import FixedClock
from kms.dev.home import Home, init_home
from kms.errors import PermissionDenied, ResourceExhausted
from kms.identity import Principal
from kms.issuance.limits import DEFAULT_LIMITS
from kms.server.serve import Service

A1, B1 = "station-a1", "station-b1"
A1_URI, B1_URI = "urn:kms:station:bureau-a:station-a1", "urn:kms:station:bureau-b:station-b1"
ALICE = officer("hrss", 0)
ERIN = Principal("auditor", "erin")
SHANGHAI = ZoneInfo("Asia/Shanghai")
START = dt.datetime(2026, 3, 2, 3, 0, tzinfo=SHANGHAI).astimezone(dt.UTC)  # 03:00 in Beijing: outside 08:00-20:00
STATUS = "/kms.v1.IssuanceService/GetBatchStatus"
ISSUE = "/kms.v1.IssuanceService/IssueCard"
STREAM = "/kms.v1.IssuanceService/StreamBatch"
CREATE = "/kms.v1.BatchService/CreateBatch"
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def ahome(tmp_path_factory: pytest.TempPathFactory) -> Home:
    return init_home(tmp_path_factory.mktemp("alarms-home"), bureaus={"bureau-a": (A1,), "bureau-b": (B1,)})


@pytest.fixture(scope="module")
def clock() -> FixedClock:
    return FixedClock(START)


@pytest.fixture(scope="module")
def svc(ahome: Home, clock: FixedClock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service with the shipped limits, except office hours 08:00-20:00 and 5 refusals a minute."""
    text = DEFAULT_LIMITS.read_text()
    for old, new in (('from: "00:00", to: "24:00"', 'from: "08:00", to: "20:00"'), ("count: 20", "count: 5")):
        assert old in text
        text = text.replace(old, new)
    limits = tmp_path_factory.mktemp("alarms-policy") / "limits.yaml"
    limits.write_text(text)
    service = Service(ahome.config, listen="127.0.0.1:0", clock=clock, limits=limits)
    yield service
    service.stop(grace=0)


@pytest.fixture(autouse=True)
def _next_day(clock: FixedClock) -> None:
    """Each test starts on a day after the last, at 03:00 in Beijing: no refusal window or alarm memory carries
    over."""
    local = clock.now().astimezone(SHANGHAI)
    clock.advance(dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(3), SHANGHAI) - local)


def alarms(svc: Service, after: int, kind: str = "alarm") -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in svc.audit.records(after, kind=kind)]


def created(home: Home, svc: Service, bureau: str, n: int = 2, authorize: bool = False
            ) -> tuple[str, list[CardIdentity]]:
    batch_id = f"AL-{next(_ids):04d}"
    cards = [card(next(_ids) * 1000 + i, card_ref=f"{batch_id}-{i}") for i in range(n)]
    with client(home, svc.port, ALICE) as alice:
        if authorize:
            open_batch(home, svc.port, alice, batch_id, bureau, "dual-app-v1", cards)
        else:
            alice.create_batch(batch_id, bureau, "dual-app-v1", cards)
    return batch_id, cards


# -- outside the configured hours ------------------------------------------------------------------------------


def test_a_station_calling_outside_the_hours_raises_one_alarm_an_hour(
        ahome: Home, svc: Service, clock: FixedClock) -> None:
    batch_id, _ = created(ahome, svc, "bureau-a")
    start, _ = svc.audit.head()
    with service_client(ahome, svc, A1) as st:
        assert st.batch_status(batch_id).batch_id == batch_id  # the call itself goes on
        [alarm] = alarms(svc, start, "alarm.hours")
        assert (alarm["actor"], alarm["subject"], alarm["outcome"]) == (A1_URI, STATUS, "alarm")
        assert alarm["detail"] == {"method": STATUS, "local_time": "03:00", "hours": "08:00-20:00 Asia/Shanghai"}
        clock.advance(dt.timedelta(minutes=50))
        st.batch_status(batch_id)
        assert len(alarms(svc, start, "alarm.hours")) == 1  # not again within the hour
        with client(ahome, svc.port, ALICE) as alice:
            alice.batch_status(batch_id)  # officers are not held to the stations' hours
        assert len(alarms(svc, start, "alarm.hours")) == 1
        clock.advance(dt.timedelta(minutes=11))
        st.batch_status(batch_id)
        later = alarms(svc, start, "alarm.hours")
        assert len(later) == 2 and later[1]["detail"]["local_time"] == "04:01"
        clock.advance(dt.timedelta(hours=6))  # 10:01 in Beijing
        st.batch_status(batch_id)
        assert len(alarms(svc, start, "alarm.hours")) == 2


def test_office_hours_arithmetic() -> None:
    day = AlarmPolicy(5, 60, 8 * 60, 20 * 60, SHANGHAI)
    night = AlarmPolicy(5, 60, 22 * 60, 6 * 60, SHANGHAI)  # a night shift, across midnight
    always = AlarmPolicy(5, 60, 0, 24 * 60, SHANGHAI)

    def at(hour: int, minute: int = 0) -> dt.datetime:
        return dt.datetime(2026, 3, 2, hour, minute, tzinfo=SHANGHAI).astimezone(dt.UTC)

    assert [day.within_hours(at(h, m)) for h, m in ((7, 59), (8, 0), (19, 59), (20, 0))] == [False, True, True, False]
    assert [night.within_hours(at(h)) for h in (21, 22, 0, 5, 6, 12)] == [False, True, True, True, False, False]
    assert all(always.within_hours(at(h, 59)) for h in range(24))
    assert night.hours() == "22:00-06:00 Asia/Shanghai"


# -- refusals faster than the threshold --------------------------------------------------------------------------


def test_refusals_faster_than_the_threshold_raise_one_alarm_per_window(
        ahome: Home, svc: Service, clock: FixedClock) -> None:
    theirs, _ = created(ahome, svc, "bureau-a")
    start, _ = svc.audit.head()

    def refuse(st: Any, times: int) -> None:
        for i in range(times):
            with pytest.raises(PermissionDenied):
                if i % 2:
                    st.batch_status(theirs)  # refused by the handler: another bureau's batch
                else:
                    st.create_batch(f"X-{i}", "bureau-b", "dual-app-v1", [card(i)])  # refused by policy

    with service_client(ahome, svc, B1) as st:
        refuse(st, 4)
        assert alarms(svc, start, "alarm.refusals") == []
        refuse(st, 1)
        [alarm] = alarms(svc, start, "alarm.refusals")
        assert (alarm["actor"], alarm["subject"]) == (B1_URI, CREATE)
        assert alarm["detail"] == {"method": CREATE, "refusals": 5, "seconds": 60, "last_status": "PERMISSION_DENIED"}
        refuse(st, 10)  # still the same window: no second alarm
        assert len(alarms(svc, start, "alarm.refusals")) == 1
        clock.advance(dt.timedelta(seconds=61))
        refuse(st, 4)
        assert len(alarms(svc, start, "alarm.refusals")) == 1  # four in this minute are not five
        refuse(st, 1)
        assert len(alarms(svc, start, "alarm.refusals")) == 2
        st.batch_status(created(ahome, svc, "bureau-b")[0])  # an answered call is no refusal
    assert {a["actor"] for a in alarms(svc, start, "alarm.refusals")} == {B1_URI}
    # GetBatchStatus of another bureau's batch asks for no cards: no outside-batch alarm for it.
    assert alarms(svc, start, "alarm.outside-batch") == []


# -- asking for cards outside its batches --------------------------------------------------------------------------


def test_a_station_asking_for_cards_outside_its_batches_raises_an_alarm_without_card_data(
        ahome: Home, svc: Service) -> None:
    mine, cards = created(ahome, svc, "bureau-a", authorize=True)
    theirs, their_cards = created(ahome, svc, "bureau-b")
    start, _ = svc.audit.head()
    pan_like = "6214830000000000001"
    with service_client(ahome, svc, A1) as st:
        with pytest.raises(PermissionDenied, match=f"batch {theirs} is not authorized for bureau-a"):
            st.issue_card(theirs, their_cards[0].card_ref)
        with pytest.raises(PermissionDenied, match="batch NO-SUCH-BATCH is not authorized"):
            list(st.stream_batch("NO-SUCH-BATCH"))
        with pytest.raises(PermissionDenied, match="is not in batch"):
            st.issue_card(mine, "someone-elses-card")
        with pytest.raises(PermissionDenied, match="is not in batch"):
            st.issue_card(mine, pan_like)
        with pytest.raises(PermissionDenied, match="is not in batch"):
            st.issue_card(mine, "bad ref!")
    found = alarms(svc, start, "alarm.outside-batch")
    assert [(a["actor"], a["subject"]) for a in found] == [(A1_URI, ISSUE), (A1_URI, STREAM)] + [(A1_URI, ISSUE)] * 3
    other_bureau = "the batch is not the station's bureau's, or does not exist"
    not_listed = "the batch does not list the card"
    assert [a["detail"] for a in found] == [
        {"method": ISSUE, "batch_id": theirs, "reason": other_bureau},
        {"method": STREAM, "batch_id": "NO-SUCH-BATCH", "reason": other_bureau},
        {"method": ISSUE, "batch_id": mine, "card_ref": "someone-elses-card", "reason": not_listed},
        {"method": ISSUE, "batch_id": mine, "card_ref": "621483*********0001", "reason": not_listed},
        {"method": ISSUE, "batch_id": mine, "card_ref": "(not a valid reference)", "reason": not_listed},
    ]
    text = json.dumps(found)
    assert pan_like not in text
    assert not any(value in text for c in cards + their_cards for value in (c.pan, c.card_serial, c.kdd) if value)


# -- found by `kms audit export --kind alarm`; the export verifies --------------------------------------------------


def test_audit_export_kind_alarm_finds_every_kind_and_verifies(ahome: Home, svc: Service, tmp_path: Path) -> None:
    batch_id, _ = created(ahome, svc, "bureau-a", authorize=True)
    start, _ = svc.audit.head()
    # alarm.limit: no stream at all for this station (a ceremony sets it), so the first one trips it.
    done = run_ceremony(ahome, svc.port, "bank", "set-limits",
                        {"scope": "station", "subject": A1_URI, "concurrent_streams": 0})
    assert done.state == "executed", done.error
    with service_client(ahome, svc, A1) as st:
        with pytest.raises(ResourceExhausted, match=r"limit concurrent_streams \(0\) reached; 0 streams in progress"):
            list(st.stream_batch(batch_id))  # alarm.hours too: it is 03:00 in Beijing
        with pytest.raises(PermissionDenied):
            st.issue_card("NOT-MINE", "c-1")  # alarm.outside-batch
        for _ in range(4):  # with the two refusals above: alarm.refusals
            with pytest.raises(PermissionDenied):
                st.create_batch("X-1", "bureau-a", "dual-app-v1", [card(1)])
    run_ceremony(ahome, svc.port, "bank", "set-limits",
                 {"scope": "station", "subject": A1_URI, "concurrent_streams": "default"})
    expected = {"alarm.limit", "alarm.hours", "alarm.outside-batch", "alarm.refusals"}
    assert {a["kind"] for a in alarms(svc, start)} == expected

    out = tmp_path / "alarms.jsonl"
    exported = kms("audit", "export", "--client", str(ahome.client_config(ERIN)), "--server",
                   f"localhost:{svc.port}", "-o", str(out), "--kind", "alarm", "--json", check=True)
    assert json.loads(exported.stdout)["records"] > 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    shown = [line["body"] for line in lines if line["type"] == "record"]
    assert shown and all(body["kind"].startswith("alarm.") for body in shown)
    assert expected <= {body["kind"] for body in shown}
    assert any(line["type"] == "omitted" for line in lines)  # the rest of the chain, by digest only
    verified = kms("audit", "verify", str(out), "--public-key", str(ahome.path / "audit" / "audit-v1.pem"),
                   check=True)
    assert verified.stdout.startswith("audit log verified:")
