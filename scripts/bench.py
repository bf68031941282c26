"""`make bench`: what kms costs next to raw PKCS#11 loops doing the same token work, measured in the same run.

Every run starts from a fresh development home (--home, default .bench/home, removed and rebuilt): its tokens,
key registry and audit token are new together, so the audit signer's remembered head always matches the records
database the server gets. Each comparison runs --rounds rounds (default 5); rounds alternate the two sides and who
goes first, so machine drift hits both alike. Each figure is reported per round and as min / median / max in a
table at the end, and written as JSON (--summary). A ratio's goal is judged on the median of its per-round ratios.

1. Engine vs raw (goal >= 90 %): kms.issuance.issuer.Issuer in this process, i.e. per-domain worker processes,
   each card's keys derived, KCV'd, wrapped and destroyed in the token, each section signed (ECDSA P-256 in the
   token) and canonically encoded, sections spliced into bundles in the coordinating process. Per round both sides
   start afresh (the engine's workers and a raw process per domain, logged in and warmed up on the same 64 cards,
   not timed); then they take turns block by block (--engine-block cards), who goes first swapped each block, as
   in part 2; each side's round time is the sum of its blocks.
2. End to end vs raw (goal >= 80 %): `kms serve` as a process of its own (gRPC over mutual TLS,
   workers_per_domain HSM worker processes per domain, records in SQLite); per round the --e2e-cards cards are
   split into blocks of --e2e-block cards, each a fresh batch for bureau-a that an officer creates (not timed)
   and a station of bureau-a streams (timed: issuance, records written, bundles received; the station does not
   open them here). The raw side is a fresh process per domain each round, logged in, its plan made and the
   warm-up cards' keys derived before any timing; then the sides take turns block by block (the station streams
   a block's batch, the raw loop derives the same block's keys), who goes first swapped each block, so that the
   host's speed swings hit both alike; each side's round time is the sum of its blocks. `--e2e-only` runs
   parts 2 and 3 alone.
3. Latency of the single-card call: IssueCard (unary, one card per call, sequential calls from one station
   client) after warm-up calls; p50 and p99 per round.
   The server's audit signer is checked before the server stops: an auditor's export must verify offline against
   the audit public key, the server's log must hold no traceback and no failed checkpoint, and after it stops its
   last checkpoint must cover every record. Otherwise the bench fails (exit 1).
4. Station open vs raw unwrap (goal >= 80 %): kms.station.Station.open_many (parse, both sections' signatures
   verified -- the next chunk's in the station's checking process while the token works on this one, SM2 ones in
   that process's own session on the station's token --, every key
   unwrapped into the station's token and its KCV computed, the serials recorded in a fresh ledger, one commit per
   32 bundles, the keys discarded) on --station-cards bundles the station received in round 1 of part 2; the same
   with check_ahead off (every check in the station's process); Station.open (a commit per bundle); against
   scripts/bench_raw.py's unwrap loop: the same keys unwrapped with the same mechanism, key type and template, KCV,
   destroy, nothing else. Per round each side runs in a fresh process of its own, set up and warmed up alike (the
   64 warm-up bundles, the same way as the timed ones); then the sides take turns every 128 bundles, in the orders
   of a balanced Latin square (``turn_orders``: every side in every place, and after every other side, equally
   often), so that what else the machine does hits every side alike. `--station-only` runs just this part
   (its bundles streamed from `kms serve` first, not timed).
5. Audit log (docs/audit.md): (a) append rate, records/s of kms.audit.log.AuditLog.append with one record per
   transaction on SQLite, against plain INSERTs of rows of the same size into a scratch table of the same shape, one
   per transaction, same database; (b) offline verify rate, records/s of kms.audit.verify.verify over an export of
   --verify-records records with a signed checkpoint every 1,000 (goal >= 100,000 records/s), against SHA-256
   alone over the same lines. `--audit-only` runs just this part.

6. Worker services vs spawned pools (goal >= 90 %): the same end-to-end issuance as part 2 (a fresh batch per
   round, streamed by a station, timed) on two servers started side by side from copies of the same records: one
   spawning its HSM worker processes (the default), the other (`workers:` in its kms.yaml, no PIN) reaching each
   domain's workers in a `kms worker` service of its own over a Unix socket; rounds alternate the two. Neither has
   an audit signer here (two record databases cannot share the audit token's signed head; part 2 checks the
   signer). `--workers-only` runs just this part.

Raw: scripts/bench_raw.py. Start-up is never timed: workers are ready and warm-up work is done before a clock
starts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import hashlib
import json
import multiprocessing
import os
import random
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_raw

from kms import bundle, config, runtime, store
from kms.audit.log import AuditLog, Seal, checkpoint_message, export_lines, mask_pan, seal_message
from kms.audit.verify import verify
from kms.canonical import canonical
from kms.cards import profiles
from kms.cards.cardid import CardIdentity, with_luhn_digit
from kms.client.audit import AuditClient
from kms.client.service import Client
from kms.clock import SystemClock, rfc3339
from kms.dev.ceremonies import authorize_batch
from kms.dev.home import AUDITORS, FORMAT_FILE, Home, init_home, profile_file
from kms.dev.services import terminate
from kms.dev.workers import split_home
from kms.errors import KmsError
from kms.files import restrict_umask, write_private
from kms.hsm.labels import AUDIT_KEY, key_label
from kms.identity import Principal
from kms.issuance.issuer import Issuer
from kms.issuance.sealer import DomainKeys
from kms.registry import DOMAINS, KeyKind
from kms.runtime import registry as open_registry
from kms.station import OpenReport, Station, TrustStore

PROFILE = "dual-app-v1"  # the card profile benched: --profile sets it (main), e.g. dual-app-sm-v1
BUREAU = "bureau-a"
STATION = "station-a1"  # a station of BUREAU
OFFICER = Principal("officer", "alice", domain="hrss")
AUDITOR = Principal("auditor", AUDITORS[0])
DEFAULT_HOME = Path(".bench/home")
DEFAULT_SUMMARY = Path(".bench/summary.json")
BENCH_MARKER = ".kms-bench-home"  # a home the bench made, and may remove on its next run
E2E_CONFIG = "kms-bench-e2e.yaml"  # next to kms.yaml in the home, so its relative paths hold
E2E_DATABASE = "bench-e2e.db"
SERVER_LOG = "bench-server.log"
STATION_CHUNK = 32  # bundles per ledger commit in Station.open_many (one StreamBatch message by default)
WARMUP_CARDS = 64
LATENCY_WARMUP_CALLS = 10
#: What the server's log must never hold in a bench run: the audit signer failing, or any traceback.
SERVER_LOG_FAILURES = ("Traceback", "AuditChainBroken", "checkpoint failed")


class BenchFailed(SystemExit):
    """The run is not to be trusted (a side did the wrong work, or the audit signer failed): exit 1, loudly."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"bench: FAILED: {reason}")


def make_cards(n: int, seed: int) -> list[CardIdentity]:
    rng = random.Random(seed)
    return [
        CardIdentity(card_ref=f"bench-{i:07d}", city_code="320200", card_serial=f"{rng.getrandbits(64):016X}",
                     pan=with_luhn_digit(f"621483{rng.randrange(10**12):012d}"), psn=f"{rng.randrange(100):02d}",
                     kdd=f"{rng.getrandbits(80):020X}")
        for i in range(n)
    ]


# --- figures: per round, min / median / max, goals, the table and the JSON summary --------------------------------

