"""`kms ceremony …`: an officer's commands for key ceremonies (docs/ceremonies.md).

Components are read without echo (or from a file), encrypted on this machine to the domain's custody key, and wiped;
an escrow component is written only to the file the custodian names (mode 0600). Minutes are written as the signed
canonical document plus a ``.sig`` file, and ``verify-minutes`` checks them offline.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms import config as config_mod
from kms import errors, identity
from kms.ceremony.officers import ApprovalKeyFile
from kms.ceremony.rules import verify_minutes
from kms.cli.common import (
    client_for,
    client_options,
    command,
    commands,
    emit,
    force_option,
    json_option,
    refuse_existing,
)
from kms.client.ceremony import CeremonyClient, checked_proposal
from kms.files import write_private
from kms.hsm.types import wipe

_LISTS = {"custodians", "recipients", "roles"}
_INTS = {"version", "card_count"}


def _operations() -> str:
    """The operations and their parameters, from the operations table itself (kms.ceremony.operations)."""
    from kms.ceremony.operations import OPERATIONS

    lines = ["operations (NAME=VALUE parameters; [optional]; | alternatives):"]
    for op in OPERATIONS.values():
        lines.append(f"  {op.name}: {op.summary}")
        lines.extend(f"      {line}" for line in textwrap.wrap(op.params, 92, break_on_hyphens=False))
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    cer = command(sub, "ceremony", "key ceremonies under dual control (officers; auditors read)", """
        Key ceremonies under dual control: an officer proposes an operation of their domain, a quorum of other
        officers of the same domain approves it (each signing its digest with their own approval key), the
        proposer executes it, and signed minutes record it (docs/ceremonies.md).""",
                  "kms ceremony propose --help    # the operations and their parameters")
    cer.set_defaults(handler=run)
    commands_ = commands(cer, "ceremony_command")

    def command_(name: str, text: str, description: str, example: str, *,
                 with_id: bool = True) -> argparse.ArgumentParser:
        p = command(commands_, name, text, description, example)
        client_options(p, "an officer's (or auditor's) client configuration")
        if with_id:
            p.add_argument("ceremony_id", help="the ceremony (C-…), as propose printed it")
        return p

    p = command_("propose", "propose an operation of your domain", """
        Propose an operation of your domain (your certificate's). Prints the new ceremony with its id; approvers
        then see exactly these parameters, with the values the service fills in (e.g. authorize-batch's card count
        and digest), before they sign. Take the id from the JSON output to script the next steps.""",
                 "id=$(kms ceremony propose --client home/clients/officer-hrss-alice.yaml --json "
                 "generate-master-key name=hrss-test | jq -r .ceremony_id)", with_id=False)
    p.epilog = f"{_operations()}\n\n{p.epilog}"
    p.add_argument("operation", help="the operation (listed below)")
    p.add_argument("params", nargs="*", metavar="NAME=VALUE",
                   help="parameters; lists comma-separated (custodians=bob,chen); VALUE @FILE reads a file")
    p.add_argument("--ttl", type=int, default=0, help="seconds until the proposal expires (default 24 h)")
    command_("show", "a ceremony: operation, digest, approvals, components, result", """
        A ceremony: its operation and parameters, digest, state, approvals, components received and result.""",
             "kms ceremony show --client home/clients/officer-hrss-alice.yaml --json C-4936f72c8e6098f8")
    p = command_("list", "your domain's ceremonies", """
        Your domain's ceremonies, newest first, optionally only those in one state.""",
                 "kms ceremony list --client home/clients/officer-hrss-alice.yaml --state open", with_id=False)
    p.add_argument("--state", default="", help="only ceremonies in this state (open, executed, failed, ...)")
    p = command_("approve", "approve a ceremony: sign its digest with your approval key", """
        Approve a ceremony of your domain: sign its digest with your approval key (client.approval_key). Without
        --yes, the proposal (decoded from the very encoding whose digest is signed) is shown on stderr and
        `approve? [y/N]` asked on the terminal; anything but y is `not approved` (exit 14), and so is running
        without a terminal (pass --yes after reviewing with `kms ceremony show`).""",
                 "kms ceremony approve --client home/clients/officer-hrss-bob.yaml C-4936f72c8e6098f8\n"
                 "kms ceremony approve --client home/clients/officer-hrss-bob.yaml --yes \"$id\"")
    p.add_argument("--yes", action="store_true", help="approve without asking (review with `show` first)")
    p = command_("submit-component", "send your key component, encrypted to the domain's custody key", """
        Send your key component for an import ceremony: read without echo (or from a file), encrypted on this
        machine to the domain's custody key, and wiped. The service checks it against the KCV you give.""",
                 "kms ceremony submit-component --client home/clients/officer-bank-dave.yaml --kcv 1A2B3C "
                 "C-4936f72c8e6098f8")
    p.add_argument("--kcv", required=True, help="your component's check value (6 hex digits)")
    p.add_argument("--component-file", type=Path, help="a file holding the component in hex (default: prompt)")
    command_("execute", "run a ceremony whose quorum is met", """
        Run a ceremony whose quorum is met (the proposer). Prints the result, e.g. a new key's version and KCV.""",
             "kms ceremony execute --client home/clients/officer-hrss-alice.yaml C-4936f72c8e6098f8")
    command_("cancel", "cancel an open ceremony", """
        Cancel an open ceremony (the proposer).""",
             "kms ceremony cancel --client home/clients/officer-hrss-alice.yaml C-4936f72c8e6098f8")
    p = command_("fetch-component", "your escrow component of an executed export, into a file only you can read",
                 """
        Fetch your escrow component of an executed export-master-key ceremony into a new file only you can read
        (an existing file is refused).""",
                 "kms ceremony fetch-component --client home/clients/officer-bank-dave.yaml --out dave.component "
                 "C-4936f72c8e6098f8")
    p.add_argument("--out", type=Path, required=True, help="the component file to create (must not exist)")
    p = command_("minutes", "signed minutes of a ceremony", """
        The signed minutes of a ceremony: the canonical document to OUT and its signature to OUT.sig. Existing
        files are refused unless --force.""",
                 "kms ceremony minutes --client home/clients/auditor-erin.yaml C-4936f72c8e6098f8 -o minutes.json")
    p.add_argument("--out", "-o", type=Path, required=True, help="the minutes; the signature goes to OUT.sig")
    force_option(p)
    p = command(commands_, "verify-minutes", "check signed minutes offline", """
        Check signed minutes offline against the domain's issuance signing key: the signature over the document
        and every approval signature in it.""",
                "kms ceremony verify-minutes minutes.json --public-key home/trust/hrss-issuance-v1.pem")
    p.add_argument("file", type=Path, help="the minutes (with FILE.sig beside it)")
    p.add_argument("--public-key", type=Path, required=True, help="the domain's issuance signing key (PEM)")
    json_option(p, "the verdict")


