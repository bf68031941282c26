"""The service's Prometheus metrics (prometheus-client), every one in the default registry
(``prometheus_client.REGISTRY``), which ``/metrics`` serves; docs/operations.md "Metrics and logs" lists them.

Labels have bounded values only: a domain, bureau, profile, gRPC method of a registered service, status code, HSM
verb, error class or state — never a card reference, a PAN, a caller's name or anything secret.

HSM calls run in the domains' worker processes, whose own registries nobody scrapes: there ``hsm_call`` times each
call into a bounded per-process queue, the worker hands the queue's contents back with a chunk's results
(``take_hsm_calls``), and the serving process observes them (``observe_hsm_calls``). No multiprocess mode.

What is cheapest to read from the database when scraped — checkpoint lag, ceremonies by state — comes from a
collector over the sources the running service binds (``bind``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar, cast

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_HSM_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0)
_DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CARDS_ISSUED = Counter("kms_cards_issued", "Cards issued: bundles recorded as issued (first delivery; re-sent "
                       "bundles do not count)", ["bureau", "profile"])
KEYS_ISSUED = Counter("kms_keys_issued", "Card keys issued in the bundles counted by kms_cards_issued_total, per "
                      "key domain", ["domain", "bureau", "profile"])
HSM_CALL_SECONDS = Histogram("kms_hsm_call_seconds", "Duration of HSM (PKCS#11) calls in the domain workers, per "
                             "verb; failed calls included", ["domain", "verb"], buckets=_HSM_BUCKETS)
HSM_ERRORS = Counter("kms_hsm_errors", "HSM calls that failed, per verb and error class", ["domain", "verb", "error"])
WORKER_RESTARTS = Counter("kms_worker_restarts", "Replacements of a domain's worker processes: died (a worker ended "
                          "unexpectedly), recycled (after recycle_after_keys), key-change (after a key ceremony)",
                          ["domain", "reason"])
STREAMS_OPEN = Gauge("kms_streams_open", "Streaming calls in progress (admitted by the authorization check)",
                     ["method"])
REQUESTS = Counter("kms_requests", "Calls that ended, per method and gRPC status code", ["method", "code"])
REFUSALS = Counter("kms_refusals", "Calls that did not end OK (request.refused audit records), per method, gRPC "
                   "status code and stage: admission (certificate, registry, policy) or handler",
                   ["method", "code", "stage"])
AUDIT_APPEND_SECONDS = Histogram("kms_audit_append_seconds", "Duration of appending records to the audit chain "
                                 "(head lock, hashing, insert), per append", buckets=_DB_BUCKETS)
AUDIT_RECORDS = Counter("kms_audit_records_appended", "Audit records appended by this process")
AUDIT_HEAD_SECONDS = Histogram("kms_audit_head_lock_seconds", "Time taken to lock and advance the audit chain's head "
                               "row, per append: mostly waiting for other writers' transactions (replicas sharing "
                               "one database contend here)", buckets=_DB_BUCKETS)

UNKNOWN_METHOD = "unknown"  # the method label of a call to no registered method (its name is the caller's text)

# -- HSM call timing: in the worker processes --------------------------------------------------------------------

#: (verb, seconds, error class or "") of one HSM call.
HsmCall = tuple[str, float, str]
_HSM_QUEUE = 65_536  # calls kept when nobody takes them (a station, the audit signer): the oldest are dropped
_hsm_calls: deque[HsmCall] = deque(maxlen=_HSM_QUEUE)

F = TypeVar("F", bound=Callable[..., Any])


def hsm_call(verb: str) -> Callable[[F], F]:
    """Decorator of an HSM port verb (kms.hsm.session): times each call into this process's queue."""
    def decorate(function: F) -> F:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = function(*args, **kwargs)
            except Exception as error:
                record_hsm_call(verb, time.perf_counter() - started, type(error).__name__)
                raise
            record_hsm_call(verb, time.perf_counter() - started)
            return result
        return cast(F, timed)
    return decorate


def record_hsm_call(verb: str, seconds: float, error: str = "") -> None:
    """One HSM call timed by its verb itself (a verb that makes several calls, e.g. one per card key), as
    ``hsm_call`` would: ``error`` is the raised exception's class name, or ""."""
    _hsm_calls.append((verb, seconds, error))


def take_hsm_calls() -> tuple[HsmCall, ...]:
    """The HSM calls timed in this process since the last take (a worker sends them with its results)."""
    taken = []
    while True:
        try:
            taken.append(_hsm_calls.popleft())
        except IndexError:
            return tuple(taken)


_CARRIED = "kms_hsm_calls"  # the attribute an exception raised in a worker carries its timings in (pickled along)


