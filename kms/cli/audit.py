"""`kms audit …`: an auditor takes the audit log home and proves it complete and unaltered (docs/audit.md).

``export`` writes the JSON Lines as they stream in (constant memory at any size) to a new file only its owner can
read, and never overwrites one; ``verify`` checks such a file offline, with nothing but the audit public key.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms import errors
from kms.cli.common import Progress, client_for, client_options, command, commands, emit, json_option
from kms.registry import DOMAINS

#: `kms audit verify`: the exit status when the file does not verify (declared in kms.errors with the others).
NOT_VERIFIED = errors.AuditNotVerified.exit_code


def add_parser(sub: Any) -> None:
    audit = command(sub, "audit", "the tamper-evident audit log (auditors)", """
        The tamper-evident audit log: an auditor exports it and verifies the export offline with nothing but the
        audit public key (docs/audit.md).""",
                    "kms audit export --client home/clients/auditor-erin.yaml -o audit.jsonl")
    audit.set_defaults(handler=run)
    commands_ = commands(audit, "audit_command")
    p = command(
        commands_, "export", "export the audit log as JSON Lines, ending with a seal signed for this export", """
        Export the audit log as JSON Lines into a new file (mode 0600; an existing file is never overwritten),
        written as it streams in. The export ends with a seal signed for this request (a random nonce this
        command sends and prints) covering every record in it. Filters: time range (since inclusive, until
        exclusive, RFC 3339), domain, kind (a kind or a dotted prefix, e.g. ceremony); a record a filter leaves out
        appears only as the digest of its body, so a filtered export verifies as completely as a full one.""",
        "kms audit export --client home/clients/auditor-erin.yaml -o audit.jsonl\n"
        "kms audit export --client home/clients/auditor-erin.yaml -o ceremonies.jsonl --kind ceremony --json")
    client_options(p, "an auditor's client configuration")
    p.add_argument("--out", "-o", type=Path, required=True, help="the export file (must not exist)")
    p.add_argument("--since", default="", help="RFC 3339 time, inclusive (e.g. 2026-11-27T00:00:00Z)")
    p.add_argument("--until", default="", help="RFC 3339 time, exclusive")
    p.add_argument("--domain", choices=DOMAINS, help="only this domain's records in full")
    p.add_argument("--kind", default="", help="a record kind or dotted prefix (e.g. request.refused, ceremony)")
    p = command(
        commands_, "verify", "verify an export offline: every hash, sequence number and checkpoint signature", f"""
        Verify an audit export offline, reading it line by line: every record's sequence number, link and hash,
        every checkpoint's signature and head, and that the file ends with the seal signed for its request (the
        nonce given, or else the header's). Prints a summary and exits 0 if it verifies; otherwise prints one line
        on stderr naming the first bad sequence number and why (edited, removed, inserted, reordered, truncated,
        checkpoint forged) and exits {NOT_VERIFIED}. Other exit statuses: 2 the file, key or nonce cannot be
        read.""",
        "kms audit verify audit.jsonl --public-key home/audit/audit-v1.pem --nonce 3f1c…  # the nonce export printed")
    p.add_argument("file", type=Path, help="the export (JSON Lines)")
    p.add_argument("--public-key", type=Path, required=True, help="the audit public key (PEM), e.g. audit/audit-v1.pem")
    p.add_argument("--nonce", "--expect-nonce", dest="nonce", metavar="HEX",
                   help="the nonce `kms audit export` printed, kept apart from the file: the export must be sealed "
                        "for it (without it, the nonce the file's header records is checked)")
    json_option(p, "the verdict")
    p = command(
        commands_, "check-anchors", "compare an export's checkpoints with those anchored in OpenBao", f"""
        Compare an audit export with the checkpoints the audit signer anchored in OpenBao KV v2 (create-only, one
        entry per checkpoint: docs/audit.md, section 5): at every anchored size up to the export's end, the chain
        the export carries must have the anchored head, and the export's checkpoint there must be the anchored one;
        every checkpoint of the export must be anchored. Every anchor is read: one beyond the export's end fails
        the check (the log was cut back, or the export is older than that anchor) unless --until N is given, which
        compares only up to N and says so in the verdict; no time in the export or an anchor decides it (both are
        signed by whoever holds the audit PIN). A filtered export is named as such in the verdict. Prints a summary
        and exits 0 if they agree; otherwise prints one line on stderr naming the first checkpoint where they
        disagree and what differs (head, signature, missing in export, missing in anchor, anchor forged, nothing
        compared) and exits {NOT_VERIFIED}. Run kms audit
        verify first: it proves the export itself. OpenBao: --openbao-address and --token-file (an auditor's
        token, policy deploy/openbao/kms-auditor.hcl), or --config (a kms configuration with an openbao block and
        audit.anchor; logs in with its AppRole unless --token-file is given). Other exit statuses: 2 the file or
        key cannot be read, 5 OpenBao refuses the token, 12 OpenBao cannot be reached.""",
        "kms audit check-anchors --export audit.jsonl --openbao-address https://bao.example:8200 "
        "--token-file ~/.bao-token --public-key home/audit/audit-v1.pem")
    p.add_argument("--export", type=Path, required=True, help="the export (JSON Lines) from kms audit export")
    p.add_argument("--config", type=Path, help="a kms configuration with the openbao block and audit.anchor")
    p.add_argument("--openbao-address", help="OpenBao's URL, e.g. https://bao.example:8200 (default: --config's)")
    p.add_argument("--ca-cert", type=Path, help="the CA certificate (PEM) of OpenBao's TLS certificate")
    p.add_argument("--token-file", type=Path, help="a file holding an OpenBao token that may read the anchors")
    p.add_argument("--mount", help="the KV v2 mount (default: --config's audit.anchor.mount, else kv)")
    p.add_argument("--prefix", help="the path of the anchors in the mount (default: --config's, else kms/audit)")
    p.add_argument("--public-key", type=Path, help="the audit public key (PEM): every anchor's signature is checked")
    p.add_argument("--until", type=int, metavar="N",
                   help="compare only up to log size N (an export known to be older than the newest anchors); "
                        "anchors after N are not checked, and the verdict says so")
    json_option(p, "the verdict")


def run(args: argparse.Namespace) -> int:
    if args.audit_command == "verify":
        return _verify(args)
    if args.audit_command == "check-anchors":
        return _check_anchors(args)
    return _export(args)


def _export(args: argparse.Namespace) -> int:
    from kms.client.audit import AuditClient

    started = time.perf_counter()
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise errors.AlreadyExists(f"{args.out} exists; choose a new file for the export") from None
    except OSError as error:
        raise errors.InvalidArgument("out", f"cannot create {args.out} ({error.strerror})") from None
    records = checkpoints = last_seq = size = 0
    nonce = secrets.token_hex(16)  # the export's seal is signed for it: an older export cannot pass for this one
    sealed = ""
    progress = Progress(unit="records")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out, client_for(args.client, args.server) as client:
            for chunk in AuditClient(client).export(since=args.since, until=args.until, domain=args.domain or "",
                                                    kind=args.kind, nonce=nonce):
                for line in chunk:
                    if line.startswith('{"type":"record","seq":'):
                        records += 1
                        last_seq = int(line[23:line.index(",", 23)])
                    elif line.startswith('{"type":"checkpoint"'):
                        checkpoints += 1
                    elif line.startswith('{"type":"export",'):
                        header = json.loads(line)
                        size = progress.total = int(header["size"])
                        _answers(header, nonce, "header")
                    elif line.startswith('{"type":"export-seal"'):
                        sealed = _answers(json.loads(line), nonce, "seal")
                    out.write(line)
                    out.write("\n")
                progress.update(last_seq, f"{records} records")
            if not sealed:
                raise errors.KmsError("the export does not answer this request: it has no seal")
            progress.update(size, f"{records} records", final=True)
            progress.done()
    except BaseException:
        progress.done()
        args.out.unlink(missing_ok=True)  # no partial export is left behind to be taken for a whole one
        raise
    seconds = time.perf_counter() - started
    emit(args, {"out": str(args.out), "records": records, "checkpoints": checkpoints, "size": size,
                 "last_seq": last_seq, "seconds": round(seconds, 3), "nonce": nonce, "sealed_at": sealed},
          f"exported {records} records and {checkpoints} signed checkpoints (log size {size}) to {args.out} "
          f"in {seconds:.1f} s, sealed {sealed} for nonce {nonce} (keep it apart: kms audit verify --nonce)")
    return 0


def _answers(doc: Any, nonce: str, what: str) -> str:
    """The export's header and seal must name the nonce this command sent, as the file will record it; the seal's
    time."""
    if not isinstance(doc, dict) or doc.get("nonce") != nonce:
        raise errors.KmsError(f"the export does not answer this request: its {what} names another nonce")
    return str(doc.get("at", ""))


def _public_key(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        public = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as error:
        raise errors.InvalidArgument("public_key", f"cannot read {path} as a PEM public key "
                                                   f"({type(error).__name__})") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise errors.InvalidArgument("public_key", "must be an ECDSA P-256 public key")
    return public


def _verify(args: argparse.Namespace) -> int:
    from kms.audit.log import NONCE
    from kms.audit.verify import verify

    public = _public_key(args.public_key)
    if args.nonce is not None:
        args.nonce = args.nonce.lower()
        if not NONCE.fullmatch(args.nonce):
            raise errors.InvalidArgument("nonce", "must be the 32 to 128 hex digits `kms audit export` printed")
    try:
        # A byte that is not UTF-8 reads as U+FFFD: its record then fails its hash, as an edited one.
        with args.file.open(encoding="utf-8", errors="replace", newline="\n") as lines:
            verdict = verify(lines, public, nonce=args.nonce)
    except OSError as error:
        raise errors.InvalidArgument("file", f"cannot read {args.file} ({error.strerror})") from None
    except ValueError:  # only the header line is parsed as a whole, and it is not JSON
        print("kms: audit log NOT verified: the header line is unreadable", file=sys.stderr)
        return NOT_VERIFIED
    if args.json:
        print(json.dumps({"ok": verdict.ok, "records": verdict.records, "checkpoints": verdict.checkpoints,
                          "last_seq": verdict.last_seq, "covered": verdict.covered, "filtered": verdict.filtered,
                          "omitted": verdict.omitted, "signed_at": verdict.signed_at or None,
                          "bad_seq": verdict.bad_seq, "problem": verdict.problem or None,
                          "detail": verdict.detail or None, "nonce": verdict.nonce or None,
                          "nonce_expected": verdict.nonce_expected}, indent=2, sort_keys=True))
    if not verdict.ok:
        print(f"kms: {verdict.summary()}", file=sys.stderr)
        return NOT_VERIFIED
    if not args.json:
        print(verdict.summary())
    return 0


def _check_anchors(args: argparse.Namespace) -> int:
    from kms import config as config_mod
    from kms.audit import anchor

    public = _public_key(args.public_key) if args.public_key is not None else None
    cfg = config_mod.load(args.config) if args.config is not None else None
    settings = cfg.audit.anchor if cfg is not None and cfg.audit is not None else None
    mount = args.mount or (settings.mount if settings else "kv")
    prefix = args.prefix or (settings.prefix if settings else "kms/audit")
    address = args.openbao_address or _openbao_address(cfg)
    if not address:
        raise errors.InvalidArgument("openbao_address", "is needed (or --config with an openbao block)")
    if args.openbao_address:
        from kms.secrets import check_address

        try:
            check_address(args.openbao_address, "--openbao-address")
        except errors.ConfigError as error:
            raise errors.InvalidArgument("openbao_address", str(error)) from None
    if args.token_file is not None:
        import hvac

        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise errors.InvalidArgument("token_file", f"cannot read {args.token_file} "
                                                       f"({type(error).__name__})") from None
        if not token:
            raise errors.InvalidArgument("token_file", f"{args.token_file} is empty")
        verify_tls: bool | str = str(args.ca_cert) if args.ca_cert is not None else True
        client = hvac.Client(url=str(address), token=token, verify=verify_tls, timeout=30)
    elif cfg is not None:
        client = anchor.connector(cfg, timeout=30)()
    else:
        raise errors.InvalidArgument("token_file", "is needed (or --config with an openbao block)")
    if args.until is not None and args.until < 1:
        raise errors.InvalidArgument("until", "must be a log size from 1")
    try:
        with args.export.open(encoding="utf-8", errors="replace", newline="\n") as lines:
            created: dict[int, str] = {}
            anchors = anchor.read_anchors(client, mount, prefix, created=created)
            verdict = anchor.compare(lines, anchors, public, until=args.until, created=created)
    except OSError as error:
        raise errors.InvalidArgument("export", f"cannot read {args.export} ({error.strerror})") from None
    except (ValueError, KeyError):
        raise errors.InvalidArgument("export", f"{args.export}: a checkpoint line is unreadable (run kms audit "
                                               "verify)") from None
    if args.json:
        print(json.dumps(verdict.to_json(), indent=2, sort_keys=True))
    if not verdict.ok:
        print(f"kms: {verdict.summary()}", file=sys.stderr)
        return NOT_VERIFIED
    if not args.json:
        print(verdict.summary())
    return 0


def _openbao_address(cfg: Any) -> str | None:
    """The address of a configuration's ``openbao`` block, if any."""
    block = getattr(cfg, "openbao", None)
    return str(block.address) if block is not None else None
