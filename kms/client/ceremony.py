"""An officer's side of ceremonies: propose, inspect, approve (signing the digest the client computes itself from
the canonical proposal, never the server's word for it), send a component, execute, fetch an escrow component,
read minutes. Components are encrypted here, on the officer's machine, before anything is sent."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization

from kms.ceremony import components
from kms.ceremony.rules import APPROVAL_CONTEXT
from kms.client.service import Client
from kms.errors import InvalidArgument
from kms.hsm.types import Algorithm, wipe
from kms.v1 import ceremony_pb2 as pb
from kms.v1 import ceremony_pb2_grpc as rpc


class Signer(Protocol):
    def sign(self, message: bytes) -> bytes: ...


def checked_proposal(ceremony: pb.Ceremony, ceremony_id: str) -> tuple[bytes, dict[str, Any]]:
    """The digest an approval signs, recomputed here from the canonical proposal, and the proposal decoded from
    that same encoding (what an officer is shown). Refuses a ceremony whose stated id, digest, domain or operation
    disagree with its encoding."""
    digest = hashlib.sha256(ceremony.encoding).digest()
    try:
        doc = json.loads(ceremony.encoding)
    except ValueError:
        raise InvalidArgument("ceremony", "the proposal is not canonical JSON") from None
    if (not isinstance(doc, dict) or digest.hex() != ceremony.digest or doc.get("ceremony_id") != ceremony_id
            or doc.get("domain") != ceremony.domain or doc.get("operation") != ceremony.operation):
        raise InvalidArgument("ceremony", "the service's description does not match the proposal it encodes")
    _check_handoff_key(doc.get("params"))
    return digest, doc


def _check_handoff_key(params: Any) -> None:
    """A proposal naming a station public key and its SHA-256 (register-transport-key, rsa-oaep): the SHA-256 an
    approver compares with the station's must be the one of that key, computed here (review revD-1)."""
    if not isinstance(params, dict) or "public_key_sha256" not in params:
        return
    try:
        public = serialization.load_pem_public_key(str(params.get("public_key", "")).encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise InvalidArgument("params.public_key", "is not a PEM public key") from None
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if params["public_key_sha256"] != hashlib.sha256(der).hexdigest():
        raise InvalidArgument("params.public_key_sha256", "is not the SHA-256 of the proposal's public_key: do not "
                                                          "approve")


def custody_fingerprint(spki_der: bytes) -> str:
    """How proposals name the custody key components are encrypted to: SHA-256 of its SubjectPublicKeyInfo."""
    return hashlib.sha256(spki_der).hexdigest()


class CeremonyClient:
    def __init__(self, client: Client) -> None:
        self._client = client

    @property
    def _stub(self) -> Any:
        """The service's stub on the client's current channel (Client.stub: checked again after an UNAVAILABLE)."""
        return self._client.stub(rpc.CeremonyServiceStub)

    def propose(self, operation: str, params: Mapping[str, Any], ttl_seconds: int = 0) -> pb.Ceremony:
        return self._client.call(self._stub.Propose, pb.ProposeRequest(
            operation=operation, params_json=json.dumps(dict(params)), ttl_seconds=ttl_seconds), pb.Ceremony)

    def get(self, ceremony_id: str) -> pb.Ceremony:
        return self._client.call(self._stub.GetCeremony, pb.CeremonyRef(ceremony_id=ceremony_id), pb.Ceremony)

    def list(self, state: str = "") -> list[pb.Ceremony]:
        return list(self._client.call(self._stub.ListCeremonies, pb.ListCeremoniesRequest(state=state),
                                      pb.ListCeremoniesResponse).ceremonies)

    def approve(self, ceremony_id: str, key: Signer, ceremony: pb.Ceremony | None = None) -> pb.Ceremony:
        """Sign the proposal of ``ceremony`` (fetched now if not given): pass the object the officer was shown,
        so that what is signed is exactly what was shown."""
        ceremony = ceremony if ceremony is not None else self.get(ceremony_id)
        digest, _ = checked_proposal(ceremony, ceremony_id)
        signature = key.sign(APPROVAL_CONTEXT + digest)
        return self._client.call(self._stub.Approve, pb.ApproveRequest(ceremony_id=ceremony_id, signature=signature),
                                 pb.Ceremony)

    def submit_component(self, ceremony_id: str, component: bytearray, kcv: str) -> pb.Ceremony:
        """Send our component encrypted to the domain's custody key — the one the approved proposal names, checked
        here — so a service cannot redirect it to another key. The caller wipes ``component``."""
        _, proposal = checked_proposal(self.get(ceremony_id), ceremony_id)
        custody = self.domain().custody_public_key
        if custody_fingerprint(custody) != proposal.get("params", {}).get("custody_key"):
            raise InvalidArgument("custody_key", "the service's custody key is not the one the proposal names")
        sealed = components.seal_to_custody(custody, component)
        return self._client.call(self._stub.SubmitComponent, pb.SubmitComponentRequest(
            ceremony_id=ceremony_id, encrypted_component=sealed, kcv=kcv), pb.Ceremony)

    def cancel(self, ceremony_id: str) -> pb.Ceremony:
        return self._client.call(self._stub.Cancel, pb.CeremonyRef(ceremony_id=ceremony_id), pb.Ceremony)

    def execute(self, ceremony_id: str) -> pb.Ceremony:
        return self._client.call(self._stub.Execute, pb.CeremonyRef(ceremony_id=ceremony_id), pb.Ceremony)

    def fetch_component(self, ceremony_id: str, key: Any, me: str) -> tuple[bytearray, str]:
        """Our escrow component, opened here with our approval key; its KCV is checked. The caller wipes it."""
        sealed = self._client.call(self._stub.FetchComponent, pb.CeremonyRef(ceremony_id=ceremony_id),
                                   pb.SealedComponent)
        value = components.open_for_officer(key.private_key(), sealed.sealed,
                                            components.context_for(ceremony_id, me))
        # A 16-byte component is of a DES2 or an SM4 key (an SM4 master or transport key): it passes if its KCV by
        # either method is the recorded one (the value is the same whichever it is).
        candidates = [a for a in (Algorithm.DES2, Algorithm.SM4, Algorithm.AES256) if a.length == len(value)]
        if not any(components.kcv(a, value) == sealed.kcv for a in candidates):
            wipe(value)
            raise InvalidArgument("component", "does not match the KCV recorded for it")
        return value, sealed.kcv

    def minutes(self, ceremony_id: str) -> pb.Minutes:
        return self._client.call(self._stub.GetMinutes, pb.CeremonyRef(ceremony_id=ceremony_id), pb.Minutes)

    def fetch_transport_key(self, domain: str) -> pb.TransportKeyHandoff:
        return self._client.call(self._stub.FetchTransportKey, pb.TransportKeyRequest(domain=domain),
                                 pb.TransportKeyHandoff)

    def confirm_transport_key(self, domain: str, version: int, kcv: str) -> pb.TransportKeyHandoff:
        return self._client.call(self._stub.ConfirmTransportKey, pb.ConfirmTransportKeyRequest(
            domain=domain, version=version, kcv=kcv), pb.TransportKeyHandoff)

    def domain(self) -> pb.DomainInfo:
        return self._client.call(self._stub.GetDomain, pb.GetDomainRequest(), pb.DomainInfo)
