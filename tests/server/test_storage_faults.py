"""Storage faults during calls and streams are UNAVAILABLE, never INTERNAL (kms.store.translate_storage_faults),
through the real server: `kms serve` in this process, real mutual TLS, real worker processes and tokens, the
service's own database. Faults: "disk I/O error" raised where the SQLite driver raises it while a stream records a
message (tests/helpers.py StorageFault); a real SQLITE_FULL from SQLite itself (the database file may not grow:
PRAGMA max_page_count on the service's connections); and, with KMS_TEST_POSTGRES_URL, a home whose records are in
PostgreSQL, whose server refuses a message's writes with SQLSTATE 53100 (disk_full). Once the fault is gone the
stream resumes from its cursor and every card arrives exactly once."""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from helpers import (
    POSTGRES,
    StorageFault,
    card,
    client,
    drop_schema,
    officer,
    open_batch,
    postgres_home,
    service_client,
    serving_engine,
)
from sqlalchemy import event

from kms import store
from kms.cards.cardid import CardIdentity
from kms.client.service import Retrying
from kms.clock import SystemClock
from kms.dev.home import Home
from kms.dev.pki import DevPki
from kms.errors import Unavailable
from kms.identity import Principal
from kms.issuance.batches import BatchStore
from kms.server.authz import Policy
from kms.server.frame import TlsFiles, create_server, service_method
from kms.server.serve import Service
from kms.v1 import issuance_pb2 as pb
from kms.v1 import issuance_pb2_grpc as rpc

ALICE = officer("hrss", 0)
STATION = "station-a1"
CARDS = 40
PER_MESSAGE = 4
RECORD = "UPDATE batch_cards"  # the first statement that records a message's cards (kms.issuance.batches)


def _batch(home: Home, service: Service) -> tuple[str, list[CardIdentity]]:
    batch_id = f"SF-{secrets.token_hex(4)}"
    cards = [card(800_000 + i, card_ref=f"{batch_id.lower()}-{i:03d}") for i in range(CARDS)]
    with client(home, service.port, ALICE) as alice:
        open_batch(home, service.port, alice, batch_id, "bureau-a", "dual-app-v1", cards)
    return batch_id, cards


def _issued_once(service: Service, batch_id: str, cards: list[CardIdentity]) -> dict[str, str]:
    """card_ref → serial of the batch's issuance.issued records, asserting one per card and no other."""
    found: dict[str, str] = {}
    for record in service.audit.records(kind="issuance.issued"):
        body = json.loads(record.body)
        batch, _, card_ref = body["subject"].partition("/")
        if batch == batch_id:
            assert card_ref not in found, f"{card_ref} was issued twice"
            found[card_ref] = body["detail"]["serial"]
    assert sorted(found) == [c.card_ref for c in cards]
    return found


