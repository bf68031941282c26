"""The command line as an operator meets it, against a real `kms serve` over mutual TLS on a home of its own: the
approval prompt on stderr (a pseudo-terminal answers it), `not approved` and its hint off a terminal, environment
variables instead of flags, a wrong certificate path named, no overwrite of minutes, progress off a terminal, --json
where it was missing, a closed pipe, and a PAN failing the Luhn check."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, kms


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A development home and `kms serve` on it (a free port): (home, host:port)."""
    home = tmp_path_factory.mktemp("operator-home")
    kms("init", str(home), check=True)
    server = subprocess.Popen([sys.executable, "-m", "kms.cli", "serve", "--config", str(home / "kms.yaml"),
                               "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("kms: serving on port "), line
        yield home, f"localhost:{int(line.rsplit(' ', 1)[1])}"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def _client(home: Path, who: str) -> str:
    return str(home / "clients" / f"{who}.yaml")


def _kms_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kms.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, **env})


def _propose(home: Path, address: str, who: str, *params: str) -> str:
    done = kms("ceremony", "propose", "--client", _client(home, who), "--server", address, "--json", *params,
               check=True)
    return str(json.loads(done.stdout)["ceremony_id"])


def _approve_on_a_terminal(home: Path, address: str, who: str, ceremony: str, answer: bytes) -> tuple[int, str, str]:
    """`kms ceremony approve --json` with stdin a pseudo-terminal answering ``answer``: (status, stdout, stderr)."""
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "kms.cli", "ceremony", "approve", "--client",
                                 _client(home, who), "--server", address, "--json", ceremony],
                                stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        os.write(controller, answer)
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(controller)
        os.close(terminal)
    return proc.returncode, out.decode(), err.decode()


def test_the_prompt_is_on_stderr_and_not_approved_has_its_own_status(served: tuple[Path, str]) -> None:
    home, address = served
    ceremony = _propose(home, address, "officer-hrss-alice", "generate-master-key", "name=op-prompt")
    status, out, err = _approve_on_a_terminal(home, address, "officer-hrss-bob", ceremony, b"n\n")
    assert (status, out) == (14, "")
    assert "approve? [y/N] " in err and err.endswith("kms: error: not approved\n")
    status, out, err = _approve_on_a_terminal(home, address, "officer-hrss-bob", ceremony, b"y\n")
    assert status == 0, err
    approved = json.loads(out)  # stdout is the JSON alone: the proposal and the question went to stderr
    assert approved["ceremony_id"] == ceremony and [a["officer"] for a in approved["approvals"]] == [
        "urn:kms:officer:hrss:bob"]
    assert "approve? [y/N] " in err and f"{ceremony}: generate-master-key (hrss)" in err


def test_without_a_terminal_approve_says_to_pass_yes(served: tuple[Path, str]) -> None:
    home, address = served
    ceremony = _propose(home, address, "officer-hrss-alice", "generate-master-key", "name=op-noterm")
    result = subprocess.run([sys.executable, "-m", "kms.cli", "ceremony", "approve", "--client",
                             _client(home, "officer-hrss-bob"), "--server", address, ceremony],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 14 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (f"kms: error: not approved: no terminal to ask on; review the proposal "
                                              f"(kms ceremony show {ceremony}) and pass --yes")


def test_environment_variables_stand_in_for_client_and_server(served: tuple[Path, str]) -> None:
    home, address = served
    env = {"KMS_CLIENT": _client(home, "officer-hrss-alice"), "KMS_SERVER": address}
    listed = _kms_env(env, "ceremony", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), list)
    wrong = _kms_env({**env, "KMS_SERVER": "localhost:1"}, "ceremony", "list", "--server", address)
    assert wrong.returncode == 0, wrong.stderr  # the flag wins over the environment


def test_a_certificate_that_cannot_be_read_is_named(served: tuple[Path, str], tmp_path: Path) -> None:
    home, address = served
    doc = yaml.safe_load(Path(_client(home, "officer-hrss-alice")).read_text())
    missing = tmp_path / "nowhere" / "alice.pem"
    doc["client"]["tls"]["cert"] = str(missing)
    for name in ("key", "ca", "crl"):
        doc["client"]["tls"][name] = str(Path(_client(home, "officer-hrss-alice")).parent / doc["client"]["tls"][name])
    if doc["client"].get("approval_key"):
        doc["client"]["approval_key"] = str(Path(_client(home, "x")).parent / doc["client"]["approval_key"])
    config = tmp_path / "alice.yaml"
    config.write_text(yaml.safe_dump(doc))
    result = kms("ceremony", "list", "--client", str(config), "--server", address)
    assert result.returncode == 3
    assert result.stderr == f"kms: error: client.tls.cert: {missing}: cannot read (No such file or directory)\n"


