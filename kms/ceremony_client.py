"""An officer's side of ceremonies: propose, inspect, approve (signing the digest the client computes itself from
the canonical proposal, never the server's word for it), send a component, execute, fetch an escrow component,
read minutes. Components are encrypted here, on the officer's machine, before anything is sent."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Protocol

from kms import components
from kms.ceremony import APPROVAL_CONTEXT
from kms.client import Client
from kms.errors import InvalidArgument
from kms.v1 import ceremony_pb2 as pb
from kms.v1 import ceremony_pb2_grpc as rpc


class Signer(Protocol):
    def sign(self, message: bytes) -> bytes: ...


def checked_digest(ceremony: Any) -> bytes:
    """The digest an approval signs, recomputed from the canonical proposal; refuses a ceremony whose stated
    digest, domain or operation disagree with its encoding."""
    digest = hashlib.sha256(ceremony.encoding).digest()
    doc = json.loads(ceremony.encoding)
    if (digest.hex() != ceremony.digest or doc.get("domain") != ceremony.domain
            or doc.get("operation") != ceremony.operation):
        raise InvalidArgument("ceremony", "the service's description does not match the proposal it encodes")
    return digest


class CeremonyClient:
    def __init__(self, client: Client) -> None:
        self._client = client
        self._stub = rpc.CeremonyServiceStub(client.channel)  # type: ignore[no-untyped-call]

    def propose(self, operation: str, params: Mapping[str, Any], ttl_seconds: int = 0) -> Any:
        return self._client.call(self._stub.Propose, pb.ProposeRequest(
            operation=operation, params_json=json.dumps(dict(params)), ttl_seconds=ttl_seconds))

    def get(self, ceremony_id: str) -> Any:
        return self._client.call(self._stub.GetCeremony, pb.CeremonyRef(ceremony_id=ceremony_id))

    def list(self, state: str = "") -> list[Any]:
        return list(self._client.call(self._stub.ListCeremonies, pb.ListCeremoniesRequest(state=state)).ceremonies)

    def approve(self, ceremony_id: str, key: Signer) -> Any:
        ceremony = self.get(ceremony_id)
        signature = key.sign(APPROVAL_CONTEXT + checked_digest(ceremony))
        return self._client.call(self._stub.Approve, pb.ApproveRequest(ceremony_id=ceremony_id, signature=signature))

    def submit_component(self, ceremony_id: str, component: bytearray, kcv: str) -> Any:
        """Send our component encrypted to the domain's custody key. The caller wipes ``component``."""
        custody = self.domain().custody_public_key
        sealed = components.seal_to_custody(custody, component)
        return self._client.call(self._stub.SubmitComponent, pb.SubmitComponentRequest(
            ceremony_id=ceremony_id, encrypted_component=sealed, kcv=kcv))

    def cancel(self, ceremony_id: str) -> Any:
        return self._client.call(self._stub.Cancel, pb.CeremonyRef(ceremony_id=ceremony_id))

    def execute(self, ceremony_id: str) -> Any:
        return self._client.call(self._stub.Execute, pb.CeremonyRef(ceremony_id=ceremony_id))

    def fetch_component(self, ceremony_id: str, key: Any, me: str) -> tuple[bytearray, str]:
        """Our escrow component, opened here with our approval key; its KCV is checked. The caller wipes it."""
        sealed = self._client.call(self._stub.FetchComponent, pb.CeremonyRef(ceremony_id=ceremony_id))
        value = components.open_for_officer(key.private_key(), sealed.sealed,
                                            components.context_for(ceremony_id, me))
        return value, sealed.kcv

    def minutes(self, ceremony_id: str) -> Any:
        return self._client.call(self._stub.GetMinutes, pb.CeremonyRef(ceremony_id=ceremony_id))

    def domain(self) -> Any:
        return self._client.call(self._stub.GetDomain, pb.GetDomainRequest())