@pytest.fixture
def no_internal(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No call of the test ended INTERNAL ("unexpected error" in the server log), and the server logged the fault."""
    with caplog.at_level(logging.WARNING):
        yield
    records = caplog.get_records("call")
    assert not [r for r in records if r.getMessage() == "unexpected error"]
    assert [r for r in records if r.getMessage().startswith("database unavailable (")]


def test_a_disk_io_error_in_a_stream_is_unavailable_and_the_stream_resumes(
        home: Home, service: Service, no_internal: None) -> None:
    batch_id, cards = _batch(home, service)
    received: list[Any] = []
    with service_client(home, service, STATION) as st:
        with StorageFault(serving_engine(service), RECORD, after=2 * PER_MESSAGE) as fault:
            with pytest.raises(Unavailable) as stopped:
                for bundle in st.stream_batch(batch_id, per_message=PER_MESSAGE, retries=0):
                    received.append(bundle)
            assert str(stopped.value) == ("service: unavailable: the database is unavailable (disk I/O error); "
                                          "try again")
            assert stopped.value.retryable and fault.hits == 1
            # Two whole messages were recorded and sent; the third was neither.
            assert len(received) == 2 * PER_MESSAGE == st.batch_status(batch_id).issued
            fault.clear()
        received += st.stream_batch(batch_id, cursor=str(received[-1].sequence), per_message=PER_MESSAGE,
                                    retries=0)
    assert [b.card_ref for b in received] == [c.card_ref for c in cards]  # nothing lost, nothing twice
    assert _issued_once(service, batch_id, cards) == {b.card_ref: b.serial for b in received}


def test_the_client_retries_with_backoff_and_resumes_from_its_cursor(
        home: Home, service: Service, no_internal: None) -> None:
    """The fault lasts three attempts: the client retries three times (each with a backoff delay), each time from
    the last cursor it received, and the fourth attempt completes the batch."""
    batch_id, cards = _batch(home, service)
    retries: list[Retrying] = []
    slept: list[float] = []
    with service_client(home, service, STATION) as st, \
            StorageFault(serving_engine(service), RECORD, after=3 * PER_MESSAGE, times=3) as fault:
        received = list(st.stream_batch(batch_id, per_message=PER_MESSAGE, on_retry=retries.append,
                                        sleep=slept.append))
    assert fault.hits == 3
    assert [b.card_ref for b in received] == [c.card_ref for c in cards]
    assert [r.retry for r in retries] == [1, 2, 3]
    assert {r.cursor for r in retries} == {str(received[3 * PER_MESSAGE - 1].sequence)}
    assert all(isinstance(r.error, Unavailable) and "(disk I/O error)" in str(r.error) for r in retries)
    assert slept == [r.delay for r in retries]
    assert 0.25 <= slept[0] <= 0.5 and 0.5 <= slept[1] <= 1.0 and 1.0 <= slept[2] <= 2.0  # exponential, jittered
    _issued_once(service, batch_id, cards)


def test_a_full_disk_makes_every_call_unavailable_until_it_has_room_again(
        home: Home, service: Service, no_internal: None) -> None:
    batch_id, cards = _batch(home, service)
    engine = serving_engine(service)

    def full(dbapi_connection: Any, _record: Any) -> None:  # SQLite's own SQLITE_FULL once the file would grow
        pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

    received: list[Any] = []
    event.listen(engine, "connect", full)
    engine.dispose()  # the pool's connections from now on are limited
    try:
        with service_client(home, service, STATION) as st, pytest.raises(Unavailable) as stopped:
            for bundle in st.stream_batch(batch_id, per_message=PER_MESSAGE, retries=0):
                received.append(bundle)
        assert "the database is unavailable (disk full)" in str(stopped.value) or \
            "the audit log cannot be written (disk full)" in str(stopped.value) or \
            "could not be recorded in the audit log (disk full)" in str(stopped.value)
        # A unary call that changes something is refused the same way (its change and its record fail together).
        with client(home, service.port, ALICE) as alice, pytest.raises(Unavailable, match=r"\(disk full\)"):
            alice.create_batch(f"SF-{secrets.token_hex(4)}", "bureau-a", "dual-app-v1", [card(900_001)])
    finally:
        event.remove(engine, "connect", full)
        engine.dispose()
    assert len(received) < CARDS
    with service_client(home, service, STATION) as st:
        received += st.stream_batch(batch_id, cursor=str(received[-1].sequence) if received else "",
                                    per_message=PER_MESSAGE, retries=0)
        assert st.batch_status(batch_id).issued == CARDS
    assert [b.card_ref for b in received] == [c.card_ref for c in cards]
    assert _issued_once(service, batch_id, cards) == {b.card_ref: b.serial for b in received}


# -- an engine kms.store did not make ------------------------------------------------------------------------------


class _Status(rpc.IssuanceServiceServicer):
    """GetBatchStatus over a BatchStore on an engine made without kms.store.make_engine (no fault translation)."""

    def __init__(self, batches: BatchStore) -> None:
        self._batches = batches

    @service_method
    def GetBatchStatus(self, request: pb.GetBatchStatusRequest, context: grpc.ServicerContext) -> pb.BatchStatus:
        return pb.BatchStatus(batch_id=self._batches.get_batch(request.batch_id).batch_id)


def test_the_frame_still_answers_unavailable_for_a_fault_the_engine_did_not_translate(tmp_path: Path) -> None:
    """The last line of defence (kms.server.frame.abort): a storage fault from an engine that kms.store did not make
    (a raw SQLAlchemy OperationalError, or an error raised from one) is UNAVAILABLE too; any other error is still
    INTERNAL."""
    raw = sa.create_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.upgrade(raw)
    pki = DevPki(tmp_path / "pki")
    cred = pki.server()

    def register(server: grpc.Server) -> list[str]:
        rpc.add_IssuanceServiceServicer_to_server(_Status(BatchStore(raw, SystemClock())), server)  # type: ignore[no-untyped-call]
        return ["kms.v1.IssuanceService"]

    server, port = create_server(TlsFiles(cred.cert, cred.key, pki.ca.cert), Policy.load(), register)
    server.start()
    station = pki.client(Principal("station", STATION, bureau="bureau-a"))
    credentials = grpc.ssl_channel_credentials(pki.ca.cert.read_bytes(), station.key.read_bytes(),
                                               station.cert.read_bytes())
    try:
        with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
            status = rpc.IssuanceServiceStub(channel).GetBatchStatus  # type: ignore[no-untyped-call]
            with StorageFault(raw, "SELECT"), pytest.raises(grpc.RpcError) as faulty:
                status(pb.GetBatchStatusRequest(batch_id="B-1"), timeout=10)
            assert (faulty.value.code(), faulty.value.details()) == (
                grpc.StatusCode.UNAVAILABLE, "the database is unavailable (disk I/O error); try again")
            with StorageFault(raw, "SELECT", error=lambda: sqlite3.OperationalError("no such table: batches")), \
                    pytest.raises(grpc.RpcError) as broken:
                status(pb.GetBatchStatusRequest(batch_id="B-1"), timeout=10)
            assert (broken.value.code(), broken.value.details()) == (
                grpc.StatusCode.INTERNAL, "internal error; see the server log")
    finally:
        server.stop(grace=None)
        raw.dispose()


# -- PostgreSQL ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Home, Service, sa.Engine]]:
    """A development home whose records are in a fresh PostgreSQL schema (skipped without KMS_TEST_POSTGRES_URL),
    its `kms serve` in this process, and an engine on that schema for the test's own statements."""
    if not POSTGRES:
        pytest.skip("KMS_TEST_POSTGRES_URL is not set")
    home, admin = postgres_home(tmp_path_factory.mktemp("pg-home"),
                                bureaus={"bureau-a": (STATION,), "bureau-b": ("station-b1",)})
    svc = Service(home.config, listen="127.0.0.1:0")
    try:
        yield home, svc, admin
    finally:
        svc.stop(grace=0)
        drop_schema(admin)


def test_postgresql_disk_full_during_a_stream_is_retried_and_every_card_arrives_once(
        pg_service: tuple[Home, Service, sa.Engine]) -> None:
    """The PostgreSQL server itself refuses the writes of three attempts to record a message with SQLSTATE 53100
    (disk_full, raised by a trigger as the server raises it when its disk is full): the station's client sees
    UNAVAILABLE naming the fault, retries with backoff from its cursor, and gets every card exactly once."""
    home, svc, admin = pg_service
    assert serving_engine(svc).dialect.name == "postgresql"
    batch_id, cards = _batch(home, svc)
    with admin.begin() as conn:  # from now on: the first 2 messages' cards recorded, then 3 attempts refused
        conn.execute(sa.text("CREATE SEQUENCE fault_count"))
        conn.execute(sa.text(
            "CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$ DECLARE n bigint; BEGIN "
            "n := nextval('fault_count'); "
            f"IF n > {2 * PER_MESSAGE} AND n <= {2 * PER_MESSAGE + 3} THEN RAISE EXCEPTION "
            "'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; END IF; "
            "RETURN NEW; END $$"))
        conn.execute(sa.text("CREATE TRIGGER fault BEFORE UPDATE ON batch_cards FOR EACH ROW "
                             "EXECUTE FUNCTION fault()"))
    retries: list[Retrying] = []
    try:
        with service_client(home, svc, STATION) as st:
            received = list(st.stream_batch(batch_id, per_message=PER_MESSAGE, on_retry=retries.append,
                                            sleep=lambda seconds: None))
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER fault ON batch_cards"))
    assert [r.retry for r in retries] == [1, 2, 3]
    assert all(str(r.error) == "service: unavailable: the database is unavailable (disk full); try again"
               for r in retries)
    assert {r.cursor for r in retries} == {str(received[2 * PER_MESSAGE - 1].sequence)}
    assert [b.card_ref for b in received] == [c.card_ref for c in cards]
    assert _issued_once(svc, batch_id, cards) == {b.card_ref: b.serial for b in received}


def test_a_bug_while_handling_a_fault_is_not_a_fault() -> None:
    """What the frame calls a storage fault (UNAVAILABLE, retried by clients): an error raised from one, or over one
    with ``from None``; not a programming error raised in the ``except`` block that handled one (INTERNAL)."""
    from kms.server.frame import _storage_fault

    def raised(make: Callable[[], object]) -> BaseException:
        try:
            make()
        except BaseException as error:
            return error
        raise AssertionError("nothing raised")

    def fault() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    def from_fault() -> None:
        try:
            fault()
        except sqlite3.OperationalError as error:
            raise RuntimeError("the batch cannot be read") from error

    def over_fault() -> None:
        try:
            fault()
        except sqlite3.OperationalError:
            raise RuntimeError("the batch cannot be read") from None

    def bug_while_handling() -> None:
        try:
            fault()
        except sqlite3.OperationalError:
            {}["reason"]  # a bug in the handler: a key that is not there

    assert _storage_fault(raised(fault)) == "disk I/O error"
    assert _storage_fault(raised(from_fault)) == "disk I/O error"
    assert _storage_fault(raised(over_fault)) == "disk I/O error"
    assert _storage_fault(raised(bug_while_handling)) is None
