"""`make bench`: what issuance costs next to a raw PKCS#11 loop doing the same HSM work, with the same number of
HSM processes, measured in the same run (rounds alternate, and who goes first alternates, so machine drift hits
both sides alike); medians and per-round ratios are reported.

1. Engine (goal >= 90 % of raw): kms.issuance.issuer.Issuer in this process, i.e. per-domain worker processes, each
   card's keys derived, KCV'd, wrapped and destroyed in the token, each section signed (ECDSA P-256 in the token) and
   canonically encoded, sections spliced into bundles in the coordinating process.
2. End to end (goal >= 80 % of raw): `kms serve` as a process of its own (gRPC over mutual TLS, workers_per_domain
   HSM worker processes per domain, records in SQLite); per round an officer creates a fresh batch for bureau-a
   (not timed) and a station of bureau-a streams the whole batch (timed: issuance, records written, bundles
   received; the station does not open them).
3. Latency of the single-card call: IssueCard (unary, one card per call, sequential calls from one station
   client), p50 and p99 after warm-up.
4. Audit log (docs/audit.md): (a) append rate, records/s of kms.audit.log.AuditLog.append with one record per
   transaction on SQLite, against plain INSERTs of rows of the same size into a scratch table of the same shape, one
   per transaction, same database; (b) offline verify rate, records/s of kms.audit.verify.verify over an export of
   >= 100,000 records with a signed checkpoint every 1,000 (goal >= 100,000 records/s), against SHA-256 alone over
   the same lines. `--audit-only` runs just this section.

Raw: scripts/bench_raw.py, the bare derive+KCV+wrap+destroy calls. Everything runs on a development home under
.bench/ (created on first use); the server gets a fresh records database (a copy of the home's key registry) on
every run. Start-up is never timed: workers are ready and a warm-up batch has been issued before the clock starts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import multiprocessing
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_raw

from kms import config, store
from kms.audit.log import AuditLog, Seal, checkpoint_message, export_lines, mask_pan, seal_message
from kms.audit.verify import verify
from kms.bundle import canonical
from kms.cards import profiles
from kms.cards.cardid import CardIdentity, luhn_check_digit
from kms.client.service import Client
from kms.clock import SystemClock, rfc3339
from kms.dev.ceremonies import authorize_batch
from kms.dev.home import HOME_FORMAT, Home, home_format, init_home
from kms.files import restrict_umask
from kms.hsm.labels import AUDIT_KEY
from kms.identity import Principal
from kms.issuance.issuer import Issuer
from kms.registry import DOMAINS, KeyKind
from kms.runtime import registry as open_registry

PROFILE = "dual-app-v1"
BUREAU = "bureau-a"
STATION = "station-a1"  # a station of BUREAU
OFFICER = Principal("officer", "alice", domain="hrss")
DEFAULT_HOME = Path(".bench/home")
E2E_CONFIG = "kms-bench-e2e.yaml"  # next to kms.yaml in the home, so its relative paths hold
E2E_DATABASE = "bench-e2e.db"
WARMUP_CARDS = 64
LATENCY_WARMUP_CALLS = 10


def _luhn(body: str) -> str:
    """A PAN the profile accepts: ``body`` and its Luhn check digit."""
    return body + luhn_check_digit(body)


def make_cards(n: int, seed: int) -> list[CardIdentity]:
    rng = random.Random(seed)
    return [
        CardIdentity(card_ref=f"bench-{i:07d}", city_code="320200", card_serial=f"{rng.getrandbits(64):016X}",
                     pan=_luhn(f"621483{rng.randrange(10**12):012d}"), psn=f"{rng.randrange(100):02d}",
                     kdd=f"{rng.getrandbits(80):020X}")
        for i in range(n)
    ]


def run_engine(config_path: Path, cards: list[CardIdentity], processes: int) -> float:
    with Issuer.from_config(config_path, BUREAU, PROFILE, processes_per_domain=processes) as issuer:
        for issued in issuer.issue(cards[:64], "bench-warmup"):  # workers up and logged in
            assert issued.data is not None
        started = time.perf_counter()
        count = 0
        for issued in issuer.issue(cards, "bench"):
            assert issued.data is not None, issued.error
            count += 1
        elapsed = time.perf_counter() - started
    assert count == len(cards)
    return elapsed


def run_raw(cfg: config.Config, cards: list[CardIdentity], processes: int) -> float:
    registry = open_registry(cfg, SystemClock())
    profile = profiles.load_dir(cfg.profiles)[PROFILE]
    module = cfg.hsm.module_path()
    conf = str(cfg.hsm.softhsm2_conf)
    jobs = []
    for domain in DOMAINS:
        masters = {n: registry.active(domain, KeyKind.MASTER, n).label for n in profile.master_keys(domain)}
        transport = registry.active(domain, KeyKind.TRANSPORT, BUREAU).label
        plan = [(masters[spec.master_key], [data for _, data in spec.recipe.steps(c)])
                for c in cards for spec in profile.keys(domain)]
        share = (len(cards) + processes - 1) // processes
        keys_per_card = len(profile.keys(domain))
        pin = cfg.domains[domain].pin.resolve()
        for p in range(processes):
            part = plan[p * share * keys_per_card:(p + 1) * share * keys_per_card]
            jobs.append((module, conf, cfg.domains[domain].token, pin, part, transport))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(len(jobs), mp_context=ctx) as pool:
        readies = [manager.Event() for _ in jobs]
        go = manager.Event()
        futures = [pool.submit(bench_raw.run, *job, ready, go) for job, ready in zip(jobs, readies, strict=True)]
        for ready in readies:
            ready.wait(120)
        started = time.perf_counter()
        go.set()
        done = sum(f.result()[0] for f in futures)
        elapsed = time.perf_counter() - started
    assert done == sum(len(j[4]) for j in jobs)
    return elapsed


# --- end to end: `kms serve` in a process of its own, an officer and a station over gRPC + mutual TLS ---------------

def bench_home(path: Path) -> Home:
    """The development home; one made by an older kms is rebuilt if it is the default bench home, refused
    otherwise."""
    if (path / "kms.yaml").exists() and home_format(path) < HOME_FORMAT:
        if path.resolve() != DEFAULT_HOME.resolve():
            raise SystemExit(f"bench: {path} was made by an older kms; use a fresh --home")
        print(f"bench: {path} was made by an older kms; rebuilding it", file=sys.stderr)
        shutil.rmtree(path)
    return init_home(path)


def e2e_config(home: Home, cfg: config.Config, processes: int) -> Path:
    """The home's configuration with `processes` HSM workers per domain and a fresh records database (an online
    copy of the home's database, so the key registry is the same and no earlier run's batches remain)."""
    prefix = "sqlite:///"
    if not cfg.database.startswith(prefix):
        raise SystemExit(f"bench: the bench home's database must be SQLite, not {cfg.database}")
    target = home.path / E2E_DATABASE
    for stale in (target, target.with_name(target.name + "-wal"), target.with_name(target.name + "-shm")):
        stale.unlink(missing_ok=True)
    source, copy = sqlite3.connect(cfg.database.removeprefix(prefix)), sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        source.close()
        copy.close()
    doc = yaml.safe_load(home.config.read_text(encoding="utf-8"))
    doc["database"] = f"sqlite:///{E2E_DATABASE}"
    doc["workers_per_domain"] = processes
    path = home.path / E2E_CONFIG
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@contextmanager
def kms_serve(config_path: Path) -> Iterator[int]:
    """`kms serve` as a process of its own on a free port of 127.0.0.1; always stopped (SIGTERM, then wait)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kms.cli", "serve", "--config", str(config_path), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("kms: serving on port "):
            raise SystemExit(f"bench: the server did not start: {line!r}")
        yield int(line.rsplit(" ", 1)[1])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.returncode != 0:
                print(f"bench: kms serve exited with status {proc.returncode}", file=sys.stderr)
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class EndToEnd:
    officer: Client
    station: Client
    stamp: str
    per_message: int
    authorize: Callable[[str], None]  # both domains' authorize-batch ceremonies (not timed)

    def batch(self, name: str, cards: list[CardIdentity]) -> tuple[str, float]:
        """A fresh batch for BUREAU, created by the officer; its id and the seconds creating it took."""
        batch_id = f"bench-{self.stamp}-{name}"
        started = time.perf_counter()
        status = self.officer.create_batch(batch_id, BUREAU, PROFILE, cards)
        assert status.cards == len(cards), status
        seconds = time.perf_counter() - started
        self.authorize(batch_id)
        return batch_id, seconds

    def stream(self, batch_id: str, cards: list[CardIdentity]) -> float:
        """Seconds for the station to receive every bundle of the batch (issued, recorded, streamed)."""
        refs = []
        started = time.perf_counter()
        for bundle in self.station.stream_batch(batch_id, per_message=self.per_message):
            assert bundle.data, bundle.card_ref
            refs.append(bundle.card_ref)
        elapsed = time.perf_counter() - started
        assert refs == [c.card_ref for c in cards], f"{batch_id}: {len(refs)} of {len(cards)} bundles received"
        issued = self.station.batch_status(batch_id).issued
        assert issued == len(cards), f"{batch_id}: {issued} of {len(cards)} cards recorded as issued"
        return elapsed

    def latencies(self, batch_id: str, cards: list[CardIdentity]) -> list[float]:
        """Seconds per IssueCard call, one card each, sequentially."""
        result = []
        for card in cards:
            started = time.perf_counter()
            bundle = self.station.issue_card(batch_id, card.card_ref)
            result.append(time.perf_counter() - started)
            assert bundle.data and bundle.card_ref == card.card_ref, card.card_ref
        return result


