"""Every shell block of README.md, run verbatim and in order, as a reader would paste them: in a fresh directory
(with ``.venv``, ``kms/`` and ``tests/`` of this checkout linked into it), with a free port in place of 7443 — the
server started by the README's ``kms serve`` line gets ``--listen 127.0.0.1:<port>`` and every other command
``KMS_SERVER=localhost:<port>``, which is what the README tells a reader who moves off 7443. Each block runs in
bash with ``set -euo pipefail``: every command must exit 0; the first that does not is named. A block preceded by
``<!-- readme-test: skip ... -->`` is not run (the demo and the test suite themselves)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

pytestmark = [pytest.mark.service, pytest.mark.hsm]

README = ROOT / "README.md"
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```sh\n(?P<body>.*?)```", re.S)
SERVE = re.compile(r"^\.venv/bin/kms serve\b")


def blocks(text: str) -> list[str]:
    """The README's ``sh`` blocks, in order, without those marked skip."""
    return [m["body"] for m in BLOCK.finditer(text) if "readme-test: skip" not in m["before"]]


def commands(block: str) -> list[str]:
    """A block's logical lines (backslash continuations joined), blank lines dropped."""
    return [c for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_readme_blocks_are_found() -> None:
    found = blocks(README.read_text(encoding="utf-8"))
    assert len(found) >= 6 and SERVE.match(commands(found[0])[1])
    assert not any("make test" in b for b in found)
    assert all("C-…" not in b and "[--" not in b for b in found)  # nothing a reader must edit before pasting


def test_every_readme_command_runs(tmp_path: Path) -> None:
    venv = Path(sys.prefix)
    if not (venv / "bin" / "kms").exists():
        pytest.skip(f"no kms console script in {venv}/bin (run `make setup`)")
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (the README takes ceremony ids with jq; apt-get install jq)")
    work = tmp_path / "readme"
    work.mkdir()
    for name, target in ((".venv", venv), ("kms", ROOT / "kms"), ("tests", ROOT / "tests")):
        (work / name).symlink_to(target)
    port = _free_port()
    env = {**os.environ, "KMS_SERVER": f"localhost:{port}"}
    for name in ("KMS_CLIENT", "KMS_STATION_CONFIG", "KMS_CONFIG"):
        env.pop(name, None)
    server: subprocess.Popen[str] | None = None
    try:
        for number, block in enumerate(blocks(README.read_text(encoding="utf-8")), start=1):
            script = []
            for line in commands(block):
                if SERVE.match(line):  # the README's server, in the background, on the free port
                    assert server is None, "the README starts two servers"
                    script_so_far = "\n".join(script)
                    if script_so_far:
                        _run(script_so_far, number, work, env)
                        script = []
                    server = subprocess.Popen(["bash", "-c", f"exec {line.split('#')[0]} --listen 127.0.0.1:{port}"],
                                              cwd=work, env=env, stdout=subprocess.PIPE, text=True)
                    assert server.stdout is not None
                    ready = server.stdout.readline()
                    assert ready == f"kms: serving on port {port}\n", f"README block {number}: {line!r}: {ready!r}"
                else:
                    script.append(line)
            if script:
                _run("\n".join(script), number, work, env)
        assert server is not None, "the README never starts kms serve"
        assert len(list((work / "bundles").glob("*.kmsb"))) == 100
        assert (work / "minutes.json").is_file() and (work / "opened.json").is_file()
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _run(script: str, number: int, work: Path, env: dict[str, str]) -> None:
    result = subprocess.run(
        ["bash", "-c", "set -euo pipefail\ntrap 'echo \"README command failed (exit $?): $BASH_COMMAND\" >&2' ERR\n"
                       + script],
        cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"README block {number}:\n{result.stderr[-3000:]}"
