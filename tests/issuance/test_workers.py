"""The issuer and its per-domain worker processes, on real tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import card

from kms.dev.home import Home
from kms.errors import ConfigError, InvalidArgument, PermissionDenied
from kms.issuance.issuer import Issuer
from kms.issuance.workers import DomainPool, Job
from kms.secrets import SecretRef
from kms.station import Station


def test_issuer_seals_bundles_in_order_that_a_station_opens(home: Home, station: Station,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The issuer process never reads a PIN: only the spawned domain workers do.
    def refuse(self: SecretRef) -> str:
        raise AssertionError(f"the issuer process resolved {self}")

    monkeypatch.setattr(SecretRef, "resolve", refuse)
    cards = [card(100 + i) for i in range(40)]
    with Issuer.from_config(home.config, "bureau-a", "dual-app-v1", processes_per_domain=1) as issuer:
        issued = list(issuer.issue(cards, "B-workers"))
    assert [b.card_ref for b in issued] == [c.card_ref for c in cards]
    assert len({b.serial for b in issued}) == len(cards)
    monkeypatch.undo()
    for b in issued:
        assert b.data is not None and b.error is None
        report = station.open(b.data)
        assert report.ok and len(report.keys) == 15


def test_a_card_refused_by_a_domain_is_reported_not_sealed(home: Home) -> None:
    cards = [card(200), card(201, kdd="00" * 10), card(202)]
    bad = card(203)
    object.__setattr__(bad, "pan", None)  # a card without a PAN: the bank recipes need one
    cards.insert(1, bad)
    with Issuer.from_config(home.config, "bureau-a", "dual-app-v1") as issuer:
        issued = list(issuer.issue(cards, "B-bad"))
    assert [b.data is not None for b in issued] == [True, False, True, True]
    assert isinstance(issued[1].error, InvalidArgument) and issued[1].error.field == "pan"


def test_workers_are_recycled_after_a_number_of_keys(home: Home, tmp_path: Path) -> None:
    config = _config_copy(home, tmp_path, recycle_after_keys=1000)  # about 3 chunks of HRSS cards per worker
    pool = DomainPool(config, "hrss", processes=1)
    try:
        jobs = [Job(card(300 + i), f"{i:032X}") for i in range(320)]
        results = list(pool.seal(jobs, "B-recycle", "bureau-a", "dual-app-v1"))
    finally:
        pool.close()
    assert all(r.section is not None for r in results)
    assert len({r.worker for r in results}) >= 3


def test_issuer_refuses_unknown_profile_and_unregistered_bureau_before_starting(home: Home) -> None:
    with pytest.raises(ConfigError, match="no card profile named 'nope'"):
        Issuer.from_config(home.config, "bureau-a", "nope")
    with pytest.raises(PermissionDenied, match="bureau 'bureau-zz' has no"):
        Issuer.from_config(home.config, "bureau-zz", "dual-app-v1")


def _config_copy(home: Home, tmp_path: Path, **changes: object) -> Path:
    doc = yaml.safe_load(home.config.read_text())
    doc["hsm"]["softhsm2_conf"] = str(home.softhsm2_conf)
    doc["database"] = f"sqlite:///{home.path / 'kms.db'}"
    doc["profiles"] = str(home.path / "profiles")
    doc["domains"] = {d: {"token": v["token"], "pin": f"file:{home.path / 'pins' / (d + '.pin')}"}
                      for d, v in doc["domains"].items()}
    doc.update(changes)
    path = tmp_path / "kms.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_killed_worker_is_replaced_and_its_cards_sealed_again(home: Home, tmp_path: Path) -> None:
    import os
    import signal

    pool = DomainPool(home.config, "bank", processes=1)
    try:
        jobs = [Job(card(400 + i), f"{i:032X}") for i in range(600)]
        results = pool.seal(jobs, "B-kill", "bureau-a", "dual-app-v1")
        first = next(results)
        os.kill(first.worker, signal.SIGKILL)
        rest = list(results)
    finally:
        pool.terminate()
    everything = [first, *rest]
    assert [r.card_ref for r in everything] == [j.card.card_ref for j in jobs]  # none lost, none twice
    assert all(r.section is not None for r in everything)
    assert len({r.worker for r in everything}) >= 2  # a fresh process took over


def test_workers_that_keep_dying_give_a_retryable_error_not_a_hang(home: Home, tmp_path: Path) -> None:
    import contextlib
    import os
    import signal
    import threading

    from kms.errors import HsmError

    pool = DomainPool(home.config, "bank", processes=1)
    stop = threading.Event()

    def killer() -> None:  # kill every worker process of the pool as soon as it appears
        while not stop.is_set():
            for pid in list(getattr(pool._executor, "_processes", {}) or {}):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stop.wait(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        with pytest.raises(HsmError) as raised:
            jobs = [Job(card(700 + i), f"{i:032X}") for i in range(200)]
            list(pool.seal(jobs, "B-kill-all", "bureau-a", "dual-app-v1"))
        assert raised.value.retryable
        assert "keep ending unexpectedly" in str(raised.value)
    finally:
        stop.set()
        thread.join()
        pool.terminate()


def test_a_worker_that_cannot_start_says_why(home: Home, tmp_path: Path) -> None:
    from kms.errors import StorageUnavailable

    # The worker's database cannot be opened: a storage fault (kms.store), retryable, named — not a bare class name.
    config = _config_copy(home, tmp_path, database=f"sqlite:///{tmp_path / 'missing-dir' / 'kms.db'}")
    pool = DomainPool(config, "hrss", processes=1)
    try:
        with pytest.raises(StorageUnavailable, match=r"the database is unavailable \(cannot open the database file\)"
                           ) as raised:
            list(pool.seal([Job(card(500), "00" * 16)], "B-init", "bureau-a", "dual-app-v1"))
        assert raised.value.retryable
    finally:
        pool.terminate()


def test_a_pin_refused_while_the_pool_grows_is_presented_once_not_once_per_process(
        home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three workers per domain; the first logs in at the start, then the PIN file goes wrong (a bad rotation) and
    the pool starts its other processes for a batch: one of them presents the PIN, the token refuses it, and the
    others never present it (a real HSM locks its PIN after a few failures, whatever the number of workers)."""
    from kms.errors import HsmLoginFailed
    from kms.hsm.session import LOGIN_TRACE_ENV

    pin = tmp_path / "bank.pin"
    pin.write_text((home.path / "pins" / "bank.pin").read_text())
    trace = tmp_path / "logins.trace"
    monkeypatch.setenv(LOGIN_TRACE_ENV, str(trace))  # inherited by the spawned workers
    config = _config_copy(home, tmp_path)
    doc = yaml.safe_load(config.read_text())
    doc["domains"]["bank"]["pin"] = f"file:{pin}"
    config.write_text(yaml.safe_dump(doc))
    pool = DomainPool(config, "bank", processes=3)
    try:
        pool.start()
        pin.write_text("000000\n")
        with pytest.raises(HsmLoginFailed):
            list(pool.seal([Job(card(800 + i), f"{i:032X}") for i in range(32 * 12)], "B-pin", "bureau-a",
                           "dual-app-v1"))
        assert pool.probe() is not None  # refused: the health monitor presents nothing either
    finally:
        pool.terminate()
    outcomes = [line.split()[3] for line in trace.read_text().splitlines()]
    assert outcomes[0] == "ok" and outcomes[1:] == ["PinIncorrect"], outcomes


class _RetireOnRelease:
    """The pool's lock, except that the first release after ``arm()`` retires the pool's processes as a concurrent
    recycle does (fault injection: the moment between taking the current pool and using it)."""

    def __init__(self, pool: DomainPool) -> None:
        import threading

        self._pool, self._lock, self._armed = pool, threading.Lock(), False

    def arm(self) -> None:
        self._armed = True

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        if self._armed:
            self._armed = False
            with self._lock:
                retiring, self._pool._executor = self._pool._executor, None
                self._pool._generation += 1
            assert retiring is not None
            retiring.shutdown(wait=False)  # as recycle(): its queued work still runs, nothing new is accepted


def test_a_health_probe_racing_a_recycle_does_not_fail(home: Home) -> None:
    pool = DomainPool(home.config, "bank", processes=1)
    lock = _RetireOnRelease(pool)
    pool._lock = lock  # type: ignore[assignment]
    try:
        pool.start()
        lock.arm()
        assert pool.probe() is None  # not "cannot schedule new futures after shutdown" (RuntimeError)
    finally:
        pool.terminate()
