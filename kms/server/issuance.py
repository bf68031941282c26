"""The issuance services (kms.v1): stations fetch sealed bundles of authorized batches; officers create batches.

Every handler runs behind the authorization interceptor (kms.server.frame): the caller is a verified principal whose
role the policy allows for the method. Here each request is checked against the caller's own scope — a station only its
bureau's batches, for domains its bureau is registered for; an officer only batches whose profile covers their
domain — and refused with a reason a person understands.

No HSM work starts once a call's deadline has passed or the call was cancelled. A card is issued at most once
(kms.issuance.batches); a retried request with the same idempotency key, or a resumed stream, gets the stored bundle.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from kms import errors, metrics
from kms.audit.alarms import Alarms
from kms.cards.cardid import CardIdentity
from kms.cards.profiles import Profile
from kms.clock import Clock
from kms.identity import Principal
from kms.issuance.batches import CHIP_FIELDS, IDEMPOTENCY_KEY, Batch, BatchState, BatchStore, CardRecord, CardState
from kms.issuance.issuer import DomainPools, IssuedBundle, Issuer
from kms.issuance.lifecycle import CardLifecycle
from kms.issuance.limits import Quotas, StreamQuota
from kms.issuance.pans import DOMAIN as BANK
from kms.issuance.pans import BankCall, PanVault
from kms.issuance.sealer import DomainKeys
from kms.registry import KeyRegistry
from kms.server.frame import current_domains, current_principal, require_still_admitted, service_method
from kms.v1 import issuance_pb2 as pb
from kms.v1 import issuance_pb2_grpc as rpc

log = logging.getLogger(__name__)

DEFAULT_BUNDLES_PER_MESSAGE = 16
MAX_BUNDLES_PER_MESSAGE = 256
PAGE = 256  # card records read per database query of a stream
MIN_TIME_FOR_HSM_WORK = 0.05  # seconds left on the deadline below which no HSM work starts
ISSUE_CARD = "/kms.v1.IssuanceService/IssueCard"
STREAM_BATCH = "/kms.v1.IssuanceService/StreamBatch"
_CURSOR = re.compile(r"[0-9]{1,9}")  # a sequence number, as the server gives it


class Issuance:
    """What the services share: records, key registry, profiles and the domain worker pools."""

    def __init__(self, store: BatchStore, registry: KeyRegistry, profiles: dict[str, Profile],
                 pools: DomainPools, clock: Clock, *, lifecycle: CardLifecycle, quotas: Quotas | None = None,
                 alarms: Alarms | None = None, pans: PanVault | None = None) -> None:
        # PANs of new batches are protected by the bank domain's workers before anything stores them
        # (kms.issuance.pans).
        self.pans = pans or PanVault(_bank_call(pools))
        self.store = store
        self.lifecycle = lifecycle  # lost, cancelled, replaced cards and retired identities are never issued
        self.registry = registry
        self.profiles = profiles
        self.pools = pools
        self.clock = clock
        self.quotas = quotas  # stations' and bureaus' issuance limits (kms.issuance.limits); None: no limits
        self.alarms = alarms  # alarm.outside-batch records (kms.audit.alarms)
        self._issuers: dict[tuple[str, str], Issuer] = {}
        self._lock = threading.Lock()

    def issuer(self, bureau: str, profile: str) -> Issuer:
        """The issuer for a bureau and profile, over this service's profiles and worker pools."""
        with self._lock:
            issuer = self._issuers.get((bureau, profile))
            if issuer is None:
                issuer = Issuer(self.profiles, bureau, profile, self.pools)
                self._issuers[(bureau, profile)] = issuer
            return issuer

    def profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            raise errors.InvalidArgument("profile", f"no card profile named {name!r}") from None

    def check_bureau(self, bureau: str, profile: Profile) -> None:
        """Every key the profile's sections need is registered and active, and the bureau is registered for every
        domain of the profile (it has an active transport key there)."""
        for domain in profile.domains:
            DomainKeys.resolve(self.registry, domain, profile, bureau)

    def check_registered(self, bureau: str, profile: Profile) -> None:
        """Only that the bureau is registered for every domain of the profile: what a station's every call
        checks, before any work, also for bundles sent from the store. This is the station's authorization, not
        the key-state check of sealing: the workers check every key a chunk needs, per chunk
        (kms.issuance.workers), the one
        place that also sees a key that changed state while a stream runs; the Issuer checks none."""
        for domain in profile.domains:
            DomainKeys.transport_key(self.registry, domain, bureau, profile.transport(domain))

    def station_batch(self, principal: Principal, batch_id: str, method: str | None = None) -> Batch:
        """The station's batch; with ``method`` (a call for cards), asking for another bureau's batch, or one that
        does not exist, also raises alarm.outside-batch."""
        if principal.role != "station":
            raise errors.PermissionDenied(f"{principal} is not a personalization station")
        try:
            batch = self.store.get_batch(batch_id)
        except errors.NotFound:  # the same answer as for another bureau's batch: no oracle of batch ids
            self.outside_batch(principal, method, batch_id)
            raise errors.PermissionDenied(f"batch {batch_id} is not authorized for {principal.bureau}") from None
        if batch.bureau != principal.bureau:
            self.outside_batch(principal, method, batch_id)
            raise errors.PermissionDenied(f"batch {batch_id} is not authorized for {principal.bureau}")
        profile = self.profile(batch.profile)
        missing = sorted(set(profile.domains) - current_domains())
        if missing:  # each key domain decides itself which stations receive its keys (kms.principals)
            raise errors.PermissionDenied(f"{principal} is not registered for the {' and '.join(missing)} domain"
                                          f"{'s' if len(missing) > 1 else ''} of batch {batch_id}")
        self.check_registered(batch.bureau, profile)
        return batch

    def outside_batch(self, principal: Principal, method: str | None, batch_id: str,
                      card_ref: str | None = None) -> None:
        """alarm.outside-batch for a call for cards (``method``) of a batch or card that is not the station's."""
        if method is not None and self.alarms is not None:
            self.alarms.outside_batch(principal, method, batch_id, card_ref)

    def issuable_batch(self, principal: Principal, batch_id: str, method: str | None = None) -> Batch:
        """A station's batch it may fetch cards of: refused before any HSM work until every domain authorized it."""
        batch = self.station_batch(principal, batch_id, method)
        if batch.state is BatchState.AWAITING:
            waiting = sorted(set(self.profile(batch.profile).domains) - set(batch.authorized_by))
            raise errors.InvalidState(f"batch {batch_id} is {batch.state.value}: the {', '.join(waiting)} domain "
                                      "has not authorized it yet")
        return batch