def _doc(ceremony: Any) -> dict[str, Any]:
    return {
        "ceremony_id": ceremony.ceremony_id, "domain": ceremony.domain, "operation": ceremony.operation,
        "params": json.loads(ceremony.params_json or "{}"), "proposer": ceremony.proposer,
        "created_at": ceremony.created_at, "expires_at": ceremony.expires_at, "state": ceremony.state,
        "digest": ceremony.digest, "required": ceremony.required, "role": ceremony.role,
        "approvals": [{"officer": a.officer, "at": a.at} for a in ceremony.approvals],
        "components": [{"custodian": c.custodian, "kcv": c.kcv, "at": c.at} for c in ceremony.components],
        "result": json.loads(ceremony.result_json) if ceremony.result_json else None, "error": ceremony.error,
    }


def _text(doc: dict[str, Any]) -> str:
    lines = [f"{doc['ceremony_id']}: {doc['operation']} ({doc['domain']}), {doc['state']}; proposed by "
             f"{doc['proposer']}; {len(doc['approvals'])} of {doc['required']} approvals ({doc['role']})"]
    if doc["state"] == "failed":
        lines.append(f"  failed: {doc['error']}")
    if doc["result"]:
        lines.append("  result: " + json.dumps(doc["result"], sort_keys=True))
    return "\n".join(lines)


def _params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise errors.InvalidArgument("params", f"{item!r} is not NAME=VALUE")
        if value.startswith("@"):
            try:
                value = Path(value[1:]).read_text(encoding="utf-8")
            except OSError as error:
                raise errors.InvalidArgument(f"params.{name}", f"cannot read {value[1:]} ({error.strerror})") from None
        if name in _LISTS:
            params[name] = [v for v in value.split(",") if v]
        elif name in _INTS:
            # ASCII digits only (int() also reads "٣" or "1_0"); the service checks the range.
            if not re.fullmatch(r"-?[0-9]{1,20}", value):
                raise errors.InvalidArgument(f"params.{name}", "must be an integer")
            params[name] = int(value)
        else:
            params[name] = value
    return params


def _approval_key(args: argparse.Namespace) -> ApprovalKeyFile:
    cfg = config_mod.load_client(args.client)
    if cfg.approval_key is None:
        raise errors.ConfigError(f"{args.client}: no client.approval_key (an officer's approval key)")
    return ApprovalKeyFile(cfg.approval_key)


def _me(args: argparse.Namespace) -> str:
    cfg = config_mod.load_client(args.client)
    return identity.from_pem(config_mod.read_file(cfg.tls.cert, "client.tls.cert")).uri()


