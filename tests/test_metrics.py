"""The service's metrics (kms.metrics), read the way Prometheus reads them: a real service issues a batch through
mutual TLS, then the default registry's exposition is produced and parsed, and each metric must have moved by what
the calls did — cards and keys issued, HSM calls per verb timed in the workers, refusals by code and stage, streams
open, audit appends, checkpoint lag, ceremonies by state, a worker replaced after it was killed."""

from __future__ import annotations

import os
import secrets
import signal
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import yaml
from helpers import PROFILE, card, client, officer, open_batch, service_client
from prometheus_client import REGISTRY, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from kms import metrics
from kms.client.ceremony import CeremonyClient
from kms.dev.home import Home
from kms.errors import HsmLoginFailed, PermissionDenied
from kms.server.serve import Service
from kms.v1 import issuance_pb2 as pb

ALICE = officer("hrss", 0)
STREAM = "/kms.v1.IssuanceService/StreamBatch"
STATUS = "/kms.v1.IssuanceService/GetBatchStatus"
CREATE = "/kms.v1.BatchService/CreateBatch"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(text: str | None = None) -> Samples:
    """Every sample of the exposition, by name and labels."""
    exposition = generate_latest(REGISTRY).decode() if text is None else text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(exposition) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def opened(home: Home, service: Service) -> Iterator[tuple[str, list[str]]]:
    """A batch of 40 cards for bureau-a, open (both domains authorized it)."""
    batch = f"M-{secrets.token_hex(4)}"
    cards = [card(710_000 + i, card_ref=f"m-{secrets.token_hex(3)}-{i}") for i in range(40)]
    with client(home, service.port, ALICE) as alice:
        open_batch(home, service.port, alice, batch, "bureau-a", PROFILE.name, cards)
    yield batch, [c.card_ref for c in cards]


def test_issuing_a_batch_moves_cards_keys_hsm_calls_and_audit_appends(
        home: Home, service: Service, opened: tuple[str, list[str]]) -> None:
    batch, refs = opened
    before = scrape()
    with service_client(home, service, "station-a1") as station:
        bundles = list(station.stream_batch(batch, per_message=8))
    assert len(bundles) == len(refs)
    after = scrape()

    assert moved(before, after, "kms_cards_issued_total", bureau="bureau-a", profile=PROFILE.name) == len(refs)
    for domain in ("hrss", "bank"):
        per_card = len(PROFILE.keys(domain))
        assert moved(before, after, "kms_keys_issued_total", domain=domain, bureau="bureau-a",
                     profile=PROFILE.name) == len(refs) * per_card
        # Each key is one derive-wrap (derivation, wrap and KCV in the token) and each section one signature,
        # timed in the worker processes and observed here.
        assert moved(before, after, "kms_hsm_call_seconds_count", domain=domain,
                     verb="derive-wrap") == len(refs) * per_card
        assert moved(before, after, "kms_hsm_call_seconds_count", domain=domain, verb="sign") == len(refs)
        assert moved(before, after, "kms_hsm_call_seconds_sum", domain=domain, verb="derive-wrap") > 0
        assert value(after, "kms_hsm_call_seconds_bucket", domain=domain, verb="sign", le="+Inf") >= len(refs)
        # Each worker process logged in once, timed at its start and sent back with its first results.
        assert value(after, "kms_hsm_call_seconds_count", domain=domain, verb="login") >= 1
    # The bank's workers open each card's protected PAN in the token before deriving its keys.
    assert moved(before, after, "kms_hsm_call_seconds_count", domain="bank", verb="decrypt") == len(refs)
    assert moved(before, after, "kms_hsm_errors_total", domain="hrss", verb="derive-wrap", error="HsmError") == 0
    # Each message's issuance records were appended in one go (40 cards, 8 a message), plus request.ok.
    assert moved(before, after, "kms_audit_append_seconds_count") >= len(refs) // 8
    assert moved(before, after, "kms_audit_records_appended_total") >= len(refs)
    assert moved(before, after, "kms_requests_total", method=STREAM, code="OK") == 1

    # Sent again (a resumed stream from the start): nothing new is issued, so nothing more is counted.
    with service_client(home, service, "station-a1") as station:
        assert len(list(station.stream_batch(batch))) == len(refs)
    assert moved(after, scrape(), "kms_cards_issued_total", bureau="bureau-a", profile=PROFILE.name) == 0


def test_refusals_are_counted_by_method_code_and_stage(home: Home, service: Service,
                                                       opened: tuple[str, list[str]]) -> None:
    batch, _ = opened
    before = scrape()
    with service_client(home, service, "station-b1") as other:  # another bureau's station: refused by the handler
        with pytest.raises(PermissionDenied):
            other.batch_status(batch)
        with pytest.raises(PermissionDenied):  # a station may not create batches: refused by the policy
            other.create_batch(f"X-{secrets.token_hex(3)}", "bureau-b", PROFILE.name, [card(1)])
    after = scrape()
    assert moved(before, after, "kms_refusals_total", method=STATUS, code="PERMISSION_DENIED", stage="handler") == 1
    assert moved(before, after, "kms_refusals_total", method=CREATE, code="PERMISSION_DENIED",
                 stage="admission") == 1
    assert moved(before, after, "kms_requests_total", method=STATUS, code="PERMISSION_DENIED") == 1
    # A method no service has: counted under "unknown", never under the name the caller sent.
    with service_client(home, service, "station-b1") as other:
        made_up = other.channel.unary_unary("/kms.v1.Nothing/" + secrets.token_hex(4))
        with pytest.raises(grpc.RpcError):
            made_up(b"", timeout=30)
    exposition = generate_latest(REGISTRY).decode()
    assert "/kms.v1.Nothing/" not in exposition
    assert moved(after, scrape(exposition), "kms_refusals_total", method=metrics.UNKNOWN_METHOD,
                 code="PERMISSION_DENIED", stage="admission") == 1


