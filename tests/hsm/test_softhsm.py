"""The development HSM script and SoftHSM2 helpers."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

from kms.hsm import softhsm


def test_dev_hsm_script_creates_the_tokens_once(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    first = subprocess.run(["bash", str(ROOT / "scripts" / "dev-hsm.sh"), str(tmp_path)], capture_output=True,
                           text=True, env=env, check=True)
    assert first.stdout.count("created") == 3
    pins = {p.name: p.read_text() for p in (tmp_path / "pins").iterdir()}
    second = subprocess.run(["bash", str(ROOT / "scripts" / "dev-hsm.sh"), str(tmp_path)], capture_output=True,
                            text=True, env=env, check=True)
    assert second.stdout.count("present") == 3
    assert {p.name: p.read_text() for p in (tmp_path / "pins").iterdir()} == pins  # PINs kept
    assert softhsm.token_labels(tmp_path / "softhsm2.conf") == {"kms-hrss", "kms-bank", "kms-station-a1"}
    for pin in (tmp_path / "pins").iterdir():
        assert stat.S_IMODE(pin.stat().st_mode) == 0o600
    assert f"SOFTHSM2_CONF={tmp_path / 'softhsm2.conf'}" in second.stdout


def test_find_module_honours_the_environment(tmp_path: Path, monkeypatch: object) -> None:
    import pytest

    assert Path(softhsm.find_module()).is_file()
    fake = tmp_path / "libvendor.so"
    fake.write_bytes(b"")
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("KMS_PKCS11_MODULE", str(fake))
        assert softhsm.find_module() == str(fake)
        assert softhsm.find_module("auto") == str(fake)
    finally:
        mp.undo()