def _require_time(context: grpc.ServicerContext) -> None:
    if not context.is_active():
        raise errors.Cancelled("the call was cancelled")
    remaining = context.time_remaining()
    if remaining is not None and remaining < MIN_TIME_FOR_HSM_WORK:
        raise errors.DeadlineExceeded("the deadline passed before any HSM work started")


def _bundle(record: CardRecord) -> pb.SealedBundle:
    assert record.bundle is not None and record.serial is not None
    return pb.SealedBundle(card_ref=record.card_ref, serial=record.serial, data=record.bundle,
                           sequence=record.sequence)


def _bank_call(pools: DomainPools) -> BankCall:
    def call(function: Any, *args: Any) -> Any:
        pool = pools.pools.get(BANK)
        if pool is None:
            raise errors.InvalidState(f"no {BANK} HSM worker is configured here: PANs cannot be stored")
        return pool.call(function, *args)
    return call


def _complete(identity: CardIdentity, profile: Profile) -> bool:
    needed = frozenset().union(*(profile.card_fields(d) for d in profile.domains))
    return all(identity.has(f) for f in needed)


class IssuanceService(rpc.IssuanceServiceServicer):
    def __init__(self, issuance: Issuance) -> None:
        self._i = issuance

    @service_method
    def IssueCard(self, request: pb.IssueCardRequest, context: grpc.ServicerContext) -> pb.IssueCardResponse:
        principal = current_principal()
        if not request.batch_id:
            raise errors.InvalidArgument("batch_id", "is required")
        if not request.card_ref:
            raise errors.InvalidArgument("card_ref", "is required")
        if request.idempotency_key and not IDEMPOTENCY_KEY.fullmatch(request.idempotency_key):
            raise errors.InvalidArgument("idempotency_key", "must be 1 to 128 printable ASCII characters, no spaces")
        batch = self._i.issuable_batch(principal, request.batch_id, ISSUE_CARD)
        try:
            record = self._i.store.card(batch.batch_id, request.card_ref)
        except errors.NotFound:
            self._i.outside_batch(principal, ISSUE_CARD, batch.batch_id, request.card_ref)
            raise errors.PermissionDenied(
                f"card {request.card_ref} is not in batch {batch.batch_id}: it was not authorized") from None
        # A card in a blocking state (lost, cancelled, closed, replaced, retired identity) gets nothing, not even
        # its stored bundle; chip data presented is checked before it is bound.
        self._i.lifecycle.require_issuable(_with_chip(record.identity, request))
        key = request.idempotency_key or None
        if record.state is CardState.ISSUED:
            if key is not None and record.idempotency_key == key:
                if request.HasField("chip") and not _same_chip(record, request.chip):
                    raise errors.PermissionDenied(f"card {record.card_ref} was issued for another chip")
                self._i.store.record_redelivered(batch.batch_id, [(record.card_ref, record.serial or "")],
                                                 principal.uri())
                return pb.IssueCardResponse(bundle=_bundle(record))
            raise errors.AlreadyExists(f"card {record.card_ref} was already issued (bundle {record.serial}); an "
                                       "officer must re-issue it before it can be issued again")
        if request.HasField("chip"):
            record = self._i.store.bind_chip(
                batch.batch_id, record.card_ref, _field(request.chip.card_serial, "chip.card_serial"),
                _field(request.chip.kdd, "chip.kdd"), by=principal.uri())
        profile = self._i.profile(batch.profile)
        if not _complete(record.identity, profile):
            missing = sorted(f for d in profile.domains for f in profile.card_fields(d)
                             if getattr(record.identity, f) is None)
            raise errors.InvalidArgument(f"chip.{missing[0]}", "is required: the batch does not carry it")
        if self._i.quotas is not None:  # the station's and its bureau's card limits, before any HSM work
            self._i.quotas.require_card(principal, profile.domains, ISSUE_CARD)
        _require_time(context)
        issuer = self._i.issuer(batch.bureau, batch.profile)
        issued = next(iter(issuer.issue([record.identity], batch.batch_id, batch.key_versions)))
        if issued.error is not None:
            raise issued.error
        assert issued.data is not None
        # The caller may have gone while the card waited for a worker: then nothing is recorded, so the card stays
        # pending and can be asked for again (a bundle that nobody received must not count as issued).
        if not context.is_active():
            raise errors.Cancelled("the call was cancelled")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise errors.DeadlineExceeded("the deadline passed while the card was sealed; nothing was issued")
        self._i.lifecycle.require_issuable(record.identity)  # reported lost while it was sealed: not recorded
        try:
            stored = self._i.store.record_issued(batch.batch_id, record.card_ref, issued.serial, issued.data, key,
                                                 by=principal.uri(), sealed_for=record.identity)
        except errors.AlreadyExists:  # a concurrent request won the race
            stored = self._i.store.card(batch.batch_id, record.card_ref)
            if key is None or stored.idempotency_key != key:
                raise
        else:
            _count_issued(batch, profile, 1)
        return pb.IssueCardResponse(bundle=_bundle(stored))

    @service_method
    def StreamBatch(self, request: pb.StreamBatchRequest, context: grpc.ServicerContext
                    ) -> Iterator[pb.StreamBatchResponse]:
        try:
            yield from self._stream(request, context)
        except errors.Cancelled:  # the caller went away: nobody to tell, the stream just ends (the interceptor logs it)
            log.debug("stream of batch %s cancelled by the client", request.batch_id)

    def _stream(self, request: pb.StreamBatchRequest, context: grpc.ServicerContext
                ) -> Iterator[pb.StreamBatchResponse]:
        """The batch's bundles in sequence order after the cursor, ``per_message`` to a message.

        A pipeline: the domain workers seal pending cards ahead of the message being recorded and sent (each
        message's new bundles are recorded in one transaction before it is sent); cards issued earlier are sent
        from their stored bundles, so a resumed stream repeats nothing and loses nothing."""
        principal = current_principal()
        batch = self._i.issuable_batch(principal, request.batch_id, STREAM_BATCH)
        after = _cursor(request.cursor)
        per_message = request.max_bundles_per_message or DEFAULT_BUNDLES_PER_MESSAGE
        if not 1 <= per_message <= MAX_BUNDLES_PER_MESSAGE:
            raise errors.InvalidArgument("max_bundles_per_message", f"must be 0 (default) to {MAX_BUNDLES_PER_MESSAGE}")
        profile = self._i.profile(batch.profile)
        issuer = self._i.issuer(batch.bureau, batch.profile)
        _require_time(context)

        blocked: dict[str, str] = {}  # card_ref → why it must not be issued (kms.issuance.lifecycle), filled per page

        def sealable(record: CardRecord) -> bool:
            return (record.state is CardState.PENDING and record.card_ref not in blocked
                    and _complete(record.identity, profile))

        walk, feed = itertools.tee(self._records(batch.batch_id, after, blocked))

        def to_seal() -> Iterator[CardIdentity]:
            for record in feed:
                if sealable(record):
                    _require_time(context)  # no new HSM work once the caller is gone or out of time
                    if quota is not None and not quota.may_feed():
                        return  # a card limit is reached: the walk ends the stream when it comes to this card
                    yield record.identity

        # One of the station's and its bureau's streams in progress, and their card limits (kms.issuance.limits).
        quota = None if self._i.quotas is None else self._i.quotas.stream(principal, profile.domains, STREAM_BATCH)
        sealed = issuer.issue(to_seal(), batch.batch_id, batch.key_versions)
        group: list[tuple[CardRecord, IssuedBundle | None]] = []
        try:
            for record in walk:
                if record.card_ref in blocked:
                    # A pending card in a blocking state ends the stream like a failed card (the cursor stays
                    # before it); a card issued before it was blocked is not sent again, and the stream goes on.
                    if record.state is CardState.PENDING:
                        yield from self._message(batch, group, principal, quota, profile)
                        raise errors.InvalidState(blocked[record.card_ref])
                    continue
                if sealable(record):
                    issued = next(sealed, None)
                    if issued is None:  # the feed stopped at a limit: what may be sent is sent, then refused
                        assert quota is not None
                        yield from self._message(batch, group, principal, quota, profile)
                        raise quota.error()
                    if issued.error is not None:
                        # Send what came before, then end the stream with this card's error: the cursor stays
                        # before it, so a resumed stream seals it again (nothing is skipped silently).
                        yield from self._message(batch, group, principal, quota, profile)
                        raise issued.error
                    group.append((record, issued))
                elif record.state is CardState.ISSUED:
                    group.append((record, None))
                if len(group) >= per_message:
                    yield from self._message(batch, group, principal, quota, profile)
                    group = []
                    if not context.is_active():
                        raise errors.Cancelled("the call was cancelled")
            if group:
                yield from self._message(batch, group, principal, quota, profile)
        finally:
            try:
                if quota is not None:
                    quota.close()  # the stream slot is free again
            except errors.StorageUnavailable as error:  # a stream that ended as it did is not failed by this
                log.warning("stream %s: its stream slot was not given back: %s", batch.batch_id, error)
            finally:
                sealed.close()  # cancels the chunks still queued for the workers

    def _records(self, batch_id: str, after: int, blocked: dict[str, str]) -> Iterator[CardRecord]:
        while page := self._i.store.cards_after(batch_id, after, PAGE):
            blocked.update(self._i.lifecycle.blocked([r.identity for r in page if r.state is not CardState.REVOKED]))
            yield from page
            after = page[-1].sequence

    def _message(self, batch: Batch, group: list[tuple[CardRecord, IssuedBundle | None]], principal: Principal,
                 quota: StreamQuota | None, profile: Profile) -> Iterator[pb.StreamBatchResponse]:
        # A station revoked (registry or CRL) while its stream runs gets no further message (one query each).
        batch_id = batch.batch_id
        require_still_admitted(profile.domains)
        new = [(record, issued) for record, issued in group if issued is not None and issued.data is not None]
        fed, over_limit = len(new), False
        if quota is not None and new:  # one indexed query per message with new bundles (kms.issuance.limits)
            admitted = quota.admit(fed)
            if admitted < fed:  # a limit is reached: the message ends before the first card over it
                cut = new[admitted][0].sequence
                group = [entry for entry in group if entry[0].sequence < cut]
                new, over_limit = new[:admitted], True
        won = self._i.store.record_issued_many(
            batch_id, [(record.identity, issued.serial, issued.data) for record, issued in new
                       if issued.data is not None], by=principal.uri())
        if quota is not None:
            quota.recorded(sum(won), fed)
        _count_issued(batch, profile, sum(won))
        stored = {record.card_ref: issued for (record, issued), ok in zip(new, won, strict=True) if ok}
        bundles = []
        again: list[tuple[str, str]] = []  # sent before: each re-sending is recorded
        for record, _ in group:
            if record.card_ref in stored:
                fresh = stored[record.card_ref]
                bundles.append(pb.SealedBundle(card_ref=record.card_ref, serial=fresh.serial, data=fresh.data,
                                               sequence=record.sequence))
                continue
            # Issued before or meanwhile by another request: read it now, so that a bundle an officer revoked
            # since the page was read is not sent.
            current = self._i.store.card(batch_id, record.card_ref)
            if current.state is CardState.ISSUED and current.bundle is not None:
                bundles.append(_bundle(current))
                again.append((current.card_ref, current.serial or ""))
        self._i.store.record_redelivered(batch_id, again, principal.uri())
        if bundles:
            yield pb.StreamBatchResponse(bundles=bundles, cursor=str(bundles[-1].sequence))
        if over_limit:
            assert quota is not None
            raise quota.error()

    @service_method
    def GetBatchStatus(self, request: pb.GetBatchStatusRequest, context: grpc.ServicerContext
                       ) -> pb.BatchStatus:
        principal = current_principal()
        if principal.role == "station":
            batch = self._i.station_batch(principal, request.batch_id)
        else:
            batch = self._i.store.get_batch(request.batch_id)
        if principal.role == "officer" and principal.domain not in self._i.profile(batch.profile).domains:
            raise errors.PermissionDenied(f"batch {batch.batch_id} has no {principal.domain} keys")
        missing = sorted(set(self._i.profile(batch.profile).domains) - current_domains())
        if principal.role == "auditor" and missing:
            raise errors.PermissionDenied(f"{principal} is not enrolled by the {' and '.join(missing)} domain")
        return _status(batch)


