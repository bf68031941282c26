"""Start, stop and supervision of `kms serve` (issue 11, items 1, 5 and 7), with real processes and tokens:
a wrong PIN, label or module stops the start with one line and costs one login; a PIN the token refuses later is not
tried again by worker replacements nor by a station's retries; a port in use is one line; the audit signer is
replaced when it dies; the workers and the signer end with a SIGKILLed server; SIGTERM drains."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ROOT, card, open_batch, service_client

from kms import config, store
from kms.audit.log import AuditLog
from kms.cards.cardid import CardIdentity
from kms.client.audit import AuditClient
from kms.clock import SystemClock
from kms.dev.home import Home
from kms.errors import ConfigError, InvalidState, Unavailable
from kms.hsm.session import LOGIN_TRACE_ENV
from kms.identity import Principal
from kms.server.serve import Service

ALICE = Principal("officer", "alice", domain="hrss")
ERIN = Principal("auditor", "erin")
AUDIT_SERVICE = "kms.v1.AuditService"


def _config(home: Home, name: str, **changes: object) -> Path:
    """A copy of the home's kms.yaml (in the home, so relative paths hold) with top-level or dotted changes."""
    doc = yaml.safe_load(home.config.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = doc
        for parent in parents:
            node = node[parent]
        node[last] = value
    path = home.path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kms.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})})


