"""`kms batch …` and `kms card …`: an officer's batches and the card lifecycle (挂失, 解挂, 补换, 销卡, 销户)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kms.cli.common import client_for, emit, read_cards


def add_parser(sub: Any) -> None:
    group = sub.add_parser("batch", help="issuance batches (officers)")
    group.set_defaults(handler=_batch)
    batch = group.add_subparsers(dest="batch_command", required=True)
    p = batch.add_parser("create", help="authorize a batch of cards for a bureau")
    p.add_argument("--client", type=Path, required=True, help="an officer's client configuration")
    p.add_argument("--batch-id", required=True)
    p.add_argument("--bureau", required=True)
    p.add_argument("--profile", default="dual-app-v1")
    p.add_argument("--cards", type=Path, required=True, help="CSV: card_ref,city_code,card_serial,pan,psn,kdd")
    p.add_argument("--server", help="host:port, instead of the client configuration's")
    p.add_argument("--json", action="store_true")
    p = batch.add_parser("show", help="a batch's status")
    p.add_argument("--client", type=Path, required=True, help="a client or station configuration")
    p.add_argument("--batch-id", required=True)
    p.add_argument("--server")
    p.add_argument("--json", action="store_true")
    p = batch.add_parser("reissue", help="consent (for your domain) to revoke a spoiled card's chip binding and "
                                         "bundle so it can be issued again; done once every domain consented")
    p.add_argument("--client", type=Path, required=True, help="an officer's client configuration")
    p.add_argument("--batch-id", required=True)
    p.add_argument("--card-ref", required=True)
    p.add_argument("--server")

    group = sub.add_parser("card", help="card lifecycle (officers; show also auditors)")
    group.set_defaults(handler=_card)
    card = group.add_subparsers(dest="card_command", required=True)
    for name, text in (("lost", "report an application of a card lost (挂失)"),
                       ("unlost", "cancel the loss report of an application (解挂)"),
                       ("replace", "record a replacement card (补换): the old card is revoked, its identities retired"),
                       ("cancel", "cancel (销卡) or close (销户) an application of a card; hrss first"),
                       ("show", "a card's state per application and its history")):
        p = card.add_parser(name, help=text)
        p.add_argument("--client", type=Path, required=True, help="an officer's or auditor's client configuration")
        p.add_argument("--card-ref", required=True, help="the card (for replace: the old card)")
        if name in ("lost", "unlost", "cancel"):
            p.add_argument("--application", required=True, choices=("hrss", "bank"))
        if name == "replace":
            p.add_argument("--new-card-ref", required=True, help="the replacement card, a card of some batch")
        if name == "cancel":
            p.add_argument("--kind", required=True, choices=("cancel-card", "close-account"),
                           help="cancel-card (销卡) or close-account (销户)")
        if name != "show":
            p.add_argument("--reason", required=True, help="why; recorded with the change")
        p.add_argument("--server")
        p.add_argument("--json", action="store_true")


def _status_doc(status: Any) -> dict[str, Any]:
    return {"batch_id": status.batch_id, "bureau": status.bureau, "profile": status.profile, "cards": status.cards,
            "issued": status.issued, "state": status.state, "created_by": status.created_by,
            "created_at": status.created_at}


def _batch(args: argparse.Namespace) -> int:
    with client_for(args.client, args.server) as client:
        if args.batch_command == "create":
            status = client.create_batch(args.batch_id, args.bureau, args.profile, read_cards(args.cards))
        elif args.batch_command == "show":
            status = client.batch_status(args.batch_id)
        else:
            reply = client.reissue(args.batch_id, args.card_ref)
            if reply.awaiting:
                print(f"card {reply.card_ref} of batch {args.batch_id}: your domain's consent to re-issue it is "
                      f"recorded; awaiting the {' and '.join(reply.awaiting)} domain's consent")
            else:
                print(f"card {reply.card_ref} of batch {args.batch_id} is {reply.state} again")
            return 0
    doc = _status_doc(status)
    emit(args, doc, f"batch {doc['batch_id']}: {doc['cards']} cards for {doc['bureau']} ({doc['profile']}), "
                    f"{doc['issued']} issued, {doc['state']}; created by {doc['created_by']} at {doc['created_at']}")
    return 0


def _card_doc(reply: Any) -> dict[str, Any]:
    return {
        "card_ref": reply.card_ref, "replaced_by": reply.replaced_by or None, "replaces": reply.replaces or None,
        "applications": {a.application: {"state": a.state, "since": a.since or None} for a in reply.applications},
        "records": [{"batch_id": r.batch_id, "state": r.state, "serial": r.serial or None} for r in reply.records],
        "history": [{"application": e.application or None, "event": e.event, "from": e.from_state or None,
                     "to": e.to_state or None, "reason": e.reason, "detail": e.detail, "at": e.at, "by": e.by}
                    for e in reply.history],
        "awaiting_consent": list(reply.awaiting_consent),
    }


def _card(args: argparse.Namespace) -> int:
    with client_for(args.client, args.server) as client:
        if args.card_command == "lost":
            reply = client.report_lost(args.card_ref, args.application, args.reason)
        elif args.card_command == "unlost":
            reply = client.cancel_loss_report(args.card_ref, args.application, args.reason)
        elif args.card_command == "replace":
            reply = client.replace_card(args.card_ref, args.new_card_ref, args.reason)
        elif args.card_command == "cancel":
            reply = client.cancel_application(args.card_ref, args.application, args.kind, args.reason)
        else:
            reply = client.get_card(args.card_ref)
    doc = _card_doc(reply)
    lines = [f"card {doc['card_ref']}: " + ", ".join(f"{a} {s['state']}" for a, s in doc["applications"].items())
             + (f"; replaced by {doc['replaced_by']}" if doc["replaced_by"] else "")
             + (f"; replaces {doc['replaces']}" if doc["replaces"] else "")
             + (f"; replacement awaiting the {' and '.join(doc['awaiting_consent'])} domain's consent"
                if doc["awaiting_consent"] else "")]
    if args.card_command == "show":
        lines += [f"  record {r['batch_id']}: {r['state']}" + (f" (bundle {r['serial']})" if r["serial"] else "")
                  for r in doc["records"]]
        lines += [f"  {e['at']} {e['event']}" + (f" ({e['application']})" if e["application"] else "")
                  + f" by {e['by']}: {e['reason']}" + (f" [{e['detail']}]" if e["detail"] else "")
                  for e in doc["history"]]
    emit(args, doc, "\n".join(lines))
    return 0