class BatchService(rpc.BatchServiceServicer):
    def __init__(self, issuance: Issuance) -> None:
        self._i = issuance

    @service_method
    def CreateBatch(self, request: pb.CreateBatchRequest, context: grpc.ServicerContext) -> pb.BatchStatus:
        principal = current_principal()
        profile = self._i.profile(request.profile)
        if principal.domain not in profile.domains:
            raise errors.PermissionDenied(f"{principal} cannot authorize profile {profile.name}: it has no "
                                          f"{principal.domain} keys")
        self._i.check_bureau(request.bureau, profile)
        # Fields the profile's recipes need that a station cannot supply from the chip must be in the batch.
        needed = sorted(frozenset().union(*(profile.card_fields(d) for d in profile.domains)) - set(CHIP_FIELDS))
        cards = []
        for i, card in enumerate(request.cards):
            try:
                cards.append(CardIdentity.from_mapping(
                    {f: getattr(card, f) for f in ("card_ref", "city_code", "card_serial", "pan", "psn", "kdd")
                     if getattr(card, f)}))
            except errors.InvalidArgument as error:
                raise errors.InvalidArgument(f"cards[{i}].{error.field}", error.reason) from None
            missing = [f for f in needed if getattr(cards[-1], f) is None]
            if missing:
                raise errors.InvalidArgument(f"cards[{i}].{missing[0]}",
                                             f"is required by profile {profile.name}")
            try:
                profile.check_card(cards[-1])  # the PAN's Luhn check digit, unless the profile opts out
            except errors.InvalidArgument as error:
                raise errors.InvalidArgument(f"cards[{i}].{error.field}", error.reason) from None
        # PANs are kept only protected by the bank domain (kms.issuance.pans), bound to this batch
        cards = self._i.pans.protect(cards, request.batch_id)
        self._i.lifecycle.check_new_batch(cards)  # retired identities, replaced or cancelled cards
        batch = self._i.store.create_batch(request.batch_id, request.bureau, profile.name, cards,
                                           principal.uri())
        log.info("%s created batch %s: %d cards for %s", principal, batch.batch_id, batch.card_count,
                 batch.bureau)
        return _status(batch)

    @service_method
    def ReissueCard(self, request: pb.ReissueCardRequest, context: grpc.ServicerContext
                    ) -> pb.ReissueCardResponse:
        principal = current_principal()
        batch = self._i.store.get_batch(request.batch_id)
        domains = self._i.profile(batch.profile).domains
        if principal.domain is None or principal.domain not in domains:
            raise errors.PermissionDenied(f"batch {batch.batch_id} has no {principal.domain} keys")
        # The same keys go to a station again: every domain whose keys the card carries must consent.
        record, awaiting = self._i.store.reissue(batch.batch_id, request.card_ref, principal.uri(),
                                                 domain=principal.domain, needs=domains)
        return pb.ReissueCardResponse(card_ref=record.card_ref, state=record.state.value, awaiting=awaiting)


