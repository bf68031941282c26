"""The ceremony service (kms.v1.CeremonyService): officers propose, approve, send components, execute, cancel and
read minutes of their own domain's ceremonies (docs/ceremonies.md). Auditors read ceremonies and minutes.

The caller's domain is their certificate's; an officer never sees or touches another domain's ceremonies (a
ceremony of the other domain reads as not found, so its existence is not disclosed).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from kms import errors
from kms.canonical import canonical
from kms.ceremony import keyops, operations
from kms.ceremony.operations import Context
from kms.ceremony.rules import MINUTES_FORMAT
from kms.ceremony.store import Ceremonies, CeremonyRecord, CeremonyState, check_id
from kms.clock import Clock, rfc3339
from kms.hsm.errors import UNDECRYPTABLE
from kms.identity import Principal
from kms.issuance.sealer import SIGNING_KEY_NAME
from kms.registry import DOMAINS, KeyKind, check_domain
from kms.server.frame import current_domains, current_principal, service_method
from kms.v1 import ceremony_pb2 as pb
from kms.v1 import ceremony_pb2_grpc as rpc

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_PARAMS_CHARS = 64 * 1024  # the largest parameters (a PEM certificate or RSA key) are a few KiB
MAX_PARAMS_DEPTH = 8  # parameters nest two levels deep (authorize-batch's master_keys)
MAX_PARAMS_DIGITS = 64  # an integer longer than this is no parameter (and int() of 4,300 digits fails)
_JSON_SPECIAL = re.compile(r'["\\\[\]{}]')


def parse_params(text: str) -> dict[str, Any]:
    """``params_json`` as canonical JSON (kms.canonical) holds it: an object of strings, integers, lists
    and objects, of bounded size and depth, no key twice. Anything else is refused naming ``params_json`` before
    any operation sees it (``json`` alone recurses without bound, reads NaN, floats, true, false and null)."""
    if not text:
        return {}
    if len(text) > MAX_PARAMS_CHARS:
        raise errors.InvalidArgument("params_json", f"is longer than {MAX_PARAMS_CHARS} characters")
    if _depth(text) > MAX_PARAMS_DEPTH:
        raise errors.InvalidArgument("params_json", f"nests deeper than {MAX_PARAMS_DEPTH} levels")
    try:
        params = json.loads(text, object_pairs_hook=_unique_keys, parse_int=_bounded_int, parse_float=_no_float,
                            parse_constant=_no_float)
    except json.JSONDecodeError:
        raise errors.InvalidArgument("params_json", "is not JSON") from None
    if not isinstance(params, dict):
        raise errors.InvalidArgument("params_json", "must be a JSON object")
    try:
        canonical(params)
    except (TypeError, ValueError):  # true, false, null; a string with a lone surrogate (\ud800) is no UTF-8
        raise errors.InvalidArgument("params_json", "may hold only strings, integers, lists and objects "
                                                    "(no true, false, null or unpaired surrogates)") from None
    return params


def _depth(text: str) -> int:
    """How deep brackets outside strings nest (one pass over the quotes, backslashes and brackets), stopping once
    past the limit: checked before parsing, which would recurse once per level."""
    depth = deepest = 0
    in_string, escaped_at = False, -2
    for special in _JSON_SPECIAL.finditer(text):
        char, at = special.group(), special.start()
        if in_string:
            if at == escaped_at + 1:
                continue  # the character a backslash escapes
            if char == "\\":
                escaped_at = at
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_PARAMS_DEPTH:
                break
        elif char in "]}":
            depth -= 1
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise errors.InvalidArgument("params_json", f"names {key[:64]!r} twice")
        result[key] = value
    return result


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_PARAMS_DIGITS:
        raise errors.InvalidArgument("params_json", f"holds an integer of more than {MAX_PARAMS_DIGITS} digits")
    return int(digits)


def _no_float(text: str) -> Any:
    raise errors.InvalidArgument("params_json", f"holds {text[:32]}: numbers must be integers")


class CeremonyService(rpc.CeremonyServiceServicer):
    def __init__(self, ceremonies: Ceremonies, context: Context, clock: Clock) -> None:
        self._c = ceremonies
        self._ctx = context
        self._clock = clock

    # -- helpers -----------------------------------------------------------------------------------------------

    def _handle(self, context: grpc.ServicerContext, work: Callable[[Principal], T]) -> T:
        """The work of a method, for its caller (errors become the call's status in ``service_method``)."""
        return work(current_principal())

    def _visible(self, principal: Principal, ceremony_id: str) -> CeremonyRecord:
        record = self._c.get(check_id(ceremony_id))
        # An officer sees their own domain's ceremonies; an auditor those of the domains that enrolled them.
        if record.domain not in current_domains():
            raise errors.NotFound(f"no ceremony {ceremony_id}")
        return record

    def _message(self, record: CeremonyRecord) -> pb.Ceremony:
        try:
            quorum = self._c.policy.quorum(record.domain, record.operation)
            required, role = quorum.required, quorum.role
        except errors.InvalidArgument:
            required, role = 0, ""
        return pb.Ceremony(
            ceremony_id=record.ceremony_id, domain=record.domain, operation=record.operation,
            params_json=json.dumps(dict(record.params), sort_keys=True), proposer=record.proposal.proposer.uri(),
            created_at=rfc3339(record.proposal.created_at), expires_at=rfc3339(record.proposal.expires_at),
            state=record.state.value, encoding=record.encoding, digest=record.digest, required=required, role=role,
            approvals=[pb.ApprovalInfo(officer=a.officer.uri(), at=a.at) for a in record.approvals],
            components=[pb.ComponentInfo(custodian=c.custodian.uri(), kcv=c.kcv, at=c.at) for c in record.components],
            result_json="" if record.result is None else json.dumps(dict(record.result), sort_keys=True),
            error=record.error or "",
        )

    # -- methods -----------------------------------------------------------------------------------------------

    @service_method
    def Propose(self, request: pb.ProposeRequest, context: grpc.ServicerContext) -> pb.Ceremony:
        def work(principal: Principal) -> pb.Ceremony:
            op = operations.operation(request.operation)
            params = parse_params(request.params_json)
            assert principal.domain is not None
            checked = op.check(self._ctx, principal.domain, params)
            ttl = dt.timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else dt.timedelta(hours=24)
            record = self._c.propose(principal, op.name, checked, ttl)
            log.info("%s proposed %s (%s)", principal, record.ceremony_id, op.name)
            return self._message(record)
        return self._handle(context, work)

    @service_method
    def GetCeremony(self, request: pb.CeremonyRef, context: grpc.ServicerContext) -> pb.Ceremony:
        return self._handle(context, lambda p: self._message(
            self._visible(p, request.ceremony_id)))

    @service_method
    def ListCeremonies(self, request: pb.ListCeremoniesRequest, context: grpc.ServicerContext
                       ) -> pb.ListCeremoniesResponse:
        def work(principal: Principal) -> pb.ListCeremoniesResponse:
            states: tuple[CeremonyState, ...] = ()
            if request.state:
                try:
                    states = (CeremonyState(request.state),)
                except ValueError:
                    raise errors.InvalidArgument("state", f"must be one of "
                                                          f"{', '.join(s.value for s in CeremonyState)}") from None
            domains = [d for d in DOMAINS if d in current_domains()]
            found = [r for d in domains if d for r in self._c.list(d, states)]
            return pb.ListCeremoniesResponse(ceremonies=[self._message(r) for r in found])
        return self._handle(context, work)

    @service_method
    def Approve(self, request: pb.ApproveRequest, context: grpc.ServicerContext) -> pb.Ceremony:
        def work(principal: Principal) -> pb.Ceremony:
            self._visible(principal, request.ceremony_id)
            if not request.signature:
                raise errors.InvalidArgument("signature", "is required")
            record = self._c.approve(request.ceremony_id, principal, request.signature)
            log.info("%s approved %s", principal, record.ceremony_id)
            return self._message(record)
        return self._handle(context, work)

    @service_method
    def SubmitComponent(self, request: pb.SubmitComponentRequest, context: grpc.ServicerContext) -> pb.Ceremony:
        def work(principal: Principal) -> pb.Ceremony:
            self._visible(principal, request.ceremony_id)

            def check(record: CeremonyRecord, sealed: bytes, kcv: str) -> None:
                custody = self._ctx.registry.active(record.domain, KeyKind.CUSTODY, keyops.CUSTODY_NAME)
                keyops.check_sealed(custody.public_key or b"", sealed)  # malformed: no worker is asked
                pool = operations.pool_for(self._ctx, record.domain)
                decrypted = True
                try:
                    pool.call(keyops.check_component, record.params.get("algorithm", "AES256"), sealed, kcv)
                except errors.InvalidArgument as error:
                    decrypted = error.reason != UNDECRYPTABLE
                    raise
                finally:
                    if decrypted:
                        pool.recycle()  # the process a clear component passed through ends

            record = self._c.add_component(request.ceremony_id, principal, request.encrypted_component,
                                           request.kcv, check)
            log.info("%s sent a component to %s", principal, record.ceremony_id)
            return self._message(record)
        return self._handle(context, work)

    @service_method
    def Cancel(self, request: pb.CeremonyRef, context: grpc.ServicerContext) -> pb.Ceremony:
        def work(principal: Principal) -> pb.Ceremony:
            self._visible(principal, request.ceremony_id)
            record = self._c.cancel(request.ceremony_id, principal)
            log.info("%s cancelled %s", principal, record.ceremony_id)
            return self._message(record)
        return self._handle(context, work)

    @service_method
    def Execute(self, request: pb.CeremonyRef, context: grpc.ServicerContext) -> pb.Ceremony:
        def work(principal: Principal) -> pb.Ceremony:
            record = self._visible(principal, request.ceremony_id)
            op = operations.operation(record.operation)
            try:
                done = self._c.execute(record.ceremony_id, principal, lambda r: op.run(self._ctx, r))
            finally:
                # Fresh workers once the operation ran (succeeded or failed): none keeps a key version that
                # changed state, nor any memory a clear component passed through.
                ran = self._c.get(record.ceremony_id).state in (CeremonyState.EXECUTED, CeremonyState.FAILED)
                if ran and op.changes_keys and self._ctx.pools is not None and record.domain in self._ctx.pools.pools:
                    self._ctx.pools.pools[record.domain].recycle()
            log.info("%s executed %s (%s)", principal, done.ceremony_id, op.name)
            return self._message(done)
        return self._handle(context, work)

    @service_method
    def FetchComponent(self, request: pb.CeremonyRef, context: grpc.ServicerContext) -> pb.SealedComponent:
        def work(principal: Principal) -> pb.SealedComponent:
            self._visible(principal, request.ceremony_id)
            sealed, kcv = self._c.output_for(request.ceremony_id, principal)
            return pb.SealedComponent(ceremony_id=request.ceremony_id, sealed=sealed, kcv=kcv)
        return self._handle(context, work)

    @service_method
    def GetMinutes(self, request: pb.CeremonyRef, context: grpc.ServicerContext) -> pb.Minutes:
        def work(principal: Principal) -> pb.Minutes:
            record = self._visible(principal, request.ceremony_id)
            document = minutes(record, self._ctx, self._clock.now())
            signing = self._ctx.registry.active(record.domain, KeyKind.SIGNING, SIGNING_KEY_NAME)
            raw = operations.pool_for(self._ctx, record.domain).call(keyops.sign, signing.label, document)
            signature = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
            return pb.Minutes(document=document, signature=signature, signing_key=signing.label)
        return self._handle(context, work)

    @service_method
    def GetDomain(self, request: pb.GetDomainRequest, context: grpc.ServicerContext) -> pb.DomainInfo:
        def work(principal: Principal) -> pb.DomainInfo:
            if principal.domain is None:
                raise errors.PermissionDenied("only officers have a domain")
            custody = self._ctx.registry.active(principal.domain, KeyKind.CUSTODY, keyops.CUSTODY_NAME)
            return pb.DomainInfo(domain=principal.domain, custody_public_key=custody.public_key or b"", officers=[
                pb.OfficerInfo(officer=r.officer.principal.uri(), roles=sorted(r.officer.roles),
                               public_key=r.public_key_pem, state=r.state)
                for r in self._ctx.officers.all(principal.domain)])
        return self._handle(context, work)


    @service_method
    def FetchTransportKey(self, request: pb.TransportKeyRequest, context: grpc.ServicerContext
                          ) -> pb.TransportKeyHandoff:
        def work(principal: Principal) -> pb.TransportKeyHandoff:
            _require_domain(check_domain(request.domain))
            handoff = self._ctx.handoffs.pending(principal, check_domain(request.domain))
            log.info("%s fetched the %s transport key %s", principal, handoff.domain, handoff.label)
            return pb.TransportKeyHandoff(domain=handoff.domain, bureau=handoff.bureau, version=handoff.version,
                                          label=handoff.label, wrapped_key=handoff.wrapped, kcv=handoff.kcv,
                                          algorithm=handoff.algorithm, unwrap_key_sha256=handoff.unwrap_key_sha256)
        return self._handle(context, work)

    @service_method
    def ConfirmTransportKey(self, request: pb.ConfirmTransportKeyRequest, context: grpc.ServicerContext
                            ) -> pb.TransportKeyHandoff:
        def work(principal: Principal) -> pb.TransportKeyHandoff:
            _require_domain(check_domain(request.domain))
            handoff = self._ctx.handoffs.confirm(principal, check_domain(request.domain), request.version,
                                                 request.kcv)
            log.info("%s confirmed the %s transport key %s; it is active", principal, handoff.domain, handoff.label)
            return pb.TransportKeyHandoff(domain=handoff.domain, bureau=handoff.bureau, version=handoff.version,
                                          label=handoff.label, kcv=handoff.kcv, algorithm=handoff.algorithm,
                                          unwrap_key_sha256=handoff.unwrap_key_sha256)
        return self._handle(context, work)


def _require_domain(domain: str) -> None:
    """A station receives a domain's transport key only while that domain registers it (kms.principals)."""
    if domain not in current_domains():
        raise errors.PermissionDenied(f"{current_principal()} is not registered for the {domain} domain")


def minutes(record: CeremonyRecord, ctx: Context, now: dt.datetime) -> bytes:
    """The canonical minutes of a ceremony: the proposal (its exact encoding), every approval with its signature
    and the approving officer's public key, the components received (custodian and KCV only), how it ended."""
    keys: Mapping[str, str] = {r.officer.principal.uri(): r.public_key_pem for r in ctx.officers.all(record.domain)}
    try:
        quorum = ctx.ceremonies.policy.quorum(record.domain, record.operation)
        required, role = quorum.required, quorum.role
    except errors.InvalidArgument:  # the genesis: recorded, not evaluated against a quorum
        required, role = 0, ""
    return canonical({
        "format": MINUTES_FORMAT, "version": 1, "ceremony_id": record.ceremony_id, "domain": record.domain,
        "operation": record.operation, "proposal": record.encoding.decode(), "digest": record.digest,
        "approvals": [{"officer": a.officer.uri(), "at": a.at, "signature": a.signature.hex(),
                       "public_key": keys.get(a.officer.uri(), "")} for a in record.approvals],
        "components": [{"custodian": c.custodian.uri(), "kcv": c.kcv, "at": c.at} for c in record.components],
        "required": required, "role": role,
        "state": record.state.value, "result": dict(record.result or {}), "error": record.error or "",
        "closed_at": record.closed_at or "", "closed_by": record.closed_by or "", "issued_at": rfc3339(now),
    })


def register(service: CeremonyService) -> Callable[[grpc.Server], list[str]]:
    def add(server: grpc.Server) -> list[str]:
        rpc.add_CeremonyServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
        return [pb.DESCRIPTOR.services_by_name["CeremonyService"].full_name]
    return add
