"""`kms batch …` and `kms card …`: an officer's batches and the card lifecycle (挂失, 解挂, 补换, 销卡, 销户)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kms.cli.common import client_for, client_options, command, commands, emit, read_cards


def add_parser(sub: Any) -> None:
    group = command(sub, "batch", "issuance batches (officers)", """
        Issuance batches: the work orders officers create for a bureau. A batch is issuable once every domain of
        its profile authorized it (an authorize-batch ceremony each).""",
                    "kms batch show --client home/clients/auditor-erin.yaml --batch-id B-0001")
    group.set_defaults(handler=_batch)
    batch = commands(group, "batch_command")
    p = command(batch, "create", "create a batch of cards for a bureau (awaiting authorization)", """
        Create a batch of the cards of a card file for a bureau and a profile. The batch is recorded
        awaiting-authorization; each domain of the profile then authorizes it in an authorize-batch ceremony.
        Each card must carry every field the profile needs except the chip data (card_serial, kdd), and a PAN
        must pass the Luhn check unless the profile opts out (pan_luhn: false).""",
                "kms batch create --client home/clients/officer-hrss-alice.yaml --batch-id B-0001 "
                "--bureau bureau-b --cards cards.csv")
    client_options(p, "an officer's client configuration")
    p.add_argument("--batch-id", required=True, help="the new batch's id (1 to 64 characters)")
    p.add_argument("--bureau", required=True, help="the bureau whose stations will fetch it")
    p.add_argument("--profile", default="dual-app-v1", help="the card profile (default: dual-app-v1)")
    p.add_argument("--cards", type=Path, required=True, help="CSV: card_ref,city_code,card_serial,pan,psn,kdd")
    p = command(batch, "show", "a batch's status", """
        A batch's bureau, profile, card count, cards issued, state, and who created it when.""",
                "kms batch show --client home/clients/auditor-erin.yaml --batch-id B-0001 --json | jq .issued")
    client_options(p, "a client or station configuration")
    p.add_argument("--batch-id", required=True, help="the batch")
    p = command(batch, "reissue", "consent (for your domain) to revoke a spoiled card's chip binding and "
                                  "bundle so it can be issued again; done once every domain consented", """
        A card spoiled in personalization: revoke its chip binding and issued bundle so it can be issued again.
        Each call is the consent of the caller's domain; the card is pending again once every domain of its
        profile consented.""",
                "kms batch reissue --client home/clients/officer-hrss-alice.yaml --batch-id B-0001 "
                "--card-ref b1-0000042")
    client_options(p, "an officer's client configuration")
    p.add_argument("--batch-id", required=True, help="the batch")
    p.add_argument("--card-ref", required=True, help="the spoiled card")

    group = command(sub, "card", "card lifecycle (officers; show also auditors)", """
        The card lifecycle per application: 挂失 (lost), 解挂 (unlost), 补换 (replace), 销卡/销户 (cancel). An officer
        acts on their own domain's application; issuance is refused for a card in a blocking state
        (docs/card-lifecycle.md).""",
                    "kms card show --client home/clients/auditor-erin.yaml --card-ref b1-0000001")
    group.set_defaults(handler=_card)
    card = commands(group, "card_command")
    for name, text, example in (
            ("lost", "report an application of a card lost (挂失)",
             "kms card lost --client home/clients/officer-hrss-alice.yaml --card-ref b1-0000001 "
             "--application hrss --reason 'reported by the holder'"),
            ("unlost", "cancel the loss report of an application (解挂)",
             "kms card unlost --client home/clients/officer-hrss-alice.yaml --card-ref b1-0000001 "
             "--application hrss --reason 'found'"),
            ("replace", "record a replacement card (补换): the old card is revoked, its identities retired",
             "kms card replace --client home/clients/officer-hrss-alice.yaml --card-ref b1-0000001 "
             "--new-card-ref b2-0000000 --reason damaged"),
            ("cancel", "cancel (销卡) or close (销户) an application of a card; hrss first",
             "kms card cancel --client home/clients/officer-hrss-alice.yaml --card-ref b1-0000001 "
             "--application hrss --kind cancel-card --reason 'holder request'"),
            ("show", "a card's state per application and its history",
             "kms card show --client home/clients/auditor-erin.yaml --card-ref b1-0000001 --json")):
        p = command(card, name, text, text[0].upper() + text[1:] + ". The change is recorded with its reason, "
                    "who made it and when, in the card's history and the audit log." if name != "show" else
                    "A card's state per application, its records per batch, and its history.", example)
        client_options(p, "an officer's or auditor's client configuration")
        p.add_argument("--card-ref", required=True, help="the card (for replace: the old card)")
        if name in ("lost", "unlost", "cancel"):
            p.add_argument("--application", required=True, choices=("hrss", "bank"), help="which application")
        if name == "replace":
            p.add_argument("--new-card-ref", required=True, help="the replacement card, a card of some batch")
        if name == "cancel":
            p.add_argument("--kind", required=True, choices=("cancel-card", "close-account"),
                           help="cancel-card (销卡) or close-account (销户)")
        if name != "show":
            p.add_argument("--reason", required=True, help="why; recorded with the change")


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
            emit(args, {"batch_id": args.batch_id, "card_ref": reply.card_ref, "state": reply.state,
                        "awaiting": list(reply.awaiting)},
                 f"card {reply.card_ref} of batch {args.batch_id}: your domain's consent to re-issue it is "
                 f"recorded; awaiting the {' and '.join(reply.awaiting)} domain's consent" if reply.awaiting else
                 f"card {reply.card_ref} of batch {args.batch_id} is {reply.state} again")
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