def test_an_open_stream_is_counted_until_it_ends(home: Home, service: Service, opened: tuple[str, list[str]]) -> None:
    batch, refs = opened
    before = value(scrape(), "kms_streams_open", method=STREAM)
    with service_client(home, service, "station-a1") as station:
        call = station.issuance.StreamBatch(pb.StreamBatchRequest(batch_id=batch, max_bundles_per_message=1),
                                            timeout=120)
        next(call)  # the server is now between two messages of this stream
        assert value(scrape(), "kms_streams_open", method=STREAM) == before + 1
        assert sum(len(m.bundles) for m in call) == len(refs) - 1
    assert value(scrape(), "kms_streams_open", method=STREAM) == before


def test_checkpoint_lag_and_ceremonies_by_state_are_read_when_scraped(home: Home, service: Service) -> None:
    assert service.checkpointer is not None
    service.checkpointer.checkpoint_now()
    for _ in range(5):  # the checkpointer's own thread may sign between two reads: read again then
        last = service.audit.last_checkpoint()
        samples = scrape()
        if service.audit.last_checkpoint() == last:
            break
    assert last is not None
    size, _ = service.audit.head()
    assert value(samples, "kms_audit_records") == size
    assert value(samples, "kms_audit_checkpoint_lag_records") == size - last.size

    with client(home, service.port, ALICE) as alice:
        officers = CeremonyClient(alice)
        before = scrape()
        proposed = officers.propose("generate-master-key", {"name": f"test-metrics-{secrets.token_hex(3)}"})
        middle = scrape()
        officers.cancel(proposed.ceremony_id)
        after = scrape()
    assert moved(before, middle, "kms_ceremonies", domain="hrss", state="open") == 1
    assert moved(middle, after, "kms_ceremonies", domain="hrss", state="open") == -1
    assert moved(middle, after, "kms_ceremonies", domain="hrss", state="cancelled") == 1
    assert value(after, "kms_audit_checkpoint_lag_records") >= 1  # the proposal and the cancel, not yet signed


def test_a_killed_worker_is_counted_once_as_a_restart(home: Home, service: Service) -> None:
    batch = f"K-{secrets.token_hex(4)}"
    cards = [card(720_000 + i, card_ref=f"k-{secrets.token_hex(3)}-{i}") for i in range(4)]
    with client(home, service.port, ALICE) as alice:
        open_batch(home, service.port, alice, batch, "bureau-a", PROFILE.name, cards)
    pool = service.pools.pools["hrss"]
    with service_client(home, service, "station-a1") as station:
        station.issue_card(batch, cards[0].card_ref)  # the hrss workers are up
        before = scrape()
        pids = list(pool._executor._processes)  # fault injection: a worker process ends without warning
        assert pids
        os.kill(pids[0], signal.SIGKILL)
        assert len(list(station.stream_batch(batch))) == len(cards)  # the rest sealed by the replaced pool
    assert moved(before, scrape(), "kms_worker_restarts_total", domain="hrss", reason="died") == 1


def test_the_exposition_is_served_over_http_and_holds_no_card_data(home: Home, service: Service,
                                                                   opened: tuple[str, list[str]]) -> None:
    _, refs = opened
    server, thread = start_http_server(0, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=30) as reply:
            text = reply.read().decode()
    finally:
        server.shutdown()
        thread.join(timeout=10)
    samples = scrape(text)
    assert value(samples, "kms_cards_issued_total", bureau="bureau-a", profile=PROFILE.name) >= len(refs)
    names = {name for name, _ in samples}
    assert {"kms_hsm_call_seconds_count", "kms_audit_append_seconds_count", "kms_requests_total",
            "kms_audit_checkpoint_lag_records", "kms_ceremonies"} <= names
    for ref in refs:
        assert ref not in text
    assert "urn:kms:" not in text  # no caller's name in any label
    for i in range(40):
        assert card(710_000 + i).pan not in text


def test_a_failed_login_in_a_worker_is_counted_as_an_hsm_error(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = yaml.safe_load(home.config.read_text())
    doc["domains"]["bank"]["pin"] = "env:KMS_TEST_WRONG_PIN"
    wrong = home.path / f"kms-wrong-pin-{secrets.token_hex(3)}.yaml"
    wrong.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("KMS_TEST_WRONG_PIN", secrets.token_hex(12))
    before = scrape()
    try:
        with pytest.raises(HsmLoginFailed):  # fail fast: the service does not start (one login per token)
            Service(wrong, listen="127.0.0.1:0")
    finally:
        wrong.unlink()
    after = scrape()
    # The bank worker's login was refused in its process; the timing came back with the task's error.
    assert moved(before, after, "kms_hsm_errors_total", domain="bank", verb="login", error="HsmLoginFailed") == 1
    assert moved(before, after, "kms_hsm_call_seconds_count", domain="bank", verb="login") == 1
