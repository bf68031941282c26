"""deploy/: the systemd unit examples are hardened as docs/operations.md says, and `systemd-analyze verify` accepts
them (with ExecStart pointed at this installation's kms, which verify requires to exist)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

UNITS = sorted((ROOT / "deploy").glob("*.service"))
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes",
             "ReadWritePaths": "/var/lib/kms", "UMask": "0077", "CapabilityBoundingSet": "", "LimitCORE": "0"}


def _service(unit: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text(encoding="utf-8"))
    return dict(parser["Service"])


def test_there_is_a_unit_for_kms_serve() -> None:
    assert [u.name for u in UNITS] == ["kms-serve.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_units_are_hardened_and_run_as_a_user_of_their_own(unit: Path) -> None:
    service = _service(unit)
    assert service["User"] not in ("", "root") and service["Group"] == service["User"]
    for key, value in HARDENING.items():
        assert service.get(key) == value, f"{unit.name}: {key}"
    assert service["ExecStart"].startswith("/opt/kms/bin/kms ")


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_accepts_the_units(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (Debian: apt-get install systemd)")
    kms = Path(sys.prefix) / "bin" / "kms"
    if not kms.exists():
        pytest.skip(f"no kms console script at {kms} for ExecStart (run `make setup`)")
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text(encoding="utf-8").replace("/opt/kms/bin/kms", str(kms)), encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
