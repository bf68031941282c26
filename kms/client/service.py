"""Calling the issuance service over mutual TLS as a station, an officer or an auditor."""

from __future__ import annotations

import dataclasses
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, cast, overload

import grpc

from kms import errors
from kms.cards.cardid import CardIdentity
from kms.config import ClientConfig, Endpoint, TlsConfig, endpoints, read_file
from kms.revocation import check_server_certificate
from kms.v1 import cards_pb2 as cards_pb
from kms.v1 import cards_pb2_grpc as cards_rpc
from kms.v1 import issuance_pb2 as pb
from kms.v1 import issuance_pb2_grpc as rpc


def translate(error: grpc.RpcError) -> errors.KmsError:
    """A server's status as the kms error it stands for (kms.errors.from_status: UNAVAILABLE becomes the
    retryable Unavailable, exit 12)."""
    return errors.from_status(error.code().name, error.details() or "")


Reply = TypeVar("Reply")
Stub = TypeVar("Stub")


# -- retries of UNAVAILABLE -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """How UNAVAILABLE is retried: exponential backoff with jitter, bounded. The n-th retry in a row waits half of
    ``min(most, first * 2**(n-1))`` plus up to as much again at random (so that stations that lost the service
    together do not come back together); after ``retries`` retries, or once ``seconds`` have passed since the
    last progress (a bundle received, or the first attempt), the last error is raised. Progress starts both counts
    afresh: a long batch survives any number of outages as long as it moves between them."""

    retries: int = 8
    seconds: float = 300.0
    first: float = 0.5
    most: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.seconds < 0 or self.first <= 0 or self.most < self.first:
            raise ValueError("Backoff: retries and seconds must be 0 or more, 0 < first <= most")

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before the ``retry``-th retry in a row (1, 2, ...)."""
        step = min(self.most, self.first * 2.0 ** min(retry - 1, 62))
        return float(step / 2 + rand() * step / 2)


@dataclass(frozen=True)
class Retrying:
    """A retry about to happen: the ``retry``-th in a row of at most ``retries``, after ``delay`` seconds, because of
    ``error``; a stream resumes after ``cursor`` ("": from the start)."""

    retry: int
    retries: int
    delay: float
    error: errors.KmsError
    cursor: str = ""


class _Budget:
    """The retries left under a Backoff since the last progress."""

    def __init__(self, backoff: Backoff, clock: Callable[[], float] = time.monotonic) -> None:
        self._backoff = backoff
        self._clock = clock
        self.progressed()

    def progressed(self) -> None:
        self._retry, self._since = 0, self._clock()

    def wait(self, error: errors.KmsError, cursor: str, on_retry: Callable[[Retrying], None] | None,
             sleep: Callable[[float], None]) -> None:
        """Wait before the next retry, or raise ``error`` if the backoff gives up."""
        self._retry += 1
        delay = self._backoff.delay(self._retry)
        if self._retry > self._backoff.retries or self._clock() + delay - self._since > self._backoff.seconds:
            raise error
        if on_retry is not None:
            on_retry(Retrying(self._retry, self._backoff.retries, delay, error, cursor))
        sleep(delay)


def retry_unavailable(call: Callable[[], Reply], backoff: Backoff = Backoff(),
                      on_retry: Callable[[Retrying], None] | None = None,
                      sleep: Callable[[float], None] = time.sleep) -> Reply:
    """``call()`` (a unary call of a Client, or making one), retried under ``backoff`` while it raises a retryable
    kms error (Unavailable; the server not reachable at all)."""
    budget = _Budget(backoff)
    while True:
        try:
            return call()
        except errors.KmsError as error:
            if not error.retryable:
                raise
            budget.wait(error, "", on_retry, sleep)


#: The channel options of every client: bundles of a stream message may take up to 8 MiB.
_OPTIONS: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 8 * 1024 * 1024)]


def server_endpoints(server: str | Sequence[str]) -> tuple[Endpoint, ...]:
    """``server`` (``host:port``, several separated by commas, or a sequence of them) as endpoints; ConfigError
    naming it when malformed (kms.config.endpoints: an empty item, no port, a port out of range, one listed twice)."""
    try:
        return endpoints(server if isinstance(server, str) else list(server))
    except ValueError as error:
        raise errors.ConfigError(f"server: {error}") from None


@dataclass(frozen=True)
class Target:
    """What one gRPC channel over the endpoints connects to: the gRPC target, the name the server's certificate
    must carry (``name``), the addresses it reaches (host, port: each one's certificate is checked against the CRL)
    and the channel's options beyond _OPTIONS."""

    target: str
    name: str
    addresses: tuple[tuple[str, int], ...]
    options: tuple[tuple[str, Any], ...] = ()

    def only(self, addresses: Sequence[tuple[str, int]]) -> Target:
        """This target reaching only ``addresses`` (some of its own)."""
        if len(self.addresses) == 1 and not self.options:
            return self
        return _listed(self.name, dict(self.options)["grpc.default_authority"], tuple(addresses))


