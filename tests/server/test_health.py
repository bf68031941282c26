"""Honest, self-healing health (issue 11, item 2): grpc.health.v1 per service and the HTTP listener's /healthz,
/readyz and /metrics follow the domain workers' tokens, the database and the audit signer — on a development home of
this module's own, whose bank token directory is moved away and back while the server runs."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import MASTER_KEYS, card, open_batch, service_client
from prometheus_client.parser import text_string_to_metric_families

from kms.dev.home import Home, init_home
from kms.errors import Unavailable
from kms.identity import Principal
from kms.server.health import Dependency, HealthMonitor
from kms.server.serve import Service

ALICE = Principal("officer", "alice", domain="hrss")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def own_home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """A home of this module's own: its tokens are moved about, which no other test may see."""
    return init_home(tmp_path_factory.mktemp("health-home"), master_keys=MASTER_KEYS)


@pytest.fixture(scope="module")
def monitored(own_home: Home) -> Iterator[Service]:
    """The server with its HTTP listener; its health monitor runs only when a test says (an interval of an hour)."""
    service = Service(own_home.config, listen="127.0.0.1:0", health_listen="127.0.0.1:0", health_interval=3600)
    yield service
    service.stop(grace=0)


def _get(service: Service, path: str, method: str = "GET") -> tuple[int, str, str]:
    assert service.http is not None
    request = urllib.request.Request(f"{service.http.url}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def _grpc_status(home: Home, service: Service, name: str) -> int:
    with service_client(home, service, "station-a1") as station:
        stub = health_pb2_grpc.HealthStub(station.channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status)


def _token_dir(home: Home, label: str) -> Path:
    padded = label.encode() + b" " * (32 - len(label))
    [found] = [d for d in (home.path / "hsm" / "tokens").iterdir() if padded in (d / "token.object").read_bytes()]
    return found


def test_the_http_listener_serves_liveness_readiness_and_metrics_without_secrets(
        own_home: Home, monitored: Service) -> None:
    assert monitored.http is not None and monitored.http.host == "127.0.0.1"
    code, kind, body = _get(monitored, "/healthz")
    assert (code, kind, json.loads(body)) == (200, "application/json", {"status": "alive"})
    code, _, body = _get(monitored, "/readyz")
    ready = json.loads(body)
    assert code == 200 and ready["status"] == "ready" and ready["failing"] == {}
    assert ready["services"] == {name: "SERVING" for name in (
        "(overall)", "kms.v1.AuditService", "kms.v1.BatchService", "kms.v1.CardService", "kms.v1.CeremonyService",
        "kms.v1.IssuanceService")}
    code, kind, body = _get(monitored, "/metrics")
    assert code == 200 and kind.startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(body)}
    assert "python_info" in families
    # Which replica answered (server.replica; by default <hostname>-<port>): in /readyz and /metrics
    assert ready["replica"] == monitored.replica == f"{socket.gethostname().split('.')[0]}-{monitored.port}"
    assert [s.labels for s in families["kms_replica_info"].samples] == [{"replica": monitored.replica}]
    assert _get(monitored, "/readyz", method="POST")[0] == 405
    assert _get(monitored, "/nothing-here")[0] == 404
    assert _get(monitored, "/healthz", method="HEAD")[0] == 200
    pins = [p.read_text().strip() for p in (own_home.path / "pins").iterdir()]
    for path in ("/healthz", "/readyz", "/metrics"):
        text = _get(monitored, path)[2]
        assert not any(pin in text for pin in pins), path


