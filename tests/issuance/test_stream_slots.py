"""Concurrent streams across replicas (kms.issuance.limits.StreamSlots): on PostgreSQL a station's and a bureau's
``concurrent_streams`` count the streams of every replica on the database, and a replica that dies frees its slots
with its database session. Replicas here are Quotas on engines of their own, and one process of its own."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import EngineFactory

from kms.clock import FixedClock
from kms.errors import ResourceExhausted
from kms.identity import Principal
from kms.issuance.limits import DEFAULT_LIMITS, LimitsPolicy, Quotas, StreamQuota

STATION = Principal("station", "station-a1", bureau="bureau-a")
OTHER = Principal("station", "station-a2", bureau="bureau-a")
CLOCK = FixedClock(dt.datetime(2026, 12, 1, 23, 0, tzinfo=dt.UTC))
STREAM = "/kms.v1.IssuanceService/StreamBatch"

#: A replica in a process of its own that opens ``count`` streams of station-a1 and says so, then waits to be killed.
HOLDER = """
import datetime as dt, sys, time
from pathlib import Path
import sqlalchemy as sa
from kms.clock import FixedClock
from kms.identity import Principal
from kms.issuance.limits import LimitsPolicy, Quotas
url, schema, policy, count = sys.argv[1:5]
engine = sa.create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
quotas = Quotas(engine, FixedClock(dt.datetime(2026, 12, 1, 23, 0, tzinfo=dt.UTC)), LimitsPolicy.load(Path(policy)))
held = [quotas.stream(Principal("station", "station-a1", bureau="bureau-a"), ("hrss", "bank"), "s")
        for _ in range(int(count))]
print("holding", len(held), flush=True)
time.sleep(600)
"""


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    """The shipped limits with 2 streams per station and 3 per bureau."""
    text = DEFAULT_LIMITS.read_text()
    text = text.replace("concurrent_streams: 4 ", "concurrent_streams: 2 ").replace("concurrent_streams: 16",
                                                                                    "concurrent_streams: 3")
    path = tmp_path / "limits.yaml"
    path.write_text(text)
    loaded = LimitsPolicy.load(path)
    assert (loaded.station["concurrent_streams"], loaded.bureau["concurrent_streams"]) == (2, 3)
    return path


@pytest.fixture
def replicas(backend: EngineFactory, policy: Path) -> Iterator[list[Quotas]]:
    made = [Quotas(backend(), CLOCK, LimitsPolicy.load(policy)) for _ in range(2)]
    yield made
    for quotas in made:
        quotas.close()


def _open(quotas: Quotas, station: Principal = STATION) -> StreamQuota:
    return quotas.stream(station, ("hrss", "bank"), STREAM)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_stations_streams_count_across_replicas(replicas: list[Quotas]) -> None:
    a, b = replicas
    first, second = _open(a), _open(b)
    with pytest.raises(ResourceExhausted, match=r"station urn:kms:station:bureau-a:station-a1: limit "
                       r"concurrent_streams \(2\) reached; 2 streams in progress") as refused:
        _open(a)
    assert refused.value.limit == "concurrent_streams"
    with pytest.raises(ResourceExhausted, match="limit concurrent_streams"):
        _open(b)
    third = _open(b, OTHER)  # the bureau's third
    with pytest.raises(ResourceExhausted, match=r"bureau bureau-a: limit concurrent_streams \(3\) reached"):
        _open(a, OTHER)
    second.close()  # a slot of the station and one of its bureau are free again, for any replica
    again = _open(a)
    with pytest.raises(ResourceExhausted):
        _open(b)
    for stream in (first, third, again):
        stream.close()
    held = [_open(r) for r in (b, b)]  # nothing leaked: all free again
    for stream in held:
        stream.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_on_sqlite_streams_are_counted_per_replica(replicas: list[Quotas]) -> None:
    """One host's database: each process counts its own streams (docs/deployment.md, "Scale-out")."""
    a, b = replicas
    streams = [_open(a), _open(a), _open(b)]
    with pytest.raises(ResourceExhausted):
        _open(a)
    for stream in streams:
        stream.close()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_replica_that_dies_frees_its_streams(replicas: list[Quotas], backend: EngineFactory,
                                               policy: Path) -> None:
    import os

    with backend().connect() as conn:
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, os.environ["KMS_TEST_POSTGRES_URL"], schema,
                               str(policy), "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding 2"
        with pytest.raises(ResourceExhausted, match=r"concurrent_streams \(2\) reached; 2 streams"):
            _open(replicas[0])
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        # PostgreSQL ends the dead replica's session (its socket closed), and its slots with it
        streams = [_open(replicas[0]), _open(replicas[1])]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    for stream in streams:
        stream.close()