# --- 4. audit log: append rate and offline verify rate -----------------------------------------------------------

AUDIT_CHECKPOINT_EVERY = 1_000
AUDIT_VERIFY_GOAL = 100_000  # records/s
_SCRATCH = sa.Table("bench_audit_scratch", sa.MetaData(), *[
    sa.Column(c.name, c.type, primary_key=c.primary_key, autoincrement=False, nullable=c.nullable)
    for c in store.audit_log.columns])


def audit_entry(i: int) -> dict[str, Any]:
    """A record as a streamed card's issuance writes it (masked PAN, bundle serial)."""
    return {"kind": "issuance.issued", "actor": f"urn:kms:station:{BUREAU}:{STATION}", "domain": DOMAINS[i % 2],
            "subject": f"bench/card-{i:07d}",
            "detail": {"pan": mask_pan(f"621483{i:013d}"), "serial": f"{i:032X}", "profile": PROFILE}}


def scratch_rows(start: int, n: int) -> list[dict[str, Any]]:
    """Rows of the audit table's shape and size (the same canonical bodies), for the plain-INSERT baseline."""
    at = rfc3339(dt.datetime.now(dt.UTC))
    rows = []
    for seq in range(start, start + n):
        entry = audit_entry(seq)
        body = canonical({"seq": seq, "at": at, "outcome": "ok", **entry}).decode()
        digest = hashlib.sha256(body.encode()).hexdigest()
        rows.append({"seq": seq, "at": at, "kind": entry["kind"], "domain": entry["domain"], "prev": digest,
                     "hash": digest, "body": body})
    return rows


