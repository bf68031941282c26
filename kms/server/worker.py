"""`kms worker`: one domain's HSM workers, or the audit signer, as a service of its own on a Unix socket.

The service runs what ``kms serve`` would otherwise spawn (kms.issuance.workers.DomainPool, kms.audit.signer.
AuditSigner) under its own OS user, with its own configuration and PIN, and answers the front end over the internal
API of protos/kms/v1/worker.proto. That API names everything it does: sealing a chunk of cards, one of the key
operations in OPERATIONS (each argument checked here), recycling the processes, a probe. Nothing the front end sends
is run as code or looked up by name, so a front end that was taken over can ask a domain's token for nothing kms does
not do already; and a key-changing operation runs only as a step of a ceremony this worker finds approved by officers
of its own trust file (kms.ceremony.binding, ``worker.officers``), minutes are signed only when the approvals they
quote are by such officers.

The socket is created mode 0660 in a directory this user owns (created 0750 if missing; a directory others may
write to is refused), given to ``worker.socket_group`` if set: only that group (the front end's) can connect. Start-up
fails fast as ``kms serve`` does: the first worker process logs into the token once before the socket exists, and a
wrong PIN, label or module is one line naming the setting. SIGTERM drains: calls in progress finish, new ones are
refused, then the processes end and the socket is removed.

This module also holds the API's encoding both ways (the front end's side is kms.server.remote): errors as
WorkerError (a kms.errors class by name, never anything else), cards, sections and the operations' arguments.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import grp
import json
import logging
import os
import re
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kms import config as config_mod
from kms import errors, metrics, store
from kms.audit.signer import AuditSigner
from kms.cards.cardid import CardIdentity, ProtectedPan
from kms.ceremony import keyops
from kms.ceremony.binding import KEY_CHANGING, DualControl, load_trust_file
from kms.ceremony.officers import OfficerStore
from kms.ceremony.rules import MINUTES_FORMAT, QuorumPolicy
from kms.ceremony.store import Ceremonies, check_id, check_kcv
from kms.clock import Clock, SystemClock
from kms.errors import ConfigError, InvalidArgument, KmsError, PermissionDenied
from kms.files import restrict_umask
from kms.hsm.labels import key_label
from kms.hsm.types import Algorithm
from kms.identity import parse_uri
from kms.issuance import pans
from kms.issuance.workers import DomainPool, Job, Pins, SectionResult
from kms.registry import KeyKind
from kms.v1 import worker_pb2 as pb
from kms.validation import CARD_REF, NAME, rsa_public_key

log = logging.getLogger(__name__)

#: Trailing metadata of a failed call: the kms error it failed with (WorkerError, serialized).
ERROR_KEY = "kms-error-bin"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_JOBS = 1024  # cards in one SealChunk request
MAX_MINUTES_BYTES = 1024 * 1024  # a ceremony's minutes the sign operation signs
DRAIN_SECONDS = 30.0
AT_SKEW_SECONDS = 120  # a checkpoint's or seal's time, as the front end gives it, against the audit signer's clock
_RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
#: The domain worker services' and the audit worker's gRPC service names (health).
DOMAIN_SERVICE = pb.DESCRIPTOR.services_by_name["DomainWorker"].full_name
AUDIT_SERVICE = pb.DESCRIPTOR.services_by_name["AuditSignerWorker"].full_name


# -- errors ---------------------------------------------------------------------------------------------------------


def error_message(error: KmsError) -> pb.WorkerError:
    return pb.WorkerError(kind=type(error).__name__, message=str(error), retryable=error.retryable,
                          **{k: getattr(error, k) for k in errors.CARRIED if isinstance(getattr(error, k, None), str)})


def error_from(message: pb.WorkerError) -> KmsError:
    attributes = {k: getattr(message, k) for k in errors.CARRIED}
    return errors.rebuilt(message.kind, message.message, message.retryable, attributes)


def _abort(context: grpc.ServicerContext, error: BaseException) -> NoReturn:
    """End the call with the error's status, and the error itself in the trailing metadata; an unexpected error is
    INTERNAL "see the worker's log", its traceback logged here."""
    if not isinstance(error, KmsError):
        log.error("unexpected error in a worker call", exc_info=error)
        error = KmsError("internal error in the worker service; see its log")
    context.set_trailing_metadata(((ERROR_KEY, error_message(error).SerializeToString()),))
    context.abort(grpc.StatusCode[errors.grpc_status_name(error)], str(error))
    raise AssertionError("unreachable: grpc's context.abort raises")


def _parsed(parse: Callable[[bytes], Any], behavior: Callable[[Any, grpc.ServicerContext], Any]
            ) -> Callable[[bytes, grpc.ServicerContext], Any]:
    """A handler that gets the request's bytes: what cannot be parsed ends INVALID_ARGUMENT (grpcio itself would end
    it INTERNAL), and every error ends the call through ``_abort``."""
    def handler(data: bytes, context: grpc.ServicerContext) -> Any:
        try:
            try:
                request = parse(data)
            except Exception:  # DecodeError, or whatever else the bytes make the parser raise
                raise InvalidArgument("request", "cannot be parsed") from None
            return behavior(request, context)
        except Exception as error:
            _abort(context, error)
    return handler


def _service(name: str, methods: dict[str, tuple[type[Any], Callable[[Any, grpc.ServicerContext], Any]]]
             ) -> grpc.GenericRpcHandler:
    handlers = {method: grpc.unary_unary_rpc_method_handler(
        _parsed(request.FromString, behavior), request_deserializer=None,
        response_serializer=lambda message: message.SerializeToString())
        for method, (request, behavior) in methods.items()}
    return grpc.method_handlers_generic_handler(name, handlers)


# -- cards and sections ---------------------------------------------------------------------------------------------


def job_message(job: Job) -> pb.Job:
    card = job.card
    protected = card.protected
    fields = {name: getattr(card, name) for name in ("city_code", "card_serial", "pan", "psn", "kdd")
              if getattr(card, name) is not None}
    return pb.Job(serial=job.serial, card=pb.CardFields(
        card_ref=card.card_ref, **fields,
        protected=pb.ProtectedPan(sealed=protected.sealed, index=protected.index,
                                  pan_psn_index=protected.pan_psn_index, masked=protected.masked)
        if protected is not None else None))


def job_from(message: pb.Job) -> Job:
    card = message.card
    if not CARD_REF.fullmatch(message.serial):
        raise InvalidArgument("jobs.serial", "must be a bundle serial")
    fields = {name: getattr(card, name) for name in ("city_code", "card_serial", "pan", "psn", "kdd")
              if card.HasField(name)}
    protected = ProtectedPan(sealed=card.protected.sealed, index=card.protected.index,
                             pan_psn_index=card.protected.pan_psn_index, masked=card.protected.masked) \
        if card.HasField("protected") else None
    return Job(CardIdentity(card_ref=card.card_ref, protected=protected, **fields), message.serial)


def section_message(result: SectionResult) -> pb.Section:
    if result.error is not None:
        return pb.Section(card_ref=result.card_ref, serial=result.serial, error=error_message(result.error),
                          worker=result.worker, seconds=result.seconds)
    return pb.Section(card_ref=result.card_ref, serial=result.serial, section=result.section or b"",
                      worker=result.worker, seconds=result.seconds)


def section_from(message: pb.Section) -> SectionResult:
    if message.WhichOneof("outcome") == "error":
        return SectionResult(message.card_ref, message.serial, None, error_from(message.error), message.worker,
                             message.seconds)
    return SectionResult(message.card_ref, message.serial, message.section, None, message.worker, message.seconds)


def calls_message(calls: Sequence[metrics.HsmCall]) -> pb.HsmCalls:
    return pb.HsmCalls(verb=[c[0] for c in calls], seconds=[c[1] for c in calls], error=[c[2] for c in calls])


def calls_from(message: pb.HsmCalls) -> tuple[metrics.HsmCall, ...]:
    return tuple(zip(message.verb, message.seconds, message.error, strict=True))


def pins_from(message: Sequence[pb.KeyVersion]) -> Pins:
    pinned = {}
    for pin in message:
        if not NAME.fullmatch(pin.name) or pin.version < 1 or pin.name in pinned:
            raise InvalidArgument("pins", "must name each master key once, with a version from 1")
        pinned[pin.name] = int(pin.version)
    return tuple(sorted(pinned.items()))


# -- the named key operations ---------------------------------------------------------------------------------------


def _name(value: str, field: str) -> str:
    if not NAME.fullmatch(value):
        raise InvalidArgument(field, "must be a name (lowercase letters, digits, . _ -)")
    return value


def _choice(value: str, allowed: Sequence[str], field: str) -> str:
    if value not in allowed:
        raise InvalidArgument(field, f"must be one of {', '.join(allowed)}")
    return value


def _version(value: int, field: str) -> int:
    if value < 1:
        raise InvalidArgument(field, "must be a version from 1")
    return int(value)


def _uri(value: str, field: str) -> str:
    try:
        parse_uri(value)
    except KmsError:
        raise InvalidArgument(field, "must be a principal's URI") from None
    return value


_KINDS = tuple(k.value for k in KeyKind)
_ALGORITHMS = tuple(a.value for a in Algorithm)
_TRANSPORT_ALGORITHMS = (Algorithm.AES256.value, Algorithm.SM4.value)


def _key_message(result: dict[str, Any]) -> pb.KeyResult:
    return pb.KeyResult(label=result["label"], version=result["version"], state=result["state"], kcv=result["kcv"],
                        kcv_method=result["kcv_method"], escrow=result["escrow"])


def _key_from(message: pb.KeyResult) -> dict[str, Any]:
    return {"label": message.label, "version": message.version, "state": message.state, "kcv": message.kcv,
            "kcv_method": message.kcv_method, "escrow": message.escrow}


def _components(message: Sequence[pb.KeyComponent], field: str) -> list[tuple[str, bytes, str]]:
    return [(_uri(c.custodian, f"{field}.custodian"), c.sealed, check_kcv(c.kcv, f"{field}.kcv")) for c in message]


@dataclass(frozen=True)
class Operation:
    """One key operation a domain's worker runs for the front end: the function it runs (nothing else can be run),
    the request's field (``KeyOperationRequest.operation``), and the encoding of its arguments and result both ways.
    ``arguments`` checks every argument in the worker, before the function sees it."""

    field: str
    function: Callable[..., Any]
    request: Callable[..., Any]  # front end: the call's arguments -> the operation's message
    arguments: Callable[[Any, str], tuple[Any, ...]]  # worker: (message, its domain) -> the arguments
    result: Callable[[Any], pb.KeyOperationResponse]  # worker: the function's result -> the response
    value: Callable[[pb.KeyOperationResponse], Any]  # front end: the response -> the result


def _check_component(m: pb.CheckComponent, domain: str) -> tuple[Any, ...]:
    if not m.sealed or len(m.sealed) > 1024:
        raise InvalidArgument("encrypted_component", "must be 1 to 1024 bytes")
    return _choice(m.algorithm, _ALGORITHMS, "algorithm"), m.sealed, check_kcv(m.kcv)


def _sign(m: pb.SignDocument, domain: str) -> tuple[Any, ...]:
    """Only ceremony minutes of this domain, with one of its signing keys: the key also signs the sections of
    bundles, so a front end must not have it sign anything else."""
    if not m.label.startswith(f"kms/{domain}/{KeyKind.SIGNING.value}/"):
        raise InvalidArgument("label", f"must be a {domain} signing key")
    if len(m.message) > MAX_MINUTES_BYTES:
        raise InvalidArgument("message", f"at most {MAX_MINUTES_BYTES} bytes")
    try:
        document = json.loads(m.message)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
        document = None
    if not isinstance(document, dict) or document.get("format") != MINUTES_FORMAT or document.get("domain") != domain:
        raise InvalidArgument("message", f"is not the minutes of a {domain} ceremony")
    return m.label, m.message


def _transport_for_rsa(m: pb.TransportKeyForRsa, domain: str) -> tuple[Any, ...]:
    rsa_public_key(m.recipient_spki, "recipient_spki")  # checked before the request goes further
    return (_name(m.bureau, "bureau"), m.recipient_spki,
            _choice(m.algorithm or Algorithm.AES256.value, _TRANSPORT_ALGORITHMS, "algorithm"))


def _create(m: pb.CreateKey, domain: str) -> tuple[Any, ...]:
    return (_choice(m.kind, (KeyKind.MASTER.value, KeyKind.TRANSPORT.value), "kind"), _name(m.name, "name"),
            _choice(m.algorithm, _ALGORITHMS, "algorithm"), m.escrow,
            check_kcv(m.expected_kcv, "expected_kcv") if m.HasField("expected_kcv") else None,
            _components(m.sealed, "sealed"), m.activate)


def _export(m: pb.ExportComponents, domain: str) -> tuple[Any, ...]:
    if not m.recipients:
        raise InvalidArgument("recipients", "at least one is needed")
    return (_choice(m.kind, _KINDS, "kind"), _name(m.name, "name"), _version(m.version, "version"),
            [(_uri(r.uri, "recipients.uri"), r.public_key_pem) for r in m.recipients],
            check_id(m.ceremony_id))


def _key_ref(m: pb.KeyRef, domain: str) -> tuple[Any, ...]:
    kind, name, version = _choice(m.kind, _KINDS, "kind"), _name(m.name, "name"), _version(m.version, "version")
    key_label(domain, kind, name, version)
    return kind, name, version


def _generate_signing(m: pb.GenerateSigningKey, domain: str) -> tuple[Any, ...]:
    return _name(m.name, "name"), _choice(m.algorithm, tuple(keyops.SIGNING_ALGORITHMS), "algorithm")


def _signing_message(made: dict[str, Any]) -> pb.KeyOperationResponse:
    return pb.KeyOperationResponse(signing_key=pb.SigningKey(
        label=made["label"], version=made["version"], state=made["state"], algorithm=made["algorithm"],
        public_key=made["public_key"]))


def _signing_from(r: pb.KeyOperationResponse) -> dict[str, Any]:
    made = r.signing_key
    return {"label": made.label, "version": made.version, "state": made.state, "algorithm": made.algorithm,
            "public_key": made.public_key}


#: PANs in one protect_pans call: the front end sends them a chunk at a time (kms.issuance.pans.PanVault).
MAX_PANS_PER_CALL = pans.MAX_PANS_PER_CALL


class PanQuota:
    """The PANs this worker service protects in a sliding hour (``worker.pan_quota_per_hour``). Every protected PAN
    gives the caller its keyed index, and the cards table keeps the index beside the masked PAN (first 6, last 4
    digits): a front end that was taken over could look for a stored PAN among its ~10^5 Luhn-valid candidates. The
    quota bounds that search; beyond it, protect_pans is refused and a security alarm is logged."""

    WINDOW = 3600.0

    def __init__(self, per_hour: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_hour = per_hour
        self._clock = clock
        self._spent: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0
        self._lock = threading.Lock()

    def take(self, count: int, batch_id: str) -> None:
        with self._lock:
            now = self._clock()
            while self._spent and self._spent[0][0] <= now - self.WINDOW:
                self._total -= self._spent.popleft()[1]
            if self._total + count > self.per_hour:
                log.critical("SECURITY ALARM: protect_pans refused: %d PANs asked for batch %s, %d protected in the "
                             "last hour, worker.pan_quota_per_hour is %d (a front end looking up candidate PANs?)",
                             count, batch_id, self._total, self.per_hour)
                raise errors.ResourceExhausted(
                    f"this worker service protected {self._total} PANs in the last hour; {count} more would exceed "
                    f"worker.pan_quota_per_hour ({self.per_hour})", limit="worker.pan_quota_per_hour")
            self._spent.append((now, count))
            self._total += count


#: This worker service's quota (a worker service is a process of its own; WorkerService sets it from its config).
PAN_QUOTA = PanQuota(config_mod.DEFAULT_PAN_QUOTA_PER_HOUR)


def _protect(m: pb.ProtectPans, domain: str) -> tuple[Any, ...]:
    if not m.batch_id or not CARD_REF.fullmatch(m.batch_id):
        raise InvalidArgument("batch_id", "must be a batch id")
    if not 1 <= len(m.items) <= MAX_PANS_PER_CALL:
        raise InvalidArgument("items", f"1 to {MAX_PANS_PER_CALL} PANs in one call")
    items = []
    for item in m.items:
        card = CardIdentity(card_ref=item.card_ref, pan=item.pan, psn=item.psn or None)  # checks each field
        items.append((card.card_ref, item.pan, item.psn))
    PAN_QUOTA.take(len(items), m.batch_id)
    return m.batch_id, items


OPERATIONS: tuple[Operation, ...] = (
    Operation("check_component", keyops.check_component,
              lambda algorithm, sealed, kcv: pb.CheckComponent(algorithm=algorithm, sealed=sealed, kcv=kcv),
              _check_component, lambda _: pb.KeyOperationResponse(done=pb.Done()), lambda _: None),
    Operation("sign", keyops.sign, lambda label, message: pb.SignDocument(label=label, message=message), _sign,
              lambda signature: pb.KeyOperationResponse(signature=signature), lambda r: r.signature),
    Operation("create_key", keyops.create_key,
              lambda kind, name, algorithm, escrow, expected_kcv=None, sealed=(), activate=True: pb.CreateKey(
                  kind=kind, name=name, algorithm=algorithm, escrow=escrow, expected_kcv=expected_kcv,
                  sealed=[pb.KeyComponent(custodian=u, sealed=s, kcv=k) for u, s, k in sealed], activate=activate),
              _create, lambda made: pb.KeyOperationResponse(key=_key_message(made)), lambda r: _key_from(r.key)),
    Operation("export_components", keyops.export_components,
              lambda kind, name, version, recipients, ceremony_id: pb.ExportComponents(
                  kind=kind, name=name, version=version, ceremony_id=ceremony_id,
                  recipients=[pb.Recipient(uri=u, public_key_pem=p) for u, p in recipients]),
              _export, lambda made: pb.KeyOperationResponse(components=pb.Components(components=[
                  pb.KeyComponent(custodian=u, sealed=s, kcv=k) for u, s, k in made])),
              lambda r: [(c.custodian, c.sealed, c.kcv) for c in r.components.components]),
    Operation("transport_key_for_rsa", keyops.transport_key_for_rsa,
              lambda bureau, spki, algorithm=Algorithm.AES256.value: pb.TransportKeyForRsa(
                  bureau=bureau, recipient_spki=spki, algorithm=algorithm),
              _transport_for_rsa,
              lambda made: pb.KeyOperationResponse(handed=pb.HandedKey(key=_key_message(made[0]), wrapped=made[1])),
              lambda r: (_key_from(r.handed.key), r.handed.wrapped)),
    Operation("discard_key", keyops.discard_key,
              lambda kind, name, version: pb.KeyRef(kind=kind, name=name, version=version), _key_ref,
              lambda _: pb.KeyOperationResponse(done=pb.Done()), lambda _: None),
    Operation("destroy_key", keyops.destroy_key,
              lambda kind, name, version: pb.KeyRef(kind=kind, name=name, version=version), _key_ref,
              lambda made: pb.KeyOperationResponse(key=_key_message(made)), lambda r: _key_from(r.key)),
    Operation("protect_pans", pans.protect_pans,
              lambda batch_id, items: pb.ProtectPans(batch_id=batch_id, items=[
                  pb.PanItem(card_ref=c, pan=p, psn=s) for c, p, s in items]),
              _protect, lambda made: pb.KeyOperationResponse(pans=pb.ProtectedPans(pans=[
                  pb.ProtectedPan(sealed=s, index=i, pan_psn_index=j) for s, i, j in made])),
              lambda r: [(p.sealed, p.index, p.pan_psn_index) for p in r.pans.pans]),
    Operation("generate_signing_key", keyops.generate_signing_key,
              lambda name, algorithm: pb.GenerateSigningKey(name=name, algorithm=algorithm), _generate_signing,
              _signing_message, _signing_from),
    Operation("signature_algorithms", keyops.signature_algorithms, lambda: pb.SignatureAlgorithmsRequest(),
              lambda m, domain: (),
              lambda offered: pb.KeyOperationResponse(algorithms=pb.SignatureAlgorithms(algorithms=offered)),
              lambda r: list(r.algorithms.algorithms)),
)
BY_FIELD = {op.field: op for op in OPERATIONS}


def operation_for(function: Callable[..., Any]) -> Operation:
    """The front end's side: the operation that runs ``function`` (InvalidState for any other function)."""
    for op in OPERATIONS:
        if op.function is function:
            return op
    name = f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', '')}"
    raise errors.InvalidState(f"{name} is not an operation a worker service runs")