def _slot_session_pid(quotas: Quotas) -> int:
    """The backend of the session that holds ``quotas``' slots (for a fault injector to end it)."""
    assert quotas.slots is not None and quotas.slots._conn is not None
    pid = int(quotas.slots._conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
    quotas.slots._conn.commit()  # the session idle again, as the slots leave it
    return pid


def _terminate(backend: EngineFactory, pid: int) -> None:
    with backend().connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid}).scalar_one()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_stream_of_a_lost_slot_session_never_gives_back_a_slot_of_the_new_one(
        replicas: list[Quotas], backend: EngineFactory) -> None:
    """The slot session ends under a running stream (its slot with it); the next stream takes a slot on a new
    session at once (the dead one is found and replaced, not reported), likely the same number; the old stream's
    end must not free the new stream's slot, or a station would exceed its limit across replicas."""
    a, b = replicas
    old = _open(a)  # station slot 0 and bureau slot 0 on a's first session
    _terminate(backend, _slot_session_pid(a))
    new = _open(a)  # on a new session, the same slots (the old ones went with the session)
    old.close()
    held = _open(b)  # the station's second stream, counting a's new one
    with pytest.raises(ResourceExhausted, match=r"concurrent_streams \(2\) reached; 2 streams"):
        _open(b)
    for stream in (new, held):
        stream.close()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_slot_given_back_on_a_dead_session_is_not_an_error(replicas: list[Quotas], backend: EngineFactory) -> None:
    a, b = replicas
    stream = _open(a)
    _terminate(backend, _slot_session_pid(a))
    stream.close()  # the lock went with the session: nothing to give back, nothing raised
    streams = [_open(b), _open(b)]
    for s in streams:
        s.close()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_the_slot_session_is_not_ended_by_the_servers_idle_timeout(backend: EngineFactory, policy: Path) -> None:
    import os

    with backend().connect() as conn:
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
    idle = sa.create_engine(os.environ["KMS_TEST_POSTGRES_URL"], connect_args={
        "options": f"-csearch_path={schema} -cidle_session_timeout=100"})
    a, b = Quotas(idle, CLOCK, LimitsPolicy.load(policy)), Quotas(backend(), CLOCK, LimitsPolicy.load(policy))
    try:
        first = _open(a)
        pid = _slot_session_pid(a)
        with backend().connect() as conn:  # idle for longer than the engine's idle_session_timeout (100 ms)
            conn.execute(sa.text("SELECT pg_sleep(0.5)"))
            alive = conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"),
                                 {"pid": pid}).scalar_one()
        assert alive == 1
        second = _open(b)
        with pytest.raises(ResourceExhausted, match=r"concurrent_streams \(2\) reached"):
            _open(b)
        for stream in (first, second):
            stream.close()
    finally:
        a.close()
        b.close()
        idle.dispose()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_replica_that_loses_its_slot_session_takes_its_running_streams_slots_again(
        replicas: list[Quotas], backend: EngineFactory) -> None:
    """The slot session ends under two running streams of a station (limit 2): until the replica next starts a
    stream, another replica may take them (nothing is counted); when it does, it takes the running streams' slots
    again first, so the other replica is refused, and the limit binds again across replicas."""
    a, b = replicas
    first = _open(a)
    _terminate(backend, _slot_session_pid(a))
    other = _open(a, OTHER)  # a new session: station-a1's running stream takes its slot again, then this one
    second = _open(b)  # station-a1's second
    with pytest.raises(ResourceExhausted, match=r"station urn:kms:station:bureau-a:station-a1: limit "
                       r"concurrent_streams \(2\) reached; 2 streams"):
        _open(b)
    first.close()  # given back on the new session: free again for any replica
    third = _open(b)
    for stream in (other, second, third):
        stream.close()
