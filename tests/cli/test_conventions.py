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

from kms import errors
from kms.cards.cardid import luhn_valid
from kms.ceremony.operations import OPERATIONS
from kms.cli import common
from kms.cli.main import main, parser


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in this process (main(), as the console script calls it): its exit status, stdout and stderr."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as done:  # --help, --version, usage errors
                code = done.code if isinstance(done.code, int) else 0 if done.code is None else 2
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


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
    sm4, aes, sm2, ecdsa = "SM4", "AES256", "SM2-SM3", "ECDSA-P256-SHA256"
    assert json.loads(checked.stdout) == [
        {"file": "kms/policies/profiles/dual-app-mixed.yaml", "profile": "dual-app-mixed-v1", "pan_luhn": True,
         "keys": {"hrss": 9, "bank": 6}, "transport": {"hrss": aes, "bank": sm4},
         "signature": {"hrss": ecdsa, "bank": sm2}},
        {"file": "kms/policies/profiles/dual-app-sm.yaml", "profile": "dual-app-sm-v1", "pan_luhn": True,
         "keys": {"hrss": 9, "bank": 6}, "transport": {"hrss": sm4, "bank": sm4},
         "signature": {"hrss": sm2, "bank": sm2}},
        {"file": "kms/policies/profiles/dual-app.yaml", "profile": "dual-app-v1", "pan_luhn": True,
         "keys": {"hrss": 9, "bank": 6}, "transport": {"hrss": aes, "bank": aes},
         "signature": {"hrss": ecdsa, "bank": ecdsa}},
    ]


def test_a_closed_stdout_pipe_is_not_an_error() -> None:
    """`kms ... | head -1`: the reader went away. Exit 141 (as git) and nothing on stderr for a command's output;
    --help (argparse ignores a failed write of help) exits 0 quietly. The pipe's reading end is closed before the
    command starts, so every write finds it closed; with a real `head`, an output that fits in the pipe before head
    exits still exits 0."""
    for args, code in ((["profile", "check", "kms/policies/profiles"], 141), (["ceremony", "propose", "--help"], 0)):
        reader, writer = os.pipe()
        os.close(reader)
        try:
            result = subprocess.run([sys.executable, "-m", "kms.cli", *args], stdout=writer, stderr=subprocess.PIPE,
                                    cwd=ROOT, timeout=120)
        finally:
            os.close(writer)
        assert (result.returncode, result.stderr) == (code, b""), (args, result.stderr)


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


def test_each_operations_listed_parameters_are_the_ones_its_check_takes() -> None:
    """`propose --help` lists Operation.params: every name there is accepted by the operation's check, and every
    required one that is left out is refused as required (so the list cannot drift from the code)."""
    import re

    from kms.errors import InvalidArgument

    for op in OPERATIONS.values():
        alternatives = op.params.split(" | ")
        for i, alternative in enumerate(alternatives):
            pairs = re.findall(r"(\[?)([a-z_]+)=(\S+)", alternative)
            assert pairs, op.name
            params: dict[str, object] = {"bureau": "bureau-b"} if i else {}
            for _, name, value in pairs:
                literal = value if re.fullmatch(r"[a-z][a-z0-9-]*(\|[a-z0-9-]+)*", value) else "x"
                params[name] = literal.split("|")[0]
            try:
                op.check(None, "hrss", params)  # type: ignore[arg-type]
            except InvalidArgument as error:
                assert "is not a parameter" not in error.reason and "is required" not in error.reason, (op.name, error)
            except (AttributeError, TypeError):
                pass  # past the parameter names, on to checks that need the service's state
            for optional, name, _ in pairs:
                if not optional and name not in ("method", "bureau"):
                    with pytest.raises(InvalidArgument, match=rf"^params\.{name}: is required$"):
                        op.check(None, "hrss", {k: v for k, v in params.items() if k != name})  # type: ignore[arg-type]


def test_a_symbolic_link_at_the_output_path_is_not_replaced_without_force(tmp_path: Path) -> None:
    kept = tmp_path / "kept.json"
    kept.write_text("keep me")
    link, dangling = tmp_path / "minutes.json", tmp_path / "gone.json"
    link.symlink_to(kept)
    dangling.symlink_to(tmp_path / "nowhere")
    for path in (link, dangling):
        with pytest.raises(errors.InvalidArgument, match="is a symbolic link; kms does not write through one"):
            common.refuse_existing(path, force=False)
        common.refuse_existing(path, force=True)  # --force: the writer decides (kms.files never writes through)
    assert link.is_symlink() and kept.read_text() == "keep me"