# -- the services ---------------------------------------------------------------------------------------------------


class DomainWorker:
    """The DomainWorker service over one domain's pool of worker processes. Key-changing operations run only as a
    step of a ceremony ``dual_control`` finds approved (kms.ceremony.binding); without it (tests of the API alone)
    every key-changing operation is refused."""

    def __init__(self, pool: DomainPool, dual_control: DualControl | None = None) -> None:
        self.pool = pool
        self.dual_control = dual_control

    def handlers(self) -> grpc.GenericRpcHandler:
        return _service(DOMAIN_SERVICE, {
            "SealChunk": (pb.SealChunkRequest, self.seal_chunk),
            "KeyOperation": (pb.KeyOperationRequest, self.key_operation),
            "Recycle": (pb.RecycleRequest, self.recycle),
            "Probe": (pb.ProbeRequest, self.probe),
        })

    def seal_chunk(self, request: pb.SealChunkRequest, context: grpc.ServicerContext) -> pb.SealChunkResponse:
        if len(request.jobs) > MAX_JOBS:
            raise InvalidArgument("jobs", f"at most {MAX_JOBS} cards in one chunk")
        for name, value in (("batch", request.batch), ("bureau", request.bureau), ("profile", request.profile)):
            if not (CARD_REF if name == "batch" else NAME).fullmatch(value):
                raise InvalidArgument(name, "is missing or malformed")
        jobs = [job_from(job) for job in request.jobs]
        pins = pins_from(request.pins)
        results = list(self.pool.seal(jobs, request.batch, request.bureau, request.profile, pins))
        calls = [call for result in results for call in result.hsm_calls]
        return pb.SealChunkResponse(sections=[section_message(r) for r in results], hsm_calls=calls_message(calls))

    def key_operation(self, request: pb.KeyOperationRequest, context: grpc.ServicerContext
                      ) -> pb.KeyOperationResponse:
        field = request.WhichOneof("operation")
        op = BY_FIELD.get(field or "")
        if op is None:
            raise InvalidArgument("operation", f"must be one of {', '.join(BY_FIELD)}")
        arguments = op.arguments(getattr(request, op.field), self.pool.domain)
        if op.field == "sign":  # minutes quoting only approvals by officers this worker trusts
            try:
                if self.dual_control is None:
                    raise PermissionDenied("this worker checks no ceremony: it signs no minutes")
                self.dual_control.check_minutes(arguments[1])
            except PermissionDenied as error:
                log.warning("refused to sign minutes: %s", error)
                raise
        if op.field not in KEY_CHANGING:
            return op.result(self.pool.call(op.function, *arguments))
        try:
            if request.ceremony_id:
                check_id(request.ceremony_id)
            if self.dual_control is None:
                raise PermissionDenied("this worker checks no ceremony: it runs no key-changing step")
            result = self.dual_control.run(request.ceremony_id, op.field, arguments,
                                           lambda: self.pool.call(op.function, *arguments))
        except (PermissionDenied, InvalidArgument) as error:
            log.warning("refused a key operation: %s", error)
            raise
        log.info("%s ran for ceremony %s", op.field, request.ceremony_id)
        return op.result(result)

    def recycle(self, request: pb.RecycleRequest, context: grpc.ServicerContext) -> pb.RecycleResponse:
        self.pool.recycle()
        return pb.RecycleResponse()

    def probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        timeout = request.timeout_seconds if 0 < request.timeout_seconds <= 300 else 30.0
        failing = self.pool.probe(timeout)
        return pb.ProbeResponse(serves=self.pool.domain, failing=failing or "", refused=self.pool.refused is not None,
                                processes=self.pool.processes, restarts=self.pool.restarts, pids=self.pool.pids())