def _listed(name: str, authority: str, addresses: tuple[tuple[str, int], ...]) -> Target:
    ipv6 = ":" in addresses[0][0]
    listed = ",".join(f"[{a}]:{p}" if ipv6 else f"{a}:{p}" for a, p in addresses)
    return Target(f"{'ipv6' if ipv6 else 'ipv4'}:{listed}", name, addresses, (
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.ssl_target_name_override", name),  # else gRPC checks the whole list as one name
        ("grpc.default_authority", authority)))


def _resolve(endpoint: Endpoint) -> list[tuple[int, str]]:
    """(address family, address) of an endpoint's host, in the resolver's order, each once."""
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    found: list[tuple[int, str]] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, str(sockaddr[0])) not in found:
            found.append((family, str(sockaddr[0])))
    return found


def target(endpoints: Sequence[Endpoint],
           resolve: Callable[[Endpoint], list[tuple[int, str]]] = _resolve, *, crl: bool = False) -> Target:
    """The channel's target. One endpoint without a CRL (``crl``: client.tls.crl is set): its ``host:port`` as
    always (gRPC resolves the name and uses the first address that answers). Several, or one with a CRL: their hosts
    resolved here, every address of every endpoint in one ``ipv4:``/``ipv6:`` list under gRPC's round_robin policy
    (each call to the next connected address; an address whose connection failed is skipped until it reconnects), so
    that with a CRL the channel uses only addresses whose certificates were checked (check_server_certificates), not
    whatever address a second resolution by gRPC gives. One channel checks one TLS name: the first endpoint's host
    (``grpc.ssl_target_name_override``), so every replica's certificate must carry it (one host with several ports,
    or a service name in every replica's certificate, listed first). The list is IPv4 when every endpoint has an
    IPv4 address, else IPv6 with every address, the IPv4 ones IPv4-mapped (``[::ffff:a.b.c.d]``, which a dual-stack
    host reaches over IPv4). An endpoint whose host does not resolve is left out while another resolves;
    Unavailable (retried like any outage) if none does."""
    first = endpoints[0]
    if len(endpoints) == 1 and not crl:
        return Target(str(first), first.host, ((first.host, first.port),))
    resolved = {e: resolve(e) for e in endpoints}
    live = [e for e in endpoints if resolved[e]]
    if not live:
        raise errors.Unavailable(f"service: unavailable: none of the hosts of {','.join(map(str, endpoints))} "
                                 "resolves to an address")
    # gRPC takes one address family per list: IPv4 if it reaches every endpoint, else IPv6 with every address (the
    # IPv4 ones IPv4-mapped), so that no endpoint is left out for its family.
    if all(any(f == socket.AF_INET for f, _ in resolved[e]) for e in live):
        listed = [(address, e.port) for e in live for f, address in resolved[e] if f == socket.AF_INET]
    else:
        listed = [(address if f == socket.AF_INET6 else f"::ffff:{address}", e.port)
                  for e in live for f, address in resolved[e]]
    return _listed(first.host, str(first), tuple(dict.fromkeys(listed)))


#: With several addresses, how long each one's CRL check may take to connect and shake hands: a replica that hangs
#: (frozen, or a host that drops packets) is left out after this, not after the call timeout.
CHECK_SECONDS = 10.0


def check_server_certificates(tls: TlsConfig, reached: Target, timeout: float) -> Target:
    """With ``client.tls.crl``: the server certificate at each of the target's addresses checked against the CRL
    (kms.revocation.check_server_certificate, for the TLS name the channel checks); the target without the
    addresses that cannot be reached now (their certificates unchecked, so not used by this channel until
    Client checks them again after an UNAVAILABLE). Several
    addresses are checked at once, each within CHECK_SECONDS. A revoked certificate anywhere: PermissionDenied.
    None reachable: the last retryable error. Without a CRL: ``reached``."""
    if tls.crl is None:
        return reached
    if not reached.options:  # one endpoint as gRPC would resolve it: its addresses listed, each checked
        reached = target([Endpoint(*reached.addresses[0])], crl=True)

    def check(address: tuple[str, int]) -> errors.KmsError | None:
        try:
            check_server_certificate(tls, str(Endpoint(*address)), min(timeout, CHECK_SECONDS), name=reached.name)
        except errors.KmsError as error:
            if not error.retryable:
                raise
            return error
        return None

    with ThreadPoolExecutor(max_workers=min(len(reached.addresses), 8), thread_name_prefix="kms-crl") as pool:
        outcomes = list(pool.map(check, reached.addresses))  # the first refusal, if any, is raised here
    checked = [address for address, error in zip(reached.addresses, outcomes, strict=True) if error is None]
    if not checked:
        raise next(error for error in reversed(outcomes) if error is not None)
    return reached.only(checked)


