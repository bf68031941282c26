"""The plain-HTTP health listener (kms.server.http) on its own, over a health monitor whose dependencies are fakes
(fault injection: a check that hangs): /readyz answers from what was published without waiting for a round of
checks, a connection that never sends its request is closed, and a port out of range is a clear ConfigError."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from kms.clock import SystemClock
from kms.errors import ConfigError
from kms.server.health import Dependency, HealthMonitor
from kms.server.http import HealthListener


@pytest.fixture()
def hanging() -> Iterator[tuple[HealthMonitor, threading.Event, threading.Event]]:
    """A monitor with one dependency whose check hangs (after the first round) until ``release`` is set."""
    entered, release = threading.Event(), threading.Event()
    rounds = 0

    def check() -> str | None:
        nonlocal rounds
        rounds += 1
        if rounds > 1:
            entered.set()
            release.wait(60)
        return None

    monitor = HealthMonitor([Dependency("database", check)], {"kms.v1.CardService": ["database"]}, SystemClock())
    monitor.check_now()
    yield monitor, entered, release
    release.set()


def test_readyz_answers_while_a_round_of_checks_is_in_progress(
        hanging: tuple[HealthMonitor, threading.Event, threading.Event]) -> None:
    monitor, entered, release = hanging
    listener = HealthListener("127.0.0.1:0", monitor)
    listener.start()
    round_ = threading.Thread(target=monitor.check_now, daemon=True)
    try:
        round_.start()
        assert entered.wait(30)  # the second round is now inside its check, holding the monitor's round
        with urllib.request.urlopen(f"{listener.url}/readyz", timeout=10) as reply:  # not the round's duration
            body = json.loads(reply.read())
        assert reply.status == 200 and body["status"] == "ready"
        assert body["services"] == {"(overall)": "SERVING", "kms.v1.CardService": "SERVING"}
    finally:
        release.set()
        round_.join(30)
        listener.stop()


def test_a_connection_that_sends_no_request_is_closed() -> None:
    monitor = HealthMonitor([], {}, SystemClock())
    listener = HealthListener("127.0.0.1:0", monitor, timeout=0.2)
    listener.start()
    try:
        with socket.create_connection(("127.0.0.1", listener.port), timeout=30) as silent:
            silent.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest: a slowloris client
            assert silent.recv(1024) == b""  # the listener hung up (recv would time out after 30 s otherwise)
        with urllib.request.urlopen(f"{listener.url}/healthz", timeout=10) as reply:
            assert reply.status == 200
    finally:
        listener.stop()


@pytest.mark.parametrize("address", ["127.0.0.1:70000", "127.0.0.1:-1", "127.0.0.1:http"])
def test_a_port_out_of_range_is_a_config_error_naming_the_setting(address: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.health_listen .*: the port must be a number from 0 to 65535"):
        HealthListener(address, HealthMonitor([], {}, SystemClock()))