class AuditSignerWorker:
    """The AuditSignerWorker service over the audit signer's process."""

    def __init__(self, signer: AuditSigner, clock: Clock | None = None) -> None:
        self.signer = signer
        self._clock: Clock = clock or SystemClock()

    def handlers(self) -> grpc.GenericRpcHandler:
        return _service(AUDIT_SERVICE, {
            "SignedHead": (pb.SignedHeadRequest, self.signed_head),
            "SignCheckpoint": (pb.SignCheckpointRequest, self.sign_checkpoint),
            "SignSeal": (pb.SignSealRequest, self.sign_seal),
            "Probe": (pb.ProbeRequest, self.probe),
        })

    def signed_head(self, request: pb.SignedHeadRequest, context: grpc.ServicerContext) -> pb.SignedHeadResponse:
        size, head = self.signer.signed_head()
        return pb.SignedHeadResponse(size=size, head=head)

    def _checked(self, size: int, head: str, at: str, digests: Sequence[bytes]) -> None:
        if size < 0:
            raise InvalidArgument("size", "must not be negative")
        if len(head) != 64 or any(c not in "0123456789abcdef" for c in head):
            raise InvalidArgument("head", "must be 64 lowercase hex digits")
        # The time is signed into the checkpoint: the signer's own clock vouches for it, not the front end's word.
        try:
            if not _RFC3339_UTC.fullmatch(at):
                raise ValueError(at)
            moment = dt.datetime.strptime(at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        except ValueError:
            raise InvalidArgument("at", "must be an RFC 3339 UTC time (YYYY-MM-DDTHH:MM:SSZ)") from None
        skew = abs((moment - self._clock.now()).total_seconds())
        if skew > AT_SKEW_SECONDS:
            raise InvalidArgument("at", f"is {skew:.0f} s away from the audit signer's clock (at most "
                                        f"{AT_SKEW_SECONDS} s)")
        if any(len(d) != 32 for d in digests):
            raise InvalidArgument("digests", "must be SHA-256 digests")

    def _base(self, request: pb.SignCheckpointRequest | pb.SignSealRequest) -> tuple[int, str] | None:
        """The signed head the request's digests start from (compare and swap), None from an older front end."""
        if not request.HasField("base"):
            return None
        if request.base.size < 0:
            raise InvalidArgument("base.size", "must not be negative")
        if len(request.base.head) != 64 or any(c not in "0123456789abcdef" for c in request.base.head):
            raise InvalidArgument("base.head", "must be 64 lowercase hex digits")
        return int(request.base.size), str(request.base.head)

    def sign_checkpoint(self, request: pb.SignCheckpointRequest, context: grpc.ServicerContext) -> pb.Signature:
        self._checked(request.size, request.head, request.at, request.digests)
        return pb.Signature(signature=self.signer.sign(request.size, request.head, request.at, list(request.digests),
                                                       self._base(request)))

    def sign_seal(self, request: pb.SignSealRequest, context: grpc.ServicerContext) -> pb.Signature:
        self._checked(request.size, request.head, request.at, request.digests)
        return pb.Signature(signature=self.signer.seal(request.size, request.head, request.at, request.nonce,
                                                       dict(request.filters), list(request.digests),
                                                       self._base(request)))

    def probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        timeout = request.timeout_seconds if 0 < request.timeout_seconds <= 300 else 30.0
        failing = self.signer.check(timeout)
        if failing is not None and self.signer.supervise():  # a dead signer process: replaced, checked again
            failing = self.signer.check(timeout)
        return pb.ProbeResponse(serves="audit", failing=failing or "", refused=self.signer.refused is not None,
                                processes=1, restarts=self.signer.restarts, pids=self.signer.pids())


# -- the socket -----------------------------------------------------------------------------------------------------


def prepare_socket(listen: str, gid: int | None = None, setting: str = "worker.listen") -> Path:
    """The socket's path, ready to bind: its directory exists (made 0750 if missing, given to group ``gid`` if one),
    is a real directory (not a symbolic link) owned by this user and writable by no one else (neither its group nor
    others: the recommended setgid 2710 layout of kms.dev.separation is fine); no other worker listens there (a
    socket left by one that ended is removed). The directory is changed through a descriptor, never by its path.
    ConfigError naming ``setting`` otherwise."""
    path = Path(listen[len("unix:"):])
    directory = path.parent
    made = False
    try:
        directory.mkdir(mode=0o700)
        made = True
    except FileExistsError:
        pass
    except OSError as error:
        raise ConfigError(f"{setting} {listen}: cannot make {directory} ({error.strerror})") from None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as error:
        raise ConfigError(f"{setting} {listen}: {directory} is not a directory of its own (a symbolic link, or "
                          f"{error.strerror})") from None
    try:
        if made:
            try:
                if gid is not None:
                    os.fchown(fd, -1, gid)
                os.fchmod(fd, 0o750)  # the front end's group must reach the socket inside
            except OSError as error:
                raise ConfigError(f"{setting} {listen}: cannot make {directory} ({error.strerror})") from None
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if info.st_uid != os.geteuid():
        raise ConfigError(f"{setting} {listen}: {directory} is not owned by this worker's user (uid {os.geteuid()})")
    if info.st_mode & stat.S_IWOTH:
        raise ConfigError(f"{setting} {listen}: {directory} is writable by every user; give the socket a directory "
                          "of its own")
    if info.st_mode & stat.S_IWGRP:
        raise ConfigError(f"{setting} {listen}: {directory} is writable by its group; give the socket a directory "
                          "only this worker's user may write (e.g. mode 2710, group the front end's)")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"{setting} {listen}: {path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # left by a worker that ended
            else:
                raise ConfigError(f"{setting} {listen}: another process listens there")
    return path


#: The umask the socket is bound under: it is made 0660 at once, never chmod-ed by its path afterwards.
SOCKET_UMASK = 0o117


def group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"worker.socket_group: no group named {group!r}") from None


