"""The `kms` command line end to end, each command in a process of its own, on a home of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, kms


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("cli-home")
    kms("init", str(home), check=True)
    return home


def test_init_is_idempotent_and_keys_list_shows_no_values(cli_home: Path) -> None:
    again = kms("init", str(cli_home), "--json", check=True)
    assert json.loads(again.stdout)["config"] == str(cli_home / "kms.yaml")
    listing = json.loads(kms("keys", "list", "--config", str(cli_home / "kms.yaml"), "--json", check=True).stdout)
    assert {(r["domain"], r["kind"]) for r in listing} == {
        (d, k) for d in ("hrss", "bank") for k in ("master", "transport", "signing", "custody")} | {("bank", "data")}
    assert sorted(r["name"] for r in listing if r["kind"] == "data") == ["pan", "pan-index"]  # kms.issuance.pans
    assert len([r for r in listing if r["kind"] == "master"]) == 11
    assert all(r["state"] == "active" and r["version"] == 1 for r in listing)
    assert all(set(r) == {"domain", "kind", "name", "version", "algorithm", "state", "kcv", "kcv_method",
                          "created_at"} for r in listing)


def test_seal_then_open_at_the_station(cli_home: Path, tmp_path: Path) -> None:
    cards = tmp_path / "cards.csv"
    kms("dev", "cards", "--count", "25", "--out", str(cards), check=True)
    out = tmp_path / "bundles"
    sealed = kms("bundle", "seal", "--config", str(cli_home / "kms.yaml"), "--bureau", "bureau-a", "--batch",
                 "B-cli", "--cards", str(cards), "--out", str(out), "--json", check=True)
    summary = json.loads(sealed.stdout)
    assert summary["cards"] == 25 and summary["keys"] == 25 * 15 and summary["failed"] == 0
    assert len(list(out.glob("*.kmsb"))) == 25
    station = str(cli_home / "stations" / "station-a1" / "station.yaml")
    for _ in range(2):  # a dry run records nothing, so it can be repeated
        dry = json.loads(kms("bundle", "open", "--station-config", station, "--verify-only", "--json", str(out),
                             check=True).stdout)
        assert dry["rejected"] == 0 and all(b["ok"] for b in dry["bundles"])
    opened = json.loads(kms("bundle", "open", "--station-config", station, "--json", str(out), check=True).stdout)
    assert opened["rejected"] == 0 and opened["kcv_mismatch"] == 0
    assert len(opened["bundles"]) == 25
    assert all(b["ok"] and len(b["keys"]) == 15 for b in opened["bundles"])
    # Opening again is a replay: one opaque error per bundle, exit status 7.
    again = kms("bundle", "open", "--station-config", station, str(next(out.glob("*.kmsb"))))
    assert again.returncode == 7
    assert again.stderr.strip().endswith("bundle rejected")


def test_open_reports_per_file_and_records_what_it_opened_before_a_file_it_cannot_read(
    cli_home: Path, tmp_path: Path
) -> None:
    # `kms bundle open` opens through Station.open_many (one ledger commit per chunk): the reports are still per
    # file and in order, a refusal does not stop it, and an unreadable file stops it only after every bundle read
    # before it is opened and recorded.
    cards = tmp_path / "cards.csv"
    kms("dev", "cards", "--count", "3", "--out", str(cards), check=True)
    out = tmp_path / "bundles"
    kms("bundle", "seal", "--config", str(cli_home / "kms.yaml"), "--bureau", "bureau-a", "--batch", "B-chunk",
        "--cards", str(cards), "--out", str(out), check=True)
    first, second, third = sorted(out.glob("*.kmsb"))
    station = str(cli_home / "stations" / "station-a1" / "station.yaml")
    kms("bundle", "open", "--station-config", station, str(second), check=True)
    result = kms("bundle", "open", "--station-config", station, str(first), str(second), str(third),
                 str(tmp_path / "missing.kmsb"))
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == f"{second}: bundle rejected"  # the replay, reported for its file
    assert result.stderr.splitlines()[-1].startswith("kms: error: ") and "cannot read" in result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [first.name] * 15 + [third.name] * 15
    assert all(": ok " in line for line in lines)
    for path in (first, third):  # recorded before the error: opening again is a replay
        again = kms("bundle", "open", "--station-config", station, str(path))
        assert again.returncode == 7 and again.stderr.strip().endswith("bundle rejected")


def test_a_card_listed_twice_is_refused(cli_home: Path, tmp_path: Path) -> None:
    cards = tmp_path / "cards.csv"
    row = "c1,320200,86843202AD932A48,6214830000000009,01,00010203040506070809\n"
    cards.write_text("card_ref,city_code,card_serial,pan,psn,kdd\n" + row + row)
    result = kms("bundle", "seal", "--config", str(cli_home / "kms.yaml"), "--bureau", "bureau-a", "--batch", "B",
                 "--cards", str(cards), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"kms: error: {cards}:3: card_ref: c1 already appears on line 2"


def test_bad_card_file_names_file_line_and_field(cli_home: Path, tmp_path: Path) -> None:
    cards = tmp_path / "cards.csv"
    cards.write_text("card_ref,city_code,card_serial,pan,psn,kdd\n"
                     "c1,320200,86843202AD932A48,6214830000000009,01,00010203040506070809\n"
                     "c2,320200,86843202AD932A48,62148300,01,00010203040506070809\n")
    result = kms("bundle", "seal", "--config", str(cli_home / "kms.yaml"), "--bureau", "bureau-a", "--batch", "B",
                 "--cards", str(cards), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"kms: error: {cards}:3: pan: must be 12 to 19 digits"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["bundle", "seal", "--config", "{home}/kms.yaml", "--bureau", "bureau-q", "--batch", "B", "--cards",
          "{cards}", "--out", "{tmp}/o"], 5, "bureau 'bureau-q' has no"),
        (["bundle", "seal", "--config", "{home}/kms.yaml", "--bureau", "bureau-a", "--batch", "B", "--profile",
          "nope", "--cards", "{cards}", "--out", "{tmp}/o"], 3, "no card profile named 'nope'"),
        (["keys", "list", "--config", "{tmp}/missing.yaml"], 3, "cannot read"),
        (["dev", "cards", "--count", "0", "--out", "{tmp}/c.csv"], 2, "--count: must be from 1"),
        (["bundle", "open", "--station-config", "{home}/stations/station-a1/station.yaml", "{tmp}/none.kmsb"], 2,
         "cannot read"),
    ],
)
def test_errors_are_one_line_with_a_specific_exit_status(
    cli_home: Path, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    cards = tmp_path / "cards.csv"
    kms("dev", "cards", "--count", "2", "--out", str(cards), check=True)
    filled = [a.format(home=cli_home, tmp=tmp_path, cards=cards) for a in args]
    result = kms(*filled)
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("kms: error: ")
    assert message in result.stderr


def test_profile_check_reports_file_line_and_reason(cli_home: Path, tmp_path: Path) -> None:
    # The home's registry holds dual-app-v1's master keys (a standard token: no SM4 keys for the SM profiles).
    shipped = ROOT / "kms" / "policies" / "profiles" / "dual-app.yaml"
    ok = kms("profile", "check", str(shipped), "--config", str(cli_home / "kms.yaml"))
    assert ok.returncode == 0 and ok.stdout.strip() == (
        f"{shipped}: profile dual-app-v1 ok (hrss: 9 keys, bank: 6 keys); "
        "hrss: AES256 transport, ECDSA-P256-SHA256 signature; bank: AES256 transport, ECDSA-P256-SHA256 signature")
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: bad\ndomains:\n  bank:\n    keys:\n      - name: k\n        usage: u\n"
                   "        recipe: emv_option_a\n        master_key: bank-imk-zz\n")
    result = kms("profile", "check", str(bad), "--config", str(cli_home / "kms.yaml"))
    assert result.returncode == 3
    assert result.stderr.strip() == (f"kms: error: {bad}:8: key k: master key 'bank-imk-zz' does not exist "
                                     "in domain bank")


def test_serve_batch_and_station_fetch_over_mutual_tls(cli_home: Path, tmp_path: Path) -> None:
    import signal

    server = subprocess.Popen([sys.executable, "-m", "kms.cli", "serve", "--config", str(cli_home / "kms.yaml"),
                               "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("kms: serving on port "), line
        address = f"localhost:{int(line.rsplit(' ', 1)[1])}"
        cards = tmp_path / "cards.csv"
        kms("dev", "cards", "--count", "12", "--out", str(cards), check=True)
        officer = str(cli_home / "clients" / "officer-bank-carol.yaml")
        created = json.loads(kms("batch", "create", "--client", officer, "--server", address, "--batch-id", "B-cli",
                                 "--bureau", "bureau-b", "--cards", str(cards), "--json", check=True).stdout)
        assert created["cards"] == 12 and created["created_by"] == "urn:kms:officer:bank:carol"
        assert created["state"] == "awaiting-authorization"
        for domain, (proposer, approver) in (("bank", ("carol", "dave")), ("hrss", ("alice", "bob"))):
            who = {n: str(cli_home / "clients" / f"officer-{domain}-{n}.yaml") for n in (proposer, approver)}
            ceremony = json.loads(kms("ceremony", "propose", "--client", who[proposer], "--server", address,
                                      "authorize-batch", "batch_id=B-cli", "--json", check=True).stdout)
            assert ceremony["params"]["card_count"] == 12 and ceremony["state"] == "open"
            selfie = kms("ceremony", "approve", "--client", who[proposer], "--server", address, "--yes",
                         ceremony["ceremony_id"])
            assert selfie.returncode == 5 and "proposer does not count" in selfie.stderr
            kms("ceremony", "approve", "--client", who[approver], "--server", address, "--yes",
                ceremony["ceremony_id"], check=True)
            done = json.loads(kms("ceremony", "execute", "--client", who[proposer], "--server", address,
                                  ceremony["ceremony_id"], "--json", check=True).stdout)
            assert done["state"] == "executed"
        minutes = tmp_path / "minutes.json"
        kms("ceremony", "minutes", "--client", who[approver], "--server", address, ceremony["ceremony_id"],
            "-o", str(minutes), check=True)
        verified = kms("ceremony", "verify-minutes", str(minutes), "--public-key",
                       str(cli_home / "trust" / "hrss-issuance-v1.pem"), check=True)
        assert "verified: authorize-batch (hrss) executed, 1 approval signature(s) good" in verified.stdout
        forged = kms("ceremony", "verify-minutes", str(minutes), "--public-key",
                     str(cli_home / "trust" / "bank-issuance-v1.pem"))
        assert forged.returncode == 2 and forged.stderr.count("\n") == 1 and "signature" in forged.stderr
        again = kms("batch", "create", "--client", officer, "--server", address, "--batch-id", "B-cli",
                    "--bureau", "bureau-b", "--cards", str(cards))
        assert again.returncode == 4 and again.stderr.startswith("kms: error: ")
        station = str(cli_home / "stations" / "station-b1" / "station.yaml")
        fetched = json.loads(kms("station", "fetch", "--station-config", station, "--server", address,
                                 "--batch-id", "B-cli", "--out", str(tmp_path / "bundles"), "--open", "--json",
                                 check=True).stdout)
        assert fetched["fetched"] == 12 and fetched["opened"] == 12
        assert fetched["keys"] == fetched["kcv_matches"] == 12 * 15
        assert len(list((tmp_path / "bundles").glob("*.kmsb"))) == 12
        shown = json.loads(kms("batch", "show", "--client", station, "--server", address, "--batch-id", "B-cli",
                               "--json", check=True).stdout)
        assert shown["issued"] == 12
        other = kms("station", "fetch", "--station-config", str(cli_home / "stations" / "station-a1" / "station.yaml"),
                    "--server", address, "--batch-id", "B-cli", "--out", str(tmp_path / "other"))
        assert other.returncode == 5
        assert "B-cli is not authorized for bureau-a" in other.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0


def test_station_unwrap_keys_are_listed_and_an_unused_one_discarded(cli_home: Path) -> None:
    station = ("--station-config", str(cli_home / "stations" / "station-a1" / "station.yaml"), "--domain", "hrss")

    def listed() -> dict[str, str]:
        keys = json.loads(kms("station", "unwrap-key", *station, "--list", "--json", check=True).stdout)
        return {k["sha256"]: k["label"] for k in keys}

    before = listed()
    made = [json.loads(kms("station", "unwrap-key", *station, "--json", check=True).stdout) for _ in range(2)]
    assert set(listed()) == set(before) | {m["sha256"] for m in made}
    text = kms("station", "unwrap-key", *station, "--list", check=True).stdout
    assert all(f"{m['label']}  SHA-256 {m['sha256']}" in text for m in made)
    gone = kms("station", "unwrap-key", *station, "--discard", made[0]["sha256"].upper(), "--json", check=True)
    assert json.loads(gone.stdout)["discarded"] == made[0]["label"]
    assert set(listed()) == set(before) | {made[1]["sha256"]}
    again = kms("station", "unwrap-key", *station, "--discard", made[0]["sha256"])
    assert again.returncode != 0 and again.stderr.count("\n") == 1 and made[0]["sha256"] in again.stderr
    bad = kms("station", "unwrap-key", *station, "--discard", "not-a-hash")
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "--discard" in bad.stderr
    both = kms("station", "unwrap-key", *station, "--list", "--discard", made[1]["sha256"])
    assert both.returncode == 2 and "not allowed with" in both.stderr
    kms("station", "unwrap-key", *station, "--discard", made[1]["sha256"], check=True)
    assert listed() == before


def test_init_refuses_a_home_made_by_an_older_kms(tmp_path: Path) -> None:
    old = tmp_path / "old-home"
    old.mkdir()
    (old / "kms.yaml").write_text("hsm: {}\n")  # a home from before officers had approval keys
    result = kms("init", str(old))
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "made by an older kms" in result.stderr
    assert sorted(p.name for p in old.iterdir()) == ["kms.yaml"]  # nothing half-written