def test_a_token_moved_away_and_back_shows_not_serving_then_serving_without_a_restart(
        own_home: Home, monitored: Service, tmp_path: Path) -> None:
    batch = f"B-health-{secrets.token_hex(3)}"
    cards = [card(930_000 + i, card_ref=f"hl-{i}") for i in range(3)]
    with service_client(own_home, monitored, ALICE) as alice:
        open_batch(own_home, monitored.port, alice, batch, "bureau-a", "dual-app-v1", cards)
    workers = monitored.pools.pools["bank"].pids()
    with service_client(own_home, monitored, "station-a1") as station:
        assert station.issue_card(batch, "hl-0").data  # the token works
        token = _token_dir(own_home, "kms-bank")
        away = own_home.path / "hsm" / "moved-away"
        shutil.move(token, away)
        try:
            failing = monitored.health.check_now()
            assert set(failing) == {"hsm.bank"}, failing
            code, _, body = _get(monitored, "/readyz")
            assert code == 503 and set(json.loads(body)["failing"]) == {"hsm.bank"}
            assert json.loads(body)["services"]["kms.v1.IssuanceService"] == "NOT_SERVING"
            assert _grpc_status(own_home, monitored, "kms.v1.IssuanceService") == NOT_SERVING
            assert _grpc_status(own_home, monitored, "") == NOT_SERVING
            assert _grpc_status(own_home, monitored, "kms.v1.CardService") == SERVING  # needs no token
            with pytest.raises(Unavailable):  # retryable, not INTERNAL: the card was not issued
                station.issue_card(batch, "hl-1")
        finally:
            shutil.move(away, token)
        assert monitored.health.check_now() == {}
        assert _get(monitored, "/readyz")[0] == 200
        assert _grpc_status(own_home, monitored, "kms.v1.IssuanceService") == SERVING
        assert station.issue_card(batch, "hl-1").data  # works again ...
    assert monitored.pools.pools["bank"].pids() == workers  # ... in the same worker process: no restart
    assert monitored.pools.pools["bank"].restarts == 0
    issuance = [(t.serving, t.reason) for t in monitored.health.transitions if t.subject == "kms.v1.IssuanceService"]
    assert issuance == [(False, "hsm.bank"), (True, "")]
    for transition in monitored.health.transitions:  # the figures of the issue's closing note
        print(json.dumps(transition.to_json()))


class _Ticking:
    def __init__(self) -> None:
        self.at = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)

    def now(self) -> dt.datetime:
        self.at += dt.timedelta(seconds=1)
        return self.at


def test_a_repair_is_published_between_the_failure_and_the_recovery() -> None:
    """The monitor alone, with a dependency whose failure is injected: NOT_SERVING is set (and logged with its
    time) before the repair runs, SERVING after; services that do not need it are untouched."""
    state = {"up": True}
    published: list[tuple[str, int]] = []

    def repair() -> bool:
        published.append(("repair", -1))
        state["up"] = True
        return True

    monitor = HealthMonitor([Dependency("signer", lambda: None if state["up"] else "dead", repair),
                             Dependency("database", lambda: None)],
                            {"audit": ["database", "signer"], "cards": ["database"]}, _Ticking())
    original = monitor.servicer.set
    monitor.servicer.set = lambda name, status: (published.append((name, status)), original(name, status))  # type: ignore[method-assign]
    assert monitor.check_now() == {}
    published.clear()
    state["up"] = False
    assert monitor.check_now() == {}
    assert published == [("", NOT_SERVING), ("audit", NOT_SERVING), ("repair", -1), ("", SERVING),
                         ("audit", SERVING)]
    assert [(t.subject, t.serving, t.reason) for t in monitor.transitions] == [
        ("signer", False, "dead"), ("", False, "signer"), ("audit", False, "signer"), ("signer", True, ""),
        ("", True, ""), ("audit", True, "")]
    assert [t.to_json()["at"] for t in monitor.transitions][:2] == ["2026-12-01T09:00:01Z", "2026-12-01T09:00:02Z"]
    monitor.drain()
    ready, failing, services = monitor.status()
    assert not ready and failing == {"service": "stopping"} and set(services.values()) == {"NOT_SERVING"}


def test_a_missing_audit_token_is_reported_without_its_label_or_module_path(
        own_home: Home, monitored: Service) -> None:
    """/readyz is served without a client certificate: its reasons name what fails in a few words, never a path."""
    from kms.dev.home import AUDIT_TOKEN

    token = _token_dir(own_home, AUDIT_TOKEN)
    away = own_home.path / "hsm" / "audit-moved-away"
    shutil.move(token, away)
    try:
        failing = monitored.health.check_now()
        assert set(failing) == {"audit-signer"}, failing
        code, _, body = _get(monitored, "/readyz")
        reason = json.loads(body)["failing"]["audit-signer"]
        assert code == 503 and "not present" in reason, reason
        assert "/" not in reason and AUDIT_TOKEN not in reason and "audit.token" not in reason, reason
    finally:
        shutil.move(away, token)
    assert monitored.health.check_now() == {}