@dataclass
class Figure:
    key: str  # machine name, e.g. "station.ratio"
    label: str
    unit: str  # "cards/s", "keys/s", "bundles/s", "records/s", "ms", "ratio"
    values: list[float]  # one per round
    goal: float | None = None  # the median must reach it (ratios: a fraction; rates: per second)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def met(self) -> bool | None:
        return None if self.goal is None else self.median >= self.goal

    def show(self, value: float) -> str:
        if self.unit == "ratio":
            return f"{value:.1%}"
        if self.unit == "ms":
            return f"{value:.1f}"
        return f"{value:,.0f}"

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"label": self.label, "unit": self.unit, "rounds": [round(v, 6) for v in self.values],
                               "min": round(min(self.values), 6), "median": round(self.median, 6),
                               "max": round(max(self.values), 6)}
        if self.goal is not None:
            doc.update(goal=self.goal, met=self.met)
        return doc


@dataclass
class Summary:
    figures: list[Figure] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def rates(self, key: str, label: str, unit: str, n: int, times: list[float], goal: float | None = None
              ) -> Figure:
        """``n`` items per round over each round's seconds."""
        return self.add(Figure(key, label, unit, [n / t for t in times], goal))

    def ratio(self, key: str, label: str, base_t: list[float], other_t: list[float], goal: float | None = None
              ) -> Figure:
        """The other side's throughput over the baseline's, paired per round (the same round's two timings)."""
        return self.add(Figure(key, label, "ratio", [b / o for b, o in zip(base_t, other_t, strict=True)], goal))

    def table(self) -> str:
        width = max(len(f.label) for f in self.figures) + 2
        lines = [f"{'':{width}}{'unit':>10}{'min':>11}{'median':>11}{'max':>11}  goal",
                 f"{'':{width}}{'':>10}{'':>11}{'':>11}{'':>11}"]
        lines.pop()
        for f in self.figures:
            unit = "" if f.unit == "ratio" else f.unit
            goal = "" if f.goal is None else (
                f">= {f.show(f.goal)}: {'met' if f.met else 'NOT met'}")
            lines.append(f"{f.label:{width}}{unit:>10}{f.show(min(f.values)):>11}{f.show(f.median):>11}"
                         f"{f.show(max(f.values)):>11}  {goal}".rstrip())
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        doc = {"figures": {f.key: f.as_json() for f in self.figures}, **self.notes}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, json.dumps(doc, indent=2) + "\n")


def per_round(figure: Figure) -> str:
    return ", ".join(figure.show(v) for v in figure.values)


def ratio_line(figure: Figure, base: str) -> str:
    goal = "" if figure.goal is None else f"; goal >= {figure.goal:.0%}: {'met' if figure.met else 'NOT met'}"
    return f"  {figure.label.split(' ', 1)[1]}: median {figure.show(figure.median)} of {base} (per round: " \
           f"{per_round(figure)}){goal}"


def rate_line(name: str, cards: int, keys_per_card: int, times: list[float], unit: str = "cards/s") -> str:
    seconds = statistics.median(times)
    return f"  {name:34}{cards / seconds:>10.0f}{cards * keys_per_card / seconds:>10.0f}{seconds:>10.2f}"


def alternate(rounds: int, raw: Callable[[], float], other: Callable[[], float]) -> tuple[list[float], list[float]]:
    """Alternate raw and the other side, and swap who goes first each round, so drift hits both alike."""
    raw_t, other_t = interleave(rounds, raw, other)
    return raw_t, other_t


def interleave(rounds: int, *sides: Callable[[], float]) -> list[list[float]]:
    """Each side once per round, the order rotated by one each round (so each side goes first in turn)."""
    times: list[list[float]] = [[] for _ in sides]
    for i in range(rounds):
        for k in range(len(sides)):
            j = (i + k) % len(sides)
            times[j].append(sides[j]())
    return times


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


# --- the bench home: a fresh one per run ------------------------------------------------------------------------

def fresh_home(path: Path, profile: str = "dual-app") -> Home:
    """A new development home at ``path``: what an earlier run left there is removed first, so the key registry,
    the tokens and the audit token's signed head all start together (a records database of one run with the audit
    token of another is what made every checkpoint fail: AuditChainBroken). Only a directory the bench made (or the
    default .bench/home of an older bench) is ever removed."""
    if path.exists() and any(path.iterdir()):
        legacy = path.resolve() == DEFAULT_HOME.resolve() and (path / FORMAT_FILE).exists()
        if not (path / BENCH_MARKER).exists() and not legacy:
            raise SystemExit(f"bench: {path} is not a home the bench made (no {BENCH_MARKER}); name a new or empty "
                             "directory with --home")
        shutil.rmtree(path)
    started = time.perf_counter()
    home = init_home(path, card_profiles=(profile,))
    write_private(home.path / BENCH_MARKER, "made by scripts/bench.py: removed and made again on its next run\n")
    print(f"bench: a fresh development home in {path} ({time.perf_counter() - started:.0f} s, not timed)",
          flush=True)
    return home


# --- 1. engine vs raw ---------------------------------------------------------------------------------------------

def engine_round(config_path: Path, cfg: config.Config, r: int, cards: list[CardIdentity],
                 warmup: list[CardIdentity], block: int, processes: int) -> tuple[float, float]:
    """One round of part 1: the engine (kms.issuance.issuer.Issuer, its per-domain worker processes spawned, logged
    in and warmed up on ``warmup``, not timed) and the raw side (a fresh process per domain, logged in, its plan
    made and ``warmup``'s keys derived, not timed; part 2's RawIssuing); then, block by block of ``block`` cards,
    the engine seals the block's bundles and the raw loop derives the same block's keys, who goes first swapped each
    block, so that the host's speed swings hit both alike. Returns the raw side's seconds and the engine's (each
    its blocks' sum)."""
    blocks = [(lo, cards[lo:lo + block]) for lo in range(0, len(cards), block)]
    times: dict[str, list[float]] = {"raw": [], "kms": []}
    with Issuer.from_config(config_path, BUREAU, PROFILE, processes_per_domain=processes) as issuer:
        for issued in issuer.issue(warmup, "bench-warmup"):  # workers up and logged in
            assert issued.data is not None, issued.error
        raw = RawIssuing(cfg, cards, warmup, processes)
        try:
            for i, (lo, part) in enumerate(blocks):
                for side in (("raw", "kms") if (r + i) % 2 == 0 else ("kms", "raw")):
                    times[side].append(raw.run(lo, lo + len(part)) if side == "raw"
                                       else _engine_block(issuer, part, f"bench-r{r}b{i}"))
        finally:
            raw.close()
    ratios = ", ".join(f"{b / k:.0%}" for b, k in zip(times["raw"], times["kms"], strict=True))
    print(f"  round {r + 1}: engine / raw per block {ratios}", flush=True)
    return sum(times["raw"]), sum(times["kms"])


def _engine_block(issuer: Issuer, cards: list[CardIdentity], batch_id: str) -> float:
    """Seconds for the engine to seal every card's bundle of ``cards``."""
    started = time.perf_counter()
    count = 0
    for issued in issuer.issue(cards, batch_id):
        assert issued.data is not None, issued.error
        count += 1
    elapsed = time.perf_counter() - started
    if count != len(cards):
        raise BenchFailed(f"the engine sealed {count} bundles of {len(cards)}")
    return elapsed


RawJob = tuple[Any, ...]  # bench_raw.Deriver's arguments for one process


