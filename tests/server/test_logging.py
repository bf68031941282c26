"""The service's log lines (kms.server.frame's interceptor, kms.logs): each refusal, aborted stream, HSM failure and
worker restart logged once with the caller and the request id the client got in its trailing metadata; and a canary:
`kms serve --log-format json --log-level debug` through a full flow (a batch created, authorized and streamed, a
ceremony with key components, refusals, streams aborted and cancelled, a server with a wrong PIN), after which no
PIN, master key, component or clear PAN is in any line it wrote."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from helpers import MASTER_KEYS, PROFILE, ROOT, card, client, officer, open_batch, run_ceremony, service_client

from kms import logs
from kms.ceremony import components
from kms.client.ceremony import CeremonyClient
from kms.dev.home import Home
from kms.errors import KmsError, PermissionDenied
from kms.hsm.types import Algorithm
from kms.server.frame import REQUEST_ID
from kms.server.serve import Service
from kms.v1 import issuance_pb2 as pb

ALICE, BOB, CHEN = (officer("hrss", i) for i in range(3))
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
STATUS = "/kms.v1.IssuanceService/GetBatchStatus"
STREAM = "/kms.v1.IssuanceService/StreamBatch"
CREATE = "/kms.v1.BatchService/CreateBatch"


# -- through a real service: once per event, with the caller and the request id --------------------------------------


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[io.StringIO]:
    """Every record logged in this process while the test runs, as JSON lines with the request context."""
    caplog.set_level(logging.DEBUG)
    out = io.StringIO()
    handler = logs.handler("json", out)
    logging.getLogger().addHandler(handler)
    try:
        yield out
    finally:
        logging.getLogger().removeHandler(handler)


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


def _request_id(error: grpc.RpcError) -> str:
    [value] = [v for k, v in error.trailing_metadata() or () if k == REQUEST_ID]
    return str(value)


def test_a_refusal_and_an_aborted_stream_are_logged_once_with_caller_and_request_id(
        home: Home, service: Service, logged: io.StringIO) -> None:
    batch = f"L-{secrets.token_hex(4)}"
    cards = [card(730_000 + i, card_ref=f"l-{secrets.token_hex(3)}-{i}") for i in range(4)]
    with client(home, service.port, ALICE) as alice:
        open_batch(home, service.port, alice, batch, "bureau-a", PROFILE.name, cards)
        alice.report_lost(cards[2].card_ref, "hrss", "reported at the counter")  # the stream stops at this card

    with service_client(home, service, "station-b1") as other:
        with pytest.raises(grpc.RpcError) as refused:
            other.issuance.GetBatchStatus(pb.GetBatchStatusRequest(batch_id=batch), timeout=60)
        with pytest.raises(grpc.RpcError) as by_policy:
            other.batches.CreateBatch(pb.CreateBatchRequest(batch_id="X-1", bureau="bureau-b", profile=PROFILE.name),
                                      timeout=60)
    with service_client(home, service, "station-a1") as station:
        call = station.issuance.StreamBatch(pb.StreamBatchRequest(batch_id=batch, max_bundles_per_message=1),
                                            timeout=120)
        with pytest.raises(grpc.RpcError) as aborted:
            list(call)  # two bundles, then the lost card ends the stream
        _, ok = station.issuance.GetBatchStatus.with_call(pb.GetBatchStatusRequest(batch_id=batch), timeout=60)
    stream_id = _request_id(aborted.value)
    ok_id = str(dict(ok.trailing_metadata())[REQUEST_ID])
    assert re.fullmatch(r"[0-9a-f]{16}", ok_id) and len({_request_id(refused.value), _request_id(by_policy.value),
                                                        stream_id, ok_id}) == 4

    def lines_of(request_id: str) -> list[dict[str, Any]]:
        return [d for d in _lines(logged) if d.get("request_id") == request_id and d["level"] != "DEBUG"]

    [line] = lines_of(_request_id(refused.value))
    assert (line["level"], line["event"], line["code"], line["method"]) == ("INFO", "failed", "PERMISSION_DENIED",
                                                                           STATUS)
    assert line["principal"].endswith(":station-b1") and line["error"] == "PermissionDenied"
    assert f"batch {batch} is not authorized for bureau-b" in line["message"]
    [line] = lines_of(_request_id(by_policy.value))
    assert (line["event"], line["method"], line["code"]) == ("refused", CREATE, "PERMISSION_DENIED")
    assert line["principal"].endswith(":station-b1")
    [line] = lines_of(stream_id)
    assert (line["event"], line["code"], line["method"]) == ("aborted", "FAILED_PRECONDITION", STREAM)
    assert line["principal"].endswith(":station-a1") and line["error"] == "InvalidState"
    assert cards[2].card_ref in line["message"] and line["message"].startswith(f"stream {STREAM} aborted")
    assert lines_of(ok_id) == []  # an OK call: a debug line only
    assert any(d.get("request_id") == ok_id and d["level"] == "DEBUG" for d in _lines(logged))


def test_a_worker_restart_is_logged_once_with_the_request_that_saw_it(
        home: Home, service: Service, logged: io.StringIO) -> None:
    batch = f"W-{secrets.token_hex(4)}"
    cards = [card(740_000 + i, card_ref=f"w-{secrets.token_hex(3)}-{i}") for i in range(3)]
    with client(home, service.port, ALICE) as alice:
        open_batch(home, service.port, alice, batch, "bureau-a", PROFILE.name, cards)
    with service_client(home, service, "station-a1") as station:
        station.issue_card(batch, cards[0].card_ref)
        os.kill(next(iter(service.pools.pools["bank"]._executor._processes)), signal.SIGKILL)  # fault injection
        assert len(list(station.stream_batch(batch))) == len(cards)
    [line] = [d for d in _lines(logged) if "worker process ended unexpectedly" in d["message"]]
    assert line["level"] == "WARNING" and line["logger"] == "kms.issuance.workers"
    assert line["method"] == STREAM and line["principal"].endswith(":station-a1")
    assert re.fullmatch(r"[0-9a-f]{16}", line["request_id"])


# -- the canary: `kms serve` through a full flow, every line it writes ------------------------------------------------


def _serve(config: Path, out: Path, err: Path, env: dict[str, str], *options: str
           ) -> tuple[subprocess.Popen[bytes], int | None]:
    """`kms serve` with these options; its port, or None if it stopped (a start that failed)."""
    server = subprocess.Popen([sys.executable, "-m", "kms.cli", "serve", "--config", str(config), "--listen",
                               "127.0.0.1:0", *options],
                              stdout=out.open("wb"), stderr=err.open("wb"), cwd=ROOT, env=env)
    for _ in range(1200):
        text = out.read_text()
        if "\n" in text:
            found = re.search(r"serving on port (\d+)", text)
            assert found, text
            return server, int(found.group(1))
        if server.poll() is not None:
            return server, None
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=0.1)
    raise AssertionError("kms serve did not start")


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def test_canary_no_pin_key_component_or_pan_in_any_log_line(home: Home, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (logs.ENV_FORMAT, logs.ENV_LEVEL, "GRPC_VERBOSITY")}
    outputs: list[Path] = []
    secret_values: list[bytes] = [*MASTER_KEYS.values()]
    batch, cancelled = f"C-{secrets.token_hex(4)}", f"C-{secrets.token_hex(4)}"
    cards = [card(750_000 + i, card_ref=f"c-{secrets.token_hex(3)}-{i}") for i in range(6)]
    more = [card(760_000 + i, card_ref=f"c-{secrets.token_hex(3)}-{i}") for i in range(4)]

    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    outputs += [out, err]
    server, port = _serve(home.config, out, err, env, "--log-format", "json", "--log-level", "debug")
    assert port is not None, err.read_text()
    try:
        with client(home, port, ALICE) as alice:
            open_batch(home, port, alice, batch, "bureau-a", PROFILE.name, cards)
            open_batch(home, port, alice, cancelled, "bureau-a", PROFILE.name, more)
            alice.report_lost(more[3].card_ref, "hrss", "reported at the counter")
        with service_client_at(home, port, "station-a1") as station:
            assert len(list(station.stream_batch(batch, per_message=2))) == len(cards)
            with pytest.raises(KmsError, match="lost"):  # a stream aborted by the server at the lost card
                list(station.stream_batch(cancelled, per_message=1))
            call = station.issuance.StreamBatch(pb.StreamBatchRequest(batch_id=batch, max_bundles_per_message=1),
                                                timeout=120)
            next(call)
            call.cancel()  # and one the station leaves
            with pytest.raises(PermissionDenied):  # a station may not create batches (the PAN is in the request)
                station.create_batch(f"X-{secrets.token_hex(3)}", "bureau-a", PROFILE.name, [card(770_001)])
        with service_client_at(home, port, "station-b1") as other, pytest.raises(PermissionDenied):
            other.batch_status(batch)
        # A key joined from two custodians' components in the token.
        parts = {BOB: bytearray(secrets.token_bytes(16)), CHEN: bytearray(secrets.token_bytes(16))}
        joined = components.join(list(parts.values()))
        secret_values += [bytes(p) for p in parts.values()] + [bytes(joined)]
        imported = run_ceremony(home, port, "hrss", "import-master-key",
                                {"name": f"test-logs-{secrets.token_hex(3)}",
                                 "kcv": components.kcv(Algorithm.DES2, joined), "custodians": ["bob", "chen"]},
                                execute=False)
        for who, part in parts.items():
            with client(home, port, who) as custodian:
                CeremonyClient(custodian).submit_component(imported.ceremony_id, bytearray(part),
                                                           components.kcv(Algorithm.DES2, part))
        with client(home, port, ALICE) as alice:
            assert CeremonyClient(alice).execute(imported.ceremony_id).state == "executed"
    finally:
        _stop(server)
    assert server.returncode == 0, err.read_text()

    # The bank domain's PIN wrong: a start that fails, or a service whose bank workers cannot log in. Its log in
    # the default format (text, INFO).
    wrong_pin = secrets.token_hex(12)
    doc = yaml.safe_load(home.config.read_text())
    doc["domains"]["bank"]["pin"] = "env:KMS_TEST_WRONG_PIN"
    wrong = home.path / f"kms-wrong-pin-{secrets.token_hex(3)}.yaml"
    wrong.write_text(yaml.safe_dump(doc))
    out2, err2 = tmp_path / "wrong.out", tmp_path / "wrong.err"
    outputs += [out2, err2]
    try:
        server, port = _serve(wrong, out2, err2, {**env, "KMS_TEST_WRONG_PIN": wrong_pin})
        try:
            if port is not None:
                with client(home, port, ALICE) as alice, pytest.raises(KmsError):
                    alice.create_batch(f"P-{secrets.token_hex(3)}", "bureau-a", PROFILE.name, [card(770_002)])
        finally:
            _stop(server)
    finally:
        wrong.unlink()
    # Each line: time, level, logger, message — or (a start refused before logging began) the CLI's one
    # "kms: error:" line. The HSM failure of the call: once, with the caller and the request id.
    text_lines = err2.read_text().splitlines()
    assert text_lines and all(re.match(STAMP.pattern + r" (INFO|WARNING|ERROR) kms[.\w]*: ", line)
                              or line.startswith("kms: error: ") for line in text_lines), text_lines
    failed = [line for line in text_lines if f"{CREATE} failed: UNAVAILABLE" in line]
    assert port is None or (len(failed) == 1 and f"principal={ALICE.uri()}" in failed[0]
                            and re.search(r"request_id=[0-9a-f]{16} ", failed[0]) and "error=Hsm" in failed[0]), \
        text_lines

    # Every line: JSON with time, level, logger, message (the C core's own lines would not be; there are none).
    texts = {path: path.read_text() for path in outputs}
    parsed = [json.loads(line) for line in texts[err].splitlines()]
    assert len(parsed) > 20
    for doc in parsed:
        assert STAMP.fullmatch(doc["time"]) and doc["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        assert doc["logger"] and "message" in doc
    assert any(d.get("event") == "aborted" and d.get("method") == STREAM for d in parsed)
    assert any(d.get("event") == "refused" and d.get("method") == CREATE for d in parsed)
    assert any(d["level"] == "DEBUG" for d in parsed)  # --log-level debug reached every part
    assert texts[out].splitlines()[0].startswith("kms: serving on port ")

    logged = "\n".join(texts.values())
    pins = [p.read_text().strip() for p in (home.path / "pins").iterdir()] + [wrong_pin]
    assert len(pins) > 4
    for pin in pins:
        assert pin not in logged, "a PIN is in the log"
    for value in secret_values:
        assert value.hex() not in logged.lower(), "a key or component (hex) is in the log"
    for c in [*cards, *more, card(770_001), card(770_002)]:
        assert c.pan is not None and c.pan not in logged, f"the PAN of {c.card_ref} is in the log"


def service_client_at(home: Home, port: int, station: str) -> Any:
    """A station's client of the server on ``port`` (tests/helpers.service_client takes a Service)."""
    from kms import config
    from kms.client.service import Client

    cfg = config.load_station(home.station_config(station)).client
    assert cfg is not None
    return Client(cfg, server=f"localhost:{port}", timeout=120)