def run_audit_append(engine: sa.Engine, log: AuditLog, start: int, n: int) -> float:
    started = time.perf_counter()
    for i in range(start, start + n):
        with engine.begin() as conn:
            log.append(conn, **audit_entry(i))
    return time.perf_counter() - started


def run_plain_insert(engine: sa.Engine, rows: list[dict[str, Any]]) -> float:
    started = time.perf_counter()
    for row in rows:
        with engine.begin() as conn:
            conn.execute(_SCRATCH.insert().values(**row))
    return time.perf_counter() - started


def audit_export(engine: sa.Engine, n: int) -> tuple[list[str], ec.EllipticCurvePublicKey]:
    """An export of ``n`` records, generated in one transaction, with a checkpoint signed (by a software key of
    the same kind as the audit key) every AUDIT_CHECKPOINT_EVERY records and at the end."""
    log = AuditLog(engine, SystemClock())
    key = ec.generate_private_key(ec.SECP256R1())
    with engine.begin() as conn:
        for start in range(0, n, AUDIT_CHECKPOINT_EVERY):
            log.append_many(conn, [audit_entry(i) for i in range(start, min(n, start + AUDIT_CHECKPOINT_EVERY))])
            size, head = conn.execute(sa.select(store.audit_head.c.seq, store.audit_head.c.hash)).one()
            at = rfc3339(dt.datetime.now(dt.UTC))
            conn.execute(store.audit_checkpoints.insert().values(
                size=size, head=head, at=at, key=AUDIT_KEY,
                signature=key.sign(checkpoint_message(size, head, at), ec.ECDSA(hashes.SHA256()))))
    size, head = log.head()
    at, nonce = rfc3339(dt.datetime.now(dt.UTC)), "00" * 16
    seal = Seal(size, head, at, nonce, {}, AUDIT_KEY,
                key.sign(seal_message(size, head, at, nonce, {}), ec.ECDSA(hashes.SHA256())))
    return list(export_lines(log, seal)), key.public_key()