def _read_component(args: argparse.Namespace) -> bytearray:
    if args.component_file is not None:
        try:
            text = args.component_file.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            raise errors.InvalidArgument("component_file", "cannot be read as hexadecimal text") from None
    else:
        text = getpass.getpass("component (hex, not echoed): ")
    try:
        return bytearray.fromhex("".join(text.split()))
    except ValueError:
        raise errors.InvalidArgument("component", "must be hexadecimal") from None
    finally:
        del text


def run(args: argparse.Namespace) -> int:
    if args.ceremony_command == "verify-minutes":
        return _verify(args)
    with client_for(args.client, args.server) as client:
        cer = CeremonyClient(client)
        command = args.ceremony_command
        if command == "propose":
            ceremony = cer.propose(args.operation, _params(args.params), args.ttl)
        elif command == "show":
            ceremony = cer.get(args.ceremony_id)
        elif command == "list":
            found = [_doc(c) for c in cer.list(args.state)]
            emit(args, found, "\n".join(_text(d) for d in found) or "no ceremonies")
            return 0
        elif command == "approve":
            ceremony = cer.get(args.ceremony_id)
            digest, proposal = checked_proposal(ceremony, args.ceremony_id)
            if not args.yes:  # shown: the proposal decoded from the very encoding whose digest is signed
                print(f"{args.ceremony_id}: {proposal['operation']} ({proposal['domain']}) proposed by "
                      f"{proposal['proposer']}, expires {proposal['expires_at']}\n  params: "
                      f"{json.dumps(proposal['params'], sort_keys=True)}\n  digest: {digest.hex()}", file=sys.stderr)
                if not sys.stdin.isatty():
                    raise errors.NotApproved(f"not approved: no terminal to ask on; review the proposal (kms "
                                             f"ceremony show {args.ceremony_id}) and pass --yes")
                print("approve? [y/N] ", end="", file=sys.stderr, flush=True)  # never on stdout (--json)
                if sys.stdin.readline().strip().lower() != "y":
                    raise errors.NotApproved("not approved")
            ceremony = cer.approve(args.ceremony_id, _approval_key(args), ceremony)
        elif command == "submit-component":
            value = _read_component(args)
            try:
                ceremony = cer.submit_component(args.ceremony_id, value, args.kcv)
            finally:
                wipe(value)
        elif command == "execute":
            ceremony = cer.execute(args.ceremony_id)
        elif command == "cancel":
            ceremony = cer.cancel(args.ceremony_id)
        elif command == "fetch-component":
            return _fetch(args, cer)
        else:
            refuse_existing(args.out, args.force)
            refuse_existing(Path(f"{args.out}.sig"), args.force)
            minutes = cer.minutes(args.ceremony_id)
            try:
                write_private(args.out, minutes.document)
                write_private(Path(f"{args.out}.sig"), json.dumps({
                    "signature": base64.b64encode(minutes.signature).decode(), "signing_key": minutes.signing_key,
                }) + "\n")
            except OSError as error:
                raise errors.InvalidArgument("--out", f"cannot write {args.out} ({error.strerror})") from None
            emit(args, {"minutes": str(args.out), "signature": f"{args.out}.sig", "signing_key": minutes.signing_key},
                  f"minutes of {args.ceremony_id} written to {args.out} (signature: {args.out}.sig, "
                  f"signed by {minutes.signing_key})")
            return 0
    doc = _doc(ceremony)
    emit(args, doc, _text(doc))
    return 0


def _fetch(args: argparse.Namespace, cer: CeremonyClient) -> int:
    key = _approval_key(args)
    value, kcv = cer.fetch_component(args.ceremony_id, key, _me(args))
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(value.hex().upper() + "\n")
    except FileExistsError:
        raise errors.AlreadyExists(f"{args.out} exists; choose a new file for the component") from None
    finally:
        wipe(value)
    emit(args, {"ceremony_id": args.ceremony_id, "out": str(args.out), "kcv": kcv},
          f"your component of {args.ceremony_id} is in {args.out} (KCV {kcv}); keep it under your sole control")
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        document = args.file.read_bytes()
        sig = json.loads(Path(f"{args.file}.sig").read_text(encoding="utf-8"))
        signature = base64.b64decode(sig["signature"])
        public = serialization.load_pem_public_key(args.public_key.read_bytes())
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise errors.InvalidArgument("file", f"cannot read the minutes, their .sig or the key ({type(error).__name__})"
                                     ) from None
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise errors.InvalidArgument("public_key", "must be an ECDSA P-256 public key")
    doc = verify_minutes(document, signature, public)
    emit(args, {"ok": True, "ceremony_id": doc["ceremony_id"], "state": doc["state"],
                 "approvals": [a["officer"] for a in doc["approvals"]]},
          f"minutes of {doc['ceremony_id']} verified: {doc['operation']} ({doc['domain']}) {doc['state']}, "
          f"{len(doc['approvals'])} approval signature(s) good")
    return 0

