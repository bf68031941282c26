"""`make bench`: the card key engine next to a raw PKCS#11 loop doing the same HSM work, in the same run, with the
same number of processes, reported as a ratio (goal: engine >= 90 % of raw).

Engine: kms.issuer.Issuer, i.e. per-domain worker processes, each card's keys derived, KCV'd, wrapped and
destroyed in the token, each section signed (ECDSA P-256 in the token) and canonically encoded, sections spliced
into bundles in the coordinating process. Raw: scripts/bench_raw.py, the bare derive+KCV+wrap+destroy calls.
Both run on a development home under .bench/ (created on first use). Timed after start-up (workers ready).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_raw

from kms import config, profiles
from kms.cardid import CardIdentity
from kms.clock import SystemClock
from kms.devhome import init_home
from kms.issuer import Issuer
from kms.registry import DOMAINS, KeyKind
from kms.runtime import registry as open_registry

PROFILE = "dual-app-v1"
BUREAU = "bureau-a"


def make_cards(n: int, seed: int) -> list[CardIdentity]:
    rng = random.Random(seed)
    return [
        CardIdentity(card_ref=f"bench-{i:07d}", city_code="320200", card_serial=f"{rng.getrandbits(64):016X}",
                     pan=f"621483{rng.randrange(10**13):013d}", psn=f"{rng.randrange(100):02d}",
                     kdd=f"{rng.getrandbits(80):020X}")
        for i in range(n)
    ]


def run_engine(config_path: Path, cards: list[CardIdentity], processes: int) -> float:
    with Issuer(config_path, BUREAU, PROFILE, processes_per_domain=processes) as issuer:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", type=int, default=3000)
    parser.add_argument("--processes", type=int, default=1, help="worker processes per domain (both sides)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--home", type=Path, default=Path(".bench/home"))
    args = parser.parse_args()

    home = init_home(args.home)
    cfg = config.load(home.config)
    profile = profiles.load_dir(cfg.profiles)[PROFILE]
    keys_per_card = sum(len(profile.keys(d)) for d in DOMAINS)
    derivations = sum(len(spec.recipe.steps(make_cards(1, 0)[0])) for d in DOMAINS for spec in profile.keys(d))
    cards = make_cards(args.cards, seed=2026)

    engine_t, raw_t = [], []
    for i in range(args.rounds):  # alternate, and swap who goes first, so drift hits both alike
        if i % 2:
            engine_t.append(run_engine(home.config, cards, args.processes))
            raw_t.append(run_raw(cfg, cards, args.processes))
        else:
            raw_t.append(run_raw(cfg, cards, args.processes))
            engine_t.append(run_engine(home.config, cards, args.processes))
    raw, engine = statistics.median(raw_t), statistics.median(engine_t)
    ratios = [r / e for r, e in zip(raw_t, engine_t, strict=True)]

    n = len(cards)
    print(f"kms bench: {n} cards x {keys_per_card} keys ({derivations} C_DeriveKey per card), profile {PROFILE}, "
          f"{args.processes} process(es) per domain x {len(DOMAINS)} domains, median of {args.rounds} rounds")
    print(f"{'':28}{'cards/s':>10}{'keys/s':>10}{'seconds':>10}")
    print(f"{'raw PKCS#11 loop':28}{n / raw:>10.0f}{n * keys_per_card / raw:>10.0f}{raw:>10.2f}")
    print(f"{'kms engine (sealed bundles)':28}{n / engine:>10.0f}{n * keys_per_card / engine:>10.0f}{engine:>10.2f}")
    print(f"engine / raw throughput: {raw / engine:.1%} (per round: {', '.join(f'{r:.1%}' for r in ratios)};"
          f" goal >= 90%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
