"""Review s21: checks of the development SM token's fixed-base comb (kms_sm2_mulg.h, created by
deploy/softhsm2-sm/softhsm2-sm.patch) written apart from the author's sm2-mulg-check.c / sm2-mulg-ct.c.

- The header's argument that the comb's mixed addition never meets Q = T or Q = -T for k in [1, n-1] is checked by
  enumeration (pure Python, no curve arithmetic): for every window and every digit, every value of the running sum
  that would make the addition exceptional is listed (those congruent to +-t mod n inside the running sum's range)
  and a scalar realising it is looked for. None exists for k in [1, n-1]; for k in [1, 2^256) the enumeration does
  find k = n (so it is not vacuous).
- The field code against Python's integers at its edges (0, 1, p - 1, limbs 0 / all ones / p's, R mod p, ...): every
  result equals a.b.R^-1 / a + b / a - b / a^-1 mod p and is fully reduced; from_bytes takes any 256-bit value.
- The comb, instrumented (every field result checked to lie in [0, p), every mixed addition checked not to meet
  Q = +-T when its result is used), over edge and structured scalars (runs of ones 2^a - 2^b and n - (2^a - 2^b),
  the enumeration's boundary cases), against OpenSSL's ladder, and a sample against a pure Python SM2.
- The Booth digits the C uses against a recoding written here from the definition.
- ctgrind (valgrind memcheck with the scalar undefined) on the comb compiled as C++ with g++ at the flags the token
  is built with (-O2 -g0), and at -O1, -O3 and -Os, on many scalars.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import SM_TOKEN_PATCH, sm2_mulg_header

HARNESS = Path(__file__).resolve().parent / "review" / "sm2_comb_harness.c"

P = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF
N = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123
A = P - 3
B = 0x28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93
GX = 0x32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7
GY = 0xBC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0
R = 1 << 256
R_INV = pow(R, -1, P)
W, WINDOWS = 7, 37


# -- the scalar-level argument, by enumeration ----------------------------------------------------------------------

def booth(k: int) -> list[int]:
    """The signed 7-bit digits of k written from the definition: d_j = v_j + c_(j-1) - 128 c_j, with v_j the bits
    7j..7j+6 of k and c_j its bit 7j+6 (c_(-1) = 0), so that sum d_j 2^(7j) = k for k < 2^258."""
    digits = []
    for j in range(WINDOWS):
        v = (k >> (W * j)) & 0x7F
        carry_in = (k >> (W * j - 1)) & 1 if j else 0
        digits.append(v + carry_in - 128 * ((k >> (W * j + 6)) & 1))
    assert sum(d << (W * j) for j, d in enumerate(digits)) == k
    return digits


def partial_sum(k: int, j: int) -> int:
    """S_j = sum of the digits of the windows 0..j, times their weights."""
    return sum(d << (W * i) for i, d in enumerate(booth(k)[: j + 1]))


def exceptional_scalars(largest: int) -> list[tuple[int, int, int, str]]:
    """Every k in [1, largest] for which the comb's addition of window j+1 meets Q = T or Q = -T (Q = S_j.G != O,
    T = d_(j+1) 2^(7(j+1)).G != O): (k, j + 1, d, "Q = T" / "Q = -T")."""
    found = []
    for j in range(WINDOWS - 1):
        half = 1 << (W * j + 6)  # -half <= S_j < half
        for d in range(-64, 65):
            if d == 0:
                continue
            t = d << (W * (j + 1))
            for target, what in ((t, "Q = T"), (-t, "Q = -T")):
                # every S in [-half, half) with S = target mod n, S != 0 (S = 0 is Q = O, selected away)
                m = -((target + half) // N)  # the smallest m with target + m.n >= -half
                while target + m * N < half:
                    s = target + m * N
                    if s != 0:
                        low = s % (1 << (W * j + W))
                        carry = 1 if s < 0 else 0
                        for v in range(128):  # the next window's 7 bits, giving the digit d
                            if v + carry - 128 * (v >> 6) != d:
                                continue
                            k = low + (v << (W * j + W))
                            if j + 1 == WINDOWS - 1 and v >= 16:
                                continue  # the top window holds bits 252..255 only
                            if 1 <= k <= largest and partial_sum(k, j) == s and booth(k)[j + 1] == d:
                                found.append((k, j + 1, d, what))
                    m += 1
    return found


def test_booth_recoding_written_here_sums_back() -> None:
    rng = random.Random(1)
    for k in [1, N - 1, N - 2, 2**256 - 1, 2**255, 2**252 * 15] + [rng.randrange(1, N) for _ in range(2000)]:
        digits = booth(k)
        assert all(-64 <= d <= 64 for d in digits) and 0 <= digits[-1] <= 16
        for j in range(WINDOWS):
            assert -(1 << (W * j + 6)) <= partial_sum(k, j) < (1 << (W * j + 6))


def test_no_scalar_in_1_to_n_minus_1_makes_an_addition_exceptional() -> None:
    """The header's argument, by enumeration: for k in [1, n-1] no addition of the comb meets Q = +-T."""
    assert exceptional_scalars(N - 1) == []