def run_verify(lines: list[str], public_key: ec.EllipticCurvePublicKey, n: int) -> float:
    started = time.perf_counter()
    verdict = verify(lines, public_key)
    elapsed = time.perf_counter() - started
    assert verdict.ok and verdict.records == n, verdict.summary()
    return elapsed


def run_sha256_only(lines: list[str]) -> float:
    started = time.perf_counter()
    for line in lines:
        hashlib.sha256(line.encode()).digest()
    return time.perf_counter() - started


def bench_audit(rounds: int, append_records: int, verify_records: int) -> None:
    workdir = Path(".bench")
    workdir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="audit-", dir=workdir) as tmp:
        engine = store.make_engine(f"sqlite:///{Path(tmp) / 'append.db'}")
        store.create_all(engine)
        _SCRATCH.create(engine)
        log = AuditLog(engine, SystemClock())
        run_audit_append(engine, log, 0, 50)  # warm-up: connections pooled, the head row made
        run_plain_insert(engine, scratch_rows(0, 50))
        starts = iter(range(1_000_000, 1_000_000 + 2 * rounds * append_records, append_records))

        def plain() -> float:
            return run_plain_insert(engine, scratch_rows(next(starts), append_records))  # rows made before timing

        def audited() -> float:
            return run_audit_append(engine, log, next(starts), append_records)

        insert_t, append_t = alternate(rounds, plain, audited)
        size, _ = log.head()
        assert size == 50 + rounds * append_records
        engine.dispose()

        engine = store.make_engine(f"sqlite:///{Path(tmp) / 'verify.db'}")
        store.create_all(engine)
        lines, public_key = audit_export(engine, verify_records)
        engine.dispose()
        sha_t, verify_t = alternate(rounds, lambda: run_sha256_only(lines),
                                    lambda: run_verify(lines, public_key, verify_records))
    print()
    print(f"4. audit log: (a) append, {append_records} records per round, one per transaction, SQLite (WAL) on "
          f"{workdir}; (b) offline verify of an export of {verify_records} records, a signed checkpoint every "
          f"{AUDIT_CHECKPOINT_EVERY}")
    print(f"  {'':44}{'records/s':>10}{'seconds':>10}")
    for name, n, times in (("plain INSERT, same row size (baseline)", append_records, insert_t),
                           ("AuditLog.append (chained, head locked)", append_records, append_t),
                           ("SHA-256 only over the export lines", verify_records, sha_t),
                           ("kms.audit.verify.verify", verify_records, verify_t)):
        median = statistics.median(times)
        print(f"  {name:44}{n / median:>10.0f}{median:>10.2f}")
    for name, base_t, other_t, base in (("audit append / plain INSERT", insert_t, append_t, "plain INSERT"),
                                        ("verify / SHA-256 only", sha_t, verify_t, "SHA-256 only")):
        ratio = statistics.median(base_t) / statistics.median(other_t)
        per_round = ", ".join(f"{b / o:.1%}" for b, o in zip(base_t, other_t, strict=True))
        print(f"  {name} throughput: {ratio:.1%} of {base} (per round: {per_round})")
    rate = verify_records / statistics.median(verify_t)
    verdict = "met" if rate >= AUDIT_VERIFY_GOAL else "NOT met"
    print(f"  verify rate {rate:,.0f} records/s; goal >= {AUDIT_VERIFY_GOAL:,} records/s: {verdict}", flush=True)


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def rate_line(name: str, cards: int, keys_per_card: int, seconds: float) -> str:
    return f"  {name:34}{cards / seconds:>10.0f}{cards * keys_per_card / seconds:>10.0f}{seconds:>10.2f}"


