"""The development SM token's fixed-base SM2 scalar multiplication k.G (src/lib/crypto/kms_sm2_mulg.h, added by
deploy/softhsm2-sm/softhsm2-sm.patch), checked in C against OpenSSL's EC_POINT_mul by
deploy/softhsm2-sm/sm2-mulg-check.c, compiled here against the header exactly as the patch ships it.

deploy/softhsm2-sm/sm2-mulg-ct.c runs it under valgrind's memcheck with the scalar marked undefined ("ctgrind"), so
that a branch or a memory address computed from the secret scalar is reported.

Needs gcc and OpenSSL's development headers (libssl-dev, which deploy/softhsm2-sm/build.sh needs too), and valgrind
with its headers for the constant-time check; skips, saying which is missing, without them. Does not need the token:
tests/dev/test_smtoken.py checks the token's signatures.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import sm2_mulg_header

HERE = Path(__file__).resolve().parents[2] / "deploy" / "softhsm2-sm"
CHECK = HERE / "sm2-mulg-check.c"
CT_CHECK = HERE / "sm2-mulg-ct.c"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-Wno-deprecated-declarations")


@pytest.fixture(scope="module")
def gcc(tmp_path_factory: pytest.TempPathFactory) -> str:
    compiler = shutil.which("gcc")
    if compiler is None:
        pytest.skip("gcc is not installed: the C check of the SM2 comb needs it (apt-get install gcc)")
    probe = tmp_path_factory.mktemp("probe") / "probe.c"
    probe.write_text("#include <openssl/ec.h>\nint main(void) { return EC_GROUP_new(0) != 0; }\n")
    if subprocess.run([compiler, str(probe), "-lcrypto", "-o", str(probe.with_suffix(""))],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("OpenSSL's development headers are missing: the C check of the SM2 comb needs them "
                    "(apt-get install libssl-dev)")
    return compiler


def build(gcc: str, where: Path, header: str, source: Path = CHECK) -> Path:
    (where / "kms_sm2_mulg.h").write_text(header)
    binary = where / source.stem
    compiled = subprocess.run([gcc, *CFLAGS, "-I", str(where), str(source), "-lcrypto", "-o", str(binary)],
                              capture_output=True, text=True, check=False)
    assert compiled.returncode == 0, compiled.stderr
    return binary


def test_the_comb_equals_openssls_ec_point_mul_for_edge_and_random_scalars(gcc: str, tmp_path: Path) -> None:
    """Every edge scalar (1..300, n-300..n-1, 2^i and its neighbours, n - 2^i, Booth digits all +-64, the top window
    alone, ...) and 1,000 random ones against EC_POINT_mul; 34,000 random pairs mulg(a) + mulg(b) = mulg(a + b)
    (102,000 multiplications of random scalars, each result on the curve); the Booth recoding of every scalar sums
    back to it; k = 0 and k = n are refused."""
    binary = build(gcc, tmp_path, sm2_mulg_header())
    run = subprocess.run([str(binary), "34000", "1000"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    counts = re.fullmatch(r"ok: (\d+) edge and (\d+) random scalars equal to EC_POINT_mul, (\d+) random pairs "
                          r"a \+ b checked, (\d+) Booth recodings\n", run.stdout)
    assert counts is not None, run.stdout
    edge, random_scalars, pairs, booth = map(int, counts.groups())
    assert edge >= 1900 and random_scalars == 1000 and pairs == 34000 and booth == edge + random_scalars + pairs


#: Faults the check must find: the comb without one of its selects for the exceptional cases (a running sum at
#: infinity, a zero digit), with a negative digit's point not negated, or with one table entry of the top window
#: wrong (only scalars whose top digit is 5 use it).
MUTATIONS = {
    "no select when the running sum is infinity": (
        "\t\tkms_sm2_fe_select(X3, qInf, T.x, X3);\n", ""),
    "no select for a zero digit": (
        "\t\tkms_sm2_fe_select(X, dZero, X, X3);\n", "\t\tkms_sm2_fe_select(X, 0, X, X3);\n"),
    "a negative digit's point not negated": (
        "\t\tkms_sm2_cond_neg(T.y, w & 1, tmp[0]);\n", ""),
    "one wrong entry in the top window": (
        "\t\t\t\tkms_sm2_fe_from_bytes(table->t[j][i].y, by);\n",
        "\t\t\t\tkms_sm2_fe_from_bytes(table->t[j][i].y, by);\n"
        "\t\t\t\tif (j == KMS_SM2_WINDOWS - 1 && i == 4) table->t[j][i].y[0] ^= 1;\n"),
}


@pytest.mark.parametrize("fault", sorted(MUTATIONS))
def test_the_check_finds_a_wrong_comb(fault: str, gcc: str, tmp_path: Path) -> None:
    header = sm2_mulg_header()
    old, new = MUTATIONS[fault]
    assert header.count(old) == 1
    binary = build(gcc, tmp_path, header.replace(old, new))
    run = subprocess.run([str(binary), "2000", "100"], capture_output=True, text=True, check=False)
    assert run.returncode == 1 and run.stdout.startswith("MISMATCH"), run.stdout + run.stderr


@pytest.fixture(scope="module")
def valgrind() -> str:
    tool = shutil.which("valgrind")
    if tool is None:
        pytest.skip("valgrind is not installed: the constant-time check of the SM2 comb needs it (apt-get install "
                    "valgrind)")
    if not Path("/usr/include/valgrind/memcheck.h").is_file():
        pytest.skip("valgrind's headers are missing (/usr/include/valgrind/memcheck.h): the constant-time check of "
                    "the SM2 comb needs them")
    return tool


def ctgrind(valgrind: str, binary: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([valgrind, "--error-exitcode=3", str(binary)], capture_output=True, text=True, check=False)


def test_memcheck_sees_no_branch_or_address_computed_from_the_secret_scalar(gcc: str, valgrind: str,
                                                                            tmp_path: Path) -> None:
    run = ctgrind(valgrind, build(gcc, tmp_path, sm2_mulg_header(), CT_CHECK))
    assert run.returncode == 0 and run.stdout == "ok\n", run.stdout + run.stderr
    assert "ERROR SUMMARY: 0 errors" in run.stderr


#: Secret-dependent code memcheck must report: a table read at an index computed from the scalar, a branch on a digit.
CT_MUTATIONS = {
    "an indexed table read": (
        "\tkms_sm2_lookup(&T, table->t[0], w >> 1);\n",
        "\tif ((w >> 1) != 0) T = table->t[0][(w >> 1) - 1]; else memset(&T, 0, sizeof(T));\n"),
    "a branch on the sign of a digit": (
        "\t\tkms_sm2_cond_neg(T.y, w & 1, tmp[0]);\n",
        "\t\tif (w & 1) kms_sm2_cond_neg(T.y, 1, tmp[0]);\n"),
}


@pytest.mark.parametrize("fault", sorted(CT_MUTATIONS))
def test_memcheck_reports_secret_dependent_code(fault: str, gcc: str, valgrind: str, tmp_path: Path) -> None:
    header = sm2_mulg_header()
    old, new = CT_MUTATIONS[fault]
    assert header.count(old) == 1
    run = ctgrind(valgrind, build(gcc, tmp_path, header.replace(old, new), CT_CHECK))
    assert run.returncode == 3, run.stdout + run.stderr
    assert "depends on uninitialised value" in run.stderr or "Use of uninitialised value" in run.stderr