def test_the_enumeration_finds_the_exceptional_scalars_above_n() -> None:
    """Not vacuous: allowing k up to 2^256 - 1 it finds k = n (the last addition is Q = -T: the sum is O) and
    nothing else; the callers keep k and d in [1, n-1] (k by BN_priv_rand_range, d by the range checks)."""
    found = exceptional_scalars(2**256 - 1)
    assert [(k, what) for k, _, _, what in found] == [(N, "Q = -T")]


# -- the C code, compiled against the header as the patch ships it -------------------------------------------------

_WRAPPERS = """
#define KMS_REVIEW_INSTRUMENT 1
static long kms_review_unreduced, kms_review_exceptional;
static uint64_t kms_review_jac[3][4];	/* the last k.G's Jacobian X, Y, Z before the affine conversion */
static inline int kms_review_lt_p(const uint64_t a[4])
{
	for (int i = 3; i >= 0; i--)
		if (a[i] != KMS_SM2_P[i]) return a[i] < KMS_SM2_P[i];
	return 0;
}
static inline void kms_sm2_fe_mul(uint64_t r[4], const uint64_t a[4], const uint64_t b[4])
{
	kms_review_unreduced += !kms_review_lt_p(b);	/* a may be any 256-bit value (from_bytes) */
	kms_sm2_fe_mul_raw(r, a, b);
	kms_review_unreduced += !kms_review_lt_p(r);
}
static inline void kms_sm2_fe_add(uint64_t r[4], const uint64_t a[4], const uint64_t b[4])
{
	kms_review_unreduced += !kms_review_lt_p(a) + !kms_review_lt_p(b);
	kms_sm2_fe_add_raw(r, a, b);
	kms_review_unreduced += !kms_review_lt_p(r);
}
static inline void kms_sm2_fe_sub(uint64_t r[4], const uint64_t a[4], const uint64_t b[4])
{
	kms_review_unreduced += !kms_review_lt_p(a) + !kms_review_lt_p(b);
	kms_sm2_fe_sub_raw(r, a, b);
	kms_review_unreduced += !kms_review_lt_p(r);
}
"""


def instrumented_header() -> str:
    """The shipped header with every field result checked to be fully reduced and every mixed addition checked
    for Q = +-T (H = 0 with Q != O and T a point) — counted in kms_review_unreduced / kms_review_exceptional."""
    text = sm2_mulg_header()
    for name in ("mul", "add", "sub"):
        old = f"static inline void kms_sm2_fe_{name}(uint64_t r[4]"
        assert text.count(old) == 1
        text = text.replace(old, f"static inline void kms_sm2_fe_{name}_raw(uint64_t r[4]")
    old = "#undef KMS_SM2_MUL_ROUND\n"
    assert text.count(old) == 1
    text = text.replace(old, old + _WRAPPERS)
    old = "\tkms_sm2_fe_sub(h, u2, X1);\t\t/* H = U2 - X1 */\n"
    assert text.count(old) == 1
    text = text.replace(old, old + "\tkms_review_exceptional += kms_sm2_fe_zero_mask(h) && !kms_sm2_fe_zero_mask(Z1) &&"
                                   " !(kms_sm2_fe_zero_mask(x2) && kms_sm2_fe_zero_mask(y2));\n")
    old = "\tuint64_t inf = kms_sm2_fe_zero_mask(Z);\n"
    assert text.count(old) == 1
    text = text.replace(old, "\tmemcpy(kms_review_jac[0], X, 32); memcpy(kms_review_jac[1], Y, 32);"
                             " memcpy(kms_review_jac[2], Z, 32);\n" + old)
    return text


@pytest.fixture(scope="module")
def gcc() -> str:
    compiler = shutil.which("gcc")
    if compiler is None:
        pytest.skip("gcc is not installed")
    return compiler