def raw_jobs(cfg: config.Config, cards: list[CardIdentity]) -> list[tuple[RawJob, int]]:
    """Per domain: the raw loop's arguments for ``cards`` (module, token, PIN, the plan: every key of every card,
    the transport key, the vendor codes) and the keys per card of that domain."""
    registry = open_registry(cfg, SystemClock())
    profile = profiles.load_dir(cfg.profiles)[PROFILE]
    module = cfg.hsm.module_path()
    conf = str(cfg.hsm.softhsm2_conf)
    codes = raw_codes(cfg)
    jobs = []
    for domain in DOMAINS:
        masters = {n: registry.active(domain, KeyKind.MASTER, n).label for n in profile.master_keys(domain)}
        transport = DomainKeys.transport_key(registry, domain, BUREAU, profile.transport(domain))
        plan = [(masters[spec.master_key], [(step.value, data) for step, data in spec.recipe.steps(c)],
                 spec.algorithm.value)
                for c in cards for spec in profile.keys(domain)]
        pin = cfg.secret(cfg.domains[domain].pin)
        jobs.append(((module, conf, cfg.domains[domain].token, pin, plan, transport.label, transport.algorithm,
                      codes), len(profile.keys(domain))))
    return jobs


def raw_codes(cfg: config.Config | config.StationConfig) -> dict[str, int]:
    """The vendor mechanism codes the raw loops need on this token (the configured mechanism profile's SM codes;
    empty for pkcs11-standard): the raw loops call the token straight through python-pkcs11, as kms does."""
    return dict(cfg.hsm.profile().codes)


def bench_engine(args: Any, home: Home, cfg: config.Config, keys_per_card: int, summary: Summary) -> None:
    cards = make_cards(args.cards, seed=2026)
    warmup = make_cards(WARMUP_CARDS, seed=2030)
    print(f"\n1. engine, {args.rounds} rounds of {len(cards)} cards in blocks of {args.engine_block}", flush=True)
    raw_t, engine_t = [], []
    for r in range(args.rounds):
        raw_seconds, engine_seconds = engine_round(home.config, cfg, r, cards, warmup, args.engine_block,
                                                   args.processes)
        raw_t.append(raw_seconds)
        engine_t.append(engine_seconds)
    n = len(cards)
    summary.rates("engine.raw", "1. raw PKCS#11 loop", "cards/s", n, raw_t)
    summary.rates("engine.kms", "1. kms engine", "cards/s", n, engine_t)
    ratio = summary.ratio("engine.ratio", "1. engine / raw", raw_t, engine_t, 0.90)
    print()
    print(f"1. card key engine in process vs raw PKCS#11 loop, {n} cards per round in {-(-n // args.engine_block)} "
          "block(s), the sides taking turns block by block, who goes first swapped each block")
    print(f"  {'(medians)':34}{'cards/s':>10}{'keys/s':>10}{'seconds':>10}")
    print(rate_line("raw PKCS#11 loop", n, keys_per_card, raw_t))
    print(rate_line("kms engine (sealed bundles)", n, keys_per_card, engine_t))
    print(ratio_line(ratio, "raw"), flush=True)


# --- 2. and 3. end to end: `kms serve` in a process of its own, an officer and a station over gRPC + mutual TLS --

def e2e_config(home: Home, cfg: config.Config, processes: int) -> Path:
    """The home's configuration with `processes` HSM workers per domain and a records database of its own (an
    online copy of the home's database, so the key registry is the same; the home, and with it the audit token,
    is fresh in every run, so the copy and the audit signer's signed head belong together)."""
    prefix = "sqlite:///"
    if not cfg.database.startswith(prefix):
        raise SystemExit(f"bench: the bench home's database must be SQLite, not {cfg.database}")
    target = home.path / E2E_DATABASE
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
    write_private(path, yaml.safe_dump(doc, sort_keys=False))
    return path


@contextmanager
def kms_serve(config_path: Path, log_path: Path) -> Iterator[int]:
    """`kms serve` as a process of its own on a free port of 127.0.0.1, its log (stderr) in ``log_path``; always
    stopped (SIGTERM, then wait). A server that does not start, or does not exit with status 0, fails the bench."""
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kms.cli", "serve", "--config", str(config_path), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("kms: serving on port "):
                raise BenchFailed(f"the server did not start: {line!r}; its log: {log_path}\n{tail(log_path)}")
            yield int(line.rsplit(" ", 1)[1])
        finally:
            stop(proc)
    if proc.returncode != 0:
        raise BenchFailed(f"kms serve exited with status {proc.returncode}; its log: {log_path}\n{tail(log_path)}")


def stop(proc: subprocess.Popen[str]) -> None:
    """Ends a service the bench started: SIGTERM (it drains), SIGKILL after 60 s; its stdout pipe closed."""
    terminate(proc, 60)


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


@dataclass
class EndToEnd:
    officer: Client
    station: Client
    stamp: str
    per_message: int
    authorize: Callable[[str], object]  # both domains' authorize-batch ceremonies (not timed)

    def batch(self, name: str, cards: list[CardIdentity]) -> tuple[str, float]:
        """A fresh batch for BUREAU, created by the officer; its id and the seconds creating it took."""
        batch_id = f"bench-{self.stamp}-{name}"
        started = time.perf_counter()
        status = self.officer.create_batch(batch_id, BUREAU, PROFILE, cards)
        assert status.cards == len(cards), status
        seconds = time.perf_counter() - started
        self.authorize(batch_id)
        return batch_id, seconds

    def stream(self, batch_id: str, cards: list[CardIdentity], keep: list[bytes] | None = None) -> float:
        """Seconds for the station to receive every bundle of the batch (issued, recorded, streamed); the bundles
        are added to ``keep`` if given."""
        received = []
        started = time.perf_counter()
        for sealed in self.station.stream_batch(batch_id, per_message=self.per_message):
            received.append(sealed)
        elapsed = time.perf_counter() - started
        refs = [b.card_ref for b in received]
        if refs != [c.card_ref for c in cards] or not all(b.data for b in received):
            raise BenchFailed(f"{batch_id}: {len(refs)} of {len(cards)} bundles received")
        issued = self.station.batch_status(batch_id).issued
        if issued != len(cards):
            raise BenchFailed(f"{batch_id}: {issued} of {len(cards)} cards recorded as issued")
        if keep is not None:
            keep.extend(b.data for b in received)
        return elapsed

    def latencies(self, batch_id: str, cards: list[CardIdentity]) -> list[float]:
        """Seconds per IssueCard call, one card each, sequentially."""
        result = []
        for card in cards:
            started = time.perf_counter()
            sealed = self.station.issue_card(batch_id, card.card_ref)
            result.append(time.perf_counter() - started)
            if not sealed.data or sealed.card_ref != card.card_ref:
                raise BenchFailed(f"IssueCard {card.card_ref}: no bundle")
        return result


def check_audit_export(home: Home, address: str) -> str:
    """An auditor's export of the whole log, verified offline with the audit public key: the signer signed a
    checkpoint and a seal over the chain this run wrote."""
    with Client(config.load_client(home.client_config(AUDITOR)), server=address, timeout=300) as client:
        nonce = secrets.token_hex(16)
        try:
            lines = [line for chunk in AuditClient(client).export(nonce=nonce) for line in chunk]
        except KmsError as error:
            raise BenchFailed(f"the audit signer failed during the run: the auditor's export was refused: {error}"
                              ) from None
    public_key = load_pem_public_key((home.path / "audit" / "audit-v1.pem").read_bytes())
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    verdict = verify(lines, public_key, nonce=nonce)
    if not verdict.ok or verdict.checkpoints == 0:
        raise BenchFailed(f"the audit signer failed during the run: the auditor's export: {verdict.summary()}")
    return verdict.summary()


