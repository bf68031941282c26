"""Bounded concurrency (kms.server.capacity, kms.config.Capacity), through the real server: `kms serve` in this
process over real mutual TLS, real worker processes and tokens.

One station opens 32 streams at once and reads none of them: its connection has gRPC's smallest flow-control windows
(BDP probing off), so each stream the server admits blocks on its unread messages and holds its handler thread. The
issuance limits are raised far above 32 streams (as a deployment may by set-limits ceremony), so only the server's
own settings stand between the streams and the thread pool: the streams over them are refused RESOURCE_EXHAUSTED
naming the setting, and an officer's GetBatchStatus is still answered within a 1 s deadline. (Without these settings
the same 32 streams took all 16 threads and the officer's call ended DEADLINE_EXCEEDED.)"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from helpers import card, client, officer, open_batch, service_client

from kms import config
from kms.config import Capacity
from kms.dev.home import Home
from kms.dev.pki import DevPki
from kms.errors import ResourceExhausted
from kms.identity import Principal
from kms.issuance.limits import DEFAULT_LIMITS
from kms.server.authz import Policy
from kms.server.capacity import StreamSlots
from kms.server.frame import TlsFiles, create_server, service_method
from kms.server.serve import Service
from kms.v1 import issuance_pb2 as pb
from kms.v1 import issuance_pb2_grpc as rpc

STATION = "station-a1"
STATION_URI = "urn:kms:station:bureau-a:station-a1"
STATION_PRINCIPAL = Principal("station", STATION, bureau="bureau-a")
OTHER = "station-b1"  # of bureau-b
ALICE = officer("hrss", 0)
STREAMS = 32
# Enough for a stream that nobody reads to stay open: far more bytes than gRPC's flow control windows let through.
CARDS = 160
PER_MESSAGE = 8
WAIT = 60.0  # seconds the test waits for the server to settle (a bound on a hang, not a measurement)


def _config(home: Home, name: str, **server: Any) -> Path:
    """A copy of the home's kms.yaml (in the same directory: its relative paths still hold) with ``server``
    settings added."""
    doc = yaml.safe_load(home.config.read_text())
    doc["server"].update(server)
    path = home.config.with_name(name)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _issued_batch(home: Home, svc: Service, bureau: str = "bureau-a", station: str = STATION) -> str:
    """A batch already issued once (a full fetch): the streams below send stored bundles, no HSM work."""
    batch_id = f"CAP-{secrets.token_hex(4)}"
    cards = [card(700_000 + i, card_ref=f"{batch_id.lower()}-{i:04d}") for i in range(CARDS)]
    with client(home, svc.port, ALICE) as alice:
        open_batch(home, svc.port, alice, batch_id, bureau, "dual-app-v1", cards)
    with service_client(home, svc, station) as st:
        assert len(list(st.stream_batch(batch_id))) == CARDS
    return batch_id


def _slow_reader(home: Home, svc: Service, station: str) -> grpc.Channel:
    """A station's channel with gRPC's smallest flow-control windows (no BDP probing): what it does not read stays
    at the server, whose stream then waits, holding its thread."""
    tls = config.load_station(home.station_config(station)).client
    assert tls is not None
    credentials = grpc.ssl_channel_credentials(tls.tls.ca.read_bytes(), tls.tls.key.read_bytes(),
                                               tls.tls.cert.read_bytes())
    return grpc.secure_channel(f"localhost:{svc.port}", credentials, options=[
        ("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 8 * 1024 * 1024)])


def _open_streams(channel: grpc.Channel, batch_id: str, count: int) -> list[Any]:
    """``count`` StreamBatch calls started at once, none of them read."""
    stub = rpc.IssuanceServiceStub(channel)  # type: ignore[no-untyped-call]
    request = pb.StreamBatchRequest(batch_id=batch_id, max_bundles_per_message=PER_MESSAGE)
    return [stub.StreamBatch(request, timeout=WAIT * 2) for _ in range(count)]


def _settle(calls: list[Any], refused: int) -> None:
    """Wait until ``refused`` of the calls have ended (the rest are held open by the server)."""
    deadline = time.monotonic() + WAIT
    while sum(c.done() for c in calls) < refused and time.monotonic() < deadline:
        time.sleep(0.05)


def _officer_status(home: Home, svc: Service, batch_id: str) -> tuple[pb.BatchStatus, float]:
    """GetBatchStatus as an officer with a deadline of 1 s (it must be answered within it), and the seconds it took."""
    with client(home, svc.port, ALICE) as alice:
        alice.batch_status(batch_id)  # the connection made and the caller known: the call below is just the call
        started = time.perf_counter()
        status = alice.issuance.GetBatchStatus(pb.GetBatchStatusRequest(batch_id=batch_id), timeout=1.0)
        return status, time.perf_counter() - started


@pytest.fixture(scope="module")
def raised_limits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kms/policies/limits.yaml with every station and bureau allowed 64 streams at once."""
    doc = yaml.safe_load(DEFAULT_LIMITS.read_text())
    for scope in ("station", "bureau"):
        doc["limits"][scope]["concurrent_streams"] = 64
    path = tmp_path_factory.mktemp("capacity") / "limits.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def shipped(home: Home, raised_limits: Path) -> Iterator[Service]:
    """The server with the default capacity (nothing in the home's kms.yaml: 16 threads, 8 stream slots, 4 per
    principal)."""
    svc = Service(home.config, listen="127.0.0.1:0", limits=raised_limits)
    yield svc
    svc.stop(grace=0)


