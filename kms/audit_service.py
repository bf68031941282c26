"""The audit service (kms.v1.AuditService), auditors only (docs/audit.md).

``Export`` first has a checkpoint signed of the chain's current head (unless the newest one already covers it), then
streams the records up to that checkpoint as JSON Lines (kms.audit.export_lines), page by page from the database and
a bounded chunk at a time to the caller, so memory stays constant at any size and the export always ends with a
signed checkpoint covering every record in it.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable, Iterator
from typing import Protocol

import grpc

from kms import errors
from kms.audit import AuditLog, Checkpoint, export_lines
from kms.clock import rfc3339
from kms.registry import check_domain
from kms.server import abort, current_principal
from kms.v1 import audit_pb2 as pb
from kms.v1 import audit_pb2_grpc as rpc

log = logging.getLogger("kms.audit")

LINES_PER_CHUNK = 500
BYTES_PER_CHUNK = 1024 * 1024  # well under the 8 MiB message limit, whatever a record's size
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_KIND = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


class Checkpoints(Protocol):
    def checkpoint_now(self) -> Checkpoint | None: ...


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
    if moment.microsecond:
        moment = moment.replace(microsecond=0) + dt.timedelta(seconds=1)
    return rfc3339(moment)


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

    def Export(self, request: pb.ExportRequest, context: grpc.ServicerContext) -> Iterator[pb.ExportChunk]:
        try:
            filters = check_filters(request.since, request.until, request.domain, request.kind)
            checkpoint = self._checkpointer.checkpoint_now()
            upto = checkpoint.size if checkpoint is not None else 0
            log.info("%s exports the audit log up to %d%s", current_principal(), upto,
                     "" if not any(filters.values()) else f" ({', '.join(k for k, v in filters.items() if v)})")
            for group in chunks(export_lines(self._log, upto, **filters)):
                yield pb.ExportChunk(lines=group)
        except Exception as error:
            abort(context, error)

    def GetHead(self, request: pb.GetHeadRequest, context: grpc.ServicerContext) -> pb.Head:
        try:
            size, head = self._log.head()
            last = self._log.last_checkpoint()
        except Exception as error:
            abort(context, error)
            raise AssertionError("unreachable") from None
        if last is None:
            return pb.Head(size=size, hash=head)
        return pb.Head(size=size, hash=head, checkpoint_size=last.size, checkpoint_at=last.at,
                       checkpoint=last.line())


def register(service: AuditService) -> Callable[[grpc.Server], list[str]]:
    def add(server: grpc.Server) -> list[str]:
        rpc.add_AuditServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
        return [pb.DESCRIPTOR.services_by_name["AuditService"].full_name]
    return add