def _count_issued(batch: Batch, profile: Profile, cards: int) -> None:
    """kms_cards_issued_total and kms_keys_issued_total (kms.metrics): cards newly recorded issued."""
    metrics.cards_issued(batch.bureau, profile.name, cards, {d: len(profile.keys(d)) for d in profile.domains})


def _status(batch: Batch) -> pb.BatchStatus:
    return pb.BatchStatus(batch_id=batch.batch_id, bureau=batch.bureau, profile=batch.profile,
                          cards=batch.card_count, issued=batch.issued_count, state=batch.state.value,
                          created_by=batch.created_by, created_at=batch.created_at)


def _cursor(text: str) -> int:
    if not text:
        return -1
    # ASCII digits only: str.isdigit() also takes "²" or "٣", which int() refuses or reads as another number.
    if not _CURSOR.fullmatch(text):
        raise errors.InvalidArgument("cursor", "is not a cursor this server gave")
    return int(text)


def _same_chip(record: CardRecord, chip: pb.ChipData) -> bool:
    given = {"card_serial": _field(chip.card_serial, "chip.card_serial"), "kdd": _field(chip.kdd, "chip.kdd")}
    return all(value is None or getattr(record.identity, name) == value for name, value in given.items())


def _with_chip(identity: CardIdentity, request: pb.IssueCardRequest) -> CardIdentity:
    """The identity the card would have with the request's chip data, for the lifecycle check (malformed chip data
    is left to the binding step, which refuses it as before)."""
    if not request.HasField("chip"):
        return identity
    try:
        chip = {"card_serial": _field(request.chip.card_serial, "chip.card_serial"),
                "kdd": _field(request.chip.kdd, "chip.kdd")}
    except errors.InvalidArgument:
        return identity
    return dataclasses.replace(identity, card_serial=chip["card_serial"] or identity.card_serial,
                               kdd=chip["kdd"] or identity.kdd)


def _field(value: str, name: str) -> str | None:
    if not value:
        return None
    limits = {"chip.card_serial": 16, "chip.kdd": 20}
    # Checked before upper-casing: "ﬀ".upper() is "FF", so a non-ASCII character could pass as two hex digits.
    if len(value) != limits[name] or any(c not in "0123456789ABCDEFabcdef" for c in value):
        raise errors.InvalidArgument(name, f"must be {limits[name]} hex digits")
    return value.upper()


def register(issuance: Issuance) -> Callable[[grpc.Server], list[str]]:
    """A ``register`` callback for kms.server.frame.create_server."""
    def add(server: grpc.Server) -> list[str]:
        rpc.add_IssuanceServiceServicer_to_server(IssuanceService(issuance), server)  # type: ignore[no-untyped-call]
        rpc.add_BatchServiceServicer_to_server(BatchService(issuance), server)  # type: ignore[no-untyped-call]
        return [pb.DESCRIPTOR.services_by_name[n].full_name for n in ("IssuanceService", "BatchService")]
    return add