def test_minutes_are_never_overwritten_silently(served: tuple[Path, str], tmp_path: Path) -> None:
    home, address = served
    ceremony = _propose(home, address, "officer-hrss-alice", "generate-master-key", "name=op-minutes")
    minutes = tmp_path / "minutes.json"
    minutes.write_text("keep me")
    args = ("ceremony", "minutes", "--client", _client(home, "auditor-erin"), "--server", address, ceremony,
            "-o", str(minutes))
    refused = kms(*args)
    assert refused.returncode == 4
    assert refused.stderr == f"kms: error: {minutes} exists; choose another file, or pass --force to overwrite it\n"
    assert minutes.read_text() == "keep me" and not Path(f"{minutes}.sig").exists()
    kms(*args, "--force", check=True)
    assert json.loads(minutes.read_text())["ceremony_id"] == ceremony


def test_fetch_progress_off_a_terminal_luhn_and_reissue_json(served: tuple[Path, str], tmp_path: Path) -> None:
    home, address = served
    cards = tmp_path / "cards.csv"
    kms("dev", "cards", "--count", "20", "--prefix", "op-", "--out", str(cards), check=True)
    bad = tmp_path / "bad.csv"
    lines = cards.read_text().splitlines()
    row = lines[1].split(",")
    row[3] = row[3][:-1] + str((int(row[3][-1]) + 1) % 10)  # the check digit off by one
    bad.write_text("\n".join([lines[0], ",".join(row)]) + "\n")
    alice = _client(home, "officer-hrss-alice")
    refused = kms("batch", "create", "--client", alice, "--server", address, "--batch-id", "B-luhn", "--bureau",
                  "bureau-b", "--cards", str(bad))
    assert refused.returncode == 2 and refused.stderr == "kms: error: cards[0].pan: fails the Luhn check\n"
    kms("batch", "create", "--client", alice, "--server", address, "--batch-id", "B-op", "--bureau", "bureau-b",
        "--cards", str(cards), check=True)
    for domain, (proposer, approver) in (("hrss", ("alice", "bob")), ("bank", ("carol", "dave"))):
        ceremony = _propose(home, address, f"officer-{domain}-{proposer}", "authorize-batch", "batch_id=B-op")
        kms("ceremony", "approve", "--client", _client(home, f"officer-{domain}-{approver}"), "--server", address,
            "--yes", ceremony, check=True)
        kms("ceremony", "execute", "--client", _client(home, f"officer-{domain}-{proposer}"), "--server", address,
            ceremony, check=True)
    fetched = kms("station", "fetch", "--station-config", str(home / "stations" / "station-b1" / "station.yaml"),
                  "--server", address, "--batch-id", "B-op", "--out", str(tmp_path / "bundles"), "--json",
                  check=True)
    assert json.loads(fetched.stdout)["fetched"] == 20
    progress = [line for line in fetched.stderr.splitlines() if line.startswith("kms: ") and " % (" in line]
    assert [p.split(" %")[0] for p in progress] == [f"kms: {n}" for n in range(10, 101, 10)]
    assert progress[-1].startswith("kms: 100 % (20/20 bundles, ")
    reissued = kms("batch", "reissue", "--client", alice, "--server", address, "--batch-id", "B-op", "--card-ref",
                   "op-0000003", "--json", check=True)
    assert json.loads(reissued.stdout) == {"batch_id": "B-op", "card_ref": "op-0000003", "state": "issued",
                                           "awaiting": ["bank"]}


def test_a_closed_pipe_ends_keys_list_quietly(served: tuple[Path, str]) -> None:
    home, _ = served
    with subprocess.Popen([sys.executable, "-m", "kms.cli", "keys", "list", "--config", str(home / "kms.yaml")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.readline()
        proc.stdout.close()
        stderr = proc.stderr.read()
        assert proc.wait(timeout=120) in (0, 141) and stderr == b""


def test_kms_serve_names_a_certificate_it_cannot_read(served: tuple[Path, str]) -> None:
    home, _ = served
    doc = yaml.safe_load((home / "kms.yaml").read_text())
    doc["server"]["tls"]["cert"] = "pki/nowhere.pem"
    bad = home / "kms-badcert.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = kms("serve", "--config", str(bad), "--listen", "127.0.0.1:0")
    assert result.returncode == 3 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (f"kms: error: server.tls.cert: {home / 'pki' / 'nowhere.pem'}: cannot "
                                              "read (No such file or directory)")
