"""An auditor's side of the audit service: the export as the lines it streams, and the chain's head."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import grpc

from kms.client.service import Client
from kms.v1 import audit_pb2 as pb
from kms.v1 import audit_pb2_grpc as rpc

#: An export of many millions of records takes a while; the stream's deadline is generous.
EXPORT_TIMEOUT = 24 * 3600.0


class AuditClient:
    def __init__(self, client: Client) -> None:
        self._client = client

    @property
    def _stub(self) -> Any:
        """The service's stub on the client's current channel (Client.stub: checked again after an UNAVAILABLE)."""
        return self._client.stub(rpc.AuditServiceStub)

    def export(self, *, since: str = "", until: str = "", domain: str = "", kind: str = "", nonce: str | None = None,
               timeout: float = EXPORT_TIMEOUT) -> Iterator[list[str]]:
        """The export's JSON Lines (without line ends), a chunk at a time as they arrive. ``nonce`` (hex) is what the
        export's closing seal is signed for; without one, a fresh random one (which the header then records)."""
        request = pb.ExportRequest(since=since, until=until, domain=domain, kind=kind,
                                   nonce=secrets.token_hex(16) if nonce is None else nonce)
        try:
            for chunk in self._stub.Export(request, timeout=timeout):
                yield list(chunk.lines)
        except grpc.RpcError as error:
            raise self._client.failed(error) from None

    def head(self) -> pb.Head:
        return self._client.call(self._stub.GetHead, pb.GetHeadRequest(), pb.Head)