def test_32_streams_of_one_station_leave_an_officers_call_answered(home: Home, shipped: Service,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    capacity = shipped.streams.capacity
    assert capacity == Capacity() == Capacity(threads=16, max_concurrent_rpcs=128, max_streams=8,
                                              streams_per_principal=4)
    assert shipped.quotas.limit(STATION_PRINCIPAL, ("hrss", "bank"), "station", "concurrent_streams").value == 64
    batch_id = _issued_batch(home, shipped)
    held = capacity.streams_per_principal
    with _slow_reader(home, shipped, STATION) as channel:
        calls = _open_streams(channel, batch_id, STREAMS)
        try:
            _settle(calls, STREAMS - held)
            assert shipped.streams.in_progress(STATION_URI) == shipped.streams.in_progress() == held
            status, seconds = _officer_status(home, shipped, batch_id)
            assert (status.batch_id, status.cards, status.issued) == (batch_id, CARDS, CARDS)
            ended = [c for c in calls if c.done()]
            assert len(ended) == STREAMS - held  # the others are still open, blocked on their unread messages
            for call in ended:
                assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert call.details() == (f"principal {STATION_URI}: limit streams_per_principal ({held}) "
                                          f"reached; {held} streams in progress")
        finally:
            for call in calls:
                call.cancel()
    with capsys.disabled():
        print(f"\n[capacity] {STREAMS} streams of one station, {held} held open: officer's GetBatchStatus "
              f"answered in {seconds * 1000:.1f} ms (deadline 1 s)")
    # Every slot is given back once the streams end (cancelled by the client), and the station fetches as before.
    deadline = time.monotonic() + WAIT
    while shipped.streams.in_progress() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shipped.streams.in_progress() == 0
    with service_client(home, shipped, STATION) as st:
        assert len(list(st.stream_batch(batch_id))) == CARDS


@pytest.fixture
def small(home: Home, raised_limits: Path) -> Iterator[Service]:
    """A server of 4 threads, 3 of them for streams, 3 streams for one principal."""
    path = _config(home, "kms-capacity.yaml", threads=4, max_streams=3, streams_per_principal=3)
    svc = Service(path, listen="127.0.0.1:0", limits=raised_limits)
    yield svc
    svc.stop(grace=0)
    path.unlink()


def test_streams_never_take_the_last_thread(home: Home, small: Service) -> None:
    """One thread of four is left for unary calls whatever the streams do: the station holds three streams, another
    station's stream is refused by the server's own limit, and the officer is still answered within 1 s."""
    assert small.streams.capacity == Capacity(threads=4, max_concurrent_rpcs=32, max_streams=3,
                                              streams_per_principal=3)
    batch_a = _issued_batch(home, small)
    batch_b = _issued_batch(home, small, "bureau-b", OTHER)
    with _slow_reader(home, small, STATION) as channel, service_client(home, small, OTHER) as other:
        calls = _open_streams(channel, batch_a, STREAMS)
        try:
            _settle(calls, STREAMS - 3)
            assert small.streams.in_progress() == 3
            with pytest.raises(ResourceExhausted) as refused:
                list(other.stream_batch(batch_b))
            assert refused.value.limit == "max_streams"
            assert str(refused.value) == ("server: limit max_streams (3) reached; 3 streams in progress on this "
                                          "server; try again later")
            status, _ = _officer_status(home, small, batch_a)
            assert status.cards == CARDS
            ended = [c for c in calls if c.done()]
            assert len(ended) == STREAMS - 3
            assert {c.code() for c in ended} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        finally:
            for call in calls:
                call.cancel()


# -- the slots alone -----------------------------------------------------------------------------------------------


def test_slots_per_principal_and_in_all() -> None:
    slots = StreamSlots(Capacity(threads=8, max_concurrent_rpcs=64, max_streams=3, streams_per_principal=2))
    slots.take("a")
    slots.take("a")
    with pytest.raises(ResourceExhausted) as mine:
        slots.take("a")
    assert mine.value.limit == "streams_per_principal"
    assert str(mine.value) == "principal a: limit streams_per_principal (2) reached; 2 streams in progress"
    slots.take("b")
    with pytest.raises(ResourceExhausted) as server:
        slots.take("c")
    assert server.value.limit == "max_streams"
    assert (slots.in_progress(), slots.in_progress("a"), slots.in_progress("c")) == (3, 2, 0)
    slots.release("a")
    slots.take("c")
    for who in ("a", "b", "c"):
        slots.release(who)
    assert slots.in_progress() == 0


def test_unary_call_slots_per_principal() -> None:
    slots = StreamSlots(Capacity(threads=8, max_concurrent_rpcs=64, max_streams=3, streams_per_principal=2,
                                 calls_per_principal=2))
    slots.take_call("a")
    slots.take_call("a")
    with pytest.raises(ResourceExhausted) as mine:
        slots.take_call("a")
    assert mine.value.limit == "calls_per_principal"
    assert str(mine.value) == "principal a: limit calls_per_principal (2) reached; 2 calls in progress"
    slots.take_call("b")  # another principal is not held back
    slots.take("a")  # nor are a's streams, counted apart
    slots.release_call("a")
    slots.take_call("a")
    assert (slots.calls_in_progress("a"), slots.calls_in_progress("b"), slots.in_progress("a")) == (2, 1, 1)
    for who in ("a", "a", "b"):
        slots.release_call(who)
    slots.release("a")
    assert (slots.calls_in_progress("a"), slots.in_progress()) == (0, 0)


# -- unary calls of one principal, through the real frame ----------------------------------------------------------


class _Slow(rpc.IssuanceServiceServicer):
    """GetBatchStatus that waits until the test lets it answer: a call the HSM, say, takes its time over."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.go = threading.Event()

    @service_method
    def GetBatchStatus(self, request: pb.GetBatchStatusRequest, context: grpc.ServicerContext) -> pb.BatchStatus:
        self.entered.release()
        self.go.wait(60)
        return pb.BatchStatus(batch_id=request.batch_id)


def test_one_principals_slow_calls_never_hold_every_thread(tmp_path: Path) -> None:
    """calls_per_principal: a station's calls beyond it are refused RESOURCE_EXHAUSTED naming it, at once, while
    another principal's call is still served on the threads left."""
    pki = DevPki(tmp_path / "pki")
    cred = pki.server()
    slow = _Slow()

    def register(server: grpc.Server) -> list[str]:
        rpc.add_IssuanceServiceServicer_to_server(slow, server)  # type: ignore[no-untyped-call]
        return ["kms.v1.IssuanceService"]

    capacity = Capacity(threads=4, max_concurrent_rpcs=32, max_streams=2, streams_per_principal=1,
                        calls_per_principal=2)
    server, port = create_server(TlsFiles(cred.cert, cred.key, pki.ca.cert), Policy.load(), register,
                                 capacity=capacity)
    server.start()

    def channel(who: Principal) -> grpc.Channel:
        c = pki.client(who)
        return grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(
            pki.ca.cert.read_bytes(), c.key.read_bytes(), c.cert.read_bytes()))

    busy = Principal("station", "station-a1", bureau="bureau-a")
    other = Principal("station", "station-b1", bureau="bureau-b")
    try:
        with channel(busy) as mine, channel(other) as theirs:
            status = rpc.IssuanceServiceStub(mine).GetBatchStatus  # type: ignore[no-untyped-call]
            held = [status.future(pb.GetBatchStatusRequest(batch_id=f"B-{i}"), timeout=60) for i in range(2)]
            for _ in held:
                assert slow.entered.acquire(timeout=30)  # both calls are running, each on a thread
            with pytest.raises(grpc.RpcError) as refused:
                status(pb.GetBatchStatusRequest(batch_id="B-2"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == ("principal urn:kms:station:bureau-a:station-a1: limit "
                                               "calls_per_principal (2) reached; 2 calls in progress")
            answer = rpc.IssuanceServiceStub(theirs).GetBatchStatus.future(  # type: ignore[no-untyped-call]
                pb.GetBatchStatusRequest(batch_id="B-other"), timeout=30)
            assert slow.entered.acquire(timeout=30)  # served on a third thread while station-a1's two still run
            slow.go.set()
            assert answer.result().batch_id == "B-other"
            assert sorted(f.result().batch_id for f in held) == ["B-0", "B-1"]
            assert status(pb.GetBatchStatusRequest(batch_id="B-3"), timeout=10).batch_id == "B-3"  # slots given back
    finally:
        slow.go.set()
        server.stop(grace=None)
