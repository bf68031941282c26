"""`make bench` (scripts/bench.py) at a tiny size: it runs end to end and reports every figure.

No speed is asserted here (speed targets belong to `make bench` itself); this checks that the bench still works —
a fresh home, every part, the audit signer check, the table and the JSON summary — after a change elsewhere.
"""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import requires_sm_token

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench  # noqa: E402  (scripts/ is not a package)

FIGURES = {
    "engine.raw", "engine.kms", "engine.ratio",
    "e2e.raw", "e2e.kms", "e2e.ratio",
    "latency.p50", "latency.p99",
    "station.raw", "station.kms", "station.ratio", "station.in_process", "station.in_process_ratio", "station.open",
    "station.open_ratio",
    "audit.insert", "audit.append", "audit.append_ratio", "audit.sha256", "audit.verify", "audit.verify_ratio",
    "workers.spawned", "workers.remote", "workers.ratio",
}
GOALS = {"engine.ratio": 0.90, "e2e.ratio": 0.80, "station.ratio": 0.80, "audit.verify": 100_000,
         "workers.ratio": 0.90}


@pytest.mark.hsm
@pytest.mark.service
def test_bench_tiny_run_reports_every_figure(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench.py"), "--rounds", "1", "--cards", "8", "--engine-block", "3",
         "--e2e-cards", "8", "--latency-cards", "3", "--station-cards", "8", "--audit-records", "10",
         "--verify-records", "1000", "--workers-cards", "8",
         "--home", str(tmp_path / "home"), "--summary", str(summary_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # part 1 takes turns block by block too: 8 cards in blocks of 3, a ratio per block
    assert "8 cards per round in 3 block(s)" in result.stdout
    assert re.search(r"round 1: engine / raw per block \d+%, \d+%, \d+%\n", result.stdout), result.stdout

    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    figures = summary["figures"]
    assert set(figures) == FIGURES
    for key, figure in figures.items():
        assert len(figure["rounds"]) == 1, key
        assert figure["min"] == figure["median"] == figure["max"] > 0, key
        assert figure.get("goal") == GOALS.get(key), key
    assert figures["station.ratio"]["median"] == pytest.approx(
        figures["station.kms"]["median"] / figures["station.raw"]["median"], rel=1e-3)
    signer = summary["audit_signer"]
    assert signer["records"] == signer["covered"] > 0
    assert signer["checkpoints"] >= 1
    assert summary["parameters"]["rounds"] == 1 and len(summary["load_average_at_start"]) == 3

    # every figure in the printed table, by its label
    table = result.stdout.split("Summary:", 1)[1]
    for label in ("1. engine / raw", "2. end-to-end / raw", "3. IssueCard latency p50", "3. IssueCard latency p99",
                  "4. station open / raw unwrap", "4. in-process checks / raw unwrap", "4. open each / raw unwrap",
                  "5. kms.audit.verify", "6. worker services / spawned"):
        assert label in table
    # the home is one the bench made: the next run may remove it
    assert (tmp_path / "home" / bench.BENCH_MARKER).exists()


@pytest.mark.hsm
@pytest.mark.service
def test_bench_e2e_only_takes_turns_block_by_block(tmp_path: Path) -> None:
    """`--e2e-only`: parts 2 and 3 alone; each round's cards streamed as batches of --e2e-block cards (the raw
    loop deriving the same blocks' keys in between), every card of every block issued."""
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench.py"), "--e2e-only", "--rounds", "2", "--e2e-cards", "7",
         "--e2e-block", "3", "--latency-cards", "2", "--home", str(tmp_path / "home"), "--summary", str(summary_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 cards per round in 3 block(s)" in result.stdout
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    figures = summary["figures"]
    assert set(figures) == {"e2e.raw", "e2e.kms", "e2e.ratio", "latency.p50", "latency.p99"}
    assert all(len(figure["rounds"]) == 2 and figure["min"] > 0 for figure in figures.values())
    assert figures["e2e.ratio"]["goal"] == 0.80
    assert summary["audit_signer"]["records"] == summary["audit_signer"]["covered"] > 0
    with sqlite3.connect(tmp_path / "home" / bench.E2E_DATABASE) as db:
        blocks = db.execute("SELECT b.batch_id, count(*), sum(c.state = 'issued') FROM batches b JOIN batch_cards c "
                            "ON c.batch_id = b.batch_id WHERE b.batch_id LIKE '%-r_b_' GROUP BY b.batch_id "
                            "ORDER BY b.batch_id").fetchall()
    assert [(batch_id[-4:], cards, issued) for batch_id, cards, issued in blocks] == [
        ("r0b0", 3, 3), ("r0b1", 3, 3), ("r0b2", 1, 1), ("r1b0", 3, 3), ("r1b1", 3, 3), ("r1b2", 1, 1)]


def test_bench_only_flags_exclude_each_other(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench.py"), "--e2e-only", "--station-only", "--home", str(tmp_path / "home")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "--station-only and --e2e-only exclude each other" in result.stderr
    assert not (tmp_path / "home").exists()


def test_bench_never_removes_a_directory_it_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "kms.yaml").write_text("hsm: {}\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="not a home the bench made"):
        bench.fresh_home(precious)
    assert (precious / "kms.yaml").read_text(encoding="utf-8") == "hsm: {}\n"


@requires_sm_token
@pytest.mark.hsm
@pytest.mark.service
def test_bench_of_the_sm_profile_compares_with_raw_sm4_loops(tmp_path: Path) -> None:
    """`make bench BENCH_ARGS="--profile dual-app-sm"` at a tiny size, on the development SM token: the engine, end
    to end and the station against raw loops making the same SM4 calls (derive, SM4 KCV, SM4-ECB wrap/unwrap)."""
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench.py"), "--profile", "dual-app-sm", "--rounds", "1", "--cards", "8",
         "--e2e-cards", "8", "--latency-cards", "3", "--station-cards", "8", "--audit-records", "10",
         "--verify-records", "1000", "--workers-cards", "8",
         "--home", str(tmp_path / "home"), "--summary", str(summary_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kms bench: profile dual-app-sm-v1" in result.stdout
    figures = json.loads(summary_path.read_text(encoding="utf-8"))["figures"]
    assert set(figures) == FIGURES
    for key in ("engine.ratio", "e2e.ratio", "station.ratio"):
        assert figures[key]["median"] > 0, key
    hsm = yaml.safe_load((tmp_path / "home" / "kms.yaml").read_text(encoding="utf-8"))["hsm"]
    assert hsm["mechanisms"] == "softhsm2-sm-dev"


def test_bench_refuses_an_unknown_profile_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench.py"), "--profile", "dual-app-xyz", "--home", str(tmp_path / "home")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "no card profile 'dual-app-xyz'" in result.stderr and "dual-app-sm" in result.stderr
    assert not (tmp_path / "home").exists()


# -- review s23: part 4's sides take every place, and follow every other side, equally often ------------------------


class _FakeConn:
    """The bench's end of a side's pipe: answers "ready", then one timing per block, and logs who was sent what."""

    def __init__(self, side: int, log: list[tuple[int, int]]) -> None:
        self._side, self._log, self._ready = side, log, False

    def send(self, message: Any) -> None:
        if message is not None:
            self._log.append((message[0], self._side))

    def recv(self) -> Any:
        if not self._ready:
            self._ready = True
            return "ready"
        return (1.0, 0, 0)

    def poll(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        pass


class _FakeProcess:
    def start(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return False


class _FakeContext:
    """multiprocessing's spawn context for station_round, with no process: the sides' turns are only recorded."""

    def __init__(self) -> None:
        self.log: list[tuple[int, int]] = []
        self._sides = 0

    def Pipe(self) -> tuple[_FakeConn, _FakeConn]:
        self._sides += 1
        return _FakeConn(self._sides - 1, self.log), _FakeConn(-1, [])

    def Process(self, target: Any, args: Any) -> _FakeProcess:
        return _FakeProcess()


def _turns(monkeypatch: pytest.MonkeyPatch, bundles: int, rounds: int) -> list[list[int]]:
    """The order of part 4's 4 sides in each block of ``rounds`` rounds of ``bundles`` bundles."""
    orders = []
    for r in range(rounds):
        fake = _FakeContext()
        monkeypatch.setattr(bench.multiprocessing, "get_context", lambda method, fake=fake: fake)
        sides = {name: ("raw", ()) for name in ("raw", "many", "here", "each")}
        args = (sides, [], [b""] * bundles) if r == 0 else (sides, [], [b""] * bundles, r)
        bench.station_round(*args)
        orders += [[side for at, side in fake.log if at == lo] for lo in range(0, bundles, bench.STATION_BLOCK)]
    return orders


def _balanced(orders: list[list[int]]) -> None:
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders)
    places = Counter((place, side) for order in orders for place, side in enumerate(order))
    assert len(places) == 16 and len(set(places.values())) == 1, places  # every side in every place alike
    follows = Counter(pair for order in orders for pair in itertools.pairwise(order))
    assert len(follows) == 12 and len(set(follows.values())) == 1, follows  # and after every other side alike


def test_part4_sides_take_every_place_alike_in_a_default_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """A default round of part 4 (1,000 bundles: 8 blocks of 128). Before review s23 its orders were the first 8 of
    the 24 permutations of the sides, the same each round: the raw loop first in 6 blocks of 8, never third or
    last, so the host's swings did not hit the sides alike as the bench says they do."""
    _balanced(_turns(monkeypatch, 1000, 1))


def test_part4_rounds_continue_the_orders_when_a_round_is_not_a_whole_number_of_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _balanced(_turns(monkeypatch, 3 * bench.STATION_BLOCK, 4))  # 3 blocks a round, 12 in all


@pytest.mark.parametrize("sides", [2, 3, 4, 5])
def test_turn_orders_are_a_balanced_latin_square(sides: int) -> None:
    rows = 2 * sides if sides % 2 else sides
    orders = bench.turn_orders(sides, rows)
    assert all(sorted(order) == list(range(sides)) for order in orders)
    assert len(set(Counter((p, s) for o in orders for p, s in enumerate(o)).values())) == 1
    follows = Counter(pair for o in orders for pair in itertools.pairwise(o))
    assert len(follows) == sides * (sides - 1) and len(set(follows.values())) == 1
    assert bench.turn_orders(sides, 3) + bench.turn_orders(sides, 5, 3) == bench.turn_orders(sides, 8)