def check_signer_after(home: Home, log_path: Path) -> dict[str, int]:
    """After the server stopped: no traceback or failed checkpoint in its log, and its last checkpoint (signed at
    shutdown) covers every record of the run."""
    text = log_path.read_text(encoding="utf-8", errors="replace")
    found = [marker for marker in SERVER_LOG_FAILURES if marker in text]
    if found:
        raise BenchFailed(f"the server's log ({log_path}) holds {', '.join(map(repr, found))}:\n{tail(log_path)}")
    engine = store.make_engine(f"sqlite:///{home.path / E2E_DATABASE}")
    try:
        audit = AuditLog(engine, SystemClock())
        records, _ = audit.head()
        last = audit.last_checkpoint()
        with engine.connect() as conn:
            checkpoints = conn.execute(sa.select(sa.func.count()).select_from(store.audit_checkpoints)).scalar_one()
    finally:
        engine.dispose()
    covered = last.size if last is not None else 0
    if covered != records:
        raise BenchFailed(f"the audit signer failed during the run: the last signed checkpoint covers {covered} of "
                          f"{records} records (log: {log_path})")
    return {"records": records, "checkpoints": checkpoints, "covered": covered}


E2E_BLOCK = 500  # cards per timed block of part 2 (a batch of its own); the sides take turns block by block


def raw_issuing_worker(conn: Any, job: RawJob, warmup_keys: int) -> None:
    """Part 2's raw side for one domain in a process of its own (fresh per round: SoftHSM frees destroyed session
    objects only at C_Finalize). Logged in, every key's work made and the warm-up keys (the first
    ``warmup_keys`` of the plan) derived before any timing; then answers ``(lo, hi)`` with the keys it derived of
    plan[lo:hi] (the parent times the block), until told None."""
    deriver = bench_raw.Deriver(*job)
    try:
        deriver.derive(0, warmup_keys)
        conn.send("ready")
        while (block := conn.recv()) is not None:
            conn.send(deriver.derive(*block))
    finally:
        deriver.close()
        conn.close()


