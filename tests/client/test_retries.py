"""The client's retries of UNAVAILABLE (kms.client.service: Backoff, retry_unavailable): exponential backoff with
jitter, bounded by a number of retries and a time without progress; only retryable errors are retried (a refused
PIN or a refusal is never tried again)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kms.client.service import Backoff, Retrying, _Budget, retry_unavailable
from kms.errors import HsmError, HsmLoginFailed, KmsError, PermissionDenied, ResourceExhausted, Unavailable


def test_delays_grow_exponentially_within_their_jitter_and_stop_growing_at_most() -> None:
    backoff = Backoff(first=0.5, most=8.0)
    for retry, step in enumerate([0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0], start=1):
        assert backoff.delay(retry, lambda: 0.0) == step / 2
        assert backoff.delay(retry, lambda: 1.0) == step
    assert backoff.delay(10_000, lambda: 1.0) == 8.0  # no overflow however long it goes


@pytest.mark.parametrize("settings", [{"retries": -1}, {"seconds": -1.0}, {"first": 0.0}, {"first": 2.0, "most": 1.0}])
def test_a_backoff_that_makes_no_sense_is_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**settings)  # type: ignore[arg-type]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _retries(budget: _Budget, clock: _Clock, failures: int) -> list[Retrying]:
    heard: list[Retrying] = []
    for _ in range(failures):
        budget.wait(Unavailable("down"), "17", heard.append, clock.sleep)
    return heard


def test_the_budget_gives_up_after_its_retries_and_progress_starts_it_afresh() -> None:
    clock = _Clock()
    budget = _Budget(Backoff(retries=3, seconds=1_000.0), clock)
    heard = _retries(budget, clock, 3)
    assert [(r.retry, r.retries, r.cursor) for r in heard] == [(1, 3, "17"), (2, 3, "17"), (3, 3, "17")]
    assert clock.now == pytest.approx(sum(r.delay for r in heard))
    with pytest.raises(Unavailable, match="down"):
        budget.wait(Unavailable("down"), "17", heard.append, clock.sleep)
    budget.progressed()  # a bundle arrived: three more retries
    assert len(_retries(budget, clock, 3)) == 3


def test_the_budget_gives_up_once_its_time_without_progress_is_spent() -> None:
    clock = _Clock()
    budget = _Budget(Backoff(retries=100, seconds=10.0, first=1.0, most=4.0), clock)
    heard: list[Retrying] = []
    with pytest.raises(Unavailable):
        for _ in range(100):
            budget.wait(Unavailable("down"), "", heard.append, clock.sleep)
    assert 3 <= len(heard) <= 10 and clock.now <= 10.0  # never sleeps past the time it was given


@pytest.mark.parametrize("error", [PermissionDenied("no"), HsmLoginFailed("login refused for token kms-hrss"),
                                   HsmError("C_DeriveKey failed"), ResourceExhausted("limit", limit="x")])
def test_only_retryable_errors_are_retried(error: KmsError) -> None:
    calls: list[int] = []

    def call() -> int:
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        retry_unavailable(call, Backoff(), sleep=lambda s: None)
    assert len(calls) == 1


@pytest.mark.parametrize("error", [Unavailable("service: unavailable: down"),
                                   HsmError("service: unavailable: cannot reach localhost:7443", retryable=True)])
def test_an_unavailable_call_is_retried_until_it_answers(error: KmsError) -> None:
    outcomes: list[Callable[[], int]] = [lambda: (_ for _ in ()).throw(error)] * 2 + [lambda: 42]
    heard: list[Retrying] = []
    slept: list[float] = []
    assert retry_unavailable(lambda: outcomes.pop(0)(), Backoff(retries=2), heard.append, slept.append) == 42
    assert [r.retry for r in heard] == [1, 2] and slept == [r.delay for r in heard]
    assert all(r.error is error for r in heard)
