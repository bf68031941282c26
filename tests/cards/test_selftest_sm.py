"""`kms selftest` and the SM4 cases: through the development SM token they run in the HSM and PASS; on a token
without SM4 they are "not supported by this HSM", checked in software.

The development token is SoftHSM2 with kms's patch (deploy/softhsm2-sm/): it checks kms's PKCS#11 calls, not a
vendor's HSM; the tests that need it skip, saying so, when it is not built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, VECTORS, VECTORS_PATH, requires_sm_token

from kms.cards import reference
from kms.dev import smtoken
from kms.hsm import softhsm

SM4_VECTORS_PATH = ROOT / "tests" / "vectors" / "sm4.json"
#: A few SM4 cases of the cards helper's tests/vectors/sm4.json (copied here, with their sources, so this file does not
#: depend on that one's layout): DivSM4 one level and the three-level HRSS chain (computed, cross-checked there with
#: `openssl enc -sm4-ecb`), the PBOC SM4 UDK of a published worked example, GB/T 32907 example 2.
SM4_CASES: dict[str, list[dict[str, Any]]] = {
    "sm4_block": [
        dict(VECTORS["sm4_block"][0], iterations=1),
        {"source": "GB/T 32907-2016 Appendix A example 2 (the same key, the plaintext encrypted 1,000,000 times)",
         "key": "0123456789ABCDEFFEDCBA9876543210", "plaintext": "0123456789ABCDEFFEDCBA9876543210",
         "ciphertext": "595298C7C6FD271F0402F804C33D3F66", "iterations": 1000000},
    ],
    "div_sm4": [{"source": "computed; DivSM4(K, D) = SM4_K(D || ~D)", "key": "0123456789ABCDEFFEDCBA9876543210",
                 "factor": "86843202AD932A48", "derived": "EC711A5A11144C831AB7CFB40241751A", "kcv": "F43B4A"}],
    "div_sm4_chain": [{"source": "computed; national -> province -> city -> card with the HRSS factors",
                       "root": "0123456789ABCDEFFEDCBA9876543210",
                       "factors": ["3332303030307368", "3332303230307378", "86843202AD932A48"],
                       "key": "2F1B1CA57F8C4D1F2D565545BB96E0F2", "kcv": "F4E53B"}],
    "pboc_sm4_udk": [{"source": "published worked example: 'Financial ARQC, ARPC verification generation rules' "
                                "(national algorithms), iteye.com/blog/scjava-2309584",
                      "imk": "F23BF4AE92B554C116139D4F67322667", "pan": "6214988660100000304", "psn": "00",
                      "y": "8866010000030400", "key": "016F6E76BD8E6FB4A17C28C4B05E03A8", "kcv": "CC97D4"}],
}


SM_MODULE = smtoken.sm_module()  # the development SM token (tests/helpers.py requires_sm_token skips without it)
requires_sm = requires_sm_token


def _selftest(vectors: Path, *options: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "kms.cli", "selftest", "--vectors", str(vectors), "--json",
                             *options], capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ))
    report: dict[str, Any] = json.loads(result.stdout) if result.stdout else {}
    report["returncode"], report["stderr"] = result.returncode, result.stderr
    return report


def _statuses(report: dict[str, Any]) -> dict[str, str]:
    return {c["case"]: c["status"] for c in report["cases"]}


def _write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "vectors.json"
    path.write_text(json.dumps(doc))
    return path


def _sm(*options: str) -> tuple[str, ...]:
    assert SM_MODULE is not None
    return ("--module", SM_MODULE, "--mechanisms", "softhsm2-sm-dev", *options)


@requires_sm
def test_the_shared_vectors_pass_through_the_sm_token_sm4_cases_included() -> None:
    report = _selftest(VECTORS_PATH, *_sm())
    assert report["returncode"] == 0, report["stderr"]
    statuses = _statuses(report)
    assert set(statuses.values()) == {"pass"}  # nothing skipped: the SM4 cases ran in the token
    details = {c["case"]: c["detail"] for c in report["cases"]}
    assert "SM4-ECB in the HSM matches the vector's ciphertext" in details["sm4_block[0]"]
    assert "681EDF34D206965E86B3E94F536E4246" not in details["sm4_block[0]"]  # a derived key: its KCV only
    assert reference.kcv_sm4(bytes.fromhex("681EDF34D206965E86B3E94F536E4246")).hex().upper() in details["sm4_block[0]"]
    assert "3-level DivSM4 in the HSM" in details["ssc_chain[1]"]


@requires_sm
def test_sm4_kinds_pass_in_the_sm_token(tmp_path: Path) -> None:
    report = _selftest(_write(tmp_path, SM4_CASES), *_sm())
    assert report["returncode"] == 0, report["stderr"]
    assert _statuses(report) == {"sm4_block[0]": "pass", "sm4_block[1]": "unsupported", "div_sm4[0]": "pass",
                                 "div_sm4_chain[0]": "pass", "pboc_sm4_udk[0]": "pass"}
    details = {c["case"]: c["detail"] for c in report["cases"]}
    assert "software reference matches" in details["sm4_block[1]"]  # a million token calls: software only
    assert details["pboc_sm4_udk[0]"] == "SM4 UDK in the HSM, KCV CC97D4"


@requires_sm
@pytest.mark.parametrize(("kind", "field", "value"), [("div_sm4", "derived", "00" * 16),
                                                      ("div_sm4_chain", "kcv", "000000"),
                                                      ("pboc_sm4_udk", "key", "11" * 16),
                                                      ("pboc_sm4_udk", "y", "8866010000030401")])
def test_a_wrong_sm4_vector_fails_in_the_sm_token(tmp_path: Path, kind: str, field: str, value: str) -> None:
    doc = {kind: [dict(SM4_CASES[kind][0], **{field: value})]}
    report = _selftest(_write(tmp_path, doc), *_sm())
    assert report["returncode"] == 1
    assert _statuses(report) == {f"{kind}[0]": "fail"}


@requires_sm
def test_the_cards_sm4_vectors_file_passes_through_the_sm_token() -> None:
    if not SM4_VECTORS_PATH.exists():
        pytest.skip("tests/vectors/sm4.json (the cards helper's SM4 vectors) is not in this tree")
    report = _selftest(SM4_VECTORS_PATH, *_sm())
    assert report["returncode"] == 0, report["stderr"]
    statuses = _statuses(report)
    iterated = {f"sm4_block[{i}]" for i, case in enumerate(json.loads(SM4_VECTORS_PATH.read_text())["sm4_block"])
                if case.get("iterations", 1) != 1}
    assert {name for name, status in statuses.items() if status != "pass"} == iterated


@requires_sm
def test_a_configuration_naming_the_sm_profile_runs_the_sm4_cases_in_its_domain_token(tmp_path: Path) -> None:
    """hsm.mechanisms in kms.yaml reaches the token session `kms selftest --config` opens (runtime.open_domain)."""
    assert SM_MODULE is not None
    conf = softhsm.write_conf(tmp_path / "hsm")
    softhsm.ensure_token(conf, "kms-bank", tmp_path / "bank.pin", tmp_path / "bank.so-pin")
    config_file = tmp_path / "kms.yaml"
    doc = {"hsm": {"module": SM_MODULE, "softhsm2_conf": "hsm/softhsm2.conf", "mechanisms": "softhsm2-sm-dev"},
           "domains": {"hrss": {"token": "kms-hrss", "pin": "file:bank.pin"},
                       "bank": {"token": "kms-bank", "pin": "file:bank.pin"}},
           "database": "sqlite:///kms.db", "profiles": "profiles"}
    config_file.write_text(yaml.safe_dump(doc))
    report = _selftest(VECTORS_PATH, "--config", str(config_file), "--domain", "bank")
    assert report["returncode"] == 0, report["stderr"]
    assert report["token"] == "kms-bank"
    assert set(_statuses(report).values()) == {"pass"}
    # The same configuration read with the standard profile: the SM4 cases are not supported there.
    doc["hsm"]["mechanisms"] = "pkcs11-standard"
    config_file.write_text(yaml.safe_dump(doc))
    report = _selftest(VECTORS_PATH, "--config", str(config_file), "--domain", "bank")
    assert report["returncode"] == 0, report["stderr"]
    assert {name for name, status in _statuses(report).items() if status == "unsupported"} == {"ssc_chain[1]",
                                                                                              "sm4_block[0]"}


def test_sm4_kinds_on_a_token_without_sm4_are_checked_in_software(tmp_path: Path) -> None:
    report = _selftest(_write(tmp_path, SM4_CASES))
    assert report["returncode"] == 0, report["stderr"]
    assert set(_statuses(report).values()) == {"unsupported"}
    assert all("software reference matches" in c["detail"] for c in report["cases"])
    assert "not supported by this HSM (SM4_ECB_ENCRYPT_DATA)" in report["cases"][2]["detail"]


def test_a_wrong_sm4_vector_fails_on_a_token_without_sm4(tmp_path: Path) -> None:
    report = _selftest(_write(tmp_path, {"pboc_sm4_udk": [dict(SM4_CASES["pboc_sm4_udk"][0], key="22" * 16)]}))
    assert report["returncode"] == 1
    assert _statuses(report) == {"pboc_sm4_udk[0]": "fail"}


def test_an_unknown_mechanism_profile_is_a_one_line_error(tmp_path: Path) -> None:
    report = _selftest(VECTORS_PATH, "--mechanisms", "thales")
    assert report["returncode"] == 3
    assert report["stderr"].strip() == ("kms: error: --mechanisms: unknown mechanism profile 'thales'; shipped: "
                                        "ibm-ep11, pkcs11-standard, softhsm2-sm-dev")
