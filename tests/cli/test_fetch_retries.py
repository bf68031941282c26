"""`kms station fetch` over a service whose database fails for a while: it retries UNAVAILABLE with backoff and
jitter, one line on stderr per retry, resumes from its cursor, and gets every card exactly once; bounded by
``--retries``. The CLI runs in a process of its own, as a station runs it; the server is `kms serve` in this
process (real mutual TLS, worker processes and tokens), its database failing where the SQLite driver fails
(tests/helpers.py StorageFault)."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

from helpers import StorageFault, card, client, kms, officer, open_batch, serving_engine

from kms.cards.cardid import CardIdentity
from kms.dev.home import Home
from kms.errors import Unavailable
from kms.server.serve import Service

ALICE = officer("hrss", 0)
CARDS = 40
PER_MESSAGE = 16  # the server's default, which the CLI asks for
RECORD = "UPDATE batch_cards"  # the first statement that records a stream message's cards
RETRY = re.compile(r"kms: service: unavailable: the database is unavailable \(disk I/O error\); try again; "
                   r"retry (\d) of (\d) in (\d+\.\d) s, resuming after cursor (\d+)")


def _batch(home: Home, service: Service) -> tuple[str, list[CardIdentity]]:
    batch_id = f"FR-{secrets.token_hex(4)}"
    cards = [card(850_000 + i, card_ref=f"{batch_id.lower()}-{i:03d}") for i in range(CARDS)]
    with client(home, service.port, ALICE) as alice:
        open_batch(home, service.port, alice, batch_id, "bureau-a", "dual-app-v1", cards)
    return batch_id, cards


PROGRESS = re.compile(r"kms: \d+ % \(\d+/\d+ bundles, ")


def _fetch(home: Home, service: Service, batch_id: str, out: Path, *flags: str) -> tuple[int, str, str]:
    result = kms("station", "fetch", "--station-config", str(home.station_config("station-a1")), "--server",
                 f"localhost:{service.port}", "--batch-id", batch_id, "--out", str(out), "--json", *flags)
    return result.returncode, result.stdout, _without_progress(result.stderr)


def _without_progress(stderr: str) -> str:
    """stderr without the progress lines (a line per 10 % off a terminal: "kms: 40 % (16/40 bundles, …)")."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not PROGRESS.match(line))


def _issued_once(service: Service, batch_id: str) -> list[str]:
    refs = [json.loads(r.body)["subject"].partition("/")[2] for r in service.audit.records(kind="issuance.issued")
            if json.loads(r.body)["subject"].startswith(batch_id + "/")]
    assert len(refs) == len(set(refs))
    return sorted(refs)


def test_fetch_retries_with_backoff_and_resumes_from_its_cursor(home: Home, service: Service, tmp_path: Path) -> None:
    batch_id, cards = _batch(home, service)
    out = tmp_path / "bundles"
    with StorageFault(serving_engine(service), RECORD, after=PER_MESSAGE, times=2) as fault:
        code, stdout, stderr = _fetch(home, service, batch_id, out, "--retries", "5")
    assert code == 0, stderr
    assert fault.hits == 2
    lines = stderr.splitlines()
    retries = [RETRY.fullmatch(line) for line in lines]
    assert all(retries) and len(retries) == 2, stderr  # one line per retry, nothing else
    assert [(m[1], m[2]) for m in retries if m] == [("1", "5"), ("2", "5")]
    delays = [float(m[3]) for m in retries if m]
    assert 0.2 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0  # exponential, with jitter (rounded to 0.1 s)
    cursors = {m[4] for m in retries if m}
    assert len(cursors) == 1  # both resume after the first message, the last one received
    done = json.loads(stdout)
    assert done["fetched"] == CARDS  # every bundle received once: none lost, none twice
    assert sorted(p.stem for p in out.glob("*.kmsb")) == [c.card_ref for c in cards]
    assert _issued_once(service, batch_id) == [c.card_ref for c in cards]


def test_fetch_gives_up_after_its_retries_and_a_rerun_completes(home: Home, service: Service, tmp_path: Path) -> None:
    batch_id, cards = _batch(home, service)
    out = tmp_path / "bundles"
    with StorageFault(serving_engine(service), RECORD, after=PER_MESSAGE) as fault:  # until cleared
        code, _, stderr = _fetch(home, service, batch_id, out, "--retries", "2")
        fault.clear()
    assert code == Unavailable.exit_code == 12
    lines = stderr.splitlines()
    assert len(lines) == 3 and all(RETRY.fullmatch(line) for line in lines[:2]), stderr
    assert lines[2] == ("kms: error: service: unavailable: the database is unavailable (disk I/O error); "
                        "try again")
    assert sorted(p.stem for p in out.glob("*.kmsb")) == [c.card_ref for c in cards[:PER_MESSAGE]]
    code, stdout, stderr = _fetch(home, service, batch_id, out, "--retries", "0")
    assert code == 0 and stderr == ""
    assert json.loads(stdout)["fetched"] == CARDS  # the first message again (stored bundles), then the rest
    assert sorted(p.stem for p in out.glob("*.kmsb")) == [c.card_ref for c in cards]
    assert _issued_once(service, batch_id) == [c.card_ref for c in cards]


def test_retry_flags_are_checked(home: Home, tmp_path: Path) -> None:
    for flag, value, message in (("--retries", "x", "'x' is not a whole number from 0 to 1000"),
                                 ("--retries", "1001", "'1001' is not a whole number from 0 to 1000"),
                                 ("--retry-for", "nan", "'nan' is not a number of seconds from 0 to 86400"),
                                 ("--retry-for", "-5", "'-5' is not a number of seconds from 0 to 86400")):
        result = kms("station", "fetch", "--station-config", str(home.station_config("station-a1")),
                     "--batch-id", "B-1", "--out", str(tmp_path / "x"), flag, value)
        assert result.returncode == 2
        assert f"argument {flag}: {message}" in result.stderr