def ratio_line(name: str, raw_t: list[float], other_t: list[float], goal: float) -> str:
    ratio = statistics.median(raw_t) / statistics.median(other_t)
    rounds = ", ".join(f"{r / o:.1%}" for r, o in zip(raw_t, other_t, strict=True))
    verdict = "met" if ratio >= goal else "NOT met"
    return f"  {name} throughput: {ratio:.1%} of raw (per round: {rounds}); goal >= {goal:.0%}: {verdict}"


def alternate(rounds: int, raw: Callable[[], float], other: Callable[[], float]) -> tuple[list[float], list[float]]:
    """Alternate raw and the other side, and swap who goes first each round, so drift hits both alike."""
    raw_t: list[float] = []
    other_t: list[float] = []
    for i in range(rounds):
        if i % 2:
            other_t.append(other())
            raw_t.append(raw())
        else:
            raw_t.append(raw())
            other_t.append(other())
    return raw_t, other_t


def main() -> int:
    restrict_umask()  # the home, bundles, minutes and exports written here are the user's alone (kms.files)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", type=int, default=3000, help="cards per engine/raw round (default: 3000)")
    parser.add_argument("--e2e-cards", type=int, default=2000,
                        help="cards per end-to-end batch and its raw round (default: 2000)")
    parser.add_argument("--latency-cards", type=int, default=200,
                        help="IssueCard calls timed for the single-card latency (default: 200)")
    parser.add_argument("--per-message", type=int, default=32,
                        help="bundles per streamed message (StreamBatch max_bundles_per_message; default: 32)")
    parser.add_argument("--processes", type=int, default=1,
                        help="HSM worker processes per domain, on every side (default: 1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each comparison (default: 3)")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    parser.add_argument("--audit-records", type=int, default=2000,
                        help="audit records appended per round, one per transaction (default: 2000)")
    parser.add_argument("--verify-records", type=int, default=100_000,
                        help="records in the export the verifier reads (default: 100000)")
    parser.add_argument("--audit-only", action="store_true", help="run only section 4, the audit log")
    args = parser.parse_args()
    for name in ("cards", "e2e_cards", "latency_cards", "processes", "rounds", "audit_records", "verify_records"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.latency_cards < 2:
        parser.error("--latency-cards must be at least 2")

    t0 = time.perf_counter()
    if args.audit_only:
        print(f"kms bench: audit log only; medians of {args.rounds} alternating rounds, baselines measured in the "
              "same run", flush=True)
        bench_audit(args.rounds, args.audit_records, args.verify_records)
        print()
        print(f"bench done in {time.perf_counter() - t0:.0f} s")
        return 0
    home = bench_home(args.home)
    cfg = config.load(home.config)
    profile = profiles.load_dir(cfg.profiles)[PROFILE]
    keys_per_card = sum(len(profile.keys(d)) for d in DOMAINS)
    derivations = sum(len(spec.recipe.steps(make_cards(1, 0)[0])) for d in DOMAINS for spec in profile.keys(d))

    print(f"kms bench: profile {PROFILE}, {keys_per_card} keys per card ({derivations} C_DeriveKey per card); "
          f"{args.processes} HSM process(es) per domain x {len(DOMAINS)} domains on every side; "
          f"medians of {args.rounds} alternating rounds, raw measured in the same run", flush=True)

    # 1. engine vs raw
    cards = make_cards(args.cards, seed=2026)
    raw_t, engine_t = alternate(args.rounds, lambda: run_raw(cfg, cards, args.processes),
                                lambda: run_engine(home.config, cards, args.processes))
    n = len(cards)
    print()
    print(f"1. card key engine in process vs raw PKCS#11 loop, {n} cards per round")
    print(f"  {'':34}{'cards/s':>10}{'keys/s':>10}{'seconds':>10}")
    print(rate_line("raw PKCS#11 loop", n, keys_per_card, statistics.median(raw_t)))
    print(rate_line("kms engine (sealed bundles)", n, keys_per_card, statistics.median(engine_t)))
    print(ratio_line("engine / raw", raw_t, engine_t, 0.90), flush=True)

    # 2. end to end vs raw, 3. single-card latency: one server for both, started (and warmed up) before any timing
    e2e_cards = make_cards(args.e2e_cards, seed=2027)
    latency_cards = make_cards(LATENCY_WARMUP_CALLS + args.latency_cards, seed=2028)
    station_cfg = config.load_station(home.station_config(STATION)).client
    assert station_cfg is not None
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    creates: list[float] = []
    with kms_serve(e2e_config(home, cfg, args.processes)) as port:
        address = f"localhost:{port}"
        with Client(config.load_client(home.client_config(OFFICER)), server=address, timeout=300) as officer, \
                Client(station_cfg, server=address, timeout=300) as station:
            e2e = EndToEnd(officer, station, stamp, args.per_message,
                           lambda batch_id: authorize_batch(home, port, batch_id))
            warmup = make_cards(WARMUP_CARDS, seed=2029)
            e2e.stream(e2e.batch("warmup", warmup)[0], warmup)  # workers spawned and logged in, channels open

            def one_e2e_round() -> float:
                batch_id, created = e2e.batch(f"r{len(creates)}", e2e_cards)
                creates.append(created)
                return e2e.stream(batch_id, e2e_cards)

            raw_e2e_t, e2e_t = alternate(args.rounds, lambda: run_raw(cfg, e2e_cards, args.processes),
                                         one_e2e_round)
            m = len(e2e_cards)
            print()
            print(f"2. end to end: `kms serve` (own process, records in SQLite) -> {STATION} of {BUREAU} over gRPC + "
                  f"mutual TLS, StreamBatch of a fresh {m}-card batch per round, {args.per_message} bundles per "
                  f"message, bundles not opened; raw PKCS#11 loop on the same {m} cards")
            print(f"  {'':34}{'cards/s':>10}{'keys/s':>10}{'seconds':>10}")
            print(rate_line("raw PKCS#11 loop", m, keys_per_card, statistics.median(raw_e2e_t)))
            print(rate_line("kms serve, end to end", m, keys_per_card, statistics.median(e2e_t)))
            print(ratio_line("end-to-end / raw", raw_e2e_t, e2e_t, 0.80))
            print(f"  (not timed: the officer's CreateBatch of {m} cards, median {statistics.median(creates):.2f} s)",
                  flush=True)

            latency_batch = e2e.batch("latency", latency_cards)[0]
            timed = e2e.latencies(latency_batch, latency_cards)[LATENCY_WARMUP_CALLS:]
    ms = [t * 1000 for t in timed]
    print()
    print(f"3. single-card call: IssueCard (unary, one card, sequential calls from one {STATION} client), "
          f"{len(ms)} calls after {LATENCY_WARMUP_CALLS} warm-up calls")
    print(f"  latency p50 {percentile(ms, 50):.1f} ms, p99 {percentile(ms, 99):.1f} ms "
          f"(min {min(ms):.1f}, mean {statistics.fmean(ms):.1f}, max {max(ms):.1f} ms)", flush=True)

    bench_audit(args.rounds, args.audit_records, args.verify_records)
    print()
    print(f"bench done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