class RawIssuing:
    """The raw side of a round of parts 1 and 2: scripts/bench_raw.py's derive loop, ``processes`` processes per
    domain (each a share of every block's cards), on ``cards`` after the warm-up cards (derived as kms's warm-up
    batch was, not timed). ``run(lo, hi)``: seconds for every domain's processes to make the keys of cards[lo:hi]
    at once."""

    def __init__(self, cfg: config.Config, cards: list[CardIdentity], warmup: list[CardIdentity], processes: int
                 ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._procs: list[tuple[Any, Any, int]] = []  # (pipe, process, keys per card)
        self._processes, self._offset, self._cards = processes, len(warmup), len(cards)
        try:
            for job, keys_per_card in raw_jobs(cfg, warmup + cards):
                for _ in range(processes):
                    parent, child = ctx.Pipe()
                    proc = ctx.Process(target=raw_issuing_worker, args=(child, job, len(warmup) * keys_per_card),
                                       daemon=True)
                    proc.start()
                    child.close()
                    self._procs.append((parent, proc, keys_per_card))
            for parent, _, _ in self._procs:
                if not parent.poll(300) or self._answer(parent) != "ready":
                    raise BenchFailed("a raw process did not start")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _answer(conn: Any) -> Any:
        try:
            return conn.recv()
        except EOFError:
            raise BenchFailed("a raw process died (its error is above)") from None

    def run(self, lo: int, hi: int) -> float:
        share = -(-(hi - lo) // self._processes)
        expected = 0
        started = time.perf_counter()
        for i, (parent, _, per_card) in enumerate(self._procs):
            p = i % self._processes
            first, last = self._offset + min(hi, lo + p * share), self._offset + min(hi, lo + (p + 1) * share)
            parent.send((first * per_card, last * per_card))
            expected += (last - first) * per_card
        done = sum(self._answer(parent) for parent, _, _ in self._procs)
        elapsed = time.perf_counter() - started
        if done != expected:
            raise BenchFailed(f"the raw loop made {done} keys of {expected}")
        return elapsed

    def close(self) -> None:
        for parent, proc, _ in self._procs:
            with contextlib.suppress(OSError):
                parent.send(None)
            proc.join(60)
            if proc.is_alive():
                proc.kill()
                proc.join()
            parent.close()
        self._procs = []


def e2e_round(e2e: EndToEnd, cfg: config.Config, r: int, cards: list[CardIdentity], warmup: list[CardIdentity],
              block: int, processes: int, keep: list[bytes] | None) -> tuple[float, float, float]:
    """One round of part 2: the round's cards as batches of ``block`` cards, created and authorized (not timed),
    and the raw side's processes started, logged in and warmed up (not timed); then, block by block, the station
    streams a batch and the raw loop derives the same block's keys, who goes first swapped each block, so that
    what else the machine does hits both sides alike. Returns the raw side's seconds, kms's (each its blocks'
    sum) and the seconds the officer's CreateBatch calls took."""
    blocks = [cards[lo:lo + block] for lo in range(0, len(cards), block)]
    batches = [e2e.batch(f"r{r}b{i}", part) for i, part in enumerate(blocks)]
    raw = RawIssuing(cfg, cards, warmup, processes)
    times: dict[str, list[float]] = {"raw": [], "kms": []}
    try:
        for i, (part, (batch_id, _)) in enumerate(zip(blocks, batches, strict=True)):
            lo = i * block
            for side in (("raw", "kms") if (r + i) % 2 == 0 else ("kms", "raw")):
                times[side].append(raw.run(lo, lo + len(part)) if side == "raw"
                                   else e2e.stream(batch_id, part, keep=keep))
    finally:
        raw.close()
    ratios = ", ".join(f"{b / k:.0%}" for b, k in zip(times["raw"], times["kms"], strict=True))
    print(f"  round {r + 1}: kms / raw per block {ratios}", flush=True)
    return sum(times["raw"]), sum(times["kms"]), sum(seconds for _, seconds in batches)


def bench_service(args: Any, home: Home, cfg: config.Config, keys_per_card: int, summary: Summary
                  ) -> tuple[list[bytes], list[bytes]]:
    """Parts 2 and 3 on one server, started (and warmed up) before any timing. Returns the bundles the station
    received in the warm-up and in round 1 (for part 4)."""
    e2e_cards = make_cards(args.e2e_cards, seed=2027)
    latency_cards = make_cards(args.rounds * (LATENCY_WARMUP_CALLS + args.latency_cards), seed=2028)
    station_cfg = config.load_station(home.station_config(STATION)).client
    assert station_cfg is not None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    creates: list[float] = []
    warmup_bundles: list[bytes] = []
    bundles: list[bytes] = []
    log_path = home.path / SERVER_LOG
    with kms_serve(e2e_config(home, cfg, args.processes), log_path) as port:
        address = f"localhost:{port}"
        with Client(config.load_client(home.client_config(OFFICER)), server=address, timeout=300) as officer, \
                Client(station_cfg, server=address, timeout=300) as station:
            e2e = EndToEnd(officer, station, stamp, args.per_message,
                           lambda batch_id: authorize_batch(home, port, batch_id))
            warmup = make_cards(WARMUP_CARDS, seed=2029)
            # workers spawned and logged in, channels open
            e2e.stream(e2e.batch("warmup", warmup)[0], warmup, keep=warmup_bundles)

            raw_e2e_t, e2e_t = [], []
            print(f"\n2. end to end, {args.rounds} rounds of {len(e2e_cards)} cards in blocks of {args.e2e_block}",
                  flush=True)
            for r in range(args.rounds):
                raw_seconds, kms_seconds, created = e2e_round(
                    e2e, cfg, r, e2e_cards, warmup, args.e2e_block, args.processes, bundles if r == 0 else None)
                raw_e2e_t.append(raw_seconds)
                e2e_t.append(kms_seconds)
                creates.append(created)
            m = len(e2e_cards)
            summary.rates("e2e.raw", "2. raw PKCS#11 loop", "cards/s", m, raw_e2e_t)
            summary.rates("e2e.kms", "2. kms serve, end to end", "cards/s", m, e2e_t)
            ratio = summary.ratio("e2e.ratio", "2. end-to-end / raw", raw_e2e_t, e2e_t, 0.80)
            print()
            blocks = -(-m // args.e2e_block)
            print(f"2. end to end: `kms serve` (own process, records in SQLite) -> {STATION} of {BUREAU} over gRPC + "
                  f"mutual TLS, StreamBatch of fresh batches of {args.e2e_block} cards, {args.per_message} bundles "
                  f"per message, bundles not opened; raw PKCS#11 loop (a fresh process per domain per round) on the "
                  f"same cards; {m} cards per round in {blocks} block(s), the sides taking turns block by block, "
                  "who goes first swapped each block")
            print(f"  {'(medians)':34}{'cards/s':>10}{'keys/s':>10}{'seconds':>10}")
            print(rate_line("raw PKCS#11 loop", m, keys_per_card, raw_e2e_t))
            print(rate_line("kms serve, end to end", m, keys_per_card, e2e_t))
            print(ratio_line(ratio, "raw"))
            print(f"  (not timed: the officer's CreateBatch of the round's {m} cards, median "
                  f"{statistics.median(creates):.2f} s)",
                  flush=True)

            latency_batch = e2e.batch("latency", latency_cards)[0]
            p50, p99 = [], []
            per_round_calls = LATENCY_WARMUP_CALLS + args.latency_cards
            for r in range(args.rounds):
                cards = latency_cards[r * per_round_calls:(r + 1) * per_round_calls]
                ms = [t * 1000 for t in e2e.latencies(latency_batch, cards)[LATENCY_WARMUP_CALLS:]]
                p50.append(percentile(ms, 50))
                p99.append(percentile(ms, 99))
            summary.add(Figure("latency.p50", "3. IssueCard latency p50", "ms", p50))
            summary.add(Figure("latency.p99", "3. IssueCard latency p99", "ms", p99))
            print()
            print(f"3. single-card call: IssueCard (unary, one card, sequential calls from one {STATION} client), "
                  f"{args.latency_cards} calls per round after {LATENCY_WARMUP_CALLS} warm-up calls")
            print(f"  p50 per round (ms): {', '.join(f'{v:.1f}' for v in p50)}; median {statistics.median(p50):.1f}")
            print(f"  p99 per round (ms): {', '.join(f'{v:.1f}' for v in p99)}; median {statistics.median(p99):.1f}",
                  flush=True)
            exported = check_audit_export(home, address)
    state = check_signer_after(home, log_path)
    summary.notes["audit_signer"] = {**state, "export": exported}
    print(f"  audit signer: {exported}; after shutdown, {state['checkpoints']} checkpoints, the last covering all "
          f"{state['records']} records; no traceback in the server's log", flush=True)
    return warmup_bundles, bundles


# --- 6. domain worker services vs spawned pools ------------------------------------------------------------------

WORKERS_SPAWNED = "bench-workers-spawned"  # configuration and records of part 6's two servers, in the home
WORKERS_REMOTE = "bench-workers-remote"


def workers_config(home: Home, cfg: config.Config, name: str, processes: int) -> Path:
    """The home's configuration without the audit signer, with ``processes`` workers per domain and records of its
    own (an online copy of the home's database: the same key registry)."""
    prefix = "sqlite:///"
    source, copy = sqlite3.connect(cfg.database.removeprefix(prefix)), sqlite3.connect(home.path / f"{name}.db")
    try:
        source.backup(copy)
    finally:
        source.close()
        copy.close()
    doc = yaml.safe_load(home.config.read_text(encoding="utf-8"))
    doc.pop("audit", None)
    doc.update(database=f"sqlite:///{name}.db", workers_per_domain=processes)
    path = home.path / f"{name}.yaml"
    write_private(path, yaml.safe_dump(doc, sort_keys=False))
    return path


@contextmanager
def worker_services(config_path: Path, log_dir: Path) -> Iterator[Path]:
    """`kms worker` for each domain (its sockets in a short temporary directory), ready before this yields the
    front end's configuration; each stopped with SIGTERM after, and must exit with status 0."""
    sockets = Path(tempfile.mkdtemp(prefix="kms-bench-", dir="/tmp"))
    layout = split_home(config_path, sockets, DOMAINS)
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for domain in DOMAINS:
            with (log_dir / f"bench-worker-{domain}.log").open("w", encoding="utf-8") as log:
                procs[domain] = subprocess.Popen([sys.executable, "-m", "kms.cli", *layout.command(domain)],
                                                 stdout=subprocess.PIPE, stderr=log, text=True)
            line = procs[domain].stdout.readline() if procs[domain].stdout is not None else ""
            if not line.startswith(f"kms: worker {domain} serving on "):
                raise BenchFailed(f"the {domain} worker service did not start: {line!r}; its log: "
                                  f"{log_dir / f'bench-worker-{domain}.log'}")
        yield layout.front
    finally:
        for domain, proc in procs.items():
            stop(proc)
            if proc.returncode != 0:
                raise BenchFailed(f"kms worker --domain {domain} exited with status {proc.returncode}")
        shutil.rmtree(sockets, ignore_errors=True)


def bench_workers(args: Any, home: Home, cfg: config.Config, keys_per_card: int, summary: Summary) -> None:
    cards = make_cards(args.workers_cards, seed=2031)
    warmup = make_cards(WARMUP_CARDS, seed=2032)
    station_cfg = config.load_station(home.station_config(STATION)).client
    assert station_cfg is not None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    spawned_path = workers_config(home, cfg, WORKERS_SPAWNED, args.processes)
    remote_path = workers_config(home, cfg, WORKERS_REMOTE, args.processes)
    with kms_serve(spawned_path, home.path / f"{WORKERS_SPAWNED}.log") as spawned_port, \
            worker_services(remote_path, home.path) as front, \
            kms_serve(front, home.path / f"{WORKERS_REMOTE}.log") as remote_port:
        sides = {}
        clients = []
        for name, port in (("spawned", spawned_port), ("remote", remote_port)):
            address = f"localhost:{port}"
            officer = Client(config.load_client(home.client_config(OFFICER)), server=address, timeout=300)
            station = Client(station_cfg, server=address, timeout=300)
            clients += [officer, station]
            sides[name] = EndToEnd(officer, station, f"{stamp}-{name}", args.per_message,
                                   lambda batch_id, port=port: authorize_batch(home, port, batch_id))
        try:
            for e2e in sides.values():  # workers logged in, channels open, before any timing
                e2e.stream(e2e.batch("warmup", warmup)[0], warmup)
            rounds: dict[str, int] = {"spawned": 0, "remote": 0}

            def one_round(name: str) -> float:
                e2e = sides[name]
                rounds[name] += 1
                batch_id, _ = e2e.batch(f"w{rounds[name]}", cards)
                return e2e.stream(batch_id, cards)

            spawned_t, remote_t = alternate(args.rounds, lambda: one_round("spawned"), lambda: one_round("remote"))
        finally:
            for client in clients:
                client.close()
    n = len(cards)
    summary.rates("workers.spawned", "6. kms serve, spawned workers", "cards/s", n, spawned_t)
    summary.rates("workers.remote", "6. kms serve, worker services", "cards/s", n, remote_t)
    ratio = summary.ratio("workers.ratio", "6. worker services / spawned", spawned_t, remote_t, 0.90)
    print()
    print(f"6. worker services: `kms serve` with each domain's workers in a `kms worker` service (Unix socket) vs "
          f"spawned by it, StreamBatch of a fresh {n}-card batch per round on each")
    print(f"  {'(medians)':34}{'cards/s':>10}{'keys/s':>10}{'seconds':>10}")
    print(rate_line("spawned worker processes", n, keys_per_card, spawned_t))
    print(rate_line("domain worker services", n, keys_per_card, remote_t))
    print(ratio_line(ratio, "spawned"), flush=True)


# --- 4. station open vs raw unwrap --------------------------------------------------------------------------------

def station_bundles(args: Any, home: Home, cfg: config.Config) -> tuple[list[bytes], list[bytes]]:
    """For --station-only: the bundles part 4 opens, streamed by the station from `kms serve` (not timed): the
    warm-up batch's and one batch of --station-cards."""
    station_cfg = config.load_station(home.station_config(STATION)).client
    assert station_cfg is not None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    warmup_bundles: list[bytes] = []
    bundles: list[bytes] = []
    with kms_serve(e2e_config(home, cfg, args.processes), home.path / SERVER_LOG) as port:
        address = f"localhost:{port}"
        with Client(config.load_client(home.client_config(OFFICER)), server=address, timeout=300) as officer, \
                Client(station_cfg, server=address, timeout=300) as station:
            e2e = EndToEnd(officer, station, stamp, args.per_message,
                           lambda batch_id: authorize_batch(home, port, batch_id))
            warmup, cards = make_cards(WARMUP_CARDS, seed=2029), make_cards(args.station_cards, seed=2027)
            e2e.stream(e2e.batch("warmup", warmup)[0], warmup, keep=warmup_bundles)
            e2e.stream(e2e.batch("station", cards)[0], cards, keep=bundles)
    print(f"bench: {len(warmup_bundles)} + {len(bundles)} bundles received for part 4 (not timed)", flush=True)
    return warmup_bundles, bundles


STATION_BLOCK = 4 * STATION_CHUNK  # bundles per timed block of part 4; the sides take turns block by block


class RawSide:
    """Part 4's raw side in its worker process: scripts/bench_raw.py's unwrap loop on the station's token."""

    def __init__(self, module: str, softhsm2_conf: str, token: str, pin: str, codes: dict[str, int]) -> None:
        self._unwrapper = bench_raw.Unwrapper(module, softhsm2_conf, token, pin, codes)

    def run_plan(self, plan: list[tuple[str, str, list[tuple[bytes, str]]]]) -> tuple[int, int]:
        """Keys unwrapped (and 0 bad: the raw loop checks nothing)."""
        return self._unwrapper.unwrap(plan), 0

    def close(self) -> None:
        self._unwrapper.close()


class StationSide:
    """Part 4's station side in its worker process, as `kms station fetch --open` or `kms bundle open` would open
    bundles: Station.open_many (``chunk`` bundles per ledger commit) or, with chunk 0, Station.open (a commit per
    bundle); keys checked, not stored; serials recorded in a fresh ledger of its own."""

    def __init__(self, station_config: str, ledger_url: str, chunk: int, check_ahead: bool = True) -> None:
        cfg = config.load_station(Path(station_config))
        self._ledger = store.make_engine(ledger_url)
        store.create_station_ledger(self._ledger)
        self._session = runtime.open_station(cfg)
        self._station = Station(cfg.name, cfg.bureau, cfg.domains, self._session, TrustStore.load(cfg.trust),
                                self._ledger, SystemClock(), check_ahead=check_ahead,
                                checking_token=functools.partial(runtime.open_station, cfg))
        self._chunk = chunk

    def run(self, bundles: list[bytes]) -> tuple[int, int]:
        """Keys checked, and bundles refused or with a KCV that does not match."""
        keys = bad = 0
        if self._chunk:
            for result in self._station.open_many(bundles, chunk=self._chunk):
                if isinstance(result, OpenReport):
                    keys += len(result.keys)
                    bad += not result.ok
                else:
                    bad += 1
        else:
            for data in bundles:
                report = self._station.open(data)
                keys += len(report.keys)
                bad += not report.ok
        return keys, bad

    def close(self) -> None:
        self._station.close()
        self._session.close()
        self._ledger.dispose()


def side_worker(conn: Any, kind: str, setup: tuple[Any, ...], warmup: list[bytes], bundles: list[bytes]) -> None:
    """One side of part 4 in a process of its own (fresh per round: SoftHSM frees destroyed session objects only
    at C_Finalize, so every round starts from the same token state). Set up and warm up (the warm-up bundles, the
    same way as the timed ones; not timed), then answer ``(lo, hi)`` with the seconds, keys and bad bundles of
    bundles[lo:hi] until told None. The raw side's unwrap plan (labels and wrapped keys, parsed here) is made
    before any timing, so it times token work only."""
    side: RawSide | StationSide = RawSide(*setup) if kind == "raw" else StationSide(*setup)
    try:
        if isinstance(side, RawSide):
            side.run_plan(unwrap_plan(warmup))
            plans = [unwrap_plan([data]) for data in bundles]
        else:
            side.run(warmup)
        conn.send("ready")
        while (block := conn.recv()) is not None:
            lo, hi = block
            if isinstance(side, RawSide):
                part = [section for plan in plans[lo:hi] for section in plan]
                started = time.perf_counter()
                keys, bad = side.run_plan(part)
            else:
                part_bundles = bundles[lo:hi]
                started = time.perf_counter()
                keys, bad = side.run(part_bundles)
            conn.send((time.perf_counter() - started, keys, bad))
    finally:
        side.close()
        conn.close()


def unwrap_plan(bundles: list[bytes]) -> list[tuple[str, str, list[tuple[bytes, str]]]]:
    """For each section of each bundle: its transport key's label, its wrap method and its wrapped keys with their
    algorithms (what
    raw unwraps: every key the station unwraps, once, with the key type both sides give C_UnwrapKey; the wrap
    mechanism follows the transport key: AES-KWP, or SM4-ECB under an SM4 one)."""
    plan = []
    for parsed in map(bundle.parse, bundles):
        for section in parsed.sections:
            if any(key.algorithm not in bundle.KCV_METHODS for key in section.keys):
                raise BenchFailed("part 4 compares DES2 and SM4 card keys only")
            label = key_label(section.domain, KeyKind.TRANSPORT, section.transport_key,
                              section.transport_key_version)
            plan.append((label, section.keys[0].wrap, [(key.wrapped, key.algorithm) for key in section.keys]))
    return plan


def turn_orders(sides: int, blocks: int, start: int = 0) -> list[list[int]]:
    """The order in which ``sides`` sides take their turns in each of ``blocks`` blocks: the rows of a balanced Latin
    square (a Williams design), in turn from row ``start``. Over every run of its rows (``sides`` rows, twice as many
    for an odd number of sides) each side takes each place once as often as every other side, and follows each other
    side as often; a round that continues the sequence (``start``: the blocks of the rounds before) keeps that over
    the rounds when a round's blocks are not a whole number of runs. (Taking all permutations in turn does this only
    after every one of them has been used: 24 blocks for 4 sides, three times the blocks of a default round.)"""
    first, low, high = [0], 1, sides - 1
    while len(first) < sides:
        first.append(low)
        low += 1
        if len(first) < sides:
            first.append(high)
            high -= 1
    rows = [[(side + i) % sides for side in first] for i in range(sides)]
    if sides % 2:
        rows += [row[::-1] for row in rows]
    return [rows[(start + b) % len(rows)] for b in range(blocks)]


def station_round(sides: dict[str, tuple[Any, ...]], warmup: list[bytes], bundles: list[bytes], r: int = 0
                  ) -> dict[str, tuple[float, int, int]]:
    """Round ``r`` of part 4: each side in a fresh process of its own, set up and warmed up before any timing; then
    the sides take turns block by block (STATION_BLOCK bundles) in the orders of ``turn_orders`` (continued from
    the rounds before), so that what else the machine does hits every side alike. Per side: seconds (its blocks'
    sum), keys, bad bundles."""
    ctx = multiprocessing.get_context("spawn")
    workers = []
    try:
        for name, (kind, setup) in sides.items():
            parent, child = ctx.Pipe()
            # not daemonic: a station side starts a checking process of its own (Station.open_many)
            proc = ctx.Process(target=side_worker, args=(child, kind, setup, warmup, bundles))
            proc.start()
            child.close()
            workers.append((name, parent, proc))
        for name, parent, _ in workers:
            if not parent.poll(300) or _answer(name, parent) != "ready":
                raise BenchFailed(f"part 4: the {name} side did not start")
        totals = {name: (0.0, 0, 0) for name, _, _ in workers}
        starts = range(0, len(bundles), STATION_BLOCK)
        orders = turn_orders(len(workers), len(starts), r * len(starts))
        for lo, order in zip(starts, orders, strict=True):
            for name, parent, _ in (workers[k] for k in order):
                parent.send((lo, lo + STATION_BLOCK))
                seconds, keys, bad = _answer(name, parent)
                t, n, b = totals[name]
                totals[name] = (t + seconds, n + keys, b + bad)
        for _, parent, _ in workers:
            parent.send(None)
        return totals
    finally:
        for _, parent, proc in workers:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
                proc.join()
            parent.close()


def _answer(name: str, conn: Any) -> Any:
    try:
        return conn.recv()
    except EOFError:
        raise BenchFailed(f"part 4: the {name} side's process died (its error is above)") from None


def bench_station(args: Any, home: Home, warmup: list[bytes], received: list[bytes], summary: Summary) -> None:
    bundles = received[:args.station_cards]
    station_config = str(home.station_config(STATION))
    cfg = config.load_station(Path(station_config))
    raw_setup = (cfg.hsm.module_path(), str(cfg.hsm.softhsm2_conf), cfg.token, cfg.secret(cfg.pin), raw_codes(cfg))
    keys = sum(len(wrapped) for _, _, wrapped in unwrap_plan(bundles))
    ledgers = iter(range(3 * args.rounds))

    def fresh_ledger() -> str:
        path = home.path / f"bench-ledger-{next(ledgers)}.db"
        path.unlink(missing_ok=True)
        return f"sqlite:///{path}"

    times: dict[str, list[float]] = {"raw": [], "many": [], "here": [], "each": []}
    for r in range(args.rounds):
        sides = {"raw": ("raw", raw_setup), "many": ("station", (station_config, fresh_ledger(), STATION_CHUNK)),
                 "here": ("station", (station_config, fresh_ledger(), STATION_CHUNK, False)),
                 "each": ("station", (station_config, fresh_ledger(), 0))}
        for name, (seconds, checked, bad) in station_round(sides, warmup, bundles, r).items():
            if bad:
                raise BenchFailed(f"part 4, {name}: {bad} bundles refused or with a KCV that does not match")
            if checked != keys:
                raise BenchFailed(f"part 4, {name}: {checked} keys of {keys}")
            times[name].append(seconds)
    raw_t, many_t, here_t, open_t = times["raw"], times["many"], times["here"], times["each"]
    n = len(bundles)
    per_bundle = keys // n
    summary.rates("station.raw", "4. raw unwrap loop", "bundles/s", n, raw_t)
    summary.rates("station.kms", f"4. Station.open_many ({STATION_CHUNK})", "bundles/s", n, many_t)
    ratio = summary.ratio("station.ratio", "4. station open / raw unwrap", raw_t, many_t, 0.80)
    summary.rates("station.in_process", "4. open_many, checks in-process", "bundles/s", n, here_t)
    here = summary.ratio("station.in_process_ratio", "4. in-process checks / raw unwrap", raw_t, here_t)
    summary.rates("station.open", "4. Station.open, each", "bundles/s", n, open_t)
    each = summary.ratio("station.open_ratio", "4. open each / raw unwrap", raw_t, open_t)
    print()
    print(f"4. station open vs raw unwrap loop, {n} bundles of part 2 per round ({per_bundle} keys each), "
          f"{STATION}'s token, each side in a fresh process of its own per round, warmed up alike, the sides taking "
          f"turns every {STATION_BLOCK} bundles in balanced orders: Station.open_many (parse, 2 signatures verified "
          f"-- the next chunk's in its checking process while the token works, SM2 in its own token session --, "
          f"unwrap + KCV per key, serials "
          f"recorded in a fresh SQLite ledger, one commit per {STATION_CHUNK} bundles, keys discarded), the same "
          "with every check in its own process (check_ahead off), and Station.open (one commit per bundle) vs "
          "unwrap + KCV + destroy per key")
    print(f"  {'(medians)':34}{'bundles/s':>10}{'keys/s':>10}{'seconds':>10}")
    print(rate_line("raw unwrap loop", n, per_bundle, raw_t))
    print(rate_line(f"kms Station.open_many ({STATION_CHUNK})", n, per_bundle, many_t))
    print(rate_line("kms open_many, checks in-process", n, per_bundle, here_t))
    print(rate_line("kms Station.open, each", n, per_bundle, open_t))
    print(ratio_line(ratio, "raw"))
    print(ratio_line(here, "raw"))
    print(ratio_line(each, "raw"), flush=True)


# --- 5. audit log: append rate and offline verify rate -----------------------------------------------------------

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


def bench_audit(args: Any, summary: Summary) -> None:
    rounds, append_records, verify_records = args.rounds, args.audit_records, args.verify_records
    workdir = Path(".bench")
    workdir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="audit-", dir=workdir) as tmp:
        engine = store.make_engine(f"sqlite:///{Path(tmp) / 'append.db'}")
        store.upgrade(engine)
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
        store.upgrade(engine)
        lines, public_key = audit_export(engine, verify_records)
        engine.dispose()
        sha_t, verify_t = alternate(rounds, lambda: run_sha256_only(lines),
                                    lambda: run_verify(lines, public_key, verify_records))
    figures = [
        summary.rates("audit.insert", "5. plain INSERT", "records/s", append_records, insert_t),
        summary.rates("audit.append", "5. AuditLog.append", "records/s", append_records, append_t),
        summary.ratio("audit.append_ratio", "5. append / plain INSERT", insert_t, append_t),
        summary.rates("audit.sha256", "5. SHA-256 only", "records/s", verify_records, sha_t),
        summary.rates("audit.verify", "5. kms.audit.verify", "records/s", verify_records, verify_t, AUDIT_VERIFY_GOAL),
        summary.ratio("audit.verify_ratio", "5. verify / SHA-256 only", sha_t, verify_t),
    ]
    print()
    print(f"5. audit log: (a) append, {append_records} records per round, one per transaction, SQLite (WAL) on "
          f"{workdir}; (b) offline verify of an export of {verify_records} records, a signed checkpoint every "
          f"{AUDIT_CHECKPOINT_EVERY}")
    for figure in figures:
        unit = "" if figure.unit == "ratio" else f" {figure.unit}"
        print(f"  {figure.label.split(' ', 1)[1]:34} median {figure.show(figure.median)}{unit} (per round: "
              f"{per_round(figure)})")
    verify_rate = figures[4]
    print(f"  verify rate goal >= {AUDIT_VERIFY_GOAL:,} records/s: {'met' if verify_rate.met else 'NOT met'}",
          flush=True)


def main() -> int:
    restrict_umask()  # the home, bundles, minutes and exports written here are the user's alone (kms.files)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="dual-app",
                        help="the card profile benched: dual-app (default), dual-app-sm (SM4 keys wrapped with SM4, "
                             "SM2-signed sections: on the development SM token, `make sm-token`), dual-app-mixed, or "
                             "a profile file; the raw loops do the same token work with the same mechanisms")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each comparison (default: 5)")
    parser.add_argument("--cards", type=int, default=3000, help="cards per engine/raw round (default: 3000)")
    parser.add_argument("--engine-block", type=int, default=E2E_BLOCK,
                        help="cards per timed block of part 1: the engine and raw sides take turns block by block "
                             f"(default: {E2E_BLOCK})")
    parser.add_argument("--e2e-cards", type=int, default=2000,
                        help="cards per end-to-end batch and its raw round (default: 2000)")
    parser.add_argument("--e2e-block", type=int, default=E2E_BLOCK,
                        help="cards per timed block of part 2 (a batch of its own): the end-to-end and raw sides take "
                             f"turns block by block (default: {E2E_BLOCK})")
    parser.add_argument("--latency-cards", type=int, default=200,
                        help="IssueCard calls timed per round for the single-card latency (default: 200)")
    parser.add_argument("--station-cards", type=int, default=1000,
                        help="bundles the station opens per round, at most --e2e-cards (default: 1000)")
    parser.add_argument("--per-message", type=int, default=32,
                        help="bundles per streamed message (StreamBatch max_bundles_per_message; default: 32)")
    parser.add_argument("--processes", type=int, default=1,
                        help="HSM worker processes per domain, on every side (default: 1)")
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME,
                        help="the bench's development home, made afresh on every run: whatever an earlier run "
                             f"left there is removed (default: {DEFAULT_HOME})")
    parser.add_argument("--summary", type=Path, default=DEFAULT_SUMMARY,
                        help=f"where the JSON summary of the figures goes (default: {DEFAULT_SUMMARY})")
    parser.add_argument("--audit-records", type=int, default=2000,
                        help="audit records appended per round, one per transaction (default: 2000)")
    parser.add_argument("--verify-records", type=int, default=100_000,
                        help="records in the export the verifier reads (default: 100000)")
    parser.add_argument("--audit-only", action="store_true", help="run only part 5, the audit log")
    parser.add_argument("--workers-cards", type=int, default=1000,
                        help="cards per batch in part 6, worker services vs spawned workers (default: 1000)")
    parser.add_argument("--workers-only", action="store_true", help="run only part 6, worker services")
    parser.add_argument("--station-only", action="store_true",
                        help="run only part 4, the station (its bundles streamed from `kms serve` first, not timed)")
    parser.add_argument("--e2e-only", action="store_true",
                        help="run only parts 2 and 3, `kms serve` end to end and the IssueCard latency")
    args = parser.parse_args()
    for name in ("rounds", "cards", "engine_block", "e2e_cards", "e2e_block", "latency_cards", "station_cards",
                 "processes", "audit_records", "verify_records", "workers_cards"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.latency_cards < 2:
        parser.error("--latency-cards must be at least 2")
    only = [f"--{name.replace('_', '-')}" for name in ("audit_only", "station_only", "workers_only", "e2e_only")
            if getattr(args, name)]
    if len(only) > 1:
        parser.error(f"{' and '.join(only)} exclude each other")
    if args.station_cards > args.e2e_cards and not (args.station_only or args.e2e_only):
        parser.error("--station-cards must be at most --e2e-cards (the station opens bundles of part 2)")

    global PROFILE
    try:
        PROFILE = profiles.load(profile_file(args.profile)).name
    except KmsError as error:
        parser.error(str(error))
    t0 = time.perf_counter()
    summary = Summary()
    summary.notes.update(
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), cpus=os.cpu_count(),
        load_average_at_start=[round(x, 2) for x in os.getloadavg()],
        parameters={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    if args.audit_only:
        print(f"kms bench: audit log only; {args.rounds} alternating rounds, baselines measured in the same run",
              flush=True)
        bench_audit(args, summary)
    else:
        try:
            home = fresh_home(args.home, args.profile)
        except KmsError as error:  # e.g. the development SM token is not built: one line naming `make sm-token`
            print(f"bench: {error}", file=sys.stderr)
            return 2
        cfg = config.load(home.config)
        profile = profiles.load_dir(cfg.profiles)[PROFILE]
        keys_per_card = sum(len(profile.keys(d)) for d in DOMAINS)
        derivations = sum(len(spec.recipe.steps(make_cards(1, 0)[0])) for d in DOMAINS for spec in profile.keys(d))
        print(f"kms bench: profile {PROFILE}, {keys_per_card} keys per card ({derivations} C_DeriveKey per card); "
              f"{args.processes} HSM process(es) per domain x {len(DOMAINS)} domains on every side; "
              f"{args.rounds} alternating rounds, raw measured in the same run", flush=True)
        if args.station_only:
            warmup, received = station_bundles(args, home, cfg)
            bench_station(args, home, warmup, received, summary)
        elif args.e2e_only:
            bench_service(args, home, cfg, keys_per_card, summary)
        elif not args.workers_only:
            bench_engine(args, home, cfg, keys_per_card, summary)
            warmup, received = bench_service(args, home, cfg, keys_per_card, summary)
            bench_station(args, home, warmup, received, summary)
            bench_audit(args, summary)
        if not (args.station_only or args.e2e_only):
            bench_workers(args, home, cfg, keys_per_card, summary)
    seconds = time.perf_counter() - t0
    summary.notes.update(load_average_at_end=[round(x, 2) for x in os.getloadavg()], seconds=round(seconds, 1))
    summary.write(args.summary)
    print()
    print(f"Summary: {args.rounds} round(s) per figure, min / median / max "
          f"(load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs)")
    print(summary.table())
    print()
    print(f"bench done in {seconds:.0f} s; summary in {args.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
