"""`kms selftest`: the shared vectors through a real (temporary) SoftHSM2 token, in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import ROOT, VECTORS, VECTORS_PATH


def _kms(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kms.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def test_every_shared_vector_passes_through_softhsm() -> None:
    result = _kms("selftest", "--vectors", str(VECTORS_PATH), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    statuses = {c["case"]: c["status"] for c in report["cases"]}
    expected_cases = sum(len(VECTORS[k]) for k in ("option_a", "gp_kmc", "ssc_chain", "sm4_block", "tdes_kcv"))
    assert len(statuses) == expected_cases
    unsupported = {name for name, status in statuses.items() if status == "unsupported"}
    # SoftHSM has no SM4: exactly the SM4 cases are "not supported by this HSM" (and checked in software).
    assert unsupported == {"ssc_chain[1]", "sm4_block[0]"}
    assert all(status == "pass" for name, status in statuses.items() if name not in unsupported)
    assert all("software reference matches" in c["detail"] for c in report["cases"] if c["status"] == "unsupported")
    assert report["failed"] == 0


def test_text_report_and_temporary_token_is_removed(tmp_path: Path) -> None:
    result = _kms("selftest", "--vectors", str(VECTORS_PATH), env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "PASS option_a[0]" in result.stdout
    assert "SKIP sm4_block[0]" in result.stdout and "not supported by this HSM" in result.stdout
    assert "0 failed" in result.stdout
    assert list(tmp_path.iterdir()) == []  # the scratch token's directory is gone


def _write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "vectors.json"
    path.write_text(json.dumps(doc))
    return path


def test_a_wrong_vector_fails_the_run(tmp_path: Path) -> None:
    doc = json.loads(VECTORS_PATH.read_text())
    doc["option_a"][1]["key"] = "00" * 16
    doc["gp_kmc"][0]["kcv_mac"] = "000000"
    result = _kms("selftest", "--vectors", str(_write(tmp_path, doc)))
    assert result.returncode == 1
    assert "FAIL option_a[1]" in result.stdout
    assert "FAIL gp_kmc[0]" in result.stdout and "KCV" in result.stdout
    assert "PASS option_a[0]" in result.stdout


def test_a_wrong_sm4_vector_fails_even_though_the_hsm_lacks_sm4(tmp_path: Path) -> None:
    doc = {"sm4_block": [dict(VECTORS["sm4_block"][0], ciphertext="00" * 16)]}
    result = _kms("selftest", "--vectors", str(_write(tmp_path, doc)))
    assert result.returncode == 1
    assert "FAIL sm4_block[0]" in result.stdout


def test_malformed_input_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = _kms("selftest", "--vectors", str(bad))
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0 and "not valid JSON" in result.stderr
    result = _kms("selftest", "--vectors", str(_write(tmp_path, {"rsa": []})))
    assert result.returncode == 3 and "unknown vector kind 'rsa'" in result.stderr
    result = _kms("selftest", "--vectors", str(VECTORS_PATH), "--module", str(tmp_path / "nope.so"))
    assert result.returncode == 3 and "no PKCS#11 module at" in result.stderr


def test_shared_vectors_copy_is_current() -> None:
    shared = ROOT.parent / "shared" / "vectors" / "derivation.json"
    if shared.exists():
        assert json.loads(shared.read_text()) == VECTORS
