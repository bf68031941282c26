"""The card lifecycle service (kms.v1.CardService, protos/kms/v1/cards.proto): officers report a card's
application lost, cancel the report, replace a card and cancel an application; officers and auditors read a card.

Every handler runs behind the authorization interceptor (kms.server.frame; kms/policies/authz.yaml). The rules — which
officer may act on which application, which transitions are allowed — live in kms.issuance.lifecycle, which also
validates every field (INVALID_ARGUMENT naming it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from kms import errors
from kms.identity import Principal
from kms.issuance.lifecycle import APPLICATIONS, CardLifecycle, CardView
from kms.server.frame import current_domains, current_principal, service_method
from kms.v1 import cards_pb2 as pb
from kms.v1 import cards_pb2_grpc as rpc

log = logging.getLogger(__name__)


class CardService(rpc.CardServiceServicer):
    def __init__(self, lifecycle: CardLifecycle) -> None:
        self._l = lifecycle

    @service_method
    def ReportLost(self, request: pb.ReportLostRequest, context: grpc.ServicerContext) -> pb.Card:
        return self._run(context, f"reported card {request.card_ref} lost ({request.application})", lambda by:
                         self._l.report_lost(request.card_ref, request.application, request.reason, by))

    @service_method
    def CancelLossReport(self, request: pb.CancelLossReportRequest, context: grpc.ServicerContext) -> pb.Card:
        return self._run(context, f"cancelled the loss report of card {request.card_ref} ({request.application})",
                         lambda by: self._l.cancel_loss_report(request.card_ref, request.application, request.reason,
                                                               by))

    @service_method
    def ReplaceCard(self, request: pb.ReplaceCardRequest, context: grpc.ServicerContext) -> pb.Card:
        return self._run(context, f"consented to replace card {request.old_card_ref} by card {request.new_card_ref}",
                         lambda by:
                         self._l.replace(request.old_card_ref, request.new_card_ref, request.reason, by))

    @service_method
    def CancelApplication(self, request: pb.CancelApplicationRequest, context: grpc.ServicerContext) -> pb.Card:
        return self._run(context, f"{request.kind}: card {request.card_ref} ({request.application})", lambda by:
                         self._l.cancel_application(request.card_ref, request.application, request.kind,
                                                    request.reason, by))

    @service_method
    def GetCard(self, request: pb.GetCardRequest, context: grpc.ServicerContext) -> pb.Card:
        principal = current_principal()
        missing = sorted(set(APPLICATIONS) - current_domains())
        if principal.role == "auditor" and missing:  # a card's view shows both applications
            raise errors.PermissionDenied(f"{principal} is not enrolled by the {' and '.join(missing)} domain")
        return _card(self._l.view(request.card_ref))

    def _run(self, context: grpc.ServicerContext, what: str, action: Callable[[Principal], CardView]) -> pb.Card:
        """A change by the calling officer, logged once it is made."""
        principal = current_principal()
        view = action(principal)
        log.info("%s %s", principal, what)
        return _card(view)


def _card(view: CardView) -> pb.Card:
    status = view.status
    return pb.Card(
        card_ref=status.card_ref,
        applications=[pb.ApplicationState(application=a, state=status.state(a).value, since=view.since[a] or "")
                      for a in APPLICATIONS],
        replaced_by=status.replaced_by or "", replaces=status.replaces or "",
        records=[pb.CardRecordState(batch_id=r.batch_id, state=r.state.value, serial=r.serial or "")
                 for r in view.records],
        history=[pb.LifecycleEvent(id=e.id, application=e.application or "", event=e.event.value,
                                   from_state=e.from_state or "", to_state=e.to_state or "", reason=e.reason,
                                   detail=e.detail, at=e.at, by=e.by) for e in view.history],
        awaiting_consent=view.awaiting_consent,
    )


def register(lifecycle: CardLifecycle) -> Callable[[grpc.Server], list[str]]:
    """A ``register`` callback for kms.server.frame.create_server."""
    def add(server: grpc.Server) -> list[str]:
        rpc.add_CardServiceServicer_to_server(CardService(lifecycle), server)  # type: ignore[no-untyped-call]
        return [pb.DESCRIPTOR.services_by_name["CardService"].full_name]
    return add