def build(compiler: str, where: Path, header: str, source: Path, *flags: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "kms_sm2_mulg.h").write_text(header)
    binary = where / (source.stem + "".join(f.replace("-", "_") for f in flags))
    run = subprocess.run([compiler, *flags, "-Wall", "-Wno-deprecated-declarations", "-I", str(where), str(source),
                          "-lcrypto", "-o", str(binary)], capture_output=True, text=True, check=False)
    if run.returncode != 0 and "openssl/" in run.stderr:
        pytest.skip("OpenSSL's development headers are missing")
    assert run.returncode == 0, run.stderr
    return binary


class Harness:
    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def run(self, lines: list[str]) -> list[str]:
        done = subprocess.run([str(self.binary)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                              check=True, timeout=1200)
        out = done.stdout.splitlines()
        assert len(out) == len(lines), done.stdout[-2000:] + done.stderr[-2000:]
        return out


@pytest.fixture(scope="module")
def harness(gcc: str, tmp_path_factory: pytest.TempPathFactory) -> Harness:
    return Harness(build(gcc, tmp_path_factory.mktemp("plain"), sm2_mulg_header(), HARNESS, "-O2"))


@pytest.fixture(scope="module")
def instrumented(gcc: str, tmp_path_factory: pytest.TempPathFactory) -> Harness:
    return Harness(build(gcc, tmp_path_factory.mktemp("instrumented"), instrumented_header(), HARNESS, "-O2"))


def h64(x: int) -> str:
    return f"{x:064x}"


def edge_elements() -> list[int]:
    limbs = [0, 1, 2, 2**32 - 1, 2**32, 2**63, 2**64 - 2, 2**64 - 1, 0xFFFFFFFF00000000, 0xFFFFFFFEFFFFFFFF,
             0xFFFFFFFF00000001, 0xFFFFFFFEFFFFFFFE]
    rng = random.Random(7)
    values = {0, 1, 2, 3, P - 1, P - 2, P - 3, R % P, (R * R) % P, R_INV, P // 2, P // 2 + 1, 2**255, 2**224,
              2**256 - P, P - (2**256 - P)}
    values |= {(1 << i) % P for i in range(256)} | {(P - (1 << i)) % P for i in range(256)}
    for _ in range(1500):
        values.add(sum(rng.choice(limbs) << (64 * i) for i in range(4)))
    return sorted(v for v in values if v < P)


def test_field_operations_equal_pythons_integers_and_are_fully_reduced(harness: Harness) -> None:
    rng = random.Random(2112)
    edge = edge_elements()
    pairs = [(a, b) for a in edge[:80] for b in edge[-80:]]
    pairs += [(rng.choice(edge), rng.choice(edge)) for _ in range(20000)]
    pairs += [(rng.randrange(P), rng.randrange(P)) for _ in range(5000)]
    lines, want = [], []
    for a, b in pairs:
        lines += [f"mul {h64(a)} {h64(b)}", f"add {h64(a)} {h64(b)}", f"sub {h64(a)} {h64(b)}"]
        want += [a * b * R_INV % P, (a + b) % P, (a - b) % P]
    for a in edge:
        lines += [f"sqr {h64(a)}", f"inv {h64(a)}", f"to {h64(a)}"]
        # inv works on Montgomery forms: (aR)^-1 . R = a^-1 R, i.e. raw a -> R^2 / a
        want += [a * a * R_INV % P, (pow(a, -1, P) * R * R % P) if a else 0, a * R_INV % P]
    got = harness.run(lines)
    bad = [(line, g, f"{w:064x}") for line, g, w in zip(lines, got, want, strict=True) if int(g, 16) != w]
    assert bad == []


def test_from_bytes_takes_any_256_bit_value(harness: Harness) -> None:
    values = [0, 1, P - 1, P, P + 1, 2**256 - 1, 2**256 - 2, 2 * P - 2**256 + 5, 2**255] + \
             [2**256 - (1 << i) for i in range(256)] + [P + (1 << i) for i in range(220)]
    values = [v for v in values if v < 2**256]
    got = harness.run([f"from {h64(v)}" for v in values])
    assert [int(g, 16) for g in got] == [v * R % P for v in values]


def test_the_c_booth_digits_equal_the_definition(harness: Harness) -> None:
    rng = random.Random(3)
    scalars = [1, N - 1, 2**256 - 1, 2**252, 2**252 - 1, 15 * 2**252] + [rng.randrange(2**256) for _ in range(3000)]
    scalars += [(1 << a) - (1 << b) for a in range(0, 257, 3) for b in range(0, a, 5) if (1 << a) - (1 << b) < 2**256]
    got = harness.run([f"booth {h64(k)}" for k in scalars])
    assert [list(map(int, g.split())) for g in got] == [booth(k) for k in scalars]


# -- the comb --------------------------------------------------------------------------------------------------------

def py_mul(k: int) -> tuple[int, int] | None:
    """k.G with affine Python arithmetic (the textbook group law; shares nothing with the C or OpenSSL)."""
    def add(p1: tuple[int, int] | None, p2: tuple[int, int] | None) -> tuple[int, int] | None:
        if p1 is None:
            return p2
        if p2 is None:
            return p1
        if p1[0] == p2[0] and (p1[1] + p2[1]) % P == 0:
            return None
        if p1 == p2:
            lam = (3 * p1[0] * p1[0] + A) * pow(2 * p1[1], -1, P) % P
        else:
            lam = (p2[1] - p1[1]) * pow(p2[0] - p1[0], -1, P) % P
        x = (lam * lam - p1[0] - p2[0]) % P
        return x, (lam * (p1[0] - x) - p1[1]) % P

    result: tuple[int, int] | None = None
    addend: tuple[int, int] | None = (GX, GY)
    while k:
        if k & 1:
            result = add(result, addend)
        addend = add(addend, addend)
        k >>= 1
    return result


def boundary_scalars() -> list[int]:
    """Scalars at the edges of the enumeration: for each window and digit, k whose running sum is the extreme of
    its range (-2^(7j+6) or 2^(7j+6) - 1) with that next digit, and the top window's digits with k close to n."""
    found = set()
    for j in range(WINDOWS - 1):
        half = 1 << (W * j + 6)
        for s in (-half, half - 1, -1, 1):
            low = s % (1 << (W * j + W))
            for v in range(128):
                k = low + (v << (W * j + W))
                if j + 1 == WINDOWS - 1 and v >= 16:
                    continue
                if 1 <= k < N:
                    found.add(k)
                    found.add(N - k)
    for d in range(17):
        for delta in (-(2**251), -(2**251) + 1, -1, 0, 1, 2**251 - 1):
            k = (d << 252) + delta
            if 1 <= k < N:
                found.add(k)
    return sorted(found)


@pytest.mark.slow
def test_the_instrumented_comb_stays_reduced_and_unexceptional_and_equals_openssl(instrumented: Harness) -> None:
    """Every field value the comb computes is in [0, p) and no used addition meets Q = +-T, over the boundary
    scalars (35,786), runs of ones and n minus them (about 65,000), and 2,000 random scalars; every result equals
    OpenSSL's EC_POINT_mul (about 100 s)."""
    rng = random.Random(4)
    scalars = boundary_scalars() + [rng.randrange(1, N) for _ in range(2000)]
    got = instrumented.run([f"ladder {h64(k)}" for k in scalars] + ["runs", "stats"])
    different = [hex(k) for k, g in zip(scalars, got[: len(scalars)], strict=True) if g != "same"]
    assert different == []
    runs = got[-2].split()
    assert runs[0] == "runs" and int(runs[1]) > 60000 and runs[2] == "0", got[-2]
    assert got[-1] == "stats 0 0"


def test_the_comb_equals_a_python_sm2_for_edge_scalars(harness: Harness) -> None:
    rng = random.Random(5)
    scalars = [1, 2, 3, 63, 64, 65, 127, 128, 129, N - 1, N - 2, N - 64, N - 65, 2**252, 15 * 2**252,
               2**256 - N, N - 2**252, (N >> 252) << 252, ((N >> 252) << 252) - 1, 2**255 - 1, 2**255 + 1]
    scalars += rng.sample(boundary_scalars(), 60) + [rng.randrange(1, N) for _ in range(20)]
    scalars = [k for k in scalars if 1 <= k < N]
    got = harness.run([f"mulg {h64(k)}" for k in scalars] + [f"mulg {h64(0)}", f"mulg {h64(N)}"])
    for k, g in zip(scalars, got[: len(scalars)], strict=True):
        x, y = py_mul(k)  # type: ignore[misc]
        assert g == f"1 {x:064x} {y:064x}", hex(k)
    assert got[-2:] == ["0", "0"]


# -- constant time, as the token is compiled ------------------------------------------------------------------------

CT = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/ec.h>
#include <openssl/obj_mac.h>
#include <openssl/rand.h>
#include <valgrind/memcheck.h>
#include "kms_sm2_mulg.h"

int main(void)
{
	EC_GROUP* group = EC_GROUP_new_by_curve_name(NID_sm2);
	BN_CTX* ctx = BN_CTX_new();
	kms_sm2_table* table = (kms_sm2_table*) malloc(sizeof(kms_sm2_table));
	if (group == NULL || ctx == NULL || table == NULL || !kms_sm2_table_build(table, group, ctx)) return 1;
	static const unsigned char n[32] = { 0xFF, 0xFF, 0xFF, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
		0xFF, 0xFF, 0xFF, 0xFF, 0x72, 0x03, 0xDF, 0x6B, 0x21, 0xC6, 0x05, 0x2B, 0x53, 0xBB, 0xF4, 0x09, 0x39, 0xD5,
		0x41, 0x22 };	/* n - 1 */
	for (int i = 0; i < 40; i++)
	{
		unsigned char k[32], x[32], y[32];
		if (i == 0) memcpy(k, n, 32);
		else if (i < 8) { memset(k, 0, 32); k[31 - 4 * i] = (unsigned char) (0x40 << (i & 1)); }	/* zero digits */
		else if (i < 12) { memset(k, 0, 32); k[0] = (unsigned char) (0x10 * (i - 7)); }	/* top window only */
		else { RAND_bytes(k, 32); k[0] &= 0x7F; }
		VALGRIND_MAKE_MEM_UNDEFINED(k, sizeof(k));
		int ok = kms_sm2_mulg(table, k, x, y);
		VALGRIND_MAKE_MEM_DEFINED(&ok, sizeof(ok));
		VALGRIND_MAKE_MEM_DEFINED(x, sizeof(x));
		VALGRIND_MAKE_MEM_DEFINED(y, sizeof(y));
		if (!ok) { printf("failed %d\n", i); return 1; }
	}
	printf("ok\n");
	return 0;
}
"""


@pytest.mark.parametrize("level", ["-O2", "-O1", "-O3", "-Os"])
def test_ctgrind_as_the_token_compiles_it_with_gpp(level: str, tmp_path: Path) -> None:
    """The token compiles the header as C++ (OSSLECDSA.cpp) with g++ -O2 -g0: memcheck, with the scalar undefined,
    reports no branch or address computed from it, at that level and others."""
    gpp, valgrind = shutil.which("g++"), shutil.which("valgrind")
    if gpp is None or valgrind is None or not Path("/usr/include/valgrind/memcheck.h").is_file():
        pytest.skip("g++ and valgrind (with its headers) are needed")
    source = tmp_path / "ct.cpp"
    source.write_text(CT)
    binary = build(gpp, tmp_path, sm2_mulg_header(), source, level, "-g0")
    run = subprocess.run([valgrind, "--error-exitcode=3", str(binary)], capture_output=True, text=True, check=False,
                         timeout=1200)
    assert run.returncode == 0 and run.stdout == "ok\n", run.stdout + run.stderr[-4000:]


def test_ctgrind_with_gpp_reports_a_branch_on_a_digit(tmp_path: Path) -> None:
    """The harness above sees secret-dependent code when there is some (g++ -O2 -g0, a branch on a digit's sign)."""
    gpp, valgrind = shutil.which("g++"), shutil.which("valgrind")
    if gpp is None or valgrind is None or not Path("/usr/include/valgrind/memcheck.h").is_file():
        pytest.skip("g++ and valgrind (with its headers) are needed")
    old = "\t\tkms_sm2_cond_neg(T.y, w & 1, tmp[0]);\n"
    header = sm2_mulg_header()
    assert header.count(old) == 1
    source = tmp_path / "ct.cpp"
    source.write_text(CT)
    binary = build(gpp, tmp_path, header.replace(old, "\t\tif (w & 1) kms_sm2_cond_neg(T.y, 1, tmp[0]);\n"), source,
                   "-O2", "-g0")
    run = subprocess.run([valgrind, "--error-exitcode=3", str(binary)], capture_output=True, text=True, check=False,
                         timeout=1200)
    assert run.returncode == 3 and "depends on uninitialised value" in run.stderr, run.stdout + run.stderr[-4000:]


# -- secrets left on the stack --------------------------------------------------------------------------------------

RESIDUE = Path(__file__).resolve().parent / "review" / "sm2_comb_residue.c"


def residue_hits(where: Path, instrumented: Harness, k: int, *flags: str, burn: bool = False) -> int:
    """Built as the token builds the header: C++, g++."""
    gpp = shutil.which("g++")
    if gpp is None:
        pytest.skip("g++ is not installed")
    words = instrumented.run([f"jac {h64(k)}"])[0].split()
    words += [f"{(k >> (64 * i)) & (2**64 - 1):016x}" for i in range(4)]
    source = where / "residue.cpp"
    source.write_text(RESIDUE.read_text())
    binary = build(gpp, where, sm2_mulg_header(), source, *flags)
    run = subprocess.run([str(binary), *(["burn"] if burn else []), h64(k), *words], capture_output=True, text=True,
                         check=True, timeout=60)
    match = re.fullmatch(r"hits (\d+)\n", run.stdout)
    assert match is not None, run.stdout
    return int(match.group(1))


SECRET_K = 0x5D2C1B0A99887766554433221100FFEEDDCCBBAA99887766554433221100FFEE


@pytest.mark.parametrize("level", ["-O2", "-O1", "-O3", "-Os"])
def test_the_comb_leaves_no_accumulator_limb_on_the_stack(level: str, instrumented: Harness, tmp_path: Path) -> None:
    """As the token compiles it (g++ -O2 -g0, and other levels): after kms_sm2_mulg returns, no 64-bit word of the
    dead stack below equals a limb of the final accumulator's X, Y, Z or of k. Before the review's fix (the comb in
    a function of its own, 32 KiB of stack cleared after it) 4 to 19 limbs were found at -O2 and -O3."""
    assert residue_hits(tmp_path, instrumented, SECRET_K, level, "-g0") == 0




# -- what the token's check at setup sees -------------------------------------------------------------------------

#: The 18 scalars OSSLECDSA.cpp's sm2MulGTable checks the comb with when the group is set up.
SETUP_CHECKS = ["1", "2", "3", "3F", "40", "41", "7F", "80", "81", "FFF", "F" + "0" * 63, "8" + "0" * 63,
                "FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54121",
                "FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54122",
                "0F4C2D2A6E7B1D5C8A93E61F0B7D2C4E5A6B7C8D9E0F1A2B3C4D5E6F70819203",
                "B7E151628AED2A6ABF7158809CF4F3C762E7160F38B4DA56A784D9045190CFEF",
                "5A827999ED9EBA1B8F1BBCDCCA62C1D6243F6A8885A308D313198A2E03707344",
                "C90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22"]


def test_the_setup_check_does_not_see_most_table_entries_and_a_wrong_one_is_refused(gcc: str, tmp_path: Path) -> None:
    """The check at setup reads 172 of the 2,320 table entries a scalar below n can use: a table entry wrong for any
    reason (a build bug, memory corrupted later: the table is ordinary writable heap for the life of the process)
    passes it, and
    the token then signs with a wrong k.G, only for the k having that digit in that window, so which signatures
    fail to verify says something about k. A wrong entry gives a point off the curve: since the review's fix the comb
    checks that its result is on the curve and refuses it (the signature fails instead of going out wrong)."""
    block = SM_TOKEN_PATCH.read_text().split("static const char* const checks[] = {", 1)[1].split("};", 1)[0]
    patch_checks = re.findall(r'"([0-9A-F]+)"', block)
    assert patch_checks == SETUP_CHECKS  # the same list as the patch's
    used = {(j, abs(d)) for c in SETUP_CHECKS for j, d in enumerate(booth(int(c, 16))) if d}
    assert len(used) == 172 and 36 * 64 + 16 == 2320  # entries the check reads, of the 2,320 a scalar below n can use
    assert (WINDOWS - 1, 2) not in used
    header = sm2_mulg_header()
    old = "\t\t\t\tkms_sm2_fe_from_bytes(table->t[j][i].y, by);\n"
    assert header.count(old) == 1
    header = header.replace(old, old + "\t\t\t\tif (j == KMS_SM2_WINDOWS - 1 && i == 1) table->t[j][i].y[0] ^= 1;\n")
    wrong = Harness(build(gcc, tmp_path, header, HARNESS, "-O2"))
    k = (2 << 252) + 0x1234567
    got = wrong.run([f"ladder {c.lower():0>64}" for c in SETUP_CHECKS] + [f"ladder {h64(k)}", f"mulg {h64(k)}"])
    assert got[: len(SETUP_CHECKS)] == ["same"] * len(SETUP_CHECKS)  # the setup check passes
    assert got[-2] == "DIFF"
    assert got[-1] == "0"  # refused: before the fix, "1 X Y" with (X, Y) off the curve