class Client:
    """A connection to the service as a station, an officer or an auditor: ``cfg.server`` (or ``server``, one
    ``host:port`` or several separated by commas) over mutual TLS, one gRPC channel over every endpoint (target).
    Calls are balanced over the endpoints that are connected; a call that fails UNAVAILABLE (an endpoint gone)
    is retried by retry_unavailable or stream_batch on a connected one."""

    def __init__(self, cfg: ClientConfig, timeout: float = 60.0, server: str | Sequence[str] | None = None) -> None:
        # A file that cannot be read is a ConfigError naming its setting and path, before anything else uses it.
        ca, key, cert = (read_file(cfg.tls.ca, "client.tls.ca"), cfg.tls.private_key("client.tls.key"),
                         read_file(cfg.tls.cert, "client.tls.cert"))
        self.endpoints = server_endpoints(server) if server is not None else cfg.endpoints
        self.timeout = timeout
        self._tls = cfg.tls
        self._credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                                         certificate_chain=cert)
        self._replaced: list[grpc.Channel] = []  # channels of an earlier target: closed with the client
        self._recheck = False
        # With client.tls.crl: each address's server certificate checked against the CRL first (kms.revocation;
        # gRPC Python cannot check CRLs itself), and again after an UNAVAILABLE (recheck).
        self._connect(check_server_certificates(cfg.tls, target(self.endpoints, crl=cfg.tls.crl is not None),
                                                timeout))

    def _connect(self, reached: Target) -> None:
        self.target = reached
        self._channel = grpc.secure_channel(reached.target, self._credentials, options=[*_OPTIONS, *reached.options])
        self._stubs: dict[Any, Any] = {}

    def stub(self, kind: Callable[[grpc.Channel], Stub]) -> Stub:
        """A ``kind`` (a generated gRPC stub class) on the current channel, after recheck: take one per call (not
        once), so that calls after an UNAVAILABLE go to the channel over the addresses checked again."""
        self.recheck()
        if kind not in self._stubs:
            self._stubs[kind] = kind(self._channel)
        return cast(Stub, self._stubs[kind])

    @property
    def issuance(self) -> rpc.IssuanceServiceStub:
        return self.stub(rpc.IssuanceServiceStub)

    @property
    def batches(self) -> rpc.BatchServiceStub:
        return self.stub(rpc.BatchServiceStub)

    @property
    def cards(self) -> cards_rpc.CardServiceStub:
        return self.stub(cards_rpc.CardServiceStub)

    def recheck(self) -> None:
        """After an UNAVAILABLE, with client.tls.crl, before the next call: the endpoints resolved and every address
        checked again (check_server_certificates), and the channel replaced when the checked addresses changed, so
        that a replica unreachable when the client started (and left out, unchecked) is used once it is back, e.g.
        in a rolling restart, and a DNS change is followed. Its errors are check_server_certificates' (a retryable
        one, nothing reachable now, leaves the channel and checks again before the next call). Without a CRL
        nothing: gRPC itself reconnects to every listed address."""
        if not self._recheck or self._tls.crl is None:
            return
        checked = check_server_certificates(self._tls, target(self.endpoints, crl=True), self.timeout)
        self._recheck = False
        if checked != self.target:
            self._replaced.append(self._channel)  # calls under way on it (other threads) finish there
            self._connect(checked)

    @property
    def channel(self) -> grpc.Channel:
        """The current channel (recheck may replace it: prefer stub())."""
        return self._channel

    @overload
    def call(self, method: Any, request: Any) -> Any: ...

    @overload
    def call(self, method: Any, request: Any, returns: type[Reply]) -> Reply: ...

    def call(self, method: Any, request: Any, returns: type[Any] = object) -> Any:
        """One unary call, its error as the kms error it stands for. ``returns``, the method's reply message, types
        the reply for the caller: the generated stubs are untyped, the messages (their .pyi) are not."""
        return self._call(method, request, returns)

    def close(self) -> None:
        for channel in (*self._replaced, self._channel):
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, returns: type[Reply]) -> Reply:
        try:
            return cast(Reply, method(request, timeout=self.timeout))  # the stub's deserializer made a ``returns``
        except grpc.RpcError as error:
            raise self.failed(error) from None

    def failed(self, error: grpc.RpcError) -> errors.KmsError:
        """A call's error as its kms error (translate); an UNAVAILABLE has the addresses checked again before the
        next call (recheck)."""
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            self._recheck = True
        return translate(error)

    def create_batch(self, batch_id: str, bureau: str, profile: str, cards: Sequence[CardIdentity]) -> pb.BatchStatus:
        request = pb.CreateBatchRequest(batch_id=batch_id, bureau=bureau, profile=profile,
                                        cards=[pb.CardIdentity(**c.as_dict()) for c in cards])
        return self._call(self.batches.CreateBatch, request, pb.BatchStatus)

    def batch_status(self, batch_id: str) -> pb.BatchStatus:
        return self._call(self.issuance.GetBatchStatus, pb.GetBatchStatusRequest(batch_id=batch_id), pb.BatchStatus)

    def reissue(self, batch_id: str, card_ref: str) -> pb.ReissueCardResponse:
        return self._call(self.batches.ReissueCard, pb.ReissueCardRequest(batch_id=batch_id, card_ref=card_ref),
                          pb.ReissueCardResponse)

    # -- card lifecycle (officers; get_card also auditors) ---------------------------------------------------------

    def report_lost(self, card_ref: str, application: str, reason: str) -> cards_pb.Card:
        return self._call(self.cards.ReportLost, cards_pb.ReportLostRequest(
            card_ref=card_ref, application=application, reason=reason), cards_pb.Card)

    def cancel_loss_report(self, card_ref: str, application: str, reason: str) -> cards_pb.Card:
        return self._call(self.cards.CancelLossReport, cards_pb.CancelLossReportRequest(
            card_ref=card_ref, application=application, reason=reason), cards_pb.Card)

    def replace_card(self, old_card_ref: str, new_card_ref: str, reason: str) -> cards_pb.Card:
        return self._call(self.cards.ReplaceCard, cards_pb.ReplaceCardRequest(
            old_card_ref=old_card_ref, new_card_ref=new_card_ref, reason=reason), cards_pb.Card)

    def cancel_application(self, card_ref: str, application: str, kind: str, reason: str) -> cards_pb.Card:
        """``kind``: "cancel-card" (销卡) or "close-account" (销户)."""
        return self._call(self.cards.CancelApplication, cards_pb.CancelApplicationRequest(
            card_ref=card_ref, application=application, kind=kind, reason=reason), cards_pb.Card)

    def get_card(self, card_ref: str) -> cards_pb.Card:
        return self._call(self.cards.GetCard, cards_pb.GetCardRequest(card_ref=card_ref), cards_pb.Card)

    def issue_card(self, batch_id: str, card_ref: str, *, card_serial: str = "", kdd: str = "",
                   idempotency_key: str | None = None) -> pb.SealedBundle:
        """One card's bundle. Without an idempotency key one is made up for the call, so that a retry of this
        call (same key) gets the same bundle; pass "" to send none."""
        if idempotency_key is None:
            idempotency_key = secrets.token_hex(16)
        request = pb.IssueCardRequest(batch_id=batch_id, card_ref=card_ref, idempotency_key=idempotency_key)
        if card_serial or kdd:
            request.chip.CopyFrom(pb.ChipData(card_serial=card_serial, kdd=kdd))
        return self._call(self.issuance.IssueCard, request, pb.IssueCardResponse).bundle

    def stream_batch(self, batch_id: str, *, cursor: str = "", per_message: int = 0, retries: int | None = None,
                     backoff: Backoff = Backoff(), on_retry: Callable[[Retrying], None] | None = None,
                     stream_timeout: float = 3600.0, sleep: Callable[[float], None] = time.sleep
                     ) -> Iterator[pb.SealedBundle]:
        """Every bundle of the batch. After UNAVAILABLE (a broken connection, the service's database or HSM
        workers out for a while) the stream is asked for again from the last cursor received, after ``backoff``'s
        delay, so no bundle is lost and none is received twice; ``on_retry`` hears of each retry before its delay.
        ``retries`` overrides ``backoff.retries``. Any other status, or UNAVAILABLE once the backoff gives up, is
        raised as its kms error."""
        if retries is not None:
            backoff = dataclasses.replace(backoff, retries=retries)
        budget = _Budget(backoff)
        while True:
            try:
                issuance = self.issuance  # after an UNAVAILABLE: the addresses checked again (recheck)
            except errors.KmsError as error:
                if not error.retryable:
                    raise
                budget.wait(error, cursor, on_retry, sleep)
                continue
            try:
                for message in issuance.StreamBatch(
                        pb.StreamBatchRequest(batch_id=batch_id, cursor=cursor, max_bundles_per_message=per_message),
                        timeout=stream_timeout):
                    yield from message.bundles
                    cursor = message.cursor
                    budget.progressed()
                return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise translate(error) from None
                budget.wait(self.failed(error), cursor, on_retry, sleep)
