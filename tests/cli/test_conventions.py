"""The command line's conventions, checked over the parser itself and through the real CLI where no token is
needed: a description and an example for every command, help for every flag, the ceremony operations listed from
their table, environment variables as defaults, --version, --json, no silent overwrite, progress on stderr, a
closed stdout pipe."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT

from kms.cards.cardid import luhn_valid
from kms.ceremony.operations import OPERATIONS
from kms.cli import common
from kms.cli.main import main, parser


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kms.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def _commands(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                      argparse.ArgumentParser]]:
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_every_command_has_a_description_an_example_and_help_for_every_flag() -> None:
    found = list(_commands(parser()))
    assert len(found) > 40  # every group and every command
    for path, p in found:
        name = " ".join(("kms", *path))
        assert p.description and len(p.description) > 20, f"{name}: no description"
        assert p.epilog and "example:\n  " in p.epilog, f"{name}: no example"
        if path:
            assert f"kms {path[0]}" in p.epilog, f"{name}: the example does not run it"
        for action in p._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{name} {action.option_strings or action.dest}: no help"


def test_ceremony_propose_help_lists_every_operation_with_its_parameters() -> None:
    shown = _run("ceremony", "propose", "--help")
    assert shown.returncode == 0
    for op in OPERATIONS.values():
        assert f"  {op.name}: {op.summary}" in shown.stdout
        assert op.params and op.params.split()[0] in shown.stdout


def test_version_comes_from_the_package_metadata() -> None:
    from importlib import metadata

    shown = _run("--version")
    assert shown.returncode == 0 and shown.stdout == f"kms {metadata.version('kms')}\n"


def test_environment_variables_are_defaults_and_a_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in common.ENV.values():
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit):  # --client is required when KMS_CLIENT is not set
        parser().parse_args(["ceremony", "list"])
    monkeypatch.setenv("KMS_CLIENT", "/etc/kms/alice.yaml")
    monkeypatch.setenv("KMS_SERVER", "kms.example:8443")
    monkeypatch.setenv("KMS_STATION_CONFIG", "/etc/kms/station.yaml")
    monkeypatch.setenv("KMS_CONFIG", "/etc/kms/kms.yaml")
    args = parser().parse_args(["ceremony", "list"])
    assert (args.client, args.server) == (Path("/etc/kms/alice.yaml"), "kms.example:8443")
    args = parser().parse_args(["ceremony", "list", "--client", "bob.yaml", "--server", "other:1"])
    assert (args.client, args.server) == (Path("bob.yaml"), "other:1")
    assert parser().parse_args(["station", "fetch", "--batch-id", "B", "--out", "o"]).station_config == \
        Path("/etc/kms/station.yaml")
    assert parser().parse_args(["keys", "list"]).config == Path("/etc/kms/kms.yaml")
    assert "$KMS_CLIENT" in _run("batch", "create", "--help").stdout


def test_dev_cards_writes_luhn_valid_pans_refuses_to_overwrite_and_speaks_json(tmp_path: Path) -> None:
    out = tmp_path / "cards.csv"
    made = _run("dev", "cards", "--count", "500", "--out", str(out), "--prefix", "b7-", "--json")
    assert made.returncode == 0 and json.loads(made.stdout) == {"out": str(out), "cards": 500}
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 500 and rows[0]["card_ref"] == "b7-0000000"
    assert all(luhn_valid(r["pan"]) and len(r["pan"]) == 19 for r in rows)
    again = _run("dev", "cards", "--count", "5", "--out", str(out))
    assert again.returncode == 4
    assert again.stderr == f"kms: error: {out} exists; choose another file, or pass --force to overwrite it\n"
    assert len(out.read_text().splitlines()) == 501  # untouched
    assert _run("dev", "cards", "--count", "5", "--out", str(out), "--force").returncode == 0
    assert len(out.read_text().splitlines()) == 6


def test_profile_check_speaks_json() -> None:
    checked = _run("profile", "check", "kms/policies/profiles", "--json")
    assert checked.returncode == 0
    assert json.loads(checked.stdout) == [{"file": "kms/policies/profiles/dual-app.yaml", "profile": "dual-app-v1",
                                           "pan_luhn": True, "keys": {"hrss": 9, "bank": 6}}]


def test_a_closed_stdout_pipe_is_not_an_error() -> None:
    """`kms ... | head -1`: the reader went away. Exit 141 (as git) when a write found the pipe closed, 0 when the
    output fitted in the pipe before; nothing on stderr either way."""
    for args, codes in ((["profile", "check", *["kms/policies/profiles"] * 2000], {141}),  # ~100 KB: beyond a pipe
                        (["ceremony", "propose", "--help"], {0, 141})):
        with subprocess.Popen([sys.executable, "-m", "kms.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=ROOT) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.readline()
            proc.stdout.close()
            stderr = proc.stderr.read()
            assert proc.wait(timeout=120) in codes, stderr
        assert stderr == b""


def test_progress_off_a_terminal_is_a_line_per_ten_percent(capsys: pytest.CaptureFixture[str]) -> None:
    progress = common.Progress(200, unit="bundles")
    for count in range(1, 201):
        progress.update(count)
    progress.done()
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 10
    assert lines[0].startswith("kms: 10 % (20/200 bundles, ") and "/s, ETA " in lines[0]
    assert lines[-1].startswith("kms: 100 % (200/200 bundles, ")


def test_main_maps_not_approved_to_its_own_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    from kms import errors

    assert errors.NotApproved("not approved").exit_code == 14 != errors.Cancelled("x").exit_code
    assert main(["ceremony", "verify-minutes", "/nonexistent/minutes.json", "--public-key", "/nonexistent"]) == 2
    assert "kms: error: " in capsys.readouterr().err