def secure_socket(path: Path, group: str | None) -> None:
    """The bound socket (made 0660 by binding it under ``SOCKET_UMASK``) given to ``group`` without following a
    symbolic link; then checked by lstat: a socket of this user's, mode 0660, of that group."""
    gid = group_id(group) if group is not None else None
    info = path.lstat()
    if gid is not None and info.st_gid != gid:  # a setgid directory of that group gave it already
        try:
            os.chown(path, -1, gid, follow_symlinks=False)
        except OSError as error:
            raise ConfigError(f"worker.socket_group {group}: cannot give the socket to it ({error.strerror})") \
                from None
        info = path.lstat()
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) != 0o660 or (
            gid is not None and info.st_gid != gid):
        raise ConfigError(f"worker.listen unix:{path}: the socket is not what this worker bound (mode "
                          f"{stat.S_IMODE(info.st_mode):o}, uid {info.st_uid}, gid {info.st_gid})")


def dual_control_for(cfg: config_mod.Config, domain: str) -> DualControl:
    """The worker's own check of ceremonies (kms.ceremony.binding): the registry database it is configured with, the
    quorum policy shipped with kms, the officers of ``worker.officers`` (checked now, so a bad file fails the start;
    without the setting every key-changing operation is refused, and the log says so)."""
    clock = SystemClock()
    engine = store.make_engine(cfg.database)
    # The schema current (else one line naming `kms db upgrade`). A worker never creates it, even in an empty
    # database: with a PostgreSQL role per domain (docs/deployment.md) that role would own every table; `kms init`,
    # `kms serve` or the owner's `kms db upgrade` creates it.
    store.require_current(engine, config=cfg.path)
    officers = OfficerStore(engine, clock)
    trust = cfg.worker.officers if cfg.worker is not None else None
    checker = DualControl(domain, Ceremonies(engine, clock, QuorumPolicy.load(), officers), officers, trust, clock,
                          journal=cfg.path.parent / f"dual-control-{domain}.journal")
    if trust is None:
        log.warning("%s: worker.officers is not set: this %s worker runs no key-changing ceremony step",
                    cfg.path, domain)
    else:
        load_trust_file(trust, domain)
    return checker


