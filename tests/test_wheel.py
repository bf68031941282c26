"""The wheel, installed outside the checkout: `kms init`, `kms serve`, a batch fetched and opened, `kms selftest`.

Everything else in the suite imports kms from the source tree; this test proves that what `pip install` gets is
complete — every module, the policies and profiles as package data (read with importlib.resources), the console
script, the schema's revisions (kms/migrations) — and that nothing reads files relative to the repository. The wheel
is built from a copy of the tracked sources (so the checkout gets no build/ or egg-info), installed without
dependencies into a fresh venv under a temporary directory, and every command runs there with the working directory
outside the checkout and without PYTHONPATH. The dependencies come from the environment running the suite, through a
.pth file (no network); a .pth line adds a directory without processing the .pth files in it, so an editable kms
installed there is not seen.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import ROOT

pytestmark = pytest.mark.wheel


def _tracked(dest: Path) -> None:
    """The files a wheel is built from: tracked or new, not ignored (the working tree's versions)."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "pyproject.toml",
                            "README.md", "kms"], cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if not (ROOT / name).is_file():
            continue  # deleted in the working tree
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The venv's bin directory, kms installed from its wheel."""
    work = tmp_path_factory.mktemp("wheel")
    src, dist, venv = work / "src", work / "dist", work / "venv"
    _tracked(src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, cwd=work, capture_output=True)
    (wheel,) = dist.glob("kms-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, cwd=work)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", purelib], check=True, capture_output=True,
                               text=True).stdout.strip())
    (site / "suite-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, cwd=work, capture_output=True)
    return venv / "bin"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(bin_dir / "kms"), *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                            env=_env())
    assert result.returncode == 0, (args, result.stderr)
    return result


def test_the_installed_wheel_inits_serves_issues_and_self_tests(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(installed / "python"), "-c",
                            "import kms, kms.policies as p; print(kms.__file__); print(p.shipped('authz.yaml'))"],
                           capture_output=True, text=True, check=True, cwd=tmp_path, env=_env()).stdout.split()
    assert all(str(installed.parent) in path and str(ROOT) not in path for path in where), where

    home = tmp_path / "home"
    _run(installed, tmp_path, "init", str(home))
    assert sorted(p.name for p in (home / "profiles").iterdir()) == ["dual-app.yaml"]  # copied from package data
    # The schema's revisions (kms/migrations) ship in the wheel: init made the database at their head.
    schema = json.loads(_run(installed, tmp_path, "db", "current", "--config", str(home / "kms.yaml"), "--json").stdout)
    assert schema["state"] == "current" and schema["revision"] == schema["head"] == "0002_checkpoint_replica"
    server = subprocess.Popen([str(installed / "kms"), "serve", "--config", str(home / "kms.yaml"), "--listen",
                               "127.0.0.1:0"], stdout=subprocess.PIPE, text=True, cwd=tmp_path, env=_env())
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("kms: serving on port "), line
        address = f"localhost:{int(line.rsplit(' ', 1)[1])}"
        cards = tmp_path / "cards.csv"
        _run(installed, tmp_path, "dev", "cards", "--count", "3", "--out", str(cards))
        clients = home / "clients"
        _run(installed, tmp_path, "batch", "create", "--client", str(clients / "officer-hrss-alice.yaml"),
             "--server", address, "--batch-id", "B-wheel", "--bureau", "bureau-b", "--cards", str(cards))
        for domain, proposer, approver in (("hrss", "alice", "bob"), ("bank", "carol", "dave")):
            ceremony = json.loads(_run(installed, tmp_path, "ceremony", "propose", "--client",
                                       str(clients / f"officer-{domain}-{proposer}.yaml"), "--server", address,
                                       "authorize-batch", "batch_id=B-wheel", "--json").stdout)["ceremony_id"]
            _run(installed, tmp_path, "ceremony", "approve", "--client",
                 str(clients / f"officer-{domain}-{approver}.yaml"), "--server", address, "--yes", ceremony)
            _run(installed, tmp_path, "ceremony", "execute", "--client",
                 str(clients / f"officer-{domain}-{proposer}.yaml"), "--server", address, ceremony)
        fetched = json.loads(_run(installed, tmp_path, "station", "fetch", "--station-config",
                                  str(home / "stations" / "station-b1" / "station.yaml"), "--server", address,
                                  "--batch-id", "B-wheel", "--out", str(tmp_path / "bundles"), "--open",
                                  "--json").stdout)
        assert fetched["fetched"] == fetched["opened"] == 3
        assert fetched["keys"] == fetched["kcv_matches"] == 3 * 15
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0

    vectors = tmp_path / "derivation.json"
    shutil.copy2(ROOT / "tests" / "vectors" / "derivation.json", vectors)
    report = json.loads(_run(installed, tmp_path, "selftest", "--vectors", str(vectors), "--json").stdout)
    assert report["failed"] == 0 and report["cases"], report
    assert {case["status"] for case in report["cases"]} <= {"pass", "unsupported"}
    assert any(case["status"] == "pass" for case in report["cases"])
