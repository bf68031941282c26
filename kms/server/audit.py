"""The audit service (kms.v1.AuditService), auditors only (docs/audit.md).

``Export`` first has a checkpoint signed of the chain's current head (unless the newest one already covers it) and an
export seal over that same head for the request's nonce and filters (kms.audit.signer.Checkpointer.seal), then
streams the records up to it as JSON Lines (kms.audit.log.export_lines), page by page from the database and a bounded
chunk at a time to the caller, so memory stays constant at any size. The export always ends with the seal signed
for this request, so the auditor can tell it from an older export or one cut back to an older checkpoint.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

import grpc

from kms import errors
from kms.audit.log import NONCE, AuditLog, Seal, export_lines
from kms.clock import rfc3339
from kms.registry import DOMAINS, check_domain
from kms.server.frame import current_domains, current_principal, service_method
from kms.v1 import audit_pb2 as pb
from kms.v1 import audit_pb2_grpc as rpc

log = logging.getLogger(__name__)

LINES_PER_CHUNK = 500
BYTES_PER_CHUNK = 1024 * 1024  # well under the 8 MiB message limit, whatever a record's size
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_KIND = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


class Checkpoints(Protocol):
    def seal(self, nonce: str, filters: Mapping[str, str]) -> Seal: ...


def check_nonce(value: str) -> str:
    if not NONCE.fullmatch(value):
        raise errors.InvalidArgument("nonce", "must be 32 to 128 lowercase hex digits the auditor's client chose at "
                                              "random for this export")
    return value


def parse_time(field: str, value: str) -> str | None:
    """An RFC 3339 time as records write it (UTC, whole seconds, 'Z'); None for empty. A fraction of a second is
    rounded up, which selects exactly the same records (they carry whole seconds) for both ``since`` (inclusive)
    and ``until`` (exclusive)."""
    if not value:
        return None
    if not _RFC3339.fullmatch(value):
        raise errors.InvalidArgument(field, "must be an RFC 3339 time, e.g. 2026-11-27T08:00:00Z")
    try:
        moment = dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise errors.InvalidArgument(field, "must be an RFC 3339 time, e.g. 2026-11-27T08:00:00Z") from None
    try:
        if moment.microsecond:
            moment = moment.replace(microsecond=0) + dt.timedelta(seconds=1)
        return rfc3339(moment)
    except (OverflowError, ValueError):  # past 9999-12-31T23:59:59Z or before year 1, once rounded or in UTC
        raise errors.InvalidArgument(field, "is out of range (0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z)") from None


def check_filters(since: str, until: str, domain: str, kind: str) -> dict[str, str | None]:
    """The export filters, checked and normalized (None: not filtered on)."""
    start, end = parse_time("since", since), parse_time("until", until)
    if start is not None and end is not None and end < start:
        raise errors.InvalidArgument("until", "is before since")
    if kind and (len(kind) > 64 or not _KIND.fullmatch(kind)):
        raise errors.InvalidArgument("kind", "must be a record kind or a dotted prefix of one, e.g. ceremony")
    return {"since": start, "until": end, "domain": check_domain(domain) if domain else None,
            "kind": kind or None}


def chunks(lines: Iterator[str], per_chunk: int = LINES_PER_CHUNK,
           max_bytes: int = BYTES_PER_CHUNK) -> Iterator[list[str]]:
    """Lines in bounded groups: at most ``per_chunk`` lines and (unless one line alone is larger) ``max_bytes``."""
    batch: list[str] = []
    size = 0
    for line in lines:
        if batch and (len(batch) >= per_chunk or size + len(line) > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(line)
        size += len(line)
    if batch:
        yield batch


class AuditService(rpc.AuditServiceServicer):
    def __init__(self, audit: AuditLog, checkpointer: Checkpoints) -> None:
        self._log = audit
        self._checkpointer = checkpointer

    @service_method
    def Export(self, request: pb.ExportRequest, context: grpc.ServicerContext) -> Iterator[pb.ExportChunk]:
        filters = check_filters(request.since, request.until, request.domain, request.kind)
        _require_domains(filters["domain"])
        nonce = check_nonce(request.nonce)
        seal = self._checkpointer.seal(nonce, {k: v for k, v in filters.items() if v is not None})
        log.info("%s exports the audit log up to %d%s", current_principal(), seal.size,
                 "" if not seal.filters else f" ({', '.join(seal.filters)})")
        for group in chunks(export_lines(self._log, seal)):
            yield pb.ExportChunk(lines=group)

    @service_method
    def GetHead(self, request: pb.GetHeadRequest, context: grpc.ServicerContext) -> pb.Head:
        size, head = self._log.head()
        last = self._log.last_checkpoint()
        if last is None:
            return pb.Head(size=size, hash=head)
        return pb.Head(size=size, hash=head, checkpoint_size=last.size, checkpoint_at=last.at,
                       checkpoint=last.line())


def _require_domains(domain: str | None) -> None:
    """An auditor reads the records of the domains that enrolled them (kms.principals): all records only when
    every domain did, otherwise only their domain's (records of other domains and of none appear as digests)."""
    granted = current_domains()
    if domain is None and not set(DOMAINS) <= granted:
        raise errors.PermissionDenied(f"{current_principal()} is enrolled by the {', '.join(sorted(granted))} domain "
                                      "only: export with domain set to it")
    if domain is not None and domain not in granted:
        raise errors.PermissionDenied(f"{current_principal()} is not enrolled by the {domain} domain")


def register(service: AuditService) -> Callable[[grpc.Server], list[str]]:
    def add(server: grpc.Server) -> list[str]:
        rpc.add_AuditServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
        return [pb.DESCRIPTOR.services_by_name["AuditService"].full_name]
    return add