class WorkerService:
    """A started worker service: its pool (or signer) logged in, its server listening on the socket."""

    def __init__(self, config_path: Path, *, domain: str | None = None, audit: bool = False,
                 listen: str | None = None) -> None:
        if (domain is None) == (not audit):
            raise ConfigError("kms worker: give --domain or --audit")
        cfg = config_mod.load(config_path)
        self.serves = domain or "audit"
        if domain is not None:
            if domain not in cfg.domains:
                raise ConfigError(f"{cfg.path}: domains.{domain} is not configured")
            if cfg.domains[domain].pin is None:
                raise ConfigError(f"{cfg.path}: domains.{domain}.pin is not set: the {domain} worker reads its PIN")
        elif cfg.audit is None:
            raise ConfigError(f"{cfg.path}: no 'audit' section")
        elif cfg.audit.pin is None:
            raise ConfigError(f"{cfg.path}: audit.pin is not set: the audit worker reads its PIN")
        if listen is not None:
            if not listen.startswith("unix:") or len(listen) == len("unix:"):
                raise ConfigError("--listen must be unix:PATH (a Unix socket)")
            listen = f"unix:{Path(listen[len('unix:'):]).absolute()}"
            if len(listen.encode()) - len("unix:") > 107:
                raise ConfigError("--listen: the socket path is longer than 107 bytes")
        elif cfg.worker is not None:
            listen = cfg.worker.listen
        if listen is None:
            raise ConfigError(f"{cfg.path}: worker.listen is not set (or give --listen unix:PATH)")
        self.listen = listen
        group = cfg.worker.socket_group if cfg.worker is not None else None
        PAN_QUOTA.per_hour = cfg.worker.pan_quota_per_hour if cfg.worker is not None else \
            config_mod.DEFAULT_PAN_QUOTA_PER_HOUR
        gid = group_id(group) if group is not None else None  # before any login
        self.socket = prepare_socket(listen, gid)
        self.health = health.HealthServicer()
        self.pool: DomainPool | None = None
        self.signer: AuditSigner | None = None
        if domain is not None:
            dual_control = dual_control_for(cfg, domain)
            self.pool = DomainPool(cfg.path, domain)
            self.pool.start()  # fail fast: one login, the error naming the setting
            handlers, name, processes = (DomainWorker(self.pool, dual_control).handlers(), DOMAIN_SERVICE,
                                         self.pool.processes)
        else:
            self.signer = AuditSigner(cfg.path)  # started: one login
            handlers, name, processes = AuditSignerWorker(self.signer).handlers(), AUDIT_SERVICE, 1
        try:
            # Threads: the front end keeps 4 chunks per process in flight for each of its streams.
            self.server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=min(256, 32 + 32 * processes), thread_name_prefix="kms-wrk"),
                handlers=[handlers],
                options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                         ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
            for service in ("", name):
                self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
            previous = os.umask(SOCKET_UMASK)  # the socket is created 0660: no chmod by its path afterwards
            try:
                port = self.server.add_insecure_port(listen)
            except RuntimeError:
                port = 0
            finally:
                os.umask(previous)
            if port == 0:
                raise ConfigError(f"worker.listen {listen}: cannot listen there")
            try:
                secure_socket(self.socket, group)
            except BaseException:
                self.server.stop(None)
                self.socket.unlink(missing_ok=True)
                raise
            self.server.start()
        except BaseException:
            self._end_processes(wait=False)
            raise
        self._stopped = False

    def _end_processes(self, wait: bool) -> None:
        if self.pool is not None:
            self.pool.close() if wait else self.pool.terminate()
        if self.signer is not None:
            self.signer.close()

    def stop(self, grace: float = DRAIN_SECONDS) -> None:
        """Drain: NOT_SERVING, no new call, calls in progress finish within ``grace``; then the processes end and the
        socket is removed."""
        if self._stopped:
            return
        self._stopped = True
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self._end_processes(wait=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


def run(config_path: Path, *, domain: str | None = None, audit: bool = False, listen: str | None = None,
        ready: Callable[[WorkerService], Any] = lambda service: None) -> None:
    """Serve until SIGINT or SIGTERM, then drain."""
    restrict_umask()
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    service = WorkerService(config_path, domain=domain, audit=audit, listen=listen)
    ready(service)
    stopping.wait()
    log.info("stopping: draining for up to %s s", DRAIN_SECONDS)
    service.stop()