def _trace(path: Path) -> list[tuple[str, str]]:
    """(token label, outcome) of each login attempt the KMS_HSM_LOGIN_TRACE file recorded."""
    if not path.exists():
        return []
    return [(line.split()[2], line.split()[3]) for line in path.read_text().splitlines()]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie holds no session on any token)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _poll(condition: object, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return bool(condition())  # type: ignore[operator]


def _port(server: subprocess.Popen[str]) -> int:
    assert server.stdout is not None
    line = server.stdout.readline()
    assert line.startswith("kms: serving on port "), (line, server.stderr.read() if server.stderr else "")
    return int(line.rsplit(" ", 1)[1])


# -- 1. fail fast, once -------------------------------------------------------------------------------------------


_PROGRESS = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z (DEBUG|INFO) .*\n", re.M)


def _problems(stderr: str) -> str:
    """What ``kms serve`` said on stderr besides its progress log lines (INFO and below, kms.logs): the problems."""
    return _PROGRESS.sub("", stderr)


def test_a_wrong_pin_label_or_module_stops_the_start_with_one_line_and_one_login(home: Home, tmp_path: Path) -> None:
    wrong = tmp_path / "bank-wrong.pin"
    wrong.write_text("000000\n")
    trace = tmp_path / "logins.trace"
    cases = {
        "pin": (_config(home, "kms-wrong-pin.yaml", domains__bank__pin=f"file:{wrong}"), 6,
                "kms: error: domains.bank.pin: the token kms-bank refused the PIN"),
        "label": (_config(home, "kms-wrong-label.yaml", domains__hrss__token="kms-hrsz"), 3,
                  "kms: error: domains.hrss.token: no token labelled 'kms-hrsz' in "),
        "module": (_config(home, "kms-wrong-module.yaml", hsm__module=str(home.config)), 3,
                   f"kms: error: hsm.module: cannot load PKCS#11 module {home.config}"),
        "audit pin": (_config(home, "kms-wrong-audit-pin.yaml", audit__pin=f"file:{wrong}"), 6,
                      "kms: error: audit.pin: the token kms-audit refused the PIN"),
    }
    for name, (path, code, message) in cases.items():
        trace.unlink(missing_ok=True)
        server = _serve("--config", str(path), "--listen", "127.0.0.1:0", env={LOGIN_TRACE_ENV: str(trace)})
        out, err = server.communicate(timeout=120)
        assert server.returncode == code, (name, err)
        assert out == "" and _problems(err).count("\n") == 1 and _problems(err).startswith(message), (name, err)
        assert "Traceback" not in err
        refused = [entry for entry in _trace(trace) if entry[1] != "ok"]
        if "pin" in name:
            # Exactly one C_Login with the wrong PIN for the whole start (no worker retried it).
            assert refused == [("kms-audit" if name == "audit pin" else "kms-bank", "PinIncorrect")], refused
        else:
            assert refused == [], refused  # the label or module was wrong: no PIN was presented at all


def test_a_pin_refused_later_is_not_tried_again_by_workers_or_the_station(
        home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service started with the right PIN; then the PIN file changes (a bad rotation) and a bank worker dies.
    Its replacement tries the new PIN once, the token refuses it, and from then on nothing presents it again: not the
    pool's further replacements, not the health monitor, not `kms station fetch` (FAILED_PRECONDITION, no retry)."""
    pin_file = tmp_path / "bank.pin"
    pin_file.write_text((home.path / "pins" / "bank.pin").read_text())
    trace = tmp_path / "logins.trace"
    monkeypatch.setenv(LOGIN_TRACE_ENV, str(trace))  # inherited by the spawned workers
    path = _config(home, "kms-rotated-pin.yaml", domains__bank__pin=f"file:{pin_file}")
    service = Service(path, listen="127.0.0.1:0", health_listen=None, health_interval=3600)
    try:
        batch = f"B-pin-{secrets.token_hex(3)}"
        with service_client(home, service, ALICE) as alice:
            open_batch(home, service.port, alice, batch, "bureau-a", "dual-app-v1", _cards(3, 910_000))
        assert ("kms-bank", "ok") in _trace(trace)
        pin_file.write_text("000000\n")  # the rotation went wrong
        [worker] = service.pools.pools["bank"].pids()
        os.kill(worker, signal.SIGKILL)
        assert _poll(lambda: not _running(worker))
        fetched = subprocess.run(
            [sys.executable, "-m", "kms.cli", "station", "fetch", "--station-config",
             str(home.station_config("station-a1")), "--server", f"localhost:{service.port}", "--batch-id", batch,
             "--out", str(tmp_path / "bundles")], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert fetched.returncode == InvalidState("x").exit_code, fetched.stderr  # FAILED_PRECONDITION, not 12
        assert "refused the service's PIN" in fetched.stderr and fetched.stderr.count("\n") == 1
        with service_client(home, service, "station-a1") as station, pytest.raises(InvalidState):
            list(station.stream_batch(batch))  # a client's retries (UNAVAILABLE only) do not apply
        failing = service.health.check_now()
        assert "refused the PIN" in failing["hsm.bank"] and "hsm.hrss" not in failing
        refused = [entry for entry in _trace(trace) if entry[1] != "ok"]
        assert refused == [("kms-bank", "PinIncorrect")], refused  # one attempt, whatever came after
    finally:
        service.stop(grace=0)


def _cards(n: int, start: int) -> list[CardIdentity]:
    return [card(start + i, card_ref=f"sup-{start + i:06d}") for i in range(n)]


# -- 5. no silent port sharing ----------------------------------------------------------------------------------


def test_a_port_in_use_is_one_line_and_no_second_server(home: Home) -> None:
    first = Service(home.config, listen="127.0.0.1:0", health_listen="127.0.0.1:0", health_interval=3600)
    try:
        with pytest.raises(ConfigError, match=rf"^server\.listen 127\.0\.0\.1:{first.port}: address already in use$"):
            Service(home.config, listen=f"127.0.0.1:{first.port}", health_listen=None)
        second = _serve("--config", str(home.config), "--listen", f"127.0.0.1:{first.port}")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 3 and out == ""
        assert _problems(err) == f"kms: error: server.listen 127.0.0.1:{first.port}: address already in use\n"
        assert first.http is not None
        third = _serve("--config", str(home.config), "--listen", "127.0.0.1:0", "--health-listen",
                       f"127.0.0.1:{first.http.port}")
        out, err = third.communicate(timeout=120)
        assert third.returncode == 3
        assert _problems(err) == \
            f"kms: error: server.health_listen 127.0.0.1:{first.http.port}: address already in use\n"
        # Every health check still reaches the one server that owns the port.
        with service_client(home, first, "station-a1") as station:
            stub = health_pb2_grpc.HealthStub(station.channel)
            answers = {stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status for _ in range(20)}
        assert answers == {health_pb2.HealthCheckResponse.SERVING}
    finally:
        first.stop(grace=0)


# -- 7. supervision -----------------------------------------------------------------------------------------------


@pytest.fixture
def supervised(home: Home) -> Iterator[Service]:
    """A server whose health monitor runs only when the test says (an interval of an hour)."""
    service = Service(home.config, listen="127.0.0.1:0", health_listen=None, health_interval=3600)
    yield service
    service.stop(grace=0)


def test_a_dead_audit_signer_is_replaced_and_checkpoints_resume(home: Home, supervised: Service) -> None:
    service = supervised
    assert service.signer is not None and service.checkpointer is not None
    seen: list[int] = []
    with service_client(home, service, ERIN) as erin:
        watch = health_pb2_grpc.HealthStub(erin.channel).Watch(health_pb2.HealthCheckRequest(service=AUDIT_SERVICE))
        def follow() -> None:
            with contextlib.suppress(grpc.RpcError):
                for reply in watch:
                    seen.append(reply.status)

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        assert _poll(lambda: seen == [health_pb2.HealthCheckResponse.SERVING])
        [old] = service.signer.pids()
        os.kill(old, signal.SIGKILL)
        assert _poll(lambda: not _running(old))
        with pytest.raises(Unavailable, match="audit signer"):  # UNAVAILABLE (retryable), not INTERNAL
            list(AuditClient(erin).export())
        service.health.check_now()  # the monitor's round: NOT_SERVING, the signer replaced, SERVING
        assert _poll(lambda: len(seen) >= 3)
        watch.cancel()
        assert seen[:3] == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING,
                            health_pb2.HealthCheckResponse.SERVING]
        [new] = service.signer.pids()
        assert new != old and service.signer.restarts == 1
        lines = [line for chunk in AuditClient(erin).export() for line in chunk]
        assert lines[-1].startswith('{"type":"export-seal"')
    checkpoint = service.checkpointer.checkpoint_now()
    assert checkpoint is not None and checkpoint.size == service.audit.head()[0]
    audit_changes = [(t.serving, t.reason) for t in service.health.transitions if t.subject == AUDIT_SERVICE]
    assert audit_changes == [(False, "audit-signer"), (True, "")]


def test_workers_and_signer_end_with_a_sigkilled_server(home: Home) -> None:
    server = _serve("--config", str(home.config), "--listen", "127.0.0.1:0", "--health-listen", "off")
    try:
        _port(server)
        children = _children(server.pid)
        # Logged in before "serving": one worker per domain and the audit signer (and multiprocessing's tracker).
        assert len(children) >= 3, children
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        assert _poll(lambda: not any(_running(pid) for pid in children), timeout=10), \
            [pid for pid in children if _running(pid)]
    finally:
        if server.poll() is None:
            server.kill()


def test_sigterm_drains_streams_and_signs_a_final_checkpoint(home: Home, tmp_path: Path) -> None:
    path = _config(home, "kms-drain.yaml", server__drain_seconds=20)
    server = _serve("--config", str(path), "--listen", "127.0.0.1:0", "--health-listen", "off")
    try:
        port = _port(server)
        children = _children(server.pid)
        batch = f"B-drain-{secrets.token_hex(3)}"
        with contextlib.ExitStack() as stack:
            from kms.dev.ceremonies import client

            alice = stack.enter_context(client(home, port, ALICE))
            open_batch(home, port, alice, batch, "bureau-a", "dual-app-v1", _cards(400, 920_000))
            station_cfg = config.load_station(home.station_config("station-a1")).client
            assert station_cfg is not None
            from kms.client.service import Client

            station = stack.enter_context(Client(station_cfg, server=f"localhost:{port}", timeout=120))
            received = []
            stream = station.stream_batch(batch, per_message=4, retries=0)
            received.append(next(stream))
            server.send_signal(signal.SIGTERM)
            with pytest.raises(Unavailable, match="stopping"):
                for bundle in stream:
                    received.append(bundle)
                    time.sleep(0.002)
        assert 1 <= len(received) < 400 and len({b.serial for b in received}) == len(received)
        assert server.wait(timeout=60) == 0
        assert _poll(lambda: not any(_running(pid) for pid in children), timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
    cfg = config.load(path)
    engine = store.make_engine(cfg.database)
    with engine.connect() as conn:
        issued = conn.execute(sa.select(sa.func.count()).select_from(store.batch_cards).where(
            store.batch_cards.c.batch_id == batch, store.batch_cards.c.serial.is_not(None))).scalar_one()
    assert issued == len(received)  # the message in flight was finished and sent; nothing issued went unsent
    log = AuditLog(engine, SystemClock())
    size, _ = log.head()
    last = log.last_checkpoint()
    assert last is not None and last.size == size  # the chain's end is signed
    [final] = list(log.records(size - 1, size))
    assert '"kind":"service.stopped"' in final.body
    # The replica (server.replica, by default <hostname>-<port>) named its stop and the checkpoint it signed
    assert last.replica is not None and last.replica.endswith(f"-{port}")
    assert json.loads(final.body)["detail"] == {"replica": last.replica}
    engine.dispose()


def test_a_stream_stops_only_after_its_message_when_draining() -> None:
    """The frame's part of the drain, alone: the message in flight is sent, then UNAVAILABLE."""
    from kms.server.frame import DRAINING, _until_draining

    class Aborted(Exception):
        pass

    class Context:
        def abort(self, code: grpc.StatusCode, message: str) -> None:
            raise Aborted(code, message)

    draining = threading.Event()
    closed = []

    def messages() -> Iterator[int]:
        try:
            yield from range(10)
        finally:
            closed.append(True)

    sent = []
    with pytest.raises(Aborted) as raised:
        for message in _until_draining(messages(), Context(), draining):  # type: ignore[arg-type]
            sent.append(message)
            if message == 2:
                draining.set()
    assert sent == [0, 1, 2] and closed == [True]
    assert raised.value.args == (grpc.StatusCode.UNAVAILABLE, DRAINING)
