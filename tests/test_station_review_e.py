"""Review revE (s20-station): the station's checking process, hung or answering for another call's chunk."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

import pytest
from helpers import card, seal

from kms import bundle
from kms.issuance.sealer import DomainSealer
from kms.station import OpenReport, Station


def _run_with_deadline(fn: Any, seconds: float) -> tuple[bool, list[Any]]:
    """Run ``fn`` in a thread; (finished, its result or error) after at most ``seconds``."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as error:  # reported to the test
            out.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), out


def test_a_hung_checking_process_does_not_hang_the_station(
    sealers: dict[str, DomainSealer], station: Station, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a checking process that stops answering (a token call that never returns, a stopped process): the station
    # checks the chunk itself after a deadline instead of waiting forever
    monkeypatch.setattr("kms.station._ANSWER_WAIT", 2.0)
    good = [seal(sealers, card(300 + i)) for i in range(3)]
    results = station.open_many(good, chunk=1)
    first = next(results)  # chunk 2 was sent to the checking process
    assert isinstance(first, OpenReport) and first.ok
    assert station._checker is not None and station._checker.pid is not None
    pid = station._checker.pid
    os.kill(pid, signal.SIGSTOP)  # fault injection: the checking process hangs
    try:
        finished, out = _run_with_deadline(lambda: list(results), 20)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the station stopped it
            os.kill(pid, signal.SIGCONT)
    assert finished, "open_many waits forever for a hung checking process"
    rest = out[0]
    assert [isinstance(r, OpenReport) and r.ok for r in rest] == [True, True]
    assert all(station._seen(bundle.parse(d).serial) for d in good)


def test_a_ticket_is_redeemed_only_at_the_checking_process_that_issued_it(
    sealers: dict[str, DomainSealer], station: Station
) -> None:
    # open_many A reads its 2nd chunk ahead (ticket 0 of checking process 1); the station is closed and another
    # open_many B starts checking process 2, whose ticket 0 is B's 2nd chunk. A's chunk must not be answered by
    # B's: A must open A's bundles (and B its own, without waiting forever for an answer A took)
    a = [seal(sealers, card(310 + i)) for i in range(2)]
    b = [seal(sealers, card(320 + i)) for i in range(2)]
    gen_a = station.open_many(a, chunk=1)
    assert isinstance(next(gen_a), OpenReport)
    station.close()  # e.g. a `with station:` block ends while gen_a is still alive
    gen_b = station.open_many(b, chunk=1)
    assert isinstance(next(gen_b), OpenReport)
    finished, out = _run_with_deadline(lambda: list(gen_a), 20)
    assert finished
    rest_a = out[0]
    assert [r.card_ref for r in rest_a if isinstance(r, OpenReport)] == ["card-000311"]
    finished, out = _run_with_deadline(lambda: list(gen_b), 20)
    assert finished, "open_many B waits forever for an answer open_many A took"
    assert [r.card_ref for r in out[0] if isinstance(r, OpenReport)] == ["card-000321"]
    assert all(station._seen(bundle.parse(d).serial) for d in a + b)


def test_interleaved_open_manys_do_not_wait_forever_for_an_answer_dropped_as_stale(
    sealers: dict[str, DomainSealer], station: Station
) -> None:
    warm = [seal(sealers, card(330 + i)) for i in range(2)]
    assert all(isinstance(r, OpenReport) for r in station.open_many(warm, chunk=1))  # checking process running
    a = [seal(sealers, card(332 + i)) for i in range(2)]
    b = [seal(sealers, card(334 + i)) for i in range(2)]
    gen_a = station.open_many(a, chunk=1)
    assert isinstance(next(gen_a), OpenReport)  # A's 2nd chunk: ticket n
    gen_b = station.open_many(b, chunk=1)
    finished, out = _run_with_deadline(lambda: list(gen_b), 20)  # B's 2nd chunk: ticket n+1, n dropped as stale
    assert finished
    finished, out = _run_with_deadline(lambda: list(gen_a), 20)
    assert finished, "open_many A waits forever for its answer, dropped as stale by open_many B"
    assert [r.card_ref for r in out[0] if isinstance(r, OpenReport)] == ["card-000333"]
    assert all(station._seen(bundle.parse(d).serial) for d in a + b)


def test_a_checking_process_whose_token_does_not_open_does_not_hang_the_station(
    sealers: dict[str, DomainSealer], station: Station, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SM2 keys in the trust store: the checking process opens a token session first. If that never returns (a
    # network HSM or a secret store that does not answer), the station must neither block sending it a chunk
    # larger than the pipe holds nor wait forever for the answer
    import functools
    import time

    from test_station import _sm2_spki

    from kms.clock import SystemClock
    from kms.station import TrustedKey, TrustStore

    monkeypatch.setattr("kms.station._ANSWER_WAIT", 2.0)
    keys = dict(station._trust._keys)
    keys["sm2-review"] = TrustedKey.of("hrss", _sm2_spki(1), "sm2 review key")
    trust = TrustStore(keys)
    assert trust.has_sm2
    data = seal(sealers, card(340))
    n = (6 << 20) // len(data) + 1  # a chunk larger than the pipe holds (SO_SNDBUF up to 4 MiB here, doubled)
    copies = [bytes(bytearray(data)) for _ in range(2 * n)]  # distinct objects: pickled one by one
    with Station(station.name, station.bureau, station.domains, station._session, trust, station._ledger,
                 SystemClock(), checking_token=functools.partial(time.sleep, 3600)) as hung:
        finished, out = _run_with_deadline(lambda: list(hung.open_many(copies, chunk=n)), 60)
        assert finished, "the station waits forever for a checking process whose token session does not open"
        results = out[0]
        assert isinstance(results, list) and len(results) == 2 * n
        assert isinstance(results[0], OpenReport) and results[0].ok
        assert not any(isinstance(r, OpenReport) for r in results[1:])  # replays