def sends_hsm_calls_on_error(function: F) -> F:
    """Decorator of a worker's task: an exception it raises carries the HSM calls timed so far (a failed login
    among them) back to the serving process, which observes them with ``observe_hsm_calls_of``."""
    @functools.wraps(function)
    def task(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            setattr(error, _CARRIED, take_hsm_calls())
            raise
    return cast(F, task)


def observe_hsm_calls_of(domain: str, error: BaseException) -> None:
    """In the serving process: the HSM calls a failed worker task carried (``sends_hsm_calls_on_error``)."""
    observe_hsm_calls(domain, getattr(error, _CARRIED, ()))


def observe_hsm_calls(domain: str, calls: tuple[HsmCall, ...]) -> None:
    """In the serving process: the HSM calls a ``domain`` worker timed (hundreds per chunk: each label set is
    looked up once)."""
    children: dict[str, Any] = {}
    for verb, seconds, error in calls:
        child = children.get(verb)
        if child is None:
            child = children[verb] = HSM_CALL_SECONDS.labels(domain, verb)
        child.observe(seconds)
        if error:
            HSM_ERRORS.labels(domain, verb, error).inc()


# -- issuance, requests, audit -----------------------------------------------------------------------------------


def cards_issued(bureau: str, profile: str, cards: int, keys_per_domain: Mapping[str, int]) -> None:
    """``cards`` new bundles recorded issued for ``bureau`` and ``profile``, each with ``keys_per_domain`` keys."""
    if cards <= 0:
        return
    CARDS_ISSUED.labels(bureau, profile).inc(cards)
    for domain, keys in keys_per_domain.items():
        KEYS_ISSUED.labels(domain, bureau, profile).inc(cards * keys)


def audit_appended(records: int, seconds: float, head_seconds: float = 0.0) -> None:
    """An append of ``records`` that took ``seconds``, ``head_seconds`` of them taking the head row's lock."""
    AUDIT_APPEND_SECONDS.observe(seconds)
    AUDIT_HEAD_SECONDS.observe(head_seconds)
    AUDIT_RECORDS.inc(records)


# -- read when scraped: checkpoint lag, ceremonies by state --------------------------------------------------------

#: Returns (records in the chain, records covered by the newest signed checkpoint).
CheckpointSource = Callable[[], tuple[int, int]]
#: Returns {(domain, state): ceremonies}.
CeremonySource = Callable[[], Mapping[tuple[str, str], int]]
#: Returns the audit anchor's status (kms.audit.anchor.AnchorStatus as JSON), None when no anchor is configured.
AnchorSource = Callable[[], Mapping[str, Any] | None]


class _Sources:
    def __init__(self, checkpoints: CheckpointSource | None, ceremonies: CeremonySource | None,
                 anchor: AnchorSource | None = None, replica: str = "") -> None:
        self.replica = replica
        self.checkpoints = checkpoints
        self.ceremonies = ceremonies
        self.anchor = anchor


class _DatabaseCollector(Collector):
    """Gauges computed when scraped, from the sources of the service bound last. A source that fails (the database
    is down) leaves its metric out of that scrape, and the failure is logged at debug level."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bound: list[_Sources] = []

    def bind(self, sources: _Sources) -> None:
        with self._lock:
            self._bound.append(sources)

    def unbind(self, sources: _Sources) -> None:
        with self._lock:
            if sources in self._bound:
                self._bound.remove(sources)

    def describe(self) -> list[Metric]:
        return []  # collected only when scraped (the registry must not call the sources at registration)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            sources = self._bound[-1] if self._bound else None
        if sources is None:
            return
        if sources.replica:
            yield InfoMetricFamily("kms_replica", "This kms serve replica (server.replica): one series per process, "
                                   "so that replicas sharing one database tell their metrics apart",
                                   value={"replica": sources.replica})
        if sources.checkpoints is not None:
            try:
                size, covered = sources.checkpoints()
            except Exception:
                log.debug("checkpoint lag: the audit log cannot be read", exc_info=True)
            else:
                yield GaugeMetricFamily("kms_audit_records", "Records in the audit chain", value=size)
                yield GaugeMetricFamily("kms_audit_checkpoint_lag_records", "Audit records not yet covered by a "
                                        "signed checkpoint (chain size minus the newest checkpoint's size)",
                                        value=max(0, size - covered))
        if sources.anchor is not None:
            yield from _anchor_metrics(sources.anchor)
        if sources.ceremonies is not None:
            try:
                counts = sources.ceremonies()
            except Exception:
                log.debug("ceremonies by state: the ceremonies cannot be read", exc_info=True)
            else:
                family = GaugeMetricFamily("kms_ceremonies", "Ceremonies by domain and state (open, executing, "
                                           "executed, failed, cancelled, expired)", labels=["domain", "state"])
                for (domain, state), count in sorted(counts.items()):
                    family.add_metric([domain, state], count)
                yield family


def _anchor_metrics(source: AnchorSource) -> Iterator[Metric]:
    try:
        status = source()
    except Exception:
        log.debug("audit anchor: the signer cannot be asked", exc_info=True)
        return
    if status is None:
        return
    yield GaugeMetricFamily("kms_audit_anchor_backlog", "Signed audit checkpoints not yet anchored in OpenBao (they "
                            "wait in the signer's spool and are written in order once it can be reached)",
                            value=int(status.get("backlog", 0)))
    yield GaugeMetricFamily("kms_audit_anchor_failing", "1 while the audit signer cannot write anchors to OpenBao",
                            value=1 if status.get("error") else 0)
    yield GaugeMetricFamily("kms_audit_anchor_conflicts", "Signed checkpoints refused by OpenBao because an anchor "
                            "of the same size exists (kept in the spool's conflicts/)",
                            value=int(status.get("conflicts", 0)))
    yield GaugeMetricFamily("kms_audit_anchored_size", "The size of the checkpoint the audit signer anchored last",
                            value=int(status.get("anchored", 0)))


_collector = _DatabaseCollector()
REGISTRY.register(_collector)


class Binding:
    """What ``bind`` returns: ``close()`` takes the service's sources out of the collector."""

    def __init__(self, sources: _Sources) -> None:
        self._sources = sources

    def close(self) -> None:
        _collector.unbind(self._sources)


def bind(*, checkpoints: CheckpointSource | None = None, ceremonies: CeremonySource | None = None,
         anchor: AnchorSource | None = None, replica: str = "") -> Binding:
    """Make the running service's audit log, ceremonies and audit anchor the sources of the gauges read when scraped
    (the last bound service's, if a process runs several, as tests do)."""
    sources = _Sources(checkpoints, ceremonies, anchor, replica)
    _collector.bind(sources)
    return Binding(sources)
